"""Low-rank adapters on frozen quantized layers (QLoRA-style): `add_lora`, `lora_state_dict`, `load_lora`.

`LoRALinear` wraps a `QLinear`: `y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / rank`, A (rank, in)
initialized as `nn.Linear` (Kaiming uniform), B (out, rank) zero, so a fresh adapter changes nothing. The
base's codes and scales are buffers (never trained) and its bias is frozen; gradients reach A, B and the
input (straight-through the dequantized base weight, `torch.ops.qkernels.linear`'s autograd formula).
Plain torch ops plus the custom op: it runs under `torch.compile(fullgraph=True)`, forward and backward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torch_bindings.modules import QLinear, swap_modules
from torch_bindings.qtensor import QTensor

__all__ = ["LoRALinear", "add_lora", "lora_state_dict", "load_lora"]

_STATE_FORMAT = "qkernels.LoRALinear/1"
_ADAPTER_KEYS = ("lora_A", "lora_B", "_extra_state")


class LoRALinear(nn.Module):
    """A frozen `QLinear` (`base`) plus a trainable low-rank update (`lora_A`, `lora_B`).

    The adapter's rank and alpha travel in its `_extra_state` (JSON as uint8, like QLinear's), so
    `load_lora` refuses adapters of another rank or alpha naming both.
    """

    def __init__(self, base: QLinear, rank: int, alpha: float = 8.0, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, QLinear):
            raise TypeError(f"LoRALinear wraps a qkernels.QLinear, got {type(base).__name__}; qk.quantize_ the model "
                            f"first (for float layers use peft or a plain adapter)")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r} must be a positive integer, e.g. rank=8")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        device = base.qvalue.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        if not self.lora_A.is_meta:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def recipe(self) -> Any:
        return self.base.recipe

    @property
    def weight(self) -> QTensor:
        return self.base.weight

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = self.base(input)
        a = self.dropout(input).to(self.lora_A.dtype)
        update = nn.functional.linear(nn.functional.linear(a, self.lora_A), self.lora_B) * self.scaling
        return y + update.to(y.dtype)

    def _meta(self) -> dict[str, Any]:
        return {"format": _STATE_FORMAT, "rank": self.rank, "alpha": self.alpha}

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(list(json.dumps(self._meta(), sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        try:
            meta = json.loads(bytes(torch.as_tensor(state, dtype=torch.uint8).tolist()).decode())
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"the checkpoint's _extra_state for a LoRALinear is not qkernels metadata ({e})") from None
        if meta != self._meta():
            raise ValueError(f"checkpoint holds an adapter with rank {meta.get('rank')} and alpha {meta.get('alpha')}, "
                             f"but this layer's is rank {self.rank} alpha {self.alpha}; call qk.add_lora with the "
                             f"checkpoint's rank and alpha before loading it")

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "_extra_state"
        if key in state_dict:  # checked before A and B are overwritten
            self.set_extra_state(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def add_lora(model: nn.Module, rank: int, alpha: float = 8.0, dropout: float = 0.0,
             filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Wrap the `QLinear` layers of `model` (those `filter_fn(module, fqn)` accepts) in `LoRALinear`, in
    place, and freeze every other parameter of the model (as peft does: only adapters train); returns the
    model (or the new layer when `model` is a QLinear). Defaults follow peft's LoraConfig (alpha 8, no dropout)."""
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    summary = swap_modules(model, lambda m: isinstance(m, QLinear) and id(m) not in wrapped, lambda m, _: LoRALinear(m, rank, alpha, dropout),
                           lambda m: m.recipe.name, filter_fn, check_unsafe=False)
    if not summary.swapped:
        raise ValueError("add_lora found no QLinear layer to adapt (filter_fn accepted none, every one already has "
                         "an adapter, or the model is not quantized); call qk.quantize_(model, recipe) first")
    adapters = {id(p) for m in summary.model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)}
    for p in summary.model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    return summary.model


def _adapter_keys(model: nn.Module) -> list[str]:
    return [f"{fqn}.{key}" if fqn else key for fqn, m in model.named_modules() if isinstance(m, LoRALinear)
            for key in _ADAPTER_KEYS]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters only (A, B and each adapter's rank/alpha record): tensors, for torch.save or safetensors."""
    state = model.state_dict()
    return {key: state[key] for key in _adapter_keys(model)}


def load_lora(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapters saved by `lora_state_dict` into a model with the same adapters (`add_lora` with the same
    rank and alpha on the same layers); the quantized base is not touched."""
    want = _adapter_keys(model)
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError(f"adapter state does not match the model's adapters: missing {missing}, unexpected "
                         f"{unexpected}; add_lora the same layers (filter_fn) before load_lora")
    model.load_state_dict(state, strict=False)
