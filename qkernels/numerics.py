"""Quantized types and the numerics contract as small pure functions, written once for every framework.

Every backend (Triton, Pallas, XLA, torch CPU, the reference) follows the rules written here. The
functions take an `ArrayOps` (the dozen array primitives the rules need): `NUMPY_OPS` below is the
reference's; `jax_bindings.arrays.JAX_OPS` and `torch_bindings.arrays.TORCH_OPS` are the framework
ports. The rules themselves (calibrate, scale, round, clip, pack, dequantize) exist once, here and
in `qkernels.formats`; the Triton / Pallas kernels reimplement them in their own language with the
same order of operations (DESIGN.md section 4).

Canonical layout: the quantized axis (K, the contraction) is always the last axis. Scales of a
per-row format have the shape of the array without its last axis; scales of a per-group format
have one more trailing axis of length ``K_padded / group_size``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import ml_dtypes
import numpy as np

__all__ = [
    "Kind", "QType", "INT8", "INT4", "UINT4", "FP8_E4M3", "FP8_E5M2", "int_type", "Granularity", "GROUP_SIZES",
    "ArrayOps", "NumpyOps", "NUMPY_OPS", "round_half_even", "check_finite", "symmetric_scale",
    "quantize_symmetric", "asymmetric_params", "quantize_asymmetric", "padded_k", "pad_k", "pack_int4",
    "unpack_int4", "max_exact_k", "INT32_LIMIT", "FLT_MIN", "FLT_MAX", "flush_subnormals",
]

INT32_LIMIT = 2**31
"""Integer accumulators must stay strictly below this in absolute value."""

GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes (along K) supported by the grouped formats and every kernel."""


class Kind(enum.Enum):
    """What a quantized code is: an integer (exact integer MMA) or a narrow float (fp8)."""

    INT = "integer"
    FLOAT = "float"


@dataclass(frozen=True, kw_only=True, slots=True)
class QType:
    """A quantized element type: what one code is and how it is stored.

    | kind  | codes                                  | storage                         | qmax            |
    |-------|----------------------------------------|---------------------------------|-----------------|
    | INT, signed   | [-qmax, qmax] (symmetric)      | int8; 4-bit packed two per byte | 2**(bits-1) - 1 |
    | INT, unsigned | [0, qmax] (with a zero point)  | int8 (the code's low bits)      | 2**bits - 1     |
    | FLOAT | any finite value of `storage`          | `storage` (e.g. float8_e4m3fn)  | largest finite  |

    Signed integer types never produce their most negative code (-128, -8), so products are bounded
    by qmax**2. Integer widths other than 4 and 8 (int2..int7) are emulated: one code per int8 byte.
    """

    name: str
    bits: int
    signed: bool = True
    kind: Kind = Kind.INT
    storage: str = "int8"
    max_finite: float | None = None  # FLOAT kinds: the largest finite value of `storage`

    def __post_init__(self) -> None:
        if self.kind is Kind.INT:
            if not 2 <= self.bits <= 8:
                raise ValueError(f"{self.name}: bits={self.bits} is not supported; integer types take 2 to 8 bits")
            if self.storage != "int8":
                raise ValueError(f"{self.name}: integer codes are stored as int8, not {self.storage}")
        else:
            if not self.signed or self.max_finite is None or self.max_finite <= 0:
                raise ValueError(f"{self.name}: a float type is signed and needs max_finite > 0 "
                                 f"(the largest finite value of {self.storage})")

    @property
    def qmax(self) -> float:
        """Largest code produced: 127 (int8), 7 (int4), 15 (uint4), 448.0 (float8_e4m3fn)."""
        if self.kind is Kind.FLOAT:
            return self.max_finite
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def qmin(self) -> float:
        """Smallest code produced: -qmax for signed types (symmetric), 0 for unsigned."""
        return -self.qmax if self.signed else 0

    @property
    def packed(self) -> bool:
        """Whether two codes share a byte along K (DESIGN.md section 3): 4-bit integers."""
        return self.kind is Kind.INT and self.bits == 4

    @property
    def integer(self) -> bool:
        return self.kind is Kind.INT


