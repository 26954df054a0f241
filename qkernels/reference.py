"""NumPy reference: quantize, dequantize, pack/unpack and the canonical quantized matmul.

This is a real backend (registered with dispatch as `reference`, able to serve every problem), and
the oracle every other backend is tested against. Integer dots accumulate in int64 so an int32
overflow would be visible; the rescale follows DESIGN.md section 4 operation by operation in f32
(NumPy never contracts a multiply and an add into an FMA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from qkernels import numerics
from qkernels.formats import Accumulation, OperandFormat, QOperand, Recipe
from qkernels.numerics import Granularity

__all__ = [
    "RefQuantized", "quantize", "dequantize", "codes", "accumulators", "qmatmul", "np_dtype",
]

_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
}


def np_dtype(name: Any) -> np.dtype:
    """NumPy dtype for a float dtype name ('bfloat16' through ml_dtypes)."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"dtype {name!r} is not a supported float dtype; use one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return np.dtype(name)


@dataclass(frozen=True, kw_only=True, slots=True)
class RefQuantized:
    """A quantized NumPy array in canonical layout.

    Invariant: `x[..., :k] ≈ (unpack(qvalue) - zero_point) * scale`, the scale broadcast over each
    row (per-row) or over each group of `fmt.group_size` along K (per-group); codes beyond `k`
    (padding) are zero.
    """

    qvalue: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    fmt: OperandFormat
    k: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (unpadded, unpacked) shape."""
        return (*self.qvalue.shape[:-1], self.k)

    def operand(self) -> QOperand:
        return QOperand(self.qvalue, self.scale, self.zero_point)

    def dequantize(self, dtype: Any = np.float32) -> np.ndarray:
        return dequantize(self.operand(), self.fmt, self.k).astype(np_dtype(dtype))


def _blocks(x: np.ndarray, fmt: OperandFormat) -> np.ndarray:
    """View (..., K_padded) as (..., n_blocks, block) so that one scale covers each block."""
    if fmt.granularity is Granularity.GROUP:
        return x.reshape(*x.shape[:-1], -1, fmt.group_size)
    if fmt.granularity is Granularity.ROW:
        return x[..., None, :]
    return x.reshape(*([1] * (x.ndim - 1)), 1, -1)


def _unblocks(scale: np.ndarray, fmt: OperandFormat) -> np.ndarray:
    """Scale with the block axis kept (..., n_blocks) -> the stored scale shape."""
    if fmt.granularity is Granularity.GROUP:
        return scale
    if fmt.granularity is Granularity.ROW:
        return scale[..., 0]
    return scale.reshape(())


def _broadcast(scale: np.ndarray, fmt: OperandFormat, k_padded: int) -> np.ndarray:
    """Stored scale -> one value per element of (..., K_padded)."""
    scale = np.asarray(scale)
    if fmt.granularity is Granularity.GROUP:
        return np.repeat(scale, fmt.group_size, axis=-1)
    if fmt.granularity is Granularity.ROW:
        return scale[..., None]
    return scale


def quantize(x: Any, fmt: OperandFormat, *, name: str = "x") -> RefQuantized:
    """Quantize `x` (..., K) along its last axis with `fmt` (calibrated on `x` itself).

    K is zero-padded to the group size (and to even length when packed) before calibration; zeros
    change neither an absmax nor a range that already includes 0. Raises ValueError naming `name`
    if `x` holds NaN or Inf.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating) and x.dtype != _DTYPES["bfloat16"]:
        raise TypeError(f"{name} has dtype {x.dtype}; quantize takes a float array")
    x = x.astype(np.float32)
    numerics.check_finite(x, name)
    k = x.shape[-1]
    xb = _blocks(numerics.pad_k(x, fmt.padded_k(k)), fmt)
    if fmt.zero_point:
        scale, zero = numerics.asymmetric_params(xb.min(-1, keepdims=True), xb.max(-1, keepdims=True), fmt.qtype)
        q = numerics.quantize_asymmetric(xb, scale, zero, fmt.qtype)
        zero = _unblocks(zero[..., 0], fmt)
    else:
        scale = numerics.symmetric_scale(np.abs(xb).max(-1, keepdims=True), fmt.qtype)
        q = numerics.quantize_symmetric(xb, scale, fmt.qtype)
        zero = None
    q = q.reshape(*x.shape[:-1], -1)
    if fmt.packed:
        q = numerics.pack_int4(q)
    return RefQuantized(qvalue=q, scale=_unblocks(scale[..., 0], fmt), zero_point=zero, fmt=fmt, k=k)


