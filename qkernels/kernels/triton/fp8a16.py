"""FP8A16: bf16/fp16 activations x float8_e4m3fn weights with per-output-channel scales (weight-only fp8).

The W8A16 kernels run it unchanged: they load each weight code through its pointer's dtype, so an e4m3
tile is dequantized in registers as `w = f32(q) * scale[n]`, cast to the activation dtype (DESIGN.md
section 4) and fed to the bf16/fp16 MMA accumulating in f32; GEMV and split-K likewise. The family has
its own config table (and tag, 'fp8a16') and needs fp8 support for the weight loads: CUDA sm_89+ or
gfx942 (Triton refuses the fp8e4nv type below sm_89).
"""

from __future__ import annotations

import torch

from qkernels import hardware
from qkernels.formats import FP8A16
from qkernels.kernels.triton import w8a16
from qkernels.kernels.triton._common import MatmulConfig, platform_of
from qkernels.kernels.triton._launch import check_operands, resolve_config

__all__ = ["CONFIGS", "fp8a16_matmul", "launch_fp8a16"]

CONFIGS: dict[str, tuple[MatmulConfig, ...]] = dict(w8a16.CONFIGS)
"""W8A16's: the same kernels, the same bytes per weight element."""


def fp8a16_matmul(
    lhs: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
    out_dtype: str | torch.dtype | None = None, config: MatmulConfig | None = None,
) -> torch.Tensor:
    """FP8A16 matmul of bf16/fp16 `lhs` (B?, M, K) with float8_e4m3fn `rhs` (B?, N, K), rhs_scale f32 (B?, N).

    out defaults to lhs's dtype; a 2-D rhs is shared by every batch of a 3-D lhs. Checked
    (`_launch.check_operands`, and fp8 support on the GPU); `config` None: the heuristic's.
    """
    device = check_operands(FP8A16, lhs, None, rhs, rhs_scale, None, bias)
    if device.type == "cuda":
        why = hardware.fp8_mma_reason(platform_of(device))
        if why:
            raise RuntimeError(f"fp8a16_matmul: {why}; use the W8A16 kernels on this GPU")
    cfg = resolve_config(config, FP8A16, lhs, rhs, device)
    return launch_fp8a16(lhs, rhs, rhs_scale, bias, out_dtype=out_dtype, config=cfg)


launch_fp8a16 = w8a16.launch_w8a16
"""`fp8a16_matmul` unchecked: W8A16's launcher (see the module docstring)."""
