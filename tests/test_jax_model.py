"""Model-level quantization of unedited Flax models: qk.Rule, quantize_model (serve / qat / calibrate),
quantize_params, the summary, checkpoints, sharded params and the errors."""

from __future__ import annotations

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qkernels as qk
from jax_bindings import einsum as qeinsum
from jax_bindings.arrays import JAX_OPS
from qkernels import calibration
from qkernels.testing import activations, assert_close, snr_db

KEY = jax.random.key(0)
D, HEADS, HEAD_DIM, HIDDEN = 128, 4, 32, 256


# --- the models, written as a user would (nothing qkernels-specific) ------------------------------------------

class Attention(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q = nn.DenseGeneral((HEADS, HEAD_DIM), name="query")(x)  # [b, t, h, d]
        k = nn.DenseGeneral((HEADS, HEAD_DIM), name="key")(x)
        v = nn.Einsum((D, HEADS, HEAD_DIM), "btk,khd->bthd", name="value")(x)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HEAD_DIM)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return nn.DenseGeneral(D, axis=(-2, -1), name="out")(o)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(name="attn")(nn.LayerNorm(name="ln1")(x))
        h = nn.gelu(nn.Dense(HIDDEN, name="up")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(D, name="down")(h)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(D, HIDDEN, rngs=rngs)
        self.mid = nnx.LinearGeneral(HIDDEN, (2, D // 2), rngs=rngs)
        self.down = nnx.Einsum("btgk,gkn->btn", (2, D // 2, D), (D,), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(nnx.gelu(self.mid(nnx.gelu(self.up(x)))))


def _x(shape=(2, 16, D), seed=0) -> jax.Array:
    return jnp.asarray(activations(np.random.default_rng(seed), shape))


def _served(model, rules, x, params):
    qmodel = qk.quantize_model(model, rules)
    abstract = jax.eval_shape(qmodel.init, KEY, x)["params"]
    return qmodel, qk.quantize_params(params, abstract)


def _nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def _kernels(tree):
    return [v for v in jax.tree_util.tree_leaves(tree, is_leaf=lambda a: isinstance(a, qk.QArray))
            if isinstance(v, qk.QArray)]


# --- serve: accuracy, memory, summary --------------------------------------------------------------------------

QUANTIZED_BLOCK = ["attn/query", "attn/key", "attn/value", "attn/out", "up", "down"]


def test_linen_block_w8a8_serves_from_qarray_params_with_25db_snr():
    block, x = Block(), _x()
    params = block.init(KEY, x)["params"]
    qmodel, qparams = _served(block, [qk.Rule(r".*", qk.W8A8)], x, params)
    assert len(_kernels(qparams)) == 6
    out = jax.jit(qmodel.apply)({"params": qparams}, x)
    float_out = block.apply({"params": params}, x)
    assert snr_db(out, float_out) >= 25
    delta = snr_db(out - x, float_out - x)  # the attention + MLP branch alone, without the residual's help
    assert delta >= 25, delta
    summary = qk.quantization_summary(qmodel)
    assert [e.path for e in summary.quantized] == QUANTIZED_BLOCK
    assert {e.recipe for e in summary.quantized} == {"w8a8"}
    assert {e.path: e.shape for e in summary.quantized}["attn/value"] == (D, HEADS, HEAD_DIM)
    assert {e.path for e in summary.left_float} == {"ln1", "ln2"}
    assert all("no lax.dot_general" in e.reason for e in summary.left_float)
    assert "attn/out" in str(summary) and "ln1" in str(summary)


def test_linen_block_w4a16_params_take_under_0_3x_the_float_bytes_and_keep_no_float_copy():
    block, x = Block(), _x()
    params = block.init(KEY, x)["params"]
    qmodel, qparams = _served(block, [qk.Rule(r".*", qk.W4A16(128))], x, params)
    assert _nbytes(qparams) <= 0.3 * _nbytes(params)
    kernels = _kernels(qparams)
    assert len(kernels) == 6 and all(q.qvalue.dtype == jnp.int8 and q.recipe == qk.W4A16(128) for q in kernels)
    float_shapes = {tuple(a.shape) for a in jax.tree_util.tree_leaves(qparams) if a.dtype == jnp.float32}
    assert not float_shapes & {q.shape for q in kernels}, "a float copy of a kernel is kept"
    assert snr_db(jax.jit(qmodel.apply)({"params": qparams}, x), block.apply({"params": params}, x)) >= 25


def test_first_matching_rule_wins_and_none_leaves_float():
    block, x = Block(), _x()
    params = block.init(KEY, x)["params"]
    rules = [qk.Rule(r"attn/(query|key)", None), qk.Rule(r"up|down", qk.W4A16(128)), qk.Rule(r".*", qk.W8A8)]
    qmodel, qparams = _served(block, rules, x, params)
    summary = qk.quantization_summary(qmodel)
    assert {e.path: e.recipe for e in summary.quantized} == {
        "attn/value": "w8a8", "attn/out": "w8a8", "up": "w4a16-g128", "down": "w4a16-g128"}
    reasons = {e.path: e.reason for e in summary.left_float}
    assert "recipe None" in reasons["attn/query"] and "recipe None" in reasons["attn/key"]
    assert not isinstance(qparams["attn"]["query"]["kernel"], qk.QArray)
    jax.jit(qmodel.apply)({"params": qparams}, x)


LAYERS = [
    pytest.param(lambda: nn.Dense(48), (4, 64), "bk,kn->bn", id="Dense"),
    pytest.param(lambda: nn.DenseGeneral((3, 16), axis=(-2, -1)), (4, 2, 32), "bij,ijhn->bhn", id="DenseGeneral"),
    pytest.param(lambda: nn.Einsum((64, 8), "bk,kn->nb"), (4, 64), "bk,kn->nb", id="Einsum-kernel-first-in-jnp"),
]
RECIPES = [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A16(32), id="w4a16-g32"),
           pytest.param(qk.W4A8(32), id="w4a8-g32")]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("make,x_shape,subscripts", LAYERS)
def test_apply_equals_qk_dot_general_on_the_same_qarrays(make, x_shape, subscripts, recipe):
    layer, x = make(), _x(x_shape, seed=1)
    params = layer.init(KEY, x)["params"]
    params["bias"] = jnp.asarray(np.random.default_rng(2).standard_normal(params["bias"].shape, np.float32))
    qmodel, qparams = _served(layer, [qk.Rule(r".*", recipe)], x, params)
    w = qparams["kernel"]
    assert isinstance(w, qk.QArray) and w.recipe == recipe
    out = jax.jit(qmodel.apply)({"params": qparams}, x)

    @jax.jit
    def by_hand(x, w, b):
        if isinstance(layer, nn.Einsum):
            return qeinsum.einsum(subscripts, x, w, dot_general=qk.dot_general) + b[:, None]
        return qk.dot_general(x, w, ((tuple(range(1, x.ndim)), tuple(range(x.ndim - 1))), ((), ()))) + b

    np.testing.assert_array_equal(np.asarray(out), np.asarray(by_hand(x, w, qparams["bias"])))


def test_bare_lax_and_einsum_calls_on_own_params_are_quantized_whichever_operand_order():
    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            w1 = self.param("w1", nn.initializers.lecun_normal(), (64, 32))
            w2 = self.param("w2", nn.initializers.lecun_normal(), (16, 32))
            h = jax.lax.dot_general(w1, x, (((0,), (1,)), ((), ())))  # weight first: [32, b]
            return jnp.einsum("nk,kb->bn", w2, h)  # weight first again

    model, x = Custom(), _x((4, 64), seed=3)
    params = model.init(KEY, x)["params"]
    qmodel, qparams = _served(model, [qk.Rule(r"", qk.W8A8)], x, params)
    w1, w2 = qparams["w1"], qparams["w2"]
    assert w1.contracting_axes == (0,) and w2.contracting_axes == (1,)
    out = jax.jit(qmodel.apply)({"params": qparams}, x)
    h = qk.dot_general(x, w1, (((1,), (0,)), ((), ())))  # [b, 32]: the weight quantized, not x
    np.testing.assert_array_equal(np.asarray(out), np.asarray(qk.dot_general(h, w2, (((1,), (1,)), ((), ())))))


class SetupStyle(nn.Module):
    def setup(self):
        self.w = self.param("w", nn.initializers.lecun_normal(), (64, 32))
        self.dense = nn.Dense(8)

    def __call__(self, x):
        return self.dense(jax.lax.dot_general(x, self.w, (((1,), (0,)), ((), ()))))


class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return SetupStyle(name="inner")(x)


@pytest.mark.parametrize("make", [pytest.param(SetupStyle, id="top-level"), pytest.param(Outer, id="nested")])
def test_params_made_in_setup_are_quantized_too(make):
    model, x = make(), _x((4, 64), seed=12)
    params = model.init(KEY, x)["params"]
    qmodel, qparams = _served(model, [qk.Rule(r".*", qk.W8A8)], x, params)
    inner = qparams if make is SetupStyle else qparams["inner"]
    assert isinstance(inner["w"], qk.QArray) and isinstance(inner["dense"]["kernel"], qk.QArray)
    out = jax.jit(qmodel.apply)({"params": qparams}, x)
    assert snr_db(out, model.apply({"params": params}, x)) >= 25
    assert {e.param for e in qk.quantization_summary(qmodel).quantized} == {"w", "kernel"}


# --- NNX ----------------------------------------------------------------------------------------------------------

def test_nnx_mlp_quantized_in_place_serves_and_quantize_params_gives_the_same_state():
    x = _x(seed=4)
    float_model = NnxMLP(nnx.Rngs(0))
    qmodel = qk.quantize_model(float_model, [qk.Rule(r".*", qk.W8A8)], "serve", x)
    assert isinstance(float_model.up.kernel[...], jax.Array), "the float model was modified"
    assert all(isinstance(m.kernel[...], qk.QArray) for m in (qmodel.up, qmodel.mid, qmodel.down))
    step = nnx.jit(lambda m, x: m(x))
    out = step(qmodel, x)
    assert snr_db(out, float_model(x)) >= 25
    assert [e.path for e in qk.quantization_summary(qmodel).quantized] == ["up", "mid", "down"]
    # From float params (e.g. a checkpoint) into the quantized model: the same QArrays, the same output.
    other = qk.quantize_model(NnxMLP(nnx.Rngs(1)), [qk.Rule(r".*", qk.W8A8)], "serve", x)
    nnx.update(other, qk.quantize_params(float_model, other))
    np.testing.assert_array_equal(np.asarray(step(other, x)), np.asarray(out))
    # The QArray is what qk.dot_general gets: the first layer by hand.
    w = qmodel.up.kernel[...]
    by_hand = jax.jit(lambda x, w, b: qk.dot_general(x, w, (((2,), (0,)), ((), ()))) + b)(x, w, qmodel.up.bias[...])
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m.up(x))(qmodel, x)), np.asarray(by_hand))


def test_nnx_w4a16_params_take_under_0_3x_the_float_bytes():
    x = _x(seed=5)
    float_model = NnxMLP(nnx.Rngs(0))
    qmodel = qk.quantize_model(float_model, [qk.Rule(r".*", qk.W4A16(64))], "serve", x)
    assert _nbytes(nnx.state(qmodel, nnx.Param)) <= 0.3 * _nbytes(nnx.state(float_model, nnx.Param))


def test_nnx_einsum_with_the_kernel_first_in_jnp_einsum_order():
    x = _x((4, 64), seed=6)
    layer = nnx.Einsum("bk,nk->nb", (16, 64), (16, 1), rngs=nnx.Rngs(0))
    qlayer = qk.quantize_model(layer, [qk.Rule(r".*", qk.W8A8)], "serve", x)
    w = qlayer.kernel[...]
    assert w.contracting_axes == (1,)
    expected = qk.make_einsum(qk.W8A8)("bk,nk->nb", x, w) + qlayer.bias[...]
    np.testing.assert_array_equal(np.asarray(qlayer(x)), np.asarray(expected))


# --- QAT -> serve ---------------------------------------------------------------------------------------------

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(64, name="up")(x))
        h = nn.Einsum((64, 2, 16), "bk,khn->bhn", name="mix")(h)
        return nn.DenseGeneral(1, axis=(-2, -1), name="head")(h)


