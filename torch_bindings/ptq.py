"""Data-aware post-training quantization of torch models: GPTQ and AWQ through `qk.quantize_`.

`qk.quantize_(model, recipe, calibration=batches, method="gptq" | "gptq-mse" | "gptq-ao" | "gptq-ao-mse" | "awq")`
runs the batches once
through the float model (hooks on the `nn.Linear` layers, under `torch.no_grad()`; a batch is passed
as `model(batch)`, `model(*batch)` or `model(**batch)`), keeping per layer only what the method needs:

| method | kept per layer                                        | memory         |
|--------|-------------------------------------------------------|----------------|
| gptq, gptq-* | the running Hessian `2/n X^T X` (`quality.hessian_merge`) | K x K (f64) |
| awq    | a uniform sample of `rows` input rows (reservoir)       | rows x K (f32) |

never the model's activations; then each layer is quantized on its own (`quality.gptq` /
`quality.awq`, the framework-neutral algorithms, on NumPy copies of one layer at a time) with a
progress bar per layer; "gptq-mse" is GPTQ with clip-searched group scales (`quality.gptq(clip=True)`),
"gptq-ao" GPTQ in act-order with static groups (`quality.gptq(act_order=True)`), "gptq-ao-mse" both
(measured on SmolLM2-135M, W4A16 g128 with a zero point: perplexity +51.7% over fp32 for "gptq",
+15.8% "gptq-mse", see `quality.gptq` and bench/results/quality-cpu-2026-12-01.md for the act-order rows).
The Hessians come from the float model's inputs to each layer, in one pass (not layer by layer
from the partly quantized model, as the reference GPTQ does). AWQ's per-channel factors become the
layer's `smooth` vector (the layer divides its input by them, as SmoothQuant's do), so the result
serves, saves and loads like any
QLinear. Layers are chosen as in `quantize_` (same default skips, same `filter_fn`); a layer the
batches never reach is skipped with that reason.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from qkernels import quality
from qkernels.dispatch import SlowPathWarning
from qkernels.formats import Recipe
from torch_bindings.calibrate import call
from torch_bindings.modules import QLinear, Summary, candidates, swap_modules
from torch_bindings.qtensor import QTensor

__all__ = ["METHODS", "quantize_calibrated"]

METHODS = ("gptq", "gptq-mse", "gptq-ao", "gptq-ao-mse", "awq")
"""GPTQ with each group's range by the format's rule on the updated weights (natural order); "-mse": by
the clip search; "-ao": act-order (columns by decreasing Hessian diagonal) with static groups, the
parameters fixed ahead from the original weights (`quality.gptq(act_order=True)`); AWQ."""


class _Rows:
    """A uniform random sample of at most `limit` rows seen over all batches (reservoir, seeded)."""

    def __init__(self, limit: int, seed: int) -> None:
        self.limit, self.seen, self.rows = limit, 0, None
        self.rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        self.seen += len(x)
        pool = x if self.rows is None else np.concatenate([self.rows, x])
        if len(pool) > self.limit:  # keep each row seen so far with equal probability
            pool = pool[np.sort(self.rng.choice(len(pool), self.limit, replace=False))]
        self.rows = pool


class _Stats:
    """What `method` keeps of each layer's inputs (the module docstring's table), fed by `hook` (a forward
    pre-hook); `stats[layer]` is `[H, rows]` (GPTQ) or a `_Rows` sample (AWQ)."""

    def __init__(self, layers: list[nn.Linear], method: str, rows: int) -> None:
        self.hessian = method != "awq"
        self.stats: dict[nn.Module, Any] = {m: [None, 0] if self.hessian else _Rows(rows, i)
                                            for i, m in enumerate(layers)}
        # the last input seen (held, so its id is not reused; with its version, so an in-place change counts as
        # new) and its Gram matrix: the layers that read one tensor (q/k/v, gate/up) share one product
        self._last: list[Any] = [None, -1, None]

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, module.in_features)
        if self.hessian:  # X^T X by torch's matmul in f32 (as the reference GPTQ), the running mean in f64
            last = self._last
            if last[0] is not args[0] or last[1] != args[0]._version:
                xf = x.to(torch.float32)
                last[:] = args[0], args[0]._version, (xf.T @ xf).cpu().numpy()
            h, n = self.stats[module]
            self.stats[module] = list(quality.hessian_merge(h, n, last[2], x.shape[0]))
        else:
            self.stats[module].update(x.to(torch.float32).cpu().numpy())

    def reached(self, module: nn.Module) -> bool:
        stat = self.stats[module]
        return stat[1] > 0 if self.hessian else stat.seen > 0


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
    handles = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0]))) for m in layers]
    try:
        with torch.no_grad():
            block(*first[0], **first[1])
    finally:
        for h in handles:
            h.remove()
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
    """The layer quantized by `method` from its statistics (`quality.gptq` / `quality.awq` on NumPy copies)."""
    w = module.weight.detach().to(torch.float32).cpu().numpy()
    smooth = None
    if method != "awq":
        op = quality.gptq(w, stat[0], recipe.rhs, act_order=act_order or "-ao" in method, clip=method.endswith("-mse"))
    else:
        op, smooth = quality.awq(w, stat.rows, recipe.rhs)
    device = module.weight.device
    qvalue, scale, zero = (None if t is None else torch.from_numpy(np.ascontiguousarray(t)).to(device)
                           for t in (op.qvalue, op.scale, op.zero_point))
    weight = QTensor(qvalue=qvalue, scale=scale, zero_point=zero, recipe=recipe,
                     shape=(module.out_features, module.in_features),
                     smooth=None if smooth is None else torch.from_numpy(smooth).to(device))
    return QLinear.from_qtensor(weight, module.bias)


def _collect(runs: list[Callable[[], Any]], stats: _Stats, layers: list[nn.Module], stop_after: bool) -> None:
    """Each of `runs` (a forward each) with `stats.hook` on `layers`; with `stop_after`, a forward ends once
    every layer has been hit (a pre-hook: its input is taken first)."""
    hit: set[nn.Module] = set()

    def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        stats.hook(m, args)
        hit.add(m)
        if stop_after and len(hit) == len(layers):
            raise _Stop

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the quantized layers run many rows here; what they would be slower than matters when serving
            warnings.simplefilter("ignore", SlowPathWarning)
            for run in runs:
                hit.clear()
                try:
                    run()
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


def quantize_calibrated(model: nn.Module, recipe: Recipe, batches: Iterable[Any], method: str,
                        filter_fn: Callable[[nn.Module, str], bool] | None, *, rows: int = 512,
                        act_order: bool = False, sequential: bool | None = None, progress: bool = True) -> Summary:
    """`qk.quantize_` with a data-aware `method` (see the module docstring). `sequential`: None replays the
    blocks one after the other where the model allows it (else one pass), True requires it (ValueError saying
    why it cannot), False takes one pass of the float model."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} with calibration batches: choose one of {METHODS}")
    batches = list(batches)
    if not batches:
        raise ValueError("calibration got no batch; pass an iterable of model inputs (e.g. a few hundred tokens' "
                         "worth of real data)")
    is_linear = lambda m: isinstance(m, nn.Linear)  # noqa: E731
    layers = [m for _, _, m, reason in candidates(model, is_linear, filter_fn) if reason is None]
    stats = _Stats([m for _, _, m, _ in candidates(model, is_linear, filter_fn)], method, rows)
    bar = _progress(len(layers), method) if progress else None
    done: dict[nn.Module, QLinear] = {}

    def solve(stage: list[nn.Module]) -> None:  # quantize, and run the rest of the calibration through it
        for m in stage:
            if stats.reached(m):
                done[m] = _solve(m, stats.stats[m], recipe, method, act_order)
                m.forward = done[m].forward
                stats.stats[m] = None  # the Hessian / sample is not needed again
                if bar is not None:
                    bar.update()

    try:
        blocks = _blocks(model, set(layers)) if sequential is not False and layers else []
        why = None if blocks else "no nn.ModuleList of blocks holds the layers"
        if blocks:
            inputs, why = _block_inputs(model, blocks, batches)
        if sequential and layers and why is not None:
            raise ValueError(f"sequential=True: {why}; pass sequential=False (statistics from one pass of the "
                             f"float model)")
        if why is None:
            inside = {m for b in blocks for m in b.modules()}
            for block in blocks:
                mine = [m for m in block.modules() if m in set(layers)]
                for stage, stop in _stages(block, inputs[0], mine) if mine else []:
                    _collect([functools.partial(block, *a, **k) for a, k in inputs], stats, stage, stop)
                    solve(stage)
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", SlowPathWarning)
                    inputs = [_with_hidden(a, k, _output(block(*a, **k))) for a, k in inputs]
            rest = [m for m in layers if m not in inside]
        else:
            rest = layers
        if rest:  # one pass of the model (the blocks quantized where they were replayed)
            _collect([functools.partial(call, model, b) for b in batches], stats, rest, False)
            solve(rest)
    finally:
        for m in done:
            del m.forward
        if bar is not None:
            bar.close()
    return swap_modules(model, is_linear, lambda m, _: done[m], lambda m: m.recipe.name, filter_fn,
                        skip=lambda m, _: None if m in done else "saw no input in the calibration batches")


def _progress(total: int, method: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no bar without tqdm; the summary still lists every layer
        return None
    return tqdm(total=total, desc=f"{method} layers", unit="layer", leave=False)