def codes(operand: QOperand, fmt: OperandFormat, k: int) -> np.ndarray:
    """Unpacked int8 codes of shape (..., K_padded) (padding included, it is zero)."""
    q = np.asarray(operand.qvalue)
    if q.dtype != np.int8:
        raise TypeError(f"qvalue has dtype {q.dtype}; quantized values are stored as int8")
    if q.shape[-1] != fmt.stored_k(k):
        raise ValueError(
            f"qvalue's last axis has {q.shape[-1]} entries but K={k} in format {fmt.describe()} "
            f"stores {fmt.stored_k(k)}; the operands' contraction sizes do not match")
    if fmt.packed:
        return numerics.unpack_int4(q, fmt.padded_k(k), fmt.qtype)
    return q


def dequantize(operand: QOperand, fmt: OperandFormat, k: int) -> np.ndarray:
    """`(f32(q) - zero) * scale` in f32, shape (..., K) (padding removed)."""
    kp = fmt.padded_k(k)
    q = codes(operand, fmt, k).astype(np.float32)
    if fmt.zero_point:
        q = q - _broadcast(np.asarray(operand.zero_point).astype(np.float32), fmt, kp)
    return (q * _broadcast(np.asarray(operand.scale, np.float32), fmt, kp))[..., :k]


def _as_operand(x: Any) -> QOperand:
    if isinstance(x, RefQuantized):
        return x.operand()
    if isinstance(x, QOperand):
        return x
    raise TypeError(f"expected a quantized operand (QOperand or RefQuantized), got {type(x).__name__}")


def _lhs_operand(lhs: Any, recipe: Recipe) -> tuple[QOperand, int]:
    """Quantized lhs (dynamic quantization of a float lhs) and its logical K."""
    if isinstance(lhs, (RefQuantized, QOperand)):
        op = _as_operand(lhs)
        return op, np.asarray(op.qvalue).shape[-1]
    lhs = np.asarray(lhs)
    return quantize(lhs, recipe.lhs, name="lhs").operand(), lhs.shape[-1]


def accumulators(lhs: Any, rhs: Any, recipe: Recipe) -> np.ndarray:
    """Exact integer accumulators in int64 for an integer recipe.

    W8A8-like (`Accumulation.INT32`): shape (..., M, N). Grouped (`INT32_PER_GROUP`): (..., M, N, G),
    one partial dot per group of K. `lhs` is float (quantized here, as the kernels do on the fly)
    or already quantized; `rhs` is quantized.
    """
    if recipe.accumulation is Accumulation.FLOAT:
        raise ValueError(f"{recipe.name} accumulates in float; it has no integer accumulators")
    lhs_op, k = _lhs_operand(lhs, recipe)
    recipe.check_k(k)
    kp = recipe.rhs.padded_k(k)
    a = numerics.pad_k(codes(lhs_op, recipe.lhs, k), kp).astype(np.int64)
    w = codes(_as_operand(rhs), recipe.rhs, k).astype(np.int64)
    if recipe.accumulation is Accumulation.INT32:
        acc = np.matmul(a, np.swapaxes(w, -1, -2))
    else:
        g = recipe.group_size
        acc = np.einsum("...mgk,...ngk->...mng", a.reshape(*a.shape[:-1], -1, g), w.reshape(*w.shape[:-1], -1, g))
    if np.abs(acc).max(initial=0) >= numerics.INT32_LIMIT:
        raise OverflowError(f"integer accumulator reached {np.abs(acc).max()} >= 2**31 for {recipe.name}")
    return acc