def int_type(bits: int, *, signed: bool = True) -> QType:
    """The integer type of `bits` bits (emulated in int8 unless 4 or 8): `int_type(6)` is int6."""
    return QType(name=f"{'' if signed else 'u'}int{bits}", bits=bits, signed=signed)


INT8 = int_type(8)
INT4 = int_type(4)
UINT4 = int_type(4, signed=False)
FP8_E4M3 = QType(name="float8_e4m3fn", bits=8, kind=Kind.FLOAT, storage="float8_e4m3fn", max_finite=448.0)
FP8_E5M2 = QType(name="float8_e5m2", bits=8, kind=Kind.FLOAT, storage="float8_e5m2", max_finite=57344.0)


class Granularity(enum.Enum):
    """Which elements share one scale (and zero point)."""

    TENSOR = "per-tensor"
    ROW = "per-row"  # per token for activations, per output channel for weights
    GROUP = "per-group"  # contiguous groups of `group_size` along K within a row


class ArrayOps(Protocol):
    """The array primitives the numerics are written in; one implementation per framework.

    Arithmetic (`*`, `+`, `-`, indexing, `.shape`, `.reshape`) uses the arrays' own operators, which
    are IEEE f32 in every framework. What differs between frameworks, and is pinned down here:
    `div` is a true IEEE division (never a reciprocal multiply), `round` ties to even, `absmax` is
    exact, `int_dot` accumulates exactly in int32, `float_linear` accumulates in f32 and rounds once.
    `grouped_scaled_sum(a, w, s, g)` is `y = 0; for each group j of K, in order:
    y = y + f32(int_dot(a_j, w_j)) * s[..., None, :, j]` (each product rounded once, then added).
    """

    name: str
    host_checks: bool  # values can be inspected on the host (NumPy, eager torch); not under jax tracing

    def asarray(self, x: Any) -> Any: ...
    def cast(self, x: Any, dtype: str) -> Any: ...
    def div(self, a: Any, b: Any) -> Any: ...
    def round(self, x: Any) -> Any: ...
    def clip(self, x: Any, lo: float, hi: float) -> Any: ...
    def where(self, cond: Any, a: Any, b: Any) -> Any: ...
    def absmax(self, x: Any) -> Any: ...  # max |x| over the last axis, kept
    def min(self, x: Any) -> Any: ...  # over the last axis, kept
    def max(self, x: Any) -> Any: ...
    def all_finite(self, x: Any) -> bool: ...  # host checks (never traced)
    def count_nonfinite(self, x: Any) -> int: ...
    def pad_last(self, x: Any, k: int) -> Any: ...  # zero-pad the last axis to length k
    def pack_nibbles(self, q: Any) -> Any: ...  # int8 codes (..., 2j) -> int8 bytes (..., j)
    def unpack_nibbles(self, b: Any, signed: bool) -> Any: ...
    def int_dot(self, a: Any, w: Any, batched: bool) -> Any: ...  # (..., M, K) x (B?, N, K) -> int32 (..., M, N)
    def grouped_int_dot(self, a: Any, w: Any, group_size: int, batched: bool) -> Any: ...  # -> int32 (..., M, N, G)
    def grouped_scaled_sum(self, a: Any, w: Any, scale: Any, group_size: int, batched: bool) -> Any: ...
    def float_linear(self, x: Any, w: Any, bias: Any, out_dtype: str, batched: bool) -> Any: ...
    def quantile(self, x: Any, q: float) -> Any: ...  # f32 (N, K) -> (K,) along axis 0, NumPy's linear rule
    def broadcast_to(self, x: Any, shape: tuple[int, ...]) -> Any: ...


