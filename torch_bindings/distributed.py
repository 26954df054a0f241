"""Tensor parallelism for `QLinear` under torch.distributed (DTensor): `ColwiseParallel`, `RowwiseParallel`,
`parallelize` (HF-style `tp_plan` names), and the sharded forward they install.

    from torch.distributed.tensor.parallel import parallelize_module
    model = parallelize_module(model, tp_mesh, {"up": qk.ColwiseParallel(), "down": qk.RowwiseParallel()})
    model = qk.parallelize(model, tp_mesh, {"layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise"})

Why our own styles: torch's `ColwiseParallel` / `RowwiseParallel` (torch 2.13) refuse every module that is not
an `nn.Linear` or `nn.Embedding` (`NotImplementedError` in their `_apply`), and their partition functions
shard `module.weight` as one float parameter, while a QLinear's weight is buffers (codes, scales, zero points)
whose split depends on the format (a per-channel scale is replicated by a K split, a per-group one is split with
it; int4 codes are split by bytes) and whose K-split product must be summed before the rescale. So
`qk.ColwiseParallel` / `qk.RowwiseParallel` subclass torch's styles: they take the same arguments
(`input_layouts`, `output_layouts`, `use_local_output`), plug into `parallelize_module` like them, treat
`nn.Linear` / `nn.Embedding` exactly as torch does (`super()._apply`), and for a QLinear shard its buffers as
DTensors and install the sharded forward. `parallelize` also accepts torch's stock styles in a plan and swaps
them for ours (same layouts), so a plan written for a float model serves its quantized copy.

What each split computes, on the local shards (the QLinear's buffers are DTensors; `state_dict` holds them, so
`torch.distributed.checkpoint` saves and reshards them):

- colwise (N split: codes, scales, zero points and bias along N; the input replicated): each rank runs
  `qkernels.linear` on its own output columns; the weight never moves and nothing is reduced. Every recipe is
  bit-identical to the unsharded layer column by column up to the float GEMM's blocking of N (integer recipes:
  exactly). Output `Shard(-1)`, then `output_layouts`.
- rowwise (K split along whole groups: codes along K; per-group scales and zero points with them, per-channel
  ones replicated; bias replicated; SmoothQuant factors along K): the activations are quantized with the scale
  of the whole row (`OperandFormat.quantize(..., amax=)` with each row's absmax all-reduced, MAX: M floats),
  each rank computes its `Accumulation.partial` (W8A8: the exact int32 accumulators), one all-reduce (SUM)
  sums the partials, and `Accumulation.finish` applies the rest of the rescale, the bias and the one cast,
  once, on every rank. W8A8 (int32, summed exactly): bit-identical to the unsharded layer. W4A8 (int32 per
  group, f32 across groups), fp8 and weight-only recipes (f32 partials): the f32 sum is reassociated across
  ranks, within `qkernels.testing.tolerances` of the unsharded layer (its f32-accumulation-order term), not
  bit-identical. A static recipe's calibrated scale is already global: no MAX reduce. Output `Replicate()`.
  W8A8's int32 accumulators come from the implementation dispatch selects for the shard
  (`Implementation.accumulate`: Triton on CUDA, tested here through its interpreter); the other accumulations' partials (f32) run the recipe's
  definition in torch ops (`Accumulation.partial` with `torch_bindings.arrays.TORCH_OPS`, what the 'torch-cpu'
  backend runs) on the tensors' device: implementations return finished outputs (`run`) or integer
  accumulators, not every accumulation's summable partial (as `jax_bindings.sharding` for the same reason).
  Gradients: straight-through the dequantized local weight, as the unsharded op's (`torch_bindings.ops`).

Layouts that do not split evenly are refused at `parallelize_module` time with the values (never silently
replicated): N (colwise) or K (rowwise) not divisible by the mesh size, a K stored padded to the group size
or to an even length (int4), a K shard that cuts a group or a packed byte, a K beyond the int32 bound.
A 2-layer MLP colwise then rowwise runs one all-reduce of the output per pair (plus, for recipes quantizing
activations per token, the all-reduce of the M row maxima), none between the two layers.

FSDP2 (`torch.distributed.fsdp.fully_shard`) needs nothing here: it shards parameters only, so a QLinear's
frozen codes and scales stay plain replicated buffers and its bias (and LoRA adapters, `qk.add_lora`) are
sharded, gathered and reduced as any float parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor import parallel as tp

from qkernels import dispatch, numerics
from qkernels.formats import Calibration, QOperand, Recipe
from qkernels.numerics import Granularity
from torch_bindings.arrays import TORCH_OPS, dtype_name
from torch_bindings.functional import linear
from torch_bindings.modules import QLinear
from torch_bindings.ops import _from_numpy, _to_numpy, device_of, platform_of
from torch_bindings.qtensor import QTensor, check_float, dequantize_operand

__all__ = ["ColwiseParallel", "RowwiseParallel", "parallelize", "TP_STYLES", "TensorParallel", "split_refusal"]

_WEIGHT = ("qvalue", "scale", "zero_point")


def split_refusal(layer: QLinear, style: str, ranks: int) -> str | None:
    """Why `layer` cannot be split `style` ('colwise' / 'rowwise') over `ranks` ranks, or None. Pure."""
    if style not in ("colwise", "rowwise"):
        raise ValueError(f"style={style!r}: a QLinear is split 'colwise' (along N) or 'rowwise' (along K)")
    n, k, fmt, recipe = layer.out_features, layer.in_features, layer.recipe.rhs, layer.recipe
    if style == "colwise":
        if n % ranks:
            return (f"out_features={n} is not divisible by {ranks} ranks; choose a tensor-parallel degree that "
                    f"divides {n}, or leave this layer replicated")
        return None
    if k % ranks:
        return (f"in_features={k} is not divisible by {ranks} ranks; choose a tensor-parallel degree that "
                f"divides {k}, or leave this layer replicated")
    k_local = k // ranks
    if fmt.padded_k(k) != k:
        return (f"in_features={k} is stored padded to {fmt.padded_k(k)} ({fmt.describe()}), so the last rank "
                f"would hold the padding; a row-parallel split needs in_features a multiple of the group size "
                f"(and even for packed int4), e.g. pad the model's hidden size, or split this layer colwise")
    if fmt.padded_k(k_local) != k_local:
        unit = f"groups of {fmt.group_size}" if fmt.group_size else "packed bytes (two int4 codes)"
        return (f"in_features={k} over {ranks} ranks is {k_local} per rank, which cuts the weight's {unit} "
                f"({fmt.describe()}); use fewer ranks or a group size dividing {k_local}")
    if recipe.lhs is not None and not recipe.static and (
            recipe.lhs.calibration is not Calibration.ABSMAX or recipe.lhs.granularity is not Granularity.ROW):
        return (f"{recipe.name} quantizes activations {recipe.lhs.describe()}; a row-parallel split computes the "
                f"activation scale of whole rows (absmax per row), which this format does not use")
    if recipe.max_k is not None and k > recipe.max_k:
        return f"in_features={k} exceeds {recipe.max_k}, the largest K {recipe.name} accumulates exactly in int32"
    return None


def _placements(layer: QLinear, style: str) -> dict[str, Placement]:
    """The placement of each of the layer's tensors (None ones omitted) under `style`."""
    grouped = layer.scale.ndim == 2  # per group (N, G); per channel (N,); per tensor ()
    if style == "colwise":
        out: dict[str, Placement] = {"qvalue": Shard(0), "bias": Shard(0), "input_scale": Replicate(),
                                     "smooth": Replicate()}
        out.update({name: Shard(0) if layer.scale.ndim else Replicate() for name in ("scale", "zero_point")})
    else:
        out = {"qvalue": Shard(1), "bias": Replicate(), "input_scale": Replicate(), "smooth": Shard(0)}
        out.update({name: Shard(1) if grouped else Replicate() for name in ("scale", "zero_point")})
    return {name: p for name, p in out.items() if getattr(layer, name) is not None}


