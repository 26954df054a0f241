"""The Triton kernels as a `qkernels.tuning.Tunable`: which config a call runs, and how to time one.

Configs come from `qkernels.tuning.choose(problem, "triton")` (user cache, shipped table, then
`heuristics.heuristic`); `measure` times one config on the current device for `python -m
qkernels.tune`: CUDA events through `triton.testing.do_bench` on a GPU, wall clock in the
interpreter (where timings say nothing about a GPU, and the table written is the 'cpu' one, which
only the interpreter reads); `device` says which device that is (or, for `--list --device h100`,
which named GPU kind).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import triton

from qkernels import dispatch, hardware, tuning
from qkernels.formats import QOperand
from qkernels.kernels.triton import heuristics
from qkernels.kernels.triton._common import ARCHS, MatmulConfig, device_kind_of, interpreting, platform_of
from qkernels.kernels.triton.fp8 import fp8_matmul
from qkernels.kernels.triton.fp8a16 import fp8a16_matmul
from qkernels.kernels.triton.w4a8 import w4a8_matmul
from qkernels.kernels.triton.w4a16 import w4a16_matmul
from qkernels.kernels.triton.w8a8 import w8a8_matmul
from qkernels.kernels.triton.w8a16 import w8a16_matmul

__all__ = ["TUNABLE", "arch_of_platform", "family_of", "launch", "device"]

BACKEND = "triton"
_GPU_ARCHS = tuple(a for a in ARCHS if a != "interpret")


def arch_of_platform(platform: str) -> str | None:
    """Config-table arch of a dispatch platform (`hardware.table_arch`: 'sm_80' for sm_80..sm_89,
    'sm_90' for sm_90+, 'gfx942'), 'interpret' for the CPU (the interpreter under TRITON_INTERPRET=1),
    or None if the Triton kernels do not run there."""
    arch = "interpret" if platform == "cpu" else hardware.table_arch(platform)
    return arch if arch in ARCHS else None


def family_of(problem: dispatch.Problem) -> str:
    return problem.recipe.tag


def _serves(problem: dispatch.Problem) -> str | None:
    if arch_of_platform(problem.platform) is None:
        return f"no Triton config table for platform {problem.platform}"
    if family_of(problem) not in heuristics.FAMILIES:
        return f"no Triton kernel family for {problem.recipe.name}"
    return None


def _args(problem: dispatch.Problem) -> tuple[str, str, str, int, int, int, int | None]:
    return (family_of(problem), arch_of_platform(problem.platform), problem.device, problem.m, problem.n, problem.k,
            problem.recipe.group_size)


def _heuristic(problem: dispatch.Problem) -> tuple[MatmulConfig, str]:
    return heuristics.heuristic(*_args(problem))


def _candidates(problem: dispatch.Problem) -> tuple[MatmulConfig, ...]:
    return heuristics.candidates(*_args(problem))


def _check(config: MatmulConfig, problem: dispatch.Problem) -> str | None:
    return heuristics.check(config, family_of(problem), problem.m, problem.k, problem.recipe.group_size)


# Each family's launcher on `_inputs`' operands (integer recipes' activations come quantized), by recipe tag:
# (x, w, bias, group size, out dtype, config) -> output.
_LAUNCHERS: dict[str, Callable[..., torch.Tensor]] = {
    "w8a8": lambda x, w, b, g, out, cfg: w8a8_matmul(x.qvalue, x.scale, w.qvalue, w.scale, b, out_dtype=out,
                                                     config=cfg),
    "w4a8": lambda x, w, b, g, out, cfg: w4a8_matmul(x.qvalue, x.scale, w.qvalue, w.scale, b, group_size=g,
                                                     out_dtype=out, config=cfg),
    "w4a16": lambda x, w, b, g, out, cfg: w4a16_matmul(x, w.qvalue, w.scale, w.zero_point, b, group_size=g,
                                                       out_dtype=out, config=cfg),
    "w8a16": lambda x, w, b, g, out, cfg: w8a16_matmul(x, w.qvalue, w.scale, b, out_dtype=out, config=cfg),
    "fp8": lambda x, w, b, g, out, cfg: fp8_matmul(x.qvalue, x.scale, w.qvalue, w.scale, b, out_dtype=out, config=cfg),
    "fp8a16": lambda x, w, b, g, out, cfg: fp8a16_matmul(x, w.qvalue, w.scale, b, out_dtype=out, config=cfg),
}


def launch(problem: dispatch.Problem, inputs: dict[str, Any], config: MatmulConfig) -> torch.Tensor:
    """One call of the family's launcher on pre-built `inputs` (see `_inputs`) with `config`."""
    return _LAUNCHERS[family_of(problem)](inputs["x"], inputs["w"], inputs["bias"], problem.recipe.group_size,
                                          problem.out_dtype, config)


