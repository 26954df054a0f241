"""Fused dynamic activation quantization (int8, per row) as a Pallas kernel.

Bit-exact to `qkernels.numerics` (subnormals read as 0, `scale = amax / 127` or 1 below FLT_MIN,
`q = clip(round_half_even(x / scale))`)
wherever f32 division is IEEE-correct: in interpret mode on CPU (tested ==). XLA's algebraic
simplifier rewrites a division by a broadcast (or constant) divisor into a multiply by its
reciprocal (measured on XLA:CPU: 4.4% of `a / 127` differ by an ulp), so `exact_div` hides the
divisor behind an optimization barrier where XLA compiles the kernel (interpret mode, XLA ops).
On TPU Mosaic lowers f32 division to a reciprocal refinement that is not guaranteed correctly
rounded, so a code can differ by one where `x / scale` lies within an ulp of a rounding tie.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qkernels import numerics
from qkernels.kernels.pallas.layout import fit_block, out_struct, pad_axis

__all__ = ["quantize_rows", "exact_div"]

QMAX = 127
FLT_MIN = numerics.FLT_MIN
_ROW_BYTES_BUDGET = 2**20  # one f32 input block; the kernel keeps ~4 such tiles live


def exact_div(x: jnp.ndarray, d: jnp.ndarray, *, barrier: bool) -> jnp.ndarray:
    """IEEE `x / d` elementwise; `barrier` keeps XLA from turning it into `x * (1 / d)`."""
    d = jnp.broadcast_to(jnp.asarray(d, x.dtype), x.shape)
    if barrier:
        d = jax.lax.optimization_barrier(d)
    return x / d


def _quantize_kernel(x_ref, q_ref, s_ref, *, barrier: bool):
    """One block of rows.

    x_ref: (block_m, K) float activations, VMEM.
    q_ref: (block_m, K) int8 codes, VMEM.
    s_ref: (block_m, 1) f32 per-row scales, VMEM.
    """
    x = x_ref[...].astype(jnp.float32)  # [block_m, K]
    x = jnp.where(jnp.abs(x) < FLT_MIN, jnp.float32(0), x)  # subnormals read as 0 (numerics.flush_subnormals)
    amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)  # [block_m, 1]
    scale = exact_div(amax, jnp.float32(QMAX), barrier=barrier)
    scale = jnp.where(scale < FLT_MIN, jnp.float32(1), scale)  # 0 or subnormal -> 1 (numerics.symmetric_scale)
    q = jnp.clip(jnp.round(exact_div(x, scale, barrier=barrier)), -QMAX, QMAX)  # round: half to even
    q_ref[...] = q.astype(jnp.int32).astype(jnp.int8)
    s_ref[...] = scale


@functools.partial(jax.jit, static_argnames=("interpret",))
def quantize_rows(x: jnp.ndarray, *, interpret: Any = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """int8 codes (..., K) and f32 scales (...,) of `x` quantized per row along its last axis."""
    *lead, k = x.shape
    rows = 1
    for d in lead:
        rows *= d
    x2 = x.reshape(rows, k)
    target = max(32, min(512, _ROW_BYTES_BUDGET // (4 * max(k, 1)) // 32 * 32))
    bm, mp = fit_block(rows, target, 32)
    x2 = pad_axis(x2, 0, mp)
    q, s = pl.pallas_call(
        functools.partial(_quantize_kernel, barrier=bool(interpret)),
        grid=(mp // bm,),
        in_specs=[pl.BlockSpec((bm, k), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((bm, k), lambda i: (i, 0)), pl.BlockSpec((bm, 1), lambda i: (i, 0))],
        out_shape=[out_struct((mp, k), jnp.int8, [x2]), out_struct((mp, 1), jnp.float32, [x2])],
        interpret=interpret,
        name="qk_quantize_rows",
    )(x2)
    return q[:rows].reshape(*lead, k), s[:rows, 0].reshape(lead)
