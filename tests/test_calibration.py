"""Static-range activations and SmoothQuant: the core numerics (`qkernels.calibration`, static formats)
against their definitions, in every framework port."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import qkernels as qk
from qkernels import calibration, dispatch, reference, testing
from qkernels.numerics import NUMPY_OPS

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None


def ports() -> list:
    out = [pytest.param((NUMPY_OPS, np.asarray), id="numpy")]
    if HAS_TORCH:
        import torch

        from torch_bindings.arrays import TORCH_OPS

        out.append(pytest.param((TORCH_OPS, lambda a: torch.from_numpy(np.ascontiguousarray(a))), id="torch"))
    if HAS_JAX:
        import jax.numpy as jnp

        from jax_bindings.arrays import JAX_OPS

        out.append(pytest.param((JAX_OPS, jnp.asarray), id="jax"))
    return out


def as_np(x) -> np.ndarray:
    return np.asarray(x.detach() if hasattr(x, "detach") else x)


def test_static_recipes_are_values_with_names():
    s = qk.W8A8(static=True)
    assert s.name == "w8a8-static" and s.static and not qk.W8A8.static and s != qk.W8A8
    assert s.tag == qk.W8A8.tag and s.accumulation is qk.Accumulation.INT32
    assert qk.recipe_named("w8a8-static") == s and qk.parse_recipe("w4a8-g64-static") == qk.W4A8(64, static=True)
    assert qk.W4A8(64, static=True).accumulation is qk.Accumulation.INT32_PER_GROUP
    with pytest.raises(ValueError, match="no static-activation variant"):
        qk.parse_recipe("w4a16-g128-static")
    with pytest.raises(TypeError, match="static=1"):
        qk.W8A8(static=1)
    with pytest.raises(ValueError, match="one symmetric scale per tensor"):
        qk.OperandFormat(qtype=qk.int_type(8), granularity=qk.Granularity.ROW, calibration=qk.Calibration.STATIC)


@pytest.mark.parametrize("port", ports())
def test_static_quantize_saturates_and_repeats_the_scale_per_row(port):
    ops, arr = port
    x = testing.activations(np.random.default_rng(0), (3, 5, 40))
    scale = np.float32(np.abs(x).max() / 127 / 3)  # a third of the range: outliers saturate
    q = qk.W8A8(static=True).quantize_lhs(ops, arr(x), arr(scale))
    want = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(as_np(q.qvalue), want)
    assert (np.abs(want) == 127).any()
    np.testing.assert_array_equal(as_np(q.scale), np.full((3, 5), scale, np.float32))


@pytest.mark.parametrize("port", ports())
def test_static_and_dynamic_agree_on_one_row(port):
    """A tensor of one row: its per-tensor range is its row's, so static equals dynamic bit for bit."""
    ops, arr = port
    x = testing.activations(np.random.default_rng(1), (1, 77))
    scale = calibration.static_scale(calibration.batch_range(arr(x), ops), ops)
    s, d = qk.W8A8(static=True).quantize_lhs(ops, arr(x), scale), qk.W8A8.quantize_lhs(ops, arr(x))
    np.testing.assert_array_equal(as_np(s.qvalue), as_np(d.qvalue))
    np.testing.assert_array_equal(as_np(s.scale), as_np(d.scale))


def test_static_refusals_name_the_fix():
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="calibrate it first"):
        qk.W8A8(static=True).quantize_lhs(NUMPY_OPS, x)
    with pytest.raises(ValueError, match="static=True"):
        qk.W8A8.quantize_lhs(NUMPY_OPS, x, np.float32(1))
    with pytest.raises(ValueError, match="finite and > 0"):
        qk.W8A8(static=True).quantize_lhs(NUMPY_OPS, x, np.float32(0))
    with pytest.raises(ValueError, match="one value per tensor"):
        qk.W8A8(static=True).quantize_lhs(NUMPY_OPS, x, np.ones(2, np.float32))
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        qk.W8A8(static=True).quantize_lhs(NUMPY_OPS, x, np.float32(1))
    with pytest.raises(ValueError, match="weight-only"):
        qk.W8A16.quantize_lhs(NUMPY_OPS, x)
    with pytest.raises(ValueError, match="quantize_lhs"):
        dispatch.Problem(recipe=qk.W8A8(static=True), m=2, n=4, k=8, act_dtype="float32", out_dtype="float32",
                         framework="torch", platform="cpu")
    # a float activation handed to the static definition itself is refused too
    w = reference.quantize(np.ones((4, 8), np.float32), qk.W8A8.rhs)
    with pytest.raises(ValueError, match="calibrated scale"):
        reference.qmatmul(np.ones((2, 8), np.float32), w, qk.W8A8(static=True))