@functools.lru_cache(maxsize=8)
def _inputs(problem: dispatch.Problem) -> dict[str, Any]:
    """Random operands of `problem` on the current device, weights quantized, activations quantized
    beforehand for integer recipes (the timed call is the matmul kernel alone)."""
    from qkernels.kernels.triton import quantize_rows
    from torch_bindings.qtensor import quantize

    device = torch.device("cpu" if interpreting() else "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    act = torch.bfloat16 if problem.act_dtype in ("int8", "float32") else getattr(torch, problem.act_dtype)
    lead = (problem.batch,) if problem.batch is not None else ()
    x = torch.randn(*lead, problem.m, problem.k, generator=gen).to(device, act)
    w = quantize(torch.randn(problem.n, problem.k, generator=gen) * 0.02, problem.recipe)
    w = w.to(device)
    if problem.recipe.lhs is not None:
        q, s = quantize_rows(x, qtype=problem.recipe.lhs.qtype)
        x = QOperand(q, s)
    bias = torch.randn(problem.n, generator=gen).to(device, act) if problem.has_bias else None
    return {"x": x, "w": w, "bias": bias}


def _measure(problem: dispatch.Problem, config: MatmulConfig) -> float:
    """Median seconds per call of `config` on `problem` (GPU: do_bench; interpreter: wall clock)."""
    inputs = _inputs(problem)
    fn: Callable[[], Any] = functools.partial(launch, problem, inputs, config)
    if not interpreting():
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def device(kind: str | None = None) -> tuning.TuningDevice:
    """The GPU configs are tuned on (`kind` None: this machine's; the interpreter's 'cpu' without one),
    or the GPU device kind `kind` ('h100') to list candidates for; raises saying why there is none."""
    if kind is not None:
        row = hardware.device(kind)
        if row is None or row.arch not in _GPU_ARCHS:
            known = sorted(d.name for d in hardware.DEVICES if d.arch in _GPU_ARCHS)
            raise ValueError(f"device {kind!r} is not a known GPU kind; choose from {', '.join(known)}")
        return tuning.TuningDevice(platform=hardware.arch_platform(row.arch), kind=kind, name=kind)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        return tuning.TuningDevice(platform=platform_of(gpu), kind=device_kind_of(gpu),
                                   name=torch.cuda.get_device_name(gpu))
    if interpreting():
        return tuning.TuningDevice(platform="cpu", kind="cpu", name="Triton interpreter on CPU", note=(
            "no GPU; timing the Triton interpreter (TRITON_INTERPRET=1). These timings say nothing about a GPU "
            "and are stored for device 'cpu', which only the interpreter reads."))
    raise RuntimeError("no CUDA/ROCm GPU visible to PyTorch; run this on the GPU you will serve on (or set "
                       "TRITON_INTERPRET=1 to exercise the tuner in the interpreter)")


TUNABLE = tuning.register(tuning.Tunable(
    backend=BACKEND, serves=_serves, parse=MatmulConfig.from_dict, dump=MatmulConfig.to_dict, check=_check,
    heuristic=_heuristic, candidates=_candidates, measure=_measure, device=device))
