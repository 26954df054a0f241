"""`grouped_linear`: quantized mixture-of-experts matmuls with `torch._grouped_mm` semantics, and its custom op.

`grouped_linear(x (M, K), w_q (E, N, K), offsets (E,) int32) -> (M, N)`: `offsets[e]` is the end row of
expert e (cumulative, as `torch._grouped_mm`'s `offs`), so expert e's rows `[offsets[e-1], offsets[e])`
multiply `w_q[e]^T` (F.linear's layout: one (out_features, in_features) weight per expert). Rows past
`offsets[-1]` are zero (`torch._grouped_mm` leaves them undefined; `qkernels.grouped` has the
definition, `jax.lax.ragged_dot`'s). `w_q` is a `QExperts` from `quantize_experts` (every `QTensor`
tensor with a leading E axis; `w_q.expert(e)` is expert e's `QTensor`), each expert with its own scales.

`torch.ops.qkernels.grouped_linear(x, qvalue, scale, zero_point?, offsets, recipe: str)` is one opaque op
for `torch.compile`, with CPU and CUDA kernels (the same dispatch of `Op.RAGGED_QMATMUL`: 'torch-cpu'
on CPU, the Triton grouped kernels on a GPU), a fake implementation and a straight-through autograd
formula (the input's gradient against the dequantized experts; the weight gets none).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from qkernels import dispatch, grouped
from qkernels.dispatch import Bound, Problem
from qkernels.formats import W8A8, QOperand, Recipe, recipe_named, resolve_recipe
from torch_bindings import ops
from torch_bindings.arrays import DTYPES, TORCH_OPS, dtype_name
from torch_bindings.qtensor import FLOAT_DTYPES, QTensor, check_float, dequantize_operand
from torch_bindings.qtensor import quantize as _quantize

__all__ = ["grouped_linear", "quantize_experts", "QExperts", "explain", "GROUPED_LINEAR", "register_cpu"]


@dataclass(frozen=True, kw_only=True, slots=True)
class QExperts:
    """A stack of E quantized expert weights: `w[e, n, :K] ≈ (unpack(qvalue)[e, n] - zero_point[e, n, g]) * scale[e, n, g]`.

    Every tensor is a `QTensor`'s with a leading E axis: `qvalue` int8 (E, N, K_stored), `scale` f32
    (E, N) per channel or (E, N, K_padded // group_size) per group, `zero_point` int8 like `scale` (uint4)
    or None; `shape` is the logical (E, out_features, in_features). `expert(e)` is expert e's `QTensor`.
    A plain frozen container (the weights are not trained; `grouped_linear` gives them no gradient).
    """

    qvalue: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    recipe: Recipe
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        fmt = self.recipe.rhs
        if len(self.shape) != 3:
            raise ValueError(f"QExperts.shape={self.shape} must be (E, out_features, in_features)")
        expect = {"qvalue": ((*self.shape[:2], fmt.stored_k(self.shape[2])), DTYPES[fmt.qtype.storage]),
                  "scale": (fmt.scale_shape(self.shape), torch.float32),
                  "zero_point": (fmt.scale_shape(self.shape), torch.int8) if fmt.zero_point else None}
        for name, want in expect.items():
            t = getattr(self, name)
            got = "None" if t is None else f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            need = "None" if want is None else f"{tuple(want[0])} {want[1]}"
            if got != need:
                raise ValueError(f"QExperts.{name} for {self.shape} experts in {self.recipe.name} must be {need}, "
                                 f"got {got}")
        if len({t.device for t in self.tensors()}) > 1:
            raise ValueError("QExperts tensors are on several devices; use .to(device)")

    @property
    def experts(self) -> int:
        return self.shape[0]

    @property
    def out_features(self) -> int:
        return self.shape[1]

    @property
    def in_features(self) -> int:
        return self.shape[2]

    @property
    def device(self) -> torch.device:
        return self.qvalue.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.qvalue, self.scale, self.zero_point) if t is not None)

    def operand(self) -> QOperand:
        return QOperand(self.qvalue, self.scale, self.zero_point)

    def expert(self, e: int) -> QTensor:
        """Expert `e` as a dense `QTensor` (views of the same codes and scales): `qk.linear`'s weight."""
        return QTensor(qvalue=self.qvalue[e], scale=self.scale[e],
                       zero_point=None if self.zero_point is None else self.zero_point[e], recipe=self.recipe,
                       shape=tuple(self.shape[1:]))

    def to(self, device: torch.device | str) -> QExperts:
        """The same experts on `device` (copied, never re-quantized)."""
        return QExperts(qvalue=self.qvalue.to(device), scale=self.scale.to(device),
                        zero_point=None if self.zero_point is None else self.zero_point.to(device),
                        recipe=self.recipe, shape=self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float (E, out_features, in_features) experts `(f32(q) - zero) * scale`, cast to `dtype`."""
        return dequantize_operand(self.operand(), self.recipe.rhs, self.in_features).to(dtype)

    def __repr__(self) -> str:
        return f"QExperts(shape={self.shape}, recipe={self.recipe.name}, device={self.device})"


def quantize_experts(w: torch.Tensor, recipe: Any = None, *, name: str = "experts", method: str = "rtn") -> QExperts:
    """Quantize an (E, out_features, in_features) stack of expert weights for `recipe` (default W8A8), each
    expert (each row of each expert, each group along K) with its own scales.

    Codes and scales equal `qk.quantize(w[e], recipe, method=method)`'s for every expert e
    (`QExperts.expert(e)`): "rtn" or "mse" (per row / group, so per expert)."""
    recipe = resolve_recipe(recipe)
    check_float(w, name)
    if w.ndim != 3:
        raise ValueError(f"{name} has shape {tuple(w.shape)}; quantize_experts takes (E, out_features, in_features) "
                         f"(a 2-D weight: qk.quantize)")
    flat = _quantize(w.reshape(w.shape[0] * w.shape[1], w.shape[2]), recipe, name=name, method=method)
    lead = tuple(w.shape[:2])
    zero = None if flat.zero_point is None else flat.zero_point.reshape(*lead, *flat.zero_point.shape[1:])
    return QExperts(qvalue=flat.qvalue.reshape(*lead, flat.qvalue.shape[-1]),
                    scale=flat.scale.reshape(*lead, *flat.scale.shape[1:]), zero_point=zero, recipe=recipe,
                    shape=tuple(w.shape))


def _problem(m: int, k: int, dtype: torch.dtype, device: torch.device, n: int, groups: int,
             recipe: Recipe) -> Problem:
    return Problem(op=dispatch.Op.RAGGED_QMATMUL, recipe=recipe, m=m, n=n, k=k, groups=groups,
                   act_dtype=dtype_name(dtype), out_dtype=dtype_name(dtype), framework="torch",
                   platform=ops.platform_of(device), device=ops.device_of(device))


def _check(x: tuple[int, ...], qvalue: tuple[Any, ...], scale: tuple[Any, ...], zero: tuple[Any, ...] | None,
           offsets: tuple[Any, ...], recipe: Recipe) -> None:
    """The op's operand checks on (shape, dtype) pairs (symbolic under torch.compile's fake tensors)."""
    if len(x) != 2:
        raise ValueError(f"qkernels::grouped_linear takes a 2-D (M, K) input, got shape {x}")
    fmt = recipe.rhs
    (q_shape, q_dtype), (s_shape, s_dtype), (o_shape, o_dtype) = qvalue, scale, offsets
    stored = fmt.stored_k(x[1])
    if len(q_shape) != 3 or q_shape[2] != stored:
        raise ValueError(f"qvalue has shape {q_shape} but an input with K={x[1]} in {recipe.name} needs "
                         f"(E, N, {stored}); the experts' in_features do not match the input")
    if q_dtype != DTYPES[fmt.qtype.storage]:
        raise TypeError(f"qvalue has dtype {q_dtype}; {fmt.describe()} codes are stored as {fmt.qtype.storage}")
    want = fmt.scale_shape((q_shape[0], q_shape[1], x[1]))
    if s_shape != want or s_dtype != torch.float32:
        raise ValueError(f"scale is {s_shape} {s_dtype}; {recipe.name} needs {want} torch.float32")
    if (zero is not None) != fmt.zero_point or (zero is not None and (zero[0] != want or zero[1] != torch.int8)):
        raise ValueError(f"zero_point is {zero}; {recipe.name} needs {f'{want} torch.int8' if fmt.zero_point else 'None'}")
    if o_shape != (q_shape[0],) or o_dtype != torch.int32:
        raise ValueError(f"offsets is {o_shape} {o_dtype}; {q_shape[0]} experts need ({q_shape[0]},) torch.int32 "
                         f"cumulative end rows (torch.cumsum(group_sizes, 0, dtype=torch.int32))")


def _key(x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
         offsets: torch.Tensor) -> tuple[Any, ...]:
    zero = None if zero_point is None else (tuple(zero_point.shape), zero_point.dtype)
    return (tuple(x.shape), (tuple(qvalue.shape), qvalue.dtype), (tuple(scale.shape), scale.dtype), zero,
            (tuple(offsets.shape), offsets.dtype))


_checked = functools.lru_cache(maxsize=1024)(_check)


@functools.lru_cache(maxsize=1024)
def _bind(m: int, k: int, dtype: torch.dtype, device: torch.device, n: int, groups: int, recipe: Recipe,
          backend: str | None, version: int) -> Bound:
    return dispatch.bind(_problem(m, k, dtype, device, n, groups, recipe), backend)


def bind(x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
         offsets: torch.Tensor, recipe: str) -> Bound:
    """The bound call of one `qkernels::grouped_linear`, validated and selected once per distinct call."""
    r = recipe_named(recipe)
    _checked(*_key(x, qvalue, scale, zero_point, offsets), r)
    if not (qvalue.device == scale.device == offsets.device == x.device):
        raise ValueError(f"qvalue/scale/offsets are on {qvalue.device}/{scale.device}/{offsets.device} but x is on "
                         f"{x.device}; move them")
    return _bind(x.shape[0], x.shape[1], x.dtype, x.device, qvalue.shape[1], qvalue.shape[0], r,
                 dispatch.requested_backend(), dispatch.registry_version("torch"))


def _sizes(offsets: torch.Tensor, m: int) -> torch.Tensor:
    """Group sizes from cumulative end offsets; checked on the host for CPU tensors (a GPU call is not
    synchronized for it: there, as with `torch._grouped_mm`, decreasing offsets are undefined)."""
    if offsets.device.type == "cpu":
        sizes = grouped.offsets_to_sizes(offsets.tolist())
        grouped.check_group_sizes(sizes, m, offsets.shape[0])
    return torch.diff(offsets, prepend=offsets.new_zeros(1))


def _kernel(x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
            offsets: torch.Tensor, recipe: str) -> torch.Tensor:
    call = bind(x, qvalue, scale, zero_point, offsets, recipe)
    rhs, sizes = QOperand(qvalue, scale, zero_point), _sizes(offsets, x.shape[0])
    if call.implementation.framework == dispatch.ANY_FRAMEWORK:
        out = call.run(ops._to_numpy(x), QOperand(*map(ops._to_numpy, rhs)), sizes.numpy())
        return ops._from_numpy(out, x.device)
    return call.run(x, rhs, sizes).contiguous()


_op = torch.library.custom_op("qkernels::grouped_linear", _kernel, mutates_args=(), device_types="cpu")
_op.register_kernel("cuda")(_kernel)


@_op.register_fake
def _fake(x: torch.Tensor, qvalue: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
          offsets: torch.Tensor, recipe: str) -> torch.Tensor:
    _check(*_key(x, qvalue, scale, zero_point, offsets), recipe_named(recipe))
    return x.new_empty((x.shape[0], qvalue.shape[1]))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, qvalue, scale, zero_point, offsets, recipe = inputs
    ctx.save_for_backward(qvalue, scale, zero_point, offsets)
    ctx.recipe, ctx.k, ctx.x_dtype = recipe_named(recipe), x.shape[1], x.dtype


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Straight-through: each expert's rows of d(input) = grad rows @ dequantize(w[e]) in f32."""
    qvalue, scale, zero_point, offsets = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        if ctx.recipe.quantized_backward:
            raise NotImplementedError(f"recipe {ctx.recipe.name} asks for a quantized backward pass, which "
                                      f"grouped_linear does not implement; use {ctx.recipe.name.removesuffix('-qbwd')}")
        w = dequantize_operand(QOperand(qvalue, scale, zero_point), ctx.recipe.rhs, ctx.k)  # [E, N, K] f32
        g = grad.to(torch.float32)
        grad_x = torch.zeros(g.shape[0], ctx.k, dtype=torch.float32, device=g.device)
        for seg in grouped.segments(grouped.offsets_to_sizes(offsets.tolist())):
            grad_x[seg.start:seg.stop] = g[seg.start:seg.stop] @ w[seg.expert]
        grad_x = grad_x.to(ctx.x_dtype)
    return grad_x, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)

