"""Host overhead: microseconds per call at tiny shapes, where the matmul itself costs next to nothing.

    python -m bench overhead [--smoke] [--n 64] [--k 64] [--m 1] [--json FILE] [--markdown FILE] [--save]

PyTorch: an eager `QLinear` (from `qk.quantize_`) against the `nn.Linear` it replaced, per recipe, with
float32 activations and with bfloat16 ones (the 16-bit activations of the weight-only recipes), under
`torch.no_grad()` as inference runs; the same under `torch.compile` is not timed here (its overhead is
CUDA-graph territory). Each number is the median over repeats of the mean of a block of calls
(`time.perf_counter`); "above" is QLinear minus nn.Linear in the same run. The issue's goal: at most
20 us above `F.linear` per call at 64x64 for every recipe.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench import report

RECIPES = ("w8a8", "w8a16", "w4a16-g32", "w4a16-g32-zp", "w4a8-g32", "fp8", "fp8a16")

__all__ = ["measure_torch", "markdown", "main"]


def _per_call_us(fn: Any, calls: int, repeats: int) -> float:
    for _ in range(max(10, calls // 10)):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def measure_torch(n: int, k: int, m: int, *, calls: int, repeats: int) -> list[dict[str, Any]]:
    import warnings

    import torch

    import qkernels as qk

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        x = torch.randn(m, k, dtype=dtype)
        for name in RECIPES:
            recipe = qk.parse_recipe(name)
            layer = torch.nn.Linear(k, n).to(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", qk.SlowPathWarning)
                q = qk.quantize_(torch.nn.Sequential(torch.nn.Linear(k, n).to(dtype)), recipe).model[0]
                with torch.no_grad():
                    q(x)
                    base = _per_call_us(lambda: layer(x), calls, repeats)
                    quant = _per_call_us(lambda: q(x), calls, repeats)
            rows.append({"framework": "torch", "recipe": name, "dtype": str(dtype).removeprefix("torch."),
                         "m": m, "n": n, "k": k, "float_us": round(base, 2), "qkernels_us": round(quant, 2),
                         "above_us": round(quant - base, 2),
                         "implementation": qk.explain(x, q.weight, q.bias).chosen.name})
    return rows


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Host overhead per call ({doc['machine']}, {doc['date']})", "",
             f"`{doc['command']}`; median of {doc['repeats']} blocks of {doc['calls']} calls, eager, no grad, "
             f"{doc['threads']} torch thread(s).", "",
             "| framework | recipe | activations | M x N x K | float (us) | qkernels (us) | above (us) | implementation |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['framework']} | {r['recipe']} | {r['dtype']} | {r['m']}x{r['n']}x{r['k']} | "
                     f"{r['float_us']:.1f} | {r['qkernels_us']:.1f} | {r['above_us']:.1f} | {r['implementation']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="few calls: checks the harness (CI)")
    report.add_output_options(p, "overhead")
    args = p.parse_args(argv)
    report.set_threads(args)
    calls, repeats = (20, 2) if args.smoke else (2000, 7)
    rows = measure_torch(args.n, args.k, args.m, calls=calls, repeats=repeats)
    doc, kind = report.side_document("overhead", argv, rows, calls=calls, repeats=repeats)
    report.write_outputs(doc, markdown(doc), args, "overhead", kind)
    return 0
