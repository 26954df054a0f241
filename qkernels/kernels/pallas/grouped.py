"""Pallas TPU grouped (ragged) W8A8 and W4A16, megablox-gmm style: every expert in one `pallas_call`.

The rows of lhs (M, K) are sorted by expert (`qkernels.grouped`). `group_metadata` maps each step
of the tile axis to one (group, row block) pair, computed with jnp from the (traced) group sizes and
handed to the kernel by scalar prefetch (SMEM), so the weight block of the step's expert is the one
DMA'd in; no token is padded per expert in memory. A row block that straddles a group boundary is
visited once per group it touches, consecutively, so its output block stays in VMEM across the
visits, each visit storing only its own group's rows (`jnp.where` with the previous contents). The
rows past `sum(group_sizes)` (and the padding up to a block multiple) form a tail group whose steps
skip the MXU and store zeros. Grid (N blocks, tiles, K blocks): N parallel; tiles and K sequential
("arbitrary": revisited output blocks must not be split across cores).

Numerics are the dense TPU kernels' (`tpu.py`): W8A8 accumulates int8 in int32 and rescales in
DESIGN.md section 4's order; W4A16 dequantizes in VMEM to the activation dtype and accumulates in f32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qkernels.formats import QOperand, Recipe
from qkernels.kernels.pallas.layout import even_odd, fit_block, pad_axis, unpack_nibbles

__all__ = ["group_metadata", "gmm_w8a8", "gmm_w4a16", "grouped_qmatmul", "register", "AOT_SHAPES", "vmem_estimate",
           "aot_reports"]

_NT = (((1,), (1,)), ((), ()))  # [bm, bk] x [bn, bk] -> [bm, bn]
_BLOCKS = dict(block_m=128, block_n=256, block_k=512)  # v5e/v6e MXU-sized tiles; cannot change numerics


def _params() -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary"))


def group_metadata(group_sizes: jax.Array, m: int, mp: int, bm: int) -> tuple[jax.Array, ...]:
    """int32 (tile_group (T,), tile_block (T,), group_start (E + 2,), group_end (E + 2,)), T = mp/bm + E.

    Groups 0..E-1 are the experts (ends cut at M), group E the tail up to the padded `mp`, group E + 1
    (an empty range) marks unused steps, which revisit the last row block and store nothing. The same
    schedule as the Triton kernels' (`qkernels.kernels.triton.grouped.tile_schedule`, worked example there).
    """
    e = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    ends = jnp.concatenate([ends, jnp.full((1,), mp, jnp.int32)])
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    first, last = starts // bm, jnp.maximum(ends - 1, 0) // bm
    count = jnp.where(ends > starts, last - first + 1, 0)
    tile_end = jnp.cumsum(count)
    tiles = jnp.arange(mp // bm + e, dtype=jnp.int32)
    group = jnp.searchsorted(tile_end, tiles, side="right").astype(jnp.int32)
    g = jnp.minimum(group, e)
    block = jnp.where(group > e, mp // bm - 1, first[g] + tiles - (tile_end[g] - count[g]))
    empty = jnp.full((1,), mp, jnp.int32)
    return group, block.astype(jnp.int32), jnp.concatenate([starts, empty]), jnp.concatenate([ends, empty])


def _store(t, group_ref, block_ref, start_ref, end_ref, o_ref, y, *, experts: int):
    """Store tile `t`'s group's rows of `y` [bm, bn] into the resident output block, keeping the rest.
    (`t` is read at the kernel's top level: the interpreter substitutes program ids only there.)"""
    g = jnp.minimum(group_ref[t], experts + 1)
    rows = block_ref[t] * o_ref.shape[0] + jax.lax.broadcasted_iota(jnp.int32, o_ref.shape, 0)
    mask = (rows >= start_ref[g]) & (rows < end_ref[g])
    o_ref[...] = jnp.where(mask, y.astype(o_ref.dtype), o_ref[...])


def _w8a8_kernel(group_ref, block_ref, start_ref, end_ref, a_ref, w_ref, sa_ref, sw_ref, o_ref, acc_ref, *,
                 experts: int, raw: bool):
    """One (N block, tile, K block) step.

    group_ref, block_ref: (T,) int32 tile -> group, row block; start_ref, end_ref: (E + 2,) int32 group rows.
                          All four SMEM (scalar prefetch).
    a_ref:   (block_m, block_k) int8 activation codes of the tile's row block, VMEM.
    w_ref:   (block_n, block_k) int8 codes of the tile's expert, VMEM.
    sa_ref:  (block_m, 1) f32 per-token scales, VMEM.
    sw_ref:  (1, block_n) f32 per-channel scales of the expert, VMEM.
    o_ref:   (block_m, block_n) output (int32 accumulators when raw), VMEM, resident across revisits.
    acc_ref: (block_m, block_n) int32 scratch accumulator, VMEM.
    """
    t, k = pl.program_id(1), pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(group_ref[t] < experts)  # the tail multiplies nothing: zeros
    def _dot():
        acc_ref[...] += jax.lax.dot_general(a_ref[...], w_ref[...], _NT, preferred_element_type=jnp.int32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _epilogue():
        # int32 accumulator -> f32, weight scale then activation scale: the contract's order (formats._IntegerDot)
        y = acc_ref[...] if raw else (acc_ref[...].astype(jnp.float32) * sw_ref[...]) * sa_ref[...]
        _store(t, group_ref, block_ref, start_ref, end_ref, o_ref, y, experts=experts)


def _w4a16_kernel(group_ref, block_ref, start_ref, end_ref, a_ref, w_ref, s_ref, *rest, experts: int, group: int,
                  has_zero: bool):
    """One (N block, tile, K block) step of int4 weights.

    group_ref, block_ref, start_ref, end_ref: the schedule, SMEM (scalar prefetch), as in `_w8a8_kernel`.
    a_ref:   (block_m, block_k) float activations, even/odd order within the block (`layout.even_odd`), VMEM.
    w_ref:   (block_n, block_k / 2) int8 packed codes of the tile's expert (low nibble even k), VMEM.
    s_ref:   (block_n, groups_per_block) f32 group scales of the expert, VMEM.
    z_ref:   (block_n, groups_per_block) f32 zero points (uint4 only), VMEM.
    o_ref:   (block_m, block_n) output, VMEM, resident across revisits.
    acc_ref: (block_m, block_n) f32 scratch accumulator, VMEM.
    """
    z_ref, o_ref, acc_ref = rest if has_zero else (None, *rest)
    t, k = pl.program_id(1), pl.program_id(2)
    half = w_ref.shape[1]
    per_group = group // 2  # codes of one group in each nibble half

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(group_ref[t] < experts)
    def _dot():
        lo, hi = unpack_nibbles(w_ref[...], signed=not has_zero)  # [bn, bk/2] int32 each
        a = a_ref[...]
        gid = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, lo.shape, 1), jnp.int32(per_group))
        s = jnp.zeros(lo.shape, jnp.float32)
        z = jnp.zeros(lo.shape, jnp.float32)
        for g in range(half // per_group):
            s = jnp.where(gid == g, s_ref[:, g:g + 1], s)
            if has_zero:
                z = jnp.where(gid == g, z_ref[:, g:g + 1], z)
        w_lo = ((lo.astype(jnp.float32) - z) * s).astype(a.dtype)  # [bn, bk/2]: w = (q - zero) * scale
        w_hi = ((hi.astype(jnp.float32) - z) * s).astype(a.dtype)
        acc_ref[...] += (jax.lax.dot_general(a[:, :half], w_lo, _NT, preferred_element_type=jnp.float32)
                         + jax.lax.dot_general(a[:, half:], w_hi, _NT, preferred_element_type=jnp.float32))

    @pl.when(k == pl.num_programs(2) - 1)
    def _epilogue():
        _store(t, group_ref, block_ref, start_ref, end_ref, o_ref, acc_ref[...], experts=experts)


def _call(kernel: Any, schedule: tuple[jax.Array, ...], args: list[Any], in_specs: list[Any], *, grid: tuple[int, ...],
          block: tuple[int, int], out_shape: tuple[int, int], out_dtype: Any, acc_dtype: Any, interpret: Any,
          name: str) -> jax.Array:
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=grid, in_specs=in_specs,
        out_specs=pl.BlockSpec(block, lambda j, t, k, grp, blk, s, e: (blk[t], j)),
        scratch_shapes=[pltpu.VMEM(block, acc_dtype)])
    return pl.pallas_call(kernel, grid_spec=spec, out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
                          compiler_params=_params(), interpret=interpret, name=name)(*schedule, *args)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "raw"))
