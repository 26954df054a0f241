"""Choosing codes that keep the model: MSE-optimal clipping (data-free), written once for every framework.

Round-to-nearest with an absmax scale spends the whole code range on each block's largest value;
for 4-bit weights most values then land on a handful of codes. Shrinking the block's range (and
saturating the few values beyond it) lowers the reconstruction error; this module searches the
shrink factor per block, as AWQ's clip search and HQQ do, without calibration data:

    for alpha in grid (1.0 down to min_shrink):
        err[block] = sum over the block of (dequantize(quantize(clip(x, alpha * range))) - x)**2
    codes = quantize(clip(x, best alpha * range))        # the format's own quantizer, nothing new

Clipping the values to `alpha * range` and then quantizing with the format's own rule gives exactly
the scale `alpha * amax / qmax` (the clipped maximum is an element of the block) and saturated codes
for the clipped values, so the stored form, the kernels and every backend are unchanged: only the
choice of scale differs. Asymmetric (zero-point) formats shrink min and max by the same factor.

`widen_search` (method "mse-wide") searches the other way: the range widened by 1 to 1.2, nothing
clipped, the MSE-best factor per block (with an integer zero point, round to nearest can land the
block's min or max up to half a step off its level; widening moves the levels). `refit` then
alternates, per block, between the codes and a closed-form scale (and the best integer zero point
near the current one): method "mse-refit" (least squares, from the clip search) and "hqq" (HQQ's
sparse-error objective, from round to nearest).

Measured on SmolLM2-135M, W4A16 g128 with a zero point (perplexity of bench/data/perplexity.txt,
420 tokens, over the fp32 model's 23.86; weights replaced by their dequantized values;
bench/results/quality-cpu-2026-12-01.md has the served rows): lowering the
weights' error by clipping raises the perplexity, widening lowers it.

| data-free choice of each group's range                       | perplexity |
|--------------------------------------------------------------|------------|
| round to nearest (full range)                                | 31.14      |
| MSE clip, shrink in [0.5, 1] ("mse")                         | 35.58      |
| MSE clip, shrink in [0.85, 1]                                | 34.87      |
| clip minimizing sum |e|**4 instead                           | 35.63      |
| MSE clip weighted by w**2                                    | 31.28      |
| MSE clip weighted by the preceding RMSNorm's gamma**2 (q/k/v, gate/up) | 31.24 |
| min and max shrunk or widened separately, [0.94, 1.12] each  | 32.59      |
| MSE widening in [1, 1.1] / [1, 1.2] ("mse-wide") / [1, 1.3]  | 29.56 / 29.48 / 29.51 |
| min and max widened separately, [1, 1.15] each               | 29.68      |

On all-MiniLM-L6-v2 no weight-only choice here reaches the issue's cosine 0.98 (0.9600 round to nearest,
0.9665 "mse-refit"), nor does weighting the search by the feeding LayerNorm's gamma**2 + beta**2
(0.9665); GPTQ on random token ids does (`torch_bindings.synthetic`, method "gptq-synthetic": 0.9857).
"""

from __future__ import annotations

from typing import Any

import math

import numpy as np

from qkernels import calibration
from qkernels.formats import Calibration, Granularity, OperandFormat, QOperand
from qkernels.numerics import (
    FLT_MIN, NUMPY_OPS, ArrayOps, asymmetric_params, check_finite, flush_subnormals, pack_int4, quantize_asymmetric,
    quantize_symmetric, symmetric_scale,
)

__all__ = ["METHODS", "clip_search", "widen_search", "refit", "quantize_weight", "hessian_update", "hessian_merge",
           "gptq", "GPTQ_METHODS", "gptq_named", "gptq_target", "awq",
           "awq_gram"]

METHODS = ("rtn", "mse", "mse-wide", "mse-refit", "hqq")
"""Data-free weight quantization methods: round to nearest on the full range; MSE-optimal clipping;
the MSE-optimal widening of the range (`widen_search`: nothing clipped); the clipping refined by
alternating least squares (`refit`); HQQ's half-quadratic solver (`refit`)."""


