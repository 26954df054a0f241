"""`make device-check DRY=1`: the GPU run's script rehearsed on a CPU, end to end, into a temp folder.

It checks the harness (every step runs or says why not, the files the lent machine must return are
written and no others, the summary tells the steps apart), not speed and not the GPU's results.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import device_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("device-check")
    if shutil.which("make"):
        cmd = ["make", "-s", "device-check", "DRY=1", f"DEVICE_PYTHON={sys.executable}", f"OUT={out}"]
    else:
        cmd = [sys.executable, "-m", "bench.device_check", "--dry", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return {"proc": proc, "out": out, "summary": json.loads((out / "summary.json").read_text())}


def test_dry_run_passes_every_step(dry: dict) -> None:
    steps = {s["name"]: s for s in dry["summary"]["steps"]}
    assert list(steps) == [name for name, _, _ in device_check.STEPS]
    failed = {n: s["reason"] for n, s in steps.items() if s["status"] != "ok"}
    assert dry["proc"].returncode == 0 and not failed, (failed, dry["proc"].stderr[-3000:])
    assert steps["triton-tests"]["reason"].startswith("dry: collected only")
    assert "compute-sanitizer needs the GPU" in steps["sanitizer"]["reason"]
    assert sum(budget for _, budget, _ in device_check.STEPS) <= device_check.TOTAL_S < 8 * 60 + 1


def test_dry_run_writes_the_files_and_nothing_else(dry: dict) -> None:
    written = sorted(p.relative_to(dry["out"]).as_posix() for p in dry["out"].rglob("*") if p.is_file())
    assert written == sorted(device_check.FILES) and len(written) <= 8, written
    assert dry["summary"]["files"] == list(device_check.FILES)
    versions = json.loads((dry["out"] / "versions.json").read_text())
    assert versions["dry"] is True and versions["torch"] and versions["python"]


def test_dry_run_ran_the_small_calls_and_the_tune(dry: dict) -> None:
    log = (dry["out"] / "device-check.log").read_text()
    close = "within tolerance of"
    for recipe, verdict in (("w8a8", "equal to"), ("w8a16", close), ("w4a16-g128", close), ("w4a8-g128", "equal to")):
        assert f"{recipe} triton.interpret.{recipe.split('-')[0]} M=3 N=40 K=256: {verdict} the reference" in log
    table = json.loads((dry["out"] / "tune.json").read_text())
    assert table["entries"] and table["device"] == "cpu"


def test_dry_run_bench_rows(dry: dict) -> None:
    rows = dry["summary"]["bench"]
    assert {r["recipe"] for r in rows} >= {"w8a8", "w4a16-g128"} and all(r["status"] == "ok" for r in rows), rows
    assert "| recipe | shape |" in (dry["out"] / "summary.md").read_text()
    doc = json.loads((dry["out"] / "bench.json").read_text())
    assert {s for s in doc["options"]["shape_ids"]} == {"M4-N64-K96", "M1-N48-K128"}


def test_gpu_plan_has_the_issue_cases_and_picks_up_fp8() -> None:
    plan = device_check.Plan.make(dry=False)
    assert set(plan.bench_shapes.split(",")) == {"4096x4096x4096", "4096x14336x4096", "1x8192x8192", "16x8192x8192"}
    assert plan.bench_recipes()[:2] == ["w8a8", "w4a16-g128"]
    import qkernels

    assert (len(plan.bench_recipes()) > 2) == (getattr(qkernels, "FP8", None) is not None)
    assert plan.tests == ("tests/test_triton_kernels.py", "tests/test_triton_decode.py", "tests/test_torch_gpu.py")


def test_a_failing_step_does_not_stop_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(run, step):
        raise RuntimeError("planted failure")

    def fine(run, step):
        step.status = "ok"

    monkeypatch.setattr(device_check, "STEPS", (("first", 5.0, broken), ("second", 5.0, fine)))
    steps = device_check.check(tmp_path, dry=True, total_s=60)
    assert [(s.name, s.status) for s in steps] == [("first", "failed"), ("second", "ok")]
    assert "planted failure" in steps[0].reason and (tmp_path / "summary.md").exists()


def test_a_step_past_its_budget_is_stopped_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(run, step):
        device_check._finish(step, run.command(step, [sys.executable, "-c", "import time; time.sleep(60)"]), "sleep")

    monkeypatch.setattr(device_check, "STEPS", (("slow", 2.0, slow),))
    (step,) = device_check.check(tmp_path, dry=True, total_s=60)
    assert step.status == "timeout" and step.seconds < 30 and "ran past its budget" in step.reason
    assert "[timed out after" in (tmp_path / "device-check.log").read_text()
