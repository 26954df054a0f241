"""Run every case on every shape and turn samples into rows (time, TFLOP/s, GB/s, roofline, speedup, SNR).

A row is a plain JSON-ready dict (its schema is `bench.schema.SCHEMA`). Repetitions adapt to a
whole-run time budget: each case gets `per_case_s` at most, less when the run falls behind, and a
single timed sample (after warm-up) once the budget is spent; `Budget.reduced` counts those cases.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from bench.cases import Case, Data, Unavailable, make_data
from bench.timing import measure
from qkernels import testing
from qkernels.shapes import Shape

__all__ = ["Budget", "run", "add_speedups"]


@dataclass(kw_only=True)
class Budget:
    """Time allowed for the whole sweep, and how it is shared among the cases still to run."""

    total_s: float
    per_case_s: float
    min_reps: int
    max_reps: int
    start: float = field(default_factory=time.perf_counter)
    reduced: int = 0  # cases timed with fewer than min_reps samples because the budget ran out

    def for_next(self, cases_left: int) -> tuple[float, int]:
        """(seconds, minimum repetitions) for the next case."""
        left = self.total_s - (time.perf_counter() - self.start)
        if left <= 0:
            self.reduced += 1
            return 0.0, 1
        return min(self.per_case_s, left / max(cases_left, 1)), self.min_reps

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start


def _json_float(x: float | None) -> float | str | None:
    if x is None or math.isnan(x):
        return None
    return "inf" if math.isinf(x) else float(x)


def _roofline(flops: float, bytes_moved: int, seconds: float, mma: str, device: Any) -> float | None:
    """Achieved FLOP/s over what the roofline allows at this arithmetic intensity."""
    peak = device.peak
    compute = peak.compute(mma) if peak else None
    if not compute or not peak.mem_gbps or not bytes_moved:
        return None
    attainable = min(compute * 1e12, flops / bytes_moved * peak.mem_gbps * 1e9)
    return flops / seconds / attainable


def _row(case: Case, shape: Shape, device: Any) -> dict[str, Any]:
    return {
        "framework": case.framework, "method": case.method, "recipe": case.recipe, "role": case.role,
        "mma": case.mma, "shape": shape.id, "layer": shape.layer, "m": shape.m * (shape.batch or 1),
        "n": shape.n, "k": shape.k, "flops": shape.flops, "status": "ok", "reason": None, "impl": None,
        "samples_s": [], "reps": 0, "median_s": None, "min_s": None, "max_s": None, "timing": None,
        "bytes_moved": None, "tflops": None, "gbps": None, "roofline_frac": None, "speedup": None,
        "speedup_vs": None, "snr_db": None,
    }


def run_case(case: Case, data: Data, device: Any, *, budget_s: float, min_reps: int,
             max_reps: int) -> dict[str, Any]:
    """One row: prepare, warm up, time, measure accuracy. Failures become error/unavailable rows."""
    row = _row(case, data.shape, device)
    try:
        prepared = case.prepare(data, device)
        row["impl"] = prepared.impl
        out, samples = measure(prepared.fn, prepared.sync, budget_s=budget_s, min_reps=min_reps,
                               max_reps=max_reps, gpu=device.kind in ("cuda", "rocm") and case.framework == "torch")
        approx = prepared.to_numpy(out)
        if approx.shape != data.ref.shape:
            raise AssertionError(f"output shape {approx.shape}, expected {data.ref.shape}")
    except Unavailable as e:
        row.update(status="unavailable", reason=str(e))
        return row
    except Exception as e:  # reported in the table and the JSON, never dropped
        last = traceback.extract_tb(e.__traceback__)[-1]
        row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                          f"(at {last.filename.rsplit('/', 1)[-1]}:{last.lineno})")
        return row
    seconds = samples.median
    row.update(
        samples_s=list(samples.seconds), reps=len(samples.seconds), median_s=seconds, min_s=samples.min,
        max_s=samples.max, timing=samples.method, bytes_moved=prepared.bytes_moved,
        tflops=data.shape.flops / seconds / 1e12, gbps=prepared.bytes_moved / seconds / 1e9,
        roofline_frac=_roofline(data.shape.flops, prepared.bytes_moved, seconds, case.mma, device),
        snr_db=_json_float(testing.snr_db(approx, data.ref)))
    return row


def add_speedups(rows: list[dict[str, Any]], float_recipe: str) -> None:
    """speedup = time of the framework's float row (`float_recipe`: 'f32' on CPU, 'bf16' elsewhere)
    on the same shape / time of the row."""
    base = {(r["framework"], r["shape"]): r for r in rows
            if r["role"] == "float" and r["recipe"] == float_recipe and r["status"] == "ok"}
    for r in rows:
        b = base.get((r["framework"], r["shape"]))
        if b is not None and r["status"] == "ok":
            r["speedup"] = b["median_s"] / r["median_s"]
            r["speedup_vs"] = f"{b['method']} {b['recipe']}"


def run(device: Any, shapes: tuple[Shape, ...], cases: list[Case], budget: Budget,
        progress: Any = None) -> list[dict[str, Any]]:
    """Every case on every shape: one framework after the other, then shape by shape.

    Frameworks do not interleave: PyTorch's OpenMP workers and XLA's thread pool keep spinning after
    a call, and on a small CPU the other framework's idle-but-spinning threads slow the next call.
    """
    rows: list[dict[str, Any]] = []
    total = len(shapes) * len(cases)
    frameworks = list(dict.fromkeys(c.framework for c in cases))
    for framework, shape in ((f, s) for f in frameworks for s in shapes):
        data = make_data(shape)
        for case in (c for c in cases if c.framework == framework):
            seconds, min_reps = budget.for_next(total - len(rows))
            if progress is not None:
                progress.set_postfix_str(f"{shape.id} {case.method} {case.recipe}", refresh=False)
            rows.append(run_case(case, data, device, budget_s=seconds, min_reps=min_reps,
                                 max_reps=budget.max_reps))
            if progress is not None:
                progress.update(1)
    add_speedups(rows, "bf16" if device.accelerated else "f32")
    return rows
