"""GPTQ and AWQ for Flax models: mode="calibrate" sums each weight's input Gram matrix (and |x| for AWQ),
qk.quantize_params(method="gptq" | "awq") runs the framework-neutral algorithm (qkernels.quality) on it
(linen and NNX)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qkernels as qk
from qkernels import quality, testing

KEY = jax.random.key(0)
K, HIDDEN, HEADS = 96, 128, 4
MIX = (np.random.default_rng(0).standard_normal((K, K)) * 0.15 + np.eye(K)).astype(np.float32)


def _x(seed: int, rows: int = 64, mixed: bool = True) -> jax.Array:
    """Rows with the same outlier channels in every batch, correlated across channels when `mixed`: where
    GPTQ pays (AWQ: from the salient channels)."""
    x = testing.activations(np.random.default_rng(seed), (rows, K), outliers=0)
    x[:, :4] *= 20.0
    return jnp.asarray(x @ MIX if mixed else x)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(HIDDEN, name="up")(x))
        h = nn.DenseGeneral((HEADS, HIDDEN // HEADS), name="split")(h)  # (.., 4, 32)
        return nn.DenseGeneral(K, axis=(-2, -1), name="merge")(h)  # contracts two axes


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(K, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, K, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


def _calibrated(model, rules, params, batches):
    calib = qk.quantize_model(model, rules, "calibrate")
    variables = {"params": params, "calibration": calib.init(KEY, batches[0])["calibration"]}
    for x in batches[1:]:
        out, updates = jax.jit(lambda v, x: calib.apply(v, x, mutable=["calibration"]))(variables, x)
        variables = {**variables, **updates}
        np.testing.assert_allclose(np.asarray(out), np.asarray(model.apply({"params": params}, x)), rtol=1e-5,
                                   atol=1e-5)  # the float forward (jitted here)
    return variables["calibration"]


def _served(model, rules, params, x, **kw):
    qmodel = qk.quantize_model(model, rules)
    return qmodel, qk.quantize_params(params, jax.eval_shape(qmodel.init, KEY, x)["params"], **kw)


@pytest.mark.parametrize("method", ["gptq", "gptq-ao-mse"])
def test_linen_gptq_from_the_collected_gram_matrices(method):
    model, batches = MLP(), [_x(10 + i) for i in range(4)]
    rules = [qk.Rule(r".*", qk.W4A16(32), weight_method=method)]
    params = model.init(KEY, batches[0])["params"]
    stats = _calibrated(model, rules, params, batches)
    # the 'merge' layer contracts (heads, head_dim) of its input: K in the kernel's contracting order
    h = [nn.DenseGeneral((HEADS, HIDDEN // HEADS)).apply({"params": params["split"]},
                                                          nn.gelu(nn.Dense(HIDDEN).apply({"params": params["up"]}, x)))
         for x in batches]
    rows = np.concatenate([np.asarray(a, np.float64).reshape(-1, HIDDEN) for a in h])
    np.testing.assert_allclose(np.asarray(stats["merge"]["kernel_input_gram"]), rows.T @ rows, rtol=2e-5, atol=1e-2)
    assert float(stats["merge"]["kernel_input_rows"]) == len(rows)

    qmodel, qparams = _served(model, rules, params, batches[0], calibration=stats, method=method)
    hessian = 2.0 * np.asarray(stats["merge"]["kernel_input_gram"], np.float64) / len(rows)
    want = quality.gptq_named(np.asarray(params["merge"]["kernel"]).reshape(HIDDEN, K).T, hessian,
                              qk.W4A16(32).rhs, method)
    np.testing.assert_array_equal(np.asarray(qparams["merge"]["kernel"].qvalue), want.qvalue)

    held_out = _x(99, 256)
    exact = model.apply({"params": params}, held_out)
    _, rtn = _served(model, [qk.Rule(r".*", qk.W4A16(32))], params, batches[0])
    gptq_snr = testing.snr_db(np.asarray(qmodel.apply({"params": qparams}, held_out)), np.asarray(exact))
    rtn_snr = testing.snr_db(np.asarray(qmodel.apply({"params": rtn}, held_out)), np.asarray(exact))
    assert gptq_snr > rtn_snr + 0.5


def test_nnx_gptq_calibrate_then_serve():
    batches = [_x(20 + i) for i in range(4)]
    rules = [qk.Rule(r".*", qk.W4A16(32, zero_point=True), weight_method="gptq-ao")]
    float_model = NnxMLP(nnx.Rngs(0))
    calib = qk.quantize_model(float_model, rules, "calibrate", batches[0])
    for x in batches[1:]:
        calib(x)
    assert float(calib.up.kernel_input_rows[...]) == 4 * 64
    served = qk.quantize_model(float_model, rules, "serve", batches[0])
    rtn = jax.tree.map(lambda a: a, nnx.to_pure_dict(nnx.state(served, nnx.Param)))  # until quantize_params: RTN
    nnx.update(served, qk.quantize_params(float_model, served, calibration=calib, method="gptq-ao"))
    held_out = _x(98, 256)
    exact = np.asarray(float_model(held_out))
    gptq_snr = testing.snr_db(np.asarray(served(held_out)), exact)
    nnx.update(served, rtn)
    assert gptq_snr > testing.snr_db(np.asarray(served(held_out)), exact) + 0.5


def test_jax_and_torch_gptq_agree():
    """One algorithm: the same layer and inputs give the same codes in both frameworks (up to the rounding
    of the two matmuls that sum X^T X)."""
    torch = pytest.importorskip("torch")
    batches = [_x(30 + i) for i in range(3)]
    dense = nn.Dense(HIDDEN)
    params = dense.init(KEY, batches[0])["params"]
    rules = [qk.Rule(r".*", qk.W4A16(32), weight_method="gptq")]
    stats = _calibrated(dense, rules, params, batches)
    _, qparams = _served(dense, rules, params, batches[0], calibration=stats, method="gptq")
    linear = torch.nn.Linear(K, HIDDEN)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.asarray(params["kernel"]).T.copy()))
    layer = qk.quantize_(linear, qk.W4A16(32), calibration=[torch.from_numpy(np.asarray(x)) for x in batches],
                         method="gptq", progress=False).model
    same = np.asarray(qparams["kernel"].qvalue) == layer.weight.qvalue.numpy()
    assert same.mean() > 0.99


def test_gptq_misuse_is_refused():
    model, x = MLP(), _x(0)
    params = model.init(KEY, x)["params"]
    qmodel = qk.quantize_model(model, [qk.Rule(r".*", qk.W4A16(32))])
    abstract = jax.eval_shape(qmodel.init, KEY, x)["params"]
    with pytest.raises(ValueError, match="needs the inputs of '(up|merge)/kernel'.*weight_method='gptq'"):
        qk.quantize_params(params, abstract, method="gptq")
    with pytest.raises(ValueError, match="weight_method='bogus'"):
        qk.Rule(r".*", qk.W4A16(32), weight_method="bogus")

    class Experts(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("experts", nn.initializers.normal(), (2, K, 16))
            return jax.lax.ragged_dot(x, w, jnp.array([x.shape[0] // 2, x.shape[0] - x.shape[0] // 2], jnp.int32))

    calib = qk.quantize_model(Experts(), [qk.Rule(r".*", qk.W4A16(32), weight_method="gptq")], "calibrate")
    with pytest.raises(ValueError, match="batch \\(expert\\) axes.*weight_method='rtn' or 'mse'"):
        calib.init(KEY, x)


def test_linen_awq_serves_with_its_factors():
    model, batches = nn.Dense(HIDDEN), [_x(40 + i, mixed=False) for i in range(4)]
    rules = [qk.Rule(r".*", qk.W4A16(32), weight_method="awq")]
    params = model.init(KEY, batches[0])["params"]
    stats = _calibrated(model, rules, params, batches)
    rows = np.concatenate([np.asarray(x, np.float64) for x in batches])
    np.testing.assert_allclose(np.asarray(stats["kernel_input_abs"]), np.abs(rows).sum(0), rtol=1e-5)
    qmodel, qparams = _served(model, rules, params, batches[0], calibration=stats, method="awq")
    _, want = quality.awq_gram(np.asarray(params["kernel"]).T, np.asarray(stats["kernel_input_gram"], np.float64)
                               / len(rows), np.abs(rows).mean(0), qk.W4A16(32).rhs)
    np.testing.assert_allclose(np.asarray(qparams["kernel_smooth"]), want, rtol=1e-5)
    assert not np.allclose(want, 1.0)
    held_out = _x(97, 256, mixed=False)
    exact = np.asarray(model.apply({"params": params}, held_out))
    awq_snr = testing.snr_db(np.asarray(jax.jit(qmodel.apply)({"params": qparams}, held_out)), exact)
    _, rtn = _served(model, [qk.Rule(r".*", qk.W4A16(32))], params, batches[0])
    rtn_model = qk.quantize_model(model, [qk.Rule(r".*", qk.W4A16(32))])
    assert awq_snr > testing.snr_db(np.asarray(rtn_model.apply({"params": rtn}, held_out)), exact) + 0.5
    with pytest.raises(ValueError, match="holds AWQ's factors; quantize the params with method='awq'"):
        _served(model, rules, params, batches[0])


def test_nnx_awq_and_its_misuse():
    batches = [_x(50 + i, mixed=False) for i in range(3)]
    rules = [qk.Rule(r".*", qk.W4A16(32, zero_point=True), weight_method="awq")]
    float_model = NnxMLP(nnx.Rngs(1))
    calib = qk.quantize_model(float_model, rules, "calibrate", batches[0])
    for x in batches[1:]:
        calib(x)
    served = qk.quantize_model(float_model, rules, "serve", batches[0])
    np.testing.assert_array_equal(np.asarray(served.up.kernel_smooth[...]), np.ones(K))  # until quantize_params
    nnx.update(served, qk.quantize_params(float_model, served, calibration=calib, method="awq"))
    assert not np.allclose(np.asarray(served.up.kernel_smooth[...]), 1.0)
    held_out = _x(96, 256, mixed=False)
    assert testing.snr_db(np.asarray(served(held_out)), np.asarray(float_model(held_out))) > 20
    with pytest.raises(ValueError, match="static range does not see"):
        qk.quantize_model(NnxMLP(nnx.Rngs(1)), [qk.Rule(r".*", qk.W8A8(static=True), weight_method="awq")], "serve",
                          batches[0])


def test_awq_factors_divide_each_contracting_axis_in_the_kernels_k_order():
    """A DenseGeneral contracting two axes: the served call is (x / s) against the dequantized smoothed kernel,
    s (K,) laid out over (heads, head_dim) as the QArray orders K."""
    layer = nn.DenseGeneral(K, axis=(-2, -1))
    batches = [jnp.asarray(testing.activations(np.random.default_rng(60 + i), (8, HEADS, 24), outliers=3))
               for i in range(3)]
    rules = [qk.Rule(r".*", qk.W4A16(32), weight_method="awq")]
    params = layer.init(KEY, batches[0])["params"]
    stats = _calibrated(layer, rules, params, batches)
    qmodel, qparams = _served(layer, rules, params, batches[0], calibration=stats, method="awq")
    s = np.asarray(qparams["kernel_smooth"]).reshape(HEADS, 24)
    x = batches[0]
    kernel = np.asarray(qparams["kernel"].dequantize(jnp.float32))  # (heads, 24, K)
    want = np.einsum("bhd,hdn->bn", np.asarray(x) / s, kernel) + np.asarray(params["bias"])
    np.testing.assert_allclose(np.asarray(qmodel.apply({"params": qparams}, x)), want, rtol=2e-5, atol=2e-4)


def test_nan_in_the_calibration_batches_is_refused():
    model, x = nn.Dense(HIDDEN), _x(70)
    rules = [qk.Rule(r".*", qk.W4A16(32), weight_method="gptq")]
    params = model.init(KEY, x)["params"]
    stats = _calibrated(model, rules, params, [x, x.at[2, 3].set(jnp.nan)])
    with pytest.raises(ValueError, match="calibration inputs contains .* NaN/Inf"):
        _served(model, rules, params, x, calibration=stats, method="gptq")
