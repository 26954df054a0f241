"""The `torch.library` custom op `qkernels::linear`: one op for every recipe, and the bound calls it runs.

`torch.ops.qkernels.linear(x (M, K), qvalue (N, K_stored), scale f32, zero_point?, bias (N,)?,
recipe: str, input_scale f32 ()?) -> (M, N)` in x's dtype. `input_scale` is a static recipe's calibrated
activation scale: the op quantizes x with it (`Recipe.quantize_lhs`) and dispatches the codes
(`lhs_quantized`), so every backend's per-token kernel serves static recipes unchanged. It has a CPU kernel, a CUDA kernel (the same dispatch, which
selects Triton there), a fake (meta) implementation and an autograd formula (straight-through the
dequantized weight), so `torch.compile(fullgraph=True)` sees one opaque op and `use_backend` /
`$QKERNELS_BACKEND` still apply at run time.

The recipe crosses the op boundary as its name (custom ops take strings, not objects) and comes back
by a dictionary lookup (`formats.recipe_named`), never parsed per call. Everything else about a call
is decided once per (shapes, dtypes, recipe, device, backend) by `bind`, which validates the
operands, builds the `Problem` and asks dispatch for the `Bound` call: a repeated call is a cache hit.
Implementations with framework 'any' (the NumPy reference) get NumPy arrays (bf16 through a uint16
view + `ml_dtypes.bfloat16`).
"""

from __future__ import annotations

import functools
from typing import Any

import ml_dtypes
import numpy as np
import torch

from qkernels import dispatch, hardware
from qkernels.dispatch import Bound, Problem
from qkernels.formats import QOperand, Recipe, recipe_named
from torch_bindings.arrays import DTYPES, TORCH_OPS, dtype_name
from torch_bindings.qtensor import check_operands, dequantize_operand

__all__ = ["LINEAR", "kernel", "platform_of", "device_of", "make_problem", "dtype_name", "bind", "Runner", "Runners"]


@functools.lru_cache(maxsize=64)
def platform_of(device: torch.device) -> str:
    """Dispatch platform string: 'cpu', 'cuda:sm_90', 'rocm:gfx942' (`qkernels.hardware`)."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if torch.version.hip:
            return hardware.rocm_platform(torch.cuda.get_device_properties(device).gcnArchName)
        return hardware.cuda_platform(*torch.cuda.get_device_capability(device))
    raise ValueError(f"device {device} is not supported; qkernels runs on cpu and cuda (NVIDIA/ROCm) tensors")


@functools.lru_cache(maxsize=64)
def device_of(device: torch.device) -> str:
    """Device kind of a tensor's device, the key of its tuned-config tables ('h100', 'cpu')."""
    if device.type == "cuda":
        return hardware.device_kind(torch.cuda.get_device_name(device))
    return device.type


def make_problem(x: torch.Tensor, n: int, recipe: Recipe, has_bias: bool) -> Problem:
    """The canonical problem of `x (M, K)` against an (N, K) weight (leading axes already folded)."""
    return _problem(x.shape[0], x.shape[-1], x.dtype, x.device, n, has_bias, recipe)


def _problem(m: int, k: int, dtype: torch.dtype, device: torch.device, n: int, has_bias: bool,
             recipe: Recipe) -> Problem:
    # static recipes: the op quantizes x with the layer's input_scale (Recipe.quantize_lhs) and hands the codes on
    return Problem(recipe=recipe, m=m, n=n, k=k, act_dtype=dtype_name(dtype), out_dtype=dtype_name(dtype),
                   has_bias=has_bias, framework="torch", platform=platform_of(device), device=device_of(device),
                   lhs_quantized=recipe.static)


def _check(x: tuple[int, ...], qvalue: tuple[Any, ...], scale: tuple[Any, ...], zero: tuple[Any, ...] | None,
           bias: tuple[int, ...] | None, input_scale: tuple[Any, ...] | None, recipe: str) -> None:
    """The op's operand checks: shapes (symbolic under torch.compile's fake tensors) and storage dtypes.

    `qvalue`, `scale`, `zero` are (shape, dtype) pairs; a QTensor satisfies all of this by construction,
    hand-made operands of `torch.ops.qkernels.linear` are held to the same rules.
    """
    def plain(sig: tuple[Any, ...] | None) -> tuple[Any, ...] | None:  # torch.Size -> tuple, for the messages
        return None if sig is None else (tuple(sig[0]), sig[1])

    x, bias = tuple(x), None if bias is None else tuple(bias)
    qvalue, scale, zero, input_scale = plain(qvalue), plain(scale), plain(zero), plain(input_scale)
    if len(x) != 2:
        raise ValueError(f"qkernels::linear takes a 2-D (M, K) input, got shape {x}")
    check_operands(recipe_named(recipe), x[1], qvalue, scale, zero, input_scale=input_scale)
    if bias is not None and bias != (qvalue[0][0],):
        raise ValueError(f"bias has shape {bias}; expected ({qvalue[0][0]},)")


