"""Pallas TPU (Mosaic) kernels: W8A8 (int8 MXU), W4A16 and W4A8 (int4 packed along K), FP8.

Grid (batch, M blocks, N blocks, K blocks), K innermost and sequential ("arbitrary"): the
accumulator lives in a VMEM scratch, is zeroed on the first K step and rescaled, biased and cast
on the last (DESIGN.md section 4 order). Arguments are canonical 3-D arrays (see `ops.py`); the
wrappers here pad every axis to a block multiple and slice the result back. `raw=True` returns
the integer accumulators instead (int32 (B, M, N) for W8A8; int32 per group (B, M, N, G) for
W4A8) so that tests can compare them with the reference exactly.

FP8 is W8A8's kernel on float8_e4m3fn codes with an f32 accumulator (every product of two e4m3
codes is exact in f32, so only the order of the f32 sum differs from the reference). Mosaic lowers
the fp8 dot for v5e, v6e, v5p and v7x (compiled through libtpu 0.0.42, jax 0.10.2), but only v7's MXU
multiplies fp8, so `qkernels.kernels.pallas.supports_tpu` refuses FP8 on the generations with tables
(`hardware.TPU_FP8_MXU`) and the kernel runs interpreted (tests) until a generation with an fp8 MXU gets one.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qkernels.kernels.pallas.configs import TileConfig
from qkernels.kernels.pallas.layout import (Prepacked, ScaleLayout, ScaleOrder, even_odd, fit_block, out_struct,
                                            pad_axis, unpack_nibbles)

__all__ = ["w8a8", "w4a16", "w4a8", "fp8", "scale_layout"]

_NT = (((1,), (1,)), ((), ()))  # contract the last axis of both tiles: [bm, bk] x [bn, bk] -> [bm, bn]
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _params() -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=_SEMANTICS)


def _acc_dtype(codes: Any) -> Any:
    """The exact accumulator of a dot of one-byte codes: int32 for int8, f32 for float8 (exact products)."""
    return jnp.int32 if jnp.issubdtype(codes.dtype, jnp.integer) else jnp.float32


def _rowwise_kernel(a_ref, w_ref, sa_ref, sw_ref, *rest, has_bias: bool, raw: bool):
    """One (batch, i, j) output tile of W8A8 or FP8, accumulated over the K grid axis.

    a_ref:   (block_m, block_k) int8 or float8_e4m3fn activation codes, VMEM.
    w_ref:   (block_n, block_k) weight codes of the same type, VMEM.
    sa_ref:  (block_m, 1) f32 per-token scales, VMEM.
    sw_ref:  (1, block_n) f32 per-channel scales, VMEM.
    b_ref:   (1, block_n) f32 bias, VMEM (only when has_bias).
    o_ref:   (block_m, block_n) output (int32 accumulators when raw), VMEM.
    acc_ref: (block_m, block_n) scratch accumulator, int32 (int8 codes) or f32 (fp8 codes), VMEM.
    """
    b_ref, o_ref, acc_ref = rest if has_bias else (None, *rest)
    k = pl.program_id(3)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += jax.lax.dot_general(a_ref[...], w_ref[...], _NT, preferred_element_type=acc_ref.dtype)

    @pl.when(k == pl.num_programs(3) - 1)
    def _epilogue():
        if raw:
            o_ref[...] = acc_ref[...]
            return
        # accumulator -> f32, rhs (weight) scale then lhs scale, then bias: the contract's order
        y = (acc_ref[...].astype(jnp.float32) * sw_ref[...]) * sa_ref[...]  # [bm, bn]
        if has_bias:
            y = y + b_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


def _int4_kernel(a_ref, w_ref, s_ref, *rest, group: int, has_zero: bool, lhs_int: bool, has_bias: bool,
                 raw: bool):
    """One (batch, i, j) output tile of an int4-weight matmul, accumulated over the K grid axis.

    a_ref:   (block_m, block_k) activations in even/odd order within the block (`layout.even_odd`):
             float (W4A16) or int8 codes (W4A8), VMEM.
    w_ref:   (block_n, block_k / 2) int8 packed weights (low nibble even k), VMEM.
    s_ref:   W4A16 (block_n, groups_per_block) f32 group scales; W4A8 (groups_per_block, block_n), VMEM.
    z_ref:   (block_n, groups_per_block) f32 zero points (uint4 only), VMEM.
    sa_ref:  (block_m, 1) f32 per-token scales (W4A8 only), VMEM.
    b_ref:   (1, block_n) f32 bias (only when has_bias), VMEM.
    o_ref:   (block_m, block_n) output; raw W4A8: (groups_per_block, block_m, block_n) int32, VMEM.
    acc_ref: (block_m, block_n) f32 scratch accumulator, VMEM.
    """
    rest = list(rest)
    z_ref = rest.pop(0) if has_zero else None
    sa_ref = rest.pop(0) if lhs_int else None
    b_ref = rest.pop(0) if has_bias else None
    o_ref, acc_ref = rest
    k = pl.program_id(3)
    half = w_ref.shape[1]  # block_k / 2
    per_group = group // 2  # codes of one group in each nibble half
    n_groups = half // per_group

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    lo, hi = unpack_nibbles(w_ref[...], signed=not has_zero)  # [bn, bk/2] int32 each
    a = a_ref[...]  # [bm, bk]: even k in [:, :half], odd k in [:, half:]
    if lhs_int:
        # W4A8: one exact int32 partial per group, scaled into f32 in group order (DESIGN.md 4).
        lo8, hi8 = lo.astype(jnp.int8), hi.astype(jnp.int8)
        y = acc_ref[...]
        for t in range(n_groups):
            c = slice(t * per_group, (t + 1) * per_group)
            d = slice(half + t * per_group, half + (t + 1) * per_group)
            p = (jax.lax.dot_general(a[:, c], lo8[:, c], _NT, preferred_element_type=jnp.int32)
                 + jax.lax.dot_general(a[:, d], hi8[:, c], _NT, preferred_element_type=jnp.int32))  # [bm, bn]
            if raw:
                o_ref[t] = p
            else:
                y = y + p.astype(jnp.float32) * s_ref[t:t + 1, :]
        acc_ref[...] = y
    else:
        # W4A16: w = (f32(q) - zero) * scale in the activation dtype, one float MMA per nibble half.
        # group of each lane; lax.div (not //, whose sign fix-up queries the device) as lanes are >= 0
        gid = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, lo.shape, 1), jnp.int32(per_group))  # [bn, bk/2]
        s = jnp.zeros(lo.shape, jnp.float32)
        z = jnp.zeros(lo.shape, jnp.float32)
        for t in range(n_groups):
            s = jnp.where(gid == t, s_ref[:, t:t + 1], s)
            if has_zero:
                z = jnp.where(gid == t, z_ref[:, t:t + 1], z)
        w_lo = ((lo.astype(jnp.float32) - z) * s).astype(a.dtype)  # [bn, bk/2]
        w_hi = ((hi.astype(jnp.float32) - z) * s).astype(a.dtype)
        acc_ref[...] += (
            jax.lax.dot_general(a[:, :half], w_lo, _NT, preferred_element_type=jnp.float32)
            + jax.lax.dot_general(a[:, half:], w_hi, _NT, preferred_element_type=jnp.float32))

    if not raw:
        @pl.when(k == pl.num_programs(3) - 1)
        def _epilogue():
            y = acc_ref[...]  # [bm, bn] f32
            if lhs_int:
                y = y * sa_ref[...]
            if has_bias:
                y = y + b_ref[...]
            o_ref[...] = y.astype(o_ref.dtype)


def _blocks(config: TileConfig, m: int, n: int, k: int, k_align: int) -> tuple[int, int, int, int, int, int]:
    bm, mp = fit_block(m, config.block_m, 32)
    bn, np_ = fit_block(n, config.block_n, 128)
    bk, kp = fit_block(k, config.block_k, k_align)
    return bm, mp, bn, np_, bk, kp


def _rhs_index(batched: bool):
    return (lambda b, i, j, k: (b, j, k)) if batched else (lambda b, i, j, k: (0, j, k))


def _rowwise_call(a_q, a_scale, w_q, w_scale, bias, *, out_dtype: Any, config: TileConfig, interpret: Any,
                  raw: bool, name: str):
    batch, m, k = a_q.shape
    acc = _acc_dtype(a_q)
    n = w_q.shape[1]
    bm, mp, bn, np_, bk, kp = _blocks(config, m, n, k, 128)
    a_q = pad_axis(pad_axis(a_q, 1, mp), 2, kp)
    w_q = pad_axis(pad_axis(w_q, 1, np_), 2, kp)
    sa = pad_axis(a_scale, 1, mp)[..., None]  # (B, Mp, 1)
    sw = pad_axis(w_scale, 1, np_)[:, None, :]  # (B_w, 1, Np)
    rhs_ix = _rhs_index(w_q.shape[0] == batch and batch > 1)
    in_specs = [
        pl.BlockSpec((None, bm, bk), lambda b, i, j, k: (b, i, k)),
        pl.BlockSpec((None, bn, bk), rhs_ix),
        pl.BlockSpec((None, bm, 1), lambda b, i, j, k: (b, i, 0)),
        pl.BlockSpec((None, 1, bn), lambda b, i, j, k: (rhs_ix(b, i, j, k)[0], 0, j)),
    ]
    args = [a_q, w_q, sa, sw]
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, bn), lambda b, i, j, k: (0, j)))
        args.append(pad_axis(bias.astype(jnp.float32), 0, np_)[None, :])
    out = pl.pallas_call(
        functools.partial(_rowwise_kernel, has_bias=bias is not None, raw=raw),
        grid=(batch, mp // bm, np_ // bn, kp // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, bn), lambda b, i, j, k: (b, i, j)),
        out_shape=out_struct((batch, mp, np_), acc if raw else out_dtype, args),
        scratch_shapes=[pltpu.VMEM((bm, bn), acc)],
        compiler_params=_params(),
        interpret=interpret,
        name=name,
    )(*args)
    return out[:, :m, :n]


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret", "raw"))
def w8a8(a_q, a_scale, w_q, w_scale, bias, *, out_dtype: Any, config: TileConfig, interpret: Any = False,
         raw: bool = False):
    """int8 (B, M, K) x int8 (B_w, N, K) with per-row scales (B, M), (B_w, N); B_w in {1, B}."""
    return _rowwise_call(a_q, a_scale, w_q, w_scale, bias, out_dtype=out_dtype, config=config, interpret=interpret,
                         raw=raw, name="qk_w8a8")


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def fp8(a_q, a_scale, w_q, w_scale, bias, *, out_dtype: Any, config: TileConfig, interpret: Any = False):
    """float8_e4m3fn (B, M, K) x float8_e4m3fn (B_w, N, K) with per-row scales (B, M), (B_w, N); B_w in {1, B}."""
    return _rowwise_call(a_q, a_scale, w_q, w_scale, bias, out_dtype=out_dtype, config=config, interpret=interpret,
                         raw=False, name="qk_fp8")


def _int4_blocks(config: TileConfig, m: int, n: int, k_stored: int, group: int):
    """`_blocks` of an int4 call: block_k a multiple of the group (tiles never straddle one) and of 256
    (128 packed lanes); K is the stored one (weights are padded to the group size at quantization)."""
    kp_logical = 2 * k_stored
    blocks = _blocks(config, m, n, kp_logical, max(256, group))
    if blocks[4] % group:
        raise ValueError(f"K={kp_logical} with group_size={group}: no block of K fits whole groups; "
                         f"this is a bug in block fitting, please report it")
    return blocks


def scale_layout(config: TileConfig, n: int, k_stored: int, group: int, *, lhs_int: bool) -> ScaleLayout:
    """The `ScaleLayout` an int4 call with `config` reads (W4A8: group-major, W4A16: channel-major) for a
    weight of N rows and `k_stored` packed bytes per row; independent of M."""
    _, _, _, np_, bk, kp = _int4_blocks(config, 1, n, k_stored, group)
    order = ScaleOrder.GROUP_MAJOR if lhs_int else ScaleOrder.CHANNEL_MAJOR
    return ScaleLayout(order=order, group=group, block_k=bk, n_padded=np_, k_padded=kp)


def _int4_call(a, w_q, w_scale, w_zero, a_scale, bias, packed, *, group: int, out_dtype: Any, config: TileConfig,
               interpret: Any, raw: bool):
    batch, m, k = a.shape
    n = w_q.shape[1]
    bm, mp, bn, np_, bk, kp = _int4_blocks(config, m, n, w_q.shape[2], group)
    gpb = bk // group
    lhs_int = a_scale is not None
    # the scales in this call's layout: prepacked once (`Prepacked`, qk.prepack), else relaid out here
    layout = scale_layout(config, n, w_q.shape[2], group, lhs_int=lhs_int)
    pre = Prepacked.find(packed, layout, w_scale.shape[0]) or Prepacked.of(layout, w_scale, w_zero)
    a = even_odd(pad_axis(pad_axis(a, 1, mp), 2, kp), bk)
    w_q = pad_axis(pad_axis(w_q, 1, np_), 2, kp // 2)
    rhs_ix = _rhs_index(w_q.shape[0] == batch and batch > 1)
    in_specs = [pl.BlockSpec((None, bm, bk), lambda b, i, j, k: (b, i, k)),
                pl.BlockSpec((None, bn, bk // 2), rhs_ix)]
    args = [a, w_q]
    if lhs_int:
        in_specs.append(pl.BlockSpec((None, None, gpb, bn), lambda b, i, j, k: (rhs_ix(b, i, j, k)[0], k, 0, j)))
    else:
        in_specs.append(pl.BlockSpec((None, None, bn, gpb), lambda b, i, j, k: (rhs_ix(b, i, j, k)[0], k, j, 0)))
    args.append(pre.scale)
    if w_zero is not None:
        in_specs.append(pl.BlockSpec((None, None, bn, gpb), lambda b, i, j, k: (rhs_ix(b, i, j, k)[0], k, j, 0)))
        args.append(pre.zero_point)
    if lhs_int:
        in_specs.append(pl.BlockSpec((None, bm, 1), lambda b, i, j, k: (b, i, 0)))
        args.append(pad_axis(a_scale, 1, mp)[..., None])
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, bn), lambda b, i, j, k: (0, j)))
        args.append(pad_axis(bias.astype(jnp.float32), 0, np_)[None, :])
    if raw:
        out_spec = pl.BlockSpec((None, gpb, bm, bn), lambda b, i, j, k: (b, k, i, j))
        out_shape = out_struct((batch, kp // group, mp, np_), jnp.int32, args)
    else:
        out_spec = pl.BlockSpec((None, bm, bn), lambda b, i, j, k: (b, i, j))
        out_shape = out_struct((batch, mp, np_), out_dtype, args)
    out = pl.pallas_call(
        functools.partial(_int4_kernel, group=group, has_zero=w_zero is not None, lhs_int=lhs_int,
                          has_bias=bias is not None, raw=raw),
        grid=(batch, mp // bm, np_ // bn, kp // bk),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=_params(),
        interpret=interpret,
        name="qk_w4a8" if lhs_int else "qk_w4a16",
    )(*args)
    if raw:  # (B, G, M, N) -> (B, M, N, G), dropping padded groups
        g_logical = -(-k // group)
        return jnp.moveaxis(out[:, :g_logical, :m, :n], 1, -1)
    return out[:, :m, :n]


@functools.partial(jax.jit, static_argnames=("group", "out_dtype", "config", "interpret"))
def w4a16(a, w_q, w_scale, w_zero, bias, *, group: int, out_dtype: Any, config: TileConfig,
          interpret: Any = False, packed: Any = None):
    """float (B, M, K) x packed int4/uint4 (B_w, N, K_p/2), group scales/zeros (B_w, N, K_p/group).
    `packed`: `layout.Prepacked` forms of the scales; the one in this call's `scale_layout` is read as is."""
    return _int4_call(a, w_q, w_scale, w_zero, None, bias, packed, group=group, out_dtype=out_dtype, config=config,
                      interpret=interpret, raw=False)


@functools.partial(jax.jit, static_argnames=("group", "out_dtype", "config", "interpret", "raw"))
def w4a8(a_q, a_scale, w_q, w_scale, bias, *, group: int, out_dtype: Any, config: TileConfig,
         interpret: Any = False, raw: bool = False, packed: Any = None):
    """int8 (B, M, K) x packed int4 (B_w, N, K_p/2); per-token (B, M) and group (B_w, N, G) scales.
    `packed`: as `w4a16`'s."""
    return _int4_call(a_q, w_q, w_scale, None, a_scale, bias, packed, group=group, out_dtype=out_dtype,
                      config=config, interpret=interpret, raw=raw)
