"""The numerics contract (qkernels.numerics) in jax.numpy: quantize, dequantize, pack, unpack.

Same order of operations as the NumPy reference, so codes and scales are bit-identical on any
backend that divides correctly rounded (CPU and GPU XLA do; see DESIGN.md section 6 for TPUs).
Everything works along the last axis (K) and traces under jit/vmap/grad.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from qkernels.formats import OperandFormat, QOperand
from qkernels.numerics import Granularity

__all__ = ["quantize_operand", "dequantize_operand", "codes", "pack_int4", "unpack_int4", "pad_k"]


def pad_k(x: jnp.ndarray, k_padded: int) -> jnp.ndarray:
    """Zero-pad the last axis up to `k_padded`."""
    extra = k_padded - x.shape[-1]
    if extra < 0:
        raise ValueError(f"cannot pad K={x.shape[-1]} down to {k_padded}")
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def _blocks(x: jnp.ndarray, fmt: OperandFormat) -> jnp.ndarray:
    """(..., K_padded) -> (..., n_blocks, block): one scale per block."""
    if fmt.granularity is Granularity.GROUP:
        return x.reshape(*x.shape[:-1], -1, fmt.group_size)
    if fmt.granularity is Granularity.ROW:
        return x[..., None, :]
    return x.reshape(*([1] * (x.ndim - 1)), 1, -1)


def _unblocks(s: jnp.ndarray, fmt: OperandFormat) -> jnp.ndarray:
    """(..., n_blocks) -> the stored scale shape."""
    if fmt.granularity is Granularity.GROUP:
        return s
    if fmt.granularity is Granularity.ROW:
        return s[..., 0]
    return s.reshape(())


def _broadcast(s: jnp.ndarray, fmt: OperandFormat) -> jnp.ndarray:
    """Stored scale/zero -> broadcastable against (..., K_padded)."""
    if fmt.granularity is Granularity.GROUP:
        return jnp.repeat(s, fmt.group_size, axis=-1)
    if fmt.granularity is Granularity.ROW:
        return s[..., None]
    return s


def pack_int4(q: jnp.ndarray) -> jnp.ndarray:
    """Two 4-bit codes per byte along K: byte j = code 2j (low nibble) | code 2j+1 (high nibble)."""
    u = lax.bitcast_convert_type(pad_k(q, q.shape[-1] + q.shape[-1] % 2), jnp.uint8)
    lo, hi = u[..., 0::2] & 0xF, u[..., 1::2] & 0xF
    return lax.bitcast_convert_type(lo | (hi << 4), jnp.int8)


def unpack_int4(packed: jnp.ndarray, *, signed: bool) -> jnp.ndarray:
    """Inverse of `pack_int4`: int8 codes (..., 2 * K_stored), sign-extended when `signed`.

    Shifts happen in int32: int8 vector shifts do not legalize on TPU (DESIGN.md section 6).
    """
    b = packed.astype(jnp.int32)  # sign-extends the byte; only the low 8 bits are used below
    if signed:
        lo = lax.shift_right_arithmetic(lax.shift_left(b, 28), 28)
        hi = lax.shift_right_arithmetic(lax.shift_left(b, 24), 28)
    else:
        lo = b & 0xF
        hi = lax.shift_right_logical(b, 4) & 0xF
    return jnp.stack([lo, hi], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1]).astype(jnp.int8)


def _div(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """IEEE f32 `a / b` with `b` broadcast to `a`'s shape, as the contract requires.

    XLA's simplifier rewrites `a / broadcast(b)` into `a * broadcast(1 / b)`, which rounds
    differently (measured on CPU: 1 code in ~10^4 moves at a tie); materializing the broadcast
    behind an optimization barrier keeps a true elementwise division.
    """
    return a / lax.optimization_barrier(jnp.broadcast_to(b, a.shape))


def quantize_operand(x: jnp.ndarray, fmt: OperandFormat, *, amax: jnp.ndarray | None = None) -> QOperand:
    """Quantize float `x` (..., K) along its last axis: `QOperand(qvalue, scale, zero_point)`.

    K is zero-padded to `fmt.padded_k(K)` first (zeros change neither an absmax nor a range that
    includes 0); packed formats then store two codes per byte. NaN/Inf give garbage codes: check
    before (see `jax_bindings.dot_general`'s `check_finite`).
    `amax` (symmetric per-row formats): the rows' absolute maximum (...,) to calibrate with instead
    of `x`'s own, e.g. the all-reduced maximum when `x` is one K-shard of longer rows.
    """
    if amax is not None and (fmt.zero_point or fmt.granularity is not Granularity.ROW):
        raise ValueError(f"amax= calibrates symmetric per-row formats only, not {fmt.describe()}; "
                         f"drop amax to calibrate on x itself")
    x = pad_k(x.astype(jnp.float32), fmt.padded_k(x.shape[-1]))
    xb = _blocks(x, fmt)
    qt = fmt.qtype
    qmax = jnp.float32(qt.qmax)
    if fmt.zero_point:
        lo = jnp.minimum(jnp.min(xb, axis=-1, keepdims=True), 0.0)
        hi = jnp.maximum(jnp.max(xb, axis=-1, keepdims=True), 0.0)
        span = hi - lo
        scale = jnp.where(span == 0, jnp.float32(1), _div(span, qmax))
        zero = jnp.clip(jnp.round(_div(-lo, scale)), qt.qmin, qt.qmax)
        q = jnp.clip(jnp.round(_div(xb, scale)) + zero, qt.qmin, qt.qmax).astype(jnp.int8)
        zero = _unblocks(zero[..., 0].astype(jnp.int8), fmt)
    else:
        if amax is None:
            amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
        else:
            amax = jnp.asarray(amax, jnp.float32)[..., None, None]  # [..., 1 block, 1]
        scale = jnp.where(amax == 0, jnp.float32(1), _div(amax, qmax))
        q = jnp.clip(jnp.round(_div(xb, scale)), qt.qmin, qt.qmax).astype(jnp.int8)
        zero = None
    q = q.reshape(x.shape)
    if fmt.packed:
        q = pack_int4(q)
    return QOperand(q, _unblocks(scale[..., 0], fmt), zero)


def codes(operand: QOperand, fmt: OperandFormat) -> jnp.ndarray:
    """Unpacked int8 codes (..., K_padded), padding included (it is zero)."""
    q = operand.qvalue
    return unpack_int4(q, signed=fmt.qtype.signed) if fmt.packed else q


def dequantize_operand(operand: QOperand, fmt: OperandFormat, k: int, dtype: Any = jnp.float32) -> jnp.ndarray:
    """`(f32(q) - zero) * scale` (..., K) in f32, padding removed, then cast to `dtype`."""
    q = codes(operand, fmt).astype(jnp.float32)
    if fmt.zero_point:
        q = q - _broadcast(operand.zero_point.astype(jnp.float32), fmt)
    return (q * _broadcast(operand.scale.astype(jnp.float32), fmt))[..., :k].astype(dtype)
