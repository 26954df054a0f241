"""W4A16: bf16/fp16 activations x packed int4 (or uint4 + zero point) weights, per-group scales.

Inside the K loop each weight tile is unpacked (two codes per byte, low nibble = even k) and
dequantized in registers, `w = (f32(q) - zero) * scale` cast to the activation dtype (DESIGN.md
section 4), then fed to a bf16/fp16 tensor-core MMA accumulating in f32; no dequantized weight is
ever written to memory. BLOCK_K is clamped to the group size, so one tile row needs one scale.
Accurate, not bit-exact across backends (the f32 accumulation order differs).

For decode the config may run the GEMV kernel (`gemv.py`) or split K (`splitk.py`): a split is a
whole number of BLOCK_K tiles, so it never straddles a group; f32 partials are summed in fixed
split order, then bias and the cast once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkernels.formats import W4A16
from qkernels.kernels.triton import splitk
from qkernels.kernels.triton._common import (
    Kernel, MatmulConfig, batch_stride, dot_upcast, grouped_tile, torch_dtype, w4a16_step,
)
from qkernels.kernels.triton._launch import FLOAT_ACTIVATIONS, allocate, check_operands, resolve_config
from qkernels.kernels.triton.gemv import INT4, UINT4_ZP, launch_gemv

__all__ = ["CONFIGS", "w4a16_matmul", "launch_w4a16", "w4a16_kernel", "FLOAT_ACTIVATIONS"]

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
def w4a16_kernel(
    # pointers
    a_ptr, w_ptr, w_scale_ptr, w_zero_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, K_STORED, K_PER_SPLIT,
    # strides (batch stride 0: operand shared by every batch)
    stride_ab, stride_am, stride_ak,
    stride_wb, stride_wn, stride_wk,
    stride_wsb, stride_wsn, stride_wsg,
    stride_wzb, stride_wzn, stride_wzg,
    stride_os, stride_ob, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, ZERO_POINT: tl.constexpr, DOT_F32: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)  # K split: this program sums K in [k_start, k_end)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_start = tl.multiple_of(pid_s * K_PER_SPLIT, BLOCK_K)  # whole K tiles: keeps loads vectorized
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    offs_kb = tl.arange(0, BLOCK_K // 2)  # [BLOCK_K // 2] packed bytes
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + pid_b * stride_ab + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + pid_b * stride_wb + offs_n[:, None] * stride_wn + offs_kb[None, :] * stride_wk
    s_ptrs = w_scale_ptr + pid_b * stride_wsb + offs_n * stride_wsn  # [BLOCK_N]
    z_ptrs = w_zero_ptr + pid_b * stride_wzb + offs_n * stride_wzn  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for k0 in range(k_start, k_end, BLOCK_K):
        acc = w4a16_step(acc, a_ptrs, w_ptrs, s_ptrs, z_ptrs, k0, offs_k, offs_kb, m_ok, n_ok, K, K_STORED, stride_ak,
                         stride_wk, stride_wsg, stride_wzg, GROUP_SIZE, ZERO_POINT, DOT_F32)

    if HAS_BIAS and not PARTIAL:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_s * stride_os + pid_b * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def w4a16_matmul(
    lhs: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor, rhs_zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, *, group_size: int, out_dtype: str | torch.dtype | None = None,
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """W4A16 matmul of float activations `lhs` (B?, M, K) with packed 4-bit `rhs` (B?, N, K_padded/2).

    rhs holds int4 codes (rhs_zero None) or uint4 codes with int8 zero points rhs_zero of
    rhs_scale's shape (B?, N, K_padded / group_size). lhs is bf16 or fp16 (the MMA dtype); out
    defaults to lhs's dtype. A 2-D rhs is shared by every batch of a 3-D lhs. Any strides.
    Checked (`_launch.check_operands`); `config` None: the heuristic's for the device.
    """
    recipe = W4A16(group_size, zero_point=rhs_zero is not None)
    device = check_operands(recipe, lhs, None, rhs, rhs_scale, rhs_zero, bias)
    cfg = resolve_config(config, recipe, lhs, rhs, device)
    return launch_w4a16(lhs, rhs, rhs_scale, rhs_zero, bias, group_size=group_size, out_dtype=out_dtype, config=cfg)


def launch_w4a16(
    lhs: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor, rhs_zero: torch.Tensor | None,
    bias: torch.Tensor | None, *, group_size: int, out_dtype: str | torch.dtype | None, config: MatmulConfig,
) -> torch.Tensor:
    """`w4a16_matmul` on operands it does not check, with a config that runs them (a bound call's)."""
    cfg = config.for_group(group_size)
    v = allocate(lhs, None, rhs, torch_dtype(out_dtype or lhs.dtype))
    a = v.lhs
    z = rhs_zero if rhs_zero is not None else rhs_scale
    if v.m and v.n:
        plan = splitk.plan(cfg, v.k, v.out, torch.float32)
        if cfg.kernel is Kernel.GEMV:
            launch_gemv(cfg, plan, a, rhs, rhs_scale, weight=INT4 if rhs_zero is None else UINT4_ZP, w_zero=rhs_zero,
                        bias=bias, group_size=group_size, round_bf16=dot_upcast(lhs.dtype))
        else:
            grid = (triton.cdiv(v.m, cfg.block_m) * triton.cdiv(v.n, cfg.block_n), v.batches, plan.splits)
            w4a16_kernel[grid](
                a, rhs, rhs_scale, z, bias if bias is not None else rhs_scale, plan.target,
                v.m, v.n, v.k, rhs.shape[-1], plan.k_per_split,
                a.stride(0), a.stride(1), a.stride(2),
                batch_stride(rhs, 3), rhs.stride(-2), rhs.stride(-1),
                batch_stride(rhs_scale, 3), rhs_scale.stride(-2), rhs_scale.stride(-1),
                batch_stride(z, 3), z.stride(-2), z.stride(-1),
                *plan.target_strides(),
                HAS_BIAS=bias is not None, PARTIAL=plan.partial, ZERO_POINT=rhs_zero is not None,
                DOT_F32=dot_upcast(lhs.dtype), GROUP_SIZE=group_size,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
        plan.finish(bias=bias)
    return v.result()
