"""The grouped (ragged) quantized matmul of mixture-of-experts layers, defined once for every framework.

    out[m, :] = recipe matmul of lhs[m, :] with expert e's weight rhs[e]   for start_e <= m < end_e
    out[m, :] = 0                                                          for m >= sum(group_sizes)

Expert e owns the contiguous rows `[start_e, end_e)`, `start_e = group_sizes[0] + ... + group_sizes[e-1]`,
`end_e = start_e + group_sizes[e]`, both cut at M: the semantics of `jax.lax.ragged_dot` (and of
`torch._grouped_mm` with `offs = cumsum(group_sizes)`, except that torch leaves the rows past the last
offset undefined where these are zero). Each row is one row of the dense canonical problem
(`Recipe.matmul`: activations quantized per token, weights per expert), so a grouped call equals a
loop of the dense op over the experts, bit for bit wherever the dense op is exact (W8A8, W4A8).

Two executions of the same definition, written against `numerics.ArrayOps`:

- `ragged_matmul` (and `ragged_accumulators`): every expert's dense matmul over all rows, each row kept
  from its own expert (`ops.where`). It needs no host-known sizes, so it runs traced (`xla`) and is
  what the reference executes; it costs E dense matmuls over all M rows (E times the work of the
  segments; `bench/moe_cases.py` times it against `lax.ragged_dot`).
- `segment_outputs`: host-known sizes (`check_group_sizes`), one dense matmul per non-empty expert on
  its own rows; the caller concatenates (`torch-cpu`). Same rows, same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from qkernels.formats import QOperand, Recipe
from qkernels.numerics import ArrayOps

__all__ = ["Segment", "check_group_sizes", "segments", "expert", "rows", "ragged_matmul", "ragged_accumulators",
           "segment_outputs", "offsets_to_sizes"]


class Segment(NamedTuple):
    """The rows `[start, stop)` of one expert with at least one row."""

    expert: int
    start: int
    stop: int


def check_group_sizes(sizes: Sequence[Any], m: int, groups: int) -> tuple[int, ...]:
    """Host-known group sizes as ints, refused (with the fix) where they cannot describe M rows of E experts.

    A group sum above M is refused here (where it can be seen); traced executions cut it at M, as
    `lax.ragged_dot` does.
    """
    sizes = tuple(int(s) for s in np.asarray(sizes).reshape(-1))
    if len(sizes) != groups:
        raise ValueError(f"group_sizes has {len(sizes)} entries but the weight holds {groups} experts; "
                         f"pass one size per expert")
    bad = [(e, s) for e, s in enumerate(sizes) if s < 0]
    if bad:
        raise ValueError(f"group_sizes[{bad[0][0]}]={bad[0][1]} is negative; each entry is a row count (>= 0)")
    if sum(sizes) > m:
        raise ValueError(f"group_sizes sum to {sum(sizes)} rows but lhs has M={m}; the sizes must count at most "
                         f"M rows (rows past their sum are zero)")
    return sizes


def offsets_to_sizes(offsets: Sequence[Any]) -> tuple[int, ...]:
    """`torch._grouped_mm`'s cumulative end offsets -> group sizes, refusing decreasing offsets."""
    ends = [int(o) for o in np.asarray(offsets).reshape(-1)]
    sizes = tuple(b - a for a, b in zip([0, *ends[:-1]], ends))
    if any(s < 0 for s in sizes):
        raise ValueError(f"offsets {ends} decrease; they are cumulative end rows (offs[e] = rows of experts 0..e), "
                         f"non-decreasing, e.g. torch.cumsum(group_sizes, 0, dtype=torch.int32)")
    return sizes


def segments(sizes: Sequence[int]) -> tuple[Segment, ...]:
    """The non-empty experts' row ranges, in order."""
    out, start = [], 0
    for e, s in enumerate(sizes):
        if s:
            out.append(Segment(e, start, start + s))
        start += s
    return tuple(out)


def expert(rhs: QOperand, e: Any) -> QOperand:
    """Expert `e`'s dense (N, K_stored) weight of an (E, N, K_stored) operand."""
    return QOperand(*(None if a is None else a[e] for a in rhs))


def rows(lhs: Any, start: int, stop: int) -> Any:
    """Rows `[start, stop)` of float activations or of a per-row quantized operand."""
    if isinstance(lhs, QOperand):
        return QOperand(lhs.qvalue[start:stop], lhs.scale[start:stop])
    return lhs[start:stop]


def _row_masks(ops: ArrayOps, group_sizes: Any, m: int, groups: int) -> list[Any]:
    """Per expert, a bool (M,) mask of its rows (traceable: the sizes may be traced)."""
    ends = ops.cast(group_sizes, "int32").cumsum(0)
    starts = ends - ops.cast(group_sizes, "int32")
    row = ops.cast(ops.asarray(np.arange(m, dtype=np.int32)), "int32")
    return [(row >= starts[e]) & (row < ends[e]) for e in range(groups)]


