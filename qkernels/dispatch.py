"""Registry of implementations, selection, `explain()` and `use_backend()`.

Numerics-agnostic: a `Problem` carries the recipe (and so both operand formats), the shapes, the
dtypes as names, the framework and the platform; each `Implementation` decides for itself, in
`supports(problem)`, whether it can serve it. Nothing here looks at a particular dtype or recipe.

Selection: the highest-priority implementation whose `supports` returns None. A backend asked for
explicitly (argument, `use_backend`, or the `QKERNELS_BACKEND` environment variable) that cannot
serve raises `BackendUnavailable` with its reason; automatic selection falls back, and the choice
is inspectable through `explain()` and logged once per problem at debug level.

One bind per call: a binding validates its arguments once, builds the `Problem` and calls
`bind(problem)`, which returns an immutable `Bound` call (problem, implementation, config), cached
per problem; `Bound.run(...)` hands itself to the implementation, which reads `call.problem` and
`call.config` and checks nothing again.

What an implementation serves is declared once, in its `Serves` (recipe tags, or accumulations for
the generic backends that execute any recipe's definition); dispatch refuses everything else with
that declaration as the reason, before `supports` (shapes, dtypes, platform) is asked.

Calling convention of `Implementation.run` for `Op.QMATMUL` (framework-native arrays):
    run(call, lhs, rhs, bias) -> out    (call: the `Bound` call; call.problem, call.config)
    lhs:  float activations (..., M, K) (`problem.lhs_quantized` False), or a `QOperand` of int8
          per-row codes (B?, M, K) and scales (B?, M) when the caller quantized them already.
    rhs:  `QOperand(qvalue, scale, zero_point)` in canonical stored layout (B?, N, K_stored).
    bias: (N,) or None.
    out:  (..., M, N) of dtype `problem.out_dtype`.
For `Op.RAGGED_QMATMUL` (the grouped matmul of mixture-of-experts layers, `qkernels.grouped`):
    run(call, lhs, rhs, group_sizes) -> out (M, N)
    lhs: float (M, K), or a per-row `QOperand` as above; rhs: `QOperand` of E = `problem.groups`
    experts stored (E, N, K_stored); group_sizes: int32 (E,), expert e owning the next
    group_sizes[e] rows; rows past their sum are zero (as `jax.lax.ragged_dot`).
    accumulate(call, lhs, rhs, group_sizes) -> int32 (M, N) (or (M, N, G)), zero past the groups.
For `Op.QUANTIZE` (dynamic quantization of activations along the last axis):
    run(call, x) -> QOperand(qvalue, scale, None) with the format `call.problem.recipe.lhs`.
Optional, for integer recipes (`Implementation.accumulate`):
    accumulate(call, lhs, rhs) -> exact int32 accumulators (..., M, N), or (..., M, N, G) per
    group, before any rescale. Partitioned callers sum them over K shards exactly (a row-parallel
    W8A8 matmul is an int32 all-reduce, then one rescale).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qkernels.formats import OperandFormat, Recipe

__all__ = [
    "Op", "Problem", "Serves", "Implementation", "Verdict", "Explanation", "Bound", "BackendUnavailable", "register",
    "registered", "registry_version", "invalidate", "candidates", "select", "bind", "explain", "use_backend", "requested_backend",
    "ENV_VAR", "SlowPathWarning", "slow_reason",
]

log = logging.getLogger("qkernels.dispatch")

ENV_VAR = "QKERNELS_BACKEND"
ANY_FRAMEWORK = "any"


class Op(enum.Enum):
    QMATMUL = "qmatmul"
    QUANTIZE = "quantize"
    RAGGED_QMATMUL = "ragged_qmatmul"


@dataclass(frozen=True, kw_only=True, slots=True)
class Problem:
    """One call, framework-neutral: what every `supports` decides on.

    The matmul is canonical (DESIGN.md section 3): lhs (batch?, M, K) x rhs (batch?, N, K).
    `batch` is None when the weight is 2-D and shared (leading lhs axes are folded into M).
    `groups`: the number of experts E of an `Op.RAGGED_QMATMUL` (M is then all experts' rows).
    `act_dtype`: name of the float activation dtype ('int8' if lhs arrives quantized).
    `platform`: 'cpu', 'cuda:sm_80', 'cuda:sm_90', 'rocm:gfx942', 'tpu:v5e', ...
    `device`: the device kind tuned configs are keyed by ('h100', 'a100', 'tpu-v5e', 'cpu'; see
    `qkernels.hardware.device_kind`), '' when unknown. It never changes which implementations serve.
    Construction refuses a K that would overflow the recipe's int32 accumulator, and a static-range
    recipe whose activations are not already quantized with their calibrated scale.
    """

    op: Op = Op.QMATMUL
    recipe: Recipe
    m: int
    n: int
    k: int
    batch: int | None = None
    act_dtype: str
    out_dtype: str
    has_bias: bool = False
    lhs_quantized: bool = False
    framework: str
    platform: str
    device: str = ""
    groups: int | None = None

    def __post_init__(self) -> None:
        for name in ("m", "n", "k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is negative")
        if (self.op is Op.RAGGED_QMATMUL) != (self.groups is not None) or (self.groups is not None and self.groups < 1):
            raise ValueError(f"groups={self.groups} for op {self.op.value}: a ragged matmul takes the number of "
                             f"experts (>= 1), other ops none")
        if self.op in (Op.QMATMUL, Op.RAGGED_QMATMUL):
            self.recipe.check_k(self.k)
            if self.recipe.static and not self.lhs_quantized:
                raise ValueError(
                    f"{self.recipe.name} quantizes activations with a calibrated scale: quantize them first with "
                    f"recipe.quantize_lhs(ops, x, input_scale) and pass the codes (lhs_quantized=True)")
        elif self.recipe.static:  # Op.QUANTIZE kernels calibrate per token; the static rule is quantize_lhs
            raise ValueError(f"{self.recipe.name}: static activations are quantized by recipe.quantize_lhs with the "
                             f"calibrated scale, not by a dynamic quantize kernel")

    @property
    def lhs_format(self) -> OperandFormat | None:
        return self.recipe.lhs

    @property
    def rhs_format(self) -> OperandFormat:
        return self.recipe.rhs

    @property
    def device_kind(self) -> str:
        """'cpu', 'cuda', 'rocm', 'tpu'."""
        return self.platform.split(":", 1)[0]

    @property
    def arch(self) -> str | None:
        """'sm_90', 'gfx942', 'v5e', ... or None."""
        return self.platform.split(":", 1)[1] if ":" in self.platform else None

    def describe(self) -> str:
        b = f"{self.batch}x" if self.batch is not None else f"E={self.groups} " if self.groups is not None else ""
        lhs = f"{self.recipe.lhs.qtype.name} (pre-quantized)" if self.lhs_quantized else self.act_dtype
        return (f"{self.op.value} {self.recipe.name} {b}M={self.m} N={self.n} K={self.k} lhs={lhs} "
                f"out={self.out_dtype}{' +bias' if self.has_bias else ''} on {self.framework}/{self.platform}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Serves:
    """What an implementation serves, declared in one place: recipe tags (a kernel family) and/or
    accumulations (a generic backend executing any recipe's definition). None: no restriction."""

    recipes: frozenset[str] | None = None
    accumulations: frozenset[str] | None = None

    @classmethod
    def everything(cls) -> Serves:
        return cls()

    @classmethod
    def tags(cls, *tags: str) -> Serves:
        return cls(recipes=frozenset(tags))

    @classmethod
    def accumulating(cls, *names: str) -> Serves:
        return cls(accumulations=frozenset(names))

    def reason(self, recipe: Recipe) -> str | None:
        """None if `recipe` is declared served, else why not (naming what is served)."""
        if self.recipes is not None and recipe.tag not in self.recipes:
            return f"serves recipes {', '.join(sorted(self.recipes))}, not {recipe.name}"
        acc = recipe.accumulation.name
        if self.accumulations is not None and acc not in self.accumulations:
            return (f"implements accumulations {', '.join(sorted(self.accumulations))}; {recipe.name} "
                    f"accumulates {acc} ({recipe.accumulation.description}), which it does not know")
        return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Implementation:
    """A way to run an op. `supports` must be pure and cheap: it returns None or the reason why not.

    `name` selects it explicitly: `use_backend('triton')` matches 'triton' and 'triton.w8a8'.
    `framework` is 'torch', 'jax', or 'any' (takes anything NumPy can read, returns NumPy).
    `serves` declares which recipes it serves (checked by dispatch before `supports`).
    `automatic=False` (interpreter variants, for tests): never chosen unless asked for by name, and
    listed by `explain` only with `verbose=True` or when asked for.
    `configure(problem)`, for kernels that take configs, returns the `qkernels.tuning.Choice` (config
    and where it came from) that `run` will use (as `call.config.config`); `explain` shows it.
    `accumulate(call, lhs, rhs)`, where the kernel can stop before its rescale, returns the raw
    integer accumulators (see the module docstring); None where it cannot.
    `note(problem)`, pure and cheap like `supports`: how it serves a problem it supports when that is
    worth knowing (e.g. an operand type it emulates by upcasting), else None; `explain` prints it.
    `slower(problem)`, pure and cheap: where this implementation is known (measured; its docstring says
    where and how) to be slower than the framework's unquantized matmul of the same shape, why and the
    faster alternative, else None. `explain` prints it and the first `bind` of that problem warns with
    it (`SlowPathWarning`): no silent slow path.
    `prepare(call, rhs, bias)`, for calls repeated on the same weight tensors (a module's forward): a
    function of the activations alone that runs `call` with less host work (operands read once), returning
    the output, or None where a call needs the full path (e.g. to raise an error); or None when it offers
    none for `call`. The caller keeps it only while those tensors, the requested backend and the registry
    are unchanged (torch_bindings.ops.Runner).
    """

    name: str
    framework: str
    op: Op = Op.QMATMUL
    priority: int
    supports: Callable[[Problem], str | None]
    run: Callable[..., Any] = field(compare=False)
    serves: Serves = Serves()
    automatic: bool = True
    description: str = ""
    configure: Callable[[Problem], Any] | None = field(default=None, compare=False)
    accumulate: Callable[..., Any] | None = field(default=None, compare=False)
    note: Callable[[Problem], str | None] | None = field(default=None, compare=False)
    slower: Callable[[Problem], str | None] | None = field(default=None, compare=False)
    prepare: Callable[..., Callable[[Any], Any] | None] | None = field(default=None, compare=False)

    def matches(self, backend: str) -> bool:
        return self.name == backend or self.name.startswith(backend + ".")

    def verdict(self, problem: Problem) -> str | None:
        """None if this implementation serves `problem`, else the reason (declaration first)."""
        return self.serves.reason(problem.recipe) or self.supports(problem)


@dataclass(frozen=True, slots=True)
class Verdict:
    implementation: Implementation
    reason: str | None  # None: can serve this problem

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True, slots=True)
class Explanation:
    """Every candidate for a problem with its verdict; `chosen` is what a call would run."""

    problem: Problem
    verdicts: tuple[Verdict, ...]
    chosen: Implementation | None
    backend: str | None
    error: str | None = None
    config: Any = None  # tuning.Choice of the chosen implementation, if it takes configs
    hidden: int = 0  # candidates left out (other recipes' kernels, test-only variants): verbose=True lists them
    layout: str | None = None  # the operand layout the chosen kernel reads, where a binding knows it (prepacked or not)

    def __str__(self) -> str:
        lines = [self.problem.describe()]
        if self.backend:
            lines.append(f"backend requested: {self.backend!r}")
        for v in self.verdicts:
            impl = v.implementation
            mark = "->" if impl is self.chosen else "  "
            note = impl.note(self.problem) if v.ok and impl.note is not None else None
            verdict = ("ok" + (f" ({note})" if note else "")) if v.ok else f"no: {v.reason}"
            lines.append(f"{mark} {impl.name:<24} prio {impl.priority:>4}  {verdict}")
        if self.hidden:
            lines.append(f"   ({self.hidden} more that do not serve {self.problem.recipe.name} or are test-only: "
                         f"explain(..., verbose=True))")
        lines.append(f"chosen: {self.chosen.name}" if self.chosen else f"error: {self.error}")
        if (slow := slow_reason(self.chosen, self.problem)) is not None:
            lines.append(f"slow: {slow}")
        if self.config is not None:
            lines.append(f"config: {self.config}")
        if self.layout is not None:
            lines.append(f"layout: {self.layout}")
        return "\n".join(lines)

    def shown(self, verbose: bool) -> Explanation:
        """This explanation listing, unless `verbose`, only the candidates of the call's recipe (and
        the chosen or requested ones): declared for the recipe, and automatic."""
        if verbose:
            return self
        keep = tuple(v for v in self.verdicts
                     if v.implementation is self.chosen
                     or (self.backend and v.implementation.matches(self.backend))
                     or (v.implementation.automatic and v.implementation.serves.reason(self.problem.recipe) is None))
        return dataclasses.replace(self, verdicts=keep, hidden=len(self.verdicts) - len(keep))


@dataclass(frozen=True, slots=True)
class Bound:
    """One bound call: the problem, the implementation that runs it and its config, made once by
    `bind` and cached per problem. Launchers read `call.problem` / `call.config` and re-check nothing."""

    problem: Problem
    implementation: Implementation
    config: Any = None  # the implementation's tuning.Choice, or None

    @classmethod
    def of(cls, problem: Problem, implementation: Implementation) -> Bound:
        """`implementation` bound to `problem` with the config it would choose (no selection)."""
        configure = implementation.configure
        return cls(problem, implementation, configure(problem) if configure is not None else None)

    def run(self, *args: Any) -> Any:
        return self.implementation.run(self, *args)

    def accumulate(self, lhs: Any, rhs: Any, *rest: Any) -> Any:
        if self.implementation.accumulate is None:
            raise ValueError(f"implementation {self.implementation.name!r} does not expose integer accumulators; "
                             f"use one that does (e.g. 'reference')")
        return self.implementation.accumulate(self, lhs, rhs, *rest)  # rest: a ragged op's group sizes

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))