def _operand_key(x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 bias: torch.Tensor | None, input_scale: torch.Tensor | None) -> tuple[Any, ...]:
    # torch.Size is a tuple (same hash and equality): no copy per call
    return (x.shape, (qvalue.shape, qvalue.dtype), (scale.shape, scale.dtype),
            None if zero_point is None else (zero_point.shape, zero_point.dtype), None if bias is None else bias.shape,
            None if input_scale is None else (input_scale.shape, input_scale.dtype))


# Per-call caches, keyed by plain values (shapes, dtypes, the recipe's name: a str hashes once, a Recipe
# dataclass rehashes its fields on every lookup). A call's operands are checked once (errors are not cached).
_checked = functools.lru_cache(maxsize=4096)(_check)


@functools.lru_cache(maxsize=4096)
def _bind(m: int, k: int, dtype: torch.dtype, device: torch.device, n: int, has_bias: bool, recipe: str,
          backend: str | None, version: int) -> Bound:
    return dispatch.bind(_problem(m, k, dtype, device, n, has_bias, recipe_named(recipe)), backend)


def bind(x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
         bias: torch.Tensor | None, recipe: str, input_scale: torch.Tensor | None = None) -> Bound:
    """The bound call of one `qkernels::linear`: validated and selected once per distinct call."""
    _checked(*_operand_key(x, qvalue, scale, zero_point, bias, input_scale), recipe)
    if not (qvalue.device == scale.device == x.device):
        raise ValueError(f"qvalue/scale are on {qvalue.device}/{scale.device} but x is on {x.device}; move them")
    return _bind(x.shape[0], x.shape[1], x.dtype, x.device, qvalue.shape[0], bias is not None, recipe,
                 dispatch.requested_backend(), dispatch.registry_version("torch"))


_BITS = {1: (np.uint8, torch.uint8), 2: (np.uint16, torch.uint16)}


def _to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    """A tensor as NumPy; dtypes NumPy lacks (bfloat16, float8_*) cross as the same bytes in ml_dtypes' dtype."""
    if t is None:
        return None
    t = t.detach().cpu()
    name = dtype_name(t.dtype)
    if hasattr(ml_dtypes, name):
        return t.view(_BITS[t.element_size()][1]).numpy().view(getattr(ml_dtypes, name))
    return t.numpy()


def _from_numpy(a: np.ndarray, device: torch.device) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if hasattr(ml_dtypes, a.dtype.name) and a.dtype.name in DTYPES:
        return torch.from_numpy(a.view(_BITS[a.itemsize][0])).view(DTYPES[a.dtype.name]).to(device)
    return torch.from_numpy(a).to(device)


