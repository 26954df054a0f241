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

from qkernels import hardware
from qkernels.formats import FP8
from qkernels.kernels.triton._common import MatmulConfig, interpreting, platform_of
from qkernels.kernels.triton._launch import check_operands, resolve_config
from qkernels.kernels.triton.gemv import E4M3
from qkernels.kernels.triton.w8a8 import launch_codes, w8a8_kernel

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


fp8_kernel = w8a8_kernel
"""The tile kernel, W8A8's with `FLOAT_CODES=True` (f32 accumulator, fp8 MMA promoted every BLOCK_K
products; `FNUZ` on gfx942): the two per-row-scaled code dots differ only there (`w8a8.w8a8_kernel`)."""


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
    return launch_codes(lhs, lhs_scale, rhs, rhs_scale, bias, out_dtype=out_dtype, config=config, weight=E4M3,
                        fnuz=fnuz)
