"""`QLinear` (an `nn.Linear` with a frozen quantized weight) and `quantize_` (swap them in place)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qkernels import dispatch
from qkernels.formats import Recipe, W8A8, resolve_recipe
from torch_bindings.arrays import DTYPES, dtype_name
from torch_bindings.functional import linear
from torch_bindings.ops import device_of, platform_of
from torch_bindings.qtensor import QTensor, quantize

__all__ = ["QLinear", "quantize_"]


class QLinear(nn.Module):
    """`nn.Linear` with a quantized, frozen weight; `forward` is `qkernels.linear(x, self.weight, self.bias)`.

    The weight's `qvalue`, `scale` and `zero_point` are buffers (so `state_dict`, `torch.save`,
    safetensors and `.to(device)` handle them); `bias` stays a float `nn.Parameter`. Any
    in_features works: K is padded to the group size inside the stored weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: Any = W8A8,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.recipe: Recipe = resolve_recipe(recipe)
        fmt = self.recipe.rhs
        scale_shape = fmt.scale_shape((out_features, in_features))
        self.register_buffer("qvalue", torch.zeros(out_features, fmt.stored_k(in_features),
                                                   dtype=DTYPES[fmt.qtype.storage], device=device))
        self.register_buffer("scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("zero_point", torch.zeros(scale_shape, dtype=torch.int8, device=device)
                             if fmt.zero_point else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @property
    def weight(self) -> QTensor:
        return QTensor(qvalue=self.qvalue, scale=self.scale, zero_point=self.zero_point, recipe=self.recipe,
                       shape=(self.out_features, self.in_features))

    @classmethod
    def from_float(cls, linear_module: nn.Linear, recipe: Any = W8A8) -> QLinear:
        """A QLinear holding `linear_module`'s weight quantized with `recipe`, sharing its bias."""
        w = linear_module.weight
        q = cls(linear_module.in_features, linear_module.out_features, bias=False, recipe=recipe, device=w.device)
        qt = quantize(w.detach(), q.recipe, name=f"weight of {linear_module!r}")
        q.qvalue, q.scale = qt.qvalue, qt.scale
        if qt.zero_point is not None:
            q.zero_point = qt.zero_point
        q.bias = linear_module.bias
        return q

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)

    def backend(self, dtype: torch.dtype = torch.float32) -> str:
        """Name of the implementation a single-token call in `dtype` would run on this layer's device."""
        problem = dispatch.Problem(recipe=self.recipe, m=1, n=self.out_features, k=self.in_features,
                                   act_dtype=dtype_name(dtype), out_dtype=dtype_name(dtype),
                                   has_bias=self.bias is not None, framework="torch",
                                   platform=platform_of(self.qvalue.device), device=device_of(self.qvalue.device))
        choice = dispatch.explain(problem)
        return choice.chosen.name if choice.chosen else f"none ({choice.error})"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"recipe={self.recipe.name}, backend={self.backend()}")


def quantize_(model: nn.Module, recipe: Any = W8A8,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replace every `nn.Linear` in `model` (for which `filter_fn(module, fqn)` is true) by a QLinear.

    In place; returns `model` (or a new QLinear when `model` itself is an `nn.Linear`).
    """
    recipe = resolve_recipe(recipe)
    if isinstance(model, nn.Linear):
        return QLinear.from_float(model, recipe) if filter_fn is None or filter_fn(model, "") else model
    for fqn, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            child_fqn = f"{fqn}.{name}" if fqn else name
            if isinstance(child, nn.Linear) and (filter_fn is None or filter_fn(child, child_fqn)):
                setattr(module, name, QLinear.from_float(child, recipe))
    return model