@pytest.mark.parametrize("recipe", [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A8(32), id="w4a8-g32")])
def test_qat_trains_and_the_converted_params_serve_bit_identically(recipe):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((64, 32), dtype=np.float32))
    y = jnp.sin(2 * x[:, :1]) + x[:, 1:2]
    rules = [qk.Rule(r".*", recipe)]
    qat = qk.quantize_model(MLP(), rules, "qat")
    params = qat.init(KEY, x)["params"]
    assert not _kernels(params), "QAT keeps float params"
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((qat.apply({"params": p}, x) - y) ** 2))(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(25):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    qmodel, qparams = _served(MLP(), rules, x, params)
    trained = jax.jit(qat.apply)({"params": params}, x)
    served = jax.jit(qmodel.apply)({"params": qparams}, x)
    np.testing.assert_array_equal(np.asarray(served), np.asarray(trained))


def test_nnx_qat_then_serve_bit_identical():
    x = _x(seed=8)
    qat = qk.quantize_model(NnxMLP(nnx.Rngs(0)), [qk.Rule(r".*", qk.W4A8(64))], "qat")
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(qat)
    assert float(jnp.abs(grads.up.kernel[...]).sum()) > 0  # straight-through gradients reach the kernel
    served = qk.quantize_model(NnxMLP(nnx.Rngs(1)), [qk.Rule(r".*", qk.W4A8(64))], "serve", x)
    nnx.update(served, qk.quantize_params(qat, served))
    step = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(step(served, x)), np.asarray(step(qat, x)))


