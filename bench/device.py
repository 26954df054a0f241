"""Hardware detection and the peak table that roofline fractions are computed against.

Accelerator peaks are vendor datasheet numbers for dense (non-sparse) math; this CPU's peaks are
measured once per run by short probes (an f32 matmul; bf16 and int8 matmuls and a memory copy when
PyTorch is installed), so a CPU fraction reads "of what this box achieved in a plain matmul".
"""

from __future__ import annotations

import glob
import os
import platform as _platform
import re
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qkernels.hardware import Peak

__all__ = ["Peak", "Device", "PEAKS", "detect", "probe_cpu", "configure_environment"]


PEAKS: dict[str, Peak] = {
    "A100": Peak(f32=19.5, bf16=312.0, int8=624.0, mem_gbps=2039.0, source="NVIDIA A100 SXM 80GB datasheet"),
    "H100": Peak(f32=67.0, bf16=989.4, int8=1978.9, mem_gbps=3350.0, source="NVIDIA H100 SXM5 datasheet"),
    "H200": Peak(f32=67.0, bf16=989.4, int8=1978.9, mem_gbps=4800.0, source="NVIDIA H200 SXM datasheet"),
    "L4": Peak(f32=30.3, bf16=121.0, int8=242.5, mem_gbps=300.0, source="NVIDIA L4 datasheet"),
    "MI300X": Peak(f32=163.4, bf16=1307.4, int8=2614.9, mem_gbps=5300.0, source="AMD Instinct MI300X datasheet"),
    "TPU v5e": Peak(f32=None, bf16=197.0, int8=394.0, mem_gbps=819.0, source="Google Cloud TPU v5e docs"),
    "TPU v6e": Peak(f32=None, bf16=918.0, int8=1836.0, mem_gbps=1640.0, source="Google Cloud TPU v6e docs"),
    "TPU v5p": Peak(f32=None, bf16=459.0, int8=918.0, mem_gbps=2765.0, source="Google Cloud TPU v5p docs"),
}

# GPU marketing names -> peak key; order matters ('H100' before 'H10', 'L40' is not an 'L4').
_GPU_KEYS = (("H200", "H200"), ("H100", "H100"), ("A100", "A100"), ("MI300X", "MI300X"), (r"\bL4\b", "L4"))
# jax `device_kind` of TPUs -> (peak key, qkernels platform)
_TPU_KINDS = (("v5 lite", "TPU v5e", "tpu:v5e"), ("v5e", "TPU v5e", "tpu:v5e"), ("v6", "TPU v6e", "tpu:v6e"),
              ("v5p", "TPU v5p", "tpu:v5p"), ("v5", "TPU v5p", "tpu:v5p"), ("v4", None, "tpu:v4"))


@dataclass(frozen=True, kw_only=True, slots=True)
class Device:
    """Where the suite runs: `kind` is 'cpu', 'cuda', 'rocm' or 'tpu'; `platform` is qkernels' string."""

    kind: str
    name: str
    platform: str
    peak_key: str | None
    peak: Peak | None
    threads: int

    @property
    def accelerated(self) -> bool:
        return self.kind != "cpu"

    @property
    def slug(self) -> str:
        """File-name part for results, e.g. 'cpu-amd-epyc', 'cuda-h100'."""
        label = self.peak_key or self.name
        return re.sub(r"[^a-z0-9]+", "-", f"{self.kind}-{label}".lower()).strip("-")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["peak"] = asdict(self.peak) if self.peak else None
        return out


def _has_tpu() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def configure_environment() -> None:
    """Before JAX is imported: keep JAX off libtpu's TPU probing on a machine with no TPU.

    With libtpu installed, JAX tries to initialise a TPU first and prints errors on a CPU or GPU box.
    """
    if "JAX_PLATFORMS" not in os.environ and not _has_tpu() and shutil.which("nvidia-smi") is None:
        os.environ["JAX_PLATFORMS"] = "cpu"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _platform.processor() or _platform.machine()


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _best_rate(fn: Any, work: float, seconds: float) -> float:
    """Best `work / time` over repeated calls of fn for about `seconds` (one warm-up call first)."""
    fn()
    best, end = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        fn()
        best = max(best, work / (time.perf_counter() - t0))
        if time.perf_counter() > end:
            return best


def probe_cpu(seconds: float = 0.4) -> Peak:
    """Measure this CPU: f32, bf16 and int8 matmuls through PyTorch (the BLAS the rows use), else an f32
    NumPy matmul; and a memory copy. Best rate over the probe, so a loaded machine lowers it little."""
    n = 2048
    flops = 2.0 * n**3
    big = np.ones(32 * 2**20, np.float32)  # 128 MiB: well beyond any cache
    out = np.empty_like(big)
    mem = _best_rate(lambda: np.copyto(out, big), 2.0 * big.nbytes, seconds) / 1e9
    try:
        import torch
    except ImportError:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        f32 = _best_rate(lambda: a @ a, flops, seconds) / 1e12
        return Peak(f32=f32, bf16=None, int8=None, mem_gbps=mem,
                    source=f"measured this run: {n}^3 f32 NumPy matmul, 128 MiB copy")
    a = torch.randn(n, n)
    f32 = _best_rate(lambda: a @ a, flops, seconds) / 1e12
    ab = a.bfloat16()
    bf16 = _best_rate(lambda: ab @ ab, flops, seconds) / 1e12
    qa = torch.randint(-127, 128, (n, n), dtype=torch.int8)
    int8 = _best_rate(lambda: torch._int_mm(qa, qa), flops, seconds) / 1e12
    return Peak(f32=f32, bf16=bf16, int8=int8, mem_gbps=mem,
                source=f"measured this run: {n}^3 torch matmuls (f32, bf16, int8 _int_mm), 128 MiB copy")


def detect(*, probe: bool = True) -> Device:
    """The best device present: a CUDA/ROCm GPU (via PyTorch or JAX), a TPU (via JAX), else the CPU."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if torch.version.hip:
            arch = torch.cuda.get_device_properties(0).gcnArchName.split(":")[0]
            plat, kind = f"rocm:{arch}", "rocm"
        else:
            major, minor = torch.cuda.get_device_capability(0)
            plat, kind = f"cuda:sm_{major}{minor}", "cuda"
        key = next((k for pat, k in _GPU_KEYS if re.search(pat, name)), None)
        return Device(kind=kind, name=name, platform=plat, peak_key=key, peak=PEAKS.get(key),
                      threads=_threads())
    if _has_tpu():
        import jax

        dev = jax.devices()[0]
        if dev.platform == "tpu":
            kind_str = dev.device_kind.lower()
            key, plat = next(((k, p) for pat, k, p in _TPU_KINDS if pat in kind_str), (None, "tpu:unknown"))
            return Device(kind="tpu", name=dev.device_kind, platform=plat, peak_key=key,
                          peak=PEAKS.get(key) if key else None, threads=_threads())
    threads = _threads()
    return Device(kind="cpu", name=f"{_cpu_name()} ({threads} threads)", platform="cpu", peak_key=None,
                  peak=probe_cpu() if probe else None, threads=threads)
