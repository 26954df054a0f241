"""W8A16: bf16/fp16 activations x int8 weights with per-output-channel scales (weight-only int8).

Inside the K loop each weight tile is dequantized in registers, `w = f32(q) * scale[n]` cast to the
activation dtype (DESIGN.md section 4), then fed to a bf16/fp16 tensor-core MMA accumulating in f32.
Accurate, not bit-exact across backends (the f32 accumulation order differs).

For decode the config may run the GEMV kernel (`gemv.py`) or split K (`splitk.py`: f32 partials
summed in fixed split order, then bias and the cast once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkernels.formats import W8A16
from qkernels.kernels.triton import splitk
from qkernels.kernels.triton._common import (
    Kernel, MatmulConfig, batch_stride, dot_upcast, grouped_tile, round_to_bf16, torch_dtype,
)
from qkernels.kernels.triton._launch import allocate, check_operands, resolve_config
from qkernels.kernels.triton.gemv import INT8, launch_gemv

__all__ = ["CONFIGS", "w8a16_matmul", "launch_w8a16", "w8a16_kernel"]

CONFIGS: dict[str, tuple[MatmulConfig, ...]] = {
    "sm_80": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4, max_m=16),
              MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
    "sm_90": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4, max_m=16),
              MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
    "gfx942": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=2, max_m=16),
               MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=2)),
    "interpret": (MatmulConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1),),
}


@triton.jit
def w8a16_kernel(
    # pointers
    a_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, K_PER_SPLIT,
    # strides (batch stride 0: operand shared by every batch)
    stride_ab, stride_am, stride_ak,
    stride_wb, stride_wn, stride_wk,
    stride_wsb, stride_wsn,
    stride_os, stride_ob, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, DOT_F32: tl.constexpr,
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
    scale = tl.load(w_scale_ptr + pid_b * stride_wsb + offs_n * stride_wsn, mask=n_ok, other=1.0)  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        q = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N] int8 / fp8 codes
        w = q.to(tl.float32) * scale[None, :]  # [BLOCK_K, BLOCK_N] f32
        if DOT_F32:  # interpreter only: its bf16 dot and bf16 cast are wrong; f32 holds bf16 values exactly
            acc = tl.dot(a.to(tl.float32), round_to_bf16(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a_ptr.dtype.element_ty), acc, out_dtype=tl.float32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS and not PARTIAL:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_s * stride_os + pid_b * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def w8a16_matmul(
    lhs: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
    out_dtype: str | torch.dtype | None = None, config: MatmulConfig | None = None,
) -> torch.Tensor:
    """W8A16 matmul of float activations `lhs` (B?, M, K) with int8 `rhs` (B?, N, K), rhs_scale (B?, N).

    lhs is bf16 or fp16 (the MMA dtype); out defaults to lhs's dtype. A 2-D rhs is shared by every
    batch of a 3-D lhs. Any strides (nothing is copied).
    Checked (`_launch.check_operands`); `config` None: the heuristic's for the device.
    """
    device = check_operands(W8A16, lhs, None, rhs, rhs_scale, None, bias)
    cfg = resolve_config(config, W8A16, lhs, rhs, device)
    return launch_w8a16(lhs, rhs, rhs_scale, bias, out_dtype=out_dtype, config=cfg)


def launch_w8a16(
    lhs: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor, bias: torch.Tensor | None, *,
    out_dtype: str | torch.dtype | None, config: MatmulConfig,
) -> torch.Tensor:
    """`w8a16_matmul` on operands it does not check, with a config that runs them (a bound call's)."""
    v = allocate(lhs, None, rhs, torch_dtype(out_dtype or lhs.dtype))
    a = v.lhs
    if v.m and v.n:
        plan = splitk.plan(config, v.k, v.out, torch.float32)
        if config.kernel is Kernel.GEMV:
            launch_gemv(config, plan, a, rhs, rhs_scale, weight=INT8, bias=bias, round_bf16=dot_upcast(lhs.dtype))
        else:
            grid = (triton.cdiv(v.m, config.block_m) * triton.cdiv(v.n, config.block_n), v.batches, plan.splits)
            w8a16_kernel[grid](
                a, rhs, rhs_scale, bias if bias is not None else rhs_scale, plan.target,
                v.m, v.n, v.k, plan.k_per_split,
                a.stride(0), a.stride(1), a.stride(2),
                batch_stride(rhs, 3), rhs.stride(-2), rhs.stride(-1),
                batch_stride(rhs_scale, 2), rhs_scale.stride(-1),
                *plan.target_strides(),
                HAS_BIAS=bias is not None, PARTIAL=plan.partial, DOT_F32=dot_upcast(lhs.dtype),
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False)
        plan.finish(bias=bias)
    return v.result()