@pytest.mark.parametrize("port", ports())
def test_ranges_in_every_port_equal_numpys(port):
    ops, arr = port
    rng = np.random.default_rng(2)
    batches = [testing.activations(rng, (4, 6, 33)) for _ in range(3)]
    for method in calibration.METHODS:
        for per_channel in (False, True):
            obs = calibration.Observer(method=method, percentile=99.0, per_channel=per_channel)
            for b in batches:
                obs.update(arr(b), ops)
            a = np.abs(np.stack(batches)).reshape(3, -1, 33)
            if method == "absmax":
                want = a.max((0, 1)) if per_channel else a.max()
            else:
                per = [np.quantile(b.reshape(-1, 33) if per_channel else b.reshape(-1), 0.99, axis=0) for b in a]
                want = np.max(per, axis=0)
            # absmax is exact; a percentile interpolates in f32, whose rounding differs by port
            np.testing.assert_allclose(as_np(obs.amax), want, rtol=0 if method == "absmax" else 1e-5,
                                       err_msg=f"{method} {per_channel}")
            assert as_np(obs.amax).shape == ((33,) if per_channel else ())
    assert obs.batches == 3


def test_observer_refusals():
    with pytest.raises(ValueError, match="choose one of"):
        calibration.Observer(method="mse")
    with pytest.raises(ValueError, match="percentile=0"):
        calibration.Observer(method="percentile", percentile=0)
    obs = calibration.Observer(per_channel=True)
    with pytest.raises(ValueError, match="seen no batch"):
        obs.scale()
    obs.update(np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="input width changed"):
        obs.update(np.ones((2, 9), np.float32))
    with pytest.raises(ValueError, match="NaN/Inf"):
        obs.update(np.full((2, 8), np.inf, np.float32))


def test_smoothing_factors_follow_the_formula():
    act = np.array([4.0, 0.0, 9.0, 1e12], np.float32)
    w = np.array([1.0, 2.0, 0.0, 1e-12], np.float32)
    s = calibration.smoothing_factors(act, w, alpha=0.5)
    np.testing.assert_allclose(s[0], 2.0)
    assert s[1] == 1 and s[2] == 1 and s[3] == np.float32(calibration.SMOOTHING_CLIP[1])
    with pytest.raises(ValueError, match="alpha=1.5"):
        calibration.smoothing_factors(act, w, alpha=1.5)
    with pytest.raises(ValueError, match="one per input channel"):
        calibration.smoothing_factors(act, w[:3])


def _w8a8(x: np.ndarray, w: np.ndarray, recipe: qk.Recipe = qk.W8A8, input_scale=None) -> np.ndarray:
    lhs = recipe.quantize_lhs(NUMPY_OPS, x, input_scale)
    return reference.qmatmul(lhs, reference.quantize(w, recipe.rhs), recipe)


def test_smoothing_keeps_the_product_and_helps_w8a8_on_outlier_channels():
    rng = np.random.default_rng(3)
    x = testing.activations(rng, (64, 256), outliers=6, outlier_scale=60.0)
    w = testing.weights(rng, (128, 256))
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    s = calibration.smoothing_factors(calibration.batch_range(x, per_channel=True), np.abs(w).max(0), alpha=0.5)
    xs, ws = calibration.smooth_activations(x, s), calibration.smooth_weight(w, s)
    np.testing.assert_allclose(xs.astype(np.float64) @ ws.T, exact, rtol=1e-4, atol=1e-4)
    for recipe in (qk.W8A8, qk.W8A8(static=True)):
        def scale(a):
            return calibration.static_scale(calibration.batch_range(a)) if recipe.static else None
        plain = testing.snr_db(_w8a8(x, w, recipe, scale(x)), exact)
        smoothed = testing.snr_db(_w8a8(xs, ws, recipe, scale(xs)), exact)
        assert smoothed > plain + 3, (recipe.name, plain, smoothed)


def test_static_serving_is_close_to_dynamic_on_realistic_activations():
    """Calibrated on other batches of the same distribution, static W8A8 loses little against dynamic."""
    rng = np.random.default_rng(4)
    w = testing.weights(rng, (96, 128))
    cal = [testing.activations(rng, (32, 128), outliers=0) for _ in range(4)]
    x = testing.activations(rng, (32, 128), outliers=0)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    amax = None
    for b in cal:
        amax = calibration.merge_ranges(amax, calibration.batch_range(b, method="percentile", percentile=99.99))
    static = testing.snr_db(_w8a8(x, w, qk.W8A8(static=True), calibration.static_scale(amax)), exact)
    dynamic = testing.snr_db(_w8a8(x, w), exact)
    assert static >= dynamic - 3 and static > 30, (static, dynamic)