# --- calibrate -> static-range serving ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["absmax", "percentile"])
def test_calibrate_collects_ranges_and_the_static_recipe_serves_with_them(method):
    block, batches = Block(), [_x(seed=10 + i) for i in range(3)]
    rules = [qk.Rule(r".*", qk.W8A8(static=True), method=method, percentile=99.9)]
    params = block.init(KEY, batches[0])["params"]
    calib_model = qk.quantize_model(block, rules, "calibrate")
    stats = calib_model.init(KEY, batches[0])[qk_calibration()]
    variables = {"params": params, qk_calibration(): stats}
    for x in batches:
        out, updates = calib_model.apply(variables, x, mutable=[qk_calibration()])
        variables = {**variables, **updates}
        np.testing.assert_array_equal(np.asarray(out), np.asarray(block.apply({"params": params}, x)))  # float
    ranges = variables[qk_calibration()]
    # The 'up' layer's input is ln2's output: its range is the max over batches (init's batch included).
    seen = [batches[0], *batches]
    inputs = [nn.LayerNorm().apply({"params": params["ln2"]}, x + Attention().apply({"params": params["attn"]},
                                    nn.LayerNorm().apply({"params": params["ln1"]}, x))) for x in seen]
    expected = max(float(calibration.batch_range(np.asarray(h), method=method, percentile=99.9)) for h in inputs)
    np.testing.assert_allclose(float(ranges["up"]["kernel_input_amax"]), expected, rtol=1e-6)

    qmodel = qk.quantize_model(block, rules)
    abstract = jax.eval_shape(qmodel.init, KEY, batches[0])["params"]
    qparams = qk.quantize_params(params, abstract, calibration=ranges)
    scale = qparams["up"]["kernel_input_scale"]
    assert scale.shape == () and scale == calibration.static_scale(ranges["up"]["kernel_input_amax"], JAX_OPS)
    x = _x(seed=20)
    out = jax.jit(qmodel.apply)({"params": qparams}, x)
    assert snr_db(out, block.apply({"params": params}, x)) >= 25
    # The served 'down' layer is qk.dot_general with that per-tensor scale.
    down = qk.quantize_model(nn.Dense(D), [qk.Rule(r".*", qk.W8A8(static=True))])
    h = jax.random.normal(KEY, (4, HIDDEN))
    p = qparams["down"]
    by_hand = jax.jit(lambda h, p: qk.dot_general(h, p["kernel"], (((1,), (0,)), ((), ())),
                                                  input_scale=p["kernel_input_scale"]) + p["bias"])
    np.testing.assert_array_equal(np.asarray(jax.jit(down.apply)({"params": p}, h)), np.asarray(by_hand(h, p)))