GROUPED_LINEAR = torch.ops.qkernels.grouped_linear
"""The custom op (`torch.ops.qkernels.grouped_linear`)."""


def _prepare(input: torch.Tensor, weight: torch.Tensor | QExperts, offsets: torch.Tensor) -> QExperts:
    check_float(input, "input")
    if input.dim() != 2:
        raise ValueError(f"input has shape {tuple(input.shape)}; grouped_linear takes (M, in_features) rows sorted "
                         f"by expert (flatten the tokens first)")
    if isinstance(weight, torch.Tensor):
        if weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("weight requires grad, but a float weight is quantized per call and gets no gradient; "
                               "quantize it once with qk.quantize_experts(weight, recipe) (frozen), or call under "
                               "torch.no_grad()")
        weight = quantize_experts(weight, W8A8)
    elif isinstance(weight, QTensor):
        raise ValueError(f"weight is a 2-D QTensor {weight.shape}; grouped_linear takes (E, out_features, "
                         f"in_features) experts from qk.quantize_experts (a 2-D weight is qk.linear's)")
    elif not isinstance(weight, QExperts):
        raise TypeError(f"weight must be a float (E, N, K) tensor or QExperts from qk.quantize_experts, "
                        f"got {type(weight).__name__}")
    if input.shape[1] != weight.in_features:
        raise ValueError(f"input has in_features={input.shape[1]} but the experts are {weight.shape} "
                         f"(E, out_features, in_features); they must match")
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int32 or tuple(offsets.shape) != weight.shape[:1]:
        raise TypeError(f"offsets must be an int32 ({weight.shape[0]},) tensor of cumulative end rows "
                        f"(torch.cumsum(group_sizes, 0, dtype=torch.int32)), got "
                        f"{getattr(offsets, 'shape', '')} {getattr(offsets, 'dtype', type(offsets).__name__)}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input has dtype {input.dtype}; use float32, bfloat16 or float16")
    return weight


