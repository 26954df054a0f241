"""qkernels.dot_general (JAX): any dimension numbers, quantize under jit, autodiff, vmap, platforms, errors.

Every JAX backend's outputs and accumulators against the reference are in test_conformance.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.experimental import checkify

import jax_bindings
import qkernels as qk
from jax_bindings import implementations, quant
from qkernels import dispatch, reference
from qkernels.testing import activations, assert_close, snr_db, weights

RECIPES = [
    pytest.param(qk.W8A8, id="w8a8"),
    pytest.param(qk.W8A16, id="w8a16"),
    pytest.param(qk.W4A16(32), id="w4a16-g32"),
    pytest.param(qk.W4A16(32, zero_point=True), id="w4a16-g32-zp"),
    pytest.param(qk.W4A8(32), id="w4a8-g32"),
]
RECIPE_VALUES = [p.values[0] for p in RECIPES]


def _canonical(x: np.ndarray, batch: tuple[int, ...], contract: tuple[int, ...]) -> np.ndarray:
    """(batch, free (increasing), contracting (given order)) flattened to (B?, rows, K)."""
    free = [a for a in range(x.ndim) if a not in batch and a not in contract]
    y = np.transpose(x, (*batch, *free, *contract))
    lead = (math.prod(x.shape[a] for a in batch),) if batch else ()
    return y.reshape(*lead, -1, math.prod(x.shape[a] for a in contract))


def _fake_quant_rows(x: np.ndarray, contract: tuple[int, ...], recipe: qk.Recipe) -> np.ndarray:
    """Activations as an integer recipe sees them: quantized per row (all non-contracting axes)."""
    if recipe.lhs is None:
        return x
    rest = [a for a in range(x.ndim) if a not in contract]
    perm = (*rest, *contract)
    y = np.transpose(x, perm)
    rows = y.reshape(-1, math.prod(x.shape[a] for a in contract))
    deq = reference.quantize(rows, recipe.lhs).dequantize().reshape(y.shape)
    return np.transpose(deq, np.argsort(perm))


@st.composite
def dot_problems(draw: st.DrawFn) -> tuple:
    """Random valid dimension numbers: 0-1 batch, 1-2 contracting, 0-2 free axes per side, any order."""
    nb, nc = draw(st.integers(0, 1)), draw(st.integers(1, 2))
    nlf, nrf = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    size = st.integers(1, 6)
    b_sizes = [draw(size) for _ in range(nb)]
    c_sizes = [draw(st.integers(1, 40)) for _ in range(nc)]
    lf_sizes = [draw(size) for _ in range(nlf)]
    rf_sizes = [draw(size) for _ in range(nrf)]

    def layout(free: list[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        roles = [("b", i) for i in range(nb)] + [("c", i) for i in range(nc)] + [("f", i) for i in range(len(free))]
        order = draw(st.permutations(roles))
        shape = tuple({"b": b_sizes, "c": c_sizes, "f": free}[r][i] for r, i in order)
        return shape, tuple(order.index(("c", i)) for i in range(nc)), tuple(order.index(("b", i)) for i in range(nb))

    lshape, lc, lb = layout(lf_sizes)
    rshape, rc, rb = layout(rf_sizes)
    return lshape, rshape, ((lc, rc), (lb, rb))


@settings(max_examples=6)  # each example compiles a new program
@given(problem=dot_problems(), recipe=st.sampled_from(RECIPE_VALUES), prequantized=st.booleans(),
       seed=st.integers(0, 2**16))
def test_any_dimension_numbers_equal_lax_on_dequantized_operands(problem, recipe, prequantized, seed):
    lshape, rshape, dims = problem
    (lc, rc), (lb, rb) = dims
    rng = np.random.default_rng(seed)
    x, w = activations(rng, lshape), rng.standard_normal(rshape).astype(np.float32)
    w_q = qk.quantize(jnp.asarray(w), recipe, contracting_axes=rc, batch_axes=rb)
    rhs = w_q if prequantized else jnp.asarray(w)
    out = jax.jit(qk.make_dot_general(recipe), static_argnums=2)(jnp.asarray(x), rhs, dims)
    want_shape = lax.dot_general(jnp.zeros(lshape), jnp.zeros(rshape), dims).shape
    assert out.shape == want_shape and out.dtype == jnp.float32

    x_deq = _fake_quant_rows(x, lc, recipe)
    w_deq = np.asarray(w_q.dequantize())
    expected = lax.dot_general(jnp.asarray(x_deq), jnp.asarray(w_deq), dims, precision=lax.Precision.HIGHEST)
    a_c, w_c = _canonical(x_deq, lb, lc), _canonical(w_deq, rb, rc)
    out_shape = (*a_c.shape[:-1], w_c.shape[-2])
    assert_close(np.asarray(out).reshape(out_shape), np.asarray(expected).reshape(out_shape), a_c, w_c,
                 np.float32, what=f"{recipe.name} {dims}")


@pytest.mark.parametrize("recipe", RECIPES)
def test_dynamic_and_prequantized_weights_agree_exactly(recipe):
    rng = np.random.default_rng(1)
    x, w = jnp.asarray(activations(rng, (2, 9, 70))), jnp.asarray(weights(rng, (70, 33)))
    dims = (((2,), (0,)), ((), ()))
    dynamic = qk.make_dot_general(recipe)(x, w, dims)
    pre = qk.dot_general(x, qk.quantize(w, recipe, contracting_axes=(0,)), dims)
    np.testing.assert_array_equal(np.asarray(dynamic), np.asarray(pre))


@pytest.mark.parametrize("recipe", RECIPES)
def test_jax_quantize_matches_reference_codes(recipe):
    x = activations(np.random.default_rng(4), (96, 300))  # enough values that a reciprocal multiply shows
    got = jax.jit(quant.quantize_operand, static_argnums=1)(jnp.asarray(x), recipe.rhs)
    want = reference.quantize(x, recipe.rhs)
    np.testing.assert_array_equal(np.asarray(got.qvalue), want.qvalue)
    np.testing.assert_array_equal(np.asarray(got.scale), want.scale)
    if recipe.rhs.zero_point:
        np.testing.assert_array_equal(np.asarray(got.zero_point), want.zero_point)


def test_lhs_qarray_is_swapped_and_transposed_back():
    rng = np.random.default_rng(5)
    w, x = weights(rng, (11, 3, 48)), activations(rng, (48, 6))
    dims = (((2,), (0,)), ((), ()))
    w_q = qk.quantize(jnp.asarray(w), qk.W8A16, contracting_axes=(2,))
    out = qk.dot_general(w_q, jnp.asarray(x), dims)
    expected = lax.dot_general(w_q.dequantize(), jnp.asarray(x), dims, precision=lax.Precision.HIGHEST)
    assert out.shape == (11, 3, 6)
    w_c = np.asarray(w_q.dequantize()).reshape(33, 48)
    assert_close(np.asarray(out).reshape(33, 6).T, np.asarray(expected).reshape(33, 6).T, x.T, w_c, np.float32)


@pytest.mark.parametrize("recipe", RECIPES)
def test_straight_through_gradient_is_float_gradient_on_dequantized_operands(recipe):
    rng = np.random.default_rng(6)
    x, w = jnp.asarray(activations(rng, (4, 64))), jnp.asarray(weights(rng, (64, 8)))
    dims = (((1,), (0,)), ((), ()))
    dg = qk.make_dot_general(recipe)
    gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(dg(x, w, dims) ** 2), argnums=(0, 1)))(x, w)
    y = dg(x, w, dims)
    w_deq = qk.quantize(w, recipe, contracting_axes=(0,)).dequantize()
    x_deq = jnp.asarray(_fake_quant_rows(np.asarray(x), (1,), recipe))
    _, vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST), x_deq, w_deq)
    ex, ew = vjp(2 * y)
    assert snr_db(gx, ex) > 100 and snr_db(gw, ew) > 100


def test_quantized_backward_is_close_to_straight_through():
    rng = np.random.default_rng(7)
    x, w = jnp.asarray(activations(rng, (2, 16, 64))), jnp.asarray(weights(rng, (64, 32)))
    dims = (((2,), (0,)), ((), ()))
    grads = {}
    for recipe in (qk.W8A8, qk.W8A8(quantized_backward=True)):
        dg = qk.make_dot_general(recipe)
        grads[recipe.name] = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(dg(x, w, dims))), argnums=(0, 1)))(x, w)
    for ste, qb in zip(grads["w8a8"], grads["w8a8-qbwd"]):
        assert 25 < snr_db(qb, ste) < np.inf  # int8 error is visible but small: it really is quantized


def test_vmap_equals_per_example_calls():
    rng = np.random.default_rng(8)
    recipe = qk.W4A8(32)
    x, w = jnp.asarray(activations(rng, (3, 5, 40))), jnp.asarray(weights(rng, (40, 12)))
    dg = qk.make_dot_general(recipe)
    dims = (((1,), (0,)), ((), ()))
    batched = jax.jit(jax.vmap(lambda xi: dg(xi, w, dims)))(x)
    w_deq = np.asarray(qk.quantize(w, recipe, contracting_axes=(0,)).dequantize()).T
    for i in range(3):  # XLA may fuse the rescale differently per program: compare per contract
        x_deq = _fake_quant_rows(np.asarray(x[i]), (1,), recipe)
        assert_close(batched[i], dg(x[i], w, dims), x_deq, w_deq, np.float32)


def test_grad_through_prequantized_weight_gives_zero_cotangent():
    rng = np.random.default_rng(9)
    x = jnp.asarray(activations(rng, (3, 40)))
    w_q = qk.quantize(jnp.asarray(weights(rng, (40, 5))), qk.W4A16(32), contracting_axes=(0,))
    gx, gq = jax.grad(lambda x, q: qk.dot_general(x, q, (((1,), (0,)), ((), ()))).sum(), argnums=(0, 1),
                      allow_int=True)(x, w_q)
    np.testing.assert_allclose(np.asarray(gx), np.broadcast_to(np.asarray(w_q.dequantize()).sum(1), (3, 40)), rtol=1e-5)
    assert not np.any(np.asarray(gq.scale))


# ---- errors -------------------------------------------------------------------------------------------------

def test_mismatched_contracting_sizes_raise():
    with pytest.raises(TypeError, match=r"contracting dimensions to have the same shape.*\(7,\).*\(8,\)"):
        qk.dot_general(jnp.ones((3, 7)), jnp.ones((8, 4)), (((1,), (0,)), ((), ())))


def test_integer_lhs_without_qarray_raises():
    with pytest.raises(TypeError, match="lhs has dtype int8.*QArray"):
        qk.dot_general(jnp.ones((3, 8), jnp.int8), jnp.ones((8, 4)), (((1,), (0,)), ((), ())))


def test_qarray_with_other_contracting_axes_raises():
    w_q = qk.quantize(jnp.ones((8, 4)), contracting_axes=(0,))
    with pytest.raises(ValueError, match=r"contracting_axes=\(0,\).*quantize it with contracting_axes=\(1,\)"):
        qk.dot_general(jnp.ones((3, 4)), w_q, (((1,), (1,)), ((), ())))


def test_nan_in_concrete_weight_raises_naming_it():
    w = np.ones((16, 4), np.float32)
    w[3, 1] = np.nan
    with pytest.raises(ValueError, match="up_proj contains 1 NaN/Inf"):
        qk.quantize(jnp.asarray(w), qk.W8A8, contracting_axes=(0,), name="up_proj")


@pytest.mark.parametrize("bad", [pytest.param(np.nan, id="nan"), pytest.param(np.inf, id="inf")])
def test_checkify_path_reports_nonfinite_activations_under_jit(bad):
    dg = qk.make_dot_general(qk.W8A8, check_finite=True)
    x = np.ones((4, 16), np.float32)
    w = jnp.ones((16, 3))
    f = checkify.checkify(jax.jit(lambda x: dg(x, w, (((1,), (0,)), ((), ())))))
    err, _ = f(jnp.asarray(x))
    assert err.get() is None
    x[2, 5] = bad
    err, _ = f(jnp.asarray(x))
    assert "lhs (activations) contains NaN/Inf" in err.get()


def test_k_beyond_int32_bound_is_refused():
    k = qk.W8A8.max_k + 1
    with pytest.raises(ValueError, match=f"K={k} exceeds"):
        qk.dot_general(jnp.ones((1, k)), jnp.ones((k, 1)), (((1,), (0,)), ((), ())))


def test_xla_refuses_integer_recipe_on_tpu_v4():
    problem = dispatch.Problem(recipe=qk.W8A8, m=8, n=8, k=8, act_dtype="float32", out_dtype="float32",
                               framework="jax", platform="tpu:v4")
    with pytest.raises(qk.BackendUnavailable, match="TPU v4 has no int8 MXU"):
        dispatch.select(problem, "xla")


def test_explain_shows_candidates_and_choice():
    w_q = qk.quantize(jnp.ones((64, 16)), qk.W4A16(32), contracting_axes=(0,))
    ex = qk.explain(jnp.ones((2, 5, 64), jnp.bfloat16), w_q, (((2,), (0,)), ((), ())))
    assert ex.problem.m == 10 and ex.problem.n == 16 and ex.problem.k == 64 and ex.problem.act_dtype == "bfloat16"
    from jax_bindings import native

    assert ex.chosen.name == ("xla-native" if native.unavailable() is None else "xla")  # CPU: the native kernels
    assert {"xla", "xla-native", "reference.callback", "reference"} <= {v.implementation.name for v in ex.verdicts}


@pytest.mark.parametrize("kind,platform", [
    ("TPU v5 lite", "tpu:v5e"), ("TPU v6 lite", "tpu:v6e"), ("TPU v5", "tpu:v5p"), ("TPU v5p", "tpu:v5p"),
    ("TPU v4", "tpu:v4")])
def test_tpu_device_kinds_map_to_platforms(kind, platform):
    class Device:
        device_kind = kind

    Device.platform = "tpu"
    assert implementations.platform_of(Device()) == platform


def test_gpu_and_cpu_platforms():
    class Gpu:
        platform, device_kind, compute_capability = "gpu", "NVIDIA H100", "9.0"

    assert implementations.platform_of(Gpu()) == "cuda:sm_90"
    assert jax_bindings.current_platform() == "cpu"
