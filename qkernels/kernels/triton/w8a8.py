"""W8A8: int8 activations (per token) x int8 weights (per output channel), int32 tensor-core MMA.

The rescale is fused while the accumulator is in registers, in DESIGN.md section 4's order:
`y = (f32(acc) * s_lhs[m]) * s_rhs[n]`, then `y = y + bias[n]`, then one cast to the output dtype
(kernels compile with `enable_fp_fusion=False`, so no multiply-add is contracted into an FMA).

For decode the config may instead run the GEMV kernel (`gemv.py`) or split K (`splitk.py`): each
split stores its raw int32 accumulator, the partials are summed exactly in int32 and the same
epilogue runs once, so every variant gives bit-identical outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkernels.formats import W8A8
from qkernels.kernels.triton import heuristics, splitk
from qkernels.kernels.triton._common import (
    Kernel, MatmulConfig, Output, arch_of, batch_stride, check_device, device_kind_of, grouped_tile, store_rescaled,
    torch_dtype,
)
from qkernels.kernels.triton.gemv import INT8, launch_gemv

__all__ = ["CONFIGS", "w8a8_matmul", "w8a8_kernel"]

CONFIGS: dict[str, tuple[MatmulConfig, ...]] = {
    # 128x128x64 with 4 warps spills on sm_80 (DESIGN.md section 6): large tiles use 8 warps.
    "sm_80": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4, max_m=16),
              MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
    "sm_90": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4, max_m=16),
              MatmulConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)),
    "gfx942": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=2, max_m=16),
               MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=2)),
    "interpret": (MatmulConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1),),
}


@triton.jit
def w8a8_kernel(
    # pointers
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, K_PER_SPLIT,
    # strides (batch stride 0: operand shared by every batch)
    stride_ab, stride_am, stride_ak,
    stride_asb, stride_asm,
    stride_wb, stride_wn, stride_wk,
    stride_wsb, stride_wsn,
    stride_os, stride_ob, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, RETURN_ACC: tl.constexpr,  # RETURN_ACC: store the raw int32 accumulator
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)  # K split: this program sums K in [k_start, k_end)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    k_start = tl.multiple_of(pid_s * K_PER_SPLIT, BLOCK_K)  # whole K tiles: keeps loads vectorized
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + pid_b * stride_ab + offs_m[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    w_ptrs = w_ptr + pid_b * stride_wb + (k_start + offs_k)[:, None] * stride_wk + offs_n[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # [BLOCK_M, BLOCK_N]
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)  # [BLOCK_M, BLOCK_K] int8
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)  # [BLOCK_K, BLOCK_N] int8
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    out_ptrs = out_ptr + pid_s * stride_os + pid_b * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = m_ok[:, None] & n_ok[None, :]
    if RETURN_ACC:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:  # fused epilogue, accumulator still in registers
        store_rescaled(acc, out_ptrs, out_mask, a_scale_ptr + pid_b * stride_asb + offs_m * stride_asm,
                       w_scale_ptr + pid_b * stride_wsb + offs_n * stride_wsn, bias_ptr + offs_n, m_ok, n_ok,
                       RESCALE=True, HAS_BIAS=HAS_BIAS)

def w8a8_matmul(
    lhs: torch.Tensor, lhs_scale: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor,
    bias: torch.Tensor | None = None, *, out_dtype: str | torch.dtype = "bfloat16",
    config: MatmulConfig | None = None, return_acc: bool = False,
) -> torch.Tensor:
    """`out[b, m, n] = (f32(sum_k lhs[b,m,k] * rhs[b,n,k]) * lhs_scale[b,m]) * rhs_scale[b,n] + bias[n]`.

    lhs: int8 codes (M, K) or (B, M, K); lhs_scale f32 (M,) / (B, M). rhs: int8 (N, K) shared by
    every batch, or (B, N, K); rhs_scale f32 (N,) / (B, N). Any strides (nothing is copied).
    `return_acc=True` returns the raw int32 accumulator instead (for tests; scales/bias unused).
    """
    batched = lhs.dim() == 3
    if lhs.dim() not in (2, 3) or rhs.dim() not in (2, 3) or (rhs.dim() == 3 and not batched):
        raise ValueError(f"lhs {tuple(lhs.shape)} must be (M, K) or (B, M, K) and rhs {tuple(rhs.shape)} "
                         f"(N, K), or (B, N, K) with a 3-D lhs")
    if lhs.dtype != torch.int8 or rhs.dtype != torch.int8:
        raise TypeError(f"W8A8 takes int8 codes, got lhs {lhs.dtype} and rhs {rhs.dtype}; quantize the "
                        f"activations with quantize_rows first")
    m, k = lhs.shape[-2:]
    n = rhs.shape[-2]
    if rhs.shape[-1] != k:
        raise ValueError(f"rhs has K={rhs.shape[-1]} but lhs has K={k}; the contraction sizes must match")
    if batched and rhs.dim() == 3 and rhs.shape[0] != lhs.shape[0]:
        raise ValueError(f"batch sizes differ: lhs {lhs.shape[0]}, rhs {rhs.shape[0]}")
    if tuple(lhs_scale.shape) != tuple(lhs.shape[:-1]) or tuple(rhs_scale.shape) != tuple(rhs.shape[:-1]):
        raise ValueError(f"scales {tuple(lhs_scale.shape)}, {tuple(rhs_scale.shape)} must be per row: "
                         f"{tuple(lhs.shape[:-1])}, {tuple(rhs.shape[:-1])}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
    W8A8().check_k(k)
    device = check_device(lhs, lhs_scale, rhs, rhs_scale, bias)
    cfg = heuristics.resolve(config, "w8a8", arch_of(device), device_kind_of(device), m, n, k, None)

    nb = lhs.shape[0] if batched else 1
    shape = (nb, m, n) if batched else (m, n)
    out = Output(shape, torch.int32 if return_acc else torch_dtype(out_dtype), device)
    o = out.buffer if batched else out.buffer.unsqueeze(0)
    a = lhs if batched else lhs.unsqueeze(0)
    a_s = lhs_scale if batched else lhs_scale.unsqueeze(0)
    if m and n:
        plan = splitk.plan(cfg, k, o, torch.int32)
        if cfg.kernel is Kernel.GEMV:
            launch_gemv(cfg, plan, a, rhs, rhs_scale, weight=INT8, a_scale=a_s, bias=bias, return_acc=return_acc)
        else:
            grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), nb, plan.splits)
            w8a8_kernel[grid](
                a, a_s, rhs, rhs_scale, bias if bias is not None else rhs_scale, plan.target,
                m, n, k, plan.k_per_split,
                a.stride(0), a.stride(1), a.stride(2),
                a_s.stride(0), a_s.stride(1),
                batch_stride(rhs, 3), rhs.stride(-2), rhs.stride(-1),
                batch_stride(rhs_scale, 2), rhs_scale.stride(-1),
                *plan.target_strides(),
                HAS_BIAS=bias is not None, RETURN_ACC=return_acc or plan.partial,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
        if return_acc:
            plan.finish()
        else:
            plan.finish(a_scale=a_s, w_scale=rhs_scale, bias=bias)
    return out.result()
