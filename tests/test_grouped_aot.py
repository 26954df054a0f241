"""The grouped (MoE) kernels in `python -m qkernels.aot`: every grouped Triton config compiles for sm_80 /
sm_90 / gfx942 with no GPU, uses the tensor-core instruction of its recipe and does not spill
(`qkernels.kernels.triton.grouped.aot_reports`); the Pallas TPU grouped kernels compile for TPU v5e with
libtpu (`qkernels.kernels.pallas.grouped.aot_reports`); `qkernels.aot.run_checks` lists both."""

from __future__ import annotations

import dataclasses
import importlib.util
import types

import pytest

from qkernels import aot, hardware

MMA = {("sm_80", "int8"): "IMMA.", ("sm_80", "16bit"): "HMMA.", ("sm_90", "int8"): ("IMMA.", "IGMMA."),
       ("sm_90", "16bit"): ("HMMA.", "HGMMA."), ("gfx942", "int8"): "v_mfma_i32_", ("gfx942", "16bit"): "v_mfma_f32_"}


def test_every_triton_and_tpu_target_lists_its_grouped_kernels() -> None:
    want = {name for name, t in hardware.AOT_TARGETS.items() if t.backend == "triton" or t.topology}
    assert set(aot.GROUPED) == want and {"sm_90", "tpu-v5e"} <= want
    assert {aot.GROUPED["sm_90"], aot.GROUPED["tpu-v5e"]} == {"qkernels.kernels.triton.grouped",
                                                              "qkernels.kernels.pallas.grouped"}


def test_run_checks_appends_the_grouped_reports(monkeypatch) -> None:
    dense, grouped = aot.ConfigReport(kernel="w8a8", config="c", target="sm_90"), aot.ConfigReport(
        kernel="grouped-w8a8", config="c", target="sm_90")
    modules = {aot.TARGETS["sm_90"]: types.SimpleNamespace(check=lambda t: [dense]),
               aot.GROUPED["sm_90"]: types.SimpleNamespace(aot_reports=lambda t: [grouped])}
    monkeypatch.setattr(aot.importlib, "import_module", modules.__getitem__)
    assert aot.run_checks("sm_90") == [dense, grouped]


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    """Under the suite's TRITON_INTERPRET=1, `aot_reports` compiles in a child process without it."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    from qkernels.kernels.triton.grouped import aot_reports

    return [dataclasses.asdict(r) for t in ("sm_80", "sm_90", "gfx942") for r in aot_reports(t)]


@pytest.mark.slow
def test_every_grouped_config_compiles_with_tensor_cores_and_no_spills(reports: list[dict]) -> None:
    from qkernels.kernels.triton.aot import SPECIALIZATIONS
    from qkernels.kernels.triton.grouped import CONFIGS

    for target in ("sm_80", "sm_90", "gfx942"):
        arch = "sm_90" if target == "sm_90" else target
        for kernel, mma in (("grouped-w8a8", "int8"), ("grouped-w4a16", "16bit")):
            rows = [r for r in reports if r["target"] == target and r["kernel"] == kernel]
            assert len(rows) == len(CONFIGS[arch]) * len(SPECIALIZATIONS), (target, kernel)
            for r in rows:  # a spill of the unspecialized variant is a note (triton/aot.py), not a problem
                assert not r["problems"] and (r["variant"] != "div16" or r["spill_bytes"] == 0), r
                assert (r["mma_instruction"] or "").startswith(MMA[(target, mma)]), r


@pytest.mark.slow
def test_hopper_prefill_tiles_use_warpgroup_mma(reports: list[dict]) -> None:
    large = [r for r in reports if r["target"] == "sm_90" and not r["config"].startswith("m16")]
    assert large and all(r["mma_instruction"].startswith(("IGMMA.", "HGMMA.")) for r in large), large


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed: pip install 'qkernels[tpu]'")
def test_pallas_grouped_kernels_compile_for_tpu_v5e() -> None:
    from qkernels.kernels.pallas.grouped import AOT_SHAPES, aot_reports

    reports = aot_reports("tpu-v5e")
    assert [(r.kernel, r.config.split()[-1]) for r in reports] == [
        (f"pallas.tpu.grouped.{family}", f"E{e}-M{m}-N{n}-K{k}") for family in ("w8a8", "w4a16")
        for e, n, k, m in AOT_SHAPES]
    for r in reports:
        assert r.ok, r
        assert r.memory_analysis["generated_code_size_in_bytes"] > 0
        assert 0 < r.vmem_bytes <= hardware.ARCHES["v5e"].scoped_vmem_bytes
    assert aot_reports("pallas-sm_90") == []  # no GPU lowering of the grouped Pallas kernels
