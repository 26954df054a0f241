"""'torch-cpu': the CPU fast path for every recipe, registered with dispatch at priority 50.

- W8A8: dynamic per-row int8 activations (bit-exact to numerics), one `torch._int_mm` (exact int32;
  on CPU it takes any M, K, N, M=1 and odd K included, so nothing is padded), rescale in f32 in
  DESIGN.md's order, `(f32(acc) * s_lhs[m]) * s_rhs[n] + bias[n]`: outputs equal the reference's.
- W4A8: the same activations, one `_int_mm` per group of K (exact int32 partials), then
  `y = y + f32(acc_g) * s_rhs[n, g]` group by group, `y * s_lhs[m] + bias[n]`: equal to the reference.
- W4A16 / W8A16: weights dequantized as the reference does (`(f32(q) - zero) * scale`, cast to the
  activation dtype), then a float matmul with f32 accumulation (oneDNN for bf16; f32 for f32; fp16
  is upcast to f32 because the CPU fp16 GEMM is ~6x slower than f32 here). Accurate, not bit-exact.
  Measured on this machine (4096x4096 weight): `torch._weight_int8pack_mm` is ~3x slower than a
  bf16 GEMM and ~30x slower in f32; `_weight_int4pack_mm_for_cpu` is 2x faster than a bf16 GEMM at
  M=1 but needs a ~60 ms repack of every weight (not representable in the canonical QOperand), is
  2.5x slower at M=256 and ~100x slower in f32, so neither is used.
"""

from __future__ import annotations

import torch

from qkernels import dispatch
from qkernels.dispatch import Problem
from qkernels.formats import Accumulation, QOperand
from torch_bindings.qtensor import codes, dequantize_operand, quantize_rows

__all__ = ["int_matmul", "grouped_int_matmul", "lhs_codes", "IMPLEMENTATION"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _int_mm_nt(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Exact int32 `w (N, K) @ a (M, K)^T` -> (N, M).

    `torch._int_mm(w, a.t())` is ~1.5-3x faster on CPU than `_int_mm(a, w.t())` for the (N, K)
    weight layout. It returns garbage for K=1 (measured, torch 2.13: the (1, M) transposed view has
    ambiguous strides), so K=1 is zero-padded to 2, which leaves every dot unchanged.
    """
    if a.shape[1] == 1:
        a, w = (torch.nn.functional.pad(t, (0, 1)) for t in (a, w))
    return torch._int_mm(w, a.t())


def int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 `a (M, K) @ w (N, K)^T` -> (M, N) for int8 codes within the recipe's K limit."""
    return _int_mm_nt(w, a).t()


def grouped_int_matmul(a: torch.Tensor, w: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """Exact int32 partial dots per group of K: [(M, N)] * G for codes a (M, Kp), w (N, Kp)."""
    return [int_matmul(a[:, s:s + group_size], w[:, s:s + group_size])
            for s in range(0, w.shape[1], group_size)]


def lhs_codes(problem: Problem, lhs: torch.Tensor | QOperand) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 activation codes (M, K_padded), zero-padded to the weight's K, and per-row scales (M,)."""
    q, scale = (lhs.qvalue, lhs.scale) if isinstance(lhs, QOperand) else quantize_rows(lhs)
    extra = problem.rhs_format.padded_k(problem.k) - q.shape[-1]
    if extra:
        q = torch.nn.functional.pad(q, (0, extra))
    return q, scale.to(torch.float32)


def _run(problem: Problem, lhs: torch.Tensor | QOperand, rhs: QOperand, bias: torch.Tensor | None) -> torch.Tensor:
    out_dtype = _DTYPES[problem.out_dtype]
    recipe = problem.recipe
    f32 = torch.float32
    if recipe.accumulation is Accumulation.FLOAT:
        x = lhs
        w = dequantize_operand(rhs, recipe.rhs, problem.k).to(x.dtype)
        if x.dtype == torch.bfloat16 and (bias is None or bias.dtype == x.dtype):
            return torch.nn.functional.linear(x, w, bias)  # oneDNN: f32 accumulate, bias, one rounding
        y = torch.nn.functional.linear(x.to(f32), w.to(f32))
        return (y if bias is None else y + bias.to(f32)).to(out_dtype)
    a, s_lhs = lhs_codes(problem, lhs)
    w = codes(rhs, recipe.rhs)
    if recipe.accumulation is Accumulation.INT32:
        # Rescale in the (N, M) layout _int_mm produces (contiguous, in place): same operations, same
        # order as DESIGN.md, then one transposing copy.
        y = torch.mul(_int_mm_nt(w, a), s_lhs[None, :])  # int32 promoted to f32, then the multiply
        y.mul_(rhs.scale[:, None])
        if bias is not None:
            y.add_(bias.to(f32)[:, None])
        return torch.empty(y.shape[::-1], dtype=out_dtype).copy_(y.t())  # cast + transpose, one pass
    else:
        y = torch.zeros(a.shape[0], w.shape[0], dtype=f32)
        for g, acc_g in enumerate(grouped_int_matmul(a, w, recipe.group_size)):
            y = y + acc_g.to(f32) * rhs.scale[None, :, g]
        y = y * s_lhs[:, None]
    if bias is not None:
        y = y + bias.to(f32)
    return y.to(out_dtype)


def _supports(problem: Problem) -> str | None:
    if problem.platform != "cpu":
        return f"runs on CPU tensors only (platform is {problem.platform})"
    if problem.batch is not None:
        return "batched (3-D) weights are not supported; fold the batch into M or use the reference"
    if problem.lhs_quantized and problem.recipe.lhs is None:
        return f"{problem.recipe.name} takes float activations, not pre-quantized ones"
    if problem.act_dtype not in _DTYPES or problem.out_dtype not in _DTYPES:
        return f"activations {problem.act_dtype} -> {problem.out_dtype}: only float32/bfloat16/float16"
    return None


IMPLEMENTATION = dispatch.register(dispatch.Implementation(
    name="torch-cpu", framework="torch", priority=50, supports=_supports, run=_run,
    description="torch on CPU: torch._int_mm for W8A8/W4A8 (exact), dequantize + GEMM for W8A16/W4A16"))
