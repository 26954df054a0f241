"""`TORCH_OPS`: the array primitives of `qkernels.numerics.ArrayOps` in torch (any device).

With these, `OperandFormat.quantize` / `dequantize` and `Recipe.matmul` run in torch and give the
reference's codes and scales bit for bit (IEEE f32 division by an expanded tensor, `torch.round`
ties to even, exact absmax) and, for integer recipes, its outputs: `torch._int_mm` accumulates
exactly in int32 and the rescale is the same f32 operations in the same order.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

__all__ = ["TorchOps", "TORCH_OPS", "DTYPES", "dtype_name"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
    "int8": torch.int8, "int32": torch.int32, "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype) or str(dtype).removeprefix("torch.")


def _int_mm_nt(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Exact int32 `w (N, K) @ a (M, K)^T` -> (N, M).

    `torch._int_mm(w, a.t())` is ~1.5-3x faster on CPU than `_int_mm(a, w.t())` for the (N, K)
    weight layout. It returns garbage for K=1 (measured, torch 2.13: the (1, M) transposed view has
    ambiguous strides), so K < 2 is zero-padded to 2, which leaves every dot unchanged (K=0: all 0).
    """
    if a.shape[1] < 2:
        a, w = (torch.nn.functional.pad(t, (0, 2 - t.shape[1])) for t in (a, w))
    return torch._int_mm(w, a.t())


class TorchOps:
    """`ArrayOps` in torch. `int_dot` takes 2-D codes (M, K) x (N, K) (torch-cpu folds batches into M)."""

    name: ClassVar[str] = "torch"
    host_checks: ClassVar[bool] = True

    def asarray(self, x: Any) -> torch.Tensor:
        return torch.as_tensor(x)

    def cast(self, x: Any, dtype: str) -> torch.Tensor:
        dt = DTYPES[dtype]
        return x if x.dtype is dt else x.to(dt)  # a no-op .to() still costs a dispatch (~1 us) per call

    def div(self, a: torch.Tensor, b: Any) -> torch.Tensor:
        # an expanded tensor divisor: no backend takes a reciprocal-multiply scalar path
        b = torch.full_like(a, b) if isinstance(b, (int, float)) else b.expand_as(a)
        return torch.div(a, b)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    def clip(self, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.clamp(x, None if lo == -math.inf else lo, None if hi == math.inf else hi)

    def where(self, cond: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
        return torch.where(cond, a, b)

    def absmax(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 0:
            return x.new_zeros((*x.shape[:-1], 1), dtype=torch.float32)
        return torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True)  # max |x|, one pass, exact

    def min(self, x: torch.Tensor) -> torch.Tensor:
        return x.amin(-1, keepdim=True)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(-1, keepdim=True)

    def all_finite(self, x: torch.Tensor) -> bool:
        return bool(torch.isfinite(x).all())

    def count_nonfinite(self, x: torch.Tensor) -> int:
        return int(x.numel() - torch.isfinite(x).sum())

    def pad_last(self, x: torch.Tensor, k: int) -> torch.Tensor:
        extra = k - x.shape[-1]
        if extra < 0:
            raise ValueError(f"cannot pad K={x.shape[-1]} down to {k}")
        return torch.nn.functional.pad(x, (0, extra)) if extra else x

    def pack_nibbles(self, q: torch.Tensor) -> torch.Tensor:
        u = q.view(torch.uint8) & 0xF
        return (u[..., 0::2] | (u[..., 1::2] << 4)).view(torch.int8)

    def unpack_nibbles(self, b: torch.Tensor, signed: bool) -> torch.Tensor:
        if signed:  # arithmetic shifts of the int8 byte sign-extend each nibble
            b = b.view(torch.int8)
            lo, hi = torch.bitwise_left_shift(b, 4) >> 4, b >> 4
        else:
            b = b.view(torch.uint8)
            lo, hi = b & 0xF, b >> 4
        return torch.stack([lo, hi], dim=-1).reshape(*b.shape[:-1], 2 * b.shape[-1]).view(torch.int8)

    def int_dot(self, a: torch.Tensor, w: torch.Tensor, batched: bool) -> torch.Tensor:
        if batched or a.dim() != 2:
            raise ValueError("torch int_dot takes 2-D codes; fold leading axes into M first")
        return _int_mm_nt(w, a).t()  # (M, N) view of the contiguous (N, M) result

    def grouped_int_dot(self, a: torch.Tensor, w: torch.Tensor, group_size: int, batched: bool) -> torch.Tensor:
        if w.shape[-1] == 0:
            return a.new_zeros((a.shape[0], w.shape[0], 0), dtype=torch.int32)
        return torch.stack([self.int_dot(a[:, s:s + group_size], w[:, s:s + group_size], batched)
                            for s in range(0, w.shape[-1], group_size)], dim=-1)

    def grouped_scaled_sum(self, a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, group_size: int,
                           batched: bool) -> torch.Tensor:
        y = None
        for g, s in enumerate(range(0, w.shape[-1], group_size)):  # streams: one (M, N) partial at a time
            term = self.int_dot(a[:, s:s + group_size], w[:, s:s + group_size], batched).to(torch.float32)
            term.mul_(scale[None, :, g])
            y = term if y is None else y.add_(term)  # 0 + t_0 == t_0: starting from t_0 is the same sum
        return y if y is not None else a.new_zeros((a.shape[0], w.shape[0]), dtype=torch.float32)

    def float_linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out_dtype: str,
                     batched: bool) -> torch.Tensor:
        """f32-accumulated `x @ w^T (+ bias)`, one rounding to `out_dtype`.

        bf16 with a bf16 (or no) bias: `F.linear` in bf16 (oneDNN accumulates in f32, adds the bias and
        rounds once). fp16 is computed in f32: the CPU fp16 GEMM is ~6x slower than f32 (torch 2.13).
        """
        out = DTYPES[out_dtype]
        if x.dtype == torch.bfloat16 and out == torch.bfloat16 and (bias is None or bias.dtype == x.dtype):
            return torch.nn.functional.linear(x, w, bias)
        y = torch.matmul(x.to(torch.float32), w.to(torch.float32).transpose(-1, -2))
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(out)

    def quantile(self, x: torch.Tensor, q: float) -> torch.Tensor:
        """NumPy's linear rule through a sort (`torch.quantile` refuses inputs over 2**24 elements)."""
        x = x.to(torch.float32)
        n = x.shape[0]
        if n == 0:
            return x.new_zeros(x.shape[1:])
        s = torch.sort(x, dim=0).values
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    def broadcast_to(self, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.broadcast_to(torch.as_tensor(x), shape)


TORCH_OPS = TorchOps()
