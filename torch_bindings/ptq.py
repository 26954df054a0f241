"""Data-aware post-training quantization of torch models: GPTQ and AWQ through `qk.quantize_`.

`qk.quantize_(model, recipe, calibration=batches, method="gptq" | "gptq-mse" | "gptq-ao" | "gptq-ao-mse" | "awq")`
runs the batches through the model (hooks on the `nn.Linear` layers, under `torch.no_grad()`; a batch is
passed as `model(batch)`, `model(*batch)` or `model(**batch)`), keeping per layer only what the method needs:

| method | kept per layer                                        | memory         |
|--------|-------------------------------------------------------|----------------|
| gptq, gptq-* | the running Hessian `2/n X^T X` (`quality.hessian_merge`) | K x K (f64) |
| awq    | a uniform sample of `rows` input rows (reservoir)       | rows x K (f32) |

never the model's activations; each layer is quantized on its own (`quality.gptq` / `quality.awq`, the
framework-neutral algorithms, on NumPy copies of one layer at a time) with a progress bar per layer;
"gptq-mse" is GPTQ with clip-searched group scales (`quality.gptq(clip=True)`), "gptq-ao" GPTQ in
act-order with static groups (`quality.gptq(act_order=True)`), "gptq-ao-mse" both.

Order (`sequential=None`, the default): where the layers sit in a chain of blocks (the `nn.ModuleList`
holding most of them, a transformer's layers) whose each block takes the previous one's output, the
model runs once per batch up to the first block (its arguments are kept; a key/value cache among them is
dropped, `use_cache` off), then block by block, stage by stage inside a block (the layers reading one
tensor: q/k/v, then o, then gate/up, then down, found by running the block once), each stage's
statistics come from the block replayed through the layers already quantized, as the reference GPTQ
and AutoAWQ do; the layers outside the blocks (an untied LM head) from one pass of the model after.
Statistics live for one stage at a time (one pass of the float model would hold every layer's Hessian at
once: 30 GB of f64 for a 7B model). A model whose blocks do not chain takes one pass of the float model
(`sequential=True` refuses it, saying why; `sequential=False` asks for one pass).

Target (`asymmetric=None`: on for GPTQ where calibration is sequential): the float model runs beside,
block by block, and each layer is quantized toward the float model's output rather than its own on the
quantized inputs (`quality.gptq_target`, GPTAQ's asymmetric calibration; twice the replays). Measured
on SmolLM2-135M, W4A16 g128 with a zero point, the report's calibration set (perplexity, fp32 23.86;
420 evaluated tokens, one run each):

| method      | one pass of the float model | sequential | sequential + asymmetric (default) |
|-------------|-----------------------------|------------|-----------------------------------|
| gptq        | 36.20                       | -          | 26.25                             |
| gptq-ao     | 29.80                       | -          | 24.94                             |
| gptq-mse    | 27.64                       | 28.00      | 26.66                             |
| gptq-ao-mse | 26.54                       | 26.96      | 25.91                             |
| awq         | 28.09                       | 27.84      | (GPTQ only)                       |

all-MiniLM-L6-v2 (mean cosine, w4a16-g128-zp "gptq-ao-mse"): 0.9830, 0.9831, 0.9835.

AWQ's per-channel factors become the layer's `smooth` vector (the layer divides its input by them, as
SmoothQuant's do), so the result serves, saves and loads like any QLinear. Layers are chosen as in
`quantize_` (same default skips, same `filter_fn`); a layer the batches never reach is skipped with that
reason.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from qkernels import quality
from qkernels.dispatch import SlowPathWarning
from qkernels.formats import Recipe
from qkernels.numerics import check_finite
from torch_bindings.calibrate import call, evaluating
from torch_bindings.modules import QLinear, Summary, candidates, swap_modules
from torch_bindings.qtensor import QTensor

__all__ = ["METHODS", "quantize_calibrated"]

METHODS = (*quality.GPTQ_METHODS, "awq")
"""GPTQ's variants (`quality.GPTQ_METHODS`: "-mse" clip-searched group ranges, "-ao" act-order with static
groups) and AWQ."""


class _Rows:
    """A uniform random sample of at most `limit` rows seen over all batches (reservoir, seeded)."""

    def __init__(self, limit: int, seed: int) -> None:
        self.limit, self.seen, self.rows = limit, 0, None
        self.rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        check_finite(x, "AWQ: the layer's calibration inputs")  # every row, not only those the sample keeps
        self.seen += len(x)
        pool = x if self.rows is None else np.concatenate([self.rows, x])
        if len(pool) > self.limit:  # keep each row seen so far with equal probability
            pool = pool[np.sort(self.rng.choice(len(pool), self.limit, replace=False))]
        self.rows = pool


class _Stats:
    """What `method` keeps of each layer's inputs (the module docstring's table), fed by `hook` (a forward
    pre-hook): `stats[layer]` is `[H, rows, C]` (GPTQ; C is the cross term of the asymmetric target, None
    without) or a `_Rows` sample (AWQ). `target` (a pre-hook on the float layers, run first on the same batch)
    gives the float model's input to each layer, whose product with the quantized model's input is C."""

    def __init__(self, layers: list[nn.Linear], method: str, rows: int) -> None:
        self.hessian = method != "awq"
        self.stats: dict[nn.Module, Any] = {m: [None, 0, None] if self.hessian else _Rows(rows, i)
                                            for i, m in enumerate(layers)}
        self.targets: dict[nn.Module, torch.Tensor] = {}
        # the last product made and what it was made of (held, so an id is not reused; with versions, so an
        # in-place change counts as new): the layers that read one tensor (q/k/v, gate/up) share one product
        self._gram: list[Any] = [None] * 4
        self._cross: list[Any] = [None] * 4

    def target(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.targets[module] = args[0].detach()

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        rows = x.reshape(-1, module.in_features)
        if not self.hessian:
            self.stats[module].update(rows.to(torch.float32).cpu().numpy())
            return
        # X^T X by torch's matmul in f32 (as the reference GPTQ), the running means in f64
        gram = _product(self._gram, args[0], args[0])
        h, n, c = self.stats[module]
        target = self.targets.pop(module, None)
        if target is not None or c is not None:  # rows without a float input (not routed there) are their own
            cross = gram if target is None or target.shape != x.shape else _product(self._cross, target, args[0])
            c, _ = quality.hessian_merge(h if c is None else c, n, cross, rows.shape[0])
        h, n = quality.hessian_merge(h, n, gram, rows.shape[0])
        self.stats[module] = [h, n, c]

    def reached(self, module: nn.Module) -> bool:
        stat = self.stats[module]
        return stat[1] > 0 if self.hessian else stat.seen > 0


def _product(cache: list[Any], a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """`A^T B` of the rows of `a` and `b` (f32, NumPy), reused while `cache` holds the same tensors."""
    if not (cache[0] is a and cache[1] is b and cache[2] == (a._version, b._version)):
        k = a.shape[-1]
        af, bf = a.reshape(-1, k).to(torch.float32), b.reshape(-1, k).to(torch.float32)
        cache[:] = a, b, (a._version, b._version), (af.T @ bf).cpu().numpy()
    return cache[3]


class _Stop(Exception):
    """Raised by a hook to end a forward early: everything after that point is not needed."""


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs.get("hidden_states")


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor) -> tuple[tuple[Any, ...], dict]:
    return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})


def _output(out: Any) -> Any:
    return out if isinstance(out, torch.Tensor) else out[0]


def _replayable(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block's keyword arguments with its key/value cache dropped: replayed, the block would append to
    the cache and attend to the keys of the calls before."""
    out = {}
    for k, v in kwargs.items():
        if k == "use_cache":
            v = False
        elif k in ("past_key_value", "past_key_values", "layer_past") or type(v).__name__.endswith("Cache"):
            v = None
        out[k] = v
    return out


