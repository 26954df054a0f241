"""Every grouped Triton config compiles for sm_80 / sm_90 / gfx942 with no GPU, uses the tensor-core
instruction of its recipe and does not spill (`qkernels.kernels.triton.grouped.aot_reports`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

pytestmark = pytest.mark.slow

_CHILD = ("import dataclasses, json, sys; from qkernels.kernels.triton.grouped import aot_reports; "
          "print(json.dumps([dataclasses.asdict(r) for t in sys.argv[1:] for r in aot_reports(t)]))")
MMA = {("sm_80", "int8"): "IMMA.", ("sm_80", "16bit"): "HMMA.", ("sm_90", "int8"): ("IMMA.", "IGMMA."),
       ("sm_90", "16bit"): ("HMMA.", "HGMMA."), ("gfx942", "int8"): "v_mfma_i32_", ("gfx942", "16bit"): "v_mfma_f32_"}


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    done = subprocess.run([sys.executable, "-c", _CHILD, "sm_80", "sm_90", "gfx942"], env=env, capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


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


def test_hopper_prefill_tiles_use_warpgroup_mma(reports: list[dict]) -> None:
    large = [r for r in reports if r["target"] == "sm_90" and not r["config"].startswith("m16")]
    assert large and all(r["mma_instruction"].startswith(("IGMMA.", "HGMMA.")) for r in large), large
