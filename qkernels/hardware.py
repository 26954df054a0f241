"""The one hardware table: device kinds, their compute units, on-chip memory, peaks, kernel-config
arch, matrix-instruction patterns and compile-without-hardware targets.

Used by dispatch's callers (platform strings), `qkernels.tuning` (device kinds of tuned tables), the
Triton heuristics (SM counts), the Pallas configs (scoped VMEM), `python -m qkernels.aot` (targets,
instruction patterns, shared-memory limits) and `bench` (peaks). Peaks are vendor datasheet numbers
for dense (non-sparse) math; None means no native path for that type (f32 on a TPU MXU is emulated).

| platform string | what                                    | config-table arch (`table_arch`) |
|-----------------|-----------------------------------------|----------------------------------|
| 'cpu'           | the host                                | -                                |
| 'cuda:sm_80'    | A100 (sm_86/sm_89 parts: same table)    | 'sm_80'                          |
| 'cuda:sm_90'    | H100 / H200 (and newer: sm_90 table)    | 'sm_90'                          |
| 'rocm:gfx942'   | MI300X                                  | 'gfx942'                         |
| 'tpu:v5e'       | TPU v5e (also v6e, v5p; v4 and older refuse int8) | 'v5e'                  |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "Peak", "DeviceKind", "DEVICES", "ARCHES", "Arch", "AotTarget", "AOT_TARGETS", "MMA_PATTERNS", "TPU_GENERATIONS", "TPU_NO_INT8_MXU",
    "FP8_MMA_MIN_SM", "FP8_MMA_ROCM", "TPU_FP8_MXU", "fp8_mma_reason", "aot_sm",
    "device_kind", "device", "units", "cuda_platform", "rocm_platform", "tpu_platform", "arch_platform",
    "table_arch",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Peak:
    """Dense peak throughput in TFLOP/s (TOP/s for int8) per MMA input type, and memory GB/s."""

    f32: float | None
    bf16: float | None
    int8: float | None
    mem_gbps: float
    source: str
    fp8: float | None = None  # float8 (e4m3) MMA; None: no fp8 tensor cores

    def compute(self, mma: str) -> float | None:
        return {"f32": self.f32, "bf16": self.bf16, "int8": self.int8, "fp8": self.fp8}[mma]


@dataclass(frozen=True, kw_only=True, slots=True)
class Arch:
    """A kernel-config arch: the tables and heuristics are written per arch, not per part."""

    name: str
    units: int  # SMs / CUs / TensorCores of the arch's typical part (heuristics use the part's own)
    shared_bytes: int | None = None  # GPU: shared memory (LDS) one block may use
    scoped_vmem_bytes: int | None = None  # TPU: the scoped VMEM limit Mosaic compiles against


ARCHES: dict[str, Arch] = {a.name: a for a in (
    Arch(name="sm_80", units=108, shared_bytes=163 * 1024),
    Arch(name="sm_90", units=132, shared_bytes=227 * 1024),
    Arch(name="gfx942", units=304, shared_bytes=64 * 1024),
    Arch(name="interpret", units=4),
    # scoped VMEM measured through libtpu (jax 0.10): v5e 16 MiB, v6e 32 MiB, v5p 16 MiB
    Arch(name="v5e", units=1, scoped_vmem_bytes=16 * 2**20),
    Arch(name="v6e", units=1, scoped_vmem_bytes=32 * 2**20),
    Arch(name="v5p", units=1, scoped_vmem_bytes=16 * 2**20),
)}
TPU_GENERATIONS = ("v5e", "v6e", "v5p")
"""TPU generations with an int8 MXU path and Pallas config tables."""
TPU_NO_INT8_MXU = ("v2", "v3", "v4")
"""TPU generations whose compiler (Mosaic) rejects int8 matmuls (measured for v4 through libtpu)."""
TPU_FP8_MXU: tuple[str, ...] = ()
"""TPU generations with Pallas tables whose MXU multiplies fp8: none. v5e, v6e and v5p multiply bf16 and
int8 (Google's docs list no fp8 MXU before Ironwood, v7, which has no table here), so fp8 recipes are
refused there rather than converted to bf16 behind the caller's back."""
FP8_MMA_MIN_SM = 89
"""CUDA compute capability from which tensor cores multiply float8_e4m3fn (Ada sm_89: `mma.sync ... e4m3`;
Hopper sm_90: `wgmma ... e4m3`); Triton refuses the fp8e4nv type itself below it."""
FP8_MMA_ROCM: dict[str, str] = {"gfx942": "float8_e4m3fnuz"}
"""ROCm archs with an fp8 MFMA, and the encoding it multiplies: MI300 (gfx942) takes e4m3fnuz only (OCP
e4m3fn is emulated there), so the Triton fp8 kernels reinterpret e4m3fn codes as fnuz (`triton/_common.as_fnuz`)."""


def fp8_mma_reason(platform: str) -> str | None:
    """None where the GPU's tensor cores multiply fp8 (sm_89+, gfx942), else why not."""
    kind, _, arch = platform.partition(":")
    if kind == "cuda":
        m = re.fullmatch(r"sm_(\d+)[a-z]?", arch)
        if m and int(m[1]) >= FP8_MMA_MIN_SM:
            return None
        return f"{arch} has no fp8 tensor cores (float8_e4m3fn needs sm_{FP8_MMA_MIN_SM}+: Ada, Hopper)"
    if kind == "rocm":
        return None if arch in FP8_MMA_ROCM else f"{arch} has no fp8 MFMA (gfx942 / MI300 has)"
    if kind == "tpu":
        return None if arch in TPU_FP8_MXU else f"TPU {arch} has no fp8 MXU (none of {', '.join(TPU_GENERATIONS)} has)"
    return f"platform {platform} has no fp8 matrix unit"


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceKind:
    """A part: `name` keys its tuned tables ('h100'); `pattern` matches the name its framework reports."""

    name: str
    pattern: str
    arch: str | None  # config-table arch, None where no kernel table applies
    units: int | None = None
    peak: Peak | None = None


_A100 = Peak(f32=19.5, bf16=312.0, int8=624.0, mem_gbps=2039.0, source="NVIDIA A100 SXM 80GB datasheet")
_H100 = Peak(f32=67.0, bf16=989.4, int8=1978.9, fp8=1978.9, mem_gbps=3350.0, source="NVIDIA H100 SXM5 datasheet")

# Most specific first ('H100' before 'H10'; 'L40' is not an 'L4').
DEVICES: tuple[DeviceKind, ...] = (
    DeviceKind(name="h200", pattern=r"H200", arch="sm_90", units=132, peak=Peak(
        f32=67.0, bf16=989.4, int8=1978.9, fp8=1978.9, mem_gbps=4800.0, source="NVIDIA H200 SXM datasheet")),
    DeviceKind(name="h100", pattern=r"H100", arch="sm_90", units=132, peak=_H100),
    DeviceKind(name="h800", pattern=r"H800", arch="sm_90", units=132),
    DeviceKind(name="a100", pattern=r"A100", arch="sm_80", units=108, peak=_A100),
    DeviceKind(name="a800", pattern=r"A800", arch="sm_80", units=108),
    DeviceKind(name="a10g", pattern=r"A10G", arch="sm_80", units=80),
    DeviceKind(name="a10", pattern=r"\bA10\b", arch="sm_80", units=72),
    DeviceKind(name="l40s", pattern=r"L40S", arch="sm_80", units=142),
    DeviceKind(name="l40", pattern=r"\bL40\b", arch="sm_80", units=142),
    DeviceKind(name="l4", pattern=r"\bL4\b", arch="sm_80", units=58, peak=Peak(
        f32=30.3, bf16=121.0, int8=242.5, fp8=242.5, mem_gbps=300.0, source="NVIDIA L4 datasheet")),
    DeviceKind(name="mi300x", pattern=r"MI300X", arch="gfx942", units=304, peak=Peak(
        f32=163.4, bf16=1307.4, int8=2614.9, fp8=2614.9, mem_gbps=5300.0, source="AMD Instinct MI300X datasheet")),
    DeviceKind(name="mi325x", pattern=r"MI325X", arch="gfx942", units=304),
    DeviceKind(name="mi250", pattern=r"MI250", arch=None, units=104),
    DeviceKind(name="tpu-v5e", pattern=r"TPU v5 ?lite|TPU v5e", arch="v5e", peak=Peak(
        f32=None, bf16=197.0, int8=394.0, mem_gbps=819.0, source="Google Cloud TPU v5e docs")),
    DeviceKind(name="tpu-v6e", pattern=r"TPU v6 ?lite|TPU v6e", arch="v6e", peak=Peak(
        f32=None, bf16=918.0, int8=1836.0, mem_gbps=1640.0, source="Google Cloud TPU v6e docs")),
    DeviceKind(name="tpu-v5p", pattern=r"TPU v5p|TPU v5\b", arch="v5p", peak=Peak(
        f32=None, bf16=459.0, int8=918.0, mem_gbps=2765.0, source="Google Cloud TPU v5p docs")),
    DeviceKind(name="tpu-v4", pattern=r"TPU v4", arch=None),
    DeviceKind(name="tpu-v3", pattern=r"TPU v3", arch=None),
    DeviceKind(name="tpu-v2", pattern=r"TPU v2", arch=None),
)
_BY_NAME = {d.name: d for d in DEVICES}


def device_kind(name: str) -> str:
    """Stable key of a device's tuned table from the name its framework reports.

    | name                                   | kind      |
    |----------------------------------------|-----------|
    | 'NVIDIA H100 80GB HBM3', 'H100 PCIe'   | 'h100'    |
    | 'NVIDIA A100-SXM4-80GB'                | 'a100'    |
    | 'AMD Instinct MI300X'                  | 'mi300x'  |
    | 'TPU v5 lite'                          | 'tpu-v5e' |
    | 'cpu', ''                              | 'cpu', '' |
    | anything else                          | lower-case, runs of other characters -> '-' |
    """
    for d in DEVICES:
        if re.search(d.pattern, name, re.IGNORECASE):
            return d.name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device(kind: str) -> DeviceKind | None:
    """The table row of a device kind ('h100'), None if unknown."""
    return _BY_NAME.get(kind)


def units(arch: str, kind: str = "") -> int:
    """SMs / CUs of a device kind ('h100' -> 132), else the arch's typical part (sm_80: A100's 108)."""
    d = _BY_NAME.get(kind)
    return d.units if d is not None and d.units else ARCHES[arch].units


def cuda_platform(major: int, minor: int) -> str:
    """'cuda:sm_90' from a compute capability."""
    return f"cuda:sm_{major}{minor}"


def rocm_platform(gcn_arch_name: str) -> str:
    """'rocm:gfx942' from torch's `gcnArchName` ('gfx942:sramecc+:xnack-') or JAX's compute capability."""
    return "rocm:" + gcn_arch_name.split(":")[0]


def tpu_platform(device_kind_name: str) -> str:
    """'tpu:v5e' from JAX's `device_kind` ('TPU v5 lite'); 'tpu:<name>' for an unknown generation."""
    kind = device_kind(device_kind_name)
    return f"tpu:{kind.removeprefix('tpu-')}" if kind.startswith("tpu-") else f"tpu:{kind}"


def arch_platform(arch: str) -> str:
    """Platform string of a config-table arch's parts: 'sm_90' -> 'cuda:sm_90', 'gfx942' -> 'rocm:gfx942',
    'v5e' -> 'tpu:v5e', 'interpret' -> 'cpu' (the Triton interpreter runs on the host)."""
    if arch not in ARCHES:
        raise ValueError(f"arch {arch!r} is not in the hardware table; known: {', '.join(ARCHES)}")
    if arch == "interpret":
        return "cpu"
    if arch in TPU_GENERATIONS:
        return f"tpu:{arch}"
    return f"{'rocm' if arch.startswith('gfx') else 'cuda'}:{arch}"


def aot_sm(target: AotTarget) -> str:
    """The platform string a GPU AOT target compiles for: 'cuda:sm_89', 'rocm:gfx942'."""
    backend, arch, _ = target.gpu
    return f"cuda:sm_{arch}" if backend == "cuda" else f"rocm:{arch}"


def table_arch(platform: str) -> str | None:
    """Config-table arch of a platform: sm_80 for sm_80..sm_89, sm_90 for sm_90 and newer, gfx942,
    a TPU generation; None where no table applies (CPU, pre-Ampere GPUs, other ROCm parts)."""
    kind, _, arch = platform.partition(":")
    if kind == "cuda":
        m = re.fullmatch(r"sm_(\d+)\d[a-z]?", arch)
        if not m or int(m[1]) < 8:
            return None
        return "sm_90" if int(m[1]) >= 9 else "sm_80"
    if kind == "rocm":
        return arch if arch.startswith("gfx") and arch in ARCHES else None
    if kind == "tpu":
        return arch or None
    return None


MMA_PATTERNS: dict[tuple[str, str], str] = {
    ("cuda", "int8"): r"\b(?:IMMA|IGMMA)\.\S*S8\S*",
    ("cuda", "16bit"): r"\b(?:HMMA|HGMMA)\.\S+",
    ("hip", "int8"): r"\bv_mfma_i32_\w+_i8\b",
    ("hip", "16bit"): r"\bv_mfma_f32_\w+_(?:bf16|f16)\w*\b",
    ("cuda", "fp8"): r"\b(?:QGMMA|QMMA|HGMMA|HMMA)\.\S*E4M3\S*",  # sm_90: QGMMA...E4M3, sm_89: QMMA...E4M3
    ("hip", "fp8"): r"\bv_mfma_f32_\w+_fp8_fp8\b",
}
"""Matrix instructions the machine code must show per (GPU backend, MMA input kind)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AotTarget:
    """A `python -m qkernels.aot` target: which backend compiles for it and for what.

    GPU: `gpu` is Triton's (backend, arch, warp size); TPU: `topology` is the libtpu topology name.
    `devices`: device kinds whose heuristic picks (decode and model shapes) are compiled, the parts
    deployed on; the arch's other kinds run the same table entries, their SM counts only change splits.
    """

    name: str
    backend: str  # a `qkernels.backends` name
    arch: str  # an ARCHES key
    gpu: tuple[str, int | str, int] | None = None
    topology: str | None = None
    devices: tuple[str, ...] = ()
    shared_bytes: int | None = None  # GPU: where the target's parts have less than its arch's table assumes


AOT_TARGETS: dict[str, AotTarget] = {t.name: t for t in (
    AotTarget(name="sm_80", backend="triton", arch="sm_80", gpu=("cuda", 80, 32), devices=("a100",)),
    # Ada runs the sm_80 tables (same mma.sync), plus the fp8 kernels the sm_80 target cannot compile
    AotTarget(name="sm_89", backend="triton", arch="sm_80", gpu=("cuda", 89, 32), devices=("l4", "l40s"),
              shared_bytes=99 * 1024),  # Ada: 99 KB shared memory per block (A100: 163 KB)
    AotTarget(name="sm_90", backend="triton", arch="sm_90", gpu=("cuda", 90, 32), devices=("h100", "h200")),
    AotTarget(name="gfx942", backend="triton", arch="gfx942", gpu=("hip", "gfx942", 64), devices=("mi300x",)),
    AotTarget(name="tpu-v5e", backend="pallas", arch="v5e", topology="v5e:2x2"),
    AotTarget(name="tpu-v6e", backend="pallas", arch="v6e", topology="v6e:2x2"),
    AotTarget(name="tpu-v5p", backend="pallas", arch="v5p", topology="v5p:2x2x1"),
    AotTarget(name="pallas-sm_80", backend="pallas", arch="sm_80", gpu=("cuda", 80, 32)),
    AotTarget(name="pallas-sm_90", backend="pallas", arch="sm_90", gpu=("cuda", 90, 32)),
)}