def gmm_w8a8(a_q, a_scale, w_q, w_scale, group_sizes, *, out_dtype: Any, interpret: Any = False, raw: bool = False):
    """int8 (M, K) with scales (M,) x int8 experts (E, N, K) with scales (E, N) -> (M, N)."""
    (m, k), (e, n, _) = a_q.shape, w_q.shape
    bm, mp = fit_block(m, _BLOCKS["block_m"], 32)
    bn, np_ = fit_block(n, _BLOCKS["block_n"], 128)
    bk, kp = fit_block(k, _BLOCKS["block_k"], 128)
    schedule = group_metadata(group_sizes, m, mp, bm)
    expert = lambda t, grp: jnp.minimum(grp[t], e - 1)  # noqa: E731  the tail reads (and skips) a valid block
    in_specs = [pl.BlockSpec((bm, bk), lambda j, t, k, grp, blk, s, end: (blk[t], k)),
                pl.BlockSpec((None, bn, bk), lambda j, t, k, grp, blk, s, end: (expert(t, grp), j, k)),
                pl.BlockSpec((bm, 1), lambda j, t, k, grp, blk, s, end: (blk[t], 0)),
                pl.BlockSpec((None, 1, bn), lambda j, t, k, grp, blk, s, end: (expert(t, grp), 0, j))]
    args = [pad_axis(pad_axis(a_q, 0, mp), 1, kp), pad_axis(pad_axis(w_q, 1, np_), 2, kp),
            pad_axis(a_scale, 0, mp)[:, None], pad_axis(w_scale, 1, np_)[:, None, :]]
    out = _call(functools.partial(_w8a8_kernel, experts=e, raw=raw), schedule, args, in_specs,
                grid=(np_ // bn, mp // bm + e, kp // bk), block=(bm, bn), out_shape=(mp, np_),
                out_dtype=jnp.int32 if raw else out_dtype, acc_dtype=jnp.int32, interpret=interpret, name="qk_gmm_w8a8")
    return out[:m, :n]


@functools.partial(jax.jit, static_argnames=("group", "out_dtype", "interpret"))
def gmm_w4a16(a, w_q, w_scale, w_zero, group_sizes, *, group: int, out_dtype: Any, interpret: Any = False):
    """float (M, K) x packed int4/uint4 experts (E, N, K_p/2), group scales/zeros (E, N, K_p/group) -> (M, N)."""
    (m, _), (e, n, k_half) = a.shape, w_q.shape
    bm, mp = fit_block(m, _BLOCKS["block_m"], 32)
    bn, np_ = fit_block(n, _BLOCKS["block_n"], 128)
    bk, kp = fit_block(2 * k_half, _BLOCKS["block_k"], max(256, group))
    gpb, n_kb = bk // group, kp // bk

    def channel_major(x):  # (E, N, G) -> (E, K blocks, Np, gpb): a column of scales per group
        x = pad_axis(pad_axis(x.astype(jnp.float32), 1, np_), 2, kp // group)
        return jnp.swapaxes(x.reshape(e, np_, n_kb, gpb), 1, 2)

    expert = lambda t, grp: jnp.minimum(grp[t], e - 1)  # noqa: E731
    scale_spec = pl.BlockSpec((None, None, bn, gpb), lambda j, t, k, grp, blk, s, end: (expert(t, grp), k, j, 0))
    in_specs = [pl.BlockSpec((bm, bk), lambda j, t, k, grp, blk, s, end: (blk[t], k)),
                pl.BlockSpec((None, bn, bk // 2), lambda j, t, k, grp, blk, s, end: (expert(t, grp), j, k)),
                scale_spec]
    args = [even_odd(pad_axis(pad_axis(a, 0, mp), 1, kp), bk), pad_axis(pad_axis(w_q, 1, np_), 2, kp // 2),
            channel_major(w_scale)]
    if w_zero is not None:
        in_specs.append(scale_spec)
        args.append(channel_major(w_zero))
    out = _call(functools.partial(_w4a16_kernel, experts=e, group=group, has_zero=w_zero is not None),
                group_metadata(group_sizes, m, mp, bm), args, in_specs, grid=(np_ // bn, mp // bm + e, n_kb),
                block=(bm, bn), out_shape=(mp, np_), out_dtype=out_dtype, acc_dtype=jnp.float32,
                interpret=interpret, name="qk_gmm_w4a16")
    return out[:m, :n]


def grouped_qmatmul(lhs: Any, rhs: QOperand, group_sizes: jax.Array, recipe: Recipe, *, out_dtype: str,
                    interpret: Any, raw: bool = False) -> jax.Array:
    """Dispatch's canonical operands onto the family's kernel (activations quantized per token first)."""
    from jax_bindings.arrays import DTYPES
    from jax_bindings.quant import quantize_operand

    out = DTYPES[out_dtype]
    if recipe.tag == "w8a8":
        q = lhs if isinstance(lhs, QOperand) else quantize_operand(lhs, recipe.lhs)
        return gmm_w8a8(q.qvalue, q.scale, rhs.qvalue, rhs.scale, group_sizes, out_dtype=out, interpret=interpret,
                        raw=raw)
    return gmm_w4a16(lhs, rhs.qvalue, rhs.scale, rhs.zero_point, group_sizes, group=recipe.group_size,
                     out_dtype=out, interpret=interpret)


_FAMILIES = ("w8a8", "w4a16")


def _supports(problem: Any, *, dense_reason: Any) -> str | None:
    """The dense kernels' verdict on the same rows (platform, recipe, dtypes), for the grouped op."""
    from qkernels.dispatch import Op

    return dense_reason(dataclasses.replace(problem, op=Op.QMATMUL, groups=None))


def register(supports_tpu: Any, supports_interpret: Any, families: Any) -> None:
    """Register 'pallas.tpu.grouped.<family>' and 'pallas.interpret.grouped' for `Op.RAGGED_QMATMUL`
    (`qkernels.kernels.pallas.register` passes the dense kernels' verdicts and their `Family` enum)."""
    from qkernels import dispatch

    def run(call: Any, lhs: Any, rhs: QOperand, group_sizes: Any, *, interpret: Any) -> jax.Array:
        return grouped_qmatmul(lhs, rhs, group_sizes, call.problem.recipe, out_dtype=call.problem.out_dtype,
                               interpret=interpret)

    def accumulate(call: Any, lhs: Any, rhs: QOperand, group_sizes: Any, *, interpret: Any) -> jax.Array:
        if call.problem.recipe.tag != "w8a8":
            raise ValueError(f"{call.problem.recipe.name} accumulates in f32; only the grouped W8A8 kernel exposes "
                             f"integer accumulators")
        return grouped_qmatmul(lhs, rhs, group_sizes, call.problem.recipe, out_dtype="float32", interpret=interpret,
                               raw=True)

    for family in _FAMILIES:
        dispatch.register(dispatch.Implementation(
            name=f"pallas.tpu.grouped.{family}", framework="jax", op=dispatch.Op.RAGGED_QMATMUL, priority=100,
            serves=dispatch.Serves.tags(family),
            supports=functools.partial(_supports, dense_reason=functools.partial(supports_tpu, family=families(family))),
            run=functools.partial(run, interpret=False),
            accumulate=functools.partial(accumulate, interpret=False) if family == "w8a8" else None,
            description=f"Pallas/Mosaic grouped {family} kernel (megablox-style schedule, one call for every expert)"))
    dispatch.register(dispatch.Implementation(
        name="pallas.interpret.grouped", framework="jax", op=dispatch.Op.RAGGED_QMATMUL, priority=-10,
        serves=dispatch.Serves.tags(*_FAMILIES), automatic=False,
        supports=functools.partial(_supports, dense_reason=supports_interpret),
        run=functools.partial(run, interpret=True), accumulate=functools.partial(accumulate, interpret=True),
        description="the Pallas TPU grouped kernels run by the Pallas interpreter on CPU: exact, slow, for tests"))


# --- compile without a TPU (`python -m qkernels.aot --target tpu-v5e`) ----------------------------------------

AOT_SHAPES = ((8, 14336, 4096, 128), (128, 768, 2048, 2048), (3, 300, 4095, 17))
"""(experts, N, K, M) compiled by `aot_reports`: Mixtral-8x7B gate/up at 16 tokens per expert, Qwen3-30B-A3B
gate/up at 16 tokens per expert, and an awkward one (odd N and K, fewer rows than a block, 3 experts)."""


def vmem_estimate(m: int, n: int, k: int, *, family: str, group: int = 128, zero_point: bool = False,
                  act_bytes: int = 2) -> int:
    """Bytes of VMEM the kernel's blocks take: double-buffered input blocks and output block, and the
    accumulator scratch (Mosaic's own temporaries, such as the dequantized weight tile, come on top)."""
    bm, bn = fit_block(m, _BLOCKS["block_m"], 32)[0], fit_block(n, _BLOCKS["block_n"], 128)[0]
    if family == "w8a8":
        bk = fit_block(k, _BLOCKS["block_k"], 128)[0]
        inputs = bm * bk + bn * bk + 4 * bm + 4 * bn
    else:
        bk = fit_block(k, _BLOCKS["block_k"], max(256, group))[0]
        inputs = act_bytes * bm * bk + bn * bk // 2 + (4 + (4 if zero_point else 0)) * bn * (bk // group)
    return 2 * inputs + 2 * act_bytes * bm * bn + 4 * bm * bn


def aot_reports(target: str) -> list[Any]:
    """Compile the grouped W8A8 and W4A16 kernels for a TPU `target` ('tpu-v5e', 'tpu-v6e', 'tpu-v5p') with
    the real TPU compiler (libtpu, no TPU present) at `AOT_SHAPES` (bf16 activations and outputs, g128);
    one `qkernels.aot.ConfigReport` per (family, shape), failing on a compile error, a program without the
    Mosaic custom call, blocks over the scoped VMEM, or (W4A16) an unpacked or dequantized copy of the
    expert stack outside the kernel (`pallas.aot`'s HLO check: an array with an N axis and E*K or more
    elements across its others). Non-TPU targets have no grouped Pallas kernel: []."""
    import os

    from jax.experimental import topologies

    from qkernels import hardware
    from qkernels.aot import ConfigReport
    from qkernels.kernels.pallas import aot

    spec = hardware.AOT_TARGETS[target]
    if not spec.topology:
        return []
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling needs no TPU (see pallas.aot)
    device = topologies.get_topology_desc(topology_name=spec.topology, platform="tpu").devices[0]
    on = jax.sharding.SingleDeviceSharding(device)
    sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on)  # noqa: E731
    limit = hardware.ARCHES[spec.arch].scoped_vmem_bytes
    reports = []
    for family in _FAMILIES:
        for e, n, k, m in AOT_SHAPES:
            gs = sd((e,), jnp.int32)
            if family == "w8a8":
                fn = lambda a, s, w, ws, g: gmm_w8a8(a, s, w, ws, g, out_dtype=jnp.bfloat16)  # noqa: E731
                args = (sd((m, k), jnp.int8), sd((m,), jnp.float32), sd((e, n, k), jnp.int8),
                        sd((e, n), jnp.float32), gs)
            else:
                kp = -(-k // 128) * 128
                fn = lambda a, w, s, g: gmm_w4a16(a, w, s, None, g, group=128, out_dtype=jnp.bfloat16)  # noqa: E731
                args = (sd((m, k), jnp.bfloat16), sd((e, n, kp // 2), jnp.int8), sd((e, n, kp // 128), jnp.float32), gs)
            r = ConfigReport(kernel=f"pallas.tpu.grouped.{family}", config=f"bf16-g128 E{e}-M{m}-N{n}-K{k}",
                             target=target, mma_instruction="MXU int8" if family == "w8a8" else "MXU bf16",
                             vmem_bytes=vmem_estimate(m, n, k, family=family))
            try:
                compiled = jax.jit(fn).trace(*args).lower().compile()
            except Exception as err:  # a compile error is this shape's verdict, reported not raised
                r.problems.append(f"compile failed: {str(err).splitlines()[0][:300]}")
                reports.append(r)
                continue
            mem = compiled.memory_analysis()
            r.memory_analysis = {f: int(getattr(mem, f)) for f in (
                "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "generated_code_size_in_bytes")}
            text = compiled.as_text()
            if "tpu_custom_call" not in text:
                r.problems.append("no tpu_custom_call in the compiled program: the Mosaic kernel was not used")
            if limit is not None and r.vmem_bytes > limit:
                r.problems.append(f"blocks take {r.vmem_bytes} bytes of VMEM, over the scoped {limit}")
            if family == "w4a16":  # per expert: the packed (E, N, K/2) stack holds E*K/2 bytes per column
                r.problems += aot._dequantized_copy(text, n, e * k)
            reports.append(r)
    return reports