def grouped_linear(input: torch.Tensor, weight: torch.Tensor | QExperts, offsets: torch.Tensor) -> torch.Tensor:
    """`out[rows of e] = input[rows of e] @ W[e]^T` with quantized experts; `torch._grouped_mm`'s offsets.

    input: (M, in_features) float32/bfloat16/float16, rows sorted by expert; the output has its dtype.
    weight: `QExperts` (E, out_features, in_features) from `quantize_experts`, or a float tensor of
    that shape, quantized with W8A8 on EVERY call (quantize once instead). offsets: int32 (E,), the
    cumulative end row of each expert. Rows past offsets[-1] are zero. Gradients flow to input only.
    """
    w = _prepare(input, weight, offsets)
    return GROUPED_LINEAR(input, w.qvalue, w.scale, w.zero_point, offsets, w.recipe.name)


def explain(input: torch.Tensor, weight: torch.Tensor | QExperts, offsets: torch.Tensor, backend: str | None = None,
            *, verbose: bool = False) -> dispatch.Explanation:
    """The implementations that could run `grouped_linear(input, weight, offsets)`, with verdicts and the choice."""
    w = _prepare(input, weight, offsets)
    problem = _problem(input.shape[0], input.shape[1], input.dtype, input.device, w.out_features, w.experts,
                       w.recipe)
    return dispatch.explain(problem, backend, verbose=verbose)


