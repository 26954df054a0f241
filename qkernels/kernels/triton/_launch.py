"""What the four matmul launchers share: the one operand check, the config they run, the output they allocate.

Each family module (`w8a8`, `w4a8`, `w4a16`, `w8a16`) has two entry points:

- `<family>_matmul(...)`, public and checked: `check_operands` (driven by the recipe's formats),
  `resolve_config` (the given config or the heuristic's, refused if it cannot run), then the launch.
- `launch_<family>(..., config=)`, unchecked: allocate (`allocate`) and launch. The registered
  implementations (`qkernels.kernels.triton.__init__`) call it with their bound call's config.

A dispatched call is validated once, when it is bound, and never again per call. Each of the public
check's items is covered on the dispatched path (`torch.ops.qkernels.linear`, the one caller of the
registered Triton implementations outside tests) by:

| what                                            | checked by, on the dispatched path                   |
|-------------------------------------------------|------------------------------------------------------|
| ranks (x 2-D, qvalue 2-D), stored K, bias (N,)  | `torch_bindings.ops.bind`, once per distinct call    |
| K within the int32 accumulator bound            | `dispatch.Problem` construction (`recipe.check_k`)   |
| activation and output dtypes                    | `supports` (`Family.reason`), at bind time           |
| platform: sm_80+ / gfx942, or the interpreter   | `supports`, at bind time                             |
| the config runs the problem                     | `tuning.choose` (`heuristics.check`), at bind time   |
| qvalue dtype; scale, zero-point shapes, dtypes  | `torch_bindings.ops.bind` (and the `QTensor` invariant) |
| weight and input on one device                  | `torch_bindings.ops.bind`; bias: `qkernels.linear`   |

The one piece of the public path a launch still does per call is clamping BLOCK_K to the group size
(`MatmulConfig.for_group`, idempotent): how a grouped kernel runs, not a check. A caller of the raw op
that hands it codes and scales of its own making (not a `QTensor`) gets the same checks from `bind`,
except the bias's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkernels.formats import OperandFormat, Recipe
from qkernels.kernels.triton import heuristics
from qkernels.kernels.triton._common import MatmulConfig, Output, arch_of, check_device, device_kind_of
from qkernels.numerics import Granularity

__all__ = ["FLOAT_ACTIVATIONS", "check_operands", "resolve_config", "Views", "allocate"]

FLOAT_ACTIVATIONS = (torch.bfloat16, torch.float16)
"""Activation dtypes of the weight-only recipes: the dtype their float MMA multiplies in."""

_SCALE_DTYPE = torch.float32  # scales of every format (`OperandFormat`)
_ZERO_DTYPE = torch.int8  # zero points of every format


def _storage(fmt: OperandFormat) -> torch.dtype:
    return getattr(torch, fmt.qtype.storage)


def _per_block(fmt: OperandFormat) -> str:
    if fmt.granularity is Granularity.GROUP:
        return f"one per group of {fmt.group_size} along K"
    return f"one per {fmt.granularity.value.removeprefix('per-')}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_scale(name: str, t: torch.Tensor | None, fmt: OperandFormat, shape: tuple[int, ...],
                 dtype: torch.dtype) -> None:
    """`t` is the scale (or zero point) of an operand of logical `shape` (..., K) in `fmt`."""
    expected = tuple(fmt.scale_shape(shape))
    if t is None:
        raise ValueError(f"{name} is missing: {fmt.describe()} weights need one of shape {expected} "
                         f"({_per_block(fmt)})")
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected} ({_per_block(fmt)})")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {_name(t.dtype)}; {fmt.describe()} stores it as {_name(dtype)}: "
                        f"convert it (.to({dtype}))")


def check_operands(recipe: Recipe, lhs: torch.Tensor, lhs_scale: torch.Tensor | None, rhs: torch.Tensor,
                   rhs_scale: torch.Tensor, rhs_zero: torch.Tensor | None, bias: torch.Tensor | None) -> torch.device:
    """Check a launcher's operands against `recipe`'s formats; return their one device.

    lhs (M, K) or (B, M, K): `recipe.lhs`'s storage codes (int8) with `lhs_scale` of
    `recipe.lhs.scale_shape` when the recipe quantizes activations, else bf16 / fp16 as is (the
    MMA dtype) and no scale. rhs (N, K_stored) shared by every batch, or (B, N, K_stored) with a 3-D
    lhs: `recipe.rhs`'s storage, K_stored = `recipe.rhs.stored_k(K)`, `rhs_scale` (f32) and, for
    zero-point formats only, `rhs_zero` (int8) of `recipe.rhs.scale_shape`. bias (N,) or None.
    K within `recipe.check_k`. Raises ValueError / TypeError saying what is wrong and how to fix it.
    """
    name, wfmt = recipe.tag.upper(), recipe.rhs
    kk = "K/2" if wfmt.packed else "K"
    if lhs.dim() not in (2, 3) or rhs.dim() not in (2, 3) or (rhs.dim() == 3 and lhs.dim() != 3):
        raise ValueError(f"lhs {tuple(lhs.shape)} must be (M, K) or (B, M, K) and rhs {tuple(rhs.shape)} "
                         f"(N, {kk}), or (B, N, {kk}) with a 3-D lhs")
    if recipe.lhs is not None:
        if lhs.dtype != _storage(recipe.lhs):
            raise TypeError(f"{name} takes {recipe.lhs.qtype.storage} activation codes, got lhs {_name(lhs.dtype)}; "
                            f"quantize the activations with quantize_rows first")
    elif lhs.dtype not in FLOAT_ACTIVATIONS:
        raise TypeError(f"{name} activations have dtype {_name(lhs.dtype)}; the kernel multiplies in bf16 or fp16: "
                        f"cast them (x.to(torch.bfloat16))")
    if rhs.dtype != _storage(wfmt):
        packing = ", two codes per byte" if wfmt.packed else ""
        raise TypeError(f"rhs has dtype {_name(rhs.dtype)}; {name} weights ({wfmt.describe()}) are stored as "
                        f"{wfmt.qtype.storage}{packing}")
    k, n = lhs.shape[-1], rhs.shape[-2]
    stored = wfmt.stored_k(k)
    if rhs.shape[-1] != stored:
        group = f" with group_size={wfmt.group_size}" if wfmt.group_size else ""
        raise ValueError(f"rhs stores {rhs.shape[-1]} {'bytes' if wfmt.packed else 'codes'} per row but K={k}"
                         f"{group} needs {stored}; the contraction sizes{' or the group size' if group else ''} "
                         f"do not match")
    if lhs.dim() == 3 and rhs.dim() == 3 and rhs.shape[0] != lhs.shape[0]:
        raise ValueError(f"batch sizes differ: lhs {lhs.shape[0]}, rhs {rhs.shape[0]}")
    if recipe.lhs is not None:
        _check_scale("lhs_scale", lhs_scale, recipe.lhs, tuple(lhs.shape), _SCALE_DTYPE)
    logical = (*rhs.shape[:-1], k)
    _check_scale("rhs_scale", rhs_scale, wfmt, logical, _SCALE_DTYPE)
    if wfmt.zero_point:
        _check_scale("rhs_zero", rhs_zero, wfmt, logical, _ZERO_DTYPE)
    elif rhs_zero is not None:
        raise ValueError(f"rhs_zero given but {name} weights ({wfmt.describe()}) are symmetric; drop it")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
    recipe.check_k(k)
    return check_device(lhs, lhs_scale, rhs, rhs_scale, rhs_zero, bias)


def resolve_config(config: MatmulConfig | None, recipe: Recipe, lhs: torch.Tensor, rhs: torch.Tensor,
                   device: torch.device) -> MatmulConfig:
    """The config a checked call runs: `config`, or the heuristic's for the device; ValueError if it cannot
    run (`heuristics.resolve`). Also refuses a device the kernels do not run on (`arch_of`)."""
    m, k = lhs.shape[-2:]
    return heuristics.resolve(config, recipe.tag, arch_of(device), device_kind_of(device), m, rhs.shape[-2], k,
                              recipe.group_size)


@dataclass(frozen=True, slots=True)
class Views:
    """A launch's sizes and batched views: the kernels index every operand (B, ...), B=1 for a 2-D lhs.

    `lhs` (B, M, K), `lhs_scale` (B, M) or None, `out` (B, M, N, ...): the allocated output buffer,
    which `result()` returns in the caller's shape and dtype.
    """

    m: int
    n: int
    k: int
    batches: int
    lhs: torch.Tensor
    lhs_scale: torch.Tensor | None
    out: torch.Tensor
    output: Output

    def result(self) -> torch.Tensor:
        return self.output.result()


def allocate(lhs: torch.Tensor, lhs_scale: torch.Tensor | None, rhs: torch.Tensor, dtype: torch.dtype,
             trailing: tuple[int, ...] = ()) -> Views:
    """The output (B?, M, N, *trailing) in `dtype` on lhs's device, and the batched views of a launch."""
    batched = lhs.dim() == 3
    m, k = lhs.shape[-2:]
    n = rhs.shape[-2]
    nb = lhs.shape[0] if batched else 1
    output = Output(((nb,) if batched else ()) + (m, n, *trailing), dtype, lhs.device)
    if batched:
        return Views(m, n, k, nb, lhs, lhs_scale, output.buffer, output)
    return Views(m, n, k, nb, lhs.unsqueeze(0), None if lhs_scale is None else lhs_scale.unsqueeze(0),
                 output.buffer.unsqueeze(0), output)