def _padded_blocks(x: Any, fmt: OperandFormat, ops: ArrayOps) -> tuple[Any, Any]:
    """`x` as `fmt.quantize` reads it (subnormals flushed, K padded): (..., K_padded) and its blocks."""
    xf = ops.pad_last(flush_subnormals(ops.cast(x, "float32"), ops), fmt.padded_k(x.shape[-1]))
    return xf, fmt.blocks(xf)


def _clip_blocks(xb: Any, lo: Any, hi: Any, ops: ArrayOps) -> Any:
    return ops.where(xb < lo, lo, ops.where(xb > hi, hi, xb))


def clip_search(x: Any, fmt: OperandFormat, ops: ArrayOps = NUMPY_OPS, *, grid: int = 20,
                min_shrink: float = 0.5, importance: Any = None) -> QOperand:
    """`fmt.quantize(x)` with each block's range shrunk by the factor in `linspace(1, min_shrink, grid)`
    that minimizes the block's squared reconstruction error (ties keep the larger factor; 1.0 is in
    the grid, so the result is never worse than round-to-nearest on the full range).

    `importance` (K,): weights the error of each input channel, e.g. the mean squared activation of
    that channel, so the search minimizes the layer's expected output error instead (AWQ's clip)."""
    if fmt.static:
        raise ValueError("clip search chooses per-block scales; a static format's scale is calibrated instead")
    if not (isinstance(grid, int) and grid >= 1) or not 0 < min_shrink <= 1:
        raise ValueError(f"grid={grid!r} must be an integer >= 1 and min_shrink={min_shrink!r} in (0, 1]")
    k = x.shape[-1]
    xf, xb = _padded_blocks(x, fmt, ops)
    asym = fmt.calibration is Calibration.MINMAX
    lo0 = ops.min(xb) if asym else -ops.absmax(xb)
    hi0 = ops.max(xb) if asym else ops.absmax(xb)
    wt = None if importance is None else _block_importance(importance, k, fmt, ops)
    best_alpha, best_err = None, None
    for i in range(grid):
        alpha = 1.0 - (1.0 - min_shrink) * i / max(grid - 1, 1)
        xc = _clip_blocks(xb, lo0 * alpha, hi0 * alpha, ops).reshape(*xf.shape)
        dq = fmt.blocks(ops.pad_last(fmt.dequantize(fmt.quantize(xc, ops), fmt.padded_k(k), ops), fmt.padded_k(k)))
        sq = (dq - xb) * (dq - xb)
        err = (sq if wt is None else sq * wt).sum(-1)[..., None]
        if best_err is None:
            best_alpha, best_err = ops.where(err >= 0, alpha, alpha), err
        else:
            better = err < best_err
            best_alpha, best_err = ops.where(better, alpha, best_alpha), ops.where(better, err, best_err)
    xc = _clip_blocks(xb, lo0 * best_alpha, hi0 * best_alpha, ops).reshape(*xf.shape)
    return fmt.quantize(xc, ops)


