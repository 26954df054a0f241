"""Quality methods of the core (`qkernels.quality`): MSE clipping, GPTQ, AWQ against round-to-nearest."""

from __future__ import annotations

import numpy as np
import pytest

import qkernels as qk
from qkernels import calibration, quality, reference, testing
from qkernels.formats import QOperand

FORMATS = [qk.W4A16(128).rhs, qk.W4A16(32, zero_point=True).rhs, qk.W8A16.rhs, qk.W4A8(64).rhs]


def _dq(op: QOperand, fmt, k: int) -> np.ndarray:
    return fmt.dequantize(QOperand(*op), k)


def _layer(seed: int, n: int = 96, k: int = 200, rows: int = 1024):
    """Correlated activations with outlier channels, and a weight: what a real layer sees."""
    rng = np.random.default_rng(seed)
    mix = (rng.standard_normal((k, k)) * 0.1 + np.eye(k)).astype(np.float32)
    x = (testing.activations(rng, (rows, k), outliers=6, outlier_scale=30.0) @ mix).astype(np.float32)
    return x[: rows // 2], x[rows // 2:], testing.weights(rng, (n, k))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
def test_clip_search_stores_the_formats_layout_and_never_loses_to_rtn(fmt):
    w = (np.random.default_rng(0).standard_t(4, (64, 200)) * 0.02).astype(np.float32)  # heavy tails
    rtn, mse = fmt.quantize(w), quality.clip_search(w, fmt)
    for a, b in zip(rtn, mse):
        assert (a is None) == (b is None) and (a is None or (a.shape, a.dtype) == (b.shape, b.dtype))
    err = lambda op: ((_dq(op, fmt, 200) - w) ** 2).sum()  # noqa: E731
    assert err(mse) <= err(rtn)
    if fmt.qtype.bits == 4:
        assert err(mse) < 0.95 * err(rtn), "4-bit weights with heavy tails gain from clipping"
    one = quality.clip_search(w, fmt, grid=1)  # the grid {1.0}: round to nearest on the full range
    for a, b in zip(rtn, one):
        assert a is None or np.array_equal(a, b)


def test_data_free_method_names_are_checked():
    w = np.ones((4, 64), np.float32)
    assert np.array_equal(quality.quantize_weight(w, FORMATS[0]).qvalue, FORMATS[0].quantize(w).qvalue)
    with pytest.raises(ValueError, match="calibration batches"):
        quality.quantize_weight(w, FORMATS[0], method="gptq")
    with pytest.raises(ValueError, match="grid=0"):
        quality.clip_search(w, FORMATS[0], grid=0)
    with pytest.raises(ValueError, match="static"):
        quality.clip_search(w, qk.W8A8(static=True).lhs)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_preserves_the_layer_output_better_than_rtn(fmt, act_order):
    cal, held_out, w = _layer(1)
    h, rows = None, 0
    for batch in np.array_split(cal, 3):
        h, rows = quality.hessian_update(h, batch, rows)
    assert rows == len(cal)
    np.testing.assert_allclose(h, 2 * cal.T.astype(np.float64) @ cal / len(cal), rtol=1e-9)
    op = quality.gptq(w, h, fmt, act_order=act_order)
    ref = fmt.quantize(w)
    for a, b in zip(ref, op):
        assert (a is None) == (b is None) and (a is None or (a.shape, a.dtype) == (b.shape, b.dtype))
    codes = fmt.codes(op, 200)
    assert codes.min() >= fmt.qtype.qmin and codes.max() <= fmt.qtype.qmax
    exact = held_out.astype(np.float64) @ w.T
    snr = lambda q: testing.snr_db(held_out @ _dq(q, fmt, 200).T, exact)  # noqa: E731
    assert snr(op) > snr(ref) + 0.5, (snr(op), snr(ref))
    if fmt.qtype.integer and fmt.group_size in (None, 64) and not fmt.zero_point:  # served as it is
        recipe = qk.W4A8(64) if fmt.group_size else qk.W8A8
        rq = reference.RefQuantized(qvalue=op.qvalue, scale=op.scale, zero_point=op.zero_point, fmt=fmt, k=200)
        y = reference.qmatmul(held_out[:4], rq, recipe)
        assert testing.snr_db(y, exact[:4]) > 15


def test_gptq_handles_dead_inputs_and_refuses_mismatches():
    cal, _, w = _layer(2, k=128)
    cal[:, 5] = 0  # an input never active: its weight column is dropped, as GPTQ does
    h, _ = quality.hessian_update(None, cal, 0)
    op = quality.gptq(w, h, FORMATS[0])
    assert np.all(FORMATS[0].codes(op, 128)[:, 5] == 0)
    with pytest.raises(ValueError, match="does not match the weight's K=128"):
        quality.gptq(w, h[:64, :64], FORMATS[0])
    with pytest.raises(ValueError, match="one layer's weight"):
        quality.gptq(w[None], h, FORMATS[0])
    with pytest.raises(ValueError, match="per row or per group"):
        quality.gptq(w, h, qk.W8A8(static=True).lhs)


@pytest.mark.parametrize("fmt", FORMATS[:2], ids=lambda f: f.describe())
def test_awq_beats_rtn_on_outlier_channels(fmt):
    cal, held_out, w = _layer(3)
    op, s = quality.awq(w, cal[:256], fmt)
    assert s.shape == (200,) and s.dtype == np.float32 and np.all(s > 0)
    exact = held_out.astype(np.float64) @ w.T
    awq = testing.snr_db(calibration.smooth_activations(held_out, s) @ _dq(op, fmt, 200).T, exact)
    rtn = testing.snr_db(held_out @ _dq(fmt.quantize(w), fmt, 200).T, exact)
    assert awq > rtn + 1, (awq, rtn)
    with pytest.raises(ValueError, match="calibration rows"):
        quality.awq(w, cal[:0], fmt)
