"""Importers: checkpoints that other libraries quantized, mapped into the canonical layout, codes kept.

Each importer reads one layer's tensors as the library writes them and returns an `Imported` layer:
the recipe it maps to, the canonical `QOperand` (DESIGN.md section 3: (N, K_stored), K last, two
4-bit codes per byte, f32 scales, int8 zero points) and the logical (N, K). No dequantize and
requantize happens: every 4-bit code and zero point of the checkpoint is the canonical one, and the
scales are widened exactly (f16/bf16 -> f32). The framework wrappers (`torch_bindings.QTensor`,
`jax_bindings.QArray`) hold the result as they hold their own quantized weights.

| source                                 | tensors (per Linear, out N, in K, groups G)                     | maps to |
|----------------------------------------|-----------------------------------------------------------------|---------|
| GPTQ (AutoGPTQ / GPTQModel, "gptq" v1) | qweight int32 (K/8, N), qzeros int32 (G, N/8) stored as zero-1, scales (G, N), g_idx (K,) | `W4A16(g, zero_point=True)` |
| GPTQ "gptq_v2"                         | as v1, zeros stored as they are                                 | same |
| AWQ (AutoAWQ GEMM)                     | qweight int32 (K, N/8), qzeros int32 (G, N/8), nibbles in order 0 2 4 6 1 3 5 7, scales (G, N) | same |
| compressed-tensors pack-quantized      | weight_packed int32 (N, K/8) (codes + 2**(bits-1)), weight_scale (N, G), weight_zero_point int32 (N/8, G) if asymmetric, weight_shape | same |

All three store 4-bit codes 0..15 with a zero point, and symmetric checkpoints use the code -8
(stored 0) that qkernels' signed int4 never produces; so every import maps to the unsigned format
with a zero point, where the checkpoint's codes are the stored codes and `(code - zero) * scale`
is the library's own dequantization, bit for bit. What cannot be mapped is refused with the reason:
other bit widths, a group size the kernels do not serve, a per-channel (group_size -1) 4-bit layer, and
an act-order `g_idx` whose groups are not contiguous along K (the kernels read groups in K order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qkernels.formats import W4A16, QOperand, Recipe
from qkernels.numerics import GROUP_SIZES, NUMPY_OPS

__all__ = ["Imported", "from_gptq", "from_awq", "from_compressed_tensors", "unpack_int32"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ's GEMM packing: nibble i of an int32 holds column 8c + AWQ_ORDER[i]."""


@dataclass(frozen=True)
class Imported:
    """One imported layer: the recipe, the canonical operand (NumPy) and the logical (N, K)."""

    recipe: Recipe
    operand: QOperand
    shape: tuple[int, int]

    def _canonical(self) -> tuple[Any, Any, Any]:
        """(codes, scales, zero points or None): the canonical leaves (`QOperand.packed` is not imported)."""
        return self.operand.qvalue, self.operand.scale, self.operand.zero_point

    def to_torch(self, device: Any = None) -> Any:
        """The layer as a `QTensor` (what `QLinear.from_qtensor(w, bias)` serves), on `device`."""
        import torch

        from torch_bindings.qtensor import QTensor

        q, s, z = (None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in self._canonical())
        return QTensor(qvalue=q, scale=s, zero_point=z, recipe=self.recipe, shape=self.shape)

    def to_jax(self) -> Any:
        """The layer as a `QArray` of a PyTorch-style (out, in) weight: `contracting_axes=(1,)`."""
        import jax.numpy as jnp

        from jax_bindings.qarray import QArray

        q, s, z = (None if a is None else jnp.asarray(a) for a in self._canonical())
        return QArray(q, s, z, self.recipe, self.shape, jnp.dtype(jnp.float32), (1,))


def unpack_int32(packed: Any, axis: int, bits: int = 4, order: tuple[int, ...] | None = None) -> np.ndarray:
    """The unsigned `bits`-bit fields of int32 words, spread along `axis`: word w's field i (bits
    [i*bits, (i+1)*bits)) becomes position `w * per + i` (per = 32 // bits), or `w * per + order[i]`."""
    p = np.asarray(packed)
    if p.dtype != np.int32:
        raise TypeError(f"packed tensors are int32 words, got {p.dtype}")
    per = 32 // bits
    u = p.view(np.uint32)
    fields = np.stack([(u >> np.uint32(bits * i)) & np.uint32((1 << bits) - 1) for i in range(per)], axis=-1)
    if order is not None:
        inv = np.empty(per, np.int64)
        inv[list(order)] = np.arange(per)
        fields = fields[..., inv]
    axis = axis % p.ndim
    shape = list(p.shape)
    shape[axis] *= per
    return np.moveaxis(fields, -1, axis + 1).reshape(shape).astype(np.int8)