def widen_search(x: Any, fmt: OperandFormat, ops: ArrayOps = NUMPY_OPS, *, grid: int = 11,
                 max_widen: float = 1.2, importance: Any = None) -> QOperand:
    """`x` (..., K) quantized to `fmt` with each block's range widened by the factor in
    `linspace(1, max_widen, grid)` that minimizes the block's squared reconstruction error: the scale
    (and integer zero point) come from `(alpha * min, alpha * max)` (symmetric: `alpha * amax`) by the
    format's own rule, so no value is clipped; what moves is where the grid's levels fall (with an
    integer zero point, round to nearest lands the block's min or max up to half a step off its level).
    1.0 is in the grid, so the error is never above round to nearest's (ties keep the smaller factor).
    `importance` (K,) weights each input channel's error, as in `clip_search`.

    Why not shrink (`clip_search`): on SmolLM2-135M (W4A16 g128 with a zero point) every shrink of the
    range raised the perplexity although it lowered the weights' error (+49% over fp32 for the MSE clip
    in [0.5, 1], +46% for a mild one in [0.85, 1], +30.5% round to nearest), while widening in
    [1, 1.2] gave +23.5%: saturating a group's extreme weights costs the model more than their squared
    error says.
    """
    if fmt.static or not fmt.qtype.integer:
        raise ValueError(f"widen_search chooses per-block scales of integer codes, not {fmt.describe()}")
    if not (isinstance(grid, int) and grid >= 1) or not max_widen >= 1:
        raise ValueError(f"grid={grid!r} must be an integer >= 1 and max_widen={max_widen!r} >= 1")
    xf, xb = _padded_blocks(x, fmt, ops)
    asym = fmt.calibration is Calibration.MINMAX
    lo0, hi0 = (ops.min(xb), ops.max(xb)) if asym else (None, ops.absmax(xb))
    wt = None if importance is None else _block_importance(importance, x.shape[-1], fmt, ops)

    def params(alpha: float) -> tuple[Any, Any]:
        if asym:
            return asymmetric_params(lo0 * alpha, hi0 * alpha, fmt.qtype, ops)
        return symmetric_scale(hi0 * alpha, fmt.qtype, ops), None

    best = None
    for i in range(grid):
        scale, zero = params(1.0 + (max_widen - 1.0) * i / max(grid - 1, 1))
        err = _block_error(xb - _block_codes(xb, scale, zero, fmt, ops)[1], 2.0, wt)
        if best is None:
            best = (err, scale, zero)
            continue
        take = err < best[0]
        best = (ops.where(take, err, best[0]), ops.where(take, scale, best[1]),
                None if zero is None else ops.where(take, zero, best[2]))
    _, scale, zero = best
    codes = _block_codes(xb, scale, zero, fmt, ops)[0].reshape(*xf.shape)
    if fmt.packed:
        codes = pack_int4(codes, ops)
    return QOperand(codes, fmt._stored(scale), None if zero is None else fmt._stored(ops.cast(zero, "int8")))


def _block_codes(xb: Any, scale: Any, zero: Any, fmt: OperandFormat, ops: ArrayOps) -> tuple[Any, Any]:
    """(codes, dequantized values) of the blocks `xb` with per-block `scale` and `zero` (None: symmetric)."""
    if zero is None:
        c = quantize_symmetric(xb, scale, fmt.qtype, ops)
        return c, ops.cast(c, "float32") * scale
    c = quantize_asymmetric(xb, scale, zero, fmt.qtype, ops)
    return c, (ops.cast(c, "float32") - ops.cast(zero, "float32")) * scale


def _block_error(e: Any, lp_norm: float, weight: Any = None) -> Any:
    """sum over each block of |e|**p (times `weight`, per element of a block, when given), kept (..., n_blocks, 1)."""
    a = abs(e)
    a = (a * a) if lp_norm == 2 else a ** lp_norm
    return (a if weight is None else a * weight).sum(-1)[..., None]


def _block_importance(importance: Any, k: int, fmt: OperandFormat, ops: ArrayOps) -> Any:
    """Per-input-channel weights (K,) in the blocks' shape (n_blocks, block), zero on the padding."""
    return fmt.blocks(ops.pad_last(ops.cast(ops.asarray(importance), "float32")[None, :], fmt.padded_k(k)))[0]


