"""`QTensor`: a quantized (out_features, in_features) weight in canonical layout, and `quantize`.

Quantization here is the format's own definition (`OperandFormat.quantize`) executed in torch on the
weight's device (`torch_bindings.arrays.TORCH_OPS`), so codes and scales are bit-identical to
`qkernels.reference.quantize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qkernels import calibration, numerics, quality
from qkernels.formats import OperandFormat, QOperand, Recipe, recipe_named, resolve_recipe
from torch_bindings.arrays import DTYPES, TORCH_OPS

__all__ = ["QTensor", "quantize", "quantize_rows", "unpack_int4", "codes", "dequantize_operand",
           "FLOAT_DTYPES", "check_float", "check_operands"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True, kw_only=True, slots=True)
class QTensor:
    """A quantized weight: `w[n, :K] ≈ (unpack(qvalue)[n] - zero_point[n, g]) * scale[n, g]`.

    `qvalue`: int8 (N, K_stored), K padded with zero codes to a multiple of the group size (grouped
    formats) and packed two int4 per byte along K (low nibble = even k) for 4-bit formats.
    `scale`: f32 (N,) per output channel, or (N, K_padded // group_size) per group, broadcast over
    each group. `zero_point`: int8 like `scale` for uint4 (W4A16 zero_point=True), else None.
    `shape`: the logical (out_features, in_features) of the float weight.
    `input_scale`: f32 `()`, the calibrated activation scale of a static recipe (`qk.calibrate`); None
    before calibration (a forward then raises) and for dynamic recipes.
    `smooth`: f32 (in_features,) SmoothQuant factors `s`, or None. The codes then hold `w * s` (`s` folded
    into the weight along K) and the layer divides its activations by `s` before quantizing them, so
    `linear(x, w_q) ≈ (x / s) @ (w * s)^T = x @ w^T`; `dequantize()` returns the logical `w` (codes / s).

    A plain container of plain tensors, not a tensor subclass: it pickles with `torch.save`, and
    `QLinear` registers its three tensors as buffers so `state_dict` / safetensors round-trip.
    Quantized weights are frozen: they never require grad (`requires_grad_` raises).
    """

    qvalue: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    recipe: Recipe
    shape: tuple[int, int]
    input_scale: torch.Tensor | None = None
    smooth: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("qvalue", "scale", "zero_point", "input_scale", "smooth"):
            t = getattr(self, name)
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"QTensor.{name} must be a torch.Tensor, got {type(t).__name__}")
        check_operands(self.recipe, self.shape[1], _sig(self.qvalue), _sig(self.scale), _sig(self.zero_point),
                       n=self.shape[0], input_scale=_sig(self.input_scale), smooth=_sig(self.smooth))
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
        """Every tensor it holds: codes, scales, zero points, then the input scale and smoothing factors if set."""
        return tuple(t for t in (self.qvalue, self.scale, self.zero_point, self.input_scale, self.smooth)
                     if t is not None)

    def operand(self) -> QOperand:
        return QOperand(self.qvalue, self.scale, self.zero_point)

    def to(self, device: torch.device | str) -> QTensor:
        """The same weight on `device` (codes and scales are copied, never re-quantized)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"QTensor.to({device}): a quantized weight has no float dtype to change (its codes are "
                            f"integers, its scales f32); cast the activations instead, or dequantize({device})")
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return QTensor(qvalue=self.qvalue.to(device), scale=self.scale.to(device), zero_point=move(self.zero_point),
                       recipe=self.recipe, shape=self.shape, input_scale=move(self.input_scale),
                       smooth=move(self.smooth))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float (out_features, in_features) weight `(f32(q) - zero) * scale` (divided by `smooth`
        along K when set: the logical weight), cast to `dtype`."""
        w = dequantize_operand(self.operand(), self.fmt, self.in_features)
        if self.smooth is not None:
            w = calibration.smooth_activations(w, self.smooth, TORCH_OPS)
        return w.to(dtype)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # A QTensor handed to a torch function (code reading `layer.weight` as a float tensor) fails here,
        # saying so; having the hook also turns torch's fused fast paths off (`has_torch_function`), e.g.
        # nn.TransformerEncoderLayer's, which then call the layers instead of reading their weights.
        raise TypeError(
            f"{getattr(func, '__name__', func)} got a qkernels QTensor, which is not a torch.Tensor: code that reads a "
            f"quantized layer's .weight as a float tensor cannot run on it; call the layer (or "
            f"qkernels.linear(x, w_q, bias)), use w_q.dequantize(), or leave that layer unquantized (filter_fn)")

    def __reduce__(self) -> tuple[Any, ...]:
        # plain data only (tensors, the recipe's name, ints): `torch.load(weights_only=True)` rebuilds it
        # through `_rebuild_qtensor`, the one global it needs (registered with add_safe_globals below)
        return (_rebuild_qtensor, (self.qvalue, self.scale, self.zero_point, self.recipe.name, *self.shape,
                                   self.input_scale, self.smooth))

    def __repr__(self) -> str:
        return f"QTensor(shape={self.shape}, recipe={self.recipe.name}, device={self.device})"


def _rebuild_qtensor(qvalue: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, recipe: str,
                     out_features: int, in_features: int, input_scale: torch.Tensor | None = None,
                     smooth: torch.Tensor | None = None) -> QTensor:
    """Unpickle a QTensor: only tensors, a recipe name (looked up, never evaluated) and two ints, all
    validated by `QTensor.__post_init__`."""
    if not isinstance(recipe, str) or not all(isinstance(v, int) for v in (out_features, in_features)):
        raise ValueError(f"not a saved QTensor: recipe {recipe!r}, shape ({out_features!r}, {in_features!r})")
    return QTensor(qvalue=qvalue, scale=scale, zero_point=zero_point, recipe=recipe_named(recipe),
                   shape=(out_features, in_features), input_scale=input_scale, smooth=smooth)


torch.serialization.add_safe_globals([_rebuild_qtensor])


def _sig(t: torch.Tensor | None) -> tuple[tuple[Any, ...], torch.dtype] | None:
    return None if t is None else (tuple(t.shape), t.dtype)


def check_operands(recipe: Recipe, k: Any, qvalue: tuple[Any, ...], scale: tuple[Any, ...],
                   zero: tuple[Any, ...] | None, n: Any = None, input_scale: tuple[Any, ...] | None = None,
                   smooth: tuple[Any, ...] | None = None) -> None:
    """The one check of a quantized weight's stored tensors against its format, for a logical K (and N).

    `qvalue`, `scale`, `zero` are (shape, dtype) pairs, so the custom op can check the symbolic shapes of
    torch.compile's fake tensors with it; a QTensor is checked by the same rules when it is made.
    """
    fmt = recipe.rhs
    (q_shape, q_dtype), (s_shape, s_dtype) = qvalue, scale
    stored = fmt.stored_k(k)
    rows = q_shape[0] if n is None and len(q_shape) == 2 else n
    if len(q_shape) != 2 or tuple(q_shape) != (rows, stored):
        raise ValueError(f"qvalue has shape {q_shape} but a weight with K={k} in {recipe.name} needs "
                         f"({'N' if n is None else n}, {stored}); the weight's in_features does not match")
    if q_dtype != DTYPES[fmt.qtype.storage]:
        raise TypeError(f"qvalue has dtype {q_dtype}; {fmt.describe()} codes are stored as {fmt.qtype.storage}")
    want = fmt.scale_shape((q_shape[0], k))
    if s_shape != want or s_dtype != torch.float32:
        raise ValueError(f"scale is {s_shape} {s_dtype}; {recipe.name} needs {want} torch.float32")
    if (zero is not None) != fmt.zero_point or (zero is not None and (zero[0] != want or zero[1] != torch.int8)):
        need = f"{want} torch.int8" if fmt.zero_point else "None"
        raise ValueError(f"zero_point is {zero}; {recipe.name} needs {need}")
    if input_scale is not None:
        if not recipe.static:
            raise ValueError(f"input_scale given, but {recipe.name} quantizes activations per token on the fly; "
                             f"use {recipe.name}-static (static=True) to serve with calibrated scales")
        if tuple(input_scale[0]) != () or input_scale[1] != torch.float32:
            raise ValueError(f"input_scale is {input_scale}; {recipe.name} needs one calibrated scale: () torch.float32")
    if smooth is not None and (tuple(smooth[0]) != (k,) or smooth[1] != torch.float32):
        raise ValueError(f"smooth is {smooth}; SmoothQuant factors are one per input channel: ({k},) torch.float32")


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


def quantize(w: torch.Tensor, recipe: Any = None, *, name: str = "weight", method: str = "rtn") -> QTensor:
    """Quantize an (out_features, in_features) float weight for `recipe` (default W8A8).

    in_features is zero-padded to the group size (and to even length for int4) before
    calibration; zeros change neither an absmax nor a range that already includes 0. Raises
    ValueError if the weight holds NaN/Inf, TypeError if it is not a float tensor.
    `method`: "rtn" (round to nearest on each block's full range) or "mse" (each block's range
    clipped where that lowers its reconstruction error, `qkernels.quality.clip_search`); the stored
    layout is the same. Data-aware methods (GPTQ, AWQ) run through `qk.quantize_(..., calibration=)`.
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
    if method == "rtn":
        q = recipe.rhs.quantize(w, TORCH_OPS)
    else:  # an offline search: NumPy runs it ~5-15x faster than torch's CPU ops here (measured, 1536x384)
        q = QOperand(*(None if a is None else torch.from_numpy(a).to(w.device) for a in
                       quality.quantize_weight(w.to(torch.float32).cpu().numpy(), recipe.rhs, method=method)))
    recipe.check_weight_scale(q.scale, w.shape[1], TORCH_OPS, what=name)
    return QTensor(qvalue=q.qvalue.contiguous(), scale=q.scale.contiguous(),
                   zero_point=None if q.zero_point is None else q.zero_point.contiguous(), recipe=recipe,
                   shape=tuple(w.shape))