@dataclass(frozen=True, slots=True, eq=False)
class TensorParallel:
    """A QLinear's tensor-parallel split, set as `layer.parallel` by `ColwiseParallel` / `RowwiseParallel`:
    `style` ('colwise' / 'rowwise') over the 1-D `mesh`. `QLinear.forward` hands its DTensor input here."""

    style: str
    mesh: DeviceMesh

    def local_weight(self, layer: QLinear, smooth: bool = True) -> QTensor:
        """The rank's shard of the weight as a QTensor (checked against its format)."""
        t = {name: None if (v := getattr(layer, name)) is None else v.to_local()
             for name in (*_WEIGHT, "input_scale", "smooth")}
        ranks = self.mesh.size()
        n, k = layer.out_features, layer.in_features
        shape = (n // ranks, k) if self.style == "colwise" else (n, k // ranks)
        return QTensor(qvalue=t["qvalue"], scale=t["scale"], zero_point=t["zero_point"], recipe=layer.recipe,
                       shape=shape, input_scale=t["input_scale"], smooth=t["smooth"] if smooth else None)

    def forward(self, layer: QLinear, input: torch.Tensor) -> DTensor:
        if not isinstance(input, DTensor):
            raise TypeError(f"a {self.style} QLinear takes the DTensor its ParallelStyle's input hook makes, got "
                            f"{type(input).__name__}; call the module (not its forward) after parallelize_module")
        bias = None if layer.bias is None else layer.bias.to_local()
        if self.style == "colwise":
            # the input is replicated; its gradient is one partial sum per rank (reduced by the input hook's backward)
            y = linear(input.to_local(grad_placements=[Partial()]), self.local_weight(layer), bias)
            return DTensor.from_local(y, self.mesh, [Shard(-1)], run_check=False)
        x = input.to_local()
        w = self.local_weight(layer, smooth=False)
        check_float(x, "input")
        if x.dim() < 1 or x.shape[-1] != w.in_features:
            raise ValueError(f"a rowwise QLinear over {self.mesh.size()} ranks takes this rank's {w.in_features} of "
                             f"in_features={layer.in_features}, got an input shard of shape {tuple(x.shape)}; pass "
                             f"the local slice (input_layouts=Shard(-1)) or the whole input with input_layouts="
                             f"Replicate() ('rowwise_rep')")
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
        if layer.smooth is not None:  # as qkernels.linear: x / s in f32, kept in f32 where it is quantized
            from qkernels import calibration

            x2 = calibration.smooth_activations(x2, layer.smooth.to_local(), TORCH_OPS)
            x2 = x2 if layer.recipe.lhs is not None else x2.to(x.dtype)
        y = _RowParallelLinear.apply(x2, bias, w, self.mesh)
        y = y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)
        return DTensor.from_local(y, self.mesh, [Replicate()], run_check=False)


