"""Quantized types and the numerics contract as small pure NumPy functions.

Every backend (Triton, Pallas, XLA, torch CPU, the reference) follows the rules written here; the
reference (`qkernels.reference`) is built from these functions, and the kernels reimplement them
in their own language with the same order of operations (DESIGN.md section 4).

Canonical layout: the quantized axis (K, the contraction) is always the last axis. Scales of a
per-row format have the shape of the array without its last axis; scales of a per-group format
have one more trailing axis of length ``K_padded / group_size``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "QType", "INT8", "INT4", "UINT4", "Granularity", "GROUP_SIZES",
    "round_half_even", "check_finite", "symmetric_scale", "quantize_symmetric",
    "asymmetric_params", "quantize_asymmetric", "padded_k", "pad_k", "pack_int4",
    "unpack_int4", "max_exact_k", "INT32_LIMIT",
]

INT32_LIMIT = 2**31
"""Integer accumulators must stay strictly below this in absolute value."""

GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes (along K) supported by the grouped formats and every kernel."""


@dataclass(frozen=True, kw_only=True, slots=True)
class QType:
    """An integer quantized type.

    Signed types are used symmetrically: codes lie in [-qmax, qmax], so the most negative code
    (-128 for int8, -8 for int4) is never produced and products are bounded by qmax**2.
    Unsigned types are used with a zero point: codes lie in [0, 2**bits - 1].
    """

    name: str
    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits} is not supported; use 4 or 8")

    @property
    def qmax(self) -> int:
        """Largest code produced: 127 (int8), 7 (int4), 15 (uint4)."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def qmin(self) -> int:
        """Smallest code produced: -qmax for signed types (symmetric), 0 for unsigned."""
        return -self.qmax if self.signed else 0

    @property
    def packed(self) -> bool:
        """Whether two values share a byte along K (DESIGN.md section 3)."""
        return self.bits < 8


INT8 = QType(name="int8", bits=8, signed=True)
INT4 = QType(name="int4", bits=4, signed=True)
UINT4 = QType(name="uint4", bits=4, signed=False)


class Granularity(enum.Enum):
    """Which elements share one scale (and zero point)."""

    TENSOR = "per-tensor"
    ROW = "per-row"  # per token for activations, per output channel for weights
    GROUP = "per-group"  # contiguous groups of `group_size` along K within a row


def round_half_even(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, ties to even.

    | input      | output |
    |------------|--------|
    | 0.5, 1.5   | 0, 2   |
    | -0.5, -2.5 | -0, -2 |
    | 2.4999     | 2      |
    """
    return np.rint(x)


def check_finite(x: np.ndarray, name: str) -> None:
    """Raise ValueError if `x` holds NaN or Inf: quantizing those gives garbage silently."""
    x = np.asarray(x)
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(
            f"{name} contains {bad} NaN/Inf value(s) and cannot be quantized; "
            f"clean or clip the tensor (e.g. nan_to_num) before quantizing it")


def symmetric_scale(amax: np.ndarray, qtype: QType) -> np.ndarray:
    """Scale of a symmetric format from the absolute maximum of each block.

    | amax                         | scale                            |
    |------------------------------|----------------------------------|
    | a > 0                        | f32(a) / qmax, IEEE f32 division |
    | 0, or so small a/qmax == 0   | 1 (not 0: avoids 0/0; every code is then 0) |

    The rule tests the computed scale, not amax, so a subnormal amax whose quotient underflows to 0
    cannot divide by zero (kernels: `scale = amax / qmax; scale = scale == 0 ? 1 : scale`).
    """
    amax = np.asarray(amax, dtype=np.float32)
    scale = amax / np.float32(qtype.qmax)
    return np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)


def quantize_symmetric(x: np.ndarray, scale: np.ndarray, qtype: QType) -> np.ndarray:
    """Codes `clip(round_half_even(x / scale), -qmax, qmax)` as int8.

    `x / scale` is an IEEE f32 division (not a multiply by a reciprocal), so every backend that
    divides correctly rounded gets the same codes. Values beyond the range saturate at +-qmax.
    """
    q = round_half_even(np.asarray(x, np.float32) / np.asarray(scale, np.float32))
    return np.clip(q, qtype.qmin, qtype.qmax).astype(np.int8)


def asymmetric_params(xmin: np.ndarray, xmax: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point of an unsigned format from each block's min and max.

    The range is first widened to include 0, so that 0 (padding, ReLU outputs) is exactly
    representable, then `scale = (max - min) / (2**bits - 1)` and
    `zero = clip(round_half_even(-min / scale), 0, 2**bits - 1)`.

    | block                 | scale | zero |
    |-----------------------|-------|------|
    | all zeros (or span/15 underflows to 0) | 1 | 0 |
    | all >= 0 (min -> 0)   | max/15| 0    |
    | all <= 0 (max -> 0)   | -min/15 | 15 |
    """
    lo = np.minimum(np.asarray(xmin, np.float32), np.float32(0))
    hi = np.maximum(np.asarray(xmax, np.float32), np.float32(0))
    span = hi - lo
    scale = span / np.float32(qtype.qmax)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    zero = np.clip(round_half_even(-lo / scale), qtype.qmin, qtype.qmax).astype(np.int8)
    return scale, zero


def quantize_asymmetric(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, qtype: QType) -> np.ndarray:
    """Codes `clip(round_half_even(x / scale) + zero, 0, 2**bits - 1)` as int8."""
    q = round_half_even(np.asarray(x, np.float32) / np.asarray(scale, np.float32)) + zero
    return np.clip(q, qtype.qmin, qtype.qmax).astype(np.int8)


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


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes two per byte along the last axis (DESIGN.md section 3).

    Byte j holds k = 2j in the low nibble and k = 2j + 1 in the high nibble; an odd K is padded
    with a zero code. Works for int4 (two's complement nibbles) and uint4 (0..15) alike: the
    nibble is the low 4 bits of the code. Result is int8 of shape (..., ceil(K/2)).
    """
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {q.dtype}")
    q = pad_k(q, padded_k(q.shape[-1], packed=True)).astype(np.uint8)
    lo, hi = q[..., 0::2] & 0xF, q[..., 1::2] & 0xF
    return (lo | (hi << 4)).astype(np.uint8).view(np.int8)


def unpack_int4(packed: np.ndarray, k: int, qtype: QType) -> np.ndarray:
    """Inverse of `pack_int4`: int8 codes of shape (..., k), sign-extended for int4."""
    b = np.asarray(packed).view(np.uint8)
    if 2 * b.shape[-1] < k:
        raise ValueError(f"packed array holds {2 * b.shape[-1]} values, fewer than K={k}")
    nib = np.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])[..., :k]
    nib = nib.astype(np.int8)
    if qtype.signed:
        nib = np.where(nib >= 8, nib - 16, nib).astype(np.int8)
    return nib


def max_exact_k(lhs: QType, rhs: QType) -> int:
    """Largest K for which an integer dot of codes cannot reach 2**31 (int32 is then exact).

    `K * qmax_lhs * qmax_rhs < 2**31`: int8 x int8 gives 133,144; int8 x int4 gives 2,415,928.
    """
    return (INT32_LIMIT - 1) // (lhs.qmax * rhs.qmax)