# --- 'torch-cpu' for Op.RAGGED_QMATMUL (registered by `torch_bindings.cpu.register`) ------------------------


def _run_cpu(call: Bound, lhs: torch.Tensor | QOperand, rhs: QOperand, group_sizes: torch.Tensor) -> torch.Tensor:
    """One dense recipe matmul per non-empty expert over its own rows (`grouped.segment_outputs`)."""
    p = call.problem
    sizes = grouped.check_group_sizes(group_sizes.tolist(), p.m, p.groups)
    act = "float32" if p.lhs_quantized else p.act_dtype
    parts = [y for _, y in grouped.segment_outputs(p.recipe, TORCH_OPS, lhs, rhs, sizes, k=p.k, act_dtype=act,
                                                   out_dtype=p.out_dtype)]
    device = (lhs.qvalue if isinstance(lhs, QOperand) else lhs).device
    parts.append(torch.zeros(p.m - sum(sizes), p.n, dtype=DTYPES[p.out_dtype], device=device))
    return torch.cat(parts)


def _accumulate_cpu(call: Bound, lhs: torch.Tensor | QOperand, rhs: QOperand, group_sizes: torch.Tensor) -> torch.Tensor:
    return grouped.ragged_accumulators(call.problem.recipe, TORCH_OPS, lhs, rhs, group_sizes, k=call.problem.k)


def register_cpu(supports: Any, serves: dispatch.Serves) -> None:
    """Register 'torch-cpu' for `Op.RAGGED_QMATMUL` (the dense op's `supports` and declaration)."""
    dispatch.register(dispatch.Implementation(
        name="torch-cpu", framework="torch", op=dispatch.Op.RAGGED_QMATMUL, priority=50, supports=supports,
        run=_run_cpu, accumulate=_accumulate_cpu, serves=serves,
        description="torch on CPU: the dense recipe matmul per expert over its rows (torch._int_mm for integers)"))