def _blocks(model: nn.Module, layers: set[nn.Module]) -> list[nn.Module]:
    """The children of the `nn.ModuleList` that holds the most of `layers` (a transformer's blocks), or []."""
    best: list[nn.Module] = []
    count = 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            n = sum(x in layers for x in m.modules())
            if n > count:
                best, count = list(m), n
    return best


def _block_inputs(model: nn.Module, blocks: list[nn.Module],
                  batches: list[Any]) -> tuple[list[tuple[tuple[Any, ...], dict[str, Any]]], str | None]:
    """The first block's (args, kwargs) for every batch, and why the blocks cannot be replayed one after
    the other (None when they can: on the first batch each block runs once and takes the previous block's
    output as its input, the same tensor)."""
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    calls: list[tuple[Any, Any]] = []  # (input, output) of each block call, first batch only
    first = [True]

    def pre(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if block is blocks[0]:
            inputs.append((args, _replayable(kwargs)))
            if not first[0]:
                raise _Stop
        if first[0]:
            calls.append((block, _hidden(args, kwargs)))

    def post(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if first[0]:
            calls.append((block, _output(out)))

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre, with_kwargs=True),
                                           b.register_forward_hook(post, with_kwargs=True))]
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    call(model, batch)
                except _Stop:
                    pass
                first[0] = False
    finally:
        for h in handles:
            h.remove()
    order = [b for b, _ in calls[::2]]
    if order != blocks:
        return inputs, "the blocks did not run once each, in order, on the first batch"
    tensors = [t for _, t in calls]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return inputs, "a block's input or output is not a tensor"
    if any(tensors[i + 1] is not tensors[i] for i in range(1, len(tensors) - 1, 2)):
        return inputs, "a block's input is not the previous block's output (the model transforms it in between)"
    return inputs, None


