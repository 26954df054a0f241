"""`JAX_OPS`: the array primitives of `qkernels.numerics.ArrayOps` in jax.numpy (traceable under jit).

With these, `OperandFormat.quantize` / `dequantize` and `Recipe.matmul` run as XLA ops: codes and
scales are bit-identical to the NumPy reference on any backend that divides correctly rounded (CPU
and GPU XLA do; see DESIGN.md section 6 for TPUs), and integer accumulators are exact.

One measured difference remains in the f32 epilogue: XLA:CPU contracts a multiply followed by an add
into one FMA (`y * s + b`, and a group's `y + acc_g * s_g`), even across `optimization_barrier`
(jax 0.10.2: 3,914 of 16,384 elements of `a * b + c` differ from the twice-rounded result; only
`--xla_backend_optimization_level=0` stops it). So `xla`'s outputs of integer recipes are within one
f32 rounding per fused multiply-add of the reference's (`qkernels.testing.fma_bound`), not identical;
products summed without a following add (W8A8 without bias) are identical.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax.numpy as jnp
from jax import lax

__all__ = ["JaxOps", "JAX_OPS", "DTYPES", "dtype_name"]

DTYPES: dict[str, Any] = {
    "float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64,
    "int8": jnp.int8, "int32": jnp.int32, "float8_e4m3fn": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2,
}


def dtype_name(dtype: Any) -> str:
    """'bfloat16' from a JAX / NumPy dtype or its name."""
    return jnp.dtype(dtype).name


def _div(a: jnp.ndarray, b: Any) -> jnp.ndarray:
    """IEEE f32 `a / b` with `b` broadcast to `a`'s shape, as the contract requires.

    XLA's simplifier rewrites `a / broadcast(b)` into `a * broadcast(1 / b)`, which rounds
    differently (measured on CPU: 1 code in ~10^4 moves at a tie); materializing the broadcast
    behind an optimization barrier keeps a true elementwise division.
    """
    return a / lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def _dot_dims(a: jnp.ndarray, w: jnp.ndarray, batched: bool) -> Any:
    """(..., M, K) x (B?, N, K): contract the last axes; a batched weight pairs its B with a's first."""
    return (((a.ndim - 1,), (w.ndim - 1,)), ((0,), (0,)) if batched else ((), ()))


class JaxOps:
    """`ArrayOps` in jax.numpy."""

    name: ClassVar[str] = "jax"
    host_checks: ClassVar[bool] = False  # traced: NaN/Inf checks go through checkify (check_finite=True)

    def asarray(self, x: Any) -> jnp.ndarray:
        return jnp.asarray(x)

    def cast(self, x: Any, dtype: str) -> jnp.ndarray:
        return jnp.asarray(x).astype(DTYPES[dtype])

    def div(self, a: Any, b: Any) -> jnp.ndarray:
        return _div(jnp.asarray(a), b)

    def round(self, x: Any) -> jnp.ndarray:
        return jnp.round(x)  # half to even

    def clip(self, x: Any, lo: float, hi: float) -> jnp.ndarray:
        return jnp.clip(x, None if lo == -math.inf else lo, None if hi == math.inf else hi)

    def where(self, cond: Any, a: Any, b: Any) -> jnp.ndarray:
        return jnp.where(cond, a, b)

    def absmax(self, x: Any) -> jnp.ndarray:
        return jnp.max(jnp.abs(x), axis=-1, keepdims=True, initial=0.0)

    def min(self, x: Any) -> jnp.ndarray:
        return jnp.min(x, axis=-1, keepdims=True)

    def max(self, x: Any) -> jnp.ndarray:
        return jnp.max(x, axis=-1, keepdims=True)

    def all_finite(self, x: Any) -> bool:
        return bool(jnp.all(jnp.isfinite(x)))

    def count_nonfinite(self, x: Any) -> int:
        return int(jnp.size(x) - jnp.count_nonzero(jnp.isfinite(x)))

    def pad_last(self, x: Any, k: int) -> jnp.ndarray:
        extra = k - x.shape[-1]
        if extra < 0:
            raise ValueError(f"cannot pad K={x.shape[-1]} down to {k}")
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra else x

    def pack_nibbles(self, q: Any) -> jnp.ndarray:
        u = lax.bitcast_convert_type(q, jnp.uint8)
        return lax.bitcast_convert_type((u[..., 0::2] & 0xF) | ((u[..., 1::2] & 0xF) << 4), jnp.int8)

    def unpack_nibbles(self, b: Any, signed: bool) -> jnp.ndarray:
        """Shifts happen in int32: int8 vector shifts do not legalize on TPU (DESIGN.md section 6)."""
        b = b.astype(jnp.int32)  # sign-extends the byte; only the low 8 bits are used below
        if signed:
            lo = lax.shift_right_arithmetic(lax.shift_left(b, 28), 28)
            hi = lax.shift_right_arithmetic(lax.shift_left(b, 24), 28)
        else:
            lo = b & 0xF
            hi = lax.shift_right_logical(b, 4) & 0xF
        return jnp.stack([lo, hi], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1]).astype(jnp.int8)

    def int_dot(self, a: Any, w: Any, batched: bool) -> jnp.ndarray:
        return lax.dot_general(a, w, _dot_dims(a, w, batched), preferred_element_type=jnp.int32)

    def grouped_int_dot(self, a: Any, w: Any, group_size: int, batched: bool) -> jnp.ndarray:
        ag = a.reshape(*a.shape[:-1], a.shape[-1] // group_size, group_size)  # [..., M, G, g]
        wg = w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)  # [B?, N, G, g]
        return jnp.einsum("...mgk,...ngk->...mng", ag, wg, preferred_element_type=jnp.int32)

    def grouped_scaled_sum(self, a: Any, w: Any, scale: Any, group_size: int, batched: bool) -> jnp.ndarray:
        acc_g = jnp.moveaxis(self.grouped_int_dot(a, w, group_size, batched), -1, 0)  # [G, ..., M, N]
        s_g = jnp.moveaxis(scale, -1, 0)[..., None, :]  # [G, B?, 1, N]

        def step(y: jnp.ndarray, xs: tuple[jnp.ndarray, jnp.ndarray]) -> tuple[jnp.ndarray, None]:
            a_g, s = xs
            return y + a_g.astype(jnp.float32) * s, None

        # a scan keeps XLA from reassociating the groups (DESIGN.md section 4's order)
        y, _ = lax.scan(step, jnp.zeros(acc_g.shape[1:], jnp.float32), (acc_g, s_g))
        return y

    def float_linear(self, x: Any, w: Any, bias: Any, out_dtype: str, batched: bool) -> jnp.ndarray:
        y = lax.dot_general(x, w, _dot_dims(x, w, batched), preferred_element_type=jnp.float32)
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        return y.astype(DTYPES[out_dtype])

    def quantile(self, x: Any, q: float) -> jnp.ndarray:
        x = jnp.asarray(x, jnp.float32)
        if x.shape[0] == 0:
            return jnp.zeros(x.shape[1:], jnp.float32)
        return jnp.quantile(x, q, axis=0).astype(jnp.float32)

    def broadcast_to(self, x: Any, shape: tuple[int, ...]) -> jnp.ndarray:
        return jnp.broadcast_to(jnp.asarray(x), shape)


JAX_OPS = JaxOps()
