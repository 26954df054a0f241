"""Fused activation quantization: float rows -> int8 or float8_e4m3fn codes + one f32 scale per row, in one kernel.

Bit-exact to `qkernels.numerics` (symmetric, per row, subnormal inputs read as 0): `scale = amax / qmax`
(1 when that is below FLT_MIN), then int8: `q = clip(round_half_even(x / scale), -127, 127)`; fp8:
`q = e4m3(clip(x / scale, -448, 448))` rounded to the nearest e4m3 value, ties to even (`round_to_e4m3`),
with IEEE divisions (`tl.math.div_rn`, not the approximate `/`). A row holding NaN/Inf gets a NaN scale,
so the matmul output of that row is NaN, as a float matmul's would be; never silently finite garbage.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qkernels import numerics

from qkernels.kernels.triton._common import QuantizeConfig, arch_of, rint_half_even, round_to_e4m3

__all__ = ["CONFIGS", "quantize_rows", "quantize_rows_kernel"]

CONFIGS: dict[str, QuantizeConfig] = {
    "sm_80": QuantizeConfig(block_rows=4, block_k=1024, num_warps=4),
    "sm_90": QuantizeConfig(block_rows=4, block_k=1024, num_warps=4),
    "gfx942": QuantizeConfig(block_rows=4, block_k=1024, num_warps=4),
    "interpret": QuantizeConfig(block_rows=8, block_k=64, num_warps=1),
}

FLT_MIN = tl.constexpr(numerics.FLT_MIN)  # 2**-126: see numerics.symmetric_scale


@triton.jit
def quantize_rows_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr,
    # sizes
    R, K,
    # strides
    stride_xr, stride_xk,
    stride_qr, stride_qk,
    # meta-parameters
    QMAX: tl.constexpr, FLOAT8: tl.constexpr,  # 127.0 and int8 codes, or 448.0 and float8_e4m3fn codes
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)  # [BLOCK_K]

    # Pass 1: absolute maximum per row; `x * 0` is 0 for finite x and NaN for NaN/Inf, so
    # `poison` turns the scale of a non-finite row into NaN.
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    poison = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = row_ok[:, None] & (k[None, :] < K)
        x = tl.load(x_ptr + rows64[:, None] * stride_xr + k[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)  # [BLOCK_R, BLOCK_K]
        x = tl.where(tl.abs(x) < FLT_MIN, 0.0, x)  # subnormals read as 0 (numerics.flush_subnormals)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        poison = poison + tl.sum(x * 0.0, axis=1)
    scale = tl.math.div_rn(amax, tl.full((BLOCK_R,), QMAX, tl.float32))
    scale = tl.where(scale < FLT_MIN, 1.0, scale) + poison  # [BLOCK_R]; 0 or subnormal -> 1
    tl.store(scale_ptr + rows, scale, mask=row_ok)

    # Pass 2: codes, q = clip(rint(x / scale), -127, 127) (fp8: e4m3(clip(x / scale, -448, 448))), IEEE division.
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = row_ok[:, None] & (k[None, :] < K)
        x = tl.load(x_ptr + rows64[:, None] * stride_xr + k[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)
        x = tl.where(tl.abs(x) < FLT_MIN, 0.0, x)
        y = tl.math.div_rn(x, scale[:, None])  # [BLOCK_R, BLOCK_K]
        if FLOAT8:
            q = round_to_e4m3(tl.minimum(tl.maximum(y, -QMAX), QMAX))  # an e4m3 value: the cast is exact
        else:
            q = tl.minimum(tl.maximum(rint_half_even(y), -QMAX), QMAX)
        tl.store(q_ptr + rows64[:, None] * stride_qr + k[None, :] * stride_qk, q.to(q_ptr.dtype.element_ty),
                 mask=mask)


_CODES = {numerics.INT8.name: torch.int8, numerics.FP8_E4M3.name: torch.float8_e4m3fn}
"""The code types the kernel writes, by `QType` name."""


def quantize_rows(x: torch.Tensor, *, config: QuantizeConfig | None = None,
                  qtype: numerics.QType = numerics.INT8) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float activations (..., K) per row: codes (..., K) of `qtype` (int8, or float8_e4m3fn
    for `numerics.FP8_E4M3`) and f32 scales (...,).

    Any float dtype (f32, f16, bf16) and any strides; the leading axes are flattened as a view when
    the layout allows (a copy of the activations otherwise).
    """
    if qtype.name not in _CODES:
        raise ValueError(f"quantize_rows writes {sorted(_CODES)} codes, not {qtype.name}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"activations have dtype {x.dtype}; quantize_rows takes float32, float16 or bfloat16")
    if x.dim() < 1:
        raise ValueError("activations must have at least one axis (K)")
    arch = arch_of(x.device)
    cfg = config or CONFIGS[arch]
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    rows = x.reshape(math.prod(lead), k)  # explicit rows: -1 is ambiguous for K=0
    r = rows.shape[0]
    q = torch.empty((r, k), dtype=_CODES[qtype.name], device=x.device)
    scale = torch.empty((r,), dtype=torch.float32, device=x.device)
    if r:
        grid = (triton.cdiv(r, cfg.block_rows),)
        quantize_rows_kernel[grid](
            rows, q, scale, r, k, rows.stride(0), rows.stride(1), q.stride(0), q.stride(1),
            QMAX=float(qtype.qmax), FLOAT8=not qtype.integer,
            BLOCK_R=cfg.block_rows, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, enable_fp_fusion=False)
    return q.reshape(*lead, k), scale.reshape(lead)
