"""Compile every shipped Pallas TPU config with the real TPU compiler (libtpu, no TPU present)."""

from __future__ import annotations

import importlib.util

import pytest

from qkernels import aot, hardware
from qkernels.kernels.pallas import aot as aot_pallas
from qkernels.kernels.pallas import configs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                       reason="libtpu not installed: pip install 'qkernels[tpu]'"),
]


@pytest.mark.parametrize("target", ["tpu-v5e", "tpu-v6e", "tpu-v5p"])
def test_tpu_configs_compile(target):
    reports = aot.run_checks(target)
    assert reports, f"no Pallas config was checked for {target}"
    failed = [r.row() for r in reports if not r.ok]
    assert not failed, "\n".join(failed)
    grouped = {"pallas.tpu.grouped.w8a8", "pallas.tpu.grouped.w4a16"}  # qkernels.aot.GROUPED's, for TPU targets
    assert {r.kernel for r in reports} == {"pallas.tpu.w8a8", "pallas.tpu.w4a16", "pallas.tpu.w4a8"} | grouped
    compiled = {(r.kernel, r.config.split()[0], r.config.split()[-1]) for r in reports}
    for family in (f for f in configs.TPU_FAMILIES if f is not configs.Family.FP8):  # FP8: refused, not compiled
        for config in configs.tpu_configs(target.removeprefix("tpu-"), family):
            shapes = ("M1-N8192-K8192", "M16-N8192-K8192") if config.max_m else ("M1024-N4096-K4096",)
            for shape in shapes:  # every table entry, decode ones at decode shapes
                assert (f"pallas.tpu.{family.value}", config.name, shape) in compiled, (config.name, shape)
    for r in reports:
        assert r.vmem_bytes and r.memory_analysis["generated_code_size_in_bytes"] > 0
        if r.kernel == "pallas.tpu.w4a16" and target != "tpu-v5p":  # v5p counts its S(1) prefetches as temp
            n, k = (int(p[1:]) for p in r.config.split()[-1].split("-")[1:])
            assert r.memory_analysis["temp_size_in_bytes"] < n * k * 2 // 8, r.row()


def test_dequantized_weight_copy_is_caught():
    hlo = "%c = bf16[1,4096,4096]{2,1,0} convert(%w)\n%p = s8[1,4096,2048]{2,1,0} parameter(1)"
    assert "unpacked or dequantized" in aot_pallas._dequantized_copy(hlo, 4096, 4096)[0]
    assert aot_pallas._dequantized_copy(hlo.splitlines()[1], 4096, 4096) == []


def test_cli_exit_status():
    assert aot.main(["--target", "tpu-v5e"]) == 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton wheel not installed")
@pytest.mark.parametrize("target,int8", [("pallas-sm_80", "IMMA"), ("pallas-sm_90", "IGMMA")])
def test_pallas_gpu_triton_ir_compiles_to_int8_tensor_cores(target, int8):
    """Export for cuda under an abstract GPU (jax 0.11 refuses without one), extract the Triton IR,
    compile for the target: IMMA (sm_80) / IGMMA (sm_90) for the integer recipes. The fp8 families:
    refused on sm_80 (no fp8 MMA before sm_89), with the reason; on sm_90 FP8's fp8 dot runs as f16
    MMAs (`pallas.gpu`'s docstring says why), FP8A16's bf16 dot as HGMMA."""
    reports = aot.run_checks(target)
    failed = [r.row() for r in reports if not r.ok]
    assert not failed, "\n".join(failed)
    by_kernel = {r.kernel: r for r in reports}
    mma = {name: r.mma_instruction or "" for name, r in by_kernel.items()}
    assert mma["pallas.gpu.w8a8"].startswith(int8) and mma["pallas.gpu.w4a8"].startswith(int8)
    fp8 = ("pallas.gpu.fp8", "pallas.gpu.fp8a16")
    deprecation = "deprecates the Pallas Triton backend"
    assert all(deprecation in n for name, r in by_kernel.items() if name not in fp8 for n in r.notes)
    if target == "pallas-sm_80":
        for name in fp8:
            assert mma[name] == "" and any("no fp8 tensor cores" in n for n in by_kernel[name].notes), by_kernel[name]
    else:
        assert mma["pallas.gpu.fp8"].startswith("HMMA.16816.F32")
        assert any("no fp8 MMA" in n for n in by_kernel["pallas.gpu.fp8"].notes)
        assert mma["pallas.gpu.fp8a16"].startswith("HGMMA") and "BF16" in mma["pallas.gpu.fp8a16"]


def test_abstract_gpu_names_the_targets_part():
    for arch, kind in (("sm_80", "NVIDIA A100"), ("sm_90", "NVIDIA H100")):
        device = aot_pallas.abstract_gpu(arch).abstract_device
        assert (device.device_kind, device.platform, device.num_cores) == (kind, "gpu", hardware.ARCHES[arch].units)
