"""GEMV-style kernel for decode (a few rows): W8A8, W8A16, W4A16 and fp8 weights streamed once, no tensor cores.

At M <= 4 a tensor-core tile is at least 16 rows, so 75-94% of every MMA is padding and the
kernel's speed is set by how fast the weight streams from memory. Here each program owns BLOCK_N
output columns and one K range (split-K, `splitk.py`), loads a [BLOCK_N, BLOCK_K] weight tile per
step with wide loads, dequantizes it in registers, and reduces the [BLOCK_M, BLOCK_N, BLOCK_K]
product with `tl.sum` for all rows at once (any M works: the grid covers M in BLOCK_M rows, but the
weight is re-read per row block, so the heuristic only picks GEMV for M <= 4).

Numerics are the tile kernels' (DESIGN.md section 4), only the summation order differs:
- W8A8: int8 x int8 products summed in int32: exact, identical to the tile kernel and the reference;
  the epilogue `(f32(acc) * s_rhs[n]) * s_lhs[m] + bias[n]` then one cast.
- FP8: float8_e4m3fn codes x codes, each product exact in f32, summed in f32 (the tile kernel's MMA
  sums in another order: within `testing.tolerances`), then W8A8's epilogue.
- W8A16 / W4A16 / FP8A16: the weight is dequantized in f32 (`f32(q) * scale[n]`, or `(f32(q) - zero) *
  scale[g, n]` per group) and rounded to the activation dtype, exactly as the tile kernel feeds its
  MMA; the products of two 16-bit floats are exact in f32 and summed in f32, like the MMA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qkernels.kernels.triton._common import (
    MatmulConfig, batch_stride, round_to_bf16, store_rescaled, unpack_int4_tile,
)
from qkernels.kernels.triton.splitk import SplitPlan

__all__ = ["gemv_kernel", "launch_gemv", "GemvWeight", "INT8", "E4M3", "INT4", "UINT4_ZP"]


@dataclass(frozen=True, kw_only=True, slots=True)
class GemvWeight:
    """How `gemv_kernel` reads a weight; its fields are the kernel's PACKED / SIGNED / ZERO_POINT constexprs.

    packed: int4 codes two per byte along K (N, K/2) with a scale per group (N, G); else int8 or fp8
            codes (N, K) with a scale per output channel (N,) (the pointer's dtype says which).
    signed: two's complement nibbles (int4), else unsigned (uint4).
    zero_point: an int8 zero point per group (N, G), subtracted before the scale.
    """

    name: str
    packed: bool
    signed: bool = True
    zero_point: bool = False

    def __post_init__(self) -> None:
        if not self.packed and (not self.signed or self.zero_point):
            raise ValueError(f"GemvWeight {self.name!r}: unpacked weights are signed int8 codes without a zero "
                             f"point; set packed=True for uint4 or zero-point weights")

    def constexprs(self) -> dict[str, bool]:
        return dict(PACKED=self.packed, SIGNED=self.signed, ZERO_POINT=self.zero_point)


INT8 = GemvWeight(name="int8", packed=False)
E4M3 = GemvWeight(name="float8_e4m3fn", packed=False)  # read as INT8 is: one code per element, per-channel scale
INT4 = GemvWeight(name="int4", packed=True)
UINT4_ZP = GemvWeight(name="uint4-zp", packed=True, signed=False, zero_point=True)


@triton.jit
def gemv_kernel(
    # pointers
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, w_zero_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, K_STORED, K_PER_SPLIT,
    # strides (batch stride 0: operand shared by every batch)
    stride_ab, stride_am, stride_ak,
    stride_asb, stride_asm,
    stride_wb, stride_wn, stride_wk,
    stride_wsb, stride_wsn, stride_wsg,
    stride_wzb, stride_wzn, stride_wzg,
    stride_os, stride_ob, stride_om, stride_on,
    # meta-parameters
    PACKED: tl.constexpr, SIGNED: tl.constexpr, ZERO_POINT: tl.constexpr,  # the weight (`GemvWeight`)
    INT_ACT: tl.constexpr, FLOAT_CODES: tl.constexpr,  # activations as codes + scales; fp8 codes (f32 sum)
    PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROUND_BF16: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)  # K split: this program sums K in [k_start, k_end)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = (pid % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_start = tl.multiple_of(pid_s * K_PER_SPLIT, BLOCK_K)  # whole K tiles: keeps loads vectorized
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    a_row = a_ptr + pid_b * stride_ab + offs_m[:, None] * stride_am  # [BLOCK_M, 1]
    w_row = w_ptr + pid_b * stride_wb + offs_n[:, None] * stride_wn  # [BLOCK_N, 1]
    if not PACKED and not INT_ACT:  # per-channel scale of the dequantized weight
        scale_n = tl.load(w_scale_ptr + pid_b * stride_wsb + offs_n * stride_wsn, mask=n_ok, other=1.0)  # [BLOCK_N]

    if INT_ACT and not FLOAT_CODES:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # [BLOCK_M, BLOCK_N]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = offs_k < K
        a = tl.load(a_row + offs_k[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K] (0.0: converts to any code type, fp8 included)
        if not PACKED:
            q = tl.load(w_row + offs_k[None, :] * stride_wk, mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BLOCK_N, BLOCK_K] int8 / fp8
        else:
            offs_kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BLOCK_K // 2] packed bytes
            packed = tl.load(w_row + offs_kb[None, :] * stride_wk, mask=n_ok[:, None] & (offs_kb < K_STORED)[None, :],
                             other=0)  # [BLOCK_N, BLOCK_K // 2]
            q = unpack_int4_tile(packed, SIGNED)  # [BLOCK_N, BLOCK_K] int8 codes
        if INT_ACT and FLOAT_CODES:
            prod = a.to(tl.float32)[:, None, :] * q.to(tl.float32)[None, :, :]  # [BLOCK_M, BLOCK_N, BLOCK_K] f32, exact
            acc += tl.sum(prod, axis=2)
        elif INT_ACT:
            prod = a.to(tl.int32)[:, None, :] * q.to(tl.int32)[None, :, :]  # [BLOCK_M, BLOCK_N, BLOCK_K] int32
            acc += tl.sum(prod, axis=2)
        else:
            w = q.to(tl.float32)  # [BLOCK_N, BLOCK_K]
            if not PACKED:
                w = w * scale_n[:, None]
            else:
                g = k0 // GROUP_SIZE
                scale = tl.load(w_scale_ptr + pid_b * stride_wsb + offs_n * stride_wsn + g * stride_wsg, mask=n_ok,
                                other=1.0)  # [BLOCK_N]
                if ZERO_POINT:
                    zero = tl.load(w_zero_ptr + pid_b * stride_wzb + offs_n * stride_wzn + g * stride_wzg, mask=n_ok,
                                   other=0)  # [BLOCK_N] int8
                    w = w - zero.to(tl.float32)[:, None]
                w = w * scale[:, None]
            # The weight as the activation dtype, held in f32 (interpreter: its bf16 cast truncates).
            if ROUND_BF16:
                w = round_to_bf16(w)
            else:
                w = w.to(a_ptr.dtype.element_ty).to(tl.float32)
            prod = a.to(tl.float32)[:, None, :] * w[None, :, :]  # [BLOCK_M, BLOCK_N, BLOCK_K] f32, exact
            acc += tl.sum(prod, axis=2)

    out_ptrs = out_ptr + pid_s * stride_os + pid_b * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        store_rescaled(acc, out_ptrs, out_mask, a_scale_ptr + pid_b * stride_asb + offs_m * stride_asm,
                       w_scale_ptr + pid_b * stride_wsb + offs_n * stride_wsn, bias_ptr + offs_n, m_ok, n_ok,
                       RESCALE=INT_ACT, HAS_BIAS=HAS_BIAS)

def launch_gemv(
    cfg: MatmulConfig, plan: SplitPlan, a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *,
    weight: GemvWeight, a_scale: torch.Tensor | None = None, w_zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, group_size: int = 0, return_acc: bool = False, round_bf16: bool = False,
    float_codes: bool = False,
) -> None:
    """Run `gemv_kernel` for a validated problem: `a` is 3-D (B, M, K) (int8 codes with `a_scale`
    (B, M) for W8A8, fp8 codes with `float_codes` for FP8, else float); `w` (B?, N, K or K/2); `plan`
    says where it writes (the output or the split-K partials, which the caller then finishes with
    `plan.finish`)."""
    nb, m, k = a.shape
    n = w.shape[-2]
    int_act = a_scale is not None
    a_s = a_scale if int_act else w_scale
    z = w_zero if w_zero is not None else w_scale
    grouped = weight.packed
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), nb, plan.splits)
    gemv_kernel[grid](
        a, a_s, w, w_scale, z, bias if bias is not None else w_scale, plan.target,
        m, n, k, w.shape[-1], plan.k_per_split,
        a.stride(0), a.stride(1), a.stride(2),
        a_s.stride(0) if int_act else 0, a_s.stride(1) if int_act else 0,
        batch_stride(w, 3), w.stride(-2), w.stride(-1),
        batch_stride(w_scale, 3 if grouped else 2), w_scale.stride(-2) if grouped else w_scale.stride(-1),
        w_scale.stride(-1) if grouped else 0,
        batch_stride(z, 3) if w_zero is not None else 0, z.stride(-2) if w_zero is not None else 0,
        z.stride(-1) if w_zero is not None else 0,
        *plan.target_strides(),
        **weight.constexprs(), INT_ACT=int_act, FLOAT_CODES=float_codes, PARTIAL=plan.partial or return_acc,
        HAS_BIAS=bias is not None,
        ROUND_BF16=round_bf16, GROUP_SIZE=group_size or 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