def refit(x: Any, fmt: OperandFormat, ops: ArrayOps = NUMPY_OPS, *, start: QOperand | None = None,
          iters: int = 10, lp_norm: float = 2.0, beta: float = 10.0, kappa: float = 1.01) -> QOperand:
    """`x` (..., K) quantized to `fmt` with each block's scale (and integer zero point) refined by
    alternating minimization of the block's error `sum |x - dequantize(codes)|**lp_norm`:

        codes = quantize(x, scale, zero)                      # the format's rounding, nothing new
        e     = shrink(x - dequantize(codes), beta)           # HQQ's sparse error; 0 for lp_norm = 2
        scale = sum((x - e) * (codes - zero)) / sum((codes - zero)**2)   # closed form, per block
        zero  = the best of zero - 1, zero, zero + 1          # zero-point formats; beta *= kappa

    Each block keeps the iterate with its lowest error (the start included, so it never gets worse
    than `start`: `fmt.quantize(x)` when None). lp_norm = 2 is least squares (method "mse-refit"
    starts it from `clip_search`); lp_norm < 1 is HQQ's half-quadratic solver (Badri & Shaji 2023;
    method "hqq": p = 0.7, beta = 10, kappa = 1.01, 20 iterations, HQQ's defaults, from round to nearest),
    with one departure: HQQ solves for a float zero point with the scale fixed, while qkernels' zero
    points are integers (the kernels subtract them from the codes in integers, DESIGN.md section 3),
    so the closed-form step solves for the scale and the zero point moves by whole codes. HQQ's own
    solver (the scale fixed at the min-max one, the float zero point in closed form, rounded to the
    nearest integer at the end) was measured too, on all-MiniLM-L6-v2 (W4A16 g128 with a zero point,
    bench.quality's mean cosine; weights replaced by their dequantized values): 0.9599 against round to
    nearest's 0.9600 and this "hqq"'s 0.9621 (the zero rounded at every step 0.9600; p = 0.5 0.9599;
    100 steps 0.9598; the scale refit by least squares after rounding 0.9611): what HQQ gains with a
    float zero point is lost when it is rounded back to the integer the kernels take.

    | block                      | result                                                    |
    |----------------------------|-----------------------------------------------------------|
    | all zeros                  | the start's (scale 1, codes 0): no step changes it        |
    | codes all at the zero point| the scale is kept (the closed form divides by zero)       |
    | a step gives scale < FLT_MIN | that step's scale is refused, the previous one kept     |
    """
    if fmt.static or not fmt.qtype.integer:
        raise ValueError(f"refit chooses per-block scales of integer codes, not {fmt.describe()}")
    if not (isinstance(iters, int) and iters >= 0) or not 0 < lp_norm <= 2 or beta <= 0 or kappa < 1:
        raise ValueError(f"iters={iters!r} must be an integer >= 0, lp_norm={lp_norm!r} in (0, 2], "
                         f"beta={beta!r} > 0 and kappa={kappa!r} >= 1")
    xf, xb = _padded_blocks(x, fmt, ops)
    op = fmt.quantize(x, ops) if start is None else start
    scale = fmt._per_block(ops.cast(op.scale, "float32"))
    zero = None if op.zero_point is None else fmt._per_block(ops.cast(op.zero_point, "float32"))
    codes, dq = _block_codes(xb, scale, zero, fmt, ops)
    best = (_block_error(xb - dq, lp_norm), scale, zero)
    for _ in range(iters):
        target = xb
        if lp_norm != 2:  # HQQ's proximal step for |e|**p: e = r soft-thresholded by |r|**(p-1) / beta
            r = xb - dq
            mag = ops.clip(abs(r) - (abs(r) + 1e-8) ** (lp_norm - 1) / beta, 0.0, math.inf)
            target = xb - ops.where(r < 0, -mag, mag)
        d = ops.cast(codes, "float32") - (0.0 if zero is None else zero)
        den = (d * d).sum(-1)[..., None]
        new = (target * d).sum(-1)[..., None]
        new = ops.div(new, ops.where(den > 0, den, 1.0))
        scale = ops.where((den > 0) & (new >= FLT_MIN) & (new < math.inf), new, scale)
        beta *= kappa
        if zero is not None:
            _, dq = _block_codes(xb, scale, zero, fmt, ops)
            err, centre = _block_error(xb - dq, lp_norm), zero
            for dz in (-1.0, 1.0):
                z = ops.clip(centre + dz, 0.0, float(fmt.qtype.qmax))
                e = _block_error(xb - _block_codes(xb, scale, z, fmt, ops)[1], lp_norm)
                take = e < err
                zero, err = ops.where(take, z, zero), ops.where(take, e, err)
        codes, dq = _block_codes(xb, scale, zero, fmt, ops)
        err = _block_error(xb - dq, lp_norm)
        take = err < best[0]
        best = (ops.where(take, err, best[0]), ops.where(take, scale, best[1]),
                None if zero is None else ops.where(take, zero, best[2]))
    _, scale, zero = best
    codes, _ = _block_codes(xb, scale, zero, fmt, ops)
    codes = codes.reshape(*xf.shape)
    if fmt.packed:
        codes = pack_int4(codes, ops)
    return QOperand(codes, fmt._stored(scale), None if zero is None else fmt._stored(ops.cast(zero, "int8")))


