"""The NumPy reference against independent float64 computations on the dequantized operands."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qkernels as qk
from qkernels import numerics, reference, testing
from qkernels.formats import Accumulation
from qkernels.reference import np_dtype

RECIPES = [qk.W8A8, qk.W8A16, *(qk.W4A16(g) for g in (32, 64, 128, 256)), qk.W4A16(64, zero_point=True),
           *(qk.W4A8(g) for g in (32, 128, 256))]
RECIPE_PARAMS = [pytest.param(r, id=r.name) for r in RECIPES]


@st.composite
def problems(draw):
    batch = draw(st.sampled_from([None, None, 2]))
    m, n, k = draw(st.integers(1, 9)), draw(st.integers(1, 40)), draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    return batch, m, n, k, seed


def _operands(batch, m, n, k, seed):
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    x = testing.activations(rng, (*lead, m, k))
    w = testing.weights(rng, (*lead, n, k))
    return x, w, rng.standard_normal(n).astype(np.float32)


def _independent_codes(q: reference.RefQuantized) -> np.ndarray:
    """Codes from the stored bytes by plain integer arithmetic (not reference.codes)."""
    b = q.qvalue.astype(np.int64)
    if not q.fmt.packed:
        return b[..., :q.k]
    u = b & 0xFF
    lo, hi = u & 0xF, u >> 4
    if q.fmt.qtype.signed:
        lo, hi = lo - 16 * (lo >= 8), hi - 16 * (hi >= 8)
    return np.stack([lo, hi], -1).reshape(*b.shape[:-1], -1)[..., :q.k]


@pytest.mark.parametrize("recipe", [r for r in RECIPE_PARAMS if r.values[0].lhs is not None])
@given(p=problems())
def test_integer_accumulators_equal_float64_dot_of_codes(recipe, p) -> None:
    batch, m, n, k, seed = p
    x, w, _ = _operands(batch, m, n, k, seed)
    xq, wq = reference.quantize(x, recipe.lhs), reference.quantize(w, recipe.rhs)
    a, b = _independent_codes(xq).astype(np.float64), _independent_codes(wq).astype(np.float64)
    acc = reference.accumulators(x, wq, recipe)
    assert acc.dtype == np.int64
    if recipe.accumulation is Accumulation.INT32:
        np.testing.assert_array_equal(acc, a @ np.swapaxes(b, -1, -2))
    else:
        g = recipe.group_size
        for j in range(acc.shape[-1]):
            sl = slice(j * g, min((j + 1) * g, k))
            np.testing.assert_array_equal(acc[..., j], a[..., sl] @ np.swapaxes(b[..., sl], -1, -2))


@pytest.mark.parametrize("recipe", RECIPE_PARAMS)
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16", "float16"])
@given(p=problems(), with_bias=st.booleans())
def test_qmatmul_equals_float64_on_dequantized_operands(recipe, out_dtype, p, with_bias) -> None:
    batch, m, n, k, seed = p
    x, w, bias = _operands(batch, m, n, k, seed)
    bias = bias if with_bias else None
    act = np_dtype("bfloat16") if out_dtype == "bfloat16" else np.float32
    x = x.astype(act)
    wq = reference.quantize(w, recipe.rhs)
    y = reference.qmatmul(x, wq, recipe, bias=bias, out_dtype=out_dtype)
    assert y.dtype == np_dtype(out_dtype) and y.shape == (*x.shape[:-1], n)
    if recipe.lhs is None:  # weights dequantized in the activation dtype
        lhs, rhs = x.astype(np.float64), wq.dequantize().astype(act).astype(np.float64)
    else:
        lhs, rhs = reference.quantize(x, recipe.lhs).dequantize().astype(np.float64), wq.dequantize().astype(np.float64)
    expected = np.matmul(lhs, np.swapaxes(rhs, -1, -2)) + (0 if bias is None else bias)
    testing.assert_close(y, expected, lhs, rhs, out_dtype, bias)


def test_w8a8_rescale_order_is_rhs_then_lhs_then_bias() -> None:
    rng = np.random.default_rng(0)
    x, w = testing.activations(rng, (5, 64)), testing.weights(rng, (7, 64))
    bias = rng.standard_normal(7).astype(np.float32)
    recipe = qk.W8A8
    xq, wq = reference.quantize(x, recipe.lhs), reference.quantize(w, recipe.rhs)
    acc = reference.accumulators(x, wq, recipe).astype(np.float32)
    expected = ((acc * wq.scale[None, :]) * xq.scale[:, None]) + bias
    np.testing.assert_array_equal(reference.qmatmul(x, wq, recipe, bias=bias), expected)
    # the other associations round differently somewhere on realistic data: the order matters
    for other in ((acc * xq.scale[:, None]) * wq.scale[None, :], acc * (xq.scale[:, None] * wq.scale[None, :])):
        assert not np.array_equal(other + bias, expected)


def test_prequantized_lhs_matches_dynamic() -> None:
    rng = np.random.default_rng(1)
    x, w = testing.activations(rng, (4, 96)), testing.weights(rng, (6, 96))
    for recipe in (qk.W8A8, qk.W4A8(32)):
        wq = reference.quantize(w, recipe.rhs)
        xq = reference.quantize(x, recipe.lhs)
        np.testing.assert_array_equal(reference.qmatmul(xq, wq, recipe), reference.qmatmul(x, wq, recipe))


def test_overflow_prone_k_is_refused() -> None:
    k = qk.W8A8.max_k + 1
    x = np.ones((1, k), np.float32)
    wq = reference.quantize(np.ones((1, k), np.float32), qk.W8A8.rhs)
    with pytest.raises(ValueError, match=f"K={k} exceeds"):
        reference.qmatmul(x, wq, qk.W8A8)


def test_accumulator_at_the_bound_is_exact() -> None:
    k = qk.W8A8.max_k
    x = np.full((1, k), 3.0, np.float32)
    wq = reference.quantize(np.full((1, k), -2.0, np.float32), qk.W8A8.rhs)
    acc = reference.accumulators(x, wq, qk.W8A8)
    assert acc[0, 0] == -k * 127 * 127 and abs(acc[0, 0]) < numerics.INT32_LIMIT
