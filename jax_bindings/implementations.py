"""JAX-side implementations registered with dispatch: 'xla' and 'reference.callback'.

- `xla` (priority 50): XLA's own integer dot (`lax.dot_general` on int8 with
  `preferred_element_type=int32`) and the rescale in DESIGN.md order, all fused by XLA. Serves every
  recipe on every platform except where XLA has no int8 dot worth using (TPU v4: no int8 MXU).
  XLA may contract the rescale's multiply and add into an FMA or reorder it, so its f32 outputs are
  accurate (within `qkernels.testing.tolerances`), not guaranteed bit-identical; its int32
  accumulators are exact.
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
from jax import lax

from jax_bindings import quant
from qkernels import dispatch, reference, tuning
from qkernels.formats import Accumulation, QOperand

__all__ = ["platform_of", "current_platform", "current_device", "run_host", "accumulate_host", "accumulators",
           "Execution", "execution_of"]

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


_TPU_KINDS = (  # device_kind prefix -> arch; most specific first
    ("tpu v5 lite", "v5e"), ("tpu v5e", "v5e"), ("tpu v6 lite", "v6e"), ("tpu v6e", "v6e"),
    ("tpu v5p", "v5p"), ("tpu v5", "v5p"), ("tpu v4", "v4"), ("tpu v3", "v3"), ("tpu v2", "v2"),
)


def platform_of(device: Any) -> str:
    """Dispatch platform string of a JAX device: 'cpu', 'tpu:v5e', 'cuda:sm_90', 'rocm:gfx942'."""
    if device.platform == "cpu":
        return "cpu"
    if device.platform == "tpu":
        kind = device.device_kind.lower()
        for prefix, arch in _TPU_KINDS:
            if kind.startswith(prefix):
                return f"tpu:{arch}"
        return f"tpu:{kind.replace(' ', '_')}"
    cc = str(getattr(device, "compute_capability", ""))
    if device.platform == "rocm" or cc.startswith("gfx"):
        return f"rocm:{cc}"
    if device.platform in ("gpu", "cuda"):
        return "cuda:sm_" + cc.replace(".", "")
    return device.platform


def current_platform() -> str:
    """Platform of the default device (`jax.devices()[0]`)."""
    return platform_of(jax.devices()[0])


def current_device() -> str:
    """Device kind of the default device, the key of its tuned-config tables ('tpu-v5e', 'h100', 'cpu')."""
    device = jax.devices()[0]
    return "cpu" if device.platform == "cpu" else tuning.device_kind(device.device_kind)


def _lhs_codes(problem: dispatch.Problem, lhs: Any) -> QOperand:
    if isinstance(lhs, QOperand):
        return lhs
    return quant.quantize_operand(lhs, problem.recipe.lhs)


def _int_dot(a: jnp.ndarray, w: jnp.ndarray, batch: bool) -> jnp.ndarray:
    """int8 (..., M, K) x int8 (B?, N, K) -> exact int32 (..., M, N)."""
    if batch:
        dims = (((a.ndim - 1,), (w.ndim - 1,)), ((0,), (0,)))
    else:
        dims = (((a.ndim - 1,), (1,)), ((), ()))
    return lax.dot_general(a, w, dims, preferred_element_type=jnp.int32)


def accumulators(problem: dispatch.Problem, lhs: Any, rhs: QOperand) -> jnp.ndarray:
    """Exact int32 accumulators of an integer recipe: (..., M, N), or (..., M, N, G) per group."""
    recipe = problem.recipe
    lhs_op = _lhs_codes(problem, lhs)
    kp = recipe.rhs.padded_k(problem.k)
    a = quant.pad_k(lhs_op.qvalue, kp)  # activations are not padded by callers; weights' padding is 0
    w = quant.codes(rhs, recipe.rhs)
    batch = problem.batch is not None
    if recipe.accumulation is Accumulation.INT32:
        return _int_dot(a, w, batch)
    g = recipe.group_size
    a = a.reshape(*a.shape[:-1], kp // g, g)  # [..., M, G, g]
    w = w.reshape(*w.shape[:-1], kp // g, g)  # [B?, N, G, g]
    acc = jnp.einsum("...mgk,...ngk->...mng", a, w, preferred_element_type=jnp.int32)
    return acc


def _run_xla(problem: dispatch.Problem, lhs: Any, rhs: QOperand, bias: Any) -> jnp.ndarray:
    recipe = problem.recipe
    f32 = jnp.float32
    if recipe.accumulation is Accumulation.FLOAT:
        w = quant.dequantize_operand(rhs, recipe.rhs, problem.k, lhs.dtype)  # weights in activation dtype
        dims = (((lhs.ndim - 1,), (w.ndim - 1,)), ((0,), (0,)) if problem.batch is not None else ((), ()))
        y = lax.dot_general(lhs, w, dims, preferred_element_type=f32)
    else:
        lhs_op = _lhs_codes(problem, lhs)
        acc = accumulators(problem, lhs_op, rhs)
        lhs_scale = lhs_op.scale.astype(f32)[..., :, None]
        if recipe.accumulation is Accumulation.INT32:
            y = (acc.astype(f32) * lhs_scale) * rhs.scale.astype(f32)[..., None, :]
        else:
            # Groups in order, as DESIGN.md section 4 prescribes (a scan keeps XLA from reassociating).
            acc_g = jnp.moveaxis(acc, -1, 0)  # [G, ..., M, N]
            s_g = jnp.moveaxis(rhs.scale.astype(f32), -1, 0)[..., None, :]  # [G, B?, 1, N]

            def step(y: jnp.ndarray, xs: tuple[jnp.ndarray, jnp.ndarray]) -> tuple[jnp.ndarray, None]:
                a_g, s = xs
                return y + a_g.astype(f32) * s, None

            y, _ = lax.scan(step, jnp.zeros(acc_g.shape[1:], f32), (acc_g, s_g))
            y = y * lhs_scale
    if bias is not None:
        y = y + bias.astype(f32)
    return y.astype(problem.out_dtype)


def _supports_xla(problem: dispatch.Problem) -> str | None:
    if problem.platform == "tpu:v4" and problem.recipe.lhs is not None:
        return "TPU v4 has no int8 MXU path; use a weight-only recipe (W8A16/W4A16) on v4"
    return None


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def run_host(impl: dispatch.Implementation, problem: dispatch.Problem, lhs: Any, rhs: QOperand,
             bias: Any) -> jnp.ndarray:
    """Run a framework-neutral (NumPy) implementation from JAX through `jax.pure_callback`."""
    lead = lhs.qvalue.shape[:-1] if isinstance(lhs, QOperand) else lhs.shape[:-1]
    out_shape = jax.ShapeDtypeStruct((*lead, problem.n), jnp.dtype(reference.np_dtype(problem.out_dtype)))

    def host(lhs: Any, rhs: QOperand, bias: Any) -> np.ndarray:
        bias = None if bias is None else np.asarray(bias)
        out = impl.run(problem, _to_numpy(lhs), QOperand(*_to_numpy(tuple(rhs))), bias)
        return np.asarray(out, out_shape.dtype)

    return jax.pure_callback(host, out_shape, lhs, rhs, bias, vmap_method="sequential")


def accumulate_host(impl: dispatch.Implementation, problem: dispatch.Problem, lhs: Any, rhs: QOperand) -> jnp.ndarray:
    """`impl.accumulate` of a framework-neutral implementation through `jax.pure_callback`: int32
    (..., M, N), or (..., M, N, G) per group."""
    if impl.accumulate is None:
        raise ValueError(f"implementation {impl.name!r} does not expose integer accumulators; "
                         f"use one that does (e.g. 'reference') or keep K unsharded")
    lead = lhs.qvalue.shape[:-1] if isinstance(lhs, QOperand) else lhs.shape[:-1]
    recipe = problem.recipe
    groups = () if recipe.accumulation is Accumulation.INT32 else (recipe.rhs.padded_k(problem.k) // recipe.group_size,)
    out_shape = jax.ShapeDtypeStruct((*lead, problem.n, *groups), jnp.dtype(jnp.int32))

    def host(lhs: Any, rhs: QOperand) -> np.ndarray:
        return np.asarray(impl.accumulate(problem, _to_numpy(lhs), QOperand(*_to_numpy(tuple(rhs)))), np.int32)

    return jax.pure_callback(host, out_shape, lhs, rhs, vmap_method="sequential")


def _reference() -> dispatch.Implementation:
    return next(i for i in dispatch.registered(dispatch.ANY_FRAMEWORK, dispatch.Op.QMATMUL) if i.name == "reference")


def _run_reference(problem: dispatch.Problem, lhs: Any, rhs: QOperand, bias: Any) -> jnp.ndarray:
    return run_host(_reference(), problem, lhs, rhs, bias)


def _accumulate_reference(problem: dispatch.Problem, lhs: Any, rhs: QOperand) -> jnp.ndarray:
    return accumulate_host(_reference(), problem, lhs, rhs)


def _serves_everything(problem: dispatch.Problem) -> None:
    return None


def _register() -> None:
    _EXECUTION.update({"xla": Execution.XLA_OPS, "reference.callback": Execution.HOST})
    dispatch.register(dispatch.Implementation(
        name="xla", framework="jax", priority=50, supports=_supports_xla, run=_run_xla, accumulate=accumulators,
        description="XLA integer dot (int8 x int8 -> int32) with the rescale fused by XLA; every platform"))
    dispatch.register(dispatch.Implementation(
        name="reference.callback", framework="jax", priority=1, supports=_serves_everything,
        run=_run_reference, accumulate=_accumulate_reference,
        description="NumPy reference through jax.pure_callback (host round trip; exact, slow)"))


_register()
