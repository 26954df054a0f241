"""PyTorch binding: `linear`, `QTensor`, `quantize`, `QLinear`, `quantize_`, `explain`, `qkernels::` ops.

Importing it defines the `qkernels::linear` custom op; the implementations ('torch-cpu', Triton)
are registered by `qkernels.backends` on the first dispatch of a torch call.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch

from torch_bindings import ops
from torch_bindings.calibrate import calibrate, smoothquant_
from torch_bindings.functional import explain as linear_explain
from torch_bindings.functional import linear
from torch_bindings.grouped import QExperts, grouped_linear, quantize_experts
from torch_bindings.grouped import explain as grouped_explain
from torch_bindings.lora import LoRALinear, add_lora, load_lora, lora_state_dict
from torch_bindings.modules import LayerSummary, QLinear, Summary, quantize_
from torch_bindings.qat import QATLinear, convert, prepare_qat
from torch_bindings.qtensor import QTensor
from torch_bindings.qtensor import quantize as _quantize

__all__ = ["linear", "explain", "quantize", "quantize_", "QLinear", "QTensor", "LINEAR", "Summary", "LayerSummary",
           "QATLinear", "prepare_qat", "convert", "LoRALinear", "add_lora", "lora_state_dict", "load_lora",
           "calibrate", "smoothquant_", "grouped_linear", "quantize_experts", "grouped_explain", "QExperts",
           "ColwiseParallel", "RowwiseParallel", "parallelize"]

_DISTRIBUTED = ("ColwiseParallel", "RowwiseParallel", "parallelize")  # torch.distributed: imported on first use

LINEAR = ops.LINEAR

if "transformers" in sys.modules:  # register the "qkernels" quant_method (importing transformers takes seconds)
    importlib.import_module("torch_bindings.hf")


def __getattr__(name: str) -> Any:
    if name in _DISTRIBUTED:
        return getattr(importlib.import_module("torch_bindings.distributed"), name)
    raise AttributeError(f"module 'torch_bindings' has no attribute {name!r}")


def quantize(x: Any, recipe: Any = None, **kwargs: Any) -> QTensor:
    """Quantize an (out_features, in_features) float weight for `recipe` (default W8A8) to a QTensor."""
    return _quantize(x, recipe, **kwargs)


def explain(input: torch.Tensor, weight: Any, *args: Any, **kwargs: Any) -> Any:
    """The implementations that could run a call, with verdicts and the choice: `explain(x, w, bias)` for
    `linear(x, w, bias)`; `explain(x, experts, offsets)` for `grouped_linear(x, experts, offsets)`, told apart
    by a `QExperts` weight or integer offsets (a bias is float). `backend=`, `verbose=` as for the call's own
    explain (`torch_bindings.functional.explain`, `torch_bindings.grouped.explain`)."""
    third = args[0] if args else kwargs.get("offsets")
    if isinstance(weight, QExperts) or (isinstance(third, torch.Tensor) and not third.is_floating_point()):
        return grouped_explain(input, weight, *args, **kwargs)
    return linear_explain(input, weight, *args, **kwargs)
