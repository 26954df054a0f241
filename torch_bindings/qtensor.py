"""`QTensor`: a quantized (out_features, in_features) weight in canonical layout, and `quantize`.

Quantization here is torch-native (runs on the weight's device) and follows `qkernels.numerics`
operation by operation, so codes and scales are bit-identical to `qkernels.reference.quantize`
(IEEE f32 division by a tensor, `torch.round` ties to even, clip to the format's range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qkernels.formats import OperandFormat, QOperand, Recipe, resolve_recipe
from qkernels.numerics import Granularity

__all__ = ["QTensor", "quantize", "quantize_rows", "unpack_int4", "codes", "dequantize_operand",
           "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True, kw_only=True, slots=True)
class QTensor:
    """A quantized weight: `w[n, :K] ≈ (unpack(qvalue)[n] - zero_point[n, g]) * scale[n, g]`.

    `qvalue`: int8 (N, K_stored), K padded with zero codes to a multiple of the group size (grouped
    formats) and packed two int4 per byte along K (low nibble = even k) for 4-bit formats.
    `scale`: f32 (N,) per output channel, or (N, K_padded // group_size) per group, broadcast over
    each group. `zero_point`: int8 like `scale` for uint4 (W4A16 zero_point=True), else None.
    `shape`: the logical (out_features, in_features) of the float weight.

    A plain container of plain tensors, not a tensor subclass: it pickles with `torch.save`, and
    `QLinear` registers its three tensors as buffers so `state_dict` / safetensors round-trip.
    Quantized weights are frozen: they never require grad (`requires_grad_` raises).
    """

    qvalue: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    recipe: Recipe
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        n, k = self.shape
        fmt = self.fmt
        expect = {"qvalue": ((n, fmt.stored_k(k)), torch.int8), "scale": (fmt.scale_shape((n, k)), torch.float32)}
        if fmt.zero_point:
            expect["zero_point"] = (fmt.scale_shape((n, k)), torch.int8)
        elif self.zero_point is not None:
            raise ValueError(f"{self.recipe.name} is symmetric: zero_point must be None")
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"QTensor.{name} for a {self.shape} weight in {self.recipe.name} must be "
                                 f"{tuple(shape)} {dtype}, got {got}")
        devices = {t.device for t in self.tensors()}
        if len(devices) > 1:
            raise ValueError(f"QTensor tensors are on several devices {sorted(map(str, devices))}; use .to(device)")

    @property
    def fmt(self) -> OperandFormat:
        return self.recipe.rhs

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qvalue.device

    @property
    def requires_grad(self) -> bool:
        return any(t.requires_grad for t in self.tensors())

    def requires_grad_(self, requires_grad: bool = True) -> QTensor:
        if requires_grad:
            raise RuntimeError(
                "a quantized weight (QTensor) cannot require grad: its codes are integers and are frozen; "
                "train float adapters (e.g. LoRA) or the input instead, or keep the float weight trainable")
        return self

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.qvalue, self.scale, self.zero_point) if t is not None)

    def operand(self) -> QOperand:
        return QOperand(self.qvalue, self.scale, self.zero_point)

    def to(self, device: torch.device | str) -> QTensor:
        """The same weight on `device` (codes and scales are copied, never re-quantized)."""
        zp = None if self.zero_point is None else self.zero_point.to(device)
        return QTensor(qvalue=self.qvalue.to(device), scale=self.scale.to(device), zero_point=zp,
                       recipe=self.recipe, shape=self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float (out_features, in_features) weight `(f32(q) - zero) * scale`, cast to `dtype`."""
        return dequantize_operand(self.operand(), self.fmt, self.in_features).to(dtype)

    def __repr__(self) -> str:
        return f"QTensor(shape={self.shape}, recipe={self.recipe.name}, device={self.device})"


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {[str(d) for d in FLOAT_DTYPES]} "
                        f"(cast it with .float() / .bfloat16())")


def _check_finite(x: torch.Tensor, name: str) -> None:
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int(x.numel() - finite.sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s) and cannot be quantized; "
                         f"clean or clip the tensor (e.g. torch.nan_to_num) before quantizing it")


def _blocks(x: torch.Tensor, fmt: OperandFormat) -> torch.Tensor:
    """(..., K_padded) -> (..., n_blocks, block): one scale per block."""
    if fmt.granularity is Granularity.GROUP:
        return x.reshape(*x.shape[:-1], -1, fmt.group_size)
    if fmt.granularity is Granularity.ROW:
        return x.unsqueeze(-2)
    return x.reshape(*([1] * (x.ndim - 1)), 1, -1)


