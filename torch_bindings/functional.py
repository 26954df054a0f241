"""`linear` (a drop-in for `torch.nn.functional.linear`) and `explain` for a torch call."""

from __future__ import annotations

import math

import torch

from qkernels import calibration, dispatch
from qkernels.formats import W8A8
from torch_bindings.arrays import TORCH_OPS
from torch_bindings.ops import LINEAR, make_problem
from torch_bindings.qtensor import FLOAT_DTYPES, QTensor, quantize

__all__ = ["linear", "explain"]


def _prepare(input: torch.Tensor, weight: torch.Tensor | QTensor,
             bias: torch.Tensor | None) -> tuple[torch.Tensor, QTensor]:
    """Validate a call and return the input folded to (M, K) and the quantized weight."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input has dtype {input.dtype}; qkernels.linear takes float32, bfloat16 or float16 "
                        f"activations (cast with .float())")
    if input.dim() < 1:
        raise ValueError("input is a scalar; qkernels.linear takes (..., in_features)")
    if isinstance(weight, torch.Tensor):
        if weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "weight requires grad, but a float weight is quantized per call and gets no gradient; "
                "quantize it once with qkernels.quantize(weight, recipe) (frozen), or call under torch.no_grad()")
        weight = quantize(weight, W8A8)
    elif not isinstance(weight, QTensor):
        raise TypeError(f"weight must be a float torch.Tensor or a QTensor from qkernels.quantize, "
                        f"got {type(weight).__name__}")
    if weight.requires_grad:
        raise RuntimeError("the quantized weight's tensors require grad, but quantized weights are frozen; "
                           "call .requires_grad_(False) on qvalue/scale/zero_point and train adapters instead")
    if input.shape[-1] != weight.in_features:
        raise ValueError(f"input has in_features={input.shape[-1]} (shape {tuple(input.shape)}) but the weight "
                         f"is {weight.shape} (out_features, in_features); they must match")
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}; move one of them "
                         f"(weight.to({str(input.device)!r}))")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must be a float tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (weight.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({weight.out_features},)")
        if bias.device != input.device:
            raise ValueError(f"bias is on {bias.device} but input is on {input.device}; move it")
    return input.reshape(math.prod(input.shape[:-1]), input.shape[-1]), weight  # explicit rows: K may be 0


def linear(input: torch.Tensor, weight: torch.Tensor | QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`y = input @ W^T + bias` with a quantized W; same semantics as `torch.nn.functional.linear`.

    input: (..., in_features) float32/bfloat16/float16; the output has input's dtype and
    shape (..., out_features). weight: a `QTensor` from `qkernels.quantize(w, recipe)` (fast), or a
    float (out_features, in_features) tensor, which is quantized with W8A8 on EVERY call (correct
    but slow: quantize once and reuse the QTensor). Runs `torch.ops.qkernels.linear`, whose bound
    call (implementation and config, `qkernels.explain(input, weight, bias)`) is made once per
    distinct shape, dtype, recipe and device.
    Gradients flow to input (straight-through the dequantized weight) and bias, never to the weight.
    """
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(input):
        raise NotImplementedError(
            "qkernels.linear does not run under torch.func transforms (grad, vmap, jacrev, ...): its custom op's "
            "autograd formula (torch.library.register_autograd, torch 2.13) has no functorch rule; differentiate "
            "with loss.backward() / torch.autograd.grad instead")
    x, w = _prepare(input, weight, bias)
    if w.smooth is not None:
        # x / s in f32; kept in f32 where the recipe quantizes it (the int8 codes, and so the output after its
        # one cast, are those of the f32 quotient), cast back for float activations (weight-only recipes)
        x = calibration.smooth_activations(x, w.smooth, TORCH_OPS)
        x = x if w.recipe.lhs is not None else x.to(input.dtype)
    y = LINEAR(x, w.qvalue, w.scale, w.zero_point, bias, w.recipe.name, w.input_scale)
    return y.reshape(*input.shape[:-1], w.out_features).to(input.dtype)


def explain(input: torch.Tensor, weight: torch.Tensor | QTensor, bias: torch.Tensor | None = None,
            backend: str | None = None, *, verbose: bool = False) -> dispatch.Explanation:
    """The implementations that could run `linear(input, weight, bias)`, with their verdicts and the
    choice (`verbose=True`: every registered torch implementation, other recipes' too)."""
    x, w = _prepare(input, weight, bias)
    return dispatch.explain(make_problem(x, w.out_features, w.recipe, bias is not None), backend, verbose=verbose)
