"""Static activation scales and SmoothQuant for torch models: `calibrate` and `smoothquant_`.

Both run example batches through the model with observers (`qkernels.calibration.Observer`, the
framework-neutral numerics the JAX binding shares) in forward pre-hooks on the layers, under
`torch.no_grad()`; hooks are removed afterwards, whatever happens. A batch is passed to the model as
`model(batch)`, `model(*batch)` for a tuple or list, `model(**batch)` for a dict.

SmoothQuant's activation side is applied inside each layer (`QLinear.smooth`: `x / s` before the
activations are quantized), not folded into a preceding LayerNorm: that fold is only valid where the
norm feeds nothing but the smoothed layers (q/k/v share it, a residual branch must not see it), which
needs the model's graph; the division costs one elementwise pass over the layer's input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from qkernels import calibration
from qkernels.formats import W8A8, resolve_recipe
from torch_bindings.arrays import TORCH_OPS
from torch_bindings.modules import QLinear, Summary, record_hf, swap_modules
from torch_bindings.qtensor import quantize

__all__ = ["calibrate", "smoothquant_"]


def call(model: nn.Module, batch: Any) -> Any:
    """`model(**batch)` for a dict, `model(*batch)` for a tuple or list, else `model(batch)`."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode (no dropout; BatchNorm's running statistics read, not updated: calibration
    must not change the model), each module's own mode restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _run(model: nn.Module, batches: Iterable[Any], hooks: dict[nn.Module, Callable[..., None]]) -> int:
    handles = [m.register_forward_pre_hook(hook) for m, hook in hooks.items()]
    seen = 0
    try:
        with torch.no_grad(), evaluating(model):
            for batch in batches:
                call(model, batch)
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError("calibration got no batch; pass an iterable of model inputs (e.g. a few hundred tokens' "
                         "worth of real data)")
    return seen


def _unreached(observers: dict[str, calibration.Observer]) -> list[str]:
    return [fqn for fqn, obs in observers.items() if obs.amax is None]


def calibrate(model: nn.Module, batches: Iterable[Any], *, method: str = "absmax",
              percentile: float = 99.99) -> dict[str, float]:
    """Record the activation range of every static-recipe QLinear over `batches` and set its `input_scale`.

    `method`: "absmax" (max |x| over all batches) or "percentile" (per batch, the `percentile`-th
    percentile of |x|; the max over batches), as `qkernels.calibration.batch_range`. What is observed is
    what the layer quantizes (its input divided by its SmoothQuant factors, if any). While calibrating,
    each layer serves with the running range so far, so later layers see the activations they will serve.
    Returns {layer fqn: calibrated range}. Raises if the model has no static layer or a layer saw no input.
    """
    layers = {fqn: m for fqn, m in model.named_modules() if isinstance(m, QLinear) and m.recipe.static}
    if not layers:
        raise ValueError("calibrate found no QLinear with a static recipe; quantize first with "
                         "qk.quantize_(model, qk.W8A8(static=True)) (or qk.W4A8(g, static=True))")
    observers = {fqn: calibration.Observer(method=method, percentile=percentile) for fqn in layers}

    def hook(fqn: str) -> Callable[..., None]:
        obs = observers[fqn]

        def pre(module: QLinear, args: tuple[Any, ...]) -> None:
            x = args[0]
            if module.smooth is not None:
                x = calibration.smooth_activations(x, module.smooth, TORCH_OPS)
            obs.update(x, TORCH_OPS)
            module.input_scale = obs.scale(TORCH_OPS).to(torch.float32)

        return pre

    for m in layers.values():
        m.input_scale = None  # a layer the batches never reach must not keep a stale scale
    _run(model, batches, {m: hook(fqn) for fqn, m in layers.items()})
    missing = _unreached(observers)
    if missing:
        raise ValueError(f"layers {missing} saw no input in the calibration batches (they stay uncalibrated); run "
                         f"batches that reach them, or quantize them with a dynamic recipe")
    return {fqn: float(obs.amax) for fqn, obs in observers.items()}


def smoothquant_(model: nn.Module, batches: Iterable[Any], recipe: Any = W8A8(static=True), alpha: float = 0.5, *,
                 method: str = "absmax", percentile: float = 99.99,
                 filter_fn: Callable[[nn.Module, str], bool] | None = None) -> Summary:
    """SmoothQuant: quantize the `nn.Linear` layers of a float `model` with per-input-channel smoothing.

    One pass over `batches` records each layer's per-channel activation ranges; each layer then gets
    `s = act_amax**alpha / weight_amax**(1 - alpha)` (`qkernels.calibration.smoothing_factors`), its weight
    `w * s` quantized with `recipe` and `QLinear.smooth = s` (the layer divides its input by s). For a static
    recipe the scales are then calibrated on the smoothed activations (`calibrate(method, percentile)`).
    Layers are chosen as in `quantize_` (same default skips, same `filter_fn`); a layer the batches never
    reach is skipped with that reason. In place; returns the `Summary`.
    """
    recipe = resolve_recipe(recipe)
    batches = list(batches)  # read twice for a static recipe (ranges, then scales of the smoothed inputs)
    if recipe.lhs is None:
        raise ValueError(f"SmoothQuant moves activation outliers into the weights for quantized activations; "
                         f"{recipe.name} keeps its activations float (use qk.W8A8 or qk.W8A8(static=True))")
    linears = {fqn: m for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}
    observers = {fqn: calibration.Observer(per_channel=True) for fqn in linears}

    def hook(fqn: str) -> Callable[..., None]:
        return lambda module, args: observers[fqn].update(args[0], TORCH_OPS)

    _run(model, batches, {m: hook(fqn) for fqn, m in linears.items()})
    unreached = set(_unreached(observers))

    def make(module: nn.Linear, fqn: str) -> QLinear:
        w = module.weight.detach()
        s = calibration.smoothing_factors(observers[fqn].amax, TORCH_OPS.absmax(w.to(torch.float32).T)[..., 0],
                                          alpha, TORCH_OPS)
        wq = quantize(calibration.smooth_weight(w, s, TORCH_OPS), recipe, name=f"smoothed weight of {fqn}")
        layer = QLinear.from_qtensor(wq, module.bias)
        layer.smooth = s.contiguous()
        return layer

    summary = swap_modules(model, lambda m: isinstance(m, nn.Linear), make, lambda m: m.recipe.name, filter_fn,
                           skip=lambda m, fqn: "saw no input in the calibration batches" if fqn in unreached else None)
    if recipe.static and summary.swapped:
        calibrate(summary.model, batches, method=method, percentile=percentile)
    record_hf(summary.model)
    return summary
