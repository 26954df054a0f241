"""`QLinear` (an `nn.Linear` with a frozen quantized weight) and `quantize_` (swap them in place)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qkernels import dispatch
from qkernels.formats import Recipe, W8A8, resolve_recipe
from torch_bindings.arrays import DTYPES, dtype_name
from torch_bindings import functional, ops
from torch_bindings.ops import device_of, platform_of
from torch_bindings.qtensor import QTensor, quantize

__all__ = ["QLinear", "quantize_", "Summary", "LayerSummary", "swap_modules", "candidates", "unsafe_reason", "parameter_owners",
           "record_hf"]

_STATE_FORMAT = "qkernels.QLinear/1"
_F32_BUFFERS = ("scale", "input_scale", "smooth")  # quantization parameters: f32 whatever the model's dtype


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
        # set by qk.calibrate (static recipes) and qk.smoothquant_; None until then, absent from the state dict
        self.register_buffer("input_scale", None)
        self.register_buffer("smooth", None)
        self._runners = ops.Runners()  # prepared calls per activation shape (forward; ops.Runner)

    @property
    def weight(self) -> QTensor:
        return QTensor(qvalue=self.qvalue, scale=self.scale, zero_point=self.zero_point, recipe=self.recipe,
                       shape=(self.out_features, self.in_features), input_scale=self.input_scale, smooth=self.smooth)

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
        # a calibrated / smoothed checkpoint into a layer that is not yet: make the buffers it fills
        shapes = {"input_scale": (), "smooth": (self.in_features,)}
        for name, shape in shapes.items():
            if prefix + name in state_dict and self._buffers[name] is None:
                self._buffers[name] = torch.ones(shape, dtype=torch.float32, device=self.qvalue.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_qtensor(cls, weight: QTensor, bias: nn.Parameter | None = None) -> QLinear:
        """A QLinear holding `weight` (its tensors become the buffers, its input scale and smoothing too)."""
        q = cls(weight.in_features, weight.out_features, bias=False, recipe=weight.recipe, device="meta")
        for name in ("qvalue", "scale", "zero_point", "input_scale", "smooth"):
            q._buffers[name] = getattr(weight, name)
        q.bias = bias
        return q

    @classmethod
    def from_float(cls, linear_module: nn.Linear, recipe: Any = W8A8, *, method: str = "rtn") -> QLinear:
        """A QLinear holding `linear_module`'s weight quantized with `recipe` (data-free `method`, see
        `quantize`), sharing its bias (empty buffers of the right shapes when the weight is on meta)."""
        w = linear_module.weight
        q = cls(linear_module.in_features, linear_module.out_features, bias=False, recipe=recipe, device=w.device)
        q.bias = linear_module.bias
        if w.is_meta:
            return q
        qt = quantize(w.detach(), q.recipe, name=f"weight of {linear_module!r}", method=method)
        q.qvalue, q.scale = qt.qvalue, qt.scale
        if qt.zero_point is not None:
            q.zero_point = qt.zero_point
        return q

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QLinear:
        """`.to(device)` moves every buffer; `.half()`, `.bfloat16()`, `.to(dtype)` change only the bias (and
        so, as for `nn.Linear`, the activation dtype the layer is called with): the codes are integers and
        stay so, and the f32 scales are moved, never cast (a cast would change what the codes mean)."""
        keep = {name: t for name in _F32_BUFFERS if (t := self._buffers.get(name)) is not None}
        super()._apply(fn, recurse)
        for name, t in keep.items():
            moved = self._buffers[name]
            if moved.dtype != t.dtype:  # fn cast it: move the original instead
                self._buffers[name] = t.to(moved.device)
        return self

    parallel: Any = None
    """The layer's tensor-parallel split (`torch_bindings.distributed.TensorParallel`), set by
    `qk.ColwiseParallel` / `qk.RowwiseParallel`; None for a layer on one device (FSDP2 included)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """`qkernels.linear(input, self.weight, self.bias)`, without building the QTensor view per call: the
        buffers are the weight's tensors (checked when they were made or loaded; the op checks them once
        per distinct call shape). A plain eager call (`functional._direct`) of an activation shape seen
        before runs the bound implementation's prepared call (`ops.Runner`: the checks were made when it
        was prepared, and it is dropped when a buffer changes); every other call takes the full path."""
        if self.parallel is not None:  # buffers are DTensors: the split's own forward on the local shards
            return self.parallel.forward(self, input)
        buffers, params = self._buffers, self._parameters  # not nn.Module.__getattr__ (~0.6 us a name): per call
        qvalue, scale, zero_point = buffers["qvalue"], buffers["scale"], buffers["zero_point"]
        bias = params["bias"] if "bias" in params else self.bias
        tensors = (qvalue, scale, zero_point, bias)
        runners = self.__dict__.get("_runners")
        if runners is None:  # a module unpickled from before runners existed
            runners = self._runners = ops.Runners()
        functional.check_transforms(input)
        key = (input.shape, input.dtype, input.device, self.recipe.name)
        runner = runners.get(key)
        direct = input.is_contiguous() and functional._direct(input, bias)
        ready = bool(runner) and direct and runner.usable(tensors)
        if ready:  # the common eager call: no re-validation, fixed operands
            y = runner.run(input)
            if y is not None:
                return y
        functional.check_call(input, self.in_features, self.out_features, qvalue.device, bias)
        y = functional.run(input, functional.rows(input), qvalue, scale, zero_point, bias,
                           self.recipe, self.input_scale, self.smooth, self.out_features)
        if direct and not ready and self.smooth is None and self.input_scale is None:
            runners.store(key, ops.Runner.make(input, qvalue, scale, zero_point, bias, self.recipe.name), tensors)
        return y

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


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerSummary:
    """One linear layer `quantize_` (or `prepare_qat`, `convert`, `add_lora`) looked at.

    `name`: its fully qualified name; `shape`: (out_features, in_features), or (experts, out_features,
    in_features) for a stack of expert weights (`<experts module>.gate_up_proj`); `recipe`: the recipe
    name it now runs, None when skipped; `reason`: why it was skipped, None when swapped."""

    name: str
    shape: tuple[int, ...]
    recipe: str | None
    reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Summary:
    """What a model-level swap did: one `LayerSummary` per candidate layer, in module order.

    `model` is the model (swapped in place), or the new layer when the model itself was swapped."""

    model: nn.Module
    layers: tuple[LayerSummary, ...]

    @property
    def swapped(self) -> tuple[LayerSummary, ...]:
        return tuple(row for row in self.layers if row.reason is None)

    @property
    def skipped(self) -> tuple[LayerSummary, ...]:
        return tuple(row for row in self.layers if row.reason is not None)

    def __iter__(self) -> Iterator[LayerSummary]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        rows = [f"{r.name or '<model>'}  {'x'.join(map(str, r.shape))}  {r.recipe or 'skipped: ' + str(r.reason)}"
                for r in self.layers]
        return "\n".join([f"{len(self.swapped)} of {len(self.layers)} layers swapped", *rows])


