"""Flax injection (Dense, DenseGeneral, einsum, nnx.Einsum, linen Einsum) and QArray as a pytree / state."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization

import qkernels as qk
from jax_bindings import flax as qflax
from qkernels import reference
from qkernels.testing import activations, tolerances, weights


class MLP(nn.Module):
    recipe: qk.Recipe

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dg = qk.make_dot_general(self.recipe)
        x = nn.relu(nn.Dense(32, dot_general=dg)(x))
        x = nn.DenseGeneral((2, 8), dot_general=dg)(x)
        return nn.Dense(1, dot_general=dg)(x.reshape(*x.shape[:-2], 16))


def test_flax_mlp_trains_and_loss_falls():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 16), dtype=np.float32))
    y = jnp.sin(x[:, :1] * 2) + x[:, 1:2]
    model = MLP(qk.W8A8)
    params = model.init(jax.random.key(0), x)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]


def test_einsum_with_quantized_dot_general_under_jit():
    rng = np.random.default_rng(1)
    x, w = jnp.asarray(activations(rng, (2, 3, 64))), jnp.asarray(weights(rng, (4, 64, 8)))
    dg = qk.make_dot_general(qk.W4A16(32))
    assert hash(dg) == hash(qk.make_dot_general(qk.W4A16(32))) and dg == qk.make_dot_general(qk.W4A16(32))
    f = jax.jit(lambda x, w: jnp.einsum("bsk,hkn->bshn", x, w, _dot_general=dg))
    out = f(x, w)
    exact = jnp.einsum("bsk,hkn->bshn", x, w, precision=jax.lax.Precision.HIGHEST)
    assert out.shape == (2, 3, 4, 8)
    assert qk.testing.snr_db(out, exact) > 15  # int4 g32: ~20 dB of quantization noise


def test_qarray_is_a_pytree_that_jits_and_serializes():
    w = jnp.asarray(weights(np.random.default_rng(2), (70, 24)))
    w_q = qk.quantize(w, qk.W4A16(32, zero_point=True), contracting_axes=(0,))
    assert w_q.qvalue.shape == (24, 48) and w_q.scale.shape == (24, 3) and w_q.zero_point.shape == (24, 3)
    leaves, tree = jax.tree_util.tree_flatten(w_q)
    assert len(leaves) == 3 and jax.tree_util.tree_unflatten(tree, leaves) == w_q
    doubled = jax.jit(lambda q: q.dequantize() * 2)(w_q)
    np.testing.assert_array_equal(np.asarray(doubled), 2 * np.asarray(w_q.dequantize()))
    params = {"dense": {"kernel": w_q}}
    blob = serialization.to_bytes(params)
    empty = jax.tree_util.tree_map(jnp.zeros_like, params)
    restored = serialization.from_bytes(empty, blob)["dense"]["kernel"]
    for a, b in zip(jax.tree_util.tree_leaves(restored), leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.recipe == w_q.recipe and restored.shape == (70, 24)


# --- einsum: qk.make_einsum (flax.nnx.Einsum's einsum_op) and jax_bindings.flax.Einsum (linen) ---------
# Each case: subscripts, activation and kernel shapes, and the canonical view of the call (activations
# (M, K), kernel (N, K), output from (M, N)) to compare against with qkernels.testing's tolerances.
EINSUMS = [
    pytest.param("bk,nk->nb", (8, 64), (16, 64), lambda x: x, lambda w: w, lambda y, x, w: y.T,
                 id="kernel-first-in-jnp-einsum"),
    pytest.param("btk,hkn->bhtn", (2, 4, 64), (3, 64, 8), lambda x: x.reshape(8, 64),
                 lambda w: w.transpose(0, 2, 1).reshape(24, 64),
                 lambda y, x, w: y.reshape(2, 4, 3, 8).transpose(0, 2, 1, 3), id="transposed-output"),
    pytest.param("nta,hab->nthb", (4, 2, 64), (8, 64, 16), lambda x: x.reshape(8, 64),
                 lambda w: w.transpose(0, 2, 1).reshape(128, 64), lambda y, x, w: y.reshape(4, 2, 8, 16),
                 id="nnx-docstring"),
]
EINSUM_RECIPES = [pytest.param(qk.W4A16(32), id="w4a16-g32"), pytest.param(qk.W8A8, id="w8a8")]


def _expected(recipe, x2d, w2d, bias=None):
    """The float result on the operands as the recipe quantizes them (canonical (M, N)) and its bound."""
    x2d, w2d = np.asarray(x2d, np.float32), np.asarray(w2d, np.float32)
    x_deq = x2d if recipe.lhs is None else reference.quantize(x2d, recipe.lhs).dequantize()
    w_deq = reference.quantize(w2d, recipe.rhs).dequantize()
    y = np.asarray(x_deq, np.float64) @ np.asarray(w_deq, np.float64).T
    return y, tolerances(x_deq, w_deq, np.float32)


@pytest.mark.parametrize("recipe", EINSUM_RECIPES)
@pytest.mark.parametrize("subscripts,x_shape,w_shape,canon_x,canon_w,uncanon", EINSUMS)
def test_make_einsum_quantizes_the_second_operand(subscripts, x_shape, w_shape, canon_x, canon_w, uncanon, recipe):
    rng = np.random.default_rng(5)
    x, w = activations(rng, x_shape), weights(rng, w_shape)
    op = qk.make_einsum(recipe)
    assert op == qk.make_einsum(recipe) and hash(op) == hash(qk.make_einsum(recipe))
    out = jax.jit(lambda x, w: op(subscripts, x, w))(jnp.asarray(x), jnp.asarray(w))
    y, bound = _expected(recipe, canon_x(x), canon_w(w))
    expected, bound = uncanon(y, x, w), uncanon(bound, x, w)
    assert out.shape == expected.shape
    err = np.abs(np.asarray(out, np.float64) - expected)
    assert (err <= bound).all(), f"max excess {np.max(err - bound):.3g}"


def test_make_einsum_refuses_what_one_dot_general_cannot_do():
    op = qk.make_einsum(qk.W8A8)
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    with pytest.raises(ValueError, match="no output"):
        op("bk,kn", x, w)
    with pytest.raises(TypeError, match="two operands"):
        op("bk,kn,n->b", x, w, jnp.ones(3))
    with pytest.raises(ValueError, match="diagonal"):
        op("kk,kn->n", jnp.ones((8, 8)), w)


def test_nnx_einsum_with_make_einsum_inits_runs_under_jit_and_matches_float():
    recipe = qk.W4A16(32)
    kw = dict(einsum_str="nta,hab->nthb", kernel_shape=(8, 64, 16), bias_shape=(8, 16))
    layer = nnx.Einsum(**kw, einsum_op=qk.make_einsum(recipe), rngs=nnx.Rngs(0))
    float_layer = nnx.Einsum(**kw, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.asarray(np.random.default_rng(6).standard_normal((8, 16), dtype=np.float32))
    float_layer.bias[...] = layer.bias[...]
    x = jnp.asarray(activations(np.random.default_rng(7), (4, 2, 64)))
    out = nnx.jit(lambda m, x: m(x))(layer, x)
    float_out = nnx.jit(lambda m, x: m(x))(float_layer, x)
    w = np.asarray(layer.kernel[...])
    y, bound = _expected(recipe, np.asarray(x).reshape(8, 64), w.transpose(0, 2, 1).reshape(128, 64))
    expected = y.reshape(4, 2, 8, 16) + np.asarray(layer.bias[...])
    assert (np.abs(np.asarray(out, np.float64) - expected) <= bound.reshape(4, 2, 8, 16) + 1e-6).all()
    assert qk.testing.snr_db(out, float_out) > 15  # int4 g32: ~20 dB of quantization noise


def test_linen_einsum_takes_a_dot_general():
    recipe = qk.W4A16(32)
    x = jnp.asarray(activations(np.random.default_rng(8), (4, 2, 64)))
    module = qflax.Einsum((8, 64, 16), "nta,hab->nthb", dot_general=qk.make_dot_general(recipe),
                          bias_init=nn.initializers.normal(1.0))
    params = jax.jit(module.init)(jax.random.key(0), x)
    reference_module = nn.Einsum((8, 64, 16), "nta,hab->nthb")
    assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(
        jnp.shape, reference_module.init(jax.random.key(0), x))
    out = jax.jit(module.apply)(params, x)
    w, b = np.asarray(params["params"]["kernel"]), np.asarray(params["params"]["bias"])
    y, bound = _expected(recipe, np.asarray(x).reshape(8, 64), w.transpose(0, 2, 1).reshape(128, 64))
    expected = y.reshape(4, 2, 8, 16) + b
    assert (np.abs(np.asarray(out, np.float64) - expected) <= bound.reshape(4, 2, 8, 16) + 1e-6).all()
    float_out = jax.jit(reference_module.apply)(params, x)
    assert qk.testing.snr_db(out, float_out) > 15
    unquantized = jax.jit(qflax.Einsum((8, 64, 16), "nta,hab->nthb").apply)(params, x)  # lax.dot_general
    np.testing.assert_allclose(np.asarray(unquantized), np.asarray(float_out), rtol=1e-5, atol=1e-5)


def test_restore_of_another_shape_or_recipe_is_refused_at_restore():
    """Packed shapes coincide (K=100 and K=128 both store 64 bytes per row at int4 g32; W4A16 and W4A8
    store the same leaves): the identity saved with the leaves tells them apart, at restore time."""
    rng = np.random.default_rng(3)
    saved = qk.quantize(jnp.asarray(weights(rng, (100, 8))), qk.W4A16(32), contracting_axes=(0,))
    blob = serialization.to_bytes({"kernel": saved})
    for target in (qk.quantize(jnp.asarray(weights(rng, (128, 8))), qk.W4A16(32), contracting_axes=(0,)),
                   qk.quantize(jnp.asarray(weights(rng, (100, 8))), qk.W4A8(32), contracting_axes=(0,)),
                   qk.quantize(jnp.asarray(weights(rng, (8, 100))), qk.W4A16(32), contracting_axes=(1,))):
        assert target.qvalue.shape == saved.qvalue.shape
        with pytest.raises(ValueError, match=r"checkpoint holds a QArray 'w4a16-g32' of shape \[100, 8\]"):
            serialization.from_bytes({"kernel": target}, blob)
    restored = serialization.from_bytes({"kernel": saved}, blob)["kernel"]
    np.testing.assert_array_equal(np.asarray(restored.qvalue), np.asarray(saved.qvalue))


# --- which operand is the weight (jnp.einsum may pass the kernel first) ----------------------------------------
ORDER_RECIPES = [pytest.param(qk.W4A16(32), id="w4a16-g32"), pytest.param(qk.W4A8(32), id="w4a8-g32")]


@pytest.mark.parametrize("recipe", ORDER_RECIPES)
def test_jnp_einsum_passing_the_kernel_first_still_quantizes_the_kernel(recipe):
    rng = np.random.default_rng(9)
    x, w = jnp.asarray(activations(rng, (8, 64))), jnp.asarray(weights(rng, (16, 64)))
    firsts = []
    jnp.einsum("bk,nk->nb", x, w, _dot_general=lambda a, b, *args, **kw: firsts.append(a.shape) or jax.lax.dot_general(
        a, b, *args, **kw))
    assert firsts == [(16, 64)], "jnp.einsum no longer swaps here: pick subscripts where it does"
    dg = qk.make_dot_general(recipe)
    op = qk.make_einsum(recipe)  # the weight second, by contract
    for subscripts in ("bk,nk->nb", "bk,nk->bn"):  # swapped and in order
        out = jax.jit(lambda x, w: jnp.einsum(subscripts, x, w, _dot_general=dg))(x, w)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(lambda x, w: op(subscripts, x, w))(x, w)))
    wrong = qk.dot_general(w, x, (((1,), (1,)), ((), ())), recipe=recipe)  # x quantized as if it were the weight
    assert not np.allclose(np.asarray(wrong), np.asarray(op("bk,nk->nb", x, w)), rtol=1e-3, atol=1e-3)
    # A single-operand step first (an explicit path) reorders jnp.einsum's operands: refused, not guessed.
    with pytest.raises(TypeError, match="does not tell which operand is the weight.*make_einsum"):
        jnp.einsum("bkj,nk->bn", jnp.ones((8, 64, 3)), w, optimize=[(0,), (0, 1)], _dot_general=dg)


@pytest.mark.parametrize("recipe", ORDER_RECIPES)
def test_make_einsum_takes_the_qarray_in_either_position(recipe):
    rng = np.random.default_rng(10)
    x, w = jnp.asarray(activations(rng, (8, 64))), jnp.asarray(weights(rng, (16, 64)))
    w_q = qk.quantize(w, recipe, contracting_axes=(1,))
    op = qk.make_einsum(recipe)
    expected = qk.dot_general(x, w_q, (((1,), (1,)), ((), ())))
    for subscripts, operands in (("bk,nk->bn", (x, w_q)), ("nk,bk->bn", (w_q, x))):
        np.testing.assert_array_equal(np.asarray(op(subscripts, *operands)), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(op("nk,bk->nb", w_q, x)), np.asarray(expected).T)
    with pytest.raises(TypeError, match="QArray on both sides"):
        op("bk,nk->bn", w_q, w_q)


def test_linen_einsum_helper_with_the_kernel_first_in_jnp_einsum_order():
    recipe = qk.W4A16(32)
    x = jnp.asarray(activations(np.random.default_rng(11), (8, 64)))
    module = qflax.Einsum((16, 64), "bk,nk->nb", dot_general=qk.make_dot_general(recipe), use_bias=False)
    params = module.init(jax.random.key(0), x)
    expected = qk.make_einsum(recipe)("bk,nk->nb", x, params["params"]["kernel"])
    np.testing.assert_array_equal(np.asarray(module.apply(params, x)), np.asarray(expected))
