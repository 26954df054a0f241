"""W4A8: int8 activations (per token) x packed int4 weights (per group along K), int8 tensor-core MMA.

Each group's dot is an exact int32 partial; the partials are scaled into an f32 accumulator in
DESIGN.md section 4's order: `y = 0; for g: y = y + f32(acc_g) * s_rhs[n, g]`, then
`y = y * s_lhs[m] + bias[n]`. BLOCK_K is clamped to the group size so that no K tile straddles a
group. The int4 weights are unpacked in registers (two per byte, low nibble = even k), never
written back to memory as int8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkernels.formats import W4A8
from qkernels.kernels.triton._common import MatmulConfig, batch_stride, grouped_tile, torch_dtype, unpack_int4_tile
from qkernels.kernels.triton._launch import allocate, check_operands, resolve_config

__all__ = ["CONFIGS", "w4a8_matmul", "launch_w4a8", "w4a8_kernel"]

CONFIGS: dict[str, tuple[MatmulConfig, ...]] = {
    # Two accumulators live in registers (int32 group partial + f32 sum): large tiles are 128x64.
    "sm_80": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4, max_m=16),
              MatmulConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3)),
    "sm_90": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4, max_m=16),
              MatmulConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3)),
    "gfx942": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=2, max_m=16),
               MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=2)),
    "interpret": (MatmulConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1),),
}


@triton.jit
def w4a8_kernel(
    # pointers
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, K_STORED, NUM_GROUPS,
    # strides (batch stride 0: operand shared by every batch)
    stride_ab, stride_am, stride_ak,
    stride_asb, stride_asm,
    stride_wb, stride_wn, stride_wk,
    stride_wsb, stride_wsn, stride_wsg,
    stride_ob, stride_om, stride_on, stride_og,
    # meta-parameters
    HAS_BIAS: tl.constexpr, RETURN_ACC: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    offs_kb = tl.arange(0, BLOCK_K // 2)  # [BLOCK_K // 2] packed bytes
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + pid_b * stride_ab + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + pid_b * stride_wb + offs_n[:, None] * stride_wn + offs_kb[None, :] * stride_wk
    s_ptrs = w_scale_ptr + pid_b * stride_wsb + offs_n * stride_wsn  # [BLOCK_N]
    out_ptrs = out_ptr + pid_b * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = m_ok[:, None] & n_ok[None, :]

    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for g in range(0, NUM_GROUPS):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # [BLOCK_M, BLOCK_N] one group's partial
        for kk in tl.static_range(0, GROUP_SIZE // BLOCK_K):
            k0 = g * GROUP_SIZE + kk * BLOCK_K
            k_ok = offs_k < K - k0
            kb_ok = offs_kb < K_STORED - k0 // 2
            a = tl.load(a_ptrs + k0 * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0)  # [BLOCK_M, BLOCK_K]
            packed = tl.load(w_ptrs + (k0 // 2) * stride_wk, mask=n_ok[:, None] & kb_ok[None, :], other=0)
            w = unpack_int4_tile(packed, True)  # [BLOCK_N, BLOCK_K] int8 codes
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        if RETURN_ACC:
            tl.store(out_ptrs + g * stride_og, acc, mask=out_mask)
        # Group epilogue, partial still in registers: y = y + f32(acc_g) * s_rhs[n, g].
        s_w = tl.load(s_ptrs + g * stride_wsg, mask=n_ok, other=1.0)  # [BLOCK_N]
        y = y + acc.to(tl.float32) * s_w[None, :]

    if not RETURN_ACC:
        s_a = tl.load(a_scale_ptr + pid_b * stride_asb + offs_m * stride_asm, mask=m_ok, other=1.0)  # [BLOCK_M]
        y = y * s_a[:, None]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


def w4a8_matmul(
    lhs: torch.Tensor, lhs_scale: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor,
    bias: torch.Tensor | None = None, *, group_size: int, out_dtype: str | torch.dtype = "bfloat16",
    config: MatmulConfig | None = None, return_acc: bool = False,
) -> torch.Tensor:
    """W4A8 matmul of int8 codes `lhs` (B?, M, K) with packed int4 `rhs` (B?, N, K_padded / 2).

    lhs_scale f32 (B?, M); rhs_scale f32 (B?, N, K_padded / group_size); bias (N,) or None. A 2-D
    rhs is shared by every batch of a 3-D lhs. Any strides (nothing is copied).
    `return_acc=True` returns the raw per-group int32 partials (B?, M, N, G) instead (for tests).
    Checked (`_launch.check_operands`); `config` None: the heuristic's for the device.
    """
    recipe = W4A8(group_size)
    device = check_operands(recipe, lhs, lhs_scale, rhs, rhs_scale, None, bias)
    cfg = resolve_config(config, recipe, lhs, rhs, device)
    return launch_w4a8(lhs, lhs_scale, rhs, rhs_scale, bias, group_size=group_size, out_dtype=out_dtype, config=cfg,
                       return_acc=return_acc)


def launch_w4a8(
    lhs: torch.Tensor, lhs_scale: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor,
    bias: torch.Tensor | None, *, group_size: int, out_dtype: str | torch.dtype, config: MatmulConfig,
    return_acc: bool = False,
) -> torch.Tensor:
    """`w4a8_matmul` on operands it does not check, with a config that runs them (a bound call's)."""
    cfg = config.for_group(group_size)
    groups = rhs_scale.shape[-1]
    v = allocate(lhs, lhs_scale, rhs, torch.int32 if return_acc else torch_dtype(out_dtype),
                 (groups,) if return_acc else ())
    a, a_s, o = v.lhs, v.lhs_scale, v.out
    if v.m and v.n:
        grid = (triton.cdiv(v.m, cfg.block_m) * triton.cdiv(v.n, cfg.block_n), v.batches)
        w4a8_kernel[grid](
            a, a_s, rhs, rhs_scale, bias if bias is not None else rhs_scale, o,
            v.m, v.n, v.k, rhs.shape[-1], groups,
            a.stride(0), a.stride(1), a.stride(2),
            a_s.stride(0), a_s.stride(1),
            batch_stride(rhs, 3), rhs.stride(-2), rhs.stride(-1),
            batch_stride(rhs_scale, 3), rhs_scale.stride(-2), rhs_scale.stride(-1),
            o.stride(0), o.stride(1), o.stride(2), o.stride(3) if return_acc else 0,
            HAS_BIAS=bias is not None, RETURN_ACC=return_acc, GROUP_SIZE=group_size,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    return v.result()
