"""Test and benchmark helpers shared by every backend: tolerances, signal-to-noise, realistic data.

Tolerances are derived in this one place (DESIGN.md section 4, STYLE.md 8). A backend's float output
may differ from the reference by
  1. the final rounding to the output dtype: one ulp, `eps(out) * |ref|` (the two results may round
     to neighbouring values);
  2. the f32 accumulation order: at most `K * eps(f32) * (|lhs| @ |rhs|^T)` (Higham's gamma_K bound,
     doubled to cover the reference's own rounding);
  3. the order of the rescale multiplies, for backends that do not honour DESIGN.md's order (FMA
     contraction, reassociation): a few f32 ulps, `4 * eps(f32) * |ref|`.
Integer accumulators have no tolerance: they are compared with ==.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from qkernels.reference import np_dtype

__all__ = ["tolerances", "assert_close", "snr_db", "activations", "weights"]


def tolerances(lhs: Any, rhs: Any, out_dtype: Any, bias: Any = None) -> np.ndarray:
    """Elementwise bound on |backend - reference| for `lhs (..., M, K) @ rhs (..., N, K)^T + bias`.

    `lhs` and `rhs` are the float operands the backend multiplies (dequantized weights in the
    activation dtype; dequantized activations for integer recipes), as NumPy-readable arrays.
    The rounding terms (1. and 3.) scale with |lhs| @ |rhs|^T + |bias|, which bounds |result|.
    """
    a = np.abs(np.asarray(lhs, np.float64))
    b = np.abs(np.asarray(rhs, np.float64))
    k = a.shape[-1]
    mag = np.matmul(a, np.swapaxes(b, -1, -2))
    info = ml_dtypes.finfo(np_dtype(out_dtype))
    eps_out = float(info.eps)
    eps32 = float(np.finfo(np.float32).eps)
    tiny = float(info.smallest_normal)
    size = mag + (0 if bias is None else np.abs(np.asarray(bias, np.float64)))
    return (eps_out + 4 * eps32) * size + 2 * k * eps32 * mag + tiny


def assert_close(actual: Any, expected: Any, lhs: Any, rhs: Any, out_dtype: Any, bias: Any = None,
                 what: str = "output") -> None:
    """Assert |actual - expected| <= tolerances(lhs, rhs, out_dtype) everywhere, with a useful message."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape} != expected {expected.shape}")
    bound = np.broadcast_to(tolerances(lhs, rhs, out_dtype, bias), expected.shape)
    err = np.abs(actual - expected)
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements outside tolerance; first at {idx}: "
            f"got {actual[idx]!r}, expected {expected[idx]!r}, |diff| {err[idx]:.3g} > bound {bound[idx]:.3g}")


def snr_db(approx: Any, exact: Any) -> float:
    """Signal-to-noise ratio in dB of `approx` against `exact` (inf when identical)."""
    exact = np.asarray(exact, np.float64)
    noise = np.sum((np.asarray(approx, np.float64) - exact) ** 2)
    signal = np.sum(exact**2)
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def activations(rng: np.random.Generator, shape: tuple[int, ...], *, outliers: int = 4,
                outlier_scale: float = 20.0) -> np.ndarray:
    """Realistic activations: standard normal with a few large outlier channels (along K), f32."""
    x = rng.standard_normal(shape, dtype=np.float32)
    k = shape[-1]
    if outliers and k > 1:
        cols = rng.choice(k, size=min(outliers, k), replace=False)
        x[..., cols] *= np.float32(outlier_scale)
    return x


def weights(rng: np.random.Generator, shape: tuple[int, ...], std: float = 0.02) -> np.ndarray:
    """Realistic weights (out_features, in_features): normal with small std, f32."""
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
