"""`QLinear` (an `nn.Linear` with a frozen quantized weight) and `quantize_` (swap them in place)."""

from __future__ import annotations

import json
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

_STATE_FORMAT = "qkernels.QLinear/1"


class QLinear(nn.Module):
    """`nn.Linear` with a quantized, frozen weight; `forward` is `qkernels.linear(x, self.weight, self.bias)`.

    The weight's `qvalue`, `scale` and `zero_point` are buffers (so `state_dict`, `torch.save`,
    safetensors and `.to(device)` handle them); `bias` stays a float `nn.Parameter`. Any
    in_features works: K is padded to the group size inside the stored weight.

    The state dict also carries the layer's identity as `_extra_state` (a uint8 tensor of JSON, so
    safetensors can hold it): recipe name and logical (out, in) shape. Loading checks it, because
    packed shapes alone cannot tell a 100-wide int4 layer from a 128-wide one (both store 64 bytes
    per row at g32), nor W4A16 codes from W4A8 ones. A checkpoint without it (saved before this
    check existed) fails a strict load on the missing key; `strict=False` skips the check.
    On the meta device (`torch.device("meta")` model construction) `from_float` makes an empty
    QLinear of the right shapes, to be filled by `load_state_dict(..., assign=True)`.
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

    def get_extra_state(self) -> torch.Tensor:
        meta = {"format": _STATE_FORMAT, "recipe": self.recipe.name, "shape": [self.out_features, self.in_features]}
        return torch.tensor(list(json.dumps(meta, sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        try:
            meta = json.loads(bytes(torch.as_tensor(state, dtype=torch.uint8).tolist()).decode())
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"the checkpoint's _extra_state for a QLinear is not qkernels metadata ({e}); "
                             f"it was not saved from a qkernels.QLinear") from None
        want = {"format": _STATE_FORMAT, "recipe": self.recipe.name, "shape": [self.out_features, self.in_features]}
        if meta != want:
            raise ValueError(f"checkpoint holds a QLinear with recipe {meta.get('recipe')!r} and (out, in) shape "
                             f"{meta.get('shape')}, but this layer is {self.recipe.name!r} {want['shape']}; quantize "
                             f"the model with the checkpoint's recipe and shapes before loading it")

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # check the identity before any buffer is overwritten (torch sets extra state last)
        key = prefix + "_extra_state"
        if key in state_dict:
            self.set_extra_state(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_float(cls, linear_module: nn.Linear, recipe: Any = W8A8) -> QLinear:
        """A QLinear holding `linear_module`'s weight quantized with `recipe`, sharing its bias
        (empty buffers of the right shapes when the weight is on the meta device)."""
        w = linear_module.weight
        q = cls(linear_module.in_features, linear_module.out_features, bias=False, recipe=recipe, device=w.device)
        q.bias = linear_module.bias
        if w.is_meta:
            return q
        qt = quantize(w.detach(), q.recipe, name=f"weight of {linear_module!r}")
        q.qvalue, q.scale = qt.qvalue, qt.scale
        if qt.zero_point is not None:
            q.zero_point = qt.zero_point
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
