"""Calibrated activation ranges and SmoothQuant smoothing, written once for every framework.

Static-range recipes (`qk.W8A8(static=True)`) quantize a layer's activations with one scale fixed
ahead of time from example batches, instead of an absmax pass per call. This module holds the
numerics of that calibration, against `numerics.ArrayOps` like the rest of the core, so the torch
observers (`qk.calibrate`) and the JAX calibrate mode compute the same ranges and scales:

    amax = None
    for x in batches:                                  # the layer's inputs (..., K)
        amax = merge_ranges(amax, batch_range(x, ops, method="percentile"), ops)
    input_scale = static_scale(amax, ops)              # f32 (); recipe.quantize_lhs(ops, x, input_scale)

| method       | one batch's range                               | over batches        |
|--------------|-------------------------------------------------|---------------------|
| "absmax"     | max |x|                                         | max (order-free)    |
| "percentile" | the `percentile`-th percentile of |x| (NumPy's linear rule) | max of the batches' |

`per_channel=True` gives one range per input channel (along K: over every axis but the last), what
SmoothQuant's factors are computed from:

    s = smoothing_factors(act_amax_per_channel, weight_amax_per_input_channel, alpha=0.5, ops)
    y = (x / s) @ (w * s).T  ==  x @ w.T                 # smooth_activations, smooth_weight

Outlier channels of the activations move into the weights, which quantize per output channel and
absorb them; the activations' per-tensor (or per-token) range shrinks. The division is IEEE (never a
reciprocal multiply), so every framework smooths to the same values; max |x / s| over a channel is
exactly max|x| / s (division is monotone), so calibrating before or after smoothing agrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qkernels import numerics
from qkernels.numerics import INT8, NUMPY_OPS, ArrayOps, QType

__all__ = [
    "METHODS", "batch_range", "merge_ranges", "static_scale", "smoothing_factors", "smooth_weight",
    "smooth_activations", "Observer",
]

METHODS = ("absmax", "percentile")
SMOOTHING_CLIP = (1e-5, 1e5)
"""SmoothQuant factors are clipped to this range: a dead channel must not become a huge weight column."""


def _check_method(method: str, percentile: float) -> None:
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r} is not known; choose one of {METHODS}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile={percentile} must be in (0, 100], e.g. 99.99")


def batch_range(x: Any, ops: ArrayOps = NUMPY_OPS, *, method: str = "absmax", percentile: float = 99.99,
                per_channel: bool = False) -> Any:
    """The range of one batch of activations `x` (..., K): f32 `()` or, `per_channel`, `(K,)`.

    NaN/Inf values are refused where the framework can check on the host (a calibrated range must be
    finite); subnormal values read as 0, as in quantize (`numerics.flush_subnormals`).
    """
    _check_method(method, percentile)
    if ops.host_checks and not ops.all_finite(x):
        raise ValueError(f"calibration batch holds {ops.count_nonfinite(x)} NaN/Inf value(s); a range must be "
                         f"finite: clean the batch (e.g. nan_to_num) or leave it out")
    a = abs(numerics.flush_subnormals(ops.cast(x, "float32"), ops))
    k = a.shape[-1] if a.ndim else 1
    cols = a.reshape(-1, k) if per_channel else a.reshape(-1, 1)
    if method == "absmax":
        r = ops.absmax(cols.T)[..., 0]  # max over rows, per column (exact)
    else:
        r = ops.quantile(cols, percentile / 100)
    return r if per_channel else r.reshape(())


def merge_ranges(a: Any, b: Any, ops: ArrayOps = NUMPY_OPS) -> Any:
    """Running range: the elementwise max of two ranges (`a` may be None, the first batch)."""
    if a is None:
        return b
    return ops.where(a > b, a, b)


def static_scale(amax: Any, ops: ArrayOps = NUMPY_OPS, qtype: QType = INT8) -> Any:
    """The per-tensor scale a static format quantizes with, from a calibrated range: the dynamic rule
    (`numerics.symmetric_scale`: amax / qmax, 1 where that is 0 or below FLT_MIN) on the range."""
    return numerics.symmetric_scale(amax, qtype, ops)


def smoothing_factors(act_amax: Any, weight_amax: Any, alpha: float = 0.5, ops: ArrayOps = NUMPY_OPS) -> Any:
    """SmoothQuant's per-input-channel factors `s = act_amax**alpha / weight_amax**(1 - alpha)`, (K,) f32.

    `act_amax`: per-channel activation ranges (`batch_range(..., per_channel=True)`); `weight_amax`:
    max |w[:, k]| over output channels. A channel whose activation or weight range is 0 keeps s = 1;
    s is clipped to `SMOOTHING_CLIP`. alpha = 0 leaves the activations alone, 1 moves their whole
    range into the weights; 0.5 is SmoothQuant's default (0.75-0.85 for models with strong outliers).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (SmoothQuant's migration strength, e.g. 0.5)")
    act = ops.cast(act_amax, "float32")
    w = ops.cast(weight_amax, "float32")
    if tuple(act.shape) != tuple(w.shape) or act.ndim != 1:
        raise ValueError(f"activation ranges {tuple(act.shape)} and weight ranges {tuple(w.shape)} must both be "
                         f"(K,), one per input channel")
    live = (act > 0) & (w > 0)
    safe_act, safe_w = ops.where(live, act, 1.0), ops.where(live, w, 1.0)
    s = ops.div(safe_act ** alpha, safe_w ** (1 - alpha))
    return ops.clip(ops.where(live, s, 1.0), *SMOOTHING_CLIP)


def smooth_weight(w: Any, s: Any, ops: ArrayOps = NUMPY_OPS) -> Any:
    """The weight (..., N, K) with input channel k multiplied by s[k] (fold before quantizing)."""
    return ops.cast(w, "float32") * ops.cast(s, "float32")


def smooth_activations(x: Any, s: Any, ops: ArrayOps = NUMPY_OPS) -> Any:
    """The activations (..., K) with channel k divided by s[k] (IEEE division), in f32."""
    x = ops.cast(x, "float32")
    return ops.div(x, ops.broadcast_to(ops.cast(s, "float32"), tuple(x.shape)))


@dataclass(kw_only=True, slots=True)
class Observer:
    """A running range for eager frameworks: `update(x, ops)` per batch, then `amax` (None before any).

    `scale` is the static scale of that range (`static_scale`)."""

    method: str = "absmax"
    percentile: float = 99.99
    per_channel: bool = False
    amax: Any = field(default=None, init=False)
    batches: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        _check_method(self.method, self.percentile)

    def update(self, x: Any, ops: ArrayOps = NUMPY_OPS) -> None:
        r = batch_range(x, ops, method=self.method, percentile=self.percentile, per_channel=self.per_channel)
        if self.amax is not None and tuple(r.shape) != tuple(self.amax.shape):
            raise ValueError(f"batch range of shape {tuple(r.shape)} does not match the running one "
                             f"{tuple(self.amax.shape)}: the layer's input width changed between batches")
        self.amax = merge_ranges(self.amax, r, ops)
        self.batches += 1

    def scale(self, ops: ArrayOps = NUMPY_OPS, qtype: QType = INT8) -> Any:
        if self.amax is None:
            raise ValueError("this observer has seen no batch: run the calibration batches through the model first")
        return static_scale(self.amax, ops, qtype)
