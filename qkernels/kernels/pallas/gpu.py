"""Pallas GPU kernels through the Triton lowering (DESIGN.md section 6): W8A8, W4A16, W4A8, FP8, FP8A16.

The Triton grid is parallel, so each program owns one (M, N) tile and loops over K inside the
kernel (`fori_loop`); int4 kernels step one group at a time so a scale covers the whole step.
Same arguments as `tpu.py`; `compiler_params=plgpu.CompilerParams(...)` selects the Triton
lowering (jax 0.10 otherwise picks Mosaic GPU, which cannot lower these dots). FMA contraction
inside Triton is not controllable from Pallas: f32 outputs are compared within tolerance,
accumulators exactly.

fp8 (sm_89 and newer, `hardware.fp8_mma_reason`). FP8 is W8A8's kernel on float8_e4m3fn codes
with an f32 accumulator (exact products; only the f32 summation order differs from the reference);
FP8A16 dequantizes each fp8 weight tile per channel to the activation dtype in the K loop (the
reference's `(f32(q) * s).astype(act)`) and runs a float dot. The lowering emits `tt.dot` on
f8E4M3FN operands; what Triton 3.9 makes of it (jax 0.10.2): on sm_89 the fp8 MMA
(`QMMA.16832.F32.E4M3.E4M3`: this module's fp8 dot compiled for cuda 89 by hand; there is no
pallas-sm_89 AOT target), on sm_90 (`python -m qkernels.aot --target pallas-sm_90`) no wgmma, because Pallas
builds the dot with `max_num_imprecise_acc=0` (jax 0.10 has no way to set it) and Triton takes fp8
wgmma only when it may promote the MMA's reduced-precision running sum into f32 after some
products, so it upcasts the codes to f16 (exact) for `HMMA.16816.F32`: the results are those of an
fp8 MMA with full f32 accumulation, at f16 tensor-core rate. The package's own Triton FP8 kernel
(`kernels/triton/fp8.py`, `max_num_imprecise_acc=BLOCK_K`) is the one that reaches QGMMA on Hopper.

The move off this lowering. jax 0.11 deprecates the Pallas Triton backend (DeprecationWarning id
'jax-pallas-triton' on every lowering: "migrate to the Mosaic GPU backend ... or the official
Triton bindings and jax_triton"), so this module stays thin and behind dispatch, and the GPU path
for JAX moves in three steps, each one a registered implementation that dispatch chooses by
priority, so callers and `qk.explain` see no change of API:
1. JAX on CUDA runs the package's own Triton kernels (`qkernels/kernels/triton/`) through
   `jax_triton.triton_call`: the kernels, configs, tuned tables and AOT check the torch binding
   uses, with W8A8's bit-exact epilogue (`enable_fp_fusion=False`, which Pallas cannot set). It
   serves sm_80 too, which Mosaic GPU does not target.
2. Mosaic GPU kernels (`jax.experimental.pallas.mosaic_gpu`, `plgpu.CompilerParams()` of that
   module) for sm_90 and newer: TMA copies into shared memory with barriers
   (`plgpu.copy_gmem_to_smem`, `plgpu.emit_pipeline`), warpgroup MMA (`plgpu.wgmma`) for the bf16
   and int8 tiles, the same (M, N) grid and the rescale order of DESIGN.md section 4; checked
   without a GPU by exporting for 'cuda' under `aot.abstract_gpu`, as this lowering is.
3. This module is deleted once jax removes the Triton backend, or earlier when 1. and 2. cover
   every recipe here; until then `supports()` keeps serving and the AOT check (`python -m
   qkernels.aot --target pallas-sm_90`) records jax's deprecation as a note on each config.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qkernels.kernels.pallas.configs import GpuConfig
from qkernels.kernels.pallas.layout import even_odd, out_struct, pad_axis, unpack_nibbles

__all__ = ["w8a8", "w4a16", "w4a8", "fp8", "fp8a16"]

_NT = (((1,), (1,)), ((), ()))


def _pad_to(dim: int, block: int) -> int:
    return -(-dim // block) * block


def _acc_dtype(codes: Any) -> Any:
    """The exact accumulator of a dot of one-byte codes: int32 for int8, f32 for float8 (exact products)."""
    return jnp.int32 if jnp.issubdtype(codes.dtype, jnp.integer) else jnp.float32


def _rowwise_kernel(a_ref, w_ref, sa_ref, sw_ref, *rest, block_k: int, has_bias: bool, raw: bool):
    """W8A8 / FP8. a_ref (block_m, K) int8 or float8_e4m3fn codes; w_ref (block_n, K) codes of the same
    type; sa_ref (block_m,), sw_ref (block_n,) f32; b_ref (block_n,) f32 when has_bias; o_ref (block_m, block_n)."""
    b_ref, o_ref = rest if has_bias else (None, *rest)
    acc_dtype = _acc_dtype(a_ref)

    def step(t, acc):
        a = a_ref[:, pl.ds(t * block_k, block_k)]  # [bm, bk]
        w = w_ref[:, pl.ds(t * block_k, block_k)]  # [bn, bk]
        return acc + jax.lax.dot_general(a, w, _NT, preferred_element_type=acc_dtype)

    acc = jax.lax.fori_loop(0, a_ref.shape[1] // block_k, step,
                            jnp.zeros((a_ref.shape[0], w_ref.shape[0]), acc_dtype))  # [bm, bn] int32 / f32
    if raw:
        o_ref[...] = acc
        return
    y = (acc.astype(jnp.float32) * sw_ref[...][None, :]) * sa_ref[...][:, None]  # weight scale first
    if has_bias:
        y = y + b_ref[...][None, :]
    o_ref[...] = y.astype(o_ref.dtype)


def _int4_kernel(a_ref, w_ref, s_ref, *rest, group: int, has_zero: bool, lhs_int: bool, has_bias: bool):
    """a_ref (block_m, K_p) even/odd within each group; w_ref (block_n, K_p/2) packed int8;
    s_ref / z_ref (G, block_n) f32; sa_ref (block_m,) f32 (W4A8); b_ref (block_n,); o_ref (block_m, block_n)."""
    rest = list(rest)
    z_ref = rest.pop(0) if has_zero else None
    sa_ref = rest.pop(0) if lhs_int else None
    b_ref = rest.pop(0) if has_bias else None
    (o_ref,) = rest
    half = group // 2

    def step(t, y):
        a_even = a_ref[:, pl.ds(t * group, half)]  # [bm, g/2]
        a_odd = a_ref[:, pl.ds(t * group + half, half)]  # [bm, g/2]
        lo, hi = unpack_nibbles(w_ref[:, pl.ds(t * half, half)], signed=not has_zero)  # [bn, g/2] int32
        s = s_ref[t, :]  # [bn]
        if lhs_int:  # exact int32 partial of group t, scaled into f32 in group order
            p = (jax.lax.dot_general(a_even, lo.astype(jnp.int8), _NT, preferred_element_type=jnp.int32)
                 + jax.lax.dot_general(a_odd, hi.astype(jnp.int8), _NT, preferred_element_type=jnp.int32))
            return y + p.astype(jnp.float32) * s[None, :]
        z = z_ref[t, :][:, None] if has_zero else jnp.float32(0)
        w_lo = ((lo.astype(jnp.float32) - z) * s[:, None]).astype(a_even.dtype)  # [bn, g/2]
        w_hi = ((hi.astype(jnp.float32) - z) * s[:, None]).astype(a_even.dtype)
        return (y + jax.lax.dot_general(a_even, w_lo, _NT, preferred_element_type=jnp.float32)
                + jax.lax.dot_general(a_odd, w_hi, _NT, preferred_element_type=jnp.float32))

    y = jax.lax.fori_loop(0, a_ref.shape[1] // group, step,
                          jnp.zeros((a_ref.shape[0], w_ref.shape[0]), jnp.float32))  # [bm, bn] f32
    if lhs_int:
        y = y * sa_ref[...][:, None]
    if has_bias:
        y = y + b_ref[...][None, :]
    o_ref[...] = y.astype(o_ref.dtype)


def _fp8a16_kernel(a_ref, w_ref, sw_ref, *rest, block_k: int, has_bias: bool):
    """a_ref (block_m, K) float activations; w_ref (block_n, K) float8_e4m3fn codes; sw_ref (block_n,) f32
    per-channel scales; b_ref (block_n,) f32 when has_bias; o_ref (block_m, block_n)."""
    b_ref, o_ref = rest if has_bias else (None, *rest)
    s = sw_ref[...][:, None]  # [bn, 1]

    def step(t, acc):
        a = a_ref[:, pl.ds(t * block_k, block_k)]  # [bm, bk]
        w = (w_ref[:, pl.ds(t * block_k, block_k)].astype(jnp.float32) * s).astype(a.dtype)  # [bn, bk] dequantized
        return acc + jax.lax.dot_general(a, w, _NT, preferred_element_type=jnp.float32)

    y = jax.lax.fori_loop(0, a_ref.shape[1] // block_k, step,
                          jnp.zeros((a_ref.shape[0], w_ref.shape[0]), jnp.float32))  # [bm, bn] f32
    if has_bias:
        y = y + b_ref[...][None, :]
    o_ref[...] = y.astype(o_ref.dtype)


def _call(kernel, args, specs, *, grid, out_spec, out_shape, config: GpuConfig, interpret: Any, name: str):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=specs, out_specs=out_spec, out_shape=out_shape, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        name=name)(*args)


def _per_channel(kernel, a, a_scale, w_q, w_scale, bias, *, out_dtype, config: GpuConfig, interpret, raw, name):
    """The (M, N) grid over one-byte weights with per-channel scales (W8A8, FP8, FP8A16): operands padded
    to whole blocks, the per-token scales only when `a_scale` is given."""
    batch, m, k = a.shape
    n, bw = w_q.shape[1], w_q.shape[0]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    mp, np_, kp = _pad_to(m, bm), _pad_to(n, bn), _pad_to(k, bk)
    wb = (lambda i, j, b: b) if bw == batch and batch > 1 else (lambda i, j, b: 0)
    specs = [pl.BlockSpec((None, bm, kp), lambda i, j, b: (b, i, 0)),
             pl.BlockSpec((None, bn, kp), lambda i, j, b: (wb(i, j, b), j, 0))]
    args = [pad_axis(pad_axis(a, 1, mp), 2, kp), pad_axis(pad_axis(w_q, 1, np_), 2, kp)]
    if a_scale is not None:
        specs.append(pl.BlockSpec((None, bm), lambda i, j, b: (b, i)))
        args.append(pad_axis(a_scale, 1, mp))
    specs.append(pl.BlockSpec((None, bn), lambda i, j, b: (wb(i, j, b), j)))
    args.append(pad_axis(w_scale, 1, np_))
    if bias is not None:
        specs.append(pl.BlockSpec((bn,), lambda i, j, b: (j,)))
        args.append(pad_axis(bias.astype(jnp.float32), 0, np_))
    out = _call(functools.partial(kernel, block_k=bk, has_bias=bias is not None), args, specs,
                grid=(mp // bm, np_ // bn, batch),
                out_spec=pl.BlockSpec((None, bm, bn), lambda i, j, b: (b, i, j)),
                out_shape=out_struct((batch, mp, np_), _acc_dtype(a) if raw else out_dtype, args),
                config=config, interpret=interpret, name=name)
    return out[:, :m, :n]


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret", "raw"))
def w8a8(a_q, a_scale, w_q, w_scale, bias, *, out_dtype: Any, config: GpuConfig, interpret: Any = False,
         raw: bool = False):
    """int8 (B, M, K) x int8 (B_w, N, K) with per-row scales (B, M), (B_w, N); B_w in {1, B}."""
    return _per_channel(functools.partial(_rowwise_kernel, raw=raw), a_q, a_scale, w_q, w_scale, bias,
                        out_dtype=out_dtype, config=config, interpret=interpret, raw=raw, name="qk_w8a8_gpu")


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def fp8(a_q, a_scale, w_q, w_scale, bias, *, out_dtype: Any, config: GpuConfig, interpret: Any = False):
    """float8_e4m3fn (B, M, K) x float8_e4m3fn (B_w, N, K) with per-row scales (B, M), (B_w, N); B_w in {1, B}."""
    return _per_channel(functools.partial(_rowwise_kernel, raw=False), a_q, a_scale, w_q, w_scale, bias,
                        out_dtype=out_dtype, config=config, interpret=interpret, raw=False, name="qk_fp8_gpu")


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def fp8a16(a, w_q, w_scale, bias, *, out_dtype: Any, config: GpuConfig, interpret: Any = False):
    """float (B, M, K) x float8_e4m3fn (B_w, N, K) with per-channel scales (B_w, N); B_w in {1, B}."""
    return _per_channel(_fp8a16_kernel, a, None, w_q, w_scale, bias, out_dtype=out_dtype, config=config,
                        interpret=interpret, raw=False, name="qk_fp8a16_gpu")


def _int4(a, a_scale, w_q, w_scale, w_zero, bias, *, group, out_dtype, config: GpuConfig, interpret):
    batch, m, _ = a.shape
    n, bw = w_q.shape[1], w_q.shape[0]
    kp = 2 * w_q.shape[2]  # padded to the group size at quantization
    bm, bn = config.block_m, config.block_n
    mp, np_ = _pad_to(m, bm), _pad_to(n, bn)
    wb = (lambda i, j, b: b) if bw == batch and batch > 1 else (lambda i, j, b: 0)
    n_groups = kp // group
    group_major = lambda x: jnp.swapaxes(pad_axis(x.astype(jnp.float32), 1, np_), 1, 2)  # (B_w, G, Np)
    specs = [pl.BlockSpec((None, bm, kp), lambda i, j, b: (b, i, 0)),
             pl.BlockSpec((None, bn, kp // 2), lambda i, j, b: (wb(i, j, b), j, 0)),
             pl.BlockSpec((None, n_groups, bn), lambda i, j, b: (wb(i, j, b), 0, j))]
    args = [even_odd(pad_axis(pad_axis(a, 1, mp), 2, kp), group), pad_axis(w_q, 1, np_), group_major(w_scale)]
    if w_zero is not None:
        specs.append(pl.BlockSpec((None, n_groups, bn), lambda i, j, b: (wb(i, j, b), 0, j)))
        args.append(group_major(w_zero))
    if a_scale is not None:
        specs.append(pl.BlockSpec((None, bm), lambda i, j, b: (b, i)))
        args.append(pad_axis(a_scale, 1, mp))
    if bias is not None:
        specs.append(pl.BlockSpec((bn,), lambda i, j, b: (j,)))
        args.append(pad_axis(bias.astype(jnp.float32), 0, np_))
    kernel = functools.partial(_int4_kernel, group=group, has_zero=w_zero is not None,
                               lhs_int=a_scale is not None, has_bias=bias is not None)
    out = _call(kernel, args, specs, grid=(mp // bm, np_ // bn, batch),
                out_spec=pl.BlockSpec((None, bm, bn), lambda i, j, b: (b, i, j)),
                out_shape=out_struct((batch, mp, np_), out_dtype, args), config=config, interpret=interpret,
                name="qk_w4a8_gpu" if a_scale is not None else "qk_w4a16_gpu")
    return out[:, :m, :n]


@functools.partial(jax.jit, static_argnames=("group", "out_dtype", "config", "interpret"))
def w4a16(a, w_q, w_scale, w_zero, bias, *, group: int, out_dtype: Any, config: GpuConfig, interpret: Any = False):
    """float (B, M, K) x packed int4/uint4 (B_w, N, K_p/2), group scales/zeros (B_w, N, G)."""
    return _int4(a, None, w_q, w_scale, w_zero, bias, group=group, out_dtype=out_dtype, config=config,
                 interpret=interpret)


@functools.partial(jax.jit, static_argnames=("group", "out_dtype", "config", "interpret", "raw"))
def w4a8(a_q, a_scale, w_q, w_scale, bias, *, group: int, out_dtype: Any, config: GpuConfig,
         interpret: Any = False, raw: bool = False):
    """int8 (B, M, K) x packed int4 (B_w, N, K_p/2); per-token (B, M) and group (B_w, N, G) scales."""
    if raw:
        raise ValueError("raw per-group accumulators are exposed by the TPU kernel (tpu.w4a8), not the GPU one")
    return _int4(a_q, a_scale, w_q, w_scale, None, bias, group=group, out_dtype=out_dtype, config=config,
                 interpret=interpret)
