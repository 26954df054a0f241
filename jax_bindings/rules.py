"""`Rule`: which modules of a Flax model `quantize_model` quantizes, and the `Summary` of what it did.

A rule matches a module by its path, '/'-joined (linen: the scope path, e.g. 'block/mlp/Dense_0';
NNX: the attribute path, e.g. 'layers/0/linear'), with `re.fullmatch`, as Qwix's rules do.
The first matching rule wins; a rule whose recipe is None leaves the modules it matches float.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

from qkernels import quality
from qkernels.formats import Recipe, resolve_recipe

__all__ = ["Rule", "Entry", "Summary", "CALIBRATION_METHODS"]

CALIBRATION_METHODS = ("absmax", "percentile")
WEIGHT_METHODS = (*quality.METHODS, *quality.GPTQ_METHODS, "awq")


@dataclass(frozen=True, slots=True)
class Rule:
    """Quantize the modules whose path fully matches the regex `module_path` with `recipe`.

    `recipe`: a recipe (`qk.W8A8`, `qk.W4A16(128)`, a name such as 'w8a8') or None (leave float).
    Options: `method` and `percentile` say how `mode="calibrate"` measures the activation range of a
    static-range recipe ('absmax', or 'percentile' of |x| at `percentile`); `backend` forces a
    qkernels implementation for these modules (as `qk.dot_general(..., backend=)`); `weight_method`
    chooses the weights' codes when they are quantized: 'rtn' (round to nearest) or 'mse' (per-block clip
    search, `qkernels.quality`; QAT's forward rounds to nearest, so QAT -> serve stays bit-identical only
    with 'rtn'), or a data-aware method (GPTQ: 'gptq', 'gptq-mse', 'gptq-ao', 'gptq-ao-mse', `quality.GPTQ_METHODS`;
    'awq'), which needs data: `mode="calibrate"` then sums each weight's input Gram matrix `X^T X` (and for
    AWQ |x| per channel) into the calibration collection and `qk.quantize_params(..., calibration=...,
    method=...)` runs the method on it; until then (`init`, NNX's conversion call) the weights are rounded
    to nearest (AWQ's `<param>_smooth` factors are ones).
    """

    module_path: str
    recipe: Any = None
    _: KW_ONLY
    method: str = "absmax"
    percentile: float = 99.99
    backend: str | None = None
    weight_method: str = "rtn"

    def __post_init__(self) -> None:
        try:
            re.compile(self.module_path)
        except re.error as e:
            raise ValueError(f"Rule module_path {self.module_path!r} is not a regular expression ({e})") from None
        if self.recipe is not None:
            object.__setattr__(self, "recipe", resolve_recipe(self.recipe))
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"Rule method={self.method!r}; use one of {CALIBRATION_METHODS}")
        if self.weight_method not in WEIGHT_METHODS:
            raise ValueError(f"Rule weight_method={self.weight_method!r}; use one of {WEIGHT_METHODS}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"Rule percentile={self.percentile} must be in (0, 100], e.g. 99.99")

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.module_path, path) is not None


def check_rules(rules: Sequence[Rule] | Rule) -> tuple[Rule, ...]:
    rules = (rules,) if isinstance(rules, Rule) else tuple(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise TypeError(f"quantize_model takes qk.Rule objects, got {type(r).__name__} ({r!r}); write "
                            f"qk.Rule(r'.*', qk.W8A8)")
    if not rules:
        raise ValueError("quantize_model got no rules; pass e.g. [qk.Rule(r'.*', qk.W8A8)]")
    return rules


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of a `Summary`: a quantized parameter (`recipe` set) or a module left float (`reason`)."""

    path: str
    module: str
    param: str | None = None
    recipe: str | None = None
    shape: tuple[int, ...] | None = None
    stored: dict[str, tuple[int, ...]] | None = None
    reason: str = "quantized"


class Summary:
    """What `quantize_model` quantized: filled while the model runs (linen: at `init`/`apply` trace
    time; NNX: during `quantize_model`'s example call). `str()` prints a table."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self._entries: dict[tuple[str, str | None], Entry] = {}
        self._hits = [0] * len(rules)
        self._seen: dict[str, None] = {}
        self._warned = False

    def match(self, path: str) -> tuple[int, Rule] | None:
        """The first rule matching `path` (counted, and the path remembered for the warning)."""
        self._seen[path] = None
        for i, rule in enumerate(self.rules):
            if rule.matches(path):
                self._hits[i] += 1
                return i, rule
        return None

    def record(self, entry: Entry) -> None:
        if entry.recipe is not None:
            self._entries.pop((entry.path, None), None)
        elif any(p == entry.path and k is not None for p, k in self._entries):
            return  # the module quantized some parameter; it is not "left float"
        self._entries[(entry.path, entry.param)] = entry

    @property
    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    @property
    def quantized(self) -> list[Entry]:
        return [e for e in self._entries.values() if e.recipe is not None]

    @property
    def left_float(self) -> list[Entry]:
        return [e for e in self._entries.values() if e.recipe is None]

    @property
    def paths_seen(self) -> list[str]:
        return list(self._seen)

    def warn_unmatched(self, stacklevel: int = 2) -> None:
        """Warn once for each rule that matched no module, listing the module paths seen."""
        if self._warned or not self._seen:
            return
        self._warned = True
        for rule, hits in zip(self.rules, self._hits):
            if hits == 0:
                warnings.warn(f"qkernels.Rule({rule.module_path!r}) matched no module; the module paths are "
                              f"{self.paths_seen}", stacklevel=stacklevel + 1)

    def __str__(self) -> str:
        rows = [("path", "module", "param", "recipe", "shape", "stored / reason")]
        for e in self._entries.values():
            detail = ", ".join(f"{k} {v}" for k, v in (e.stored or {}).items()) if e.recipe else e.reason
            rows.append((e.path, e.module, e.param or "", e.recipe or "float", str(e.shape or ""), detail))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5] for r in rows)

    def __repr__(self) -> str:
        return f"Summary({len(self.quantized)} quantized, {len(self.left_float)} left float)"


def quantized_entry(path: str, module: Any, param: str, q: Any) -> Entry:
    stored = {f.name: tuple(getattr(q, f.name).shape) for f in dataclasses.fields(q)
              if f.name in ("qvalue", "scale", "zero_point") and getattr(q, f.name) is not None}
    return Entry(path=path, module=type(module).__name__, param=param, recipe=q.recipe.name, shape=tuple(q.shape),
                 stored=stored)


def recipe_of(rule: Rule | None) -> Recipe | None:
    return None if rule is None else rule.recipe
