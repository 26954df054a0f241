"""The benchmark harness: `python -m bench --smoke` end to end against the JSON schema, and its parts.

Speed is not asserted here (STYLE.md: benchmarks live in bench/); these tests check that every row
is produced, failures are reported rather than dropped, and the metrics are computed as documented.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from bench import runner, targets
from bench.cases import Case, Prepared, Unavailable, make_data
from bench.device import PEAKS, Device, Peak
from bench.schema import SCHEMA
from bench.timing import measure
from qkernels import testing
from qkernels.shapes import SETS, Shape

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("w8a8", "w8a16", "w4a16-g128", "w4a8-g128", "fp8", "fp8a16")
CPU = Device(kind="cpu", name="test cpu", platform="cpu", peak_key=None,
             peak=Peak(f32=1.0, bf16=2.0, int8=4.0, mem_gbps=10.0, source="test"), threads=2)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "bench", "--smoke", "--json", str(out / "out.json"), "--plot",
           str(out / "out.png"), "--markdown", str(out / "out.md")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"python -m bench --smoke failed:\n{proc.stderr[-4000:]}"
    doc = json.loads((out / "out.json").read_text())
    return {"doc": doc, "stdout": proc.stdout, "dir": out}


def test_smoke_json_matches_schema(smoke: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(smoke["doc"], SCHEMA)


def test_smoke_has_every_row_side_by_side(smoke: dict) -> None:
    rows = smoke["doc"]["rows"]
    shapes = {s.id for s in SETS["smoke"]}
    for fw, method in (("torch", "qkernels.linear"), ("jax", "qkernels.dot_general")):
        for recipe in RECIPES:
            got = {r["shape"] for r in rows if (r["framework"], r["method"], r["recipe"]) == (fw, method, recipe)}
            assert got == shapes, f"{fw} {method} {recipe}: rows for {sorted(got)}, expected {sorted(shapes)}"
    for fw, method, recipe in (("torch", "F.linear", "f32"), ("torch", "F.linear", "bf16"),
                               ("torch", "torchao.int8-dynamic", "w8a8"), ("torch", "torch._int_mm+rescale", "w8a8"),
                               ("torch", "torch._scaled_mm", "fp8"),
                               ("jax", "lax.dot_general", "f32"), ("jax", "aqt.int8", "w8a8"),
                               ("jax", "xla.int8-dot+rescale", "w8a8")):
        assert sum(1 for r in rows if (r["framework"], r["method"], r["recipe"]) == (fw, method, recipe)) == len(shapes)


def test_smoke_float_rows_run_and_are_accurate(smoke: dict) -> None:
    for r in smoke["doc"]["rows"]:
        if r["role"] == "float":
            assert r["status"] == "ok", r
            if r["recipe"] == "f32":
                assert r["speedup"] == 1.0
                assert r["snr_db"] == "inf" or r["snr_db"] > 100, r
        if r["status"] == "ok" and r["role"] != "float":
            # int8 activations with outlier channels lose accuracy, but never down to noise
            assert r["snr_db"] == "inf" or r["snr_db"] > 10, r


def test_smoke_qkernels_rows_record_the_implementation(smoke: dict) -> None:
    for r in smoke["doc"]["rows"]:
        if r["role"] == "qkernels" and r["status"] == "ok":
            assert r["impl"] and not r["impl"].startswith("none"), r


def test_smoke_outputs_markdown_and_png(smoke: dict) -> None:
    assert "| shape | method | recipe |" in smoke["stdout"]
    assert (smoke["dir"] / "out.md").read_text().strip() == smoke["stdout"].strip()
    assert (smoke["dir"] / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _valid_row() -> dict:
    row = runner._row(Case(method="m", framework="torch", recipe="w8a8", role="qkernels", mma="int8",
                           prepare=lambda d, dev: None), Shape(m=2, n=3, k=4), CPU)
    row.update(impl="x", samples_s=[1e-3], reps=1, median_s=1e-3, min_s=1e-3, max_s=1e-3, timing="t",
               bytes_moved=10, tflops=1.0, gbps=1.0, snr_db=40.0)
    return row


@pytest.mark.parametrize("change", [
    pytest.param({"samples_s": [], "reps": 0}, id="ok-without-samples"),
    pytest.param({"median_s": None}, id="ok-without-median"),
    pytest.param({"status": "skipped"}, id="unknown-status"),
    pytest.param({"status": "error", "reason": None}, id="error-without-reason"),
    pytest.param({"snr_db": "nan"}, id="snr-string"),
    pytest.param({"extra": 1}, id="unknown-field"),
])
def test_schema_rejects_bad_rows(smoke: dict, change: dict) -> None:
    doc = copy.deepcopy(smoke["doc"])
    doc["rows"] = [_valid_row()]
    jsonschema.validate(doc, SCHEMA)
    doc["rows"][0].update(change)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)


def _case(prepare, method: str = "m") -> Case:
    return Case(method=method, framework="torch", recipe="f32", role="float", mma="f32", prepare=prepare)


def test_run_case_reports_failures_with_reasons() -> None:
    data = make_data(Shape(m=2, n=3, k=4))

    def broken(d, dev):
        raise RuntimeError("kernel exploded")

    def missing(d, dev):
        raise Unavailable("libfoo is not installed")

    def wrong_shape(d, dev):
        return Prepared(fn=lambda: np.zeros((3, 2)), sync=lambda o: None, to_numpy=np.asarray, bytes_moved=1,
                        impl="numpy")

    kw = dict(budget_s=0.0, min_reps=1, max_reps=1)
    err = runner.run_case(_case(broken), data, CPU, **kw)
    assert err["status"] == "error" and "RuntimeError: kernel exploded" in err["reason"]
    un = runner.run_case(_case(missing), data, CPU, **kw)
    assert un["status"] == "unavailable" and un["reason"] == "libfoo is not installed"
    bad = runner.run_case(_case(wrong_shape), data, CPU, **kw)
    assert bad["status"] == "error" and "output shape (3, 2)" in bad["reason"]


def test_run_case_metrics() -> None:
    shape = Shape(m=4, n=8, k=16)
    data = make_data(shape)
    noisy = data.ref + np.float32(0.01) * np.abs(data.ref).max()
    prep = Prepared(fn=lambda: noisy, sync=lambda o: None, to_numpy=np.asarray, bytes_moved=1000, impl="numpy")
    row = runner.run_case(_case(lambda d, dev: prep), data, CPU, budget_s=0.0, min_reps=3, max_reps=10)
    assert row["status"] == "ok" and row["reps"] == 3 and len(row["samples_s"]) == 3
    assert row["min_s"] <= row["median_s"] <= row["max_s"]
    assert row["tflops"] == pytest.approx(2 * 4 * 8 * 16 / row["median_s"] / 1e12)
    assert row["gbps"] == pytest.approx(1000 / row["median_s"] / 1e9)
    assert row["snr_db"] == pytest.approx(testing.snr_db(noisy, data.ref))
    # roofline: 1024 FLOP over 1000 B at 10 GB/s allows 10.24 GFLOP/s (below the 1 TFLOP/s f32 peak)
    assert row["roofline_frac"] == pytest.approx(1024 / row["median_s"] / 10.24e9)


def test_make_data_is_deterministic_and_realistic() -> None:
    a, b = make_data(Shape(m=16, n=32, k=64)), make_data(Shape(m=16, n=32, k=64))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.w, b.w)
    np.testing.assert_allclose(a.ref, a.x @ a.w.T, rtol=1e-6)
    col_amax = np.abs(a.x).max(axis=0)
    assert col_amax.max() > 5 * np.median(col_amax), "activations should have outlier channels"


def test_speedups_are_relative_to_the_float_row_of_the_same_framework_and_shape() -> None:
    def row(fw, method, recipe, role, shape, t, status="ok"):
        return {"framework": fw, "method": method, "recipe": recipe, "role": role, "shape": shape,
                "median_s": t, "status": status, "speedup": None, "speedup_vs": None}

    rows = [row("torch", "F.linear", "f32", "float", "A", 4.0), row("torch", "qk", "w8a8", "qkernels", "A", 1.0),
            row("torch", "F.linear", "f32", "float", "B", 9.0), row("torch", "qk", "w8a8", "qkernels", "B", 3.0),
            row("jax", "qk", "w8a8", "qkernels", "A", 1.0),  # no jax float row: no speedup
            row("torch", "x", "w8a8", "baseline", "A", None, status="error")]
    runner.add_speedups(rows, "f32")
    assert [r["speedup"] for r in rows] == [1.0, 4.0, 1.0, 3.0, None, None]
    assert rows[1]["speedup_vs"] == "F.linear f32"


def test_budget_drops_to_one_sample_when_spent() -> None:
    budget = runner.Budget(total_s=0.0, per_case_s=1.0, min_reps=3, max_reps=10)
    assert budget.for_next(5) == (0.0, 1)
    assert budget.reduced == 1
    roomy = runner.Budget(total_s=100.0, per_case_s=1.0, min_reps=3, max_reps=10)
    seconds, reps = roomy.for_next(10)
    assert 0 < seconds <= 1.0 and reps == 3


def test_measure_respects_repetition_bounds() -> None:
    calls = []
    out, samples = measure(lambda: calls.append(1) or 7, lambda o: None, budget_s=10.0, min_reps=2, max_reps=5,
                           gpu=False)
    assert out == 7 and len(samples.seconds) == 5 and len(calls) == 5 + 1  # one warm-up call
    _, few = measure(lambda: None, lambda o: None, budget_s=0.0, min_reps=2, max_reps=5, gpu=False)
    assert len(few.seconds) == 2


def test_targets_evaluate() -> None:
    def row(m, speedup):
        return {"framework": "torch", "method": "qkernels.linear", "recipe": "w8a8", "m": m, "n": 4096, "k": 4096,
                "speedup": speedup}

    cpu = [t for t in targets.TARGETS if t.devices == ("cpu",) and t.framework == "torch"][0]
    assert cpu.min_speedup == 4.0
    by_text = lambda res: {t["target"]: t for t in res}[cpu.text]  # noqa: E731
    assert by_text(targets.evaluate([row(256, 4.5), row(1, 0.1)], "cpu"))["status"] == "met"
    assert by_text(targets.evaluate([row(256, 3.0)], "cpu"))["status"] == "missed"
    assert by_text(targets.evaluate([row(256, None)], "cpu"))["status"] == "not measured"
    assert by_text(targets.evaluate([], "cpu"))["status"] == "not measured"
    assert all("CPU" not in t["target"] for t in targets.evaluate([], "h100"))
    h100 = {t.text for t in targets.TARGETS if "h100" in t.devices}
    assert h100 and {t["target"] for t in targets.evaluate([], "h100")} == h100


def test_peak_table_covers_the_issue_devices() -> None:
    assert {"a100", "h100", "h200", "l4", "mi300x", "tpu-v5e", "tpu-v6e", "tpu-v5p"} <= set(PEAKS)
    assert all(d in PEAKS or d == "cpu" for t in targets.TARGETS for d in t.devices), "a target names no peak"
    for key, p in PEAKS.items():
        assert p.int8 == pytest.approx(2 * p.bf16, rel=0.01), f"{key}: dense int8 peak is twice bf16"
        assert p.mem_gbps > 0


def test_gpu_targets_hold_on_the_h200_too() -> None:
    gpu = {t.text for t in targets.TARGETS if "h100" in t.devices}
    assert gpu and {t.text for t in targets.TARGETS if "h200" in t.devices} == gpu
    assert {t["target"] for t in targets.evaluate([], "h200")} == gpu


def test_shape_filter_selects_named_sets_by_m_and_builds_nxk_shapes() -> None:
    from bench.__main__ import _parse, _select

    recipes, shapes = _select(_parse(["--recipes", "w8a8", "--shapes", "4096x4096,14336x4096", "--m", "1,16"]), CPU)
    assert [r.name for r in recipes] == ["w8a8"]
    assert [(s.m, s.n, s.k) for s in shapes] == [(1, 4096, 4096), (16, 4096, 4096), (1, 14336, 4096), (16, 14336, 4096)]
    assert {s.layer for s in shapes} == {"llama3-8b.attn_o", "llama3-8b.mlp_up"}
    _, sweep = _select(_parse(["--shapes", "decode-sweep", "--m", "1,16"]), CPU)
    assert sweep and {s.m for s in sweep} == {1, 16} and set(sweep) < set(SETS["decode-sweep"])
    _, square = _select(_parse(["--shapes", "64x32x48"]), CPU)
    assert [(s.m, s.n, s.k) for s in square] == [(64, 32, 48)]
    for argv, message in ((["--shapes", "4096"], "neither MxNxK"), (["--shapes", "smoke", "--m", "2"], "no shape"),
                          (["--shapes", "smoke", "--m", "0"], "positive row counts")):
        with pytest.raises(SystemExit, match=message):
            _select(_parse(argv), CPU)


def test_bench_is_a_package_of_the_distribution() -> None:
    """`pip install .` installs bench beside qkernels, so `python -m bench` runs from any directory."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(where=ROOT, include=find["include"]))
    assert {"bench", "qkernels", "torch_bindings", "jax_bindings"} <= found and "tests" not in found


