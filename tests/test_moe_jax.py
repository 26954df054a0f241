"""Model-level rules on Flax mixture-of-experts layers: expert weights (E, K, N) used through
`jax.lax.ragged_dot` or an einsum over an expert axis become per-expert `QArray`s running `qk.ragged_dot` /
`qk.einsum` (linen and NNX modules written here; `qk.quantize_model`, `qk.quantize_params`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qkernels as qk
from qkernels import testing

E, K, H, M = 4, 64, 48, 24
SIZES = (5, 0, 11, 6)  # an expert with no token, sum(SIZES) < M: the last rows are zero
INIT = nn.initializers.normal(0.05)


class RaggedMoE(nn.Module):
    """A gated MoE MLP over token rows sorted by expert, through `lax.ragged_dot` (megablox / MaxText style)."""

    @nn.compact
    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        up = self.param("wi", INIT, (E, K, H))
        down = self.param("wo", INIT, (E, H, K))
        h = jax.nn.silu(jax.lax.ragged_dot(x, up, group_sizes))
        return jax.lax.ragged_dot(h, down, group_sizes)


class EinsumMoE(nn.Module):
    """A dense-dispatch MoE MLP: every token through every expert by einsum, combined by routing weights."""

    @nn.compact
    def __call__(self, x: jax.Array, combine: jax.Array) -> jax.Array:
        up = self.param("wi", INIT, (E, K, H))
        down = self.param("wo", INIT, (E, H, K))
        h = jax.nn.silu(jnp.einsum("tk,ekh->teh", x, up))  # E a free axis of the weight
        y = jnp.einsum("teh,ehk->tek", h, down)  # E a batch axis
        return jnp.einsum("tek,te->tk", y, combine)  # no parameter: float


class Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        return nn.Dense(K, name="proj")(x) + RaggedMoE(name="moe")(x, group_sizes)


def _inputs(seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    combine = jax.nn.softmax(jnp.asarray(rng.standard_normal((M, E)), jnp.float32), -1)
    return jnp.asarray(testing.activations(rng, (M, K))), jnp.asarray(SIZES, jnp.int32), combine


def _by_hand(x, gs, wi, wo, recipe):
    h = jax.nn.silu(qk.ragged_dot(x, wi, gs, recipe=recipe))
    return qk.ragged_dot(h, wo, gs, recipe=recipe)


@pytest.mark.parametrize("recipe", [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A16(32), id="w4a16-g32")])
def test_linen_ragged_dot_experts_become_qarrays(recipe) -> None:
    x, gs, _ = _inputs()
    float_model = RaggedMoE()
    params = float_model.init(jax.random.key(0), x, gs)["params"]
    qmodel = qk.quantize_model(float_model, qk.Rule(r".*", recipe))
    abstract = jax.eval_shape(qmodel.init, jax.random.key(0), x, gs)["params"]
    qparams = qk.quantize_params(params, abstract)
    for name in ("wi", "wo"):
        q = qparams[name]
        assert isinstance(q, qk.QArray) and q.batch_axes == (0,) and q.contracting_axes == (1,)
        assert q.shape == params[name].shape and q.recipe == recipe
    y = jax.jit(qmodel.apply)({"params": qparams}, x, gs)
    expected = _by_hand(x, gs, qk.quantize_experts(params["wi"], recipe), qk.quantize_experts(params["wo"], recipe),
                        recipe)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    assert not np.asarray(y[sum(SIZES):]).any()
    ref = float_model.apply({"params": params}, x, gs)
    assert testing.snr_db(np.asarray(y), np.asarray(ref)) > (25 if recipe == qk.W8A8 else 15)
    summary = qk.quantization_summary(qmodel)
    assert [(e.param, e.shape, e.recipe) for e in summary.quantized] == [
        ("wi", (E, K, H), recipe.name), ("wo", (E, H, K), recipe.name)]


def test_linen_rules_pick_the_moe_path_and_init_quantizes() -> None:
    x, gs, _ = _inputs()
    qmodel = qk.quantize_model(Block(), [qk.Rule(r"moe", qk.W8A8), qk.Rule(r".*", None)])
    variables = qmodel.init(jax.random.key(0), x, gs)
    assert isinstance(variables["params"]["moe"]["wi"], qk.QArray)
    assert isinstance(variables["params"]["proj"]["kernel"], jax.Array)
    summary = qk.quantization_summary(qmodel)
    assert {e.path for e in summary.quantized} == {"moe"} and {e.path for e in summary.left_float} == {"proj"}
    y = qmodel.apply(variables, x, gs)
    p = variables["params"]
    proj = x @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(proj + _by_hand(x, gs, p["moe"]["wi"], p["moe"]["wo"],
                                                                          qk.W8A8)), rtol=1e-6, atol=1e-6)


def test_linen_qat_trains_the_experts_and_serves_the_same_numbers() -> None:
    x, gs, _ = _inputs()
    float_model = RaggedMoE()
    params = float_model.init(jax.random.key(0), x, gs)["params"]
    qat = qk.quantize_model(float_model, qk.Rule(r".*", qk.W8A8), mode="qat")
    loss = lambda p: jnp.mean(qat.apply({"params": p}, x, gs) ** 2)  # noqa: E731
    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["wi"]).sum()) > 0 and float(jnp.abs(grads["wo"]).sum()) > 0
    served = qk.quantize_model(float_model, qk.Rule(r".*", qk.W8A8))
    qparams = qk.quantize_params(params, jax.eval_shape(served.init, jax.random.key(0), x, gs)["params"])
    np.testing.assert_array_equal(np.asarray(qat.apply({"params": params}, x, gs)),
                                  np.asarray(served.apply({"params": qparams}, x, gs)))


def test_linen_einsum_over_an_expert_axis() -> None:
    x, _, combine = _inputs()
    float_model = EinsumMoE()
    params = float_model.init(jax.random.key(0), x, combine)["params"]
    qmodel = qk.quantize_model(float_model, qk.Rule(r".*", qk.W8A8))
    qparams = qk.quantize_params(params, jax.eval_shape(qmodel.init, jax.random.key(0), x, combine)["params"])
    wi, wo = qparams["wi"], qparams["wo"]
    assert (wi.batch_axes, wi.contracting_axes) == ((), (1,))  # per (expert, column) scales: per expert
    assert (wo.batch_axes, wo.contracting_axes) == ((0,), (1,))
    y = qmodel.apply({"params": qparams}, x, combine)
    einsum = qk.make_einsum(qk.W8A8)
    expected = jnp.einsum("tek,te->tk", einsum("teh,ehk->tek", jax.nn.silu(einsum("tk,ekh->teh", x, wi)), wo), combine)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    ref = float_model.apply({"params": params}, x, combine)
    assert testing.snr_db(np.asarray(y), np.asarray(ref)) > 25


def test_static_recipes_are_refused_on_ragged_dot() -> None:
    x, gs, _ = _inputs()
    qmodel = qk.quantize_model(RaggedMoE(), qk.Rule(r".*", qk.recipe_named("w8a8-static")))
    with pytest.raises(ValueError, match=r"calls lax.ragged_dot on its 'wi' but w8a8-static is a static-range recipe"):
        qmodel.init(jax.random.key(0), x, gs)


class NnxMoE(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.wi = nnx.Param(INIT(rngs.params(), (E, K, H)))
        self.wo = nnx.Param(INIT(rngs.params(), (E, H, K)))

    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        h = jax.nn.silu(jax.lax.ragged_dot(x, self.wi[...], group_sizes))
        return jax.lax.ragged_dot(h, self.wo[...], group_sizes)


class NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.moe = NnxMoE(rngs)

    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        return self.moe(x, group_sizes)


def test_nnx_ragged_dot_experts_become_qarrays() -> None:
    x, gs, _ = _inputs()
    float_model = NnxModel(nnx.Rngs(0))
    qmodel = qk.quantize_model(float_model, qk.Rule(r"moe", qk.W4A16(32)), "serve", x, gs)
    wi, wo = qmodel.moe.wi[...], qmodel.moe.wo[...]
    assert isinstance(wi, qk.QArray) and wi.batch_axes == (0,) and wi.shape == (E, K, H)
    assert isinstance(float_model.moe.wi[...], jax.Array), "the float model was modified"
    y = qmodel(x, gs)
    expected = _by_hand(x, gs, qk.quantize_experts(float_model.moe.wi[...], qk.W4A16(32)),
                        qk.quantize_experts(float_model.moe.wo[...], qk.W4A16(32)), qk.W4A16(32))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(wo.qvalue), np.asarray(
        qk.quantize_experts(float_model.moe.wo[...], qk.W4A16(32)).qvalue))
    assert [(e.path, e.param) for e in qk.quantization_summary(qmodel).quantized] == [("moe", "wi"), ("moe", "wo")]
    # a fresh quantized model filled from the float params serves the same numbers
    nnx.update(qmodel, qk.quantize_params(float_model, qmodel))
    np.testing.assert_array_equal(np.asarray(qmodel(x, gs)), np.asarray(y))
