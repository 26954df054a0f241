"""Quantization-aware training: `prepare_qat` (nn.Linear -> `QATLinear`) and `convert` (-> `QLinear`).

The fake-quant forward is not a float imitation (`dequantize(quantize(w))` in a float GEMM): it quantizes
the float weight with the recipe's own format (`OperandFormat.quantize` through `TORCH_OPS`, as
`qkernels.quantize` does) and runs the very op a converted `QLinear` runs (`torch.ops.qkernels.linear`:
activations quantized by the recipe, integer accumulation, the rescale in DESIGN.md's order). So
`convert` changes nothing a forward computes: the converted layer's outputs equal the fake-quant
layer's bit for bit, for every recipe, on the same device and backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qkernels.formats import Recipe, W8A8, resolve_recipe
from torch_bindings.arrays import TORCH_OPS
from torch_bindings.functional import linear
from torch_bindings.modules import QLinear, swap_modules
from torch_bindings.qtensor import QTensor, quantize

__all__ = ["QATLinear", "prepare_qat", "convert", "fake_quant_linear"]


class _FakeQuantLinear(torch.autograd.Function):
    """Forward: the quantized linear of the freshly quantized weight. Backward: straight-through.

    The surrogate is `y = fq(x) @ fq(w)^T + b`, where `fq` is each side's quantize-dequantize (identity for
    float activations) and its derivative is taken as 1 (straight-through: absmax calibration never clips,
    so there is no clipping mask): `dx = dy @ fq(w)`, `dw = dy^T @ fq(x)`, `db = sum(dy)`, in f32.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                recipe: Recipe) -> torch.Tensor:
        wq = quantize(weight.detach(), recipe, name="QAT weight")
        ctx.save_for_backward(x, *wq.tensors())
        ctx.wq_meta = (wq.zero_point is not None, recipe, wq.shape)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return linear(x, wq, None if bias is None else bias.detach())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, qvalue, scale, *zero = ctx.saved_tensors
        has_zero, recipe, shape = ctx.wq_meta
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        wq = QTensor(qvalue=qvalue, scale=scale, zero_point=zero[0] if has_zero else None, recipe=recipe, shape=shape)
        g = grad.reshape(-1, shape[0]).to(torch.float32)
        x2 = x.reshape(-1, shape[1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ wq.dequantize()).reshape(x.shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            xs = x2.to(torch.float32)
            if recipe.lhs is not None:  # the activations the integer dot multiplied
                xs = recipe.lhs.dequantize(recipe.lhs.quantize_activations(x2.detach(), TORCH_OPS), shape[1], TORCH_OPS)
            grad_w = (g.t() @ xs).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None


def fake_quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Any) -> torch.Tensor:
    """`F.linear(x, weight, bias)` as `recipe` computes it after quantizing `weight`, with straight-through
    gradients to `x`, `weight` and `bias` (see `_FakeQuantLinear`)."""
    return _FakeQuantLinear.apply(x, weight, bias, resolve_recipe(recipe))


class QATLinear(nn.Linear):
    """An `nn.Linear` (trainable float weight and bias) whose forward is the recipe's quantized forward.

    `qk.convert` turns it into a `QLinear` of the same weight, whose outputs are bit-identical.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: Any = W8A8,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe: Recipe = _qat_recipe(recipe)

    @classmethod
    def from_float(cls, module: nn.Linear, recipe: Any = W8A8) -> QATLinear:
        """A QATLinear sharing `module`'s weight and bias Parameters (training updates them in place)."""
        qat = cls(module.in_features, module.out_features, bias=False, recipe=recipe, device="meta")
        qat.weight, qat.bias = module.weight, module.bias
        return qat

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fake_quant_linear(input, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"


def _qat_recipe(recipe: Any) -> Recipe:
    recipe = resolve_recipe(recipe)
    if recipe.quantized_backward:
        raise NotImplementedError(f"QAT with {recipe.name}: the quantized backward pass is not implemented in the "
                                  f"PyTorch binding; use {recipe.name.removesuffix('-qbwd')}")
    if getattr(recipe, "static", False):
        raise ValueError(f"QAT with the static recipe {recipe.name}: train with the dynamic recipe, convert, then "
                         f"qk.calibrate the converted model for static activation scales")
    return recipe


def prepare_qat(model: nn.Module, recipe: Any = W8A8,
                filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replace the `nn.Linear` layers of `model` by `QATLinear` (in place) and return the model (or the new
    layer when `model` is an `nn.Linear`). Layers are chosen as `quantize_` chooses them (the same default
    skips, the same `filter_fn`); the float weights stay Parameters, so an optimizer built before or after
    keeps training them."""
    recipe = _qat_recipe(recipe)
    return swap_modules(model, lambda m: isinstance(m, nn.Linear) and not isinstance(m, QATLinear),
                        lambda m, _: QATLinear.from_float(m, recipe), lambda m: m.recipe.name, filter_fn).model


def convert(model: nn.Module) -> nn.Module:
    """Replace every `QATLinear` by the `QLinear` of its current weight (in place); returns the model (or the
    new layer). The forward does not change: outputs are bit-identical to the fake-quant model's."""
    return swap_modules(model, lambda m: isinstance(m, QATLinear), lambda m, _: QLinear.from_float(m, m.recipe),
                        lambda m: m.recipe.name, None, check_unsafe=False).model