def _all_reduce(t: torch.Tensor, op: str, mesh: DeviceMesh) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_reduce(t, op, mesh))


def _global_lhs(recipe: Recipe, x: torch.Tensor, input_scale: torch.Tensor | None, mesh: DeviceMesh) -> Any:
    """The activations of one K shard as the unsharded layer quantizes the whole rows: codes with the scale of
    the whole row (its absmax all-reduced; a non-finite value makes it inf on every rank, which then raises
    everywhere as the unsharded layer does), a static recipe's calibrated scale, or float as they are."""
    if recipe.lhs is None:
        return x
    if recipe.static:
        return recipe.quantize_lhs(TORCH_OPS, x, input_scale)
    amax = TORCH_OPS.absmax(numerics.flush_subnormals(TORCH_OPS.cast(x, "float32"), TORCH_OPS))[..., 0]
    amax = _all_reduce(torch.where(torch.isfinite(amax), amax, math.inf), "max", mesh)
    q = recipe.lhs.quantize(x, TORCH_OPS, amax=amax)
    recipe.lhs.check_scale(q.scale, TORCH_OPS, what="activations", fix=", or use a weight-only recipe")
    return q


def _accumulators(recipe: Recipe, lhs: QOperand, rhs: QOperand, n: int, k: int) -> torch.Tensor:
    """The int32 accumulators (M, N) of one K shard from the implementation dispatch selects for it
    (`Implementation.accumulate`: Triton on CUDA, `torch._int_mm` on CPU, NumPy under `use_backend("reference")`)."""
    device = lhs.qvalue.device
    problem = dispatch.Problem(recipe=recipe, m=lhs.qvalue.shape[0], n=n, k=k, act_dtype="float32",
                               out_dtype="float32", has_bias=False, framework="torch", platform=platform_of(device),
                               device=device_of(device), lhs_quantized=True)
    call = dispatch.bind(problem, dispatch.requested_backend())
    if call.implementation.framework == dispatch.ANY_FRAMEWORK:
        return _from_numpy(call.accumulate(QOperand(*map(_to_numpy, lhs)), QOperand(*map(_to_numpy, rhs))), device)
    return call.accumulate(lhs, rhs)