def qmatmul(lhs: Any, rhs: Any, recipe: Recipe, *, bias: Any = None, out_dtype: Any = None) -> np.ndarray:
    """`out[..., m, n] = rescale(sum_k lhs[..., m, k] * rhs[..., n, k])` per DESIGN.md section 4.

    lhs: float (..., M, K), or for integer recipes an already-quantized int8 per-row operand.
    rhs: quantized (..., N, K) in canonical stored layout (QOperand or RefQuantized); batch axes
    broadcast. bias: (N,) or None. out_dtype: a float dtype or name; default: lhs's float dtype
    (f32 when lhs is pre-quantized).
    """
    if out_dtype is None:
        out_dtype = np.float32 if isinstance(lhs, (RefQuantized, QOperand)) else np.asarray(lhs).dtype
    out_dtype = np_dtype(out_dtype)
    rhs = _as_operand(rhs)
    f32 = np.float32
    if recipe.accumulation is Accumulation.FLOAT:
        lhs = np.asarray(lhs)
        w = dequantize(rhs, recipe.rhs, lhs.shape[-1]).astype(lhs.dtype)  # weights in activation dtype
        y = np.matmul(lhs.astype(np.float64), np.swapaxes(w.astype(np.float64), -1, -2)).astype(f32)
    else:
        lhs_op, _ = _lhs_operand(lhs, recipe)
        acc = accumulators(lhs_op, rhs, recipe)
        lhs_scale = np.asarray(lhs_op.scale, f32)[..., :, None]
        rhs_scale = np.asarray(rhs.scale, f32)
        if recipe.accumulation is Accumulation.INT32:
            y = (acc.astype(f32) * lhs_scale) * rhs_scale[..., None, :]
        else:
            y = np.zeros(acc.shape[:-1], f32)
            for g in range(acc.shape[-1]):
                y = y + acc[..., g].astype(f32) * rhs_scale[..., None, :, g]
            y = y * lhs_scale
    if bias is not None:
        y = y + np.asarray(bias).astype(f32)
    return y.astype(out_dtype)


def _run_qmatmul(problem: Any, lhs: Any, rhs: QOperand, bias: Any) -> np.ndarray:
    lhs = QOperand(*(None if a is None else np.asarray(a) for a in lhs)) if isinstance(lhs, QOperand) else lhs
    return qmatmul(lhs, rhs, problem.recipe, bias=bias, out_dtype=problem.out_dtype)


def _accumulate_qmatmul(problem: Any, lhs: Any, rhs: QOperand) -> np.ndarray:
    """`Implementation.accumulate`: the exact accumulators as int32 (`accumulators` refused overflow)."""
    lhs = QOperand(*(None if a is None else np.asarray(a) for a in lhs)) if isinstance(lhs, QOperand) else lhs
    return accumulators(lhs, rhs, problem.recipe).astype(np.int32)


def _run_quantize(problem: Any, x: Any) -> QOperand:
    return quantize(x, problem.recipe.lhs, name="activations").operand()


def _serves_everything(problem: Any) -> None:
    return None


def _register() -> None:
    from qkernels import dispatch

    for op, run in ((dispatch.Op.QMATMUL, _run_qmatmul), (dispatch.Op.QUANTIZE, _run_quantize)):
        dispatch.register(dispatch.Implementation(
            name="reference", framework=dispatch.ANY_FRAMEWORK, op=op, priority=0,
            supports=_serves_everything, run=run,
            accumulate=_accumulate_qmatmul if op is dispatch.Op.QMATMUL else None,
            description="NumPy reference on the host: exact int64 accumulation, slow; the last resort"))


_register()
