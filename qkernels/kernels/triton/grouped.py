"""Grouped (ragged) W8A8 and W4A16: every expert of a mixture-of-experts layer in one launch.

The rows of `lhs (M, K)` are sorted by expert: expert e owns `[start_e, end_e)` (`qkernels.grouped`).
Tokens are never padded per expert in memory; instead a tile schedule, built on the device from the
group sizes without a host sync (as megablox's `make_group_metadata` does), maps each program to one
(group, BLOCK_M row block) pair. A row block that straddles a group boundary is visited once per group
it touches, each visit loading, multiplying and storing only its own group's rows (masked), so every
output row is written exactly once. The rows past `sum(group_sizes)` form one more group (the
"tail") whose programs run no K loop and store zeros. The number of tiles is bounded statically,
`cdiv(M, BLOCK_M) + E` (each of the E + 1 groups adds at most one partial block), which is the grid;
programs past the real count store nothing.

Numerics are the dense families' (`w8a8.py`, `w4a16.py`): W8A8 accumulates int8 x int8 in int32 and
ends in `store_rescaled` (DESIGN.md section 4's order, no FMA: bit-identical to the reference);
W4A16 unpacks and dequantizes each weight tile in registers and accumulates in f32 (accurate).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from qkernels import dispatch
from qkernels.formats import QOperand
from qkernels.kernels.triton._common import (
    MatmulConfig, Output, dot_upcast, interpreting, pick_config, store_rescaled, torch_dtype, w4a16_step,
)
from qkernels.kernels.triton.quantize import quantize_rows

__all__ = ["CONFIGS", "tile_schedule", "launch_grouped_w8a8", "launch_grouped_w4a16", "grouped_w8a8_kernel",
           "grouped_w4a16_kernel", "register"]

CONFIGS: dict[str, tuple[MatmulConfig, ...]] = {
    # max_m is compared with the mean rows per expert: a few tokens per expert (decode) take short row blocks
    # so a straddling block wastes little; 8 warps keep 128-wide int8 tiles from spilling (DESIGN.md section 6)
    "sm_80": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4, max_m=16),
              MatmulConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3, max_m=64),
              MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
    "sm_90": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4, max_m=16),
              MatmulConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3, max_m=64),
              MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
    "gfx942": (MatmulConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=2, max_m=16),
               MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=2)),
    "interpret": (MatmulConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1),),
}


def tile_schedule(group_sizes: torch.Tensor, m: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """The tile -> (group, row block) map, on `group_sizes`' device, with no host synchronization.

    Returns int32 `tile_group (T,)`, `tile_block (T,)`, `group_start (E + 1,)`, `group_end (E + 1,)` with
    `T = cdiv(M, block_m) + E`. Groups 0..E-1 are the experts, group E the tail past their sum; a tile
    past the real count has group E + 1. Group ends are cut at M (as `lax.ragged_dot` cuts them).
    Worked example, M = 10, block_m = 4, sizes (3, 0, 5): groups [0,3) [3,3) [3,8) tail [8,10); expert 0
    touches block 0, expert 2 blocks 0-1, the tail block 2: tiles (0,0) (2,0) (2,1) (3,2), then 2 unused.
    """
    e = group_sizes.shape[0]
    sizes = group_sizes.to(torch.int64)
    ends = torch.cumsum(sizes, 0).clamp(max=m)
    ends = torch.cat([ends, ends.new_full((1,), m)])  # the tail group ends at M
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    first, last = starts // block_m, (ends - 1).clamp(min=0) // block_m
    count = torch.where(ends > starts, last - first + 1, 0)
    tile_end = torch.cumsum(count, 0)
    tiles = torch.arange(triton.cdiv(m, block_m) + e, device=group_sizes.device)
    group = torch.searchsorted(tile_end, tiles, right=True)  # E + 1 past the real tiles
    g = group.clamp(max=e)
    block = first[g] + tiles - (tile_end[g] - count[g])
    return group.to(torch.int32), block.to(torch.int32), starts.to(torch.int32), ends.to(torch.int32)


@triton.jit
def _tile(tile_group_ptr, tile_block_ptr, group_start_ptr, group_end_ptr, E, K, BLOCK_M: tl.constexpr):
    """This program's expert (clamped to a valid one), its rows [BLOCK_M] and mask, and its K extent."""
    pid_t = tl.program_id(0)
    group = tl.load(tile_group_ptr + pid_t)
    block = tl.load(tile_block_ptr + pid_t)
    g = tl.minimum(group, E)
    lo = tl.load(group_start_ptr + g)
    hi = tl.where(group <= E, tl.load(group_end_ptr + g), lo)  # unused tiles own no rows
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    m_ok = (offs_m >= lo) & (offs_m < hi)
    k_end = tl.where(group < E, K, 0)  # the tail (and unused tiles) multiply nothing: zeros
    expert = tl.minimum(group, E - 1).to(tl.int64)
    return expert, offs_m, m_ok, k_end


