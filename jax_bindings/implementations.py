"""JAX-side implementations registered with dispatch: 'xla' and 'reference.callback'.

- `xla` (priority 50): executes the recipe's own definition (`Recipe.matmul`) with
  `jax_bindings.arrays.JAX_OPS`: XLA's integer dot (`lax.dot_general` on int8 with
  `preferred_element_type=int32`) and the rescale in DESIGN.md order, all fused by XLA. Serves every
  recipe built on the accumulations it knows, on every platform except where XLA has no int8 dot
  worth using (TPU v4: no int8 MXU); a recipe with another accumulation is refused with a reason.
  XLA contracts the rescale's multiply and add into an FMA (see `jax_bindings.arrays`), so its f32
  outputs are within one rounding per multiply-add of the reference's; its int32 accumulators are exact.
  On CPU, where XLA's int8 dot is slow at M=1 and a convert of the codes is not fused into a float
  dot, it takes the faster paths of `jax_bindings.xla_cpu` (`explain` names the one that runs).
- `reference.callback` (priority 1): the NumPy reference through `jax.pure_callback` (host round
  trip, slow; bf16 crosses as ml_dtypes.bfloat16). It sits just above the framework-neutral
  `reference` (priority 0), which takes NumPy and so cannot run on tracers; the binding also wraps
  any other framework-neutral implementation the same way.

`execution_of(impl)` says how an implementation runs under `jit` (ordinary XLA ops, an opaque
kernel, or a host callback), which is what `jax_bindings.sharding` needs to partition it.
"""

from __future__ import annotations

from typing import Any

import enum

import jax
import jax.numpy as jnp
import numpy as np

from jax_bindings import xla_cpu
from jax_bindings.arrays import DTYPES, JAX_OPS
from qkernels import dispatch, hardware, reference
from qkernels.formats import ACCUMULATIONS, QOperand

__all__ = ["platform_of", "current_platform", "current_device", "run_host", "accumulate_host", "accumulators",
           "Execution", "execution_of", "register", "SERVES"]

class Execution(enum.Enum):
    """How an implementation runs under `jit`, i.e. what can partition it over a mesh."""

    XLA_OPS = "ordinary XLA ops: GSPMD/Shardy partition them like any other op"
    KERNEL = "an opaque kernel call (Pallas): partitioned by jax_bindings.sharding's rule"
    HOST = "a host callback: runs per shard only where the layout is known while tracing"


_EXECUTION: dict[str, Execution] = {}  # by implementation name; kernels are the default


def execution_of(impl: dispatch.Implementation) -> Execution:
    """`Execution` of a JAX-side (or framework-neutral, hence host-called) implementation."""
    if impl.framework == dispatch.ANY_FRAMEWORK:
        return Execution.HOST
    return _EXECUTION.get(impl.name, Execution.KERNEL)


def platform_of(device: Any) -> str:
    """Dispatch platform string of a JAX device: 'cpu', 'tpu:v5e', 'cuda:sm_90', 'rocm:gfx942'."""
    if device.platform == "cpu":
        return "cpu"
    if device.platform == "tpu":
        return hardware.tpu_platform(device.device_kind)
    cc = str(getattr(device, "compute_capability", ""))
    if device.platform == "rocm" or cc.startswith("gfx"):
        return hardware.rocm_platform(cc)
    if device.platform in ("gpu", "cuda"):
        major, _, minor = cc.partition(".")
        return hardware.cuda_platform(int(major), int(minor or 0))
    return device.platform


def current_platform() -> str:
    """Platform of the default device (`jax.devices()[0]`)."""
    return platform_of(jax.devices()[0])


def current_device() -> str:
    """Device kind of the default device, the key of its tuned-config tables ('tpu-v5e', 'h100', 'cpu')."""
    device = jax.devices()[0]
    return "cpu" if device.platform == "cpu" else hardware.device_kind(device.device_kind)


def accumulators(call: dispatch.Bound, lhs: Any, rhs: QOperand) -> jnp.ndarray:
    """Exact int32 accumulators of an integer recipe: (..., M, N), or (..., M, N, G) per group."""
    p = call.problem
    recipe = p.recipe
    lhs = recipe.accumulation.lhs_operand(recipe, JAX_OPS, lhs)
    return recipe.accumulation.accumulators(recipe, JAX_OPS, lhs, rhs, k=p.k, batched=p.batch is not None)


def _note_xla(problem: dispatch.Problem) -> str | None:
    path = xla_cpu.path_of(problem)
    return None if path is xla_cpu.Path.DEFINITION else f"CPU path: {path.value}"