def qk_calibration() -> str:
    from jax_bindings.model import CALIBRATION

    return CALIBRATION


def test_nnx_calibrate_then_static_serve():
    batches = [_x(seed=30 + i) for i in range(3)]
    rules = [qk.Rule(r".*", qk.W8A8(static=True))]
    float_model = NnxMLP(nnx.Rngs(0))
    calib_model = qk.quantize_model(float_model, rules, "calibrate", batches[0])
    step = nnx.jit(lambda m, x: m(x))
    for x in batches:
        np.testing.assert_array_equal(np.asarray(step(calib_model, x)), np.asarray(step(float_model, x)))
    amax = float(calib_model.up.kernel_input_amax[...])
    assert amax == max(float(jnp.max(jnp.abs(x))) for x in [batches[0], *batches])
    served = qk.quantize_model(float_model, rules, "serve", batches[0])
    nnx.update(served, qk.quantize_params(float_model, served, calibration=calib_model))
    assert float(served.up.kernel_input_scale[...]) == float(calibration.static_scale(jnp.float32(amax), JAX_OPS))
    assert snr_db(step(served, _x(seed=40)), float_model(_x(seed=40))) >= 25


# --- sharding ---------------------------------------------------------------------------------------------------

class ShardedMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        up = nn.Dense(256, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")),
                      name="up")  # column-parallel
        down = nn.Dense(64, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("model", None)),
                        name="down")  # row-parallel
        return down(nn.relu(up(x)))