def quantize_weight(w: Any, fmt: OperandFormat, ops: ArrayOps = NUMPY_OPS, *, method: str = "rtn") -> QOperand:
    """A weight (..., N, K) quantized to `fmt` by a data-free `method` (one of `METHODS`)."""
    if method == "rtn":
        return fmt.quantize(w, ops)
    if method == "mse":
        return clip_search(w, fmt, ops)
    if method == "mse-wide":
        return widen_search(w, fmt, ops)
    if method == "mse-refit":
        return refit(w, fmt, ops, start=clip_search(w, fmt, ops))
    if method == "hqq":
        return refit(w, fmt, ops, iters=20, lp_norm=0.7)
    raise ValueError(f"method={method!r} is not a data-free method; choose one of {METHODS} "
                     f"(GPTQ and AWQ need calibration batches)")


# --------------------------------------------------------------------------------------------- GPTQ


def hessian_update(h: Any, x: Any, count: int) -> tuple[Any, int]:
    """Running GPTQ Hessian `H = 2/n * sum_batches X^T X` (K, K) in f64 from one batch `x` (..., K).

    `h` None starts one. Returns (H, rows seen). The mean is kept incrementally, so H stays on the
    scale of one row whatever the number of batches (memory: K*K per layer, never the activations)."""
    x2 = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return hessian_merge(h, count, x2.T @ x2, x2.shape[0])


def hessian_merge(h: Any, count: int, gram: Any, rows: int) -> tuple[Any, int]:
    """`hessian_update` from a batch's Gram matrix `X^T X` (K, K) over `rows` rows, computed by the caller
    (a framework's own matmul, once for the layers that share an input). Returns (H f64, rows seen)."""
    if rows == 0:
        return h, count
    gram = np.asarray(gram, np.float64)
    total = count + rows
    return (2.0 / total) * gram if h is None else h * (count / total) + (2.0 / total) * gram, total