def _supports_xla(problem: dispatch.Problem) -> str | None:
    if problem.platform == "tpu:v4" and problem.recipe.lhs is not None:
        return "TPU v4 has no int8 MXU path; use a weight-only recipe (W8A16/W4A16) on v4"
    storage = problem.recipe.rhs.qtype.storage
    if storage not in DTYPES:
        return f"weights stored as {storage}, which JAX cannot hold"
    return None


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def run_host(call: dispatch.Bound, lhs: Any, rhs: QOperand, bias: Any) -> jnp.ndarray:
    """Run a framework-neutral (NumPy) implementation's bound call from JAX through `jax.pure_callback`."""
    problem = call.problem
    lead = lhs.qvalue.shape[:-1] if isinstance(lhs, QOperand) else lhs.shape[:-1]
    out_shape = jax.ShapeDtypeStruct((*lead, problem.n), jnp.dtype(reference.np_dtype(problem.out_dtype)))

    def host(lhs: Any, rhs: QOperand, bias: Any) -> np.ndarray:
        bias = None if bias is None else np.asarray(bias)
        out = call.run(_to_numpy(lhs), QOperand(*_to_numpy(tuple(rhs))), bias)
        return np.asarray(out, out_shape.dtype)

    return jax.pure_callback(host, out_shape, lhs, rhs, bias, vmap_method="sequential")


def accumulate_host(call: dispatch.Bound, lhs: Any, rhs: QOperand) -> jnp.ndarray:
    """`accumulate` of a framework-neutral implementation's bound call through `jax.pure_callback`:
    int32 (..., M, N), or (..., M, N, G) per group."""
    if call.implementation.accumulate is None:
        raise ValueError(f"implementation {call.implementation.name!r} does not expose integer accumulators; "
                         f"use one that does (e.g. 'reference') or keep K unsharded")
    problem = call.problem
    lead = lhs.qvalue.shape[:-1] if isinstance(lhs, QOperand) else lhs.shape[:-1]
    recipe = problem.recipe
    groups = (recipe.rhs.padded_k(problem.k) // recipe.group_size,) if recipe.accumulation.grouped else ()
    out_shape = jax.ShapeDtypeStruct((*lead, problem.n, *groups), jnp.dtype(jnp.int32))

    def host(lhs: Any, rhs: QOperand) -> np.ndarray:
        return np.asarray(call.accumulate(_to_numpy(lhs), QOperand(*_to_numpy(tuple(rhs)))), np.int32)

    return jax.pure_callback(host, out_shape, lhs, rhs, vmap_method="sequential")


def _on_reference(call: dispatch.Bound) -> dispatch.Bound:
    """The same problem bound to the framework-neutral 'reference' implementation."""
    ref = next(i for i in dispatch.registered(dispatch.ANY_FRAMEWORK, dispatch.Op.QMATMUL) if i.name == "reference")
    return dispatch.Bound(call.problem, ref)


def _run_reference(call: dispatch.Bound, lhs: Any, rhs: QOperand, bias: Any) -> jnp.ndarray:
    return run_host(_on_reference(call), lhs, rhs, bias)


def _accumulate_reference(call: dispatch.Bound, lhs: Any, rhs: QOperand) -> jnp.ndarray:
    return accumulate_host(_on_reference(call), lhs, rhs)


def _serves_everything(problem: dispatch.Problem) -> None:
    return None


SERVES = dispatch.Serves.accumulating(*(a.name for a in ACCUMULATIONS))
"""The shipped accumulations (`formats.ACCUMULATIONS`), which `Recipe.matmul` executes with `JAX_OPS`:
any recipe built on them is served."""


def register() -> None:
    """Register 'xla' and 'reference.callback' with dispatch (`qkernels.backends` calls this)."""
    _EXECUTION.update({"xla": Execution.XLA_OPS, "reference.callback": Execution.HOST})
    dispatch.register(dispatch.Implementation(
        name="xla", framework="jax", priority=50, supports=_supports_xla, run=xla_cpu.run, accumulate=accumulators, note=_note_xla,
        slower=xla_cpu.slower_than_float,
        serves=SERVES, description="XLA ops executing the recipe's definition (int8 dot -> int32, rescale fused)"))
    dispatch.register(dispatch.Implementation(
        name="reference.callback", framework="jax", priority=1, supports=_serves_everything, serves=SERVES.everything(),
        run=_run_reference, accumulate=_accumulate_reference,
        description="NumPy reference through jax.pure_callback (host round trip; exact, slow)"))
    from jax_bindings import ragged  # the grouped (MoE) op: same platform rules

    ragged.register(_supports_xla, SERVES)
