"""Tune kernel configs on this machine's device and save them to the user cache.

    python -m qkernels.tune --recipes w4a16-g128,w8a16,w8a8 --shapes decode
    python -m qkernels.tune --recipes w4a16-g128 --shapes 1x8192x8192,16x8192x8192 --backend triton
    python -m qkernels.tune --recipes w8a8 --shapes 4096x4096 --m 1,2,4,8,16 --list   # no GPU: the default kinds
    python -m qkernels.tune --recipes w4a16-g128 --shapes decode-sweep --list --device h100   # no GPU needed

For each recipe and shape (a named set of `qkernels.shapes`, or `MxNxK`, or `NxK` with `--m`), every
candidate config of the backend (`Tunable.candidates`) is timed on the current device and the fastest
is stored under the problem's key (recipe family, M bucket, N, K, group size) in
`$QKERNELS_CACHE_DIR/tuned/<backend>-<device>.json` (see `qkernels.tuning`), which every later call
on this device kind reads before the shipped table. Existing entries for other keys are kept.
`--out FILE` writes elsewhere; `--ship` writes the package's own table for this device kind,
`qkernels/tuned/<backend>-<device>.json` (commit it: the shipped table, read when a user has no cache).

The backends are the `qkernels.backends` entries with a `tunable`; each one's `tuning.Tunable`
says which device it tunes on (`Tunable.device`), so this module knows no backend by name.
Configs never change numerics, only speed; tuning only ever runs here, never implicitly in a call.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkernels import backends, dispatch, hardware, tuning
from qkernels.formats import Recipe, parse_recipe
from qkernels.shapes import DECODE_M, parse_shapes

__all__ = ["main", "Job", "jobs", "tune"]

TUNABLE_BACKENDS: dict[str, backends.Backend] = {b.name: b for b in backends.BACKENDS if b.tunable}
"""The `qkernels.backends` entries whose kernels take configs ('triton', 'pallas')."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    recipe: Recipe
    m: int
    n: int
    k: int


def jobs(recipes: Sequence[str], shapes: Sequence[str], ms: Sequence[int] = DECODE_M) -> list[Job]:
    """One job per recipe and unbatched shape (`qkernels.shapes.parse_shapes`: sets, MxNxK, NxK x `ms`)."""
    parsed = [parse_recipe(r) for spec in recipes for r in spec.split(",") if r.strip()]
    found = dict.fromkeys((s.m, s.n, s.k) for spec in shapes for s in parse_shapes(spec, None, default_ms=tuple(ms))
                          if s.batch is None)
    return [Job(recipe=r, m=m, n=n, k=k) for r in parsed for m, n, k in found]


def _tunable(backend: backends.Backend) -> tuning.Tunable:
    """The registered `Tunable` of `backend`, after registering the backends of its framework."""
    if not backend.installed():
        raise SystemExit(f"qkernels.tune: backend {backend.name} needs {', '.join(backend.requires)}; install "
                         f"them to tune it")
    backends.load(backend.framework)
    tunable = tuning.tunables().get(backend.tunable)
    if tunable is None or tunable.device is None:
        raise SystemExit(f"qkernels.tune: backend {backend.name} registered no tunable {backend.tunable!r} that "
                         f"names its device; its register() must register a tuning.Tunable with `device`")
    return tunable


def _problem(job: Job, framework: str, platform: str, device: str) -> dispatch.Problem:
    act = "bfloat16"
    return dispatch.Problem(recipe=job.recipe, m=job.m, n=job.n, k=job.k, act_dtype=act, out_dtype=act,
                            framework=framework, platform=platform, device=device)


def tune(backend: str, todo: Sequence[Job], *, out: Path | None = None, list_only: bool = False,
         max_configs: int | None = None, device: str | None = None, ship: bool = False) -> list[dict[str, Any]]:
    """Time every candidate of every job; unless `list_only`, merge the winners into the table at `out`
    (default: the user cache of this device). Returns one row per job. `device` (a device kind, with
    `list_only` only) lists the candidates for a device that is not here."""
    if backend not in TUNABLE_BACKENDS:
        raise SystemExit(f"qkernels.tune: unknown backend {backend!r}; choose from {', '.join(TUNABLE_BACKENDS)}")
    entry = TUNABLE_BACKENDS[backend]
    tunable = _tunable(entry)
    if device is not None and not list_only:
        raise SystemExit("qkernels.tune: --device only goes with --list; timing needs the device itself")
    try:
        here = tunable.device(device)
    except (ValueError, RuntimeError) as e:
        defaults = default_devices(backend, tunable) if list_only and device is None else []
        if not defaults:
            raise SystemExit(f"qkernels.tune: {e}") from None
        print(f"qkernels.tune: {e}\nqkernels.tune: listing for the default device kinds of {backend}: "
              f"{', '.join(d.kind for d in defaults)} (--device to choose one)", file=sys.stderr)
        return [row for d in defaults for row in _list(entry, tunable, d, todo, max_configs)]
    if here.note:
        print(f"qkernels.tune: {here.note}", file=sys.stderr)
    if list_only:
        return _list(entry, tunable, here, todo, max_configs)
    framework, platform, device = entry.framework, here.platform, here.kind
    rows, entries = [], {}
    for job in todo:
        problem, heuristic, configs = _candidates(tunable, _problem(job, framework, platform, device), max_configs)
        timed = sorted((tunable.measure(problem, c), i, c) for i, c in enumerate(configs))
        best_s, _, best = timed[0]
        heuristic_s = next(s for s, _, c in timed if c == heuristic)
        key = tuning.key_of(problem)
        if key not in entries or best_s < entries[key].seconds:
            entries[key] = tuning.Entry(key=key, config=best, seconds=best_s)
        rows.append({"problem": problem.describe(), "best": _name(best), "us": best_s * 1e6,
                     "heuristic": _name(heuristic), "heuristic_us": heuristic_s * 1e6, "configs": len(timed)})
    if not list_only and entries:
        path = out or (tuning.shipped_path(backend, device) if ship else tuning.cache_path(backend, device))
        old = tuning.load_table(path, tunable, device)
        kept = [e for e in (old.entries if old else ()) if e.key not in entries]
        tuning.write_table(path, tunable, device, [*kept, *entries.values()], measured=True, provenance={
            "tool": "python -m qkernels.tune", "device_name": here.name, "platform": platform,
            "date": datetime.date.today().isoformat(), "versions": _versions(entry.requires)})
        print(f"qkernels.tune: wrote {len(entries)} entries ({len(kept)} kept) to {path}")
    return rows