def _stages(block: nn.Module, first: tuple[tuple[Any, ...], dict[str, Any]],
            layers: list[nn.Module]) -> list[tuple[list[nn.Module], bool]]:
    """`layers` (those of `block`) grouped by the input they read, in the order they run on the first batch
    (q/k/v, then o, then gate/up, then down; layers that did not run, last), each with whether its forwards
    can end at its last layer (no layer ran twice, and each of the stage's ran)."""
    seen: list[tuple[nn.Module, Any]] = []
    with _replaying():
        _forward(functools.partial(block, *first[0], **first[1]), layers, lambda m, args: seen.append((m, args[0])),
                 stop_after=False)
    stages: list[tuple[Any, list[nn.Module]]] = []  # (the input read, the layers reading it)
    for m, x in seen:
        same = next((stage for y, stage in stages if y is x), None)
        if same is None:
            stages.append((x, [m]))
        elif m not in same:
            same.append(m)
    ran = {m for m, _ in seen}
    once = len(seen) == len(ran)
    rest = [m for m in layers if m not in ran]
    return [(stage, once) for _, stage in stages] + ([(rest, False)] if rest else [])


def _solve(module: nn.Linear, stat: Any, recipe: Recipe, method: str, act_order: bool) -> QLinear:
    """The layer quantized by `method` from its statistics (`quality.gptq` / `quality.awq` on NumPy copies);
    with a cross term, GPTQ quantizes the asymmetric target (`quality.gptq_target`)."""
    w = module.weight.detach().to(torch.float32).cpu().numpy()
    smooth = None
    if method != "awq":
        h, _, c = stat
        if c is not None:
            w = quality.gptq_target(w, h, c)
        op = quality.gptq_named(w, h, recipe.rhs, method, act_order=act_order)
    else:
        op, smooth = quality.awq(w, stat.rows, recipe.rhs)
    device = module.weight.device
    qvalue, scale, zero = (None if t is None else torch.from_numpy(np.ascontiguousarray(t)).to(device)
                           for t in (op.qvalue, op.scale, op.zero_point))
    weight = QTensor(qvalue=qvalue, scale=scale, zero_point=zero, recipe=recipe,
                     shape=(module.out_features, module.in_features),
                     smooth=None if smooth is None else torch.from_numpy(smooth).to(device))
    return QLinear.from_qtensor(weight, module.bias)


@contextlib.contextmanager
def _float_layers(done: dict[nn.Module, QLinear]) -> Iterator[None]:
    """The layers quantized so far run float again (their `forward` overrides lifted) inside the block."""
    lifted = {m: m.__dict__.pop("forward") for m in done if "forward" in m.__dict__}
    try:
        yield
    finally:
        for m, forward in lifted.items():
            m.forward = forward


