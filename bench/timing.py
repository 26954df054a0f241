"""Timing: warm-up, then repeated samples; `triton.testing.do_bench` on CUDA/ROCm GPUs.

Every timed callable returns its output; `sync(out)` waits for it (JAX `block_until_ready`,
`torch.cuda.synchronize`), so a sample covers the whole computation and not just its dispatch.
The number of repetitions adapts to a per-case time budget: a call slower than the budget is timed
once (after its warm-up), and the row records how many samples it has.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Samples", "measure"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Samples:
    """Seconds per call, one entry per timed repetition (warm-up excluded)."""

    seconds: tuple[float, ...]
    method: str

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)


def measure(fn: Callable[[], Any], sync: Callable[[Any], None], *, budget_s: float, min_reps: int,
            max_reps: int, gpu: bool) -> tuple[Any, Samples]:
    """Warm up `fn` (compiles, fills caches; its output is returned for the accuracy check), then time it.

    GPU: `triton.testing.do_bench` with `rep` set from the budget, every sample kept.
    Otherwise: wall clock around `sync(fn())`, one sample after another until `budget_s` is spent
    (at least `min_reps`, at most `max_reps` samples), so a slow call gets few samples.
    """
    out = fn()
    sync(out)
    if gpu:
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25, rep=max(20, int(budget_s * 1000)), return_mode="all")
        return out, Samples(seconds=tuple(t / 1e3 for t in ms), method="triton.testing.do_bench")
    seconds: list[float] = []
    start = time.perf_counter()
    while len(seconds) < max_reps and (len(seconds) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        sync(fn())
        seconds.append(time.perf_counter() - t0)
    return out, Samples(seconds=tuple(seconds), method="perf_counter + block_until_ready/synchronize")