def _groups(g_idx: Any, k: int, group_size: int, source: str) -> None:
    if group_size == -1 or group_size not in GROUP_SIZES:
        raise ValueError(f"{source}: group_size {group_size} is not served; qkernels' 4-bit formats take groups "
                         f"of {GROUP_SIZES} along K (a per-channel 4-bit checkpoint has no qkernels format)")
    if g_idx is None:
        return
    g_idx = np.asarray(g_idx).astype(np.int64)
    if g_idx.shape != (k,):
        raise ValueError(f"{source}: g_idx has shape {g_idx.shape}, expected ({k},) for K={k}")
    if not np.array_equal(g_idx, np.arange(k) // group_size):
        raise ValueError(f"{source}: g_idx is not k // {group_size} (an act-order checkpoint whose groups are "
                         f"not contiguous along K); the kernels read groups in K order. Re-quantize with static "
                         f"groups (GPTQModel static_groups=True, or qkernels' GPTQ with act_order=True, which keeps "
                         f"groups in K order)")


def _canonical(codes_nk: np.ndarray, zeros_ng: np.ndarray, scales_ng: Any, group_size: int, k: int,
               source: str) -> Imported:
    """Codes (N, K) 0..15, zero points (N, G), scales (N, G) -> the W4A16(g, zero_point) layout."""
    recipe = W4A16(group_size, zero_point=True)
    fmt = recipe.rhs
    n = codes_nk.shape[0]
    groups = fmt.padded_k(k) // group_size
    scales = np.asarray(scales_ng)
    if scales.shape != (n, groups) or zeros_ng.shape != (n, groups):
        raise ValueError(f"{source}: scales {scales.shape} / zero points {zeros_ng.shape} do not match (N, G) = "
                         f"({n}, {groups}) for K={k}, group_size={group_size}")
    scale = scales.astype(np.float32)  # f16 / bf16 -> f32 is exact
    if not np.isfinite(scale).all():
        raise ValueError(f"{source}: {int((~np.isfinite(scale)).sum())} NaN/Inf scale(s); the checkpoint is damaged")
    kp = fmt.padded_k(k)
    codes = np.zeros((n, kp), np.int8)
    codes[:, :k] = codes_nk[:, :k]
    return Imported(recipe, QOperand(NUMPY_OPS.pack_nibbles(codes), scale, zeros_ng.astype(np.int8)), (n, k))


def from_gptq(qweight: Any, qzeros: Any, scales: Any, g_idx: Any = None, *, bits: int = 4, group_size: int,
              in_features: int | None = None, checkpoint_format: str = "gptq") -> Imported:
    """A GPTQ layer (AutoGPTQ / GPTQModel tensors) in the canonical W4A16(g, zero_point=True) layout.

    `checkpoint_format` "gptq" (v1, what both libraries save by default) stores each zero point
    minus one (so a zero of 0 reads back as 16, as those libraries' own kernels read it); "gptq_v2"
    stores it as it is. `in_features` (K) defaults to the packed length (8 * qweight rows)."""
    source = "GPTQ"
    if bits != 4:
        raise ValueError(f"{source}: {bits}-bit checkpoints are not mapped; qkernels imports 4-bit GPTQ layers")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"{source}: checkpoint_format {checkpoint_format!r} is not 'gptq' or 'gptq_v2'")
    codes_kn = unpack_int32(qweight, axis=0)
    k = codes_kn.shape[0] if in_features is None else int(in_features)
    if not 0 < k <= codes_kn.shape[0]:
        raise ValueError(f"{source}: in_features={k} but qweight packs {codes_kn.shape[0]} rows")
    _groups(g_idx, k, group_size, source)
    zeros = unpack_int32(qzeros, axis=1).astype(np.int16)[:, : codes_kn.shape[1]]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    return _canonical(codes_kn.T, zeros.T, np.asarray(scales).T, group_size, k, source)


def from_awq(qweight: Any, qzeros: Any, scales: Any, *, bits: int = 4, group_size: int,
             in_features: int | None = None) -> Imported:
    """An AWQ layer (AutoAWQ's GEMM layout) in the canonical W4A16(g, zero_point=True) layout."""
    source = "AWQ"
    if bits != 4:
        raise ValueError(f"{source}: {bits}-bit checkpoints are not mapped; qkernels imports 4-bit AWQ layers")
    codes_kn = unpack_int32(qweight, axis=1, order=AWQ_ORDER)
    k = codes_kn.shape[0] if in_features is None else int(in_features)
    if k != codes_kn.shape[0]:
        raise ValueError(f"{source}: in_features={k} but qweight has {codes_kn.shape[0]} rows")
    _groups(None, k, group_size, source)
    zeros = unpack_int32(qzeros, axis=1, order=AWQ_ORDER)[:, : codes_kn.shape[1]]
    return _canonical(codes_kn.T, zeros.T, np.asarray(scales).T, group_size, k, source)


def from_compressed_tensors(weight_packed: Any, weight_scale: Any, weight_shape: Any, weight_zero_point: Any = None,
                            *, num_bits: int = 4, group_size: int, symmetric: bool | None = None) -> Imported:
    """A compressed-tensors "pack-quantized" layer in the canonical W4A16(g, zero_point=True) layout.

    Codes are stored offset by 2**(num_bits-1) (signed -8..7 as 0..15): that offset becomes the zero
    point of a symmetric layer, and an asymmetric layer's zero point (signed, as stored) is shifted by
    it, so `(stored - zero) * scale` is compressed-tensors' own dequantization. `weight_zero_point` may
    be as saved (int32, packed along N like the codes) or unpacked (signed int8)."""
    source = "compressed-tensors"
    if num_bits != 4:
        raise ValueError(f"{source}: {num_bits}-bit layers are not mapped; qkernels imports 4-bit pack-quantized")
    n, k = (int(v) for v in np.asarray(weight_shape).reshape(-1))
    codes_nk = unpack_int32(weight_packed, axis=1)
    if codes_nk.shape[0] != n or codes_nk.shape[1] < k:
        raise ValueError(f"{source}: weight_packed unpacks to {codes_nk.shape}, which cannot hold weight_shape ({n}, {k})")
    _groups(None, k, group_size, source)
    scales = np.asarray(weight_scale)
    offset = 1 << (num_bits - 1)
    if weight_zero_point is None or symmetric is True:
        zeros = np.full(scales.shape, offset, np.int16)
    elif np.asarray(weight_zero_point).dtype == np.int32:  # packed along N, offset like the codes
        zeros = unpack_int32(weight_zero_point, axis=0).astype(np.int16)[:n]
    else:  # unpacked signed zero points
        zeros = np.asarray(weight_zero_point).astype(np.int16) + offset
    return _canonical(codes_nk, zeros, scales, group_size, k, source)
