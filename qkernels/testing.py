"""Test and benchmark helpers shared by every backend: tolerances, signal-to-noise, realistic data.

Tolerances are derived in this one place (DESIGN.md section 4, STYLE.md 8). A backend's float output
may differ from the reference by
  1. the final rounding to the output dtype: one ulp, `eps(out) * |ref|` (the two results may round
     to neighbouring values);
  2. the f32 accumulation order: at most `K * eps(f32) * (|lhs| @ |rhs|^T)` (Higham's gamma_K bound,
     doubled to cover the reference's own rounding);
  3. the order of the rescale multiplies, for backends that do not honour DESIGN.md's order (FMA
     contraction, reassociation): a few f32 ulps, `4 * eps(f32) * |ref|`.
For fp8 x fp8 (`Accumulation.FLOAT_CODES`) the products of two codes are exact in f32, so only 1.
and 2. apply (3. where the backend contracts the epilogue), with the dequantized codes as the operands
(`float_operands`); the accumulation term dominates: for K=4096 it is ~1e-3 of |lhs| @ |rhs|^T, while
one fp8 code step is 1/16 of a value, so a wrong code or scale is far outside it.
Integer accumulators have no tolerance: they are compared with ==. Outputs of integer recipes are
compared with == where the backend honours DESIGN.md section 4's rescale order, and within
`fma_bound` where it contracts the epilogue's multiply-adds into FMAs (XLA, `jax_bindings.arrays`).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from qkernels import reference
from qkernels.formats import QOperand, Recipe
from qkernels.reference import np_dtype

__all__ = ["tolerances", "float_operands",
           "assert_close", "epilogue_terms", "fma_bound", "assert_within", "snr_db", "subnormal_rows",
           "activations", "weights"]


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


def float_operands(x: Any, rhs: Any, recipe: Recipe, act_dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The float operands a backend multiplies for `x @ rhs^T`, as `tolerances` takes them.

    Weight-only recipes: the activations as they are and the weight dequantized to the activation
    dtype. Recipes that quantize activations (integer and fp8): both sides dequantized from their codes
    (what the exact integer / fp8-product dot multiplies, up to the per-row scales).
    `x`: float activations (..., M, K), or already quantized ones; `rhs`: the quantized weight
    (`reference.RefQuantized`).
    """
    if isinstance(x, (reference.RefQuantized, QOperand)):  # activations quantized by the caller
        op = x.operand() if isinstance(x, reference.RefQuantized) else x
        return reference.dequantize(op, recipe.lhs, np.asarray(op.qvalue).shape[-1]), rhs.dequantize()
    x = np.asarray(x)
    if recipe.lhs is None:
        return x, rhs.dequantize(x.dtype if act_dtype is None else act_dtype)
    return reference.quantize(x, recipe.lhs).dequantize(), rhs.dequantize()


def assert_close(actual: Any, expected: Any, lhs: Any, rhs: Any, out_dtype: Any, bias: Any = None,
                 what: str = "output") -> None:
    """Assert |actual - expected| <= tolerances(lhs, rhs, out_dtype) everywhere, with a useful message."""
    assert_within(actual, expected, tolerances(lhs, rhs, out_dtype, bias), what)


def epilogue_terms(lhs: Any, rhs: Any, recipe: Recipe, bias: Any = None) -> np.ndarray:
    """|every addend| the f32 epilogue of an integer recipe sums for each output, in order: (..., M, N, T).

    `lhs`: float activations (..., M, K) (quantized here, as the kernels do) or a quantized operand;
    `rhs`: the quantized weight. INT32: `f32(acc) * s_rhs[n] * s_lhs[m]` then the bias (T = 2);
    INT32_PER_GROUP: `f32(acc_g) * s_rhs[n, g] * s_lhs[m]` for each group g, then the bias (T = G + 1).
    Computed in float64 from the reference's exact accumulators (magnitudes only, for `fma_bound`).
    """
    acc = reference.accumulators(lhs, rhs, recipe).astype(np.float64)
    lhs_q = lhs if isinstance(lhs, (reference.RefQuantized, QOperand)) else reference.quantize(lhs, recipe.lhs)
    s_lhs = np.asarray(lhs_q.scale, np.float64)
    s_rhs = np.asarray(rhs.scale, np.float64)
    if recipe.accumulation.grouped:
        products = acc * s_rhs[..., None, :, :] * s_lhs[..., :, None, None]  # (..., M, N, G)
    else:
        products = (acc * s_lhs[..., :, None] * s_rhs[..., None, :])[..., None]  # (..., M, N, 1)
    b = np.zeros(products.shape[:-1] + (1,)) if bias is None else np.broadcast_to(
        np.abs(np.asarray(bias, np.float64))[:, None], products.shape[:-1] + (1,))
    return np.concatenate([np.abs(products), b], axis=-1)


def fma_bound(terms: Any, out_dtype: Any) -> np.ndarray:
    """Elementwise bound on |backend - reference| for a backend that contracts the f32 epilogue's
    multiply-adds into FMAs (one rounding where the reference rounds twice), from `epilogue_terms`.

    The epilogue is a running sum `s = s + p_j` over the T addends `p_j` (scaled accumulators, then
    the bias). The reference rounds `p_j` and then the sum; an FMA rounds only the sum. Per step the
    two running sums can drift apart by one rounding of `|p_j|` plus one rounding of each running sum
    (each at most `S = sum_j |p_j|`), and a drift is carried unchanged by later steps; the final
    multiply by `s_lhs` (W4A8) rounds once in each. With u = eps(f32) / 2 that is at most
    `u * S + 2 * u * T * S + 2 * u * S`, so `(T + 2) * eps(f32) * S`; then one ulp of the output dtype
    when it is narrower than f32 (the two f32 values may round to neighbours), and its smallest normal.
    It is of the order of T f32 roundings of the result: a dropped group, a wrong scale or an
    accumulator off by one code is far outside it.
    """
    terms = np.asarray(terms, np.float64)
    total = terms.sum(-1)
    eps32 = float(np.finfo(np.float32).eps)
    info = ml_dtypes.finfo(np_dtype(out_dtype))
    narrower = float(info.eps) if np_dtype(out_dtype) != np.float32 else 0.0
    return (terms.shape[-1] + 2) * eps32 * total + narrower * total + float(info.smallest_normal)


def assert_within(actual: Any, expected: Any, bound: Any, what: str = "output") -> None:
    """Assert |actual - expected| <= bound elementwise (NaN fails), naming the first offender."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape} != expected {expected.shape}")
    bound = np.broadcast_to(bound, expected.shape)
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


def subnormal_rows(k: int = 64) -> np.ndarray:
    """(4, k) f32 rows at the edge of the subnormal rules (`numerics.symmetric_scale`): all subnormal
    (codes 0, scale 1); a normal amax whose amax / 127 is subnormal (scale 1); a scale of exactly
    FLT_MIN with subnormal and tiny normal neighbours; an ordinary row holding one subnormal."""
    x = np.zeros((4, k), np.float32)
    x[0, ::2], x[0, 1::2] = 2e-39, -5e-41
    x[1, 0], x[1, 1] = 1e-37, 3e-39
    x[2, 0], x[2, 1:4] = 127 * 2.0**-126, [1e-38, 2e-38, -2.0**-120]
    x[3, :3] = [1.0, 1e-40, -0.5]
    return x
