"""'torch-cpu-packed': weight-only recipes on CPU with bfloat16 activations, through torch's mixed-dtype
GEMMs on a packed weight layout made once per weight and cached, priority 60 (above 'torch-cpu').

The generic 'torch-cpu' path dequantizes the whole weight on every call (`(f32(q) - zero) * scale`, then
a bf16 GEMM): at M=1 that costs ~15x an f32 `F.linear` of the same shape. torch ships CPU kernels that
read the codes directly: `torch._weight_int8pack_mm` (bf16 x int8, per-channel scale) and
`torch._weight_int4pack_mm_for_cpu` (bf16 x int4, per-group scale and zero). Each wants its own layout
(`Layout`), made here from the canonical `QOperand` on first use and cached against the weight's tensors
(`packed`), never per call. The canonical layout stays what is stored, saved and loaded.

| layout         | recipes                      | made from the canonical operand                          |
|----------------|------------------------------|----------------------------------------------------------|
| `int8-rows`    | W8A16 (per-channel int8)     | the (N, K) int8 codes as they are; scales as bf16 (N,)   |
| `int4pack-cpu` | W4A16 g32/64/128/256 (int4, uint4 + zero point) | `_convert_weight_to_int4pack_for_cpu(q + 8)` (N, K/2) uint8; (K/g, N, 2) bf16 [scale, zero] with `w = (q + 8 - 8) * scale + zero` |

Numerics (weight-only recipes are accurate, not bit-exact, DESIGN.md section 4): the kernels accumulate
in f32 and round once to bf16 like the reference, but apply the scale as bf16 (relative error 2**-9,
the same as the reference's rounding of each dequantized weight to bf16) and, for zero points, the
per-group offset `(8 - z) * scale` rounded to bf16. Both stay inside `qkernels.testing.tolerances`
(checked by the conformance suite on every shape it runs here); the bias is added in f32 to the bf16
product and rounded once more.

Served: CPU, bfloat16 activations and output (float32 activations are 10-100x slower in these kernels
and fp16 ~10x, torch 2.13: those stay on 'torch-cpu'), 2-D weights, and the kernels' shape rules:
K a multiple of 16 for `int8-rows` (other K crash or return garbage, torch 2.13), N a multiple of 16
and a group size of 32-256 for `int4pack-cpu`. Memory: the packed int4 form is a second copy of the
codes (0.5 byte per weight; with the canonical codes 1 byte, still half of bf16); the int8 form
shares the canonical codes.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qkernels import dispatch
from qkernels.dispatch import Bound, Problem
from qkernels.formats import QOperand, Recipe

__all__ = ["register", "supports", "SERVES", "Layout", "LAYOUTS", "layout_of", "packed"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    """A backend-specific form of a quantized weight: `make(operand, recipe, k)` builds it (once per
    weight, `packed`), `matmul(x, packed, recipe)` multiplies bf16 `x (M, K)` by it (None for a layout
    whose implementation multiplies itself, e.g. 'torch-cpu-w4a8''s unpacked codes)."""

    name: str
    kernel: str
    tag: str
    supports: Callable[[Problem], str | None]
    make: Callable[[QOperand, Recipe, int], tuple[torch.Tensor, ...]]
    matmul: Callable[[torch.Tensor, tuple[torch.Tensor, ...], Recipe], torch.Tensor] | None = None


def _int8_rows_supports(problem: Problem) -> str | None:
    if problem.k % 16 or problem.k == 0:
        return f"K={problem.k}: torch._weight_int8pack_mm needs K a positive multiple of 16 (other K crash, torch 2.13)"
    return None


def _int8_rows_make(rhs: QOperand, recipe: Recipe, k: int) -> tuple[torch.Tensor, ...]:
    return rhs.qvalue.contiguous(), rhs.scale.to(torch.bfloat16)


def _int8_rows_matmul(x: torch.Tensor, packed: tuple[torch.Tensor, ...], recipe: Recipe) -> torch.Tensor:
    return torch._weight_int8pack_mm(x, *packed)


INT4PACK_GROUPS = (32, 64, 128, 256)
_INNER_K_TILES = 2


def _int4pack_supports(problem: Problem) -> str | None:
    g = problem.recipe.group_size
    if g not in INT4PACK_GROUPS:
        return f"group size {g}: torch's int4pack CPU kernel takes {', '.join(map(str, INT4PACK_GROUPS))}"
    if problem.n % 16:
        return f"N={problem.n}: torch's int4pack CPU layout needs N a multiple of 16"
    return None


def _int4pack_make(rhs: QOperand, recipe: Recipe, k: int) -> tuple[torch.Tensor, ...]:
    """Codes as unsigned nibbles `q + 8` (signed int4) or `q` (uint4), packed by torch; per group
    `[scale, zero]` with `w = (u - 8) * scale + zero`: zero = 0 for signed codes, `(8 - z) * scale` with a
    zero point z (`(u - z) * s = (u - 8) * s + (8 - z) * s`)."""
    from torch_bindings.qtensor import codes

    fmt = recipe.rhs
    q = codes(rhs, fmt).to(torch.int32)
    if fmt.zero_point:
        zero = (8.0 - rhs.zero_point.to(torch.float32)) * rhs.scale
    else:
        q = q + 8
        zero = torch.zeros_like(rhs.scale)
    weight = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), _INNER_K_TILES)
    scales_and_zeros = torch.stack([rhs.scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return weight, scales_and_zeros


def _int4pack_matmul(x: torch.Tensor, packed: tuple[torch.Tensor, ...], recipe: Recipe) -> torch.Tensor:
    weight, scales_and_zeros = packed
    k_padded = weight.shape[1] * 2
    if x.shape[1] != k_padded:  # K padded to the group size: zero activations meet the zero padding codes
        x = torch.nn.functional.pad(x, (0, k_padded - x.shape[1]))
    return torch._weight_int4pack_mm_for_cpu(x, weight, recipe.group_size, scales_and_zeros)


LAYOUTS: tuple[Layout, ...] = (
    Layout(name="int8-rows", kernel="torch._weight_int8pack_mm", tag="w8a16", supports=_int8_rows_supports,
           make=_int8_rows_make, matmul=_int8_rows_matmul),
    Layout(name="int4pack-cpu", kernel="torch._weight_int4pack_mm_for_cpu", tag="w4a16",
           supports=_int4pack_supports, make=_int4pack_make, matmul=_int4pack_matmul),
)
_BY_TAG = {layout.tag: layout for layout in LAYOUTS}


def layout_of(recipe: Recipe) -> Layout | None:
    return _BY_TAG.get(recipe.tag)


# The cache: id(qvalue) -> (weakref to qvalue, stamp, packed). The stamp (layout, and each operand tensor's
# storage and version counter) changes when a tensor is replaced or written in place (load_state_dict
# copies into the buffers), so a stale packed form is never used; the entry dies with its qvalue.
_CACHE: dict[int, tuple[weakref.ref, tuple[Any, ...], tuple[torch.Tensor, ...]]] = {}


def _stamp(layout: Layout, rhs: QOperand) -> tuple[Any, ...]:
    def one(t: torch.Tensor | None) -> tuple[Any, ...] | None:
        if t is None:
            return None
        try:
            version = t._version
        except RuntimeError:  # inference tensors keep no version counter: they cannot be written outside it
            version = None
        return t.data_ptr(), version, tuple(t.shape), t.dtype

    return (layout.name, *map(one, rhs))


def packed(layout: Layout, rhs: QOperand, recipe: Recipe, k: int) -> tuple[torch.Tensor, ...]:
    """`rhs` in `layout`: made on the first call for this weight, then read from the cache."""
    key, stamp = id(rhs.qvalue), _stamp(layout, rhs)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is rhs.qvalue and hit[1] == stamp:
        return hit[2]
    with torch.no_grad():
        value = tuple(t.detach() for t in layout.make(rhs, recipe, k))

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _CACHE.get(key, (None,))[0] is ref:
            del _CACHE[key]

    _CACHE[key] = (weakref.ref(rhs.qvalue, forget), stamp, value)
    return value


SERVES = dispatch.Serves.tags(*(layout.tag for layout in LAYOUTS))


def supports(problem: Problem) -> str | None:
    if problem.platform != "cpu":
        return f"runs on CPU tensors only (platform is {problem.platform})"
    if problem.batch is not None:
        return "batched (3-D) weights are not supported"
    if problem.act_dtype != "bfloat16" or problem.out_dtype != "bfloat16":
        return (f"activations {problem.act_dtype} -> {problem.out_dtype}: torch's packed CPU kernels are fast for "
                f"bfloat16 only (cast the activations, or the model, to bfloat16)")
    layout = layout_of(problem.recipe)
    return layout.supports(problem) if layout is not None else f"no packed layout for {problem.recipe.name}"


def _note(problem: Problem) -> str:
    layout = layout_of(problem.recipe)
    return f"layout {layout.name}: {layout.kernel}, packed once per weight"


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return y
    # bf16 + bf16 is computed in f32 and rounded once, as the f32 sum then cast
    return y + bias if bias.dtype == torch.bfloat16 else (y.to(torch.float32) + bias).to(torch.bfloat16)


def _run(call: Bound, lhs: torch.Tensor, rhs: QOperand, bias: torch.Tensor | None) -> torch.Tensor:
    p = call.problem
    layout = layout_of(p.recipe)
    lead = lhs.shape[:-1]
    y = layout.matmul(lhs.reshape(-1, p.k) if p.k else lhs.reshape(math.prod(lead), 0),
                      packed(layout, rhs, p.recipe, p.k), p.recipe)
    return _add_bias(y, bias).reshape(*lead, p.n)


def _prepare(call: Bound, rhs: QOperand, bias: torch.Tensor | None):
    """`Implementation.prepare`: `_run` with the layout and sizes fixed; the packed form is still looked up
    per call (`packed`: rebuilt where the weight's tensors changed)."""
    p = call.problem
    if p.k == 0:
        return None
    layout, recipe, n, k = layout_of(p.recipe), p.recipe, p.n, p.k
    matmul = layout.matmul

    def run(x: torch.Tensor) -> torch.Tensor:
        return _add_bias(matmul(x.view(-1, k), packed(layout, rhs, recipe, k), recipe), bias).view(*x.shape[:-1], n)

    return run


def register() -> None:
    dispatch.register(dispatch.Implementation(
        name="torch-cpu-packed", framework="torch", priority=60, supports=supports, run=_run, prepare=_prepare,
        serves=SERVES, note=_note,
        description="torch on CPU, bf16 activations: packed int8 / int4 weight GEMMs (layout made once per weight)"))
