"""'torch-cpu': the CPU path for every recipe whose accumulation it implements, priority 50.

It executes the recipe's own definition (`Recipe.matmul`) with `torch_bindings.arrays.TORCH_OPS`, so
a new format needs nothing here. What that gives for the shipped recipes:

- W8A8: dynamic per-row int8 activations (bit-exact to numerics), one `torch._int_mm` (exact int32;
  on CPU it takes any M, K, N, M=1 and odd K included), rescale in f32 in DESIGN.md's order,
  `(f32(acc) * s_rhs[n]) * s_lhs[m] + bias[n]`: outputs equal the reference's.
- W4A8: the same activations, one `_int_mm` per group of K (exact int32 partials), then
  `y = y + f32(acc_g) * s_rhs[n, g]` group by group, `y * s_lhs[m] + bias[n]`: equal to the reference.
- Operand codes torch has no CPU GEMM for (float8 x float8) are upcast to f32 and multiplied there:
  exact products, emulated; `explain` says so (`_note`).
- W4A16 / W8A16 (and any weight-only format): weights dequantized as the reference does
  (`(f32(q) - zero) * scale`, cast to the activation dtype), then a float matmul with f32
  accumulation (oneDNN for bf16; f32 for f32; fp16 is upcast to f32 because the CPU fp16 GEMM is
  ~6x slower than f32 here). Accurate, not bit-exact.
  Measured on this machine (4096x4096 weight): `torch._weight_int8pack_mm` is ~3x slower than a
  bf16 GEMM and ~30x slower in f32; `_weight_int4pack_mm_for_cpu` is 2x faster than a bf16 GEMM at
  M=1 but needs a ~60 ms repack of every weight (not representable in the canonical QOperand), is
  2.5x slower at M=256 and ~100x slower in f32, so neither is used.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from qkernels import dispatch, numerics
from qkernels.dispatch import Bound, Problem
from qkernels.formats import ACCUMULATIONS, Accumulation, QOperand
from torch_bindings import packed
from torch_bindings.arrays import DTYPES, TORCH_OPS

__all__ = ["register", "SERVES"]

SERVES = dispatch.Serves.accumulating(*(a.name for a in ACCUMULATIONS))
"""The shipped accumulations (`formats.ACCUMULATIONS`), which `Recipe.matmul` executes with `TORCH_OPS`:
any recipe built on them is served."""

_FLOATS = ("float32", "bfloat16", "float16")


def _rows(lhs: torch.Tensor | QOperand) -> tuple[torch.Tensor | QOperand, tuple[int, ...]]:
    """Activations (..., M, K) as (rows, K) (torch's integer GEMM is 2-D), and their leading shape."""
    x = lhs.qvalue if isinstance(lhs, QOperand) else lhs
    lead = tuple(x.shape[:-1])
    rows = math.prod(lead)
    if isinstance(lhs, QOperand):
        return QOperand(lhs.qvalue.reshape(rows, x.shape[-1]), lhs.scale.reshape(rows)), lead
    return lhs.reshape(rows, x.shape[-1]), lead


def _run(call: Bound, lhs: torch.Tensor | QOperand, rhs: QOperand, bias: torch.Tensor | None) -> torch.Tensor:
    p = call.problem
    lhs, lead = _rows(lhs)
    y = p.recipe.matmul(TORCH_OPS, lhs, rhs, bias, k=p.k, batched=False, act_dtype=p.act_dtype,
                        out_dtype=p.out_dtype)
    return y.reshape(*lead, p.n)


def _accumulate(call: Bound, lhs: torch.Tensor | QOperand, rhs: QOperand) -> torch.Tensor:
    """The exact int32 accumulators of an integer recipe: (..., M, N), or (..., M, N, G) per group."""
    p = call.problem
    lhs, lead = _rows(lhs)
    lhs = p.recipe.accumulation.lhs_operand(p.recipe, TORCH_OPS, lhs)
    acc = p.recipe.accumulation.accumulators(p.recipe, TORCH_OPS, lhs, rhs, k=p.k, batched=False)
    return acc.reshape(*lead, *acc.shape[1:])


def _supports(problem: Problem) -> str | None:
    if problem.platform != "cpu":
        return f"runs on CPU tensors only (platform is {problem.platform})"
    if problem.batch is not None:
        return "batched (3-D) weights are not supported; fold the batch into M or use the reference"
    if problem.lhs_quantized and problem.recipe.lhs is None:
        return f"{problem.recipe.name} takes float activations, not pre-quantized ones"
    act = problem.act_dtype if not problem.lhs_quantized else "float32"
    if act not in _FLOATS or problem.out_dtype not in _FLOATS:
        return f"activations {problem.act_dtype} -> {problem.out_dtype}: only float32/bfloat16/float16"
    storage = problem.recipe.rhs.qtype.storage
    if storage not in DTYPES:
        return f"weights stored as {storage}, which torch cannot hold"
    return None


_NATIVE_DOTS = ("int8", *_FLOATS)  # operand dtypes torch multiplies natively on CPU (_int_mm, oneDNN / f32 GEMM)


def _note(problem: Problem) -> str | None:
    """Says when the dot is emulated: codes of a storage dtype torch has no CPU GEMM for (float8, ...) are
    upcast to f32 and multiplied there (`TorchOps.float_linear`); exact products, not a native fp8 GEMM."""
    recipe = problem.recipe
    if recipe.lhs is None:
        return None  # weight-only: the weight is dequantized to the activation dtype first
    emulated = sorted({recipe.lhs.qtype.storage, recipe.rhs.qtype.storage} - set(_NATIVE_DOTS))
    if not emulated:
        return None
    return f"emulated: {', '.join(emulated)} codes upcast to float32 for the dot (torch has no CPU GEMM for them)"


def _slower(problem: Problem) -> str | None:
    """Where this path is known to be slower than `F.linear` on the same activations, and what is faster.

    Measured on this repo's 2-core CPU, 4096x4096 weight, ratios to `F.linear` f32 in one run (`python -m
    bench --shapes 4096x4096 --m 1,16,256 --framework torch`, bench/results/cpu-amd-epyc-2-threads-
    2026-12-01.md): fp8 and fp8a16 0.04x-0.5x at M = 1 / 16 / 256 (codes upcast to f32); weight-only
    recipes, which dequantize the whole weight on every call and then run the GEMM the float layer runs
    (slower than it at every M by construction), W8A16 f32 0.06x / 0.12x / 0.48x. This generic path's
    W4A8 g128 (one int8 GEMM per group of K, the codes unpacked per call) measured 0.28x / 0.31x / 1.5x
    in a one-thread side-by-side script; 'torch-cpu-w4a8' serves W4A8 on cached codes (2.6x / 1.3x / 2.7x
    in the bench run), so this path warns only when asked for by name.
    """
    recipe = problem.recipe
    if recipe.lhs is None:
        packed_reason = _packed_refusal(problem)
        if packed_reason is not None:
            fix = (f"the packed kernel (torch-cpu-packed) cannot take this call ({packed_reason}); W8A8 runs "
                   f"int8 x int8 natively")
        elif problem.act_dtype == "bfloat16":
            fix = "torch-cpu-packed serves this call and is faster (drop the backend request)"
        else:
            fix = (f"bfloat16 activations run torch's packed {recipe.name} kernel (torch-cpu-packed), which is "
                   f"faster than F.linear")
        return (f"slower than the unquantized F.linear: it dequantizes the whole weight on every call before the "
                f"same GEMM; {fix}")
    if _note(problem) is not None:
        return (f"slower than the unquantized F.linear ({_note(problem)}); W8A8 runs int8 x int8 natively, "
                f"3-6x faster than F.linear f32")
    if recipe.accumulation is Accumulation.INT32_PER_GROUP and problem.m < 256:
        return (f"slower than the unquantized F.linear at M={problem.m} < 256 (one int8 GEMM per group of K, "
                f"0.3x F.linear f32 at M=1-16 for 4096x4096); W8A8 (3-6x) or W4A16 with bf16 activations "
                f"(torch-cpu-packed) are faster")
    return None


def _packed_refusal(problem: Problem) -> str | None:
    """The packed backend's verdict on the same call in bfloat16 (None: it would serve it)."""
    bf16 = dataclasses.replace(problem, act_dtype="bfloat16", out_dtype="bfloat16")
    return packed.SERVES.reason(problem.recipe) or packed.supports(bf16)


# ---------------------------------------------------------------- 'torch-cpu-w8a8': the same numbers, fewer ops

_LARGEST_SUBNORMAL = float(np.nextafter(np.float32(numerics.FLT_MIN), np.float32(0)))


def _run_w8a8(call: Bound, lhs: torch.Tensor | QOperand, rhs: QOperand, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 (per-token int8 x per-channel int8) as `Recipe.matmul` computes it, in ~10 torch ops.

    The generic path executes the format's definition through its layers (`OperandFormat.quantize`,
    `numerics`, `Accumulation.finish`): ~20 torch ops and ~150 Python calls per call, ~3x this at
    64x64 (measured, `python -m bench overhead`). The steps and their order are the definition's:
    subnormals read as 0 (`F.hardshrink` at the largest subnormal is `where(|x| < FLT_MIN, 0, x)`, bit
    for bit, NaN kept), `scale = f32(amax) / 127` by IEEE division (an expanded divisor, as
    `TorchOps.div`), 1 where below FLT_MIN, NaN/Inf refused by the format's own check, codes
    `clip(round_half_even(x / scale))`, one exact `_int_mm`, then `(f32(acc) * s_w[n]) * s_x[m] + bias[n]`
    and one cast. The conformance suite holds it to the reference's outputs exactly.
    """
    p = call.problem
    if p.m == 0 or p.n == 0 or p.k < 2:  # empty, and K < 2 (`_int_mm_nt`): the generic path, same numbers
        return _run(call, lhs, rhs, bias)
    fmt = p.recipe.lhs
    lhs, lead = _rows(lhs)
    if isinstance(lhs, QOperand):
        codes, s_x = lhs.qvalue, lhs.scale.to(torch.float32)
    else:
        x = torch.nn.functional.hardshrink(lhs.to(torch.float32), _LARGEST_SUBNORMAL)
        amax = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True)
        s_x = torch.div(amax, torch.full_like(amax, fmt.qtype.qmax))
        s_x = torch.where(s_x < numerics.FLT_MIN, 1.0, s_x)
        if not math.isfinite(s_x.max()):  # NaN propagates through max: the format's check says why
            fmt.check_scale(s_x, TORCH_OPS, what="activations", fix=", or use a weight-only recipe")
        codes = torch.div(x, s_x.expand_as(x)).round_().clamp_(fmt.qtype.qmin, fmt.qtype.qmax).to(torch.int8)
        s_x = s_x[:, 0]
    y = torch._int_mm(rhs.qvalue, codes.t()).t().to(torch.float32)
    y = y.mul_(rhs.scale[None, :]).mul_(s_x[:, None])
    if bias is not None:
        y = y.add_(bias.to(torch.float32))
    return y.to(DTYPES[p.out_dtype]).reshape(*lead, p.n)


# ---------------------------------------------------------------- 'torch-cpu-w4a8': codes unpacked once, one GEMM

def _int8_codes(rhs: QOperand, recipe: Any, k: int) -> tuple[torch.Tensor, ...]:
    return (recipe.rhs.codes(rhs, k, TORCH_OPS).contiguous(),)


def _run_w4a8(call: Bound, lhs: torch.Tensor | QOperand, rhs: QOperand, bias: torch.Tensor | None) -> torch.Tensor:
    """W4A8 (per-token int8 x per-group int4) as `Recipe.matmul` computes it, on the weight's codes unpacked
    to int8 once (layout `int8-codes`, cached like `torch_bindings.packed`'s: 1 byte per weight beside the
    0.5 of the canonical packed codes) instead of on every call: the generic path unpacks the whole
    weight per call, which at decode shapes costs more than the GEMMs (4096x4096 g128, one thread,
    same run: 0.3x `F.linear` f32 at M=1 generic, 2-3.5x on the cached codes; noisy shared CPU).
    Then the definition's steps: exact int32 GEMMs per group, `y = sum over g, in order, of
    f32(acc_g) * s_w[n, g]` (`TorchOps.grouped_scaled_sum`), `y * s_x[m] + bias[n]`, one cast; the
    conformance suite holds it to the reference's outputs bit for bit. (Tried and dropped: the
    per-group accumulators from one GEMM against block-diagonal activations, G times the multiplies
    in one pass over the weight: slower than the per-group GEMMs at every M measured, 1-8.)
    """
    p = call.problem
    if p.m == 0 or p.n == 0 or p.k < 2:
        return _run(call, lhs, rhs, bias)
    recipe = p.recipe
    lhs, lead = _rows(lhs)
    lhs = recipe.accumulation.lhs_operand(recipe, TORCH_OPS, lhs)
    (w,) = packed.packed(_INT8_CODES, rhs, recipe, p.k)
    a = TORCH_OPS.pad_last(lhs.qvalue, w.shape[1])
    y = TORCH_OPS.grouped_scaled_sum(a, w, rhs.scale, recipe.group_size, batched=False)
    y = y.mul_(lhs.scale.to(torch.float32)[:, None])
    if bias is not None:
        y = y.add_(bias.to(torch.float32))
    return y.to(DTYPES[p.out_dtype]).reshape(*lead, p.n)


_INT8_CODES = packed.Layout(name="int8-codes", kernel="torch._int_mm", tag="w4a8", supports=lambda problem: None,
                            make=_int8_codes)


def register() -> None:
    dispatch.register(dispatch.Implementation(
        name="torch-cpu-w4a8", framework="torch", priority=55, supports=_supports, run=_run_w4a8,
        serves=dispatch.Serves.tags("w4a8"), accumulate=_accumulate,
        note=lambda problem: "layout int8-codes: the weight's int4 codes unpacked once per weight",
        description="torch on CPU, W4A8: the weight's codes unpacked once (cached), exact int32 GEMMs per group"))
    dispatch.register(dispatch.Implementation(
        name="torch-cpu-w8a8", framework="torch", priority=55, supports=_supports, run=_run_w8a8,
        serves=dispatch.Serves.tags("w8a8"), accumulate=_accumulate,
        description="torch on CPU, W8A8: the definition's steps in ~10 torch ops (torch._int_mm, exact)"))
    dispatch.register(dispatch.Implementation(
        name="torch-cpu", framework="torch", priority=50, supports=_supports, run=_run, serves=SERVES,
        accumulate=_accumulate, note=_note, slower=_slower,
        description="torch on CPU: torch._int_mm for integer dots (exact), dequantize + GEMM for weight-only"))
    from torch_bindings import grouped  # the grouped (MoE) op: same rules

    grouped.register_cpu(_supports, SERVES)
