"""`torch.library` custom ops `qkernels::<family>_linear`, one per kernel family.

Each op takes plain tensors plus the recipe name (a static string), has a CPU kernel, a CUDA
kernel and a fake (meta) implementation, and an autograd formula (straight-through the dequantized
weight). The kernels build a `qkernels.dispatch.Problem` and run whatever `dispatch.select` picks,
so dispatch stays opaque to `torch.compile` (no graph break) and `use_backend` /
`$QKERNELS_BACKEND` still apply at run time. Implementations with framework 'any' (the NumPy
reference) get NumPy arrays (bf16 through a uint16 view + `ml_dtypes.bfloat16`).

Op signature: `(x (M, K), qvalue (N, K_stored) int8, scale f32, zero_point int8?, bias (N,)?,
recipe: str) -> (M, N)` in x's dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_dtypes
import numpy as np
import torch

from qkernels import dispatch, tuning
from qkernels.dispatch import Problem
from qkernels.formats import QOperand, Recipe, parse_recipe
from torch_bindings.qtensor import dequantize_operand

__all__ = ["OPS", "platform_of", "device_of", "make_problem", "dtype_name"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def platform_of(device: torch.device) -> str:
    """Dispatch platform string: 'cpu', 'cuda:sm_90', 'rocm:gfx942'."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if torch.version.hip:
            return "rocm:" + torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:sm_{major}{minor}"
    raise ValueError(f"device {device} is not supported; qkernels runs on cpu and cuda (NVIDIA/ROCm) tensors")


@functools.lru_cache(maxsize=64)
def device_of(device: torch.device) -> str:
    """Device kind of a tensor's device, the key of its tuned-config tables ('h100', 'cpu')."""
    if device.type == "cuda":
        return tuning.device_kind(torch.cuda.get_device_name(device))
    return device.type


def make_problem(x: torch.Tensor, n: int, recipe: Recipe, has_bias: bool) -> Problem:
    """The canonical problem of `x (M, K)` against an (N, K) weight (leading axes already folded)."""
    return Problem(recipe=recipe, m=x.shape[0], n=n, k=x.shape[-1], act_dtype=dtype_name(x.dtype),
                   out_dtype=dtype_name(x.dtype), has_bias=has_bias, framework="torch",
                   platform=platform_of(x.device), device=device_of(x.device))


def _to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _from_numpy(a: np.ndarray, device: torch.device) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(a).to(device)


def _check(family: str, x: torch.Tensor, qvalue: torch.Tensor, bias: torch.Tensor | None, recipe: str) -> Recipe:
    r = parse_recipe(recipe)
    if r.tag != family:
        raise ValueError(f"qkernels::{family}_linear got recipe {recipe!r}; use qkernels::{r.tag}_linear")
    if x.dim() != 2:
        raise ValueError(f"qkernels::{family}_linear takes a 2-D (M, K) input, got shape {tuple(x.shape)}")
    stored = r.rhs.stored_k(x.shape[1])
    if qvalue.dim() != 2 or qvalue.shape[1] != stored:
        raise ValueError(f"qvalue has shape {tuple(qvalue.shape)} but an input with K={x.shape[1]} in {r.name} "
                         f"needs (N, {stored}); the weight's in_features does not match the input")
    if bias is not None and tuple(bias.shape) != (qvalue.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({qvalue.shape[0]},)")
    return r


def _forward(family: str, x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor,
             zero_point: torch.Tensor | None, bias: torch.Tensor | None, recipe: str) -> torch.Tensor:
    r = _check(family, x, qvalue, bias, recipe)
    problem = make_problem(x, qvalue.shape[0], r, bias is not None)
    impl = dispatch.select(problem)
    rhs = QOperand(qvalue, scale, zero_point)
    if impl.framework == dispatch.ANY_FRAMEWORK:
        out = impl.run(problem, _to_numpy(x), QOperand(*map(_to_numpy, rhs)), _to_numpy(bias))
        return _from_numpy(out, x.device)
    return impl.run(problem, x, rhs, bias).contiguous()


def _fake(family: str, x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor,
          zero_point: torch.Tensor | None, bias: torch.Tensor | None, recipe: str) -> torch.Tensor:
    _check(family, x, qvalue, bias, recipe)
    return x.new_empty((x.shape[0], qvalue.shape[0]))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, qvalue, scale, zero_point, bias, recipe = inputs
    ctx.save_for_backward(qvalue, scale, zero_point)
    ctx.recipe, ctx.k, ctx.x_dtype = recipe, x.shape[1], x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Straight-through: d(input) = grad @ dequantize(W) in f32; the weight itself gets no grad."""
    qvalue, scale, zero_point = ctx.saved_tensors
    recipe = parse_recipe(ctx.recipe)
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        if recipe.quantized_backward:
            raise NotImplementedError(
                f"recipe {recipe.name} asks for a quantized backward pass, which the PyTorch binding does not "
                f"implement; use {recipe.name.removesuffix('-qbwd')} (float backward against the dequantized weight)")
        w = dequantize_operand(QOperand(qvalue, scale, zero_point), recipe.rhs, ctx.k)
        grad_x = (grad.to(torch.float32) @ w).to(ctx.x_dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.to(torch.float32).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None


def _define(family: str) -> Any:
    def kernel(x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               bias: torch.Tensor | None, recipe: str) -> torch.Tensor:
        return _forward(family, x, qvalue, scale, zero_point, bias, recipe)

    def fake(x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
             bias: torch.Tensor | None, recipe: str) -> torch.Tensor:
        return _fake(family, x, qvalue, scale, zero_point, bias, recipe)

    op = torch.library.custom_op(f"qkernels::{family}_linear", kernel, mutates_args=(), device_types="cpu")
    # The CUDA kernel runs the same dispatch: on a GPU it selects the Triton implementation.
    op.register_kernel("cuda")(kernel)
    op.register_fake(fake)
    op.register_autograd(_backward, setup_context=_setup_context)
    return op


OPS: dict[str, Any] = {family: _define(family) for family in ("w8a8", "w8a16", "w4a16", "w4a8")}
"""Custom op per recipe tag; `torch.ops.qkernels.<tag>_linear` is the same op."""