def _forward(run: Callable[[], Any], layers: list[nn.Module], hook: Callable[[nn.Module, tuple], None],
             stop_after: bool) -> None:
    """`run()` (one forward) with `hook` as a pre-hook on `layers`; with `stop_after`, the forward ends once
    every layer has been hit (its input is taken first)."""
    hit: set[nn.Module] = set()

    def pre(m: nn.Module, args: tuple[Any, ...]) -> None:
        hook(m, args)
        hit.add(m)
        if stop_after and len(hit) == len(layers):
            raise _Stop

    handles = [m.register_forward_pre_hook(pre) for m in layers]
    try:
        run()
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _replaying() -> Iterator[None]:
    """No gradients, and no SlowPathWarning: the quantized layers run many rows here; what they would be
    slower than matters when serving."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPathWarning)
        yield


def _collect(runs: list[Callable[[], Any]], stats: _Stats, layers: list[nn.Module], stop_after: bool,
             floats: list[Callable[[], Any]] | None = None, done: dict[nn.Module, QLinear] | None = None) -> None:
    """`stats` of `layers` over `runs` (forwards of the partly quantized model); with `floats`, each run is
    preceded by the same forward of the float model (`done`'s layers float), whose inputs are the targets."""
    with _replaying():
        for i, run in enumerate(runs):
            if floats is not None:
                stats.targets.clear()
                with _float_layers(done or {}):
                    _forward(floats[i], layers, stats.target, stop_after)
            _forward(run, layers, stats.hook, stop_after)
        stats.targets.clear()


def _outputs(block: nn.Module, inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[tuple[tuple, dict]]:
    """The next block's inputs: `block`'s output in place of each input's hidden state."""
    with _replaying():
        return [_with_hidden(a, k, _output(block(*a, **k))) for a, k in inputs]


def quantize_calibrated(model: nn.Module, recipe: Recipe, batches: Iterable[Any], method: str,
                        filter_fn: Callable[[nn.Module, str], bool] | None, *, rows: int = 512,
                        act_order: bool = False, sequential: bool | None = None, asymmetric: bool | None = None,
                        progress: bool = True) -> Summary:
    """`qk.quantize_` with a data-aware `method` (see the module docstring). `sequential`: None replays the
    blocks one after the other where the model allows it (else one pass), True requires it (ValueError saying
    why it cannot), False takes one pass of the float model. `asymmetric` (GPTQ, sequential only; None: on
    where it applies): each layer's target is the float model's output, not its own on the quantized inputs."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} with calibration batches: choose one of {METHODS}")
    if asymmetric and (method == "awq" or sequential is False):
        raise ValueError(f"asymmetric=True is GPTQ's target through the quantized blocks (sequential calibration); "
                         f"method={method!r}, sequential={sequential!r} has none")
    batches = list(batches)
    if not batches:
        raise ValueError("calibration got no batch; pass an iterable of model inputs (e.g. a few hundred tokens' "
                         "worth of real data)")
    is_linear = lambda m: isinstance(m, nn.Linear)  # noqa: E731
    found = candidates(model, is_linear, filter_fn)
    layers = [m for _, _, m, reason in found if reason is None]
    stats = _Stats([m for _, _, m, _ in found], method, rows)
    done: dict[nn.Module, QLinear] = {}
    bar = _progress(len(layers), method) if progress else None

    def solve(stage: list[nn.Module]) -> None:  # quantize, and run the rest of the calibration through it
        for m in stage:
            if stats.reached(m):
                done[m] = _solve(m, stats.stats[m], recipe, method, act_order)
                m.forward = done[m].forward
                stats.stats[m] = None  # the statistics are not needed again
                if bar is not None:
                    bar.update()

    try:
        with evaluating(model):
            blocks = _blocks(model, set(layers)) if sequential is not False and layers else []
            why = None if blocks else "no nn.ModuleList of blocks holds the layers"
            if blocks:
                inputs, why = _block_inputs(model, blocks, batches)
            if (sequential or asymmetric) and layers and why is not None:
                raise ValueError(f"{'sequential' if sequential else 'asymmetric'}=True: {why}; pass sequential=False "
                                 f"(statistics from one pass of the float model)")
            rest = layers
            if why is None:
                asym = asymmetric is not False and method != "awq"
                targets = list(inputs) if asym else None  # the float model's inputs of the block
                mine = set(layers)
                for block in blocks:
                    here = [m for m in block.modules() if m in mine]
                    for stage, stop in _stages(block, inputs[0], here) if here else []:
                        floats = None if targets is None else [functools.partial(block, *a, **k) for a, k in targets]
                        runs = [functools.partial(block, *a, **k) for a, k in inputs]
                        _collect(runs, stats, stage, stop, floats, done)
                        solve(stage)
                    inputs = _outputs(block, inputs)
                    if targets is not None:
                        with _float_layers(done):
                            targets = _outputs(block, targets)
                inside = {m for b in blocks for m in b.modules()}
                rest = [m for m in layers if m not in inside]
                floats = [functools.partial(call, model, b) for b in batches] if asym else None
            else:
                floats = None
            if rest:  # one pass of the model (the blocks quantized where they were replayed)
                _collect([functools.partial(call, model, b) for b in batches], stats, rest, False, floats, done)
                solve(rest)
    finally:
        for m in done:
            del m.forward
        if bar is not None:
            bar.close()
    wanted = set(layers)  # the others keep swap_modules' own reason (tied, filter_fn, ...)
    return swap_modules(model, is_linear, lambda m, _: done[m], lambda m: m.recipe.name, filter_fn,
                        skip=lambda m, _: "saw no input in the calibration batches" if m in wanted and m not in done
                        else None)


def _progress(total: int, method: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no bar without tqdm; the summary still lists every layer
        return None
    return tqdm(total=total, desc=f"{method} layers", unit="layer", leave=False)
