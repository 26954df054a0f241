"""Quantized mixture-of-experts modules: `QGroupedLinear` (one quantized (E, out, in) expert stack) and
`QMoEExperts` (a transformers MoE experts module with its 3-D weights quantized), swapped in by `qk.quantize_`.

transformers 5.x stores the experts of Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, DeepSeek, ... as one module
holding 3-D parameters: `gate_up_proj` (E, 2I, H) (or `up_proj` without a gate) and `down_proj` (E, H, I),
transposed ((E, in, out)) where the class says `is_transposed`, with `<name>_bias` (E, out) where it says
`has_bias`. Its class is decorated with `transformers.integrations.moe.use_experts_implementation`, which
records that layout on the instance (`has_gate`, `has_bias`, `is_transposed`, `has_post_expert_norm`) and
gives it `_apply_gate` (the GLU; GPT-OSS has its own, on interleaved gate/up columns). `QMoEExperts` is
that module with the weights as `QGroupedLinear`s in F.linear's (E, out, in) layout, running
transformers' `grouped_mm_experts_forward` algorithm with `qk.grouped_linear` for the two grouped
matmuls: tokens sorted by expert, one grouped call per projection, the routing weights applied, the
top-k results summed in f32. Output columns keep the float module's order, so its `_apply_gate` and
activation run unchanged (the float module's other attributes and submodules are kept: `act_fn`,
`post_expert_norm`, GPT-OSS's `alpha` / `limit`). Expert-parallel sentinel ids (>= num_experts) give
zero rows, as in transformers. A module with 3-D expert weights whose class lacks those layout flags
is not swapped: the Summary names it with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qkernels.formats import W8A8, Recipe, resolve_recipe
from torch_bindings.arrays import DTYPES
from torch_bindings.grouped import QExperts, grouped_linear, quantize_experts
from torch_bindings.modules import LayerSummary, Summary

__all__ = ["QGroupedLinear", "QMoEExperts", "projections", "expert_weights", "swap_experts"]

_STATE_FORMAT = "qkernels.QGroupedLinear/1"
_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed")  # set by transformers' use_experts_implementation


class QGroupedLinear(nn.Module):
    """E quantized linear layers in one stack: `forward(x, offsets)` is `qk.grouped_linear(x, self.weight,
    offsets)` (+ `bias[expert_ids]`), x's rows sorted by expert, `offsets` the cumulative end rows.

    `qvalue`, `scale`, `zero_point` are the `QExperts` tensors as buffers (state_dict, safetensors,
    `.to(device)`); `bias` (E, out_features) a float parameter or None. As `QLinear`, the state dict
    carries the stack's identity (recipe, logical (E, out, in) shape) as `_extra_state`, checked on load
    before any buffer is overwritten; `.half()` / `.to(dtype)` cast only the bias, never the f32 scales.
    """

    def __init__(self, experts: int, in_features: int, out_features: int, bias: bool = True, recipe: Any = W8A8,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.experts, self.in_features, self.out_features = experts, in_features, out_features
        self.recipe: Recipe = resolve_recipe(recipe)
        fmt = self.recipe.rhs
        shape = fmt.scale_shape((experts, out_features, in_features))
        self.register_buffer("qvalue", torch.zeros(experts, out_features, fmt.stored_k(in_features),
                                                   dtype=DTYPES[fmt.qtype.storage], device=device))
        self.register_buffer("scale", torch.ones(shape, dtype=torch.float32, device=device))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int8, device=device)
                             if fmt.zero_point else None)
        self.bias = nn.Parameter(torch.zeros(experts, out_features, device=device, dtype=dtype)) if bias else None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.experts, self.out_features, self.in_features)

    @property
    def weight(self) -> QExperts:
        return QExperts(qvalue=self.qvalue, scale=self.scale, zero_point=self.zero_point, recipe=self.recipe,
                        shape=self.shape)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, recipe: Any = W8A8, *,
                   method: str = "rtn", name: str = "experts") -> QGroupedLinear:
        """`weight` (E, out_features, in_features) quantized per expert with `recipe` (empty buffers of the
        right shapes when it is on the meta device); `bias` (E, out_features) kept as a float parameter."""
        e, n, k = weight.shape
        q = cls(e, k, n, bias=False, recipe=recipe, device=weight.device)
        if bias is not None:
            q.bias = nn.Parameter(bias.detach(), requires_grad=False) if not isinstance(bias, nn.Parameter) else bias
        if weight.is_meta:
            return q
        w = quantize_experts(weight.detach(), q.recipe, name=name, method=method)
        q.qvalue, q.scale = w.qvalue, w.scale
        if w.zero_point is not None:
            q.zero_point = w.zero_point
        return q

    def _identity(self) -> dict[str, Any]:
        return {"format": _STATE_FORMAT, "recipe": self.recipe.name, "shape": list(self.shape)}

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(list(json.dumps(self._identity(), sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        try:
            meta = json.loads(bytes(torch.as_tensor(state, dtype=torch.uint8).tolist()).decode())
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"the checkpoint's _extra_state for a QGroupedLinear is not qkernels metadata ({e}); "
                             f"it was not saved from a qkernels.QGroupedLinear") from None
        if meta != self._identity():
            raise ValueError(f"checkpoint holds experts with recipe {meta.get('recipe')!r} and (E, out, in) shape "
                             f"{meta.get('shape')}, but this stack is {self.recipe.name!r} {list(self.shape)}; "
                             f"quantize the model with the checkpoint's recipe and shapes before loading it")

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        if prefix + "_extra_state" in state_dict:  # the identity first: torch sets extra state last
            self.set_extra_state(state_dict[prefix + "_extra_state"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QGroupedLinear:
        """Moves every buffer; a dtype cast reaches only the bias (the f32 scales are moved, never cast)."""
        scale = self.scale
        super()._apply(fn, recurse)
        if self.scale.dtype != scale.dtype:
            self.scale = scale.to(self.scale.device)
        return self

    def forward(self, input: torch.Tensor, offsets: torch.Tensor,
                expert_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`input` (M, in_features) sorted by expert, `offsets` int32 (E,) cumulative end rows; `expert_ids`
        (M,), each row's expert, is needed only to add the bias."""
        out = grouped_linear(input, self.weight, offsets)
        if self.bias is not None:
            if expert_ids is None:
                raise ValueError("this QGroupedLinear has a bias: pass expert_ids (each row's expert) to forward")
            out = out + self.bias[expert_ids].to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, recipe={self.recipe.name}")