@triton.jit
def grouped_w8a8_kernel(
    # pointers
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr,
    tile_group_ptr, tile_block_ptr, group_start_ptr, group_end_ptr,
    # sizes
    N, K, E,
    # strides
    stride_am, stride_ak, stride_asm,
    stride_we, stride_wn, stride_wk,
    stride_wse, stride_wsn,
    stride_om, stride_on,
    # meta-parameters
    RETURN_ACC: tl.constexpr,  # store the raw int32 accumulator
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert, offs_m, m_ok, k_end = _tile(tile_group_ptr, tile_block_ptr, group_start_ptr, group_end_ptr, E, K,
                                        BLOCK_M)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # [BLOCK_M, BLOCK_N]
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)  # [BLOCK_M, BLOCK_K] int8
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)  # [BLOCK_K, BLOCK_N] int8
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = m_ok[:, None] & n_ok[None, :]
    if RETURN_ACC:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:  # fused epilogue, accumulator still in registers; the expert's own channel scales
        w_scale_ptrs = w_scale_ptr + expert * stride_wse + offs_n * stride_wsn
        store_rescaled(acc, out_ptrs, out_mask, a_scale_ptr + offs_m * stride_asm, w_scale_ptrs, w_scale_ptrs,
                       m_ok, n_ok, RESCALE=True, HAS_BIAS=False)


