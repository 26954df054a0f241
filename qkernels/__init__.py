"""qkernels: hand-written quantized matmul kernels (Triton, Pallas) behind drop-in JAX/PyTorch APIs.

`import qkernels` needs neither JAX nor PyTorch: the framework entry points (`dot_general`,
`make_dot_general`, `make_einsum`, `linear`, `quantize_`, `QLinear`, `QTensor`, `QArray`, and the Flax
model-level `Rule`, `quantize_model`, `quantize_params`, `quantization_summary`) are loaded on first
use from `jax_bindings` / `torch_bindings`. `quantize` and `explain` route by the
type of their first argument.
"""

from __future__ import annotations

import importlib
from typing import Any

from qkernels.dispatch import BackendUnavailable, Problem, SlowPathWarning, use_backend
from qkernels.formats import (
    FP8, FP8A16, RECIPES, W4A8, W4A16, W8A8, W8A16, Accumulation, Calibration, OperandFormat, Recipe, parse_recipe,
    recipe_named, resolve_recipe,
)
from qkernels.numerics import Granularity, QType, int_type

__version__ = "0.1.0"

__all__ = [
    "W8A8", "W8A16", "W4A16", "W4A8", "FP8", "FP8A16", "Recipe", "RECIPES", "parse_recipe", "recipe_named",
    "resolve_recipe",
    "OperandFormat", "Accumulation", "Calibration", "Granularity", "QType", "int_type",
    "Problem", "BackendUnavailable", "SlowPathWarning", "use_backend", "explain", "quantize",
    "dot_general", "make_dot_general", "make_einsum", "QArray", "linear", "quantize_", "QLinear", "QTensor",
    "QATLinear", "prepare_qat", "convert", "LoRALinear", "add_lora", "lora_state_dict", "load_lora",
    "calibrate", "smoothquant_",
    "Rule", "quantize_model", "quantize_params", "quantization_summary",
    "ragged_dot", "grouped_linear", "quantize_experts", "prepack",
    "ColwiseParallel", "RowwiseParallel", "parallelize",
]

_LAZY = {
    "dot_general": "jax_bindings",
    "make_dot_general": "jax_bindings",
    "make_einsum": "jax_bindings",
    "QArray": "jax_bindings",
    "prepack": "jax_bindings",
    "Rule": "jax_bindings.rules",
    "quantize_model": "jax_bindings.model",
    "quantize_params": "jax_bindings.model",
    "quantization_summary": "jax_bindings.model",
    "linear": "torch_bindings",
    "quantize_": "torch_bindings",
    "QLinear": "torch_bindings",
    "QTensor": "torch_bindings",
    "QATLinear": "torch_bindings",
    "prepare_qat": "torch_bindings",
    "convert": "torch_bindings",
    "LoRALinear": "torch_bindings",
    "add_lora": "torch_bindings",
    "lora_state_dict": "torch_bindings",
    "load_lora": "torch_bindings",
    "calibrate": "torch_bindings",
    "smoothquant_": "torch_bindings",
    "ragged_dot": "jax_bindings",
    "grouped_linear": "torch_bindings",
    "ColwiseParallel": "torch_bindings.distributed",
    "RowwiseParallel": "torch_bindings.distributed",
    "parallelize": "torch_bindings.distributed",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qkernels' has no attribute {name!r}")


def _framework_of(x: Any) -> str:
    """'torch', 'jax' or 'numpy' from an array's (or quantized container's) type."""
    for cls in type(x).__mro__:
        root = cls.__module__.split(".", 1)[0]
        if root in ("torch", "torch_bindings"):
            return "torch"
        if root in ("jax", "jaxlib", "jax_bindings"):
            return "jax"
    return "numpy"


def quantize(x: Any, recipe: Any = None, **kwargs: Any) -> Any:
    """Quantize a weight for `recipe` (default W8A8): a torch `QTensor` for a torch tensor, a JAX
    `QArray` for a JAX array (pass `contracting_axes=`), a `reference.RefQuantized` for NumPy."""
    framework = _framework_of(x)
    if framework == "numpy":
        from qkernels import reference

        return reference.quantize(x, resolve_recipe(recipe).rhs, name=kwargs.get("name", "weight"))
    module = importlib.import_module(f"{framework}_bindings")
    return module.quantize(x, recipe, **kwargs)


def quantize_experts(w: Any, recipe: Any = None, **kwargs: Any) -> Any:
    """Quantize a stack of expert weights for `recipe` (default W8A8), each expert with its own scales:
    a JAX (E, K, N) array (`lax.ragged_dot`'s rhs) -> `QArray` for `qk.ragged_dot`; a torch
    (E, out_features, in_features) tensor -> `QExperts` for `qk.grouped_linear`."""
    framework = _framework_of(w)
    if framework == "numpy":
        raise TypeError("quantize_experts takes a JAX array or a torch tensor (the framework of the call it feeds)")
    return importlib.import_module(f"{framework}_bindings").quantize_experts(w, recipe, **kwargs)


def explain(*args: Any, **kwargs: Any) -> Any:
    """Every implementation that could run a call, with its verdict and reason, and the one chosen.

    `explain(problem)` for a `Problem`; otherwise the arguments of the call to explain, e.g.
    `explain(x, w_q, bias)` (PyTorch, like `linear`) or `explain(lhs, rhs, dimension_numbers)` (JAX);
    grouped (MoE) calls likewise: `explain(x, experts, offsets)` (like `grouped_linear`) or
    `explain(lhs, experts, group_sizes)` (like `ragged_dot`).
    By default it lists the candidates of the call's framework declared for its recipe;
    `verbose=True` lists every registered one with its reason.
    """
    if args and isinstance(args[0], Problem):
        from qkernels import dispatch

        return dispatch.explain(*args, **kwargs)
    framework = next((f for f in map(_framework_of, args) if f != "numpy"), None)
    if framework is None:
        raise TypeError("explain() takes a qkernels.Problem, or the torch/JAX arrays of the call to explain")
    return importlib.import_module(f"{framework}_bindings").explain(*args, **kwargs)
