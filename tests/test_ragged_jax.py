"""`qk.ragged_dot`, the quantized `jax.lax.ragged_dot`: against a per-expert loop of `qk.dot_general`, on
'xla' and the host-callback reference, under jit, differentiated, and with expert-sharded weights
(8 host CPU devices from conftest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import qkernels as qk
from qkernels import dispatch, grouped, reference, testing
from qkernels.formats import QOperand

RECIPES = [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A8(32), id="w4a8-g32"),
           pytest.param(qk.W4A16(32), id="w4a16-g32"), pytest.param(qk.W4A16(32, zero_point=True), id="w4a16-g32-zp"),
           pytest.param(qk.W8A16, id="w8a16")]
DIMS = (((1,), (0,)), ((), ()))


@st.composite
def ragged(draw):
    e = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.sampled_from([0, 0, 1, 3, 16, 17]), min_size=e, max_size=e))
    return tuple(sizes), max(1, sum(sizes) + draw(st.sampled_from([0, 3])))


def _data(seed, sizes, m, k=64, n=24):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(testing.activations(rng, (m, k))), jnp.asarray(testing.weights(rng, (len(sizes), k, n))),
            jnp.asarray(sizes, jnp.int32))


def _loop(x, w, sizes, recipe):
    """A per-expert loop of the dense op, each expert's (K, N) weight quantized alone."""
    out = jnp.zeros((x.shape[0], w.shape[2]), jnp.float32)
    for seg in grouped.segments(sizes):
        w_q = qk.quantize(w[seg.expert], recipe, contracting_axes=(0,))
        out = out.at[seg.start:seg.stop].set(qk.dot_general(x[seg.start:seg.stop], w_q, DIMS))
    return out


def _compare(y, expected, x, w_q, recipe, sizes, *, fma: bool):
    """Integer recipes: exact, or within `fma_bound` where 'xla' contracts the epilogue (W4A8's per-group
    sum); weight-only: the tolerance of each row against its own expert."""
    y, expected = np.asarray(y), np.asarray(expected)
    if recipe.accumulation.integer and not (fma and recipe.accumulation.grouped):
        np.testing.assert_array_equal(y, expected)
        return
    w_deq = np.asarray(w_q.dequantize(jnp.float32))  # [E, K, N]
    xs = np.asarray(x) if recipe.lhs is None else reference.quantize(np.asarray(x), recipe.lhs).dequantize()
    bound = np.zeros(y.shape)
    for seg in grouped.segments(sizes):
        rows = slice(seg.start, seg.stop)
        if recipe.accumulation.integer:
            rhs = QOperand(np.asarray(w_q.qvalue[seg.expert]), np.asarray(w_q.scale[seg.expert]))
            bound[rows] = testing.fma_bound(testing.epilogue_terms(np.asarray(x)[rows], rhs, recipe), np.float32)
        else:
            bound[rows] = testing.tolerances(xs[rows], w_deq[seg.expert].T, np.float32)
    testing.assert_within(y, expected, bound)


@pytest.mark.parametrize("recipe", RECIPES)
@given(case=ragged(), seed=st.integers(0, 99))
def test_equals_a_per_expert_loop_of_dot_general(recipe, case, seed) -> None:
    sizes, m = case
    x, w, gs = _data(seed, sizes, m)
    w_q = qk.quantize_experts(w, recipe)
    expected = _loop(x, w, sizes, recipe)
    y = jax.jit(qk.ragged_dot)(x, w_q, gs)
    _compare(y, expected, x, w_q, recipe, sizes, fma=True)
    assert not np.asarray(y[sum(sizes):]).any()
    with qk.use_backend("reference"):
        _compare(qk.ragged_dot(x, w_q, gs), expected, x, w_q, recipe, sizes, fma=True)


@given(case=ragged(), seed=st.integers(0, 99))
def test_w8a8_accumulators_are_exact(case, seed) -> None:
    sizes, m = case
    x, w, gs = _data(seed, sizes, m)
    w_q = qk.quantize_experts(w, qk.W8A8)
    rhs = QOperand(np.asarray(w_q.qvalue), np.asarray(w_q.scale))
    exact = np.zeros((m, 24), np.int64)
    for seg in grouped.segments(sizes):
        exact[seg.start:seg.stop] = reference.accumulators(np.asarray(x)[seg.start:seg.stop],
                                                           grouped.expert(rhs, seg.expert), qk.W8A8)
    problem = dispatch.Problem(op=dispatch.Op.RAGGED_QMATMUL, recipe=qk.W8A8, m=m, n=24, k=64, groups=len(sizes),
                               act_dtype="float32", out_dtype="float32", framework="jax", platform="cpu")
    acc = jax.jit(dispatch.bind(problem, "xla").accumulate)(x, w_q.operand(), gs)
    assert acc.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc), exact)


