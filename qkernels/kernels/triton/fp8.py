"""FP8: float8_e4m3fn activations (per token) x float8_e4m3fn weights (per output channel), fp8 tensor-core MMA.

`tl.dot` on fp8 operands accumulating in f32: `mma.sync ... e4m3` on Ada (sm_89, SASS
`QMMA.16832.F32.E4M3.E4M3`), `wgmma ... e4m3` on Hopper (sm_90, `QGMMA.64x128x32.F32.E4M3.E4M3`),
`v_mfma_f32_*_fp8_fp8` on MI300 (gfx942); `python -m qkernels.aot` checks each config for it. Every
product of two e4m3 codes is exact in f32, so the kernel differs from the reference (`Accumulation.FLOAT_CODES`) only in the order of the f32
sum, within `qkernels.testing.tolerances`. The rescale is fused as W8A8's, in DESIGN.md section 4's
order: `y = (acc * s_rhs[n]) * s_lhs[m]`, then `y = y + bias[n]`, then one cast (`enable_fp_fusion=False`).

- Hopper: its fp8 MMA keeps fewer bits than f32 in its own running sum (DeepSeek-V3 reports ~14), so the
  dot promotes into the f32 accumulator after every BLOCK_K products (`max_num_imprecise_acc=BLOCK_K`,
  as DeepGEMM promotes every 128); not measured here (no GPU).
- gfx942: the MFMA multiplies e4m3fnuz, not e4m3fn (Triton emulates e4m3fn there). The kernel reads
  the e4m3fn bytes as fnuz (`_common.as_fnuz`: each value halves exactly, -0 becomes +0), so the dot is
  exactly 1/4 of the e4m3fn one, and multiplies the f32 accumulator by 4 (exact) before the epilogue:
  the same sums in the same order as an e4m3fn MMA. Checked in the interpreter (`fnuz=True`) and by the
  gfx942 AOT check (the fp8 MFMA in the machine code).

Decode: the GEMV kernel (`gemv.py`, f32 sum of exact products, no tensor cores) or split-K
(`splitk.py`: f32 partials summed in fixed split order, then the same epilogue once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkernels import hardware
from qkernels.formats import FP8
from qkernels.kernels.triton import splitk
from qkernels.kernels.triton._common import (
    Kernel, MatmulConfig, as_fnuz, batch_stride, grouped_tile, interpreting, platform_of, store_rescaled, torch_dtype,
)
from qkernels.kernels.triton._launch import allocate, check_operands, resolve_config
from qkernels.kernels.triton.gemv import E4M3, launch_gemv

__all__ = ["CONFIGS", "fp8_matmul", "launch_fp8", "fp8_kernel"]

CONFIGS: dict[str, tuple[MatmulConfig, ...]] = {
    # 'sm_80' is the table of sm_80..sm_89 parts; fp8 runs on sm_89 (Ada) only: 99 KB shared memory per block.
    "sm_80": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4, max_m=16),
              MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
    # sm_90: 64-row tiles at least, so decode tiles reach wgmma too (with 16 rows Triton's mma.sync path
    # upcasts fp8 to f16 on Hopper: HMMA.16816.F32, measured with triton 3.9); 128x256 tiles spill there
    # (352-592 bytes, the promoted accumulator is a second register tile), 128x128x128 does not.
    "sm_90": (MatmulConfig(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=4, max_m=16),
              MatmulConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)),
    "gfx942": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=2, max_m=16),
               MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=2)),
    "interpret": (MatmulConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1),),
}


@triton.jit
def fp8_kernel(
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
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,  # PARTIAL: store the raw f32 accumulator (split-K)
    FNUZ: tl.constexpr,  # gfx942: multiply the codes as e4m3fnuz (module docstring)
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K] e4m3
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N] e4m3
        if FNUZ:
            acc = tl.dot(as_fnuz(a), as_fnuz(w), acc, out_dtype=tl.float32)  # 1/4 of the e4m3fn dot, exactly
        else:
            acc = tl.dot(a, w, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
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


def fp8_matmul(
    lhs: torch.Tensor, lhs_scale: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor,
    bias: torch.Tensor | None = None, *, out_dtype: str | torch.dtype = "bfloat16",
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """`out[b, m, n] = (sum_k lhs[b,m,k] * rhs[b,n,k] (f32) * rhs_scale[b,n]) * lhs_scale[b,m] + bias[n]`.

    lhs: float8_e4m3fn codes (M, K) or (B, M, K) (`quantize_rows(x, qtype=FP8_E4M3)`); lhs_scale f32
    (M,) / (B, M). rhs: float8_e4m3fn (N, K) shared by every batch, or (B, N, K); rhs_scale f32 (N,) /
    (B, N). Any strides. Checked (`_launch.check_operands`, and a GPU with fp8 tensor cores:
    `hardware.fp8_mma_reason`); `config` None: the heuristic's for the device.
    """
    device = check_operands(FP8, lhs, lhs_scale, rhs, rhs_scale, None, bias)
    if device.type == "cuda":
        why = hardware.fp8_mma_reason(platform_of(device))
        if why:
            raise RuntimeError(f"fp8_matmul: {why}; use the W8A8 or W8A16 kernels on this GPU")
    cfg = resolve_config(config, FP8, lhs, rhs, device)
    return launch_fp8(lhs, lhs_scale, rhs, rhs_scale, bias, out_dtype=out_dtype, config=cfg)


def launch_fp8(
    lhs: torch.Tensor, lhs_scale: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor,
    bias: torch.Tensor | None, *, out_dtype: str | torch.dtype, config: MatmulConfig, fnuz: bool | None = None,
) -> torch.Tensor:
    """`fp8_matmul` on operands it does not check, with a config that runs them (a bound call's).
    `fnuz` None: the device's (ROCm: True); the interpreter runs either form."""
    if fnuz is None:
        fnuz = not interpreting() and platform_of(lhs.device).startswith("rocm:")
    v = allocate(lhs, lhs_scale, rhs, torch_dtype(out_dtype))
    if v.m and v.n:
        plan = splitk.plan(config, v.k, v.out, torch.float32)
        if config.kernel is Kernel.GEMV:
            launch_gemv(config, plan, v.lhs, rhs, rhs_scale, weight=E4M3, a_scale=v.lhs_scale, bias=bias,
                        float_codes=True)
        else:
            a, a_s = v.lhs, v.lhs_scale
            grid = (triton.cdiv(v.m, config.block_m) * triton.cdiv(v.n, config.block_n), v.batches, plan.splits)
            fp8_kernel[grid](
                a, a_s, rhs, rhs_scale, bias if bias is not None else rhs_scale, plan.target,
                v.m, v.n, v.k, plan.k_per_split,
                a.stride(0), a.stride(1), a.stride(2),
                a_s.stride(0), a_s.stride(1),
                batch_stride(rhs, 3), rhs.stride(-2), rhs.stride(-1),
                batch_stride(rhs_scale, 2), rhs_scale.stride(-1),
                *plan.target_strides(),
                HAS_BIAS=bias is not None, PARTIAL=plan.partial, FNUZ=fnuz,
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False)
        plan.finish(a_scale=v.lhs_scale, w_scale=rhs_scale, bias=bias)
    return v.result()