def gptq(w: Any, h: Any, fmt: OperandFormat, *, damp: float = 0.01, block: int = 128,
         act_order: bool = False, static_groups: bool = False, clip: bool = False, widen: bool = False) -> QOperand:
    """GPTQ (Frantar et al. 2022): quantize the weight (N, K) column by column, each column's rounding
    error spread over the columns not yet quantized through the inverse Hessian of the layer's
    inputs (`hessian_update`), so that `X @ W^T` rather than `W` itself is preserved.

    The result is in `fmt`'s stored form (NumPy), servable by every backend unchanged:
    - group formats: each group's scale (and zero point) is chosen by `fmt`'s own rule from the
      group's weights as updated when the group is reached (GPTQ's default);
    - `static_groups=True` fixes every group's parameters ahead, from the original weights, in K's
      own order (AutoGPTQ's `static_groups`); `act_order=True` implies it and visits columns by
      decreasing Hessian diagonal, so codes stay in canonical order and no permutation is needed at
      run time (the order is only a visit order);
    - per-row formats take each row's scale from the whole original row first;
    - `clip=True` chooses those parameters by `clip_search` instead of the format's absmax / min-max
      rule (on the same weights), the error of each input weighted by the Hessian's diagonal;
      `widen=True` by `widen_search` (the range widened, never clipped).
    `damp` (fraction of the mean diagonal added to it) keeps H invertible; dead inputs (a zero
    diagonal: never active) get a zero weight column, as in the reference implementation.

    The result is only as good as `h`: GPTQ lowers the output error on the rows H was collected from
    and on rows like them, and it can raise it on rows from elsewhere (measured on SmolLM2-135M, W4A16
    g128 with a zero point, Hessians from 2048 tokens of CPython's reference manual: perplexity of
    held-out manual text +18% over fp32 against round to nearest's +32%, of English prose +60%
    against +30.5%). Calibrate on text like the text the model will serve.

    Act-order matters more than anything else on SmolLM2-135M (W4A16 g128 with a zero point, the
    report's calibration set, 7104 tokens in sequences of 512; perplexity over fp32's 23.86, weights
    replaced by their dequantized values; Hessians from one pass of the float model unless said):

    | GPTQ variant                                  | perplexity |
    |-----------------------------------------------|------------|
    | natural order, ranges of the updated weights ("gptq") | 36.20 (damp 0.03: 37.36, 0.1: 35.76, 0.3: 36.35) |
    | natural order, static groups                  | 33.86      |
    | natural order, widened ranges (`widen=True`)  | 36.89      |
    | act-order, static groups ("gptq-ao")          | 29.80      |
    | act-order, widened static ranges              | 28.89      |
    | natural order, clip-searched ranges ("gptq-mse") | 27.64   |
    | static groups, clip-searched                  | 28.41      |
    | act-order, clip-searched static ranges ("gptq-ao-mse") | 26.54 (damp 0.003: 26.42, 0.03: 25.98) |
    | the same, Hessians block by block through the quantized layers (`torch_bindings.ptq`) | 26.96 |
    | the same, and the float model's outputs as target (`gptq_target`; the torch default) | 25.91 |
    | block by block + the float target (served rows): "gptq" / "gptq-ao" / "gptq-mse" | 26.25 / 24.94 / 26.66 |
    | AWQ's factors, then act-order + clip-searched GPTQ on `w * s` | 27.22 |
    | calibration in sequences of 128 (56 starts, not 14): "gptq" / "gptq-ao-mse" | 30.61 / 26.56 |

    Plain GPTQ lowers the layers' output error on the held-out text (3.3x less than round to
    nearest's over the 21 layers of blocks 0, 10 and 29; the median token's 2.8x less, averaged over
    all 210 layers) and still loses to round to nearest (31.14): the error it moves lands on the rows
    the Hessian saw least. The first token of a sequence (the attention sink) is such a row: its
    layer-output error under plain GPTQ is often above round to nearest's (block 3's v_proj: 0.76
    against 0.46 of its norm), and 4x more sequence starts in the calibration set take plain GPTQ
    from 36.20 to 30.61. Damping does not change it (above); act-order does (that rounding the
    columns of largest Hessian diagonal first, while the most columns remain to absorb their error,
    is why, is the usual reading, not something measured here). So does the asymmetric target through
    the quantized blocks (`gptq_target`, the torch binding's default): plain GPTQ 36.20 -> 26.25,
    below round to nearest, act-order 29.80 -> 24.94 (why the float model's outputs as target help the
    natural order this much was not measured). `damp` stays 0.01: 0.03's 25.98 for "gptq-ao-mse" (one
    pass) was chosen on the evaluated text itself, and the 420 tokens' 95% interval of that row's ratio
    to fp32 (1.06-1.17) holds all three dampings.
    """
    if fmt.static or fmt.granularity is Granularity.TENSOR:
        raise ValueError(f"GPTQ quantizes weights per row or per group, not {fmt.describe()}")
    if not fmt.qtype.integer:
        raise ValueError(f"GPTQ here rounds to integer codes; {fmt.qtype.name} weights are quantized by RTN")
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"GPTQ takes one layer's weight (N, K), got shape {w.shape}; quantize experts one by one")
    n, k = w.shape
    h = np.asarray(h, np.float64)
    check_finite(h, "GPTQ's Hessian of the layer's calibration inputs")
    if h.shape != (k, k):
        raise ValueError(f"Hessian of shape {h.shape} does not match the weight's K={k}: collect it from this "
                         f"layer's inputs (hessian_update)")
    kp = fmt.padded_k(k)
    W = np.zeros((n, kp), np.float64)
    W[:, :k] = w
    H = np.zeros((kp, kp), np.float64)
    H[:k, :k] = h
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(kp)] += damp * np.mean(np.diag(H))
    grouped = fmt.granularity is Granularity.GROUP
    g = fmt.group_size if grouped else kp
    if clip and widen:
        raise ValueError("clip=True shrinks the group ranges and widen=True widens them; choose one")

    def params(wb: np.ndarray, importance: np.ndarray) -> QOperand:
        if clip:
            return clip_search(wb, fmt, importance=importance)
        return widen_search(wb, fmt) if widen else fmt.quantize(wb)

    fixed = None  # per-block parameters fixed ahead (per-row formats; static groups, act-order)
    if not grouped or act_order or static_groups:
        wf = W.astype(np.float32)
        ref = params(wf, np.diag(H))
        fixed = (np.asarray(ref.scale, np.float32).reshape(n, -1),
                 None if ref.zero_point is None else np.asarray(ref.zero_point).reshape(n, -1))
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(kp)
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U
    except np.linalg.LinAlgError as e:
        raise ValueError(f"the layer's Hessian is not positive definite even with damp={damp}; raise damp "
                         f"(e.g. 0.1) or calibrate on more batches") from e
    if grouped:  # blocks hold whole groups, so a group's weights are all current when it is reached
        block = max(block // g, 1) * g
    codes = np.zeros((n, kp), np.int8)
    scale = np.zeros((n, kp // g), np.float32)
    zero = np.zeros((n, kp // g), np.int8) if fmt.zero_point else None
    if fixed is not None:
        scale[:], zero = fixed[0], fixed[1]
    for i1 in range(0, kp, block):
        i2 = min(i1 + block, kp)
        W1 = W[:, i1:i2].copy()
        E = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = perm[i1 + j]
            gi = col // g
            if fixed is None and j % g == 0:  # the group's current (updated) weights, by the format's rule
                cur = W1[:, j:j + g].astype(np.float32)
                qg = params(cur, np.diag(H)[i1 + j:i1 + j + g])
                scale[:, gi] = np.asarray(qg.scale, np.float32).reshape(n)
                if zero is not None:
                    zero[:, gi] = np.asarray(qg.zero_point).reshape(n)
            s = scale[:, gi]
            wcol = W1[:, j].astype(np.float32)
            if zero is None:
                c = quantize_symmetric(wcol, s, fmt.qtype)
                dq = c.astype(np.float64) * s
            else:
                c = quantize_asymmetric(wcol, s, zero[:, gi], fmt.qtype)
                dq = (c.astype(np.float64) - zero[:, gi]) * s
            codes[:, col] = c
            err = (W1[:, j] - dq) / U1[j, j]
            W1[:, j:] -= np.outer(err, U1[j, j:])
            E[:, j] = err
        W[:, i2:] -= E @ U[i1:i2, i2:]
    q = pack_int4(codes) if fmt.packed else codes
    if not grouped:
        return QOperand(q, scale[:, 0], None if zero is None else zero[:, 0])
    return QOperand(q, scale, zero)


# --------------------------------------------------------------------------------------------- AWQ


def gptq_target(w: Any, h: Any, cross: Any, *, damp: float = 0.01) -> np.ndarray:
    """The weight GPTQ should quantize when the layer's inputs `X~` (those through the layers already
    quantized, `h = 2/n X~^T X~`) differ from the float model's `X` (`cross = 2/n X^T X~`): the least-squares
    `W* = argmin ||X~ W*^T - X W^T||` = `W C H^-1`, so that GPTQ on (W*, H) minimizes the error to the float
    model's outputs, not to the layer's own on its quantized inputs (the asymmetric calibration of
    GPTAQ / GPTQModel's "v2"). Solved as `W + W (C - H) (H + damp * mean(diag H))^-1`: the damping pulls W*
    toward W, not toward zero, in the directions the rows barely span (`W C (H + d)^-1` would zero the
    weights there: measured on all-MiniLM-L6-v2, 0.89 of the weight's norm moved on a layer whose inputs
    are the float model's own)."""
    w = np.asarray(w, np.float64)
    h = np.asarray(h, np.float64)
    cross = np.asarray(cross, np.float64)
    k = w.shape[-1]
    if h.shape != (k, k) or cross.shape != (k, k):
        raise ValueError(f"Hessian {h.shape} and cross term {cross.shape} must both be (K, K) with K={k}")
    check_finite(cross, "GPTQ's cross term of the layer's calibration inputs")
    damped = h + damp * max(float(np.mean(np.diag(h))), FLT_MIN) * np.eye(k)
    return (w + np.linalg.solve(damped, (w @ (cross - h)).T).T).astype(np.float32)


GPTQ_METHODS = ("gptq", "gptq-mse", "gptq-ao", "gptq-ao-mse")
"""GPTQ's variants by name (`gptq_named`): the group ranges by the format's rule on the updated weights
(natural order); "-mse": by the clip search; "-ao": act-order with static groups (`gptq(act_order=True)`)."""


def gptq_named(w: Any, h: Any, fmt: OperandFormat, method: str, *, act_order: bool = False) -> QOperand:
    """`gptq` with the options `method` (one of `GPTQ_METHODS`) names; `act_order=True` adds act-order to any."""
    if method not in GPTQ_METHODS:
        raise ValueError(f"method={method!r} is not a GPTQ method; choose one of {GPTQ_METHODS}")
    return gptq(w, h, fmt, act_order=act_order or "-ao" in method, clip=method.endswith("-mse"))


def awq(w: Any, x: Any, fmt: OperandFormat, *, grid: int = 20, clip: bool = True) -> tuple[QOperand, Any]:
    """AWQ (Lin et al. 2023): per-input-channel factors `s = mean|x_k|**alpha` that protect the weights
    of salient channels, alpha searched on `grid` points of [0, 1) for the lowest output error
    `|| x @ w.T - (x / s) @ dequantize(quantize(w * s)).T ||` on the calibration rows `x` (R, K).

    Returns (the smoothed weight `w * s` in `fmt`'s stored form, s (K,) f32): the layer divides its
    activations by s (as for SmoothQuant, `calibration.smooth_activations`) or folds 1/s into the op
    before it. alpha = 0 (s = 1) is in the grid, so the output error never exceeds plain rounding's.
    `clip=True` then runs the MSE clip search (`clip_search`) on the smoothed weight.
    """
    w = np.asarray(w, np.float32)
    x = np.asarray(x, np.float32).reshape(-1, w.shape[-1])
    if x.shape[0] == 0:
        raise ValueError("AWQ needs calibration rows of the layer's inputs; none were given")
    check_finite(x, "AWQ: the layer's calibration inputs")
    k = w.shape[-1]
    exact = x.astype(np.float64) @ w.T.astype(np.float64)

    def error(s: np.ndarray, q: QOperand) -> float:
        approx = calibration.smooth_activations(x, s) @ fmt.dequantize(q, k).T
        return float(np.mean((approx - exact) ** 2))

    return _awq_search(w, np.abs(x).mean(0), np.mean(x.astype(np.float64) ** 2, 0), error, fmt, grid, clip)


def awq_gram(w: Any, second: Any, mean_abs: Any, fmt: OperandFormat, *, grid: int = 20,
             clip: bool = True) -> tuple[QOperand, Any]:
    """`awq` from statistics of the rows instead of the rows: `second = X^T X / R` (K, K) and `mean_abs =
    mean|X|` (K,), which a framework can sum over every calibration row under `jit` (the JAX binding). The
    output error of a candidate is `tr(D second D^T) / N` with `D = dequantize(quantize(w * s)) / s - w`:
    `awq`'s mean over the same rows, exactly."""
    w = np.asarray(w, np.float32)
    second = np.asarray(second, np.float64)
    k = w.shape[-1]
    if second.shape != (k, k) or np.shape(mean_abs) != (k,):
        raise ValueError(f"AWQ statistics of shapes {second.shape} and {np.shape(mean_abs)} do not match the "
                         f"weight's K={k}")
    check_finite(second, "AWQ's statistics of the layer's calibration inputs")

    def error(s: np.ndarray, q: QOperand) -> float:
        d = fmt.dequantize(q, k).astype(np.float64) / s.astype(np.float64) - w
        return float(np.sum((d @ second) * d) / w.shape[0])

    return _awq_search(w, np.asarray(mean_abs, np.float32), np.diag(second), error, fmt, grid, clip)


def _awq_search(w: np.ndarray, mean: np.ndarray, mean_square: np.ndarray, error: Any, fmt: OperandFormat,
                grid: int, clip: bool) -> tuple[QOperand, Any]:
    """AWQ's search over alpha (`awq`), the output error of a candidate (s, codes of w * s) by `error`."""
    mean = np.where(mean > 0, mean, np.float32(1)).astype(np.float32)
    best = (np.inf, None)
    for i in range(grid):
        alpha = i / grid
        s = (mean ** alpha).astype(np.float32)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)  # centred around 1: scales stay moderate
        s = np.clip(s, *calibration.SMOOTHING_CLIP).astype(np.float32)
        err = error(s, fmt.quantize(calibration.smooth_weight(w, s)))
        if err < best[0]:
            best = (err, s)
    s = best[1]
    ws = calibration.smooth_weight(w, s)
    if not clip:
        return fmt.quantize(ws), s
    importance = (np.asarray(mean_square, np.float64) / s.astype(np.float64) ** 2).astype(np.float32)
    return clip_search(ws, fmt, importance=importance), s
