"""python -m bench: detect the hardware, run every recipe and baseline, print a markdown table.

    python -m bench [--recipes w8a8,w4a16-g128] [--shapes cpu|model|llama3-8b|square|14336x4096,...] [--m 1,16]
                    [--framework jax|torch|both] [--smoke | --quick] [--json FILE] [--plot FILE.png]
                    [--markdown FILE] [--save] [--budget SECONDS]
    python -m bench model [--smoke] [--recipes w8a8,w4a16-g128] [--json FILE]   (bench/jax_model.py)
    python -m bench overhead [--smoke] [--save]   host microseconds per call at 64x64 (bench/overhead.py)
    python -m bench decode [--model smollm2|tiny] [--save]   end-to-end decode tokens/s (bench/decode.py)
    python -m bench compile [--model smollm2|tiny] [--save]   torch.compile first-call time (bench/compile.py)

`--save` writes JSON, markdown and PNG to bench/results/<device>-<date>.* (the committed results).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import device as device_mod
from qkernels import backends

RESULTS = Path(__file__).parent / "results"
DEFAULT_RECIPES = "w8a8,w8a16,w4a16-g128,w4a8-g128,fp8,fp8a16"
# what every backend needs, then the compilers below them and the baselines' and plots' libraries
_PACKAGES = tuple(dict.fromkeys(("qkernels", "numpy", *(r for b in backends.BACKENDS for r in b.requires), "jaxlib",
                                 "libtpu", "torchao", "aqtp", "matplotlib")))


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10)
        out["git"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated recipe names (default {DEFAULT_RECIPES})")
    p.add_argument("--shapes", default=None,
                   help="comma-separated named shape sets of qkernels.shapes (joined with '+'), MxNxK, or NxK "
                        "(out x in features, one shape per --m); default: 'cpu' on a CPU, "
                        "'model+square+decode-sweep' on an accelerator, 'smoke' with --smoke")
    p.add_argument("--m", default=None, metavar="M,M,...",
                   help="row counts: keep only these M of the named sets, and the M of NxK shapes "
                        "(default: every M of the sets; 1,16,64,256,1024,4096 for NxK)")
    p.add_argument("--framework", choices=("jax", "torch", "both"), default="both")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, few samples: checks the harness (CI)")
    mode.add_argument("--quick", action="store_true", help="M in {1, 16, 256} only, shorter time per case")
    p.add_argument("--json", metavar="FILE", help="write every row and sample as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write the speedup-vs-M plot")
    p.add_argument("--markdown", metavar="FILE", help="also write the markdown table to FILE")
    p.add_argument("--save", action="store_true", help=f"write JSON, markdown and PNG to {RESULTS}/<device>-<date>.*")
    p.add_argument("--moe", action="store_true", help="mixture-of-experts grouped matmuls instead (bench/moe_cases.py)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the timed sweep before cases drop to one sample "
                        "(default 420; 120 with --quick; 20 with --smoke)")
    return p.parse_args(argv)


def _select(args: argparse.Namespace, dev: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    from qkernels.formats import parse_recipe
    from qkernels.shapes import parse_shapes

    recipes = tuple(parse_recipe(r) for r in args.recipes.split(",") if r.strip())
    if not recipes:
        raise SystemExit("--recipes is empty; pass e.g. --recipes w8a8,w4a16-g128")
    name = args.shapes or ("smoke" if args.smoke else "model+square+decode-sweep" if dev.accelerated else "cpu")
    try:
        ms = tuple(int(m) for m in args.m.split(",") if m.strip()) if args.m else None
        if ms is not None and (not ms or min(ms) <= 0):
            raise ValueError(f"--m {args.m!r} must list positive row counts, e.g. --m 1,16")
        shapes = parse_shapes(name, ms)
    except ValueError as e:
        raise SystemExit(f"python -m bench: {e}") from None
    if not shapes:
        raise SystemExit(f"python -m bench: no shape of {name!r} has M in {args.m}; choose other --m or --shapes")
    if args.quick:
        shapes = tuple(s for s in shapes if s.m in (1, 16, 256) or "model" not in s.tags and s.m <= 1024)
    return recipes, shapes


def _cases(dev: Any, framework: str, recipes: tuple[Any, ...]) -> list[Any]:
    out = []
    if framework in ("torch", "both"):
        from bench import torch_cases

        out += torch_cases.cases(dev, recipes)
    if framework in ("jax", "both"):
        from bench import jax_cases

        out += jax_cases.cases(dev, recipes)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["model"]:  # python -m bench model: a Flax model quantized by qkernels and by Qwix
        from bench import jax_model

        return jax_model.main(argv[1:])
    if argv[:1] == ["decode"]:  # python -m bench decode: end-to-end tokens/s of a small causal LM
        from bench import decode

        return decode.main(argv[1:])
    if argv[:1] == ["compile"]:  # python -m bench compile: torch.compile time of a quantized model vs float
        from bench import compile as compile_bench

        return compile_bench.main(argv[1:])
    if argv[:1] == ["overhead"]:  # python -m bench overhead: microseconds per call at tiny shapes
        from bench import overhead

        return overhead.main(argv[1:])
    args = _parse(argv)
    if args.moe:
        return __import__("bench.moe_cases", fromlist=["main"]).main(args)
    device_mod.configure_environment()
    from bench import report, runner, targets

    dev = device_mod.detect()
    recipes, shapes = _select(args, dev)
    cases = _cases(dev, args.framework, recipes)
    budget_s = args.budget if args.budget is not None else 20.0 if args.smoke else 120.0 if args.quick else 420.0
    budget = runner.Budget(total_s=budget_s, per_case_s=0.05 if args.smoke else 0.5 if args.quick else 1.5,
                           min_reps=2 if args.smoke else 3, max_reps=5 if args.smoke else 50)
    print(f"bench: {dev.name} ({dev.platform}); {len(shapes)} shapes x {len(cases)} cases; "
          f"sweep budget {budget_s:.0f} s", file=sys.stderr)
    progress = None
    if not args.smoke:
        try:
            from tqdm import tqdm

            progress = tqdm(total=len(shapes) * len(cases), file=sys.stderr, unit="case", dynamic_ncols=True)
        except ImportError:
            pass
    try:
        rows = runner.run(dev, shapes, cases, budget, progress)
    finally:
        if progress is not None:
            progress.close()
    doc = {
        "schema": "qkernels-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev.to_json(),
        "versions": _versions(),
        "options": {"shapes": args.shapes or "default", "m": args.m, "shape_ids": [s.id for s in shapes],
                    "recipes": [r.name for r in recipes], "frameworks": args.framework,
                    "smoke": args.smoke, "quick": args.quick},
        "timing": {"budget_s": budget.total_s, "per_case_s": budget.per_case_s, "min_reps": budget.min_reps,
                   "max_reps": budget.max_reps, "reduced_cases": budget.reduced, "elapsed_s": budget.elapsed_s},
        "rows": rows,
        "targets": targets.evaluate(rows, dev.peak_key or dev.kind),
    }
    text = report.markdown(doc)
    print(text)
    paths = {"json": args.json, "plot": args.plot, "markdown": args.markdown}
    if args.save:
        stem = RESULTS / f"{dev.slug}-{doc['created'][:10]}"
        RESULTS.mkdir(exist_ok=True)
        paths = {"json": f"{stem}.json", "plot": f"{stem}.png", "markdown": f"{stem}.md"}
    if paths["json"]:
        report.write_json(doc, paths["json"])
    if paths["markdown"]:
        Path(paths["markdown"]).write_text(text + "\n")
    if paths["plot"]:
        report.plot(doc, paths["plot"])
    for kind, path in paths.items():
        if path:
            print(f"bench: wrote {kind} {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