def round_half_even(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, ties to even.

    | input      | output |
    |------------|--------|
    | 0.5, 1.5   | 0, 2   |
    | -0.5, -2.5 | -0, -2 |
    | 2.4999     | 2      |
    """
    return np.rint(x)


_NP_DTYPES = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "float64": np.dtype(np.float64),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "int8": np.dtype(np.int8), "int32": np.dtype(np.int32),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn), "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


class NumpyOps:
    """`ArrayOps` in NumPy: the reference. Integer dots accumulate in int64 (an overflow shows)."""

    name: ClassVar[str] = "numpy"
    host_checks: ClassVar[bool] = True
    dtypes: ClassVar[dict[str, np.dtype]] = _NP_DTYPES

    def asarray(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def cast(self, x: Any, dtype: str) -> np.ndarray:
        return np.asarray(x).astype(_NP_DTYPES[dtype])

    def div(self, a: Any, b: Any) -> np.ndarray:
        return np.asarray(a, np.float32) / np.float32(b) if np.isscalar(b) else np.asarray(a, np.float32) / b

    def round(self, x: Any) -> np.ndarray:
        return round_half_even(x)

    def clip(self, x: Any, lo: float, hi: float) -> np.ndarray:
        return np.clip(x, np.float32(lo), np.float32(hi))

    def where(self, cond: Any, a: Any, b: Any) -> np.ndarray:
        return np.where(cond, a, b).astype(np.result_type(a, b))  # a Python scalar stays weak (NEP 50)

    def absmax(self, x: Any) -> np.ndarray:
        return np.abs(x).max(-1, keepdims=True, initial=0).astype(np.float32)

    def min(self, x: Any) -> np.ndarray:
        return np.min(x, -1, keepdims=True, initial=np.inf).astype(np.float32)

    def max(self, x: Any) -> np.ndarray:
        return np.max(x, -1, keepdims=True, initial=-np.inf).astype(np.float32)

    def all_finite(self, x: Any) -> bool:
        return bool(np.isfinite(np.asarray(x, np.float32)).all())

    def count_nonfinite(self, x: Any) -> int:
        x = np.asarray(x, np.float32)
        return int(x.size - np.count_nonzero(np.isfinite(x)))

    def pad_last(self, x: Any, k: int) -> np.ndarray:
        return pad_k(np.asarray(x), k)

    def pack_nibbles(self, q: Any) -> np.ndarray:
        u = np.asarray(q).astype(np.uint8)
        return ((u[..., 0::2] & 0xF) | ((u[..., 1::2] & 0xF) << 4)).astype(np.uint8).view(np.int8)

    def unpack_nibbles(self, b: Any, signed: bool) -> np.ndarray:
        u = np.asarray(b).view(np.uint8)
        nib = np.stack([u & 0xF, u >> 4], axis=-1).reshape(*u.shape[:-1], 2 * u.shape[-1]).astype(np.int8)
        return np.where(nib >= 8, nib - 16, nib).astype(np.int8) if signed else nib

    def int_dot(self, a: Any, w: Any, batched: bool) -> np.ndarray:
        acc = np.matmul(np.asarray(a, np.int64), np.swapaxes(np.asarray(w, np.int64), -1, -2))
        if np.abs(acc).max(initial=0) >= INT32_LIMIT:
            raise OverflowError(f"integer accumulator reached {np.abs(acc).max()} >= 2**31")
        return acc

    def grouped_int_dot(self, a: Any, w: Any, group_size: int, batched: bool) -> np.ndarray:
        groups = a.shape[-1] // group_size  # explicit: -1 is ambiguous for an empty M or N
        ag = np.asarray(a, np.int64).reshape(*a.shape[:-1], groups, group_size)
        wg = np.asarray(w, np.int64).reshape(*w.shape[:-1], groups, group_size)
        return np.einsum("...mgk,...ngk->...mng", ag, wg)

    def grouped_scaled_sum(self, a: Any, w: Any, scale: Any, group_size: int, batched: bool) -> np.ndarray:
        acc = self.grouped_int_dot(a, w, group_size, batched)
        y = np.zeros(acc.shape[:-1], np.float32)
        for g in range(acc.shape[-1]):
            y = y + acc[..., g].astype(np.float32) * scale[..., None, :, g]
        return y

    def float_linear(self, x: Any, w: Any, bias: Any, out_dtype: str, batched: bool) -> np.ndarray:
        # f64 products of f32-representable operands are exact; the sum is then rounded once to f32
        y = np.matmul(np.asarray(x, np.float64), np.swapaxes(np.asarray(w, np.float64), -1, -2)).astype(np.float32)
        if bias is not None:
            y = y + np.asarray(bias).astype(np.float32)
        return y.astype(_NP_DTYPES[out_dtype])

    def quantile(self, x: Any, q: float) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.shape[0] == 0:
            return np.zeros(x.shape[1:], np.float32)
        return np.quantile(x, q, axis=0).astype(np.float32)

    def broadcast_to(self, x: Any, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(np.asarray(x), shape)


NUMPY_OPS = NumpyOps()


def check_finite(x: Any, name: str, ops: ArrayOps = NUMPY_OPS) -> None:
    """Raise ValueError if `x` holds NaN or Inf: quantizing those gives garbage silently."""
    bad = ops.count_nonfinite(x)
    if bad:
        raise ValueError(
            f"{name} contains {bad} NaN/Inf value(s) and cannot be quantized; "
            f"clean or clip the tensor (e.g. nan_to_num) before quantizing it")


def symmetric_scale(amax: Any, qtype: QType, ops: ArrayOps = NUMPY_OPS) -> Any:
    """Scale of a symmetric format from the absolute maximum of each block.

    | amax                                   | scale                                        |
    |----------------------------------------|----------------------------------------------|
    | a / qmax >= 2**-126 (FLT_MIN)          | f32(a) / qmax, IEEE f32 division             |
    | 0, or so small that a / qmax < FLT_MIN | 1 (not 0 or subnormal; every code is then 0) |

    The rule tests the computed scale, not amax, so a tiny amax whose quotient underflows cannot
    divide by zero, and it treats a subnormal scale like zero: hardware that flushes subnormals
    (XLA:CPU, TPUs) computes 0 where IEEE hardware computes a subnormal, and both then take 1.
    Kernels: `scale = amax / qmax; scale = scale < FLT_MIN ? 1 : scale`. Inputs are flushed first
    (`flush_subnormals`), so every backend calibrates and rounds the same values.
    """
    scale = ops.div(ops.cast(amax, "float32"), qtype.qmax)
    return ops.where(scale < FLT_MIN, 1.0, scale)


FLT_MIN = float(np.finfo(np.float32).tiny)
"""2**-126, the smallest normal f32: scales below it are replaced by 1, inputs below it in magnitude by 0."""

FLT_MAX = float(np.finfo(np.float32).max)
"""The largest finite f32 (3.4e38): the rescale's intermediate products must stay below it (`Recipe.check_weight_scale`)."""


def flush_subnormals(x: Any, ops: ArrayOps = NUMPY_OPS) -> Any:
    """f32 `x` with subnormal values replaced by 0 (sign kept as +0), as flush-to-zero hardware reads them.

    | x                      | result |
    |------------------------|--------|
    | 0 < abs(x) < 2**-126   | 0      |
    | anything else (NaN too)| x      |
    """
    return ops.where(abs(x) < FLT_MIN, 0.0, x)


def to_codes(y: Any, qtype: QType, ops: ArrayOps = NUMPY_OPS) -> Any:
    """Scaled values `y = x / scale (+ zero)` -> stored codes, saturating at the type's range.

    | kind  | rule                                                         |
    |-------|--------------------------------------------------------------|
    | INT   | `clip(round_half_even(y), qmin, qmax)` as int8               |
    | FLOAT | `clip(y, -qmax, qmax)` cast (round to nearest even) to storage |
    """
    if qtype.kind is Kind.FLOAT:
        return ops.cast(ops.clip(y, qtype.qmin, qtype.qmax), qtype.storage)
    return ops.cast(ops.clip(ops.round(y), qtype.qmin, qtype.qmax), "int8")


def quantize_symmetric(x: Any, scale: Any, qtype: QType, ops: ArrayOps = NUMPY_OPS) -> Any:
    """Codes of `x / scale` saturated at +-qmax (`to_codes`): integer types `clip(round_half_even(.))`,
    float types (fp8) `clip(.)` then one round-to-nearest-even cast to the storage type.

    `x / scale` is an IEEE f32 division (not a multiply by a reciprocal), so every backend that
    divides correctly rounded gets the same codes. Values beyond the range saturate at +-qmax (448
    for float8_e4m3fn: the cast itself would give NaN, e4m3fn has no infinity).

    | x / scale (float8_e4m3fn)  | code                          |
    |----------------------------|-------------------------------|
    | 1.0625 (tie), 17 (tie)     | 1.0, 16 (ties to even)        |
    | 500, -1e30                 | 448, -448 (saturated)         |
    | 3 * 2**-10 (subnormal tie) | 2**-8 (subnormal codes kept)  |
    | |y| <= 2**-10              | 0 (sign kept: -0 for y < 0)   |
    """
    return to_codes(ops.div(ops.cast(x, "float32"), scale), qtype, ops)


def asymmetric_params(xmin: Any, xmax: Any, qtype: QType, ops: ArrayOps = NUMPY_OPS) -> tuple[Any, Any]:
    """Scale and integer zero point of an unsigned format from each block's min and max.

    The range is first widened to include 0, so that 0 (padding, ReLU outputs) is exactly
    representable, then `scale = (max - min) / (2**bits - 1)` and
    `zero = clip(round_half_even(-min / scale), 0, 2**bits - 1)`.

    | block                 | scale | zero |
    |-----------------------|-------|------|
    | all zeros (or span/15 < FLT_MIN) | 1 | 0 |
    | all >= 0 (min -> 0)   | max/15| 0    |
    | all <= 0 (max -> 0)   | -min/15 | 15 |
    """
    lo = ops.clip(ops.cast(xmin, "float32"), -math.inf, 0)
    hi = ops.clip(ops.cast(xmax, "float32"), 0, math.inf)
    with np.errstate(over="ignore"):  # an overflowing range gives an inf scale: callers refuse it (check_scale)
        span = hi - lo
    scale = ops.div(span, qtype.qmax)
    scale = ops.where(scale < FLT_MIN, 1.0, scale)  # as in symmetric_scale: 0 or subnormal -> 1
    zero = to_codes(ops.div(-lo, scale), qtype, ops)
    return scale, zero


def quantize_asymmetric(x: Any, scale: Any, zero: Any, qtype: QType, ops: ArrayOps = NUMPY_OPS) -> Any:
    """Codes `clip(round_half_even(x / scale) + zero, 0, 2**bits - 1)` as int8."""
    y = ops.round(ops.div(ops.cast(x, "float32"), scale)) + ops.cast(zero, "float32")
    return to_codes(y, qtype, ops)


def padded_k(k: int, *, group_size: int | None = None, packed: bool = False) -> int:
    """K after padding: up to a multiple of the group size, and to even length when packed."""
    multiple = group_size or 1
    if packed:
        multiple = math.lcm(multiple, 2)
    return -(-k // multiple) * multiple


def pad_k(x: np.ndarray, k_padded: int) -> np.ndarray:
    """Zero-pad the last axis of `x` up to `k_padded`."""
    extra = k_padded - x.shape[-1]
    if extra < 0:
        raise ValueError(f"cannot pad K={x.shape[-1]} down to {k_padded}")
    if extra == 0:
        return x
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def pack_int4(q: Any, ops: ArrayOps = NUMPY_OPS) -> Any:
    """Pack 4-bit codes two per byte along the last axis (DESIGN.md section 3).

    Byte j holds k = 2j in the low nibble and k = 2j + 1 in the high nibble; an odd K is padded
    with a zero code. Works for int4 (two's complement nibbles) and uint4 (0..15) alike: the
    nibble is the low 4 bits of the code. Result is int8 of shape (..., ceil(K/2)).
    """
    if ops is NUMPY_OPS and np.asarray(q).dtype != np.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {np.asarray(q).dtype}")
    return ops.pack_nibbles(ops.pad_last(q, padded_k(q.shape[-1], packed=True)))


def unpack_int4(packed: Any, k: int, qtype: QType, ops: ArrayOps = NUMPY_OPS) -> Any:
    """Inverse of `pack_int4`: int8 codes of shape (..., k), sign-extended for int4."""
    if 2 * packed.shape[-1] < k:
        raise ValueError(f"packed array holds {2 * packed.shape[-1]} values, fewer than K={k}")
    return ops.unpack_nibbles(packed, qtype.signed)[..., :k]


def max_exact_k(lhs: QType, rhs: QType) -> int:
    """Largest K for which an integer dot of codes cannot reach 2**31 (int32 is then exact).

    `K * qmax_lhs * qmax_rhs < 2**31`: int8 x int8 gives 133,144; int8 x int4 gives 2,415,928.
    """
    return (INT32_LIMIT - 1) // int(lhs.qmax * rhs.qmax)