def _mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by conftest)")
    return jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("recipe", [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A16(32), id="w4a16-g32")])
def test_sharded_params_jit_equals_unsharded(recipe):
    mesh, model, x = _mesh(), ShardedMLP(), _x((16, 64), seed=50)
    boxed = model.init(KEY, x)["params"]
    qmodel = qk.quantize_model(model, [qk.Rule(r".*", recipe)])
    abstract = jax.eval_shape(qmodel.init, KEY, x)["params"]
    specs = nn.get_partition_spec(abstract)
    assert specs["up"]["kernel"].qvalue == P("model", None)  # column-parallel: N rows follow
    assert specs["down"]["kernel"].qvalue == P(None, "model")  # row-parallel: packed K follows
    qparams = nn.unbox(qk.quantize_params(boxed, abstract))
    sharded = jax.device_put(qparams, jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs))
    assert sharded["down"]["kernel"].qvalue.sharding.spec == P(None, "model")
    f = jax.jit(qmodel.apply)
    out, unsharded = f({"params": sharded}, x), f({"params": qparams}, x)
    if recipe == qk.W8A8:  # int32 partials all-reduced exactly, rescaled once
        np.testing.assert_array_equal(np.asarray(out), np.asarray(unsharded))
    else:  # row-parallel f32 partials: the sum over K reassociates, within qkernels.testing's tolerances
        up = qk.quantize_model(nn.Dense(256), [qk.Rule(r".*", recipe)])
        h = np.asarray(jax.nn.relu(up.apply({"params": qparams["up"]}, x)))
        down = qparams["down"]
        assert_close(out, unsharded, h, np.asarray(down["kernel"].dequantize()).T, np.float32, bias=down["bias"])


def test_quantize_params_derives_the_sharding_of_a_sharded_float_kernel():
    mesh = _mesh()
    w = jax.device_put(jnp.asarray(np.random.default_rng(9).standard_normal((64, 256), np.float32)),
                       NamedSharding(mesh, P(None, "model")))
    qmodel = qk.quantize_model(nn.Dense(256), [qk.Rule(r".*", qk.W4A16(32))])
    abstract = jax.eval_shape(qmodel.init, KEY, jnp.ones((2, 64)))["params"]
    q = qk.quantize_params({"kernel": w, "bias": jnp.zeros(256)}, abstract)["kernel"]
    assert q.qvalue.sharding.spec == P("model", None) and q.scale.sharding.spec == P("model", None)


# --- checkpoints ------------------------------------------------------------------------------------------------

def _mlp_params(recipe, k=64):
    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(8)])
    x = jnp.ones((2, k))
    qmodel = qk.quantize_model(model, [qk.Rule(r".*", recipe)])
    abstract = jax.eval_shape(qmodel.init, KEY, x)["params"]
    return qmodel, abstract, qk.quantize_params(model.init(KEY, x)["params"], abstract)


def _assert_same(a, b):
    la, lb = jax.tree_util.tree_flatten(a), jax.tree_util.tree_flatten(b)
    assert la[1] == lb[1]
    for u, v in zip(la[0], lb[0]):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
        assert u.dtype == v.dtype


