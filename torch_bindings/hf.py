"""Hugging Face transformers integration: quantized models round-trip through `save_pretrained` /
`from_pretrained` (safetensors), with each layer's recipe in `config.json` and in the safetensors metadata.

`qk.quantize_` on a `transformers.PreTrainedModel` records the quantized layers as the model's
`quantization_config` (`quant_method: "qkernels"`, `layers: {fqn: recipe name}`) and attaches a
`QkernelsHfQuantizer`. `save_pretrained` writes that config and the QLinear buffers (codes, scales, their
`_extra_state` identity records); `from_pretrained` finds `quant_method: "qkernels"` (registered here with
transformers' `register_quantization_config` / `register_quantizer`), swaps the named layers for empty
QLinear on the meta device before any weight is read, and loads the stored buffers into them. Quantized
expert weights (`torch_bindings.experts`) are recorded the same way, as `<experts module>.gate_up_proj` /
`.down_proj`, and their experts modules become empty `QMoEExperts` before loading. Without
this, transformers skips an unknown quantization method and rebuilds plain `nn.Linear` layers with random
weights behind a warning. A saved quantized model always loads its quantized layers, or fails: a
checkpoint whose tensors do not match the recorded layers raises (missing QLinear buffers are an error).

Imported by `torch_bindings` only when transformers is installed (`import transformers` is slow, so only
once it is already imported, or on first use of a PreTrainedModel).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qkernels.formats import recipe_named
from torch_bindings.experts import QGroupedLinear, projections, swap_experts
from torch_bindings.modules import QLinear, swap_modules

__all__ = ["QUANT_METHOD", "QkernelsConfig", "QkernelsHfQuantizer", "record"]

QUANT_METHOD = "qkernels"
METADATA_KEY = "qkernels.layers"


@register_quantization_config(QUANT_METHOD)
@dataclass
class QkernelsConfig(QuantizationConfigMixin):
    """`quantization_config` of a qkernels-quantized model: the recipe name of each QLinear, by fqn."""

    layers: dict[str, str] = field(default_factory=dict)
    smoothed: list[str] = field(default_factory=list)  # layers with SmoothQuant factors (QLinear.smooth)
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        for fqn, name in self.layers.items():
            recipe_named(name)  # an unknown recipe fails here, naming it, not later in a forward

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "layers": dict(self.layers), "smoothed": sorted(self.smoothed)}


@register_quantizer(QUANT_METHOD)
class QkernelsHfQuantizer(HfQuantizer):
    """Loads pre-quantized qkernels checkpoints (quantize with `qk.quantize_`, not through from_pretrained)."""

    requires_calibration = True  # only pre-quantized checkpoints: from_pretrained does not quantize
    quantization_config: QkernelsConfig

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        layers = self.quantization_config.layers
        found = swap_modules(model, lambda m: isinstance(m, nn.Linear),
                             lambda m, fqn: QLinear.from_float(m, recipe_named(layers[fqn])),
                             lambda m: m.recipe.name, lambda m, fqn: fqn in layers)
        smoothed = set(self.quantization_config.smoothed)
        for fqn, m in model.named_modules():  # the buffers a calibrated / smoothed checkpoint fills
            if isinstance(m, QLinear) and fqn in layers:
                if m.recipe.static:
                    m.input_scale = torch.empty((), dtype=torch.float32, device=m.qvalue.device)
                if fqn in smoothed:
                    m.smooth = torch.empty(m.in_features, dtype=torch.float32, device=m.qvalue.device)
        experts = swap_experts(model, lambda fqn: recipe_named(layers[fqn]),
                               lambda m, fqn: all(f"{fqn}.{name}" in layers for name in projections(m)))
        missing = sorted(set(layers) - {row.name for row in found.swapped + experts.swapped})
        if missing:
            raise ValueError(f"the checkpoint's quantization_config names quantized layers {missing} that this "
                             f"{type(model).__name__} does not have as nn.Linear or expert weights; load it with the "
                             f"model class it was saved from")

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        return False  # stored codes and scales are loaded as they are

    def get_state_dict_and_metadata(self, model: PreTrainedModel) -> tuple[None, dict[str, str]]:
        uncalibrated = [fqn for fqn, m in model.named_modules()
                        if isinstance(m, QLinear) and m.recipe.static and m.input_scale is None]
        if uncalibrated:
            raise ValueError(f"layers {uncalibrated} use a static recipe but have no input_scale; qk.calibrate the "
                             f"model before save_pretrained")
        record(model)  # layers quantized, smoothed or calibrated since quantize_
        return None, {METADATA_KEY: json.dumps(layer_recipes(model), sort_keys=True)}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (qk.add_lora) train on the frozen quantized base


def layer_recipes(model: nn.Module) -> dict[str, str]:
    """{fqn: recipe name} of every QLinear and quantized expert stack (`QGroupedLinear`) in `model`."""
    return {name: m.recipe.name for name, m in model.named_modules() if isinstance(m, (QLinear, QGroupedLinear))}


def record(model: nn.Module) -> None:
    """Make a quantized PreTrainedModel save (and so load) as a qkernels checkpoint."""
    if not isinstance(model, PreTrainedModel):
        return
    config = QkernelsConfig(layers=layer_recipes(model), smoothed=[
        fqn for fqn, m in model.named_modules() if isinstance(m, QLinear) and m.smooth is not None])
    model.config.quantization_config = config
    if any(isinstance(m, QGroupedLinear) for m in model.modules()):
        model._weight_conversions = _without_converters(model)
    model.hf_quantizer = QkernelsHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def _without_converters(model: PreTrainedModel) -> list[Any]:
    """The weight transforms `save_pretrained` reverts for `model`, less its `WeightConverter`s: those merge
    per-expert checkpoint tensors into 3-D parameters (`experts.gate_up_proj`) and, reverted on save, would try
    to split the quantized stacks (`experts.gate_up_proj.qvalue`) as float weights. The quantized experts are
    saved under the model's own names, which `from_pretrained` loads without conversion."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter

    transforms = getattr(model, "_weight_conversions", None)
    if transforms is None:  # as `revert_weight_conversion` builds them for a model not from from_pretrained
        transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False)
                      if not isinstance(t, PrefixChange)]
    return [t for t in transforms if not isinstance(t, WeightConverter)]
