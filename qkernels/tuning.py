"""Kernel configs per call: a tuned table shipped per device kind, the user's tuning cache, heuristics.

A backend whose kernels take a config (block sizes, split-K, kernel variant) registers a `Tunable`.
For a `dispatch.Problem` the config comes from, in this order:

1. the user's cache, `$QKERNELS_CACHE_DIR/tuned/<backend>-<device>.json` (default
   `${XDG_CACHE_HOME:-~/.cache}/qkernels/...`), written by `python -m qkernels.tune` on the user's own
   device: it was measured on exactly this machine, so it overrides the shipped table;
2. the table shipped in the package, `qkernels/tuned/<backend>-<device>.json`;
3. the backend's heuristic (`Tunable.heuristic`), which serves every problem.

An entry is keyed by recipe family, M bucket, N, K and group size (`Key`); `m_bucket` rounds M up to
a power of two, so a table row tuned at M=16 serves 9 <= M <= 16. A table config the backend refuses
for the problem (`Tunable.check`) is skipped. Tables are JSON (never pickle) in the format of
`TABLE_FORMAT`; a file that cannot be read, is not such a table, or belongs to another backend or
device is ignored with a warning, and a bad entry is dropped with a warning: a cache can make a
call slower, never crash it or change its numerics (configs never change numerics).

`choose(problem)` is cached per problem; nothing is timed implicitly: tuning runs only in
`python -m qkernels.tune`. `dispatch.explain` shows the chosen config and where it came from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkernels import dispatch
from qkernels.hardware import device_kind

__all__ = [
    "TABLE_FORMAT", "CACHE_ENV", "M_BUCKETS", "TuningDevice", "Tunable", "Key", "Entry", "Table", "Choice",
    "register", "tunables", "tunable_for", "choose", "device_kind", "m_bucket", "key_of", "shipped_path",
    "cache_path", "load_table", "write_table", "reload",
]

TABLE_FORMAT = "qkernels.tuned/1"
CACHE_ENV = "QKERNELS_CACHE_DIR"
SHIPPED_DIR = Path(__file__).parent / "tuned"
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Row-count buckets of the tables; the last one also serves every M above it."""