@triton.jit
def grouped_w4a16_kernel(
    # pointers
    a_ptr, w_ptr, w_scale_ptr, w_zero_ptr, out_ptr,
    tile_group_ptr, tile_block_ptr, group_start_ptr, group_end_ptr,
    # sizes
    N, K, K_STORED, E,
    # strides
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_wse, stride_wsn, stride_wsg,
    stride_wze, stride_wzn, stride_wzg,
    stride_om, stride_on,
    # meta-parameters
    ZERO_POINT: tl.constexpr, DOT_F32: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert, offs_m, m_ok, k_end = _tile(tile_group_ptr, tile_block_ptr, group_start_ptr, group_end_ptr, E, K,
                                        BLOCK_M)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    offs_kb = tl.arange(0, BLOCK_K // 2)  # [BLOCK_K // 2] packed bytes
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_kb[None, :] * stride_wk
    s_ptrs = w_scale_ptr + expert * stride_wse + offs_n * stride_wsn  # [BLOCK_N]
    z_ptrs = w_zero_ptr + expert * stride_wze + offs_n * stride_wzn  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for k0 in range(0, k_end, BLOCK_K):  # BLOCK_K divides GROUP_SIZE: one scale per tile row
        acc = w4a16_step(acc, a_ptrs, w_ptrs, s_ptrs, z_ptrs, k0, offs_k, offs_kb, m_ok, n_ok, K, K_STORED, stride_ak,
                         stride_wk, stride_wsg, stride_wzg, GROUP_SIZE, ZERO_POINT, DOT_F32)

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _grid(m: int, n: int, groups: int, config: MatmulConfig) -> tuple[int, int]:
    return triton.cdiv(m, config.block_m) + groups, triton.cdiv(n, config.block_n)


def launch_grouped_w8a8(lhs: torch.Tensor, lhs_scale: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor,
                        group_sizes: torch.Tensor, *, out_dtype: str | torch.dtype, config: MatmulConfig,
                        return_acc: bool = False) -> torch.Tensor:
    """Grouped W8A8 on operands it does not check (a bound call's): int8 lhs (M, K) with f32 scales (M,),
    int8 experts rhs (E, N, K) with f32 scales (E, N), int32 group_sizes (E,) -> (M, N)."""
    (m, k), (e, n, _) = lhs.shape, rhs.shape
    out = Output((m, n), torch.int32 if return_acc else torch_dtype(out_dtype), lhs.device)
    if m and n:
        schedule = tile_schedule(group_sizes, m, config.block_m)
        o = out.buffer
        grouped_w8a8_kernel[_grid(m, n, e, config)](
            lhs, lhs_scale, rhs, rhs_scale, o, *schedule,
            n, k, e,
            lhs.stride(0), lhs.stride(1), lhs_scale.stride(0),
            rhs.stride(0), rhs.stride(1), rhs.stride(2),
            rhs_scale.stride(0), rhs_scale.stride(1),
            o.stride(0), o.stride(1),
            RETURN_ACC=return_acc, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False)
    return out.result()


def launch_grouped_w4a16(lhs: torch.Tensor, rhs: torch.Tensor, rhs_scale: torch.Tensor, rhs_zero: torch.Tensor | None,
                         group_sizes: torch.Tensor, *, group_size: int, out_dtype: str | torch.dtype | None,
                         config: MatmulConfig) -> torch.Tensor:
    """Grouped W4A16 on operands it does not check: bf16/fp16 lhs (M, K), packed 4-bit experts rhs
    (E, N, K_padded / 2) with f32 scales (and int8 zero points) (E, N, G), int32 group_sizes (E,)."""
    cfg = config.for_group(group_size)
    (m, k), (e, n, k_stored) = lhs.shape, rhs.shape
    out = Output((m, n), torch_dtype(out_dtype or lhs.dtype), lhs.device)
    z = rhs_zero if rhs_zero is not None else rhs_scale
    if m and n:
        schedule = tile_schedule(group_sizes, m, cfg.block_m)
        o = out.buffer
        grouped_w4a16_kernel[_grid(m, n, e, cfg)](
            lhs, rhs, rhs_scale, z, o, *schedule,
            n, k, k_stored, e,
            lhs.stride(0), lhs.stride(1),
            rhs.stride(0), rhs.stride(1), rhs.stride(2),
            rhs_scale.stride(0), rhs_scale.stride(1), rhs_scale.stride(2),
            z.stride(0), z.stride(1), z.stride(2),
            o.stride(0), o.stride(1),
            ZERO_POINT=rhs_zero is not None, DOT_F32=dot_upcast(lhs.dtype), GROUP_SIZE=group_size,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    return out.result()


def _configure(problem: dispatch.Problem) -> Any:
    """`Implementation.configure`: the table entry for the mean rows per expert (what `explain` shows)."""
    from qkernels import hardware, tuning

    arch = "interpret" if problem.platform == "cpu" else hardware.table_arch(problem.platform)
    rows = max(1, problem.m // problem.groups)
    return tuning.Choice(pick_config(CONFIGS, arch, rows), f"grouped table: {arch}, {rows} rows per expert")


def _config(call: dispatch.Bound, device: torch.device) -> MatmulConfig:
    return call.config.config if call.config is not None else _configure(call.problem).config


def _lhs_codes(call: dispatch.Bound, lhs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return (lhs.qvalue, lhs.scale) if call.problem.lhs_quantized else quantize_rows(lhs)


def _run_w8a8(call: dispatch.Bound, lhs: Any, rhs: QOperand, group_sizes: torch.Tensor) -> torch.Tensor:
    q, s = _lhs_codes(call, lhs)
    return launch_grouped_w8a8(q, s, rhs.qvalue, rhs.scale, group_sizes, out_dtype=call.problem.out_dtype,
                               config=_config(call, q.device))


def _acc_w8a8(call: dispatch.Bound, lhs: Any, rhs: QOperand, group_sizes: torch.Tensor) -> torch.Tensor:
    q, s = _lhs_codes(call, lhs)
    return launch_grouped_w8a8(q, s, rhs.qvalue, rhs.scale, group_sizes, out_dtype="float32",
                               config=_config(call, q.device), return_acc=True)


def _run_w4a16(call: dispatch.Bound, lhs: Any, rhs: QOperand, group_sizes: torch.Tensor) -> torch.Tensor:
    p = call.problem
    return launch_grouped_w4a16(lhs, rhs.qvalue, rhs.scale, rhs.zero_point, group_sizes, group_size=p.recipe.group_size,
                                out_dtype=p.out_dtype, config=_config(call, lhs.device))


_KERNELS = {"w8a8": (_run_w8a8, _acc_w8a8), "w4a16": (_run_w4a16, None)}


def register(prefix: str, priority: int, supports: Callable[[str], Callable[[dispatch.Problem], str | None]],
             where: str, automatic: bool) -> None:
    """Register `<prefix>.grouped.<family>` for `Op.RAGGED_QMATMUL`; `supports(family)` is the dense
    family's verdict with the variant's platform rule (`qkernels.kernels.triton.register` passes it)."""
    for family, (run, accumulate) in _KERNELS.items():
        dispatch.register(dispatch.Implementation(
            name=f"{prefix}.grouped.{family}", framework="torch", op=dispatch.Op.RAGGED_QMATMUL, priority=priority,
            supports=supports(family), run=run, accumulate=accumulate, serves=dispatch.Serves.tags(family),
            automatic=automatic, configure=_configure, description=f"Triton grouped {family} kernel, one launch for every expert{where}"))


def aot_reports(target: str) -> list[Any]:
    """Compile every grouped config for `target` ('sm_80', 'sm_90', 'gfx942') with no GPU, through
    `qkernels.kernels.triton.aot`'s compiler and machine-code checks (tensor-core instruction, spills,
    shared memory), as it compiles the dense families: bf16 activations / outputs, group size 128.
    Under TRITON_INTERPRET=1 (kernels are interpreter objects, which cannot be compiled) it runs in a child
    process without that variable, as `qkernels.kernels.triton.aot.check` does."""
    from qkernels.kernels.triton import aot

    if interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-m", __name__, target], env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the grouped AOT check for {target} failed in its child process:\n"
                               f"{done.stderr[-2000:]}")
        return [aot.ConfigReport(**r) for r in json.loads(done.stdout)]

    arch = aot.GPU_TARGETS[target].arch
    blocks = lambda c, **extra: dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, **extra)  # noqa: E731
    schedule = dict(tile_group_ptr="*i32", tile_block_ptr="*i32", group_start_ptr="*i32", group_end_ptr="*i32")
    specs = (
        aot.KernelSpec(name="grouped-w8a8", fn=grouped_w8a8_kernel, mma="int8",
                       pointers=lambda c: dict(a_ptr="*i8", a_scale_ptr="*fp32", w_ptr="*i8", w_scale_ptr="*fp32",
                                               out_ptr="*bf16", **schedule),
                       constexprs=lambda c: blocks(c, RETURN_ACC=False), configs=lambda t: CONFIGS[arch]),
        aot.KernelSpec(name="grouped-w4a16", fn=grouped_w4a16_kernel, mma="16bit",
                       pointers=lambda c: dict(a_ptr="*bf16", w_ptr="*i8", w_scale_ptr="*fp32", w_zero_ptr="*i8",
                                               out_ptr="*bf16", **schedule),
                       constexprs=lambda c: blocks(c, ZERO_POINT=False, DOT_F32=False, GROUP_SIZE=128),
                       configs=lambda t: tuple(c.for_group(128) for c in CONFIGS[arch])),
    )
    return [aot._check_one(spec, cfg, target, sp) for spec in specs for cfg in spec.configs(target)
            for sp in aot.SPECIALIZATIONS]


if __name__ == "__main__":  # child process of `aot_reports` under the interpreter: reports as JSON on stdout
    print(json.dumps([dataclasses.asdict(r) for r in aot_reports(sys.argv[1])]))