def test_overhead_decode_and_compile_smoke_runs(tmp_path: Path) -> None:
    """`python -m bench overhead --smoke`, `decode --smoke` and `compile --smoke` (a tiny random Llama) run
    and write their JSON: a row per recipe and dtype, a decode row per variant with tokens/s, and a compile
    row per variant with its first-call time and one graph."""
    import json

    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "overhead", "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["recipe"], r["dtype"]) for r in rows} >= {("w8a8", "float32"), ("w4a16-g32", "bfloat16")}
    assert all(r["qkernels_us"] > 0 and r["implementation"] for r in rows)
    out = tmp_path / "decode.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "decode", "--smoke", "--recipes", "w8a8,w4a16-g128",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    variants = {(r["variant"], r["dtype"]) for r in rows}
    assert {("float", "float32"), ("qkernels w8a8", "float32"), ("qkernels w4a16-g128", "bfloat16")} <= variants
    assert rows[0]["vs_fp32"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "compile", "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["variant"], r["dtype"]) for r in rows} == {("float", "float32"), ("float", "bfloat16"),
                                                          ("qkernels w8a8", "float32")}
    assert all(r["first_call_s"] > 0 and r["graphs"] >= 1 for r in rows)
    quantized = next(r for r in rows if r["variant"] == "qkernels w8a8")
    assert quantized["graph_breaks"] == rows[0]["graph_breaks"], rows  # qk ops add no graph break