class _RowParallelLinear(torch.autograd.Function):
    """`y = finish(all_reduce(partial(x_shard, w_shard)))` on (M, K_local) activations, and its straight-through
    backward: `dx_shard = dy @ dequantize(w_shard)`, `dbias = sum(dy)` (dy is replicated, so both are local)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, w: QTensor, mesh: DeviceMesh) -> torch.Tensor:
        recipe, rhs, acc = w.recipe, w.operand(), w.recipe.accumulation
        lhs = _global_lhs(recipe, x, w.input_scale, mesh)
        if acc.integer and not acc.grouped:  # the partial is the exact int32 accumulators: the dispatched kernel's
            part = _accumulators(recipe, lhs, rhs, w.out_features, w.in_features)
        else:
            part = acc.partial(recipe, TORCH_OPS, lhs, rhs, k=w.in_features, batched=False,
                               act_dtype=dtype_name(x.dtype))
        part = _all_reduce(part, "sum", mesh)  # int32 (W8A8): exact, |sum| < 2**31 (split_refusal checks max_k)
        ctx.w, ctx.x_dtype, ctx.bias_dtype = w, x.dtype, None if bias is None else bias.dtype
        return acc.finish(recipe, TORCH_OPS, part, lhs, rhs, bias, dtype_name(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w: QTensor = ctx.w
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            if w.recipe.quantized_backward:
                raise NotImplementedError(
                    f"recipe {w.recipe.name} asks for a quantized backward pass, which the PyTorch binding does not "
                    f"implement; use {w.recipe.name.removesuffix('-qbwd')}")
            grad_x = (grad.to(torch.float32) @ dequantize_operand(w.operand(), w.fmt, w.in_features)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.to(torch.float32).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None


def _distribute(t: torch.Tensor, mesh: DeviceMesh, placement: Placement, src_data_rank: int | None) -> DTensor:
    """`distribute_tensor`, float8 codes sent as their bytes (gloo has no float8 type, torch 2.13)."""
    if not (t.dtype.is_floating_point and t.element_size() == 1):
        return distribute_tensor(t, mesh, [placement], src_data_rank=src_data_rank)
    d = distribute_tensor(t.view(torch.uint8), mesh, [placement], src_data_rank=src_data_rank)
    return DTensor.from_local(d.to_local().view(t.dtype), mesh, [placement], run_check=False, shape=t.shape,
                              stride=t.stride())


def _partition(style: str, src_data_rank: int | None, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    """`distribute_module`'s partition function: a QLinear's tensors become DTensors placed for `style`."""
    if not isinstance(module, QLinear):
        return
    for key, placement in _placements(module, style).items():
        t = _distribute(getattr(module, key).detach(), mesh, placement, src_data_rank)
        if key == "bias":
            module.bias = nn.Parameter(t, requires_grad=module.bias.requires_grad)
        else:
            module._buffers[key] = t
    module.parallel = TensorParallel(style=style, mesh=mesh)


def _apply_to_qlinear(style: tp.ParallelStyle, kind: str, module: QLinear, mesh: DeviceMesh) -> nn.Module:
    if mesh.ndim != 1:
        raise ValueError(f"tensor parallelism takes a 1-D mesh, got {mesh.ndim}-D {mesh}; slice it (mesh['tp'])")
    if module.parallel is not None:
        raise ValueError(f"{module!r} is already split {module.parallel.style}; parallelize a fresh copy instead")
    reason = split_refusal(module, kind, mesh.size())
    if reason is not None:
        raise ValueError(f"cannot split {module.recipe.name} QLinear({module.in_features} -> {module.out_features}) "
                         f"{kind} over {mesh.size()} ranks: {reason}")
    return distribute_module(module, mesh, partial(_partition, kind, style.src_data_rank),
                             partial(style._prepare_input_fn, style.input_layouts, style.desired_input_layouts),
                             partial(style._prepare_output_fn, style.output_layouts, style.use_local_output))


class ColwiseParallel(tp.ColwiseParallel):
    """torch's `ColwiseParallel` that also splits a `qkernels.QLinear` along N (see the module docstring for why
    torch's own style cannot): codes, scales, zero points and bias split along out_features; same arguments."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, QLinear):
            return super()._apply(module, device_mesh)
        return _apply_to_qlinear(self, "colwise", module, device_mesh)


