"""Output: the markdown table (stdout), the JSON document, and the speedup-vs-M plot."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

__all__ = ["markdown", "write_json", "plot", "add_output_options", "set_threads", "side_document", "write_outputs"]


def _ms(s: float | None) -> str:
    return "" if s is None else f"{s * 1e3:.3g}"


def _num(x: Any, fmt: str) -> str:
    if x is None:
        return ""
    if x == "inf":
        return "exact"
    return format(x, fmt)


def _row_md(r: dict[str, Any]) -> str:
    what = f"{r['method']} | {r['recipe']}"
    if r["status"] != "ok":
        reason = r["reason"] or ""
        short = reason if len(reason) <= 90 else reason[:87] + "..."
        return f"| {r['shape']} | {what} | **{r['status']}**: {short.replace('|', '/')} |||||||"
    time = f"{_ms(r['median_s'])} ({_ms(r['min_s'])}-{_ms(r['max_s'])})"
    speed = _num(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else "")
    roof = _num(None if r["roofline_frac"] is None else 100 * r["roofline_frac"], ".0f")
    return (f"| {r['shape']} | {what} | {r['impl']} | {time} | {r['reps']} | {_num(r['tflops'], '.3g')} | "
            f"{_num(r['gbps'], '.3g')} | {roof} | {speed} | {_num(r['snr_db'], '.1f')} |")


def markdown(doc: dict[str, Any]) -> str:
    """The whole report: device, peaks, timing notes, one table per framework, targets, failures."""
    dev, timing = doc["device"], doc["timing"]
    lines = [f"# qkernels benchmark: {dev['name']} ({dev['platform']}), {doc['created'][:10]}", ""]
    peak = dev["peak"]
    if peak:
        vals = ", ".join(f"{k} {peak[k]:.3g} TFLOP/s" for k in ("f32", "bf16", "int8") if peak[k])
        lines.append(f"Peaks: {vals}, memory {peak['mem_gbps']:.3g} GB/s ({peak['source']}).")
    else:
        lines.append("Peaks: none known for this device (roofline column empty).")
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v)
    lines += [f"Versions: {versions}.", ""]
    lines.append(
        f"Timing: {doc['rows'][0]['timing'] if doc['rows'] else ''}; warm-up excluded; median (min-max) over "
        f"`n` samples. Repetitions adapt to the time budget ({timing['budget_s']:.0f} s for the sweep, at most "
        f"{timing['per_case_s']:g} s and {timing['max_reps']} samples per case, at least {timing['min_reps']} "
        f"while the budget lasts); {timing['reduced_cases']} case(s) got a single sample because the budget "
        f"ran out. Sweep took {timing['elapsed_s']:.0f} s.")
    lines.append("Speedup is over the framework's float matmul on the same shape "
                 f"({'bf16' if dev['kind'] != 'cpu' else 'f32'}); SNR is each output against the f32 float "
                 "matmul of the same realistic data (normal activations with outlier channels); "
                 "roofline % is achieved over min(peak of the row's MMA type, intensity x memory bandwidth).")
    lines.append("")
    for fw in ("torch", "jax"):
        rows = [r for r in doc["rows"] if r["framework"] == fw]
        if not rows:
            continue
        lines += [f"## {fw}", "",
                  "| shape | method | recipe | ran | ms median (min-max) | n | TFLOP/s | GB/s | roof % | speedup | SNR dB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_row_md(r) for r in rows]
        lines.append("")
    if doc["targets"]:
        lines += ["## Targets on this device", "", "| target | worst speedup | status |", "|---|---|---|"]
        for t in doc["targets"]:
            worst = "" if t["worst_speedup"] is None else f"{t['worst_speedup']:.2f}x"
            lines.append(f"| {t['target']} | {worst} | {t['status']} |")
        lines.append("")
    failed = [r for r in doc["rows"] if r["status"] != "ok"]
    if failed:
        lines += ["## Rows that did not run", ""]
        seen = set()
        for r in failed:
            key = (r["framework"], r["method"], r["recipe"], r["reason"])
            if key not in seen:
                seen.add(key)
                n = sum(1 for f in failed if (f["framework"], f["method"], f["recipe"], f["reason"]) == key)
                lines.append(f"- {r['framework']} {r['method']} {r['recipe']} ({r['status']}, {n} shape(s)): {r['reason']}")
        lines.append("")
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")


def add_output_options(p: Any, what: str) -> None:
    """The options of the side commands (`bench overhead`, `bench decode`): threads and where to write."""
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--markdown", metavar="FILE")
    p.add_argument("--save", action="store_true",
                   help=f"write JSON and markdown to bench/results/{what}-<device>-<date>.*")


def set_threads(args: Any) -> None:
    """Apply `--threads` (torch's intra-op threads) before anything runs."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def side_document(what: str, argv: list[str] | None, rows: list[dict[str, Any]], **fields: Any) -> tuple[dict, str]:
    """A side command's JSON document (machine, date, threads, `fields`, the command line, `rows`) and the
    device kind its `--save` files are named by."""
    import datetime

    import torch

    from bench import device as device_mod

    dev = device_mod.detect()
    doc = {"machine": dev.name, "date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
           **fields, "command": f"python -m bench {what}" + (" " + " ".join(argv) if argv else ""), "rows": rows}
    return doc, dev.kind


def write_outputs(doc: dict[str, Any], text: str, args: Any, what: str, device_kind: str) -> None:
    """Print `text` (markdown) and write it and `doc` (JSON) where `add_output_options`' options say."""
    import sys
    from pathlib import Path

    print(text)
    targets: list[tuple[Path, str | None]] = []
    if args.save:
        stem = Path(__file__).parent / "results" / f"{what}-{device_kind}-{doc['date']}"
        targets += [(stem.with_suffix(".json"), None), (stem.with_suffix(".md"), text)]
    if args.json:
        targets.append((Path(args.json), None))
    if args.markdown:
        targets.append((Path(args.markdown), text))
    for path, body in targets:
        if body is None:
            write_json(doc, str(path))
        else:
            path.write_text(body)
        print(f"wrote {path}", file=sys.stderr)


def plot(doc: dict[str, Any], path: str) -> None:
    """Speedup over the float baseline vs M: one panel per (framework, layer), one line per method/recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in doc["rows"]:
        if r["speedup"] is None or r["role"] == "float" and r["speedup_vs"] == f"{r['method']} {r['recipe']}":
            continue
        layer = r["layer"] or f"N{r['n']}-K{r['k']}"
        panels[(r["framework"], f"{layer} (K={r['k']}, N={r['n']})")][f"{r['method']} {r['recipe']}"].append(
            (r["m"], r["speedup"]))
    keys = sorted(panels)
    if not keys:
        raise ValueError("no row has a speedup to plot (every float baseline or every case failed)")
    cols = min(2, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.6 * rows), squeeze=False)
    float_name = "bf16" if doc["device"]["kind"] != "cpu" else "f32"
    labels = sorted({label for key in keys for label in panels[key]})
    colors = {label: plt.get_cmap("tab20")(i % 20) for i, label in enumerate(labels)}  # same line, same color
    for ax, key in zip(axes.flat, keys):
        for label, pts in sorted(panels[key].items()):
            pts.sort()
            style = "-o" if label.startswith("qkernels") else "--s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=4, color=colors[label])
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel(f"speedup over {float_name} float matmul")
        ax.set_title(f"{key[0]}: {key[1]}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"qkernels vs baselines on {doc['device']['name']}, {doc['created'][:10]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
