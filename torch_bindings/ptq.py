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

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from qkernels import quality
from qkernels.formats import Recipe
from torch_bindings.calibrate import _run
from torch_bindings.modules import QLinear, Summary, swap_modules
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


def _stats(model: nn.Module, batches: Iterable[Any], method: str, rows: int) -> dict[nn.Module, Any]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hessian = method != "awq"
    stats: dict[nn.Module, Any] = {m: [None, 0] if hessian else _Rows(rows, i) for i, m in enumerate(linears)}
    # the last input seen (held, so its id is not reused; with its version, so an in-place change counts as
    # new) and its Gram matrix: the layers that read one tensor (q/k/v, gate/up) share one product
    last: list[Any] = [None, -1, None]

    def hook(module: nn.Linear, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, module.in_features)
        if hessian:  # X^T X by torch's matmul in f32 (as the reference GPTQ), the running mean in f64
            if last[0] is not args[0] or last[1] != args[0]._version:
                xf = x.to(torch.float32)
                last[:] = args[0], args[0]._version, (xf.T @ xf).cpu().numpy()
            h, n = stats[module]
            stats[module] = list(quality.hessian_merge(h, n, last[2], x.shape[0]))
        else:
            stats[module].update(x.to(torch.float32).cpu().numpy())

    _run(model, batches, {m: hook for m in linears})
    return stats


def _reached(stat: Any) -> bool:
    return stat[1] > 0 if isinstance(stat, list) else stat.seen > 0


def quantize_calibrated(model: nn.Module, recipe: Recipe, batches: Iterable[Any], method: str,
                        filter_fn: Callable[[nn.Module, str], bool] | None, *, rows: int = 512,
                        act_order: bool = False, progress: bool = True) -> Summary:
    """`qk.quantize_` with a data-aware `method` (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} with calibration batches: choose one of {METHODS}")
    stats = _stats(model, batches, method, rows)
    fmt = recipe.rhs
    bar = _progress(sum(_reached(s) for s in stats.values()), method) if progress else None

    def make(module: nn.Linear, fqn: str) -> QLinear:
        w = module.weight.detach().to(torch.float32).cpu().numpy()
        smooth = None
        if method != "awq":
            op = quality.gptq(w, stats[module][0], fmt, act_order=act_order or "-ao" in method,
                              clip=method.endswith("-mse"))
        else:
            op, smooth = quality.awq(w, stats[module].rows, fmt)
        device = module.weight.device
        qvalue, scale, zero = (None if t is None else torch.from_numpy(np.ascontiguousarray(t)).to(device)
                               for t in (op.qvalue, op.scale, op.zero_point))
        weight = QTensor(qvalue=qvalue, scale=scale, zero_point=zero, recipe=recipe,
                         shape=(module.out_features, module.in_features),
                         smooth=None if smooth is None else torch.from_numpy(smooth).to(device))
        if bar is not None:
            bar.set_postfix_str(fqn, refresh=False)
            bar.update()
        return QLinear.from_qtensor(weight, module.bias)

    try:
        return swap_modules(model, lambda m: isinstance(m, nn.Linear), make, lambda m: m.recipe.name, filter_fn,
                            skip=lambda m, fqn: None if _reached(stats[m]) else "saw no input in the calibration batches")
    finally:
        if bar is not None:
            bar.close()


def _progress(total: int, method: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no bar without tqdm; the summary still lists every layer
        return None
    return tqdm(total=total, desc=f"{method} layers", unit="layer", leave=False)