class RowwiseParallel(tp.RowwiseParallel):
    """torch's `RowwiseParallel` that also splits a `qkernels.QLinear` along K in whole groups, its partial
    products summed before the rescale (W8A8: the int32 accumulators, bit-identical); same arguments."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, QLinear):
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = (Shard(-1),)  # as torch's style sets for nn.Linear
        return _apply_to_qlinear(self, "rowwise", module, device_mesh)


TP_STYLES: dict[str, Any] = {
    "colwise": lambda: ColwiseParallel(),
    "rowwise": lambda: RowwiseParallel(),
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
}
"""HF transformers `tp_plan` names (`config.base_model_tp_plan`) and the style each means (as transformers 5
registers them): colwise output sharded on the last dim, rowwise input sharded and output replicated; `_rep`:
colwise output gathered, rowwise input replicated (each rank takes its slice)."""


def _style(value: Any, fqn: str) -> tp.ParallelStyle:
    if isinstance(value, str):
        if value not in TP_STYLES:
            raise ValueError(f"plan entry {fqn!r}: unknown style {value!r}; qkernels maps the tp_plan names "
                             f"{sorted(TP_STYLES)} (or pass a torch ParallelStyle)")
        return TP_STYLES[value]()
    for stock, ours in ((tp.ColwiseParallel, ColwiseParallel), (tp.RowwiseParallel, RowwiseParallel)):
        if type(value) is stock:  # torch's own style: the same layouts, and QLinear support
            return ours(input_layouts=value.input_layouts[0], output_layouts=value.output_layouts[0],
                        use_local_output=value.use_local_output)
    if isinstance(value, tp.ParallelStyle):
        return value
    raise TypeError(f"plan entry {fqn!r}: {value!r} is neither a tp_plan name nor a torch ParallelStyle")


def parallelize(model: nn.Module, device_mesh: DeviceMesh, plan: Mapping[str, Any]) -> nn.Module:
    """`torch.distributed.tensor.parallel.parallelize_module(model, device_mesh, plan)` for quantized models.

    `plan` maps module names (torch's `*` patterns per name part, e.g. HF's "layers.*.mlp.down_proj") to a
    HF `tp_plan` name (`TP_STYLES`: "colwise", "rowwise", ...) or a ParallelStyle; torch's stock
    `ColwiseParallel` / `RowwiseParallel` become ours with the same layouts (they cannot split a QLinear).
    Returns the model, parallelized in place.
    """
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a dict of module name -> style, got {type(plan).__name__}")
    return tp.parallelize_module(model, device_mesh, {fqn: _style(v, fqn) for fqn, v in plan.items()})
