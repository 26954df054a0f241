"""torch.compile of a quantized model: first-call compile time and graph count, beside the float model's.

    python -m bench compile [--model smollm2|tiny] [--recipes w8a8,w4a16-g128] [--backend inductor]
                            [--threads N] [--json FILE] [--markdown FILE] [--save] [--smoke]

The rows are `bench.decode.variants` (the float model in float32 and bfloat16, each recipe through
`qk.quantize_`), each compiled with `torch.compile(model, backend=...)` after `torch._dynamo.reset()`:
"first call" is the wall time of the first forward of the prompt (trace, compile, run), "second
call" a forward of a prompt one token longer (where a shape specialisation recompiles, it shows
here, for the float model too), and "graphs" / "graph breaks" come from dynamo's counters. The
issue's goal: a quantized model compiles within 1.5x of the float model's time, with no recompile
per layer shape (every `qk.linear` is one opaque op, so a model mixing shapes and recipes is one
graph: `tests/test_torch_speed.py` checks that with backend="eager").
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any

from bench import decode, report

__all__ = ["measure", "markdown", "main"]


def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def measure(model_name: str, recipes: list[str], backend: str) -> list[dict[str, Any]]:
    import torch

    import qkernels as qk

    base, ids = decode.load(model_name)
    longer = torch.cat([ids, ids[:, -1:]], dim=1)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", qk.SlowPathWarning)
        for name, dtype, make in decode.variants(recipes):
            if name.startswith("torchao"):
                continue  # compiled torchao is torchao's own story; the goal compares against the float model
            model = make(base)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compiled = torch.compile(model, backend=backend)
            t0 = time.perf_counter()
            compiled(ids)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            compiled(longer)
            second = time.perf_counter() - t0
            rows.append({"model": model_name, "variant": name, "dtype": dtype, "backend": backend,
                         "first_call_s": round(first, 2), "second_call_s": round(second, 2), **_counters()})
            print(f"{name} {dtype}: first call {first:.1f} s, second {second:.1f} s, {rows[-1]['graphs']} graph(s)",
                  file=sys.stderr)
            del model, compiled
    fp32 = rows[0]["first_call_s"]
    for r in rows:
        r["vs_fp32"] = round(r["first_call_s"] / fp32, 2)
    return rows


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# torch.compile time ({doc['machine']}, {doc['date']}, {doc['threads']} torch thread(s))", "",
             f"`{doc['command']}`: one run per row, dynamo reset before each.", "",
             "| model | variant | dtype | backend | first call (s) | vs fp32 | second call, T+1 (s) | graphs | "
             "graph breaks |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['model']} | {r['variant']} | {r['dtype']} | {r['backend']} | {r['first_call_s']:.1f} | "
                     f"{r['vs_fp32']:.2f}x | {r['second_call_s']:.2f} | {r['graphs']} | {r['graph_breaks']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    p.add_argument("--recipes", default="w8a8,w4a16-g128")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, eager, aot_eager)")
    p.add_argument("--smoke", action="store_true", help="the tiny model, backend eager, W8A8 only (CI)")
    report.add_output_options(p, "compile")
    args = p.parse_args(argv)
    report.set_threads(args)
    if args.smoke:
        args.model, args.backend, args.recipes = "tiny", "eager", "w8a8"
    rows = measure(args.model, [r for r in args.recipes.split(",") if r.strip()], args.backend)
    doc, kind = report.side_document("compile", argv, rows)
    report.write_outputs(doc, markdown(doc), args, "compile", kind)
    return 0