def test_flax_serialization_round_trip_is_exact_and_another_recipe_or_shape_is_refused():
    _, abstract, qparams = _mlp_params(qk.W4A16(32))
    blob = serialization.to_bytes(qparams)
    restored = serialization.from_bytes(qparams, blob)
    _assert_same(restored, qparams)
    _, _, other_recipe = _mlp_params(qk.W4A8(32))  # the same leaf shapes and dtypes
    with pytest.raises(ValueError, match=r"checkpoint holds a QArray 'w4a16-g32' of shape \[64, 32\]"):
        serialization.from_bytes(other_recipe, blob)
    _, _, other_shape = _mlp_params(qk.W4A16(32), k=60)  # K=60 pads to 64: same packed shapes
    with pytest.raises(ValueError, match="checkpoint holds a QArray"):
        serialization.from_bytes(other_shape, blob)


def test_orbax_round_trip_is_exact_and_another_recipe_is_refused(tmp_path):
    import orbax.checkpoint as ocp

    qmodel, _, qparams = _mlp_params(qk.W8A8)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", serialization.to_state_dict(qparams))
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(tmp_path / "ckpt")
    restored = serialization.from_state_dict(qparams, state)
    _assert_same(restored, qparams)
    x = jnp.ones((2, 64))
    np.testing.assert_array_equal(np.asarray(qmodel.apply({"params": restored}, x)),
                                  np.asarray(qmodel.apply({"params": qparams}, x)))
    _, _, w4 = _mlp_params(qk.W4A8(32))
    with pytest.raises(ValueError, match="checkpoint holds a QArray 'w8a8'"):
        serialization.from_state_dict(w4, state)


# --- errors -----------------------------------------------------------------------------------------------------

