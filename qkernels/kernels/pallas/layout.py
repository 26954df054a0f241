"""Wrapper-side layout for the Pallas kernels: block fitting, padding, the int4 lhs order, and the
TPU kernels' scale layouts (`ScaleLayout`) with their prepacked form (`Prepacked`).

Kernels see block-multiple arrays only; this module pads (zeros, which change no dot and no scale
group: padded weight codes are 0) and slices the result back. It also holds the in-kernel int4
unpack, shared by the TPU and GPU kernels.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import ManualAxisType

__all__ = ["fit_block", "pad_axis", "even_odd", "unpack_nibbles", "Canonical", "canonicalize", "out_struct",
           "ScaleOrder", "ScaleLayout", "Prepacked"]


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


class ScaleOrder(enum.Enum):
    """How the TPU int4 kernels read per-group scales (and zero points) of one K block.

    Mosaic needs a block's last two dims to be multiples of (8, 128) or the array's full dims, and a
    K block holds only `block_k / group` groups, so the canonical (B_w, N, G) cannot be cut into
    blocks directly: the groups of each K block become a full-extent axis of their own.
    """

    GROUP_MAJOR = "group-major"  # (B_w, K blocks, groups per block, Np): a row of N scales per group (W4A8)
    CHANNEL_MAJOR = "channel-major"  # (B_w, K blocks, Np, groups per block): a column per group (W4A16)


@dataclass(frozen=True, kw_only=True, slots=True)
class ScaleLayout:
    """The scale layout one TPU int4 kernel call reads: fixed by its `ScaleOrder`, the group size, the
    K block and the padded N and K (so by the config's block_n / block_k and the weight's N, K).
    A layout never changes numerics: it moves f32 values, padding with zeros that scale padded codes."""

    order: ScaleOrder
    group: int
    block_k: int
    n_padded: int
    k_padded: int

    @property
    def name(self) -> str:
        """'channel-major-bk1024-g128-Np4096-Kp4096'."""
        return f"{self.order.value}-bk{self.block_k}-g{self.group}-Np{self.n_padded}-Kp{self.k_padded}"

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        """Canonical (B_w, N, G) scales or zero points -> this layout, f32."""
        bw = x.shape[0]
        n_kb, gpb = self.k_padded // self.block_k, self.block_k // self.group
        x = pad_axis(pad_axis(x.astype(jnp.float32), 1, self.n_padded), 2, self.k_padded // self.group)
        if self.order is ScaleOrder.GROUP_MAJOR:
            return jnp.swapaxes(x, 1, 2).reshape(bw, n_kb, gpb, self.n_padded)
        return jnp.swapaxes(x.reshape(bw, self.n_padded, n_kb, gpb), 1, 2)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["scale", "zero_point"], meta_fields=["layout"])
@dataclass(frozen=True, slots=True)
class Prepacked:
    """A weight's scales (and zero points) already in one kernel `layout`: made once (`qk.prepack`),
    carried as pytree leaves beside the canonical ones, so a jit'ed call reads them as inputs instead
    of relaying the canonical scales out in its graph. Invariant: `scale == layout.apply(canonical)`."""

    layout: ScaleLayout
    scale: jax.Array
    zero_point: jax.Array | None = None

    @classmethod
    def of(cls, layout: ScaleLayout, scale: jnp.ndarray, zero_point: jnp.ndarray | None) -> Prepacked:
        return cls(layout, layout.apply(scale), None if zero_point is None else layout.apply(zero_point))

    @staticmethod
    def find(packed: Any, layout: ScaleLayout, batch: int | None = None) -> Prepacked | None:
        """The entry of `packed` (a sequence of `Prepacked`, or None) in `layout` (and for a weight of
        `batch` batch entries, where given: a shard of a batched weight has fewer), else None."""
        return next((p for p in packed or () if isinstance(p, Prepacked) and p.layout == layout
                     and (batch is None or p.scale.shape[0] == batch)), None)