def _divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IEEE f32 `a / b`; `b` is expanded so no backend takes a reciprocal-multiply scalar path."""
    return torch.div(a, b.expand_as(a))


def _symmetric(xb: torch.Tensor, fmt: OperandFormat) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = fmt.qtype.qmax
    amax = torch.linalg.vector_norm(xb, ord=float("inf"), dim=-1, keepdim=True)  # max |x|, one pass, exact
    scale = torch.where(amax == 0, torch.ones_like(amax), _divide(amax, torch.full_like(amax, qmax)))
    q = _divide(xb, scale).round_().clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic int8 quantization of activations (..., K) per row: (codes int8, scale f32 (...,)).

    Bit-identical to `reference.quantize(x, recipe.lhs)`: f32 upcast, `amax / 127` (amax 0 -> 1),
    `clip(round_half_even(x / scale), -127, 127)`.
    """
    from qkernels.numerics import INT8

    fmt = OperandFormat(qtype=INT8, granularity=Granularity.ROW)
    q, scale = _symmetric(x.to(torch.float32).unsqueeze(-2), fmt)
    scale = scale[..., 0, 0]
    if not bool(torch.isfinite(scale).all()):  # a NaN/Inf anywhere in a row makes its amax non-finite
        bad = int((~torch.isfinite(scale)).sum())
        raise ValueError(f"activations contain NaN/Inf in {bad} row(s) and cannot be quantized to int8; "
                         f"fix the values upstream (e.g. torch.nan_to_num) or use a weight-only recipe")
    return q.squeeze(-2), scale


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last (even-length) axis: low nibble = even k."""
    u = q.view(torch.uint8) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).view(torch.int8)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of the packing: int8 codes (..., 2 * K_stored), sign-extended when `signed`."""
    if signed:  # arithmetic shifts of the int8 byte sign-extend each nibble
        b = packed.view(torch.int8)
        lo, hi = torch.bitwise_left_shift(b, 4) >> 4, b >> 4
    else:
        b = packed.view(torch.uint8)
        lo, hi = b & 0xF, b >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*b.shape[:-1], 2 * b.shape[-1]).view(torch.int8)


def codes(operand: QOperand, fmt: OperandFormat) -> torch.Tensor:
    """Unpacked int8 codes (..., K_padded), padding included (zero codes)."""
    return unpack_int4(operand.qvalue, fmt.qtype.signed) if fmt.packed else operand.qvalue


def dequantize_operand(operand: QOperand, fmt: OperandFormat, k: int) -> torch.Tensor:
    """`(f32(q) - zero) * scale` in f32, shape (..., K): the reference's dequantize in torch."""
    q = _blocks(codes(operand, fmt), fmt)
    if fmt.zero_point:
        q = q.to(torch.float32) - operand.zero_point.to(torch.float32).unsqueeze(-1)
    scale = operand.scale.unsqueeze(-1)
    if fmt.granularity is Granularity.ROW:
        scale = scale.unsqueeze(-1)
    w = torch.mul(q, scale)  # int8 codes promote to f32 inside the multiply: f32(q) * scale
    return w.reshape(*w.shape[:-2], -1)[..., :k]


def quantize(w: torch.Tensor, recipe: Any = None, *, name: str = "weight") -> QTensor:
    """Quantize an (out_features, in_features) float weight for `recipe` (default W8A8).

    in_features is zero-padded to the group size (and to even length for int4) before
    calibration; zeros change neither an absmax nor a range that already includes 0. Raises
    ValueError if the weight holds NaN/Inf, TypeError if it is not a float tensor.
    """
    recipe = resolve_recipe(recipe)
    _check_float(w, name)
    if w.ndim != 2:
        raise ValueError(f"{name} has shape {tuple(w.shape)}; quantize takes an (out_features, in_features) "
                         f"weight (reshape it to 2-D first)")
    if w.requires_grad:
        w = w.detach()
    _check_finite(w, name)
    fmt = recipe.rhs
    n, k = w.shape
    x = torch.nn.functional.pad(w.to(torch.float32), (0, fmt.padded_k(k) - k))
    xb = _blocks(x, fmt)
    zero = None
    if fmt.zero_point:
        qmax = fmt.qtype.qmax
        lo = torch.clamp(xb.amin(-1, keepdim=True), max=0)
        hi = torch.clamp(xb.amax(-1, keepdim=True), min=0)
        span = hi - lo
        scale = torch.where(span == 0, torch.ones_like(span), _divide(span, torch.full_like(span, qmax)))
        zero = torch.clamp(torch.round(_divide(-lo, scale)), 0, qmax)
        q = torch.clamp(torch.round(_divide(xb, scale)) + zero, 0, qmax).to(torch.int8)
        zero = zero[..., 0].to(torch.int8)
    else:
        q, scale = _symmetric(xb, fmt)
    q = q.reshape(n, -1)
    if fmt.packed:
        q = _pack_int4(q)
    scale = scale[..., 0]
    if fmt.granularity is Granularity.ROW:
        scale = scale[..., 0]
        zero = None if zero is None else zero[..., 0]
    return QTensor(qvalue=q.contiguous(), scale=scale.contiguous(),
                   zero_point=None if zero is None else zero.contiguous(), recipe=recipe, shape=(n, k))