def kernel(x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
            bias: torch.Tensor | None, recipe: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    call = bind(x, qvalue, scale, zero_point, bias, recipe, input_scale)
    return _execute(call, x, QOperand(qvalue, scale, zero_point), bias, input_scale)


def _execute(call: Bound, x: torch.Tensor, rhs: QOperand, bias: torch.Tensor | None,
             input_scale: torch.Tensor | None) -> torch.Tensor:
    """Run a bound call on x (M, K): the static recipes' activation quantization, NumPy for framework 'any'."""
    lhs: torch.Tensor | QOperand = x
    if call.problem.lhs_quantized:  # a static recipe: its calibrated scale, saturating (raises when uncalibrated)
        lhs = call.problem.recipe.quantize_lhs(TORCH_OPS, x, input_scale)
    if call.implementation.framework == dispatch.ANY_FRAMEWORK:
        np_lhs = QOperand(*map(_to_numpy, lhs)) if isinstance(lhs, QOperand) else _to_numpy(lhs)
        out = call.run(np_lhs, QOperand(*map(_to_numpy, rhs)), _to_numpy(bias))
        return _from_numpy(out, x.device)
    return call.run(lhs, rhs, bias).contiguous()


class Runner:
    """`kernel(x, *weights)` prepared for one layer's weight tensors and one activation (shape, dtype, device):
    the implementation's `prepare` (for the native CPU kernels, one ctypes call with the weight's pointers
    fixed). It reads the tensors' memory itself, never a copy made at preparation, so an in-place write
    (`load_state_dict` included) is seen; it is used only while the tensors are the same objects over the
    same memory (`.to()` makes new ones; a storage that is freed and allocated again, as FSDP does with
    unsharded parameters, moves), with the requested backend and the registry unchanged. A module's forward
    calls it only where the op's kernel may run directly (`functional._direct`): `python -m bench overhead`
    measures the difference."""

    __slots__ = ("run", "tensors", "pointers", "backend", "registry")

    def __init__(self, run: Any, tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]) -> None:
        self.run = run
        self.tensors = tensors  # qvalue, scale, zero_point, bias
        self.pointers = tuple(0 if t is None else t.data_ptr() for t in tensors)
        self.backend = dispatch.requested_backend()
        self.registry = dispatch.registry_version()

    def usable(self, tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]) -> bool:
        q, s, z, b = tensors  # written out: this runs per call
        q0, s0, z0, b0 = self.tensors
        pq, ps, pz, pb = self.pointers
        return (q is q0 and s is s0 and z is z0 and b is b0 and q.data_ptr() == pq and s.data_ptr() == ps
                and (z is None or z.data_ptr() == pz) and (b is None or b.data_ptr() == pb)
                and dispatch.registry_version() == self.registry and dispatch.requested_backend() == self.backend)

    @classmethod
    def make(cls, x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
             bias: torch.Tensor | None, recipe: str) -> Runner | None:
        """The runner of `kernel(x, ...)` for a contiguous plain `x` (..., K) with dynamic activations (None for
        static ones): the implementation's `prepare`, else the bound call run without binding again."""
        k, n = x.shape[-1], qvalue.shape[0]
        call = bind(x.reshape(-1, k), qvalue, scale, zero_point, bias, recipe)
        if call.problem.lhs_quantized:
            return None
        rhs = QOperand(qvalue, scale, zero_point)
        prepare = call.implementation.prepare
        run = None if prepare is None else prepare(call, rhs, bias)
        if run is None:  # the bound call without re-binding: every implementation reads its operands per call

            def run(x: torch.Tensor) -> torch.Tensor:
                return _execute(call, x.reshape(-1, k), rhs, bias, None).reshape(*x.shape[:-1], n)

        return cls(run, (qvalue, scale, zero_point, bias))


class Runners(dict):
    """A module's runners by activation (shape, dtype, device); never copied or saved (they hold raw pointers
    into the module's tensors): a copy or an unpickled module starts empty and prepares its own."""

    LIMIT = 16  # distinct activation shapes kept (decode and a few prefill lengths)

    def store(self, key: Any, runner: Runner | None, tensors: tuple[torch.Tensor | None, ...]) -> None:
        """Keep `runner` (None: the implementation prepares none, remembered as False) for `key`, first dropping
        the runners made for other tensors (a replaced weight's, or the one before `.to()`: they would keep it
        alive); up to `LIMIT` keys."""
        for k in [k for k, r in self.items() if r and not all(a is b for a, b in zip(r.tensors, tensors))]:
            del self[k]
        if key in self or len(self) < self.LIMIT:
            self[key] = runner or False

    def __deepcopy__(self, memo: dict[int, Any]) -> Runners:
        return Runners()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Runners, ())


_linear = torch.library.custom_op("qkernels::linear", kernel, mutates_args=(), device_types="cpu")
# The CUDA kernel runs the same dispatch: on a GPU it selects the Triton implementation.
_linear.register_kernel("cuda")(kernel)


@_linear.register_fake
def _fake(x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
          bias: torch.Tensor | None, recipe: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    _check(*_operand_key(x, qvalue, scale, zero_point, bias, input_scale), recipe)
    return x.new_empty((x.shape[0], qvalue.shape[0]))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, qvalue, scale, zero_point, bias, recipe, _ = inputs
    ctx.save_for_backward(qvalue, scale, zero_point)
    ctx.recipe, ctx.k, ctx.x_dtype = recipe_named(recipe), x.shape[1], x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Straight-through: d(input) = grad @ dequantize(W) in f32 (through the activations' quantization, dynamic
    or static, as through the weight's); the weight and the input scale get no grad."""
    qvalue, scale, zero_point = ctx.saved_tensors
    recipe = ctx.recipe
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
    return grad_x, None, None, None, grad_bias, None, None


_linear.register_autograd(_backward, setup_context=_setup_context)

LINEAR = torch.ops.qkernels.linear
"""The custom op (`torch.ops.qkernels.linear`)."""
