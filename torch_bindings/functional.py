"""`linear` (a drop-in for `torch.nn.functional.linear`) and `explain` for a torch call."""

from __future__ import annotations

import math

import torch

from qkernels import calibration, dispatch
from qkernels.formats import W8A8, Recipe
from torch_bindings.arrays import TORCH_OPS
from torch_bindings import ops
from torch_bindings.ops import LINEAR, make_problem
from torch_bindings.qtensor import FLOAT_DTYPES, QTensor, quantize

__all__ = ["linear", "explain", "run", "check_call", "check_transforms", "rows"]


def check_call(input: torch.Tensor, in_features: int, out_features: int, device: torch.device,
               bias: torch.Tensor | None) -> None:
    """The checks of one call against a weight of (out_features, in_features) on `device`: a few attribute
    reads, no tensor op (the operands' storage was checked when the weight was made, and the op checks
    hand-made operands once per distinct call)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input has dtype {input.dtype}; qkernels.linear takes float32, bfloat16 or float16 "
                        f"activations (cast with .float())")
    if input.dim() < 1:
        raise ValueError("input is a scalar; qkernels.linear takes (..., in_features)")
    if input.shape[-1] != in_features:
        raise ValueError(f"input has in_features={input.shape[-1]} (shape {tuple(input.shape)}) but the weight "
                         f"is ({out_features}, {in_features}) (out_features, in_features); they must match")
    if device != input.device:
        raise ValueError(f"weight is on {device} but input is on {input.device}; move one of them "
                         f"(weight.to({str(input.device)!r}))")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must be a float tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({out_features},)")
        if bias.device != input.device:
            raise ValueError(f"bias is on {bias.device} but input is on {input.device}; move it")


def _weight(weight: torch.Tensor | QTensor) -> QTensor:
    if isinstance(weight, torch.Tensor):
        if weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "weight requires grad, but a float weight is quantized per call and gets no gradient; "
                "quantize it once with qkernels.quantize(weight, recipe) (frozen), or call under torch.no_grad()")
        return quantize(weight, W8A8)
    if not isinstance(weight, QTensor):
        raise TypeError(f"weight must be a float torch.Tensor or a QTensor from qkernels.quantize, "
                        f"got {type(weight).__name__}")
    if weight.requires_grad:
        raise RuntimeError("the quantized weight's tensors require grad, but quantized weights are frozen; "
                           "call .requires_grad_(False) on qvalue/scale/zero_point and train adapters instead")
    return weight


def rows(input: torch.Tensor) -> torch.Tensor:
    """`input` (..., K) as (M, K)."""
    return input.reshape(math.prod(input.shape[:-1]), input.shape[-1])  # explicit rows: K may be 0


def _prepare(input: torch.Tensor, weight: torch.Tensor | QTensor,
             bias: torch.Tensor | None) -> tuple[torch.Tensor, QTensor]:
    """Validate a call and return the input folded to (M, K) and the quantized weight."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    w = _weight(weight)
    check_call(input, w.in_features, w.out_features, w.device, bias)
    return rows(input), w


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a Parameter is a plain tensor to dispatch (no torch_function)


def _direct(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a call may run the op's kernel itself instead of going through `torch.ops.qkernels.linear`.

    The op's dispatcher round trip (a `torch.library.custom_op`: ~6 us per call in torch 2.13, more than
    the whole 64x64 matmul) buys nothing for a plain eager call: it matters to torch.compile / export
    (which must see the op), autograd (the op's formula), tensor subclasses and dispatch or function
    modes (DTensor, FakeTensor, ...), the profiler and jit tracing (which should see it by name). So the
    kernel runs directly only where none of those is in play; the result is the same computation.
    """
    return (type(x) in _PLAIN and (bias is None or type(bias) in _PLAIN)
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
            and not torch._C._len_torch_dispatch_stack() and not torch._C._is_torch_function_mode_enabled()
            and not torch.autograd._profiler_enabled() and torch._C._get_tracing_state() is None)


def run(input: torch.Tensor, x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor,
        zero_point: torch.Tensor | None, bias: torch.Tensor | None, recipe: Recipe, input_scale: torch.Tensor | None,
        smooth: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """The checked call's matmul: `x` is `input` folded to (M, K); returns (..., out_features) in input's dtype."""
    if smooth is not None:
        # x / s in f32; kept in f32 where the recipe quantizes it (the int8 codes, and so the output after its
        # one cast, are those of the f32 quotient), cast back for float activations (weight-only recipes)
        x = calibration.smooth_activations(x, smooth, TORCH_OPS)
        x = x if recipe.lhs is not None else x.to(input.dtype)
    op = ops.kernel if _direct(x, bias) else LINEAR
    y = op(x, qvalue, scale, zero_point, bias, recipe.name, input_scale).reshape(*input.shape[:-1], out_features)
    return y if y.dtype == input.dtype else y.to(input.dtype)


def linear(input: torch.Tensor, weight: torch.Tensor | QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`y = input @ W^T + bias` with a quantized W; same semantics as `torch.nn.functional.linear`.

    input: (..., in_features) float32/bfloat16/float16; the output has input's dtype and
    shape (..., out_features). weight: a `QTensor` from `qkernels.quantize(w, recipe)` (fast), or a
    float (out_features, in_features) tensor, which is quantized with W8A8 on EVERY call (correct
    but slow: quantize once and reuse the QTensor). Runs `torch.ops.qkernels.linear`, whose bound
    call (implementation and config, `qkernels.explain(input, weight, bias)`) is made once per
    distinct shape, dtype, recipe and device (a plain eager call without autograd runs the op's
    kernel directly: `_direct`).
    Gradients flow to input (straight-through the dequantized weight) and bias, never to the weight.
    """
    check_transforms(input)
    x, w = _prepare(input, weight, bias)
    return run(input, x, w.qvalue, w.scale, w.zero_point, bias, w.recipe, w.input_scale, w.smooth, w.out_features)


def check_transforms(input: torch.Tensor) -> None:
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(input):
        raise NotImplementedError(
            "qkernels.linear does not run under torch.func transforms (grad, vmap, jacrev, ...): its custom op's "
            "autograd formula (torch.library.register_autograd, torch 2.13) has no functorch rule; differentiate "
            "with loss.backward() / torch.autograd.grad instead")


def explain(input: torch.Tensor, weight: torch.Tensor | QTensor, bias: torch.Tensor | None = None,
            backend: str | None = None, *, verbose: bool = False) -> dispatch.Explanation:
    """The implementations that could run `linear(input, weight, bias)`, with their verdicts and the
    choice (`verbose=True`: every registered torch implementation, other recipes' too)."""
    x, w = _prepare(input, weight, bias)
    return dispatch.explain(make_problem(x, w.out_features, w.recipe, bias is not None), backend, verbose=verbose)
