"""`QTensor`: a quantized (out_features, in_features) weight in canonical layout, and `quantize`.

Quantization here is the format's own definition (`OperandFormat.quantize`) executed in torch on the
weight's device (`torch_bindings.arrays.TORCH_OPS`), so codes and scales are bit-identical to
`qkernels.reference.quantize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qkernels import numerics
from qkernels.formats import OperandFormat, QOperand, Recipe, resolve_recipe
from torch_bindings.arrays import DTYPES, TORCH_OPS

__all__ = ["QTensor", "quantize", "quantize_rows", "unpack_int4", "codes", "dequantize_operand",
           "FLOAT_DTYPES", "check_float"]

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
        expect = {"qvalue": ((n, fmt.stored_k(k)), DTYPES[fmt.qtype.storage]),
                  "scale": (fmt.scale_shape((n, k)), torch.float32)}
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


def check_float(x: torch.Tensor, name: str) -> None:
    """TypeError unless `x` is a float32/bfloat16/float16 tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {[str(d) for d in FLOAT_DTYPES]} "
                        f"(cast it with .float() / .bfloat16())")


def quantize_rows(x: torch.Tensor, fmt: OperandFormat | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic quantization of activations (..., K) per row: (codes, scale f32 (...,)).

    The activation format's definition (default int8 per row) in torch: bit-identical to
    `reference.quantize(x, fmt)`. A NaN/Inf anywhere in a row makes its scale non-finite: raises.
    """
    from qkernels.formats import W8A8

    q = (fmt or W8A8.lhs).quantize_activations(x, TORCH_OPS)
    return q.qvalue, q.scale


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Two int4 / uint4 codes per byte -> int8 codes (..., 2 * K_stored), sign-extended when `signed`."""
    return TORCH_OPS.unpack_nibbles(packed, signed)


def codes(operand: QOperand, fmt: OperandFormat) -> torch.Tensor:
    """The codes (..., K_padded), unpacked for packed formats (padding included: zero codes)."""
    return unpack_int4(operand.qvalue, fmt.qtype.signed) if fmt.packed else operand.qvalue


def dequantize_operand(operand: QOperand, fmt: OperandFormat, k: int) -> torch.Tensor:
    """`(f32(q) - zero) * scale` in f32, shape (..., K): the format's dequantize in torch."""
    return fmt.dequantize(operand, k, TORCH_OPS)


def quantize(w: torch.Tensor, recipe: Any = None, *, name: str = "weight") -> QTensor:
    """Quantize an (out_features, in_features) float weight for `recipe` (default W8A8).

    in_features is zero-padded to the group size (and to even length for int4) before
    calibration; zeros change neither an absmax nor a range that already includes 0. Raises
    ValueError if the weight holds NaN/Inf, TypeError if it is not a float tensor.
    """
    recipe = resolve_recipe(recipe)
    check_float(w, name)
    if w.ndim != 2:
        raise ValueError(f"{name} has shape {tuple(w.shape)}; quantize takes an (out_features, in_features) "
                         f"weight (reshape it to 2-D first)")
    w = w.detach()
    if w.is_meta:
        raise ValueError(f"{name} is on the meta device and has no values to quantize; load the float weights "
                         f"first (model.to_empty(device=...) + load_state_dict), or build the quantized model on "
                         f"meta with qkernels.quantize_ and load a quantized checkpoint with assign=True")
    numerics.check_finite(w, name, TORCH_OPS)
    q = recipe.rhs.quantize(w, TORCH_OPS)
    recipe.check_weight_scale(q.scale, w.shape[1], TORCH_OPS, what=name)
    return QTensor(qvalue=q.qvalue.contiguous(), scale=q.scale.contiguous(),
                   zero_point=None if q.zero_point is None else q.zero_point.contiguous(), recipe=recipe,
                   shape=tuple(w.shape))