def unsafe_reason(parent: nn.Module | None, child: nn.Module, owners: dict[int, list[str]]) -> str | None:
    """Why swapping `child` (a child of `parent`) for another module would break the model, or None.
    `owners`: the model's parameter names by `id` of the tensor (`parameter_owners`).

    - a child of `nn.MultiheadAttention` (its `out_proj`): the attention passes `out_proj.weight` to
      `F.multi_head_attention_forward` as a float tensor instead of calling the layer;
    - a weight shared with another module (tied embeddings / lm_head): that module reads the float
      tensor, and swapping would untie the two.
    """
    if isinstance(parent, nn.MultiheadAttention):
        return ("nn.MultiheadAttention reads out_proj.weight directly (F.multi_head_attention_forward), "
                "so a swapped out_proj would break its forward")
    weight = getattr(child, "weight", None)
    sharers = owners.get(id(weight), []) if isinstance(weight, torch.Tensor) else []
    if len(sharers) > 1:
        return f"its weight is shared (tied) with {', '.join(sharers)}, which would be untied"
    return None


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """Every name each parameter of `model` has (a tied parameter has several), by the tensor's `id`."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def candidates(model: nn.Module, match: Callable[[nn.Module], bool], filter_fn: Callable[[nn.Module, str], bool] | None,
               check_unsafe: bool = True) -> list[tuple[nn.Module | None, str, nn.Module, str | None]]:
    """Every module of `model` for which `match(module)`, as (parent, fqn, module, reason it stays or None), in
    module order: what `swap_modules` with the same arguments replaces (reason None) and skips, before any
    replacement (a data-aware method calibrates exactly the layers it will swap)."""
    owners = parameter_owners(model) if check_unsafe and filter_fn is None else {}

    def decide(parent: nn.Module | None, fqn: str, child: nn.Module) -> str | None:
        if filter_fn is not None:
            return None if filter_fn(child, fqn) else "filter_fn returned False"
        return unsafe_reason(parent, child, owners) if check_unsafe else None

    if match(model):
        return [(None, "", model, decide(None, "", model))]
    found = []
    for fqn, module in model.named_modules():
        for name, child in module.named_children():
            if match(child):
                child_fqn = f"{fqn}.{name}" if fqn else name
                found.append((module, child_fqn, child, decide(module, child_fqn, child)))
    return found


def swap_modules(model: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[nn.Module, str], nn.Module],
                 recipe_of: Callable[[nn.Module], str | None], filter_fn: Callable[[nn.Module, str], bool] | None,
                 check_unsafe: bool = True, skip: Callable[[nn.Module, str], str | None] | None = None) -> Summary:
    """Replace every module of `model` for which `match(module)` by `make(module, fqn)`, in place, and summarize.

    With `filter_fn=None` the layers `unsafe_reason` names are skipped (when `check_unsafe`); a
    `filter_fn(module, fqn)` decides alone (it can force an unsafe swap, or skip a safe one). `skip(module,
    fqn)` gives the caller's own reasons to skip, checked first.
    """
    rows, result = [], model
    for parent, fqn, child, reason in candidates(model, match, filter_fn, check_unsafe):
        if skip is not None and (own := skip(child, fqn)) is not None:
            reason = own
        new = make(child, fqn) if reason is None else None
        if new is not None:
            if parent is None:  # the model itself matched: the new module is the result
                result = new
            else:
                setattr(parent, fqn.rpartition(".")[2], new)
        rows.append(LayerSummary(name=fqn, shape=(child.out_features, child.in_features),
                                 recipe=None if new is None else recipe_of(new), reason=reason))
    return Summary(model=result, layers=tuple(rows))


def quantize_(model: nn.Module, recipe: Any = W8A8,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, *, method: str = "rtn",
              calibration: Iterable[Any] | None = None, act_order: bool = False, sequential: bool | None = None,
              asymmetric: bool | None = None, progress: bool = True) -> Summary:
    """Replace the `nn.Linear` layers of `model` by QLinear, in place; returns a `Summary`
    (name, shape, recipe or reason skipped of every `nn.Linear`; `.model` is the model, or the new
    QLinear when `model` itself is an `nn.Linear`).

    By default the layers a swap would break are skipped (`unsafe_reason`: `nn.MultiheadAttention`'s
    `out_proj`, tied weights); `filter_fn(module, fqn) -> bool` replaces that rule.
    `method` chooses the codes: "rtn" (round to nearest) and "mse" (per-block clip search) are
    data-free ("mse-wide", "mse-refit", "hqq" too: `qkernels.quality.METHODS`), and so is "gptq-synthetic"
    (GPTQ calibrated on random token ids from the model's own vocabulary, `torch_bindings.synthetic`);
    "gptq" (`act_order` optional; "gptq-mse" clip-searches its group scales; "gptq-ao", "gptq-ao-mse" in
    act-order) and "awq" need `calibration`, an iterable of model inputs (`torch_bindings.ptq`; a progress
    bar per layer): by default (`sequential=None`) a model made of a chain of blocks (a transformer's
    `nn.ModuleList` of layers) is calibrated block by block, each layer from its inputs through the layers
    already quantized, as the reference GPTQ does; `sequential=False` takes every layer's statistics from one
    pass of the float model, `sequential=True` refuses a model it cannot replay. Calibrated block by block,
    GPTQ quantizes each layer toward the float model's outputs, not its own on the quantized inputs
    (`asymmetric=None`: where it applies; `False`: the reference GPTQ's target; see `torch_bindings.ptq`).
    Mixture-of-experts modules holding 3-D expert weights (transformers 5.x `...Experts`) become
    `torch_bindings.experts.QMoEExperts` running `qk.grouped_linear` (one Summary row per expert weight;
    `filter_fn` sees the experts module; GPTQ / AWQ leave them float, saying so).
    """
    from torch_bindings.ptq import METHODS as CALIBRATED
    from torch_bindings.synthetic import SYNTHETIC, calibration_for

    recipe = resolve_recipe(recipe)
    if method in SYNTHETIC:
        method, calibration = calibration_for(model, method, calibration)
        # one pass of the float model: replayed block by block toward the float outputs, random ids fitted
        # SmolLM2-135M's layers to nonsense (w4a16-g128-zp perplexity +46.5% over fp32, one pass +22.5%)
        sequential = False if sequential is None else sequential
    if method in CALIBRATED:
        if calibration is None:
            raise ValueError(f"method={method!r} needs calibration batches: qk.quantize_(model, recipe, "
                             f"calibration=[inputs, ...], method={method!r})")
        from torch_bindings.ptq import quantize_calibrated

        summary = quantize_calibrated(model, recipe, calibration, method, filter_fn, act_order=act_order,
                                      sequential=sequential, asymmetric=asymmetric, progress=progress)
        summary = _with_experts(summary, recipe, filter_fn, method,
                                skip=f"method={method!r} calibrates nn.Linear layers only; quantize experts with "
                                     f"method='rtn' or 'mse'")
        record_hf(summary.model)
        return summary
    for option, value in (("sequential", sequential), ("asymmetric", asymmetric)):
        if value is not None:
            raise ValueError(f"{option}={value!r} is an option of the calibrated methods {CALIBRATED}, not "
                             f"method={method!r}")
    if calibration is not None:
        raise ValueError(f"calibration batches are used by method='gptq', 'gptq-mse' or 'awq' (one of {CALIBRATED}), "
                         f"not {method!r}; for static activation scales use qk.calibrate(model, batches)")
    summary = swap_modules(model, lambda m: isinstance(m, nn.Linear),
                           lambda m, _: QLinear.from_float(m, recipe, method=method), lambda m: m.recipe.name, filter_fn)
    summary = _with_experts(summary, recipe, filter_fn, method)
    record_hf(summary.model)
    return summary


def _with_experts(summary: Summary, recipe: Recipe, filter_fn: Callable[[nn.Module, str], bool] | None, method: str,
                  skip: str | None = None) -> Summary:
    """`summary` with the model's expert weights quantized too (`torch_bindings.experts.swap_experts`), rows
    in module order."""
    from torch_bindings.experts import swap_experts

    experts = swap_experts(summary.model, lambda _: recipe, filter_fn, method=method, skip=skip)
    if not experts.layers:
        return summary
    order = {name: i for i, (name, _) in enumerate(experts.model.named_modules())}
    rank = lambda row: order.get(row.name, order.get(row.name.rpartition(".")[0], len(order)))  # noqa: E731
    return Summary(model=experts.model, layers=tuple(sorted(summary.layers + experts.layers, key=rank)))


def record_hf(model: nn.Module) -> None:
    """For a transformers PreTrainedModel: record its QLinear layers so save_pretrained / from_pretrained keep
    them (`torch_bindings.hf`); nothing for other models (transformers is not imported for them)."""
    if any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        from torch_bindings import hf

        hf.record(model)