def test_a_rule_matching_nothing_warns_with_the_paths_seen():
    block, x = Block(), _x()
    qmodel = qk.quantize_model(block, [qk.Rule(r"mlp/.*", qk.W8A8), qk.Rule(r"up", qk.W8A8)])
    with pytest.warns(UserWarning, match=r"Rule\('mlp/\.\*'\) matched no module; the module paths are .*'attn/query'"):
        jax.eval_shape(qmodel.init, KEY, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qk.quantize_model(NnxMLP(nnx.Rngs(0)), [qk.Rule(r"up", qk.W8A8)], "serve", x)
    unmatched = r"Rule\('mlp'\) matched no module; the module paths are \['down', 'mid', 'up', ''\]"
    with pytest.warns(UserWarning, match=unmatched):
        qk.quantize_model(NnxMLP(nnx.Rngs(0)), [qk.Rule(r"mlp", qk.W8A8)], "serve", x)


def test_bad_calls_give_clear_errors():
    block, x = Block(), _x()
    params = block.init(KEY, x)["params"]
    with pytest.raises(ValueError, match="mode='train'; use one of"):
        qk.quantize_model(block, [qk.Rule(r".*", qk.W8A8)], "train")
    with pytest.raises(TypeError, match="takes qk.Rule objects"):
        qk.quantize_model(block, [(r".*", qk.W8A8)])
    with pytest.raises(ValueError, match="not a regular expression"):
        qk.Rule(r"(", qk.W8A8)
    with pytest.raises(ValueError, match="method='mean'"):
        qk.Rule(r".*", qk.W8A8(static=True), method="mean")
    qmodel = qk.quantize_model(block, [qk.Rule(r".*", qk.W8A8)])
    with pytest.raises(ValueError, match=r"module 'attn/query' got a float 'kernel'.*qk.quantize_params"):
        qmodel.apply({"params": params}, x)
    w4 = qk.quantize_params(params, jax.eval_shape(qk.quantize_model(block, [qk.Rule(r".*", qk.W4A16(128))]).init,
                                                   KEY, x)["params"])
    with pytest.raises(ValueError, match=r"'kernel' is a QArray quantized for w4a16-g128 but the rule gives w8a8"):
        qmodel.apply({"params": w4}, x)
    small = nn.Dense(8)
    qsmall = qk.quantize_model(small, [qk.Rule(r".*", qk.W8A8)])
    qp = qk.quantize_params(small.init(KEY, jnp.ones((1, 32)))["params"],
                            jax.eval_shape(qsmall.init, KEY, jnp.ones((1, 32)))["params"])
    with pytest.raises(ValueError, match=r"declares 'kernel' of shape \(64, 8\) but the params hold a QArray of shape "
                                         r"\[32, 8\]"):
        qsmall.apply({"params": qp}, jnp.ones((1, 64)))
    with pytest.raises(ValueError, match=r"'kernel' has shape \(64, 8\) but the quantized model expects \[32, 8\]"):
        qk.quantize_params(small.init(KEY, jnp.ones((1, 64)))["params"],
                           jax.eval_shape(qsmall.init, KEY, jnp.ones((1, 32)))["params"])
    with pytest.raises(ValueError, match="needs example inputs"):
        qk.quantize_model(NnxMLP(nnx.Rngs(0)), [qk.Rule(r".*", qk.W8A8)], "serve")
    with pytest.raises(ValueError, match="static-range recipe; train with its dynamic recipe"):
        qk.quantize_model(block, [qk.Rule(r".*", qk.W8A8(static=True))], "qat").init(KEY, x)
    calib = qk.quantize_model(block, [qk.Rule(r".*", qk.W8A8(static=True))], "calibrate")
    with pytest.raises(ValueError, match=r"apply with mutable=\['calibration'\]"):
        calib.apply({"params": params}, x)
    static = qk.quantize_model(block, [qk.Rule(r".*", qk.W8A8(static=True))])
    with pytest.raises(ValueError, match="activation scale but the calibration has no 'attn/key/kernel_input_amax'"):
        qk.quantize_params(params, jax.eval_shape(static.init, KEY, x)["params"], calibration={})
    with pytest.raises(TypeError, match="was not made by qk.quantize_model"):
        qk.quantization_summary(block)
    with pytest.raises(TypeError, match="a QArray cannot be indexed"):
        qk.quantize(jnp.ones((8, 4)), qk.W8A8, contracting_axes=(0,))[0]


def test_assert_close_helper_is_used_for_float_paths():
    """W4A16 through quantize_model is within qkernels.testing's tolerances of the dequantized matmul."""
    layer, x = nn.Dense(16, use_bias=False), _x((4, 64), seed=60)
    qmodel, qparams = _served(layer, [qk.Rule(r".*", qk.W4A16(32))], x, layer.init(KEY, x)["params"])
    w = np.asarray(qparams["kernel"].dequantize())
    assert_close(qmodel.apply({"params": qparams}, x), np.asarray(x) @ w, np.asarray(x), w.T, np.float32)


def test_bench_model_smoke_has_both_libraries_side_by_side():
    """`python -m bench model --smoke`'s rows (speed is reported there, never asserted here)."""
    from bench import jax_model

    rows = jax_model.run("smoke", ("w8a8",))
    assert [(r["recipe"], r["impl"]) for r in rows] == [("float", "flax f32"), ("w8a8", "qkernels"),
                                                        ("w8a8", "qkernels mse"), ("w8a8", "qwix")]
    for ours in rows[1:3]:
        assert ours["snr_db"] >= 25 and ours["ms"] > 0 and ours["param_bytes"] < rows[0]["param_bytes"]
    assert "error" not in rows[3] or rows[3]["error"].startswith("unavailable")
    assert "| w8a8 | qkernels |" in jax_model.markdown(rows, "smoke")


def test_nnx_kernels_sharded_before_quantize_model_stay_sharded():
    mesh, x = _mesh(), _x((2, 4, D), seed=13)
    model = NnxMLP(nnx.Rngs(0))
    model.up.kernel.set_value(jax.device_put(model.up.kernel[...], NamedSharding(mesh, P(None, "model"))))
    reference = nnx.jit(lambda m, x: m(x))(qk.quantize_model(NnxMLP(nnx.Rngs(0)), [qk.Rule(r".*", qk.W8A8)],
                                                               "serve", x), x)
    qmodel = qk.quantize_model(model, [qk.Rule(r".*", qk.W8A8)], "serve", x)
    w = qmodel.up.kernel[...]
    assert w.qvalue.sharding.spec == P("model", None) and w.scale.sharding.spec == P("model")
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(qmodel, x)), np.asarray(reference))
