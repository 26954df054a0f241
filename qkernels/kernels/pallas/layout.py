"""Wrapper-side layout for the Pallas kernels: block fitting, padding, and the int4 lhs order.

Kernels see block-multiple arrays only; this module pads (zeros, which change no dot and no scale
group: padded weight codes are 0) and slices the result back. It also holds the in-kernel int4
unpack, shared by the TPU and GPU kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import ManualAxisType

__all__ = ["fit_block", "pad_axis", "even_odd", "unpack_nibbles", "Canonical", "canonicalize", "out_struct"]


def out_struct(shape: Sequence[int], dtype: Any, operands: Sequence[Any]) -> jax.ShapeDtypeStruct:
    """`out_shape` of a pallas_call on `operands`.

    Inside a `shard_map` that checks varying axes (`check_vma=True`, its default) pallas_call needs
    to be told how its output varies: over every manual mesh axis some operand varies over.
    Elsewhere the annotation is empty and ignored.
    """
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in operands))
    return jax.ShapeDtypeStruct(tuple(shape), dtype, manual_axis_type=ManualAxisType(varying=varying))


def fit_block(dim: int, block: int, align: int) -> tuple[int, int]:
    """(block, padded dim) for one axis.

    A dimension no larger than `block` is one full-extent block (legal on TPU at any size, so M=1
    needs no padding). Otherwise the largest multiple of `align` up to `block` that divides `dim`,
    or, when none does, `block` itself with `dim` padded up to a multiple of it.
    """
    if dim <= block:
        return dim, dim
    for b in range(block - block % align, 0, -align):
        if dim % b == 0 and 4 * b >= block:  # smaller blocks would cost more than padding
            return b, dim
    return block, -(-dim // block) * block


def pad_axis(x: jnp.ndarray, axis: int, size: int) -> jnp.ndarray:
    """Zero-pad axis `axis` of `x` up to `size` (no-op when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def even_odd(x: jnp.ndarray, block: int) -> jnp.ndarray:
    """Reorder the last axis within each `block`: even k first, then odd k.

    Packed int4 byte j holds k = 2j (low nibble) and 2j + 1 (high nibble); with the activation in
    this order a block's dot is `a[:, :block/2] @ lo^T + a[:, block/2:] @ hi^T`, so the kernel never
    interleaves nibbles across lanes.
    """
    *lead, k = x.shape
    x = x.reshape(*lead, k // block, block // 2, 2)
    return jnp.swapaxes(x, -1, -2).reshape(*lead, k)


def unpack_nibbles(packed: jnp.ndarray, *, signed: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(low, high) nibbles of int8 bytes as int32 codes, sign-extended for int4.

    Done in int32: int8 vector shifts do not legalize on TPU (DESIGN.md section 6).
    """
    x = packed.astype(jnp.int32)
    if signed:
        return (x << 28) >> 28, x >> 4  # arithmetic shifts sign-extend each nibble
    return x & 0xF, (x >> 4) & 0xF


@dataclass(frozen=True, kw_only=True, slots=True)
class Canonical:
    """Shapes of a call after canonicalization: lhs (B, M, K), rhs (B_w, N, K_stored), B_w in {1, B}."""

    batch: int
    rhs_batched: bool
    m: int
    n: int
    k: int
    out_shape: tuple[int, ...]  # shape of the result, (..., M, N)


def canonicalize(lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...]) -> Canonical:
    """Fold lhs's leading axes into M for a shared 2-D weight; match batches for a 3-D weight."""
    if len(lhs_shape) < 1 or len(rhs_shape) not in (2, 3):
        raise ValueError(f"lhs shape {lhs_shape} / rhs shape {rhs_shape}: expected lhs (..., M, K) and "
                         f"rhs (N, K_stored) or (B, N, K_stored)")
    k = lhs_shape[-1]
    if len(rhs_shape) == 2:
        lead = tuple(lhs_shape[:-1])
        m = 1
        for d in lead:
            m *= d
        return Canonical(batch=1, rhs_batched=False, m=m, n=rhs_shape[0], k=k, out_shape=(*lead, rhs_shape[0]))
    if len(lhs_shape) != 3 or lhs_shape[0] != rhs_shape[0]:
        raise ValueError(f"batched rhs of shape {rhs_shape} needs lhs (B={rhs_shape[0]}, M, K), got {lhs_shape}; "
                         f"fold extra axes into M or broadcast the weight")
    return Canonical(batch=lhs_shape[0], rhs_batched=True, m=lhs_shape[1], n=rhs_shape[1], k=k,
                     out_shape=(lhs_shape[0], lhs_shape[1], rhs_shape[1]))
