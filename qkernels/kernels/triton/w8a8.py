"""W8A8: int8 activations (per token) x int8 weights (per output channel), int32 tensor-core MMA.

The rescale is fused while the accumulator is in registers, in DESIGN.md section 4's order:
`y = (f32(acc) * s_rhs[n]) * s_lhs[m]`, then `y = y + bias[n]`, then one cast to the output dtype
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
from qkernels.kernels.triton import splitk
from qkernels.kernels.triton._common import (
    Kernel, MatmulConfig, as_fnuz, batch_stride, grouped_tile, store_rescaled, torch_dtype,
)
from qkernels.kernels.triton._launch import allocate, check_operands, resolve_config
from qkernels.kernels.triton.gemv import E4M3, INT8, GemvWeight, launch_gemv

__all__ = ["CONFIGS", "w8a8_matmul", "launch_w8a8", "launch_codes", "w8a8_kernel"]

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
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,  # PARTIAL: store the raw accumulator (split-K, tests)
    FLOAT_CODES: tl.constexpr,  # e4m3 codes, f32 accumulator (fp8.py); else int8 codes, int32 accumulator
    FNUZ: tl.constexpr,  # FLOAT_CODES on gfx942: multiply the codes as e4m3fnuz (fp8.py's docstring)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The tile kernel of both per-row-scaled code dots: W8A8 (int8 MMA, exact int32) and FP8 (fp8 MMA,
    f32; `fp8.py`). They differ only in the accumulator and the MMA; loads, tiling and the fused
    epilogue (`store_rescaled`, W8A8's rescale order) are the same."""
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

    if FLOAT_CODES:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # [BLOCK_M, BLOCK_N]
    zero = 0.0 if FLOAT_CODES else 0  # the padding code, in the codes' kind
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=zero)  # [BLOCK_M, BLOCK_K] int8 / e4m3
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=zero)  # [BLOCK_K, BLOCK_N] int8 / e4m3
        if FNUZ:
            acc = tl.dot(as_fnuz(a), as_fnuz(w), acc, out_dtype=tl.float32)  # 1/4 of the e4m3fn dot, exactly
        elif FLOAT_CODES:
            acc = tl.dot(a, w, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if FNUZ:
        acc = acc * 4.0  # exact: back to the e4m3fn codes' sum

    out_ptrs = out_ptr + pid_s * stride_os + pid_b * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:
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
    """`out[b, m, n] = (f32(sum_k lhs[b,m,k] * rhs[b,n,k]) * rhs_scale[b,n]) * lhs_scale[b,m] + bias[n]`.

    lhs: int8 codes (M, K) or (B, M, K); lhs_scale f32 (M,) / (B, M). rhs: int8 (N, K) shared by
    every batch, or (B, N, K); rhs_scale f32 (N,) / (B, N). Any strides (nothing is copied).
    `return_acc=True` returns the raw int32 accumulator instead (for tests; scales/bias unused).
    Checked (`_launch.check_operands`); `config` None: the heuristic's for the device.
    """
    device = check_operands(W8A8, lhs, lhs_scale, rhs, rhs_scale, None, bias)
    cfg = resolve_config(config, W8A8, lhs, rhs, device)
    return launch_w8a8(lhs, lhs_scale, rhs, rhs_scale, bias, out_dtype=out_dtype, config=cfg, return_acc=return_acc)


def launch_w8a8(
    lhs: torch.Tensor, lhs_scale: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor,
    bias: torch.Tensor | None, *, out_dtype: str | torch.dtype, config: MatmulConfig, return_acc: bool = False,
) -> torch.Tensor:
    """`w8a8_matmul` on operands it does not check, with a config that runs them (a bound call's)."""
    return launch_codes(lhs, lhs_scale, rhs, rhs_scale, bias, out_dtype=out_dtype, config=config, weight=INT8,
                        return_acc=return_acc)


def launch_codes(
    lhs: torch.Tensor, lhs_scale: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor,
    bias: torch.Tensor | None, *, out_dtype: str | torch.dtype, config: MatmulConfig, weight: GemvWeight,
    return_acc: bool = False, fnuz: bool = False,
) -> torch.Tensor:
    """A per-row-scaled code dot (W8A8: `weight=INT8`; FP8: `weight=E4M3`, `fnuz` on gfx942) through the
    config's kernel: the tile kernel above or the GEMV, split K or not (`splitk.plan`). `return_acc`
    (integer codes): the raw int32 accumulators instead of the rescaled output."""
    float_codes = weight is E4M3
    acc_dtype = torch.float32 if float_codes else torch.int32
    v = allocate(lhs, lhs_scale, rhs, acc_dtype if return_acc else torch_dtype(out_dtype))
    if v.m and v.n:
        plan = splitk.plan(config, v.k, v.out, acc_dtype)
        if config.kernel is Kernel.GEMV:
            launch_gemv(config, plan, v.lhs, rhs, rhs_scale, weight=weight, a_scale=v.lhs_scale, bias=bias,
                        return_acc=return_acc, float_codes=float_codes)
        else:
            a, a_s = v.lhs, v.lhs_scale
            grid = (triton.cdiv(v.m, config.block_m) * triton.cdiv(v.n, config.block_n), v.batches, plan.splits)
            w8a8_kernel[grid](
                a, a_s, rhs, rhs_scale, bias if bias is not None else rhs_scale, plan.target,
                v.m, v.n, v.k, plan.k_per_split,
                a.stride(0), a.stride(1), a.stride(2),
                a_s.stride(0), a_s.stride(1),
                batch_stride(rhs, 3), rhs.stride(-2), rhs.stride(-1),
                batch_stride(rhs_scale, 2), rhs_scale.stride(-1),
                *plan.target_strides(),
                HAS_BIAS=bias is not None, PARTIAL=return_acc or plan.partial, FLOAT_CODES=float_codes, FNUZ=fnuz,
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False)
        if return_acc:
            plan.finish()
        else:
            plan.finish(a_scale=v.lhs_scale, w_scale=rhs_scale, bias=bias)
    return v.result()