def _select(ops: ArrayOps, masks: list[Any], per_expert: Any, zero: Any) -> Any:
    out = zero
    for mask, y in zip(masks, per_expert):
        out = ops.where(mask.reshape(mask.shape[0], *([1] * (y.ndim - 1))), y, out)
    return out


def ragged_matmul(recipe: Recipe, ops: ArrayOps, lhs: Any, rhs: QOperand, group_sizes: Any, *, k: int,
                  act_dtype: str, out_dtype: str) -> Any:
    """The definition: (M, N) in `out_dtype`; lhs (M, K) float or per-row quantized, rhs (E, N, K_stored)."""
    lhs = recipe.accumulation.lhs_operand(recipe, ops, lhs)  # per token: once for every expert
    m, groups = (lhs.qvalue if isinstance(lhs, QOperand) else lhs).shape[0], rhs.qvalue.shape[0]
    per_expert = [recipe.matmul(ops, lhs, expert(rhs, e), None, k=k, batched=False, act_dtype=act_dtype,
                                out_dtype=out_dtype) for e in range(groups)]
    zero = ops.cast(ops.broadcast_to(ops.asarray(np.float32(0)), tuple(per_expert[0].shape)), out_dtype)
    return _select(ops, _row_masks(ops, group_sizes, m, groups), per_expert, zero)


def ragged_accumulators(recipe: Recipe, ops: ArrayOps, lhs: Any, rhs: QOperand, group_sizes: Any, *,
                        k: int) -> Any:
    """The exact integer accumulators of an integer recipe, int32 (M, N) or (M, N, G) per group of K;
    zero past the groups."""
    lhs = recipe.accumulation.lhs_operand(recipe, ops, lhs)
    m, groups = lhs.qvalue.shape[0], rhs.qvalue.shape[0]
    per_expert = [ops.cast(recipe.accumulation.accumulators(recipe, ops, lhs, expert(rhs, e), k=k, batched=False),
                           "int32") for e in range(groups)]
    zero = ops.cast(ops.broadcast_to(ops.asarray(np.int32(0)), tuple(per_expert[0].shape)), "int32")
    return _select(ops, _row_masks(ops, group_sizes, m, groups), per_expert, zero)


def segment_outputs(recipe: Recipe, ops: ArrayOps, lhs: Any, rhs: QOperand, sizes: Sequence[int], *, k: int,
                    act_dtype: str, out_dtype: str) -> list[tuple[Segment, Any]]:
    """Host-known sizes: each non-empty expert's (rows, N) output, in row order (the caller concatenates
    them and zero-fills the rows past the last)."""
    lhs = recipe.accumulation.lhs_operand(recipe, ops, lhs)
    return [(seg, recipe.matmul(ops, rows(lhs, seg.start, seg.stop), expert(rhs, seg.expert), None, k=k,
                                batched=False, act_dtype=act_dtype, out_dtype=out_dtype))
            for seg in segments(sizes)]


# --- the NumPy reference of the ragged op (registered by `qkernels.reference.register`) -----------------


def _reference_operands(call: Any, lhs: Any, rhs: QOperand, group_sizes: Any) -> tuple[Any, QOperand, Any]:
    from qkernels import numerics, reference

    p = call.problem
    if not isinstance(lhs, QOperand):
        lhs = np.asarray(lhs)
        if p.recipe.lhs is not None:
            numerics.check_finite(lhs, "lhs")
    else:
        lhs = QOperand(np.asarray(lhs.qvalue), np.asarray(lhs.scale))
    rhs = QOperand(*(None if a is None else np.asarray(a) for a in rhs))
    reference.codes(expert(rhs, 0), p.recipe.rhs, p.k)  # validates the storage dtype and K
    sizes = np.asarray(check_group_sizes(group_sizes, p.m, p.groups), np.int32)
    return lhs, rhs, sizes


def reference_run(call: Any, lhs: Any, rhs: QOperand, group_sizes: Any) -> np.ndarray:
    """`Implementation.run` of 'reference' for `Op.RAGGED_QMATMUL`: the definition in NumPy."""
    from qkernels.numerics import NUMPY_OPS

    p = call.problem
    lhs, rhs, sizes = _reference_operands(call, lhs, rhs, group_sizes)
    act = "float32" if p.lhs_quantized else p.act_dtype
    return ragged_matmul(p.recipe, NUMPY_OPS, lhs, rhs, sizes, k=p.k, act_dtype=act, out_dtype=p.out_dtype)


def reference_accumulate(call: Any, lhs: Any, rhs: QOperand, group_sizes: Any) -> np.ndarray:
    """`Implementation.accumulate` of 'reference' for `Op.RAGGED_QMATMUL`: exact int32 accumulators."""
    from qkernels.numerics import NUMPY_OPS

    p = call.problem
    lhs, rhs, sizes = _reference_operands(call, lhs, rhs, group_sizes)
    return ragged_accumulators(p.recipe, NUMPY_OPS, lhs, rhs, sizes, k=p.k)