def m_bucket(m: int) -> int:
    """The table bucket serving M rows: the smallest bucket >= M (M above the last: the last)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


@dataclass(frozen=True, kw_only=True, slots=True)
class Key:
    """What a table entry is tuned for: recipe family ('w4a16'), M bucket, N, K, group size."""

    family: str
    m: int
    n: int
    k: int
    group_size: int | None = None

    def describe(self) -> str:
        g = f" g{self.group_size}" if self.group_size else ""
        return f"{self.family} M<={self.m} N={self.n} K={self.k}{g}"


def key_of(problem: dispatch.Problem) -> Key:
    recipe = problem.recipe
    return Key(family=recipe.tag, m=m_bucket(problem.m), n=problem.n, k=problem.k, group_size=recipe.group_size)


@dataclass(frozen=True, kw_only=True, slots=True)
class TuningDevice:
    """The device a backend tunes configs on (or lists candidates for): what its table is keyed by."""

    platform: str  # dispatch platform, 'cuda:sm_90'
    kind: str  # device kind naming the table, 'h100' (`qkernels.hardware.device_kind`)
    name: str  # what the framework calls it, recorded in the table's provenance
    note: str = ""  # what the tuner should tell the user about timings taken here, if anything


@dataclass(frozen=True, kw_only=True, slots=True)
class Tunable:
    """A backend whose kernels take configs. Every callable is pure and cheap except `measure`.

    backend:   table name prefix, a `qkernels.backends` entry's `tunable` ('triton', 'pallas').
    serves:    does this problem run on this backend's configurable kernels? (None or why not)
    parse:     JSON object -> config (raises ValueError/TypeError on a bad one); `dump` is its inverse.
    check:     None if `config` can run `problem`, else why not (e.g. a tile straddling a group).
    heuristic: (config, why) for any problem it serves.
    candidates: configs worth timing for a problem (the tuning search space).
    measure:   seconds per call of `config` on `problem` on the current device (tuning only).
    device:    the `TuningDevice` for a device kind ('h100', to list candidates without it), or for
               this machine (None); raises ValueError / RuntimeError saying why there is none.
    """

    backend: str
    serves: Callable[[dispatch.Problem], str | None]
    parse: Callable[[Mapping[str, Any]], Any]
    dump: Callable[[Any], dict[str, Any]]
    check: Callable[[Any, dispatch.Problem], str | None]
    heuristic: Callable[[dispatch.Problem], tuple[Any, str]]
    candidates: Callable[[dispatch.Problem], tuple[Any, ...]]
    measure: Callable[[dispatch.Problem, Any], float] | None = None
    device: Callable[[str | None], TuningDevice] | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    """The config a call runs and where it came from ('user cache /path', 'shipped table ...', 'heuristic: ...')."""

    config: Any
    source: str

    def __str__(self) -> str:
        name = getattr(self.config, "name", None) or getattr(self.config, "describe", lambda: str(self.config))()
        return f"{name} ({self.source})"


@dataclass(frozen=True, kw_only=True, slots=True)
class Entry:
    key: Key
    config: Any
    seconds: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Table:
    """One JSON table: entries for one backend on one device kind, and how they were obtained."""

    backend: str
    device: str
    entries: tuple[Entry, ...]
    measured: bool
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    path: Path | None = None

    def lookup(self, key: Key) -> Entry | None:
        for e in self.entries:
            if e.key == key:
                return e
        return None


_TUNABLES: dict[str, Tunable] = {}


def register(tunable: Tunable) -> Tunable:
    _TUNABLES[tunable.backend] = tunable
    reload()
    return tunable


def tunables() -> dict[str, Tunable]:
    return dict(_TUNABLES)


def tunable_for(problem: dispatch.Problem, backend: str) -> Tunable:
    """The registered tunable of `backend`; raises if there is none or it does not serve the problem."""
    if backend not in _TUNABLES:
        raise ValueError(f"no tunable backend {backend!r}; registered: {', '.join(sorted(_TUNABLES)) or 'none'} "
                         f"(`qkernels.backends.load(framework)` registers the installed backends' tunables)")
    t = _TUNABLES[backend]
    why = t.serves(problem)
    if why:
        raise ValueError(f"{backend} does not tune {problem.describe()}: {why}")
    return t


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qkernels"


def shipped_path(backend: str, device: str) -> Path:
    return SHIPPED_DIR / f"{backend}-{device}.json"


def cache_path(backend: str, device: str) -> Path:
    return cache_dir() / "tuned" / f"{backend}-{device}.json"


def _warn(path: Path, why: str) -> None:
    warnings.warn(f"qkernels: ignoring tuned-config file {path}: {why}. Delete it or re-run "
                  f"`python -m qkernels.tune` to rewrite it", RuntimeWarning, stacklevel=3)


def _parse_key(raw: Mapping[str, Any]) -> Key:
    g = raw.get("group_size")
    key = Key(family=str(raw["family"]), m=int(raw["m"]), n=int(raw["n"]), k=int(raw["k"]),
              group_size=None if g is None else int(g))
    if key.m not in M_BUCKETS or key.n < 1 or key.k < 1:
        raise ValueError(f"m={key.m} is not a bucket of {M_BUCKETS} or n/k are not positive")
    return key


_MAX_TABLE_BYTES = 16 * 2**20  # a shipped table holds a few hundred entries (tens of KiB)


def load_table(path: Path, tunable: Tunable, device: str) -> Table | None:
    """Read a table for (`tunable.backend`, `device`); None (with a warning) if unusable."""
    try:
        size = path.stat().st_size
        if size > _MAX_TABLE_BYTES:
            _warn(path, f"it is {size} bytes, more than a table of configs needs ({_MAX_TABLE_BYTES})")
            return None
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError and integers beyond Python's digit limit; RecursionError, deep nesting
        _warn(path, f"not readable JSON ({type(e).__name__}: {str(e)[:200]})")
        return None
    if not isinstance(raw, dict) or raw.get("format") != TABLE_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        _warn(path, f"format is {got!r}, not {TABLE_FORMAT!r}")
        return None
    if raw.get("backend") != tunable.backend or raw.get("device") != device:
        _warn(path, f"it is for backend {raw.get('backend')!r} on {raw.get('device')!r}, "
                    f"not {tunable.backend!r} on {device!r}")
        return None
    rows = raw.get("entries")
    if not isinstance(rows, list):
        _warn(path, "'entries' is not a list")
        return None
    entries, bad = [], []
    for i, row in enumerate(rows):
        try:
            key = _parse_key(row["key"])
            config = tunable.parse(row["config"])
            seconds = row.get("seconds")
            entries.append(Entry(key=key, config=config, seconds=None if seconds is None else float(seconds)))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
            bad.append(f"entry {i}: {type(e).__name__}: {str(e)[:200]}")
    if bad:
        warnings.warn(f"qkernels: {path}: dropped {len(bad)} unusable entries ({'; '.join(bad[:3])}"
                      f"{'; ...' if len(bad) > 3 else ''})", RuntimeWarning, stacklevel=2)
    return Table(backend=tunable.backend, device=device, entries=tuple(entries), measured=bool(raw.get("measured")),
                 provenance=dict(raw.get("provenance") or {}), path=path)


def write_table(path: Path, tunable: Tunable, device: str, entries: Iterable[Entry], *, measured: bool,
                provenance: Mapping[str, Any]) -> None:
    """Write (replace) a table atomically: entries merged by the caller, sorted for stable diffs."""
    rows = [{"key": dataclasses.asdict(e.key), "config": tunable.dump(e.config), "seconds": e.seconds}
            for e in sorted(entries, key=lambda e: (e.key.family, e.key.group_size or 0, e.key.n, e.key.k, e.key.m))]
    doc = {"format": TABLE_FORMAT, "backend": tunable.backend, "device": device, "measured": measured,
           "provenance": dict(provenance), "entries": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    reload()


@functools.lru_cache(maxsize=None)
def _tables(backend: str, device: str) -> tuple[tuple[str, Table], ...]:
    """(source label, table) in precedence order: user cache, then shipped."""
    tunable = _TUNABLES[backend]
    out = []
    for label, path in (("user cache", cache_path(backend, device)), ("shipped table", shipped_path(backend, device))):
        table = load_table(path, tunable, device)
        if table is not None:
            out.append((label, table))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _choose(backend: str, problem: dispatch.Problem) -> Choice:
    tunable = _TUNABLES[backend]
    key = key_of(problem)
    skipped = []
    for label, table in _tables(backend, problem.device):
        entry = table.lookup(key)
        if entry is None:
            continue
        why = tunable.check(entry.config, problem)
        if why is None:
            measured = "" if table.measured else ", not measured"
            return Choice(entry.config, f"{label} {table.path.name}{measured}: {key.describe()}")
        skipped.append(f"{label} entry refused: {why}")
    config, why = tunable.heuristic(problem)
    return Choice(config, "heuristic: " + "; ".join([why, *skipped]))


def choose(problem: dispatch.Problem, backend: str) -> Choice:
    """The config `backend` runs `problem` with, and its source (cached per problem)."""
    if backend not in _TUNABLES:
        raise ValueError(f"no tunable backend {backend!r}; registered: {', '.join(sorted(_TUNABLES))}")
    return _choose(backend, problem)


def reload() -> None:
    """Forget loaded tables and choices (after a cache file changed); the next call re-reads them."""
    _tables.cache_clear()
    _choose.cache_clear()
    dispatch.invalidate()

