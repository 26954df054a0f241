"""Hardware detection and the peak table that roofline fractions are computed against.

Accelerator peaks are vendor datasheet numbers for dense (non-sparse) math (`qkernels.hardware`); this CPU's peaks are
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

from qkernels import hardware
from qkernels.hardware import Peak

__all__ = ["Peak", "Device", "PEAKS", "detect", "probe_cpu", "configure_environment"]


PEAKS: dict[str, Peak] = {d.name: d.peak for d in hardware.DEVICES if d.peak is not None}
"""Datasheet peaks by device kind ('h100', 'tpu-v5e'), from `qkernels.hardware`."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Device:
    """Where the suite runs: `kind` is 'cpu', 'cuda', 'rocm' or 'tpu'; `platform` is qkernels' string;
    `peak_key` the device kind ('h100') where `PEAKS` has its datasheet peak."""

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


def _accelerator(kind: str, name: str, platform: str) -> Device:
    """A GPU or TPU by the name its framework reports, with its datasheet peak if `PEAKS` has one."""
    key = hardware.device_kind(name)
    key = key if key in PEAKS else None
    return Device(kind=kind, name=name, platform=platform, peak_key=key, peak=PEAKS.get(key), threads=_threads())


def detect(*, probe: bool = True) -> Device:
    """The best device present: a CUDA/ROCm GPU (via PyTorch or JAX), a TPU (via JAX), else the CPU."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if torch.version.hip:
            plat, kind = hardware.rocm_platform(torch.cuda.get_device_properties(0).gcnArchName), "rocm"
        else:
            plat, kind = hardware.cuda_platform(*torch.cuda.get_device_capability(0)), "cuda"
        return _accelerator(kind, name, plat)
    if _has_tpu():
        import jax

        dev = jax.devices()[0]
        if dev.platform == "tpu":
            return _accelerator("tpu", dev.device_kind, hardware.tpu_platform(dev.device_kind))
    threads = _threads()
    return Device(kind="cpu", name=f"{_cpu_name()} ({threads} threads)", platform="cpu", peak_key=None,
                  peak=probe_cpu() if probe else None, threads=threads)