def test_float_rhs_is_quantized_per_expert_and_bf16_follows_lax() -> None:
    x, w, gs = _data(0, (5, 0, 6), 12)
    y = qk.ragged_dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), gs, recipe=qk.W4A16(32))
    ref = jax.lax.ragged_dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), gs)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    y32 = qk.ragged_dot(x, w, gs)  # W8A8 by default: the same as pre-quantized experts
    np.testing.assert_array_equal(np.asarray(y32), np.asarray(qk.ragged_dot(x, qk.quantize_experts(w), gs)))
    assert testing.snr_db(y32, jax.lax.ragged_dot(x, w, gs)) > 30


def test_gradients_are_straight_through() -> None:
    x, w, gs = _data(1, (3, 0, 9), 14)
    recipe = qk.W8A8
    ct = jnp.asarray(np.random.default_rng(2).standard_normal((14, 24)), jnp.float32)
    dx, dw = jax.jit(jax.grad(lambda x, w: (qk.ragged_dot(x, w, gs, recipe=recipe) * ct).sum(), argnums=(0, 1)))(x, w)
    # lax.ragged_dot's gradients at the dequantized operands
    x_deq = jnp.asarray(reference.quantize(np.asarray(x), recipe.lhs).dequantize())
    w_deq = qk.quantize_experts(w, recipe).dequantize(jnp.float32)
    ex, _ = jax.grad(lambda a, b: (jax.lax.ragged_dot(a, b, gs) * ct).sum(), argnums=(0, 1))(x, w_deq)
    _, ew = jax.grad(lambda a, b: (jax.lax.ragged_dot(a, b, gs) * ct).sum(), argnums=(0, 1))(x_deq, w)
    np.testing.assert_allclose(dx, ex, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, ew, rtol=1e-5, atol=1e-6)
    d_q = jax.grad(lambda x, w_q: qk.ragged_dot(x, w_q, gs).sum(), argnums=1, allow_int=True)(x, qk.quantize_experts(w))
    assert not np.asarray(d_q.scale).any()


@pytest.mark.parametrize("axis_type", [pytest.param(AxisType.Auto, id="auto"),
                                       pytest.param(AxisType.Explicit, id="explicit")])
def test_expert_sharded_weights_under_jit(axis_type) -> None:
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (conftest sets XLA_FLAGS)")
    mesh = jax.make_mesh((8,), ("e",), axis_types=(axis_type,))
    sizes = (3, 0, 5, 1, 0, 7, 2, 4)
    x, w, gs = _data(3, sizes, 32)
    for recipe in (qk.W8A8, qk.W4A16(32)):
        w_q = qk.quantize_experts(w, recipe)
        expected = qk.ragged_dot(x, w_q, gs)
        sharded = jax.tree_util.tree_map(
            lambda a: jax.device_put(a, NamedSharding(mesh, P("e", *([None] * (a.ndim - 1))))), w_q)
        assert sharded.qvalue.sharding.spec[0] == "e"
        y = jax.jit(qk.ragged_dot)(x, sharded, gs)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
        tokens = jax.device_put(x, NamedSharding(mesh, P("e", None)))
        np.testing.assert_array_equal(np.asarray(jax.jit(qk.ragged_dot)(tokens, sharded, gs)), np.asarray(expected))


def test_explain_and_errors() -> None:
    from jax_bindings import ragged

    x, w, gs = _data(4, (1, 1), 2)
    text = str(ragged.explain(x, w, gs))
    assert text.startswith("ragged_qmatmul w8a8 E=2 M=2 N=24 K=64") and "-> xla" in text
    routed = qk.explain(x, qk.quantize_experts(w, qk.W4A16(32)), gs, verbose=True)  # as ragged_dot's arguments
    assert routed.problem.op is dispatch.Op.RAGGED_QMATMUL and routed.problem.recipe == qk.W4A16(32)
    assert str(qk.explain(x, w, group_sizes=gs)) == text
    assert qk.explain(x, w[0], DIMS).problem.op is dispatch.Op.QMATMUL
    with pytest.raises(TypeError, match=r"group_sizes must be an integer \(2,\)"):
        qk.ragged_dot(x, w, jnp.asarray([1, 1, 0], jnp.int32))
    with pytest.raises(TypeError, match="lhs contracts K=63"):
        qk.ragged_dot(x[:, :63], w, gs)
    with pytest.raises(ValueError, match="quantize_experts"):
        qk.ragged_dot(x, qk.quantize(w, qk.W8A8, contracting_axes=(1,)), gs)
    with pytest.raises(ValueError, match="no quantized backward"):
        qk.ragged_dot(x, w, gs, recipe=qk.W8A8(quantized_backward=True))
    with pytest.raises(NotImplementedError, match="group_offset"):
        qk.ragged_dot(x, w, gs, group_offset=jnp.asarray([0]))
    with qk.use_backend("reference"), pytest.raises(Exception, match="group_sizes sum to 5 rows but lhs has M=2"):
        jax.block_until_ready(qk.ragged_dot(x, w, jnp.asarray([2, 3], jnp.int32)))