def slow_reason(impl: Implementation | None, problem: Problem) -> str | None:
    """Why `impl` is known to be slower than the unquantized matmul on `problem`, or None."""
    return impl.slower(problem) if impl is not None and impl.slower is not None else None


class SlowPathWarning(UserWarning):
    """A call runs an implementation known to be slower than the unquantized matmul (the message names
    the faster alternative). Given once per distinct call; silence with `warnings.filterwarnings`."""


class BackendUnavailable(ValueError):
    """An explicitly requested backend cannot serve the problem (message says why and what to do)."""


class _Registry:
    def __init__(self) -> None:
        self.impls: dict[tuple[str, Op, str], Implementation] = {}
        self.version = 0

    def add(self, impl: Implementation) -> None:
        self.impls[(impl.framework, impl.op, impl.name)] = impl
        self.version += 1


_REGISTRY = _Registry()
_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("qkernels_backend", default=None)


def register(impl: Implementation) -> Implementation:
    """Add (or replace, by framework/op/name) an implementation."""
    _REGISTRY.add(impl)
    return impl


def registry_version(framework: str | None = None) -> int:
    """Changes whenever an implementation is registered or `invalidate` is called (a cache key);
    with `framework`, read after that framework's backends are loaded."""
    if framework is not None:
        from qkernels import backends

        backends.load(framework)
    return _REGISTRY.version


