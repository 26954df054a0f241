"""The hardware table and the backend list agree with each other and with what the code relies on:
device kinds map to archs that have a row, platform strings map to the right config table, every
AOT target is compiled by a listed backend, and every listed backend can register itself."""

from __future__ import annotations

import importlib
import importlib.util
import re

import pytest

from qkernels import backends, hardware


def test_every_device_kind_has_a_known_arch_and_a_unique_name() -> None:
    names = [d.name for d in hardware.DEVICES]
    assert len(names) == len(set(names))
    for d in hardware.DEVICES:
        assert d.arch is None or d.arch in hardware.ARCHES, d
        assert hardware.device(d.name) is d
        assert d.units is None or d.units > 0, d


@pytest.mark.parametrize("name,kind", [
    pytest.param("NVIDIA H100 80GB HBM3", "h100", id="h100-sxm"),
    pytest.param("NVIDIA H100 PCIe", "h100", id="h100-pcie"),
    pytest.param("NVIDIA H200", "h200", id="h200"), pytest.param("NVIDIA A100-SXM4-80GB", "a100", id="a100"),
    pytest.param("NVIDIA A10G", "a10g", id="a10g"), pytest.param("NVIDIA A10", "a10", id="a10"),
    pytest.param("NVIDIA L40S", "l40s", id="l40s"), pytest.param("NVIDIA L40", "l40", id="l40-not-l4"),
    pytest.param("NVIDIA L4", "l4", id="l4"), pytest.param("AMD Instinct MI300X", "mi300x", id="mi300x"),
    pytest.param("TPU v5 lite", "tpu-v5e", id="v5-lite"), pytest.param("TPU v5e", "tpu-v5e", id="v5e"),
    pytest.param("TPU v5", "tpu-v5p", id="v5-is-v5p"), pytest.param("TPU v6 lite", "tpu-v6e", id="v6-lite"),
    pytest.param("TPU v4", "tpu-v4", id="v4"), pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("Some New GPU (rev 2)", "some-new-gpu-rev-2", id="unknown")])
def test_device_kind_of_marketing_names(name: str, kind: str) -> None:
    assert hardware.device_kind(name) == kind


@pytest.mark.parametrize("platform,arch", [
    ("cuda:sm_80", "sm_80"), ("cuda:sm_86", "sm_80"), ("cuda:sm_89", "sm_80"), ("cuda:sm_90", "sm_90"),
    ("cuda:sm_90a", "sm_90"), ("cuda:sm_100", "sm_90"), ("cuda:sm_120", "sm_90"), ("cuda:sm_75", None),
    ("cuda:sm_70", None), ("rocm:gfx942", "gfx942"), ("rocm:gfx90a", None), ("rocm:interpret", None),
    ("tpu:v5e", "v5e"), ("cpu", None)])
def test_table_arch(platform: str, arch: str | None) -> None:
    assert hardware.table_arch(platform) == arch


def test_platform_strings() -> None:
    assert hardware.cuda_platform(9, 0) == "cuda:sm_90"
    assert hardware.rocm_platform("gfx942:sramecc+:xnack-") == "rocm:gfx942"
    assert hardware.tpu_platform("TPU v5 lite") == "tpu:v5e"
    assert hardware.tpu_platform("TPU v4") == "tpu:v4"
    for arch in hardware.ARCHES:
        platform = hardware.arch_platform(arch)
        assert platform == "cpu" if arch == "interpret" else hardware.table_arch(platform) == arch, arch
    with pytest.raises(ValueError, match="'sm_75' is not in the hardware table"):
        hardware.arch_platform("sm_75")


def test_units_prefer_the_part_then_the_arch() -> None:
    assert hardware.units("sm_90", "h100") == 132
    assert hardware.units("sm_80", "l4") == 58
    assert hardware.units("sm_80", "") == hardware.units("sm_80", "some-new-gpu") == 108
    for d in hardware.DEVICES:
        if d.arch in hardware.ARCHES and d.units:
            assert hardware.units(d.arch, d.name) == d.units


def test_on_chip_memory_and_tpu_generations() -> None:
    assert not set(hardware.TPU_GENERATIONS) & set(hardware.TPU_NO_INT8_MXU)
    for g in hardware.TPU_GENERATIONS:
        assert hardware.ARCHES[g].scoped_vmem_bytes >= 16 * 2**20, g
    for name in ("sm_80", "sm_90", "gfx942"):
        assert hardware.ARCHES[name].shared_bytes >= 64 * 1024, name


