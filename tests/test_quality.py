"""Quality methods of the core (`qkernels.quality`): MSE clipping, GPTQ, AWQ against round-to-nearest."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import qkernels as qk
from qkernels import calibration, quality, reference, testing
from qkernels.formats import QOperand
from qkernels.numerics import quantize_asymmetric, quantize_symmetric

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
@pytest.mark.parametrize("method", ["mse-refit", "hqq"])
def test_refit_stores_the_formats_layout_and_never_loses_to_its_start(fmt, method):
    w = (np.random.default_rng(6).standard_t(4, (64, 200)) * 0.02).astype(np.float32)
    w[3] = 0.0  # an all-zero row: every block of it stays at scale 1, codes 0 (the start's)
    rtn, mse, got = fmt.quantize(w), quality.clip_search(w, fmt), quality.quantize_weight(w, fmt, method=method)
    for a, b in zip(rtn, got):
        assert (a is None) == (b is None) and (a is None or (a.shape, a.dtype) == (b.shape, b.dtype))
    codes = fmt.codes(got, 200)
    assert codes.min() >= fmt.qtype.qmin and codes.max() <= fmt.qtype.qmax
    assert np.all(codes[3] == (0 if got.zero_point is None else got.zero_point[3, ..., None]))
    assert np.all(np.asarray(got.scale)[3] == 1) and np.all(np.asarray(got.scale) > 0)
    pad = [(0, 0), (0, fmt.padded_k(200) - 200)]
    blocks = lambda op, p: (np.abs(fmt.blocks(np.pad(fmt.dequantize(op, 200) - w, pad))) ** p).sum(-1)  # noqa: E731
    if method == "mse-refit":  # least squares from the clip search: no block's squared error grows
        assert np.all(blocks(got, 2) <= blocks(mse, 2))
        assert blocks(got, 2).sum() < blocks(mse, 2).sum()
    else:  # HQQ's objective, sum |e|**0.7, from round to nearest: no block's grows, and it drops overall
        assert np.all(blocks(got, 0.7) <= blocks(rtn, 0.7) * (1 + 1e-6))
        assert blocks(got, 0.7).sum() < (0.99 if fmt.qtype.bits == 4 else 1.0) * blocks(rtn, 0.7).sum()
    zero_steps = quality.refit(w, fmt, start=mse, iters=0)
    for a, b in zip(mse, zero_steps):
        assert a is None or np.array_equal(a, b)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
def test_widen_search_picks_each_blocks_best_widening_and_never_loses_to_rtn(fmt):
    w = (np.random.default_rng(8).standard_t(4, (64, 200)) * 0.02).astype(np.float32)
    w[5] = 0.0  # an all-zero row keeps scale 1, codes 0 (zero point 0)
    got, rtn = quality.quantize_weight(w, fmt, method="mse-wide"), fmt.quantize(w)
    for a, b in zip(rtn, got):
        assert (a is None) == (b is None) and (a is None or (a.shape, a.dtype) == (b.shape, b.dtype))
    pad = [(0, 0), (0, fmt.padded_k(200) - 200)]
    blocks = lambda op: (fmt.blocks(np.pad(fmt.dequantize(op, 200) - w, pad)) ** 2).sum(-1)  # noqa: E731
    # reference: each block on its own, every factor of the grid, the format's quantizer on the widened range
    xb = fmt.blocks(np.pad(w, pad).astype(np.float64))
    want = np.full(xb.shape[:-1], np.inf)
    for alpha in np.linspace(1, 1.2, 11):
        if fmt.zero_point:
            lo, hi = np.minimum(xb.min(-1), 0) * alpha, np.maximum(xb.max(-1), 0) * alpha
            s = np.where(hi > lo, (hi - lo) / 15, 1.0)
            z = np.clip(np.rint(-lo / s), 0, 15)
            dq = (np.clip(np.rint(xb / s[..., None]) + z[..., None], 0, 15) - z[..., None]) * s[..., None]
        else:
            amax = np.abs(xb).max(-1) * alpha
            qmax = fmt.qtype.qmax
            s = np.where(amax > 0, amax / qmax, 1.0)
            dq = np.clip(np.rint(xb / s[..., None]), -qmax, qmax) * s[..., None]
        want = np.minimum(want, ((dq - xb) ** 2).sum(-1))
    np.testing.assert_allclose(blocks(got), want, rtol=1e-4, atol=1e-12)
    assert np.all(blocks(got) <= blocks(rtn))
    if fmt.zero_point:  # the integer zero point leaves room: widening pays on almost every block
        assert blocks(got).sum() < 0.97 * blocks(rtn).sum()
    one = quality.widen_search(w, fmt, grid=1)
    for a, b in zip(rtn, one):
        assert a is None or np.array_equal(a, b)
    assert np.all(fmt.codes(got, 200)[5] == (0 if got.zero_point is None else got.zero_point[5, ..., None]))
    with pytest.raises(ValueError, match="max_widen=0.9"):
        quality.widen_search(w, fmt, max_widen=0.9)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
def test_widen_search_with_importance_minimizes_the_weighted_error(fmt):
    """Weighted by per-channel importance (a few channels 100x the rest), the search's weighted error is
    below the unweighted search's and never above round to nearest's, block by block."""
    rng = np.random.default_rng(9)
    w = (rng.standard_t(4, (64, 200)) * 0.02).astype(np.float32)
    imp = np.ones(200, np.float32)
    imp[rng.choice(200, 12, replace=False)] = 100.0
    pad = [(0, 0), (0, fmt.padded_k(200) - 200)]
    wt = fmt.blocks(np.pad(imp, pad[1]))
    blocks = lambda op: (fmt.blocks(np.pad(fmt.dequantize(op, 200) - w, pad)) ** 2 * wt).sum(-1)  # noqa: E731
    got, plain, rtn = (quality.widen_search(w, fmt, importance=imp), quality.widen_search(w, fmt), fmt.quantize(w))
    assert np.all(blocks(got) <= blocks(rtn) * (1 + 1e-6)) and np.all(blocks(got) <= blocks(plain) * (1 + 1e-6))
    if fmt.qtype.bits == 4:
        assert blocks(got).sum() < 0.97 * blocks(plain).sum()
    ones = quality.widen_search(w, fmt, importance=np.ones(200, np.float32))
    for a, b in zip(plain, ones):
        assert a is None or np.array_equal(a, b)


def test_refit_reaches_the_least_squares_scale_of_its_codes():
    """A block whose codes stop changing ends at the closed-form scale sum(x * q) / sum(q * q)."""
    fmt = qk.W4A16(32).rhs
    w = (np.random.default_rng(7).standard_normal((8, 64)) * 0.02).astype(np.float32)
    op = quality.refit(w, fmt, iters=30)
    q = fmt.blocks(fmt.codes(op, 64).astype(np.float64))
    ls = (fmt.blocks(w.astype(np.float64)) * q).sum(-1) / (q * q).sum(-1)
    np.testing.assert_allclose(op.scale, ls, rtol=1e-5)
    with pytest.raises(ValueError, match="lp_norm=3"):
        quality.refit(w, fmt, lp_norm=3)
    with pytest.raises(ValueError, match="integer codes"):
        quality.refit(w, qk.W8A8(static=True).lhs)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("widen", [False, True], ids=["minmax", "widen"])
def test_gptq_preserves_the_layer_output_better_than_rtn(fmt, act_order, widen):
    cal, held_out, w = _layer(1)
    h, rows = None, 0
    for batch in np.array_split(cal, 3):
        h, rows = quality.hessian_update(h, batch, rows)
    assert rows == len(cal)
    np.testing.assert_allclose(h, 2 * cal.T.astype(np.float64) @ cal / len(cal), rtol=1e-9)
    op = quality.gptq(w, h, fmt, act_order=act_order, widen=widen)
    ref = fmt.quantize(w)
    for a, b in zip(ref, op):
        assert (a is None) == (b is None) and (a is None or (a.shape, a.dtype) == (b.shape, b.dtype))
    codes = fmt.codes(op, 200)
    assert codes.min() >= fmt.qtype.qmin and codes.max() <= fmt.qtype.qmax
    for x, margin in ((cal, 1.0), (held_out, 0.5)):  # the rows it saw (what GPTQ minimizes), then new rows
        exact = x.astype(np.float64) @ w.T
        snr = lambda q: testing.snr_db(x @ _dq(q, fmt, 200).T, exact)  # noqa: E731
        assert snr(op) > snr(ref) + margin, (snr(op), snr(ref))
    if fmt.qtype.integer and fmt.group_size in (None, 64) and not fmt.zero_point:  # served as it is
        recipe = qk.W4A8(64) if fmt.group_size else qk.W8A8
        rq = reference.RefQuantized(qvalue=op.qvalue, scale=op.scale, zero_point=op.zero_point, fmt=fmt, k=200)
        y = reference.qmatmul(held_out[:4], rq, recipe)
        assert testing.snr_db(y, exact[:4]) > 15


@pytest.mark.parametrize("fmt", FORMATS[:3], ids=lambda f: f.describe())
def test_gptq_with_clip_searched_group_scales_beats_rtn_and_clip_search(fmt):
    cal, held_out, w = _layer(5)
    h, _ = quality.hessian_update(None, cal, 0)
    exact = held_out.astype(np.float64) @ w.T
    snr = lambda q: testing.snr_db(held_out @ _dq(q, fmt, 200).T, exact)  # noqa: E731
    both = snr(quality.gptq(w, h, fmt, clip=True))
    assert both > snr(quality.clip_search(w, fmt, importance=np.diag(h))) + 0.5 > snr(fmt.quantize(w)) + 0.5


def _gptq_textbook(w: np.ndarray, h: np.ndarray, fmt, *, damp: float = 0.01, act_order: bool = False,
                   static_groups: bool = False) -> np.ndarray:
    """GPTQ's dequantized weight as the paper states the algorithm, one column at a time with no blocks and no
    Cholesky factor (OBS's update): round column c, move its error onto the columns not yet rounded through
    the inverse Hessian of those columns, then eliminate c from that inverse. Group scales: by the format's
    rule from the group's current weights when its first column is reached; fixed ahead from the original
    weights for per-row formats and act-order (static groups)."""
    n, k = w.shape
    kp = fmt.padded_k(k)
    W, H = np.zeros((n, kp)), np.zeros((kp, kp))
    W[:, :k], H[:k, :k] = w, h
    dead = np.diag(H) == 0
    H[dead, dead], W[:, dead] = 1.0, 0.0
    H += damp * np.mean(np.diag(H)) * np.eye(kp)
    g = fmt.group_size or kp
    fixed = fmt.quantize(W.astype(np.float32)) if act_order or static_groups or fmt.group_size is None else None
    hinv, out = np.linalg.inv(H), np.zeros_like(W)
    for c in (np.argsort(-np.diag(H), kind="stable") if act_order else range(kp)):
        if fixed is not None:
            params, gi = fixed, c // g
        elif c % g == 0:
            params, gi = fmt.quantize(W[:, c:c + g].astype(np.float32)), 0
        s = np.asarray(params.scale, np.float32).reshape(n, -1)[:, gi]
        col = W[:, c].astype(np.float32)
        if params.zero_point is None:
            out[:, c] = quantize_symmetric(col, s, fmt.qtype).astype(np.float64) * s
        else:
            z = np.asarray(params.zero_point).reshape(n, -1)[:, gi]
            out[:, c] = (quantize_asymmetric(col, s, z, fmt.qtype).astype(np.float64) - z) * s
        d = hinv[c, c]
        W -= np.outer((W[:, c] - out[:, c]) / d, hinv[c])  # rows of eliminated columns are 0: rounded ones stay
        hinv -= np.outer(hinv[:, c], hinv[c]) / d
    return out[:, :k]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("order", ["natural", "act-order", "static-groups"])
def test_gptq_equals_the_column_by_column_algorithm(fmt, order):
    """The blocked form (Cholesky factor of H^-1, errors carried across blocks, group scales at each group's
    start) rounds exactly as the textbook loop: same codes, so the same reconstruction error."""
    cal, _, w = _layer(4, n=24, k=136, rows=600)
    h, _ = quality.hessian_update(None, cal, 0)
    kw = {"act_order": order == "act-order", "static_groups": order == "static-groups"}
    op = quality.gptq(w, h, fmt, block=32, **kw)
    np.testing.assert_allclose(_dq(op, fmt, 136), _gptq_textbook(w, h, fmt, **kw), rtol=1e-6, atol=1e-9)
    if order != "natural" and fmt.group_size:  # static groups: every group's parameters from the original weights
        ref = fmt.quantize(w)
        np.testing.assert_array_equal(op.scale, ref.scale)
        if ref.zero_point is not None:
            np.testing.assert_array_equal(op.zero_point, ref.zero_point)


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


@pytest.mark.parametrize("method", ["mse", "mse-wide", "mse-refit", "hqq"])
def test_data_free_codes_are_the_same_in_torch_and_jax(method):
    """Both bindings search concrete weights with the one NumPy definition: identical codes and scales."""
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    w = (np.random.default_rng(5).standard_t(4, (48, 130)) * 0.02).astype(np.float32)
    for recipe in (qk.W4A16(32), qk.W4A16(64, zero_point=True), qk.W8A16):
        t = qk.quantize(torch.from_numpy(w), recipe, method=method)
        j = qk.quantize(jnp.asarray(w), recipe, contracting_axes=(1,), method=method)
        want = quality.quantize_weight(w, recipe.rhs, method=method)
        for got in (t.operand(), j.operand()):
            for a, b in zip(got, want):
                assert (a is None) == (b is None)
                if b is not None:
                    np.testing.assert_array_equal(np.asarray(a), b)
    import jax

    # under jit the same definition runs in jnp; XLA may fuse the f32 error sums differently, so near-ties can
    # pick another shrink factor for a group (about 1 group in 10 here): the reconstruction error is as low
    fmt = qk.W4A16(32).rhs
    traced = jax.jit(lambda x: qk.quantize(x, qk.W4A16(32), contracting_axes=(1,), method="mse"))(jnp.asarray(w))
    err = lambda op: float(((_dq(op, fmt, 130) - w) ** 2).sum())  # noqa: E731
    ops = QOperand(*(None if a is None else np.asarray(a) for a in traced.operand()))
    assert err(ops) <= 1.01 * err(quality.clip_search(w, fmt)) < err(fmt.quantize(w))
    traced = jax.jit(lambda x: qk.quantize(x, qk.W4A16(32), contracting_axes=(1,), method="mse-refit"))(jnp.asarray(w))
    ops = QOperand(*(None if a is None else np.asarray(a) for a in traced.operand()))
    assert err(ops) <= 1.01 * err(quality.quantize_weight(w, fmt, method="mse-refit")) < err(fmt.quantize(w))


def test_rules_and_quantize_params_take_the_weight_method():
    from jax_bindings.rules import Rule

    assert Rule(".*", qk.W4A16(128), weight_method="mse").weight_method == "mse"
    assert Rule(".*", qk.W4A16(128), weight_method="gptq").weight_method == "gptq"  # from calibration (JAX GPTQ)
    with pytest.raises(ValueError, match="weight_method='smoothquant'"):
        Rule(".*", qk.W4A16(128), weight_method="smoothquant")


def test_quality_report_merges_runs_and_a_rerun_replaces_its_rows(tmp_path):
    from bench import quality as report

    sec = {"model": "m", "package": "p", "metric": "x", "description": "d", "baseline": {}}
    def row(method: str, v: float) -> dict:
        return {"recipe": "w4a16-g128", "library": "qkernels", "method": method, "mean_cosine": v}

    runs = [{"date": "d", "versions": {}, "total_s": 1.0, "int4_range": "", "sections": [dict(sec, rows=rows)]}
            for rows in ([row("rtn", 0.9), row("gptq", 0.5)], [row("gptq", 0.95), row("awq", 0.97)])]
    paths = []
    for i, run in enumerate(runs):
        paths.append(str(tmp_path / f"{i}.json"))
        (tmp_path / f"{i}.json").write_text(json.dumps(run))
    out = report.merged(paths)
    assert [(r["method"], r["mean_cosine"]) for r in out["sections"][0]["rows"]] == [
        ("rtn", 0.9), ("gptq", 0.95), ("awq", 0.97)]
    assert out["total_s"] == 2.0
    runs[1]["sections"][0]["rows"].append(dict(row("mse", 0.92), recipe="w8a8"))  # a recipe of its own: at the end
    runs[0]["sections"][0]["rows"].append(dict(row("rtn", 0.8), library="torchao"))
    runs[0]["sections"][0]["rows"].append(dict(row("rtn", 0.99), recipe="w8a8"))
    for i, run in enumerate(runs):
        (tmp_path / f"{i}.json").write_text(json.dumps(run))
    assert [(r["recipe"], r["library"], r["method"]) for r in report.merged(paths)["sections"][0]["rows"]] == [
        ("w4a16-g128", "qkernels", "rtn"), ("w4a16-g128", "qkernels", "gptq"), ("w4a16-g128", "qkernels", "awq"),
        ("w4a16-g128", "torchao", "rtn"), ("w8a8", "qkernels", "rtn"), ("w8a8", "qkernels", "mse")]
    runs[1]["sections"][0]["description"] = "other"
    (tmp_path / "1.json").write_text(json.dumps(runs[1]))
    with pytest.raises(SystemExit, match="evaluated differently"):
        report.merged(paths)


def test_awq_from_row_statistics_is_awq_on_the_rows():
    """awq_gram (X^T X / R and mean |x|, what JAX sums under jit) chooses what awq chooses from the rows."""
    rng = np.random.default_rng(3)
    x = testing.activations(rng, (256, 96), outliers=4)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    fmt = qk.W4A16(32).rhs
    op, s = quality.awq(w, x, fmt)
    x64 = x.astype(np.float64)
    op2, s2 = quality.awq_gram(w, x64.T @ x64 / len(x), np.abs(x64).mean(0), fmt)
    np.testing.assert_allclose(s2, s, rtol=1e-6)
    assert np.array_equal(op2.qvalue, op.qvalue) and np.allclose(op2.scale, op.scale)


def test_perplexity_ratio_interval_and_rows_without_it():
    from bench import quality as report

    base = np.random.default_rng(0).exponential(3.0, 400)
    assert report.ratio_interval(base + 0.1, base) == [round(math.exp(0.1) - 1, 4)] * 2  # no spread: a point
    lo, hi = report.ratio_interval(base + np.random.default_rng(1).normal(0.1, 1.0, 400), base)
    assert lo < math.exp(0.1) - 1 < hi and hi - lo > 0.1
    sec = {"model": "m", "package": "p", "metric": "x", "description": "d", "baseline": {},
           "rows": [{"recipe": "w4a16-g128", "library": "qkernels", "method": "rtn", "perplexity": 30.0,
                     "vs_fp32": 0.25, "quantize_s": 1.0},
                    {"recipe": "w4a16-g128", "library": "qkernels", "method": "gptq", "perplexity": 26.0,
                     "vs_fp32": 0.08, "vs_fp32_95": [0.04, 0.12], "quantize_s": 9.0}]}
    text = report.markdown({"date": "d", "versions": {}, "total_s": 1.0, "int4_range": "", "sections": [sec]})
    assert "| rtn | 30.00 | +25.0% | - | 1.0 |" in text and "| gptq | 26.00 | +8.0% | +4.0% .. +12.0% | 9.0 |" in text