def invalidate() -> None:
    """Forget cached choices (e.g. after a tuned-config table changed)."""
    _REGISTRY.version += 1


def registered(framework: str | None = None, op: Op | None = None) -> list[Implementation]:
    """Implementations for a framework (plus framework-agnostic ones), best priority first; the
    framework's backends (`qkernels.backends.BACKENDS`) are loaded first."""
    from qkernels import backends

    backends.load(framework)
    out = [i for i in _REGISTRY.impls.values()
           if (framework is None or i.framework in (framework, ANY_FRAMEWORK)) and (op is None or i.op is op)]
    return sorted(out, key=lambda i: (-i.priority, i.name))


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, run every call on backend `name` (or raise why it cannot); None: automatic."""
    token = _BACKEND.set(name)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def requested_backend(backend: str | None = None) -> str | None:
    """Explicit argument, else `use_backend` context, else $QKERNELS_BACKEND, else None."""
    return backend or _BACKEND.get() or os.environ.get(ENV_VAR) or None


def candidates(problem: Problem) -> tuple[Verdict, ...]:
    return tuple(Verdict(i, i.verdict(problem)) for i in registered(problem.framework, problem.op))


def _choose(problem: Problem, backend: str | None) -> Explanation:
    verdicts = candidates(problem)
    pool = verdicts
    if backend:
        pool = tuple(v for v in verdicts if v.implementation.matches(backend))
        if not pool:
            names = sorted({v.implementation.name for v in verdicts})
            return Explanation(problem, verdicts, None, backend,
                               f"no implementation named {backend!r} for {problem.framework} {problem.op.value}; "
                               f"available: {', '.join(names)}")
    for v in pool:
        if v.ok and (backend or v.implementation.automatic):
            return Explanation(problem, verdicts, v.implementation, backend)
    reasons = "; ".join(f"{v.implementation.name}: {v.reason}" for v in pool)
    return Explanation(problem, verdicts, None, backend,
                       f"backend {backend!r} cannot serve {problem.describe()}: {reasons}. "
                       f"Drop the backend request (use_backend(None) / unset {ENV_VAR}) for automatic "
                       f"selection, or change the call as the reason says")


@functools.lru_cache(maxsize=4096)
def _select_cached(problem: Problem, backend: str | None, version: int) -> Explanation:
    choice = _choose(problem, backend)
    if choice.chosen is not None:
        if choice.chosen.configure is not None:
            choice = dataclasses.replace(choice, config=choice.chosen.configure(problem))
        log.debug("qkernels: %s -> %s%s", problem.describe(), choice.chosen.name,
                  f" [{choice.config}]" if choice.config is not None else "")
    return choice


def explain(problem: Problem, backend: str | None = None, *, verbose: bool = False) -> Explanation:
    """The candidates for `problem` with their verdicts and reasons, and the one a call would run.

    By default only the candidates of the problem's framework that are declared for its recipe (and
    are chosen automatically) are listed; `verbose=True` lists every registered one.
    """
    return _select_cached(problem, requested_backend(backend), _REGISTRY.version).shown(verbose)


@functools.lru_cache(maxsize=4096)
def _bind_cached(problem: Problem, backend: str | None, version: int) -> Bound:
    choice = _select_cached(problem, backend, version)
    if choice.chosen is None:
        raise BackendUnavailable(choice.error)
    if (slow := slow_reason(choice.chosen, problem)) is not None:
        warnings.warn(f"qkernels: {problem.describe()} runs {choice.chosen.name}, which is {slow}", SlowPathWarning,
                      stacklevel=2)
    return Bound(problem, choice.chosen, choice.config)


def bind(problem: Problem, backend: str | None = None) -> Bound:
    """The bound call for `problem`: what runs it and with which config (cached per problem).

    Raises BackendUnavailable if an explicitly requested backend cannot serve it (with its reason).
    """
    return _bind_cached(problem, requested_backend(backend), _REGISTRY.version)


def select(problem: Problem, backend: str | None = None) -> Implementation:
    """The implementation a call runs; raises BackendUnavailable if an explicit request cannot serve."""
    return bind(problem, backend).implementation