def default_devices(backend: str, tunable: tuning.Tunable) -> list[tuning.TuningDevice]:
    """The device kinds `--list` shows when this machine has none of the backend's devices: the
    parts its AOT targets are deployed on (`hardware.AOT_TARGETS`: h100, h200, a100, mi300x for
    Triton; the TPU generations for Pallas), each only if the backend's tunable knows the kind."""
    kinds = dict.fromkeys(k for t in hardware.AOT_TARGETS.values() if t.backend == backend
                          for k in (t.devices or ((t.name,) if hardware.device(t.name) else ())))
    out = []
    for kind in kinds:
        try:
            out.append(tunable.device(kind))
        except (ValueError, RuntimeError):
            continue
    return out


def _candidates(tunable: tuning.Tunable, problem: dispatch.Problem,
                max_configs: int | None) -> tuple[dispatch.Problem, Any, list[Any]]:
    """The problem checked, its heuristic config and the candidates to time (heuristic first)."""
    why = tunable.serves(problem)
    if why:
        raise SystemExit(f"qkernels.tune: {problem.describe()} cannot be tuned: {why}")
    heuristic, _ = tunable.heuristic(problem)
    configs = list(dict.fromkeys([heuristic, *tunable.candidates(problem)]))[:max_configs]
    return problem, heuristic, [c for c in configs if tunable.check(c, problem) is None]


def _list(entry: backends.Backend, tunable: tuning.Tunable, where: tuning.TuningDevice, todo: Sequence[Job],
          max_configs: int | None) -> list[dict[str, Any]]:
    """One row per job: the candidates `tune` would time on `where`, heuristic first."""
    rows = []
    for job in todo:
        problem, _, configs = _candidates(tunable, _problem(job, entry.framework, where.platform, where.kind),
                                          max_configs)
        rows.append({"device": where.kind, "problem": problem.describe(), "configs": [_name(c) for c in configs]})
    return rows


def _name(config: Any) -> str:
    return getattr(config, "name", None) or config.describe()


def _versions(packages: Sequence[str]) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qkernels.tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--recipes", action="append", required=True, help="recipe names, comma separated (w4a16-g128,w8a8)")
    p.add_argument("--shapes", action="append", required=True,
                   help="shape sets or MxNxK / NxK, comma separated (decode, 1x8192x8192, 8192x8192)")
    p.add_argument("--m", default=",".join(map(str, DECODE_M)), help="row counts for NxK shapes (default 1,2,4,8,16)")
    p.add_argument("--backend", default=next(iter(TUNABLE_BACKENDS)), choices=list(TUNABLE_BACKENDS))
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="table file to update (default: the user cache of this device)")
    where.add_argument("--ship", action="store_true",
                       help="update the table shipped in the package for this device kind (qkernels/tuned/)")
    p.add_argument("--max-configs", type=int, help="time at most this many candidates per problem")
    p.add_argument("--list", action="store_true", help="print the candidates, time nothing, write nothing")
    p.add_argument("--device", help="with --list: a device kind to list for instead of this machine's (h100, tpu-v5e)")
    args = p.parse_args(argv)
    try:
        ms = tuple(int(m) for m in args.m.split(","))
        todo = jobs(args.recipes, args.shapes, ms)
    except ValueError as e:
        p.error(str(e))
    rows = tune(args.backend, todo, out=args.out, list_only=args.list, max_configs=args.max_configs,
                device=args.device, ship=args.ship)
    for r in rows:
        if args.list:
            print(f"{r['device']}: {r['problem']}\n  " + "\n  ".join(r["configs"]))
        else:
            print(f"{r['problem']:<70} best {r['best']:<34} {r['us']:9.1f} us   heuristic {r['heuristic']:<34} "
                  f"{r['heuristic_us']:9.1f} us  ({r['configs']} timed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
