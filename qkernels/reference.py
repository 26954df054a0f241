"""NumPy reference: quantize, dequantize, pack/unpack and the canonical quantized matmul.

This is a real backend (registered with dispatch as `reference`, able to serve every problem), and
the oracle every other backend is tested against. It executes the definitions of
`qkernels.formats` with `numerics.NUMPY_OPS`: integer dots accumulate in int64 so an int32 overflow
would be visible; the rescale follows DESIGN.md section 4 operation by operation in f32 (NumPy never
contracts a multiply and an add into an FMA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qkernels import numerics
from qkernels.formats import OperandFormat, QOperand, Recipe
from qkernels.numerics import NUMPY_OPS

__all__ = [
    "RefQuantized", "quantize", "dequantize", "codes", "accumulators", "qmatmul", "np_dtype",
]

_FLOAT_NAMES = ("float32", "float16", "bfloat16", "float64")


def np_dtype(name: Any) -> np.dtype:
    """NumPy dtype for a float dtype name ('bfloat16' through ml_dtypes)."""
    if isinstance(name, str):
        if name not in _FLOAT_NAMES:
            raise ValueError(f"dtype {name!r} is not a supported float dtype; use one of {sorted(_FLOAT_NAMES)}")
        return NUMPY_OPS.dtypes[name]
    return np.dtype(name)


def _dtype_name(dtype: np.dtype) -> str:
    return next(n for n, d in NUMPY_OPS.dtypes.items() if d == dtype)


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


def quantize(x: Any, fmt: OperandFormat, *, name: str = "x") -> RefQuantized:
    """Quantize `x` (..., K) along its last axis with `fmt` (calibrated on `x` itself).

    Raises TypeError if `x` is not a float array, ValueError naming `name` if it holds NaN or Inf.
    """
    x = np.asarray(x)
    if x.dtype.kind != "f" and x.dtype != NUMPY_OPS.dtypes["bfloat16"]:
        raise TypeError(f"{name} has dtype {x.dtype}; quantize takes a float array")
    numerics.check_finite(x, name)
    q = fmt.quantize(x)
    fmt.check_scale(q.scale, what=name)
    return RefQuantized(qvalue=q.qvalue, scale=q.scale, zero_point=q.zero_point, fmt=fmt, k=x.shape[-1])


def codes(operand: QOperand, fmt: OperandFormat, k: int) -> np.ndarray:
    """The codes of shape (..., K_padded), unpacked (padding included, it is zero)."""
    q = np.asarray(operand.qvalue)
    if q.dtype != NUMPY_OPS.dtypes[fmt.qtype.storage]:
        raise TypeError(f"qvalue has dtype {q.dtype}; {fmt.qtype.name} codes are stored as {fmt.qtype.storage}")
    return fmt.codes(QOperand(q, operand.scale, operand.zero_point), k)


def dequantize(operand: QOperand, fmt: OperandFormat, k: int) -> np.ndarray:
    """`(f32(q) - zero) * scale` in f32, shape (..., K) (padding removed)."""
    codes(operand, fmt, k)  # validates dtype and stored length
    return fmt.dequantize(_numpy(operand), k)


def _numpy(operand: Any) -> QOperand:
    if isinstance(operand, RefQuantized):
        operand = operand.operand()
    if not isinstance(operand, QOperand):
        raise TypeError(f"expected a quantized operand (QOperand or RefQuantized), got {type(operand).__name__}")
    return QOperand(*(None if a is None else np.asarray(a) for a in operand))


def _lhs(lhs: Any, recipe: Recipe) -> tuple[Any, int]:
    """The activations as the recipe takes them (quantized for integer recipes) and the logical K."""
    if isinstance(lhs, (RefQuantized, QOperand)):
        op = _numpy(lhs)
        return op, op.qvalue.shape[-1]
    lhs = np.asarray(lhs)
    if recipe.lhs is not None:
        numerics.check_finite(lhs, "lhs")
    return recipe.accumulation.lhs_operand(recipe, NUMPY_OPS, lhs), lhs.shape[-1]


def accumulators(lhs: Any, rhs: Any, recipe: Recipe) -> np.ndarray:
    """Exact integer accumulators in int64 for an integer recipe.

    Shape (..., M, N), or (..., M, N, G) for grouped accumulations (one partial dot per group of K).
    `lhs` is float (quantized here, as the kernels do on the fly) or already quantized; `rhs` is
    quantized.
    """
    lhs, k = _lhs(lhs, recipe)
    recipe.check_k(k)
    rhs = _numpy(rhs)
    codes(rhs, recipe.rhs, k)
    return recipe.accumulation.accumulators(recipe, NUMPY_OPS, lhs, rhs, k=k, batched=rhs.qvalue.ndim == 3)


def qmatmul(lhs: Any, rhs: Any, recipe: Recipe, *, bias: Any = None, out_dtype: Any = None) -> np.ndarray:
    """`out[..., m, n] = rescale(sum_k lhs[..., m, k] * rhs[..., n, k])` per DESIGN.md section 4.

    lhs: float (..., M, K), or for integer recipes an already-quantized per-row operand.
    rhs: quantized (..., N, K) in canonical stored layout (QOperand or RefQuantized); batch axes
    broadcast. bias: (N,) or None. out_dtype: a float dtype or name; default: lhs's float dtype
    (f32 when lhs is pre-quantized).
    """
    prequantized = isinstance(lhs, (RefQuantized, QOperand))
    act = np.dtype(np.float32) if prequantized else np.asarray(lhs).dtype
    out = np_dtype(out_dtype) if out_dtype is not None else act
    lhs, k = _lhs(lhs, recipe)
    recipe.check_k(k)
    rhs = _numpy(rhs)
    codes(rhs, recipe.rhs, k)
    recipe.check_weight_scale(rhs.scale, k, what="rhs (weights)")
    return recipe.matmul(NUMPY_OPS, lhs, rhs, None if bias is None else np.asarray(bias), k=k,
                         batched=rhs.qvalue.ndim == 3, act_dtype=_dtype_name(act), out_dtype=_dtype_name(out))


def _run_qmatmul(call: Any, lhs: Any, rhs: QOperand, bias: Any) -> np.ndarray:
    return qmatmul(lhs, rhs, call.problem.recipe, bias=bias, out_dtype=call.problem.out_dtype)


def _accumulate_qmatmul(call: Any, lhs: Any, rhs: QOperand) -> np.ndarray:
    """`Implementation.accumulate`: the exact accumulators as int32 (`int_dot` refused overflow)."""
    return accumulators(lhs, rhs, call.problem.recipe).astype(np.int32)


def _run_quantize(call: Any, x: Any) -> QOperand:
    return quantize(x, call.problem.recipe.lhs, name="activations").operand()


def _serves_everything(problem: Any) -> None:
    return None


def register() -> None:
    """Register 'reference' for both ops (`qkernels.backends` calls this)."""
    from qkernels import dispatch

    for op, run in ((dispatch.Op.QMATMUL, _run_qmatmul), (dispatch.Op.QUANTIZE, _run_quantize)):
        dispatch.register(dispatch.Implementation(
            name="reference", framework=dispatch.ANY_FRAMEWORK, op=op, priority=0,
            supports=_serves_everything, run=run, serves=dispatch.Serves.everything(),
            accumulate=_accumulate_qmatmul if op is dispatch.Op.QMATMUL else None,
            description="NumPy reference on the host: exact int64 accumulation, slow; the last resort"))
    from qkernels import grouped

    dispatch.register(dispatch.Implementation(
        name="reference", framework=dispatch.ANY_FRAMEWORK, op=dispatch.Op.RAGGED_QMATMUL, priority=0,
        supports=_serves_everything, run=grouped.reference_run, serves=dispatch.Serves.everything(),
        accumulate=grouped.reference_accumulate, description="NumPy reference of the grouped matmul (qkernels.grouped)"))