def projections(module: nn.Module) -> tuple[str, ...]:
    """The names of `module`'s 3-D expert weights, in forward order ((gate_)up, down); () if it has none."""
    params = module._parameters
    names = tuple(n for n in ("gate_up_proj", "up_proj", "down_proj") if isinstance(params.get(n), torch.Tensor)
                  and params[n].dim() == 3)
    return names if "down_proj" in names and len(names) == 2 else ()


def expert_weights(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """`module`'s expert weights by name, each as (weight in F.linear's (E, out, in) layout, bias (E, out) or
    None), from the layout transformers' `use_experts_implementation` records; raises ValueError (saying
    why) for a module that does not hold them in that layout."""
    names = projections(module)
    if not names:
        raise ValueError(f"{type(module).__name__} holds no 3-D (gate_)up_proj / down_proj expert parameters")
    missing = [f for f in _LAYOUT_FLAGS if not isinstance(getattr(module, f, None), bool)]
    if missing:
        raise ValueError(f"{type(module).__name__} holds 3-D expert weights {list(names)} but does not record their "
                         f"layout ({', '.join(missing)}: set by transformers' use_experts_implementation), so which "
                         f"axis is the input cannot be known; decorate the class with it")
    if module.has_gate != (names[0] == "gate_up_proj") or (module.has_gate and not hasattr(module, "_apply_gate")):
        raise ValueError(f"{type(module).__name__} has has_gate={module.has_gate} but weights {list(names)}"
                         f"{'' if hasattr(module, '_apply_gate') else ' and no _apply_gate'}")
    out = {}
    for name in names:
        w = module._parameters[name]
        bias = module._parameters.get(f"{name}_bias") if module.has_bias else None
        if module.has_bias and bias is None:
            raise ValueError(f"{type(module).__name__} has has_bias=True but no {name}_bias parameter")
        out[name] = (w.transpose(1, 2) if module.is_transposed else w, bias)
    return out


class QMoEExperts(nn.Module):
    """A transformers MoE experts module with its expert weights quantized (see the module docstring).

    `forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)` is the float
    module's call. Children: the `QGroupedLinear` of each projection under the float module's name
    (`gate_up_proj` or `up_proj`, and `down_proj`; their biases are theirs), and the float module's own
    submodules (`act_fn`, `post_expert_norm`); `float_class` is the float module's class.
    """

    def __init__(self, source: nn.Module, projections: dict[str, QGroupedLinear]) -> None:
        super().__init__()
        skip = {*projections, *(f"{p}_bias" for p in projections)}
        for key, value in vars(source).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        for key, child in source._modules.items():
            if key not in skip:
                self.add_module(key, child)
        for key, child in projections.items():
            self.add_module(key, child)
        self.projections = tuple(projections)
        self.float_class = type(source)
        self.num_experts = next(iter(projections.values())).experts
        self.train(source.training)

    @classmethod
    def from_float(cls, module: nn.Module, recipe: Any = W8A8, *, method: str = "rtn",
                   recipes: dict[str, Any] | None = None) -> QMoEExperts:
        """`module`'s expert weights quantized with `recipe` (or `recipes[name]` per projection), per expert.
        Raises ValueError for a module `expert_weights` cannot read."""
        return cls(module, {name: QGroupedLinear.from_float(
            w, b, (recipes or {}).get(name, recipe), method=method, name=f"{name} of {type(module).__name__}")
            for name, (w, b) in expert_weights(module).items()})

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.float_class._apply_gate(self, gate_up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        e, (tokens, hidden), top_k = self.num_experts, hidden_states.shape, top_k_index.shape[-1]
        ids, order = torch.sort(top_k_index.reshape(-1), stable=True)  # EP sentinels (>= E) sort to the tail
        rows = hidden_states[order // top_k]
        counts = torch.bincount(ids.clamp(max=e), minlength=e + 1)[:e]
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        experts = ids.clamp(max=e - 1)  # the bias of each row (sentinel rows are zeroed below)
        up, down = (getattr(self, name) for name in self.projections)
        h = up(rows, offsets, experts)
        h = self._apply_gate(h) if self.projections[0] == "gate_up_proj" else self.act_fn(h)
        h = down(h, offsets, experts)
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        h = torch.where((ids < e)[:, None], h * top_k_weights.reshape(-1)[order, None].to(h.dtype), 0)
        out = torch.empty_like(h)
        out[order] = h
        return out.view(tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(hidden_states.dtype)


def swap_experts(model: nn.Module, recipe_of: Callable[[str], Recipe],
                 filter_fn: Callable[[nn.Module, str], bool] | None, *, method: str = "rtn",
                 skip: str | None = None) -> Summary:
    """Replace every module of `model` holding 3-D expert weights (`expert_weights`) by a `QMoEExperts`, in place.

    `recipe_of(fqn of the weight)` gives each projection's recipe; `filter_fn(module, fqn)` (None: all)
    picks the experts modules; `skip` (a reason) skips every one. One `LayerSummary` per expert weight
    (`<module fqn>.<name>`, shape (E, out_features, in_features)), in module order; `.model` is the new
    module when `model` itself was swapped.
    """
    def swap(fqn: str, module: nn.Module) -> tuple[nn.Module | None, list[LayerSummary]]:
        names = projections(module)
        full = [f"{fqn}.{n}" if fqn else n for n in names]
        shapes = [tuple(module._parameters[n].shape) for n in names]
        reason = skip or (None if filter_fn is None or filter_fn(module, fqn) else "filter_fn returned False")
        new = None
        if reason is None:
            try:
                weights = expert_weights(module)
            except ValueError as e:
                reason = str(e)
            else:
                shapes = [tuple(w.shape) for w, _ in weights.values()]
                new = QMoEExperts.from_float(module, method=method, recipes=dict(zip(names, map(recipe_of, full))))
        rows = [LayerSummary(name=f, shape=s, recipe=None if new is None else getattr(new, n).recipe.name,
                             reason=reason) for f, n, s in zip(full, names, shapes)]
        return new, rows

    if projections(model):
        new, rows = swap("", model)
        return Summary(model=model if new is None else new, layers=tuple(rows))
    layers = []
    for fqn, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if projections(child):
                new, rows = swap(f"{fqn}.{name}" if fqn else name, child)
                if new is not None:
                    setattr(module, name, new)
                layers += rows
    return Summary(model=model, layers=tuple(layers))