def test_every_aot_target_is_compiled_by_a_listed_backend() -> None:
    by_backend = {b.name: b for b in backends.BACKENDS}
    for name, t in hardware.AOT_TARGETS.items():
        assert t.name == name and t.arch in hardware.ARCHES, t
        assert t.backend in by_backend and name in by_backend[t.backend].aot_targets, t
        assert (t.gpu is None) != (t.topology is None), f"{name}: a GPU arch or a TPU topology, not both"
        arch = hardware.ARCHES[t.arch]
        assert (arch.shared_bytes if t.gpu else arch.scoped_vmem_bytes), f"{name}: on-chip memory limit missing"
        for kind in t.devices:
            assert hardware.device(kind) is not None and hardware.device(kind).arch == t.arch, (name, kind)
    listed = {n for b in backends.BACKENDS for n in b.aot_targets}
    assert listed == set(hardware.AOT_TARGETS)


def test_aot_cli_targets_come_from_the_table_and_the_backends() -> None:
    from qkernels import aot

    assert set(aot.TARGETS) == set(hardware.AOT_TARGETS)
    for name, module in aot.TARGETS.items():
        assert module == backends.by_name(hardware.AOT_TARGETS[name].backend).module + ".aot"


@pytest.mark.parametrize(("kind", "text"), [
    pytest.param(("cuda", "int8"), "IMMA.16832.S8.S8", id="sm80-imma"),
    pytest.param(("cuda", "int8"), "IGMMA.64x128x32.S8.S8", id="sm90-igmma"),
    pytest.param(("hip", "int8"), "v_mfma_i32_32x32x16_i8", id="gfx942-mfma-i8"),
    pytest.param(("cuda", "16bit"), "HMMA.16816.F32.BF16", id="sm80-hmma"),
    pytest.param(("cuda", "16bit"), "HGMMA.64x128x16.F32.BF16", id="sm90-hgmma"),
    pytest.param(("hip", "16bit"), "v_mfma_f32_32x32x8_bf16", id="gfx942-mfma-bf16"),
    pytest.param(("cuda", "fp8"), "QGMMA.64x128x32.F32.E4M3.E4M3", id="sm90-qgmma-e4m3"),
    pytest.param(("cuda", "fp8"), "QMMA.16832.F32.E4M3.E4M3", id="sm89-qmma-e4m3"),
    pytest.param(("hip", "fp8"), "v_mfma_f32_32x32x16_fp8_fp8", id="gfx942-mfma-fp8")])
def test_mma_patterns(kind: tuple[str, str], text: str) -> None:
    assert re.search(hardware.MMA_PATTERNS[kind], f"  /*0120*/ {text} R4, R8, R12, R4 ;")
    other = ("cuda", "16bit" if kind[1] == "int8" else "int8") if kind[0] == "cuda" else None
    if other:
        assert not re.search(hardware.MMA_PATTERNS[other], text)
    if kind[1] != "fp8":  # no 16-bit or integer MMA passes for an fp8 one
        assert not re.search(hardware.MMA_PATTERNS[(kind[0], "fp8")], text)


def test_fp8_matrix_units() -> None:
    """Which platforms multiply fp8 natively: CUDA sm_89+ and gfx942 (fnuz); no TPU generation with tables."""
    for platform in ("cuda:sm_89", "cuda:sm_90", "cuda:sm_90a", "cuda:sm_100", "rocm:gfx942"):
        assert hardware.fp8_mma_reason(platform) is None, platform
    for platform in ("cuda:sm_80", "cuda:sm_86", "rocm:gfx90a", "cpu", *(f"tpu:{g}" for g in hardware.TPU_GENERATIONS)):
        assert "fp8" in hardware.fp8_mma_reason(platform), platform
    assert hardware.aot_sm(hardware.AOT_TARGETS["sm_89"]) == "cuda:sm_89"
    assert hardware.AOT_TARGETS["sm_89"].shared_bytes < hardware.ARCHES["sm_80"].shared_bytes
    assert hardware.device("h100").peak.compute("fp8") == hardware.device("h100").peak.int8
    assert hardware.device("a100").peak.compute("fp8") is None


def test_backend_list() -> None:
    names = [b.name for b in backends.BACKENDS]
    assert len(names) == len(set(names)) and "reference" in names
    assert all(b.framework in ("torch", "jax", "any") for b in backends.BACKENDS)
    assert {b.tunable for b in backends.BACKENDS if b.tunable} == {"triton", "pallas"}
    with pytest.raises(ValueError, match="unknown backend 'nope'; backends: reference"):
        backends.by_name("nope")


@pytest.mark.parametrize("backend", [pytest.param(b, id=b.name) for b in backends.BACKENDS])
def test_every_backend_module_registers(backend: backends.Backend) -> None:
    if not backend.installed():
        pytest.skip(f"{backend.name} needs {backend.requires}")
    module = importlib.import_module(backend.module)
    assert callable(getattr(module, "register", None)), f"{backend.module} has no register()"
    if backend.aot_targets:
        assert importlib.util.find_spec(f"{backend.module}.aot") is not None
