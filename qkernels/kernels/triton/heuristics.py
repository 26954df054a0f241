"""Which Triton config runs a matmul when no tuned table has one: pure functions of the problem.

| M                          | kernel                                                           |
|----------------------------|------------------------------------------------------------------|
| M <= 4 (not W4A8)          | GEMV: no tensor cores, the packed weight streamed once           |
| M <= 16, or too few tiles  | the family's small tile, split along K until the tiles fill SMs  |
| larger                     | the family's `CONFIGS` table pick                                |

Decode is memory-bound: what matters is that every SM has a weight stream in flight (column tiles
x K splits >= SM count) and wide loads, not MMA throughput. 'interpret' (the CPU interpreter) gets
small blocks for speed but the same kernel variants, so tests exercise GEMV and split-K.
SM / CU counts come from `qkernels.hardware` (the device kind's own, else its arch's typical part).
"""

from __future__ import annotations

import dataclasses
import importlib

import triton

from qkernels import hardware
from qkernels.kernels.triton._common import ARCHS, Kernel, MatmulConfig, pick_config

__all__ = ["FAMILIES", "GEMV_MAX_M", "SPLIT_MAX_M", "heuristic", "candidates", "check", "resolve"]

FAMILIES = ("w8a8", "w4a8", "w4a16", "w8a16", "fp8", "fp8a16")
GEMV_MAX_M = 4
"""Rows up to which the heuristic picks GEMV (a GEMV config itself may hold up to 16)."""
SPLIT_MAX_M = 16

_GROUPED = ("w4a16", "w4a8")
_INT4 = ("w4a16", "w4a8")
# GEMV product tile [BLOCK_M, BLOCK_N, BLOCK_K] elements per thread: 64 keeps it in registers.
_GEMV_PER_THREAD = 64
_GEMV_WARPS = 4


def _validate(family: str, arch: str, group_size: int | None) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} has no Triton kernel; choose from {FAMILIES}")
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} has no Triton config table; choose from {ARCHS}")
    if family in _GROUPED and not group_size:
        raise ValueError(f"{family} needs a group_size (got {group_size!r})")


def _table(family: str) -> dict[str, tuple[MatmulConfig, ...]]:
    # Imported on use: the family modules call `heuristic` from their launchers.
    return importlib.import_module(f"qkernels.kernels.triton.{family}").CONFIGS


def _effective(config: MatmulConfig, family: str, group_size: int | None) -> MatmulConfig:
    """The config as the launcher runs it: BLOCK_K clamped to the group size for grouped weights."""
    return config.for_group(group_size) if family in _GROUPED and group_size else config


def _k_blocks(k: int, block_k: int) -> int:
    return max(triton.cdiv(k, block_k), 1)


def _split(work_units: int, sms: int, k_blocks: int) -> int:
    """Smallest power-of-two K split that gives every SM a program, keeping >= 2 K tiles per split
    (a one-tile split spends more on its partial's round trip than on the weight it streams)."""
    cap = max(1, min(16, k_blocks // 2))
    split = 1
    while work_units * split < sms and split * 2 <= cap:
        split *= 2
    return split


def _gemv(family: str, arch: str, m: int, n: int, k: int, group_size: int | None, sms: int) -> MatmulConfig:
    block_m = triton.next_power_of_2(max(m, 1))
    budget = _GEMV_PER_THREAD * 32 * _GEMV_WARPS
    # int8 rows: 256 bytes per tile row (16-byte loads over 16 lanes); int4: BLOCK_K <= group size.
    block_k = min(256, group_size) if family in _INT4 else 256
    while block_m * 16 * block_k > budget and block_k > 32:
        block_k //= 2
    block_n = max(16, min(64, budget // (block_m * block_k)))
    split = _split(triton.cdiv(n, block_n), sms, _k_blocks(k, block_k))
    return MatmulConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=_GEMV_WARPS,
                        num_stages=2 if arch == "gfx942" else 3, kernel=Kernel.GEMV, split_k=split)


def _interpret(family: str, m: int, n: int, k: int, group_size: int | None) -> tuple[MatmulConfig, str]:
    block_k = min(32, group_size) if family in _GROUPED and group_size else 32
    split = min(2, _k_blocks(k, block_k))
    if m <= GEMV_MAX_M and family != "w4a8":
        cfg = MatmulConfig(block_m=triton.next_power_of_2(max(m, 1)), block_n=16, block_k=32, num_warps=1,
                           num_stages=1, kernel=Kernel.GEMV, split_k=split)
        return cfg, f"interpreter, M={m} <= {GEMV_MAX_M}: small GEMV, split {split}"
    if m <= SPLIT_MAX_M and family != "w4a8":
        cfg = MatmulConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1, split_k=split)
        return cfg, f"interpreter, M={m} <= {SPLIT_MAX_M}: small tile, split {split}"
    return pick_config(_table(family), "interpret", m), f"interpreter, M={m}: small tile"


def heuristic(family: str, arch: str, device: str, m: int, n: int, k: int,
              group_size: int | None) -> tuple[MatmulConfig, str]:
    """(config, one-line reason) for `family` on `arch` / `device` (device kind, '' if unknown)."""
    _validate(family, arch, group_size)
    if arch == "interpret":
        return _interpret(family, m, n, k, group_size)
    sms = hardware.units(arch, device)
    where = f"{sms} {'CUs' if arch == 'gfx942' else 'SMs'}"
    if m <= GEMV_MAX_M and family != "w4a8":
        cfg = _gemv(family, arch, m, n, k, group_size, sms)
        tiles = triton.cdiv(n, cfg.block_n)
        return cfg, f"M={m} <= {GEMV_MAX_M}: GEMV, {tiles} column tiles x split {cfg.split_k} for {where}"
    base = pick_config(_table(family), arch, m)
    tiles = triton.cdiv(m, base.block_m) * triton.cdiv(n, base.block_n)
    if family == "w4a8":
        return base, f"M={m}: W4A8 table tile ({tiles} tiles; W4A8 has no split-K or GEMV)"
    if tiles >= sms:
        return base, f"M={m}: table tile, {tiles} tiles fill {where}"
    eff = _effective(base, family, group_size)
    split = _split(tiles, sms, _k_blocks(k, eff.block_k))
    if split == 1:
        return base, f"M={m}: table tile, {tiles} tiles for {where} (K={k} too short to split)"
    cfg = dataclasses.replace(base, split_k=split, max_m=None)
    return cfg, f"M={m}: {tiles} tiles x split-K {split} for {where}"


def _variants(family: str, arch: str, m: int) -> list[MatmulConfig]:
    if arch == "interpret":
        gemv = [MatmulConfig(block_m=triton.next_power_of_2(max(m, 1)), block_n=bn, block_k=32, num_warps=1,
                             num_stages=1, kernel=Kernel.GEMV, split_k=s) for bn in (16, 32) for s in (1, 2)]
        tiles = [MatmulConfig(block_m=16, block_n=bn, block_k=32, num_warps=1, num_stages=1, split_k=s)
                 for bn in (16, 32) for s in (1, 2, 4)]
        return (gemv if m <= SPLIT_MAX_M else []) + tiles
    stages = 2 if arch == "gfx942" else 3
    out: list[MatmulConfig] = []
    if m <= SPLIT_MAX_M:
        block_m = triton.next_power_of_2(max(m, 1))
        out += [MatmulConfig(block_m=block_m, block_n=bn, block_k=bk, num_warps=_GEMV_WARPS, num_stages=stages,
                             kernel=Kernel.GEMV, split_k=s)
                for bn in (16, 32, 64) for bk in (128, 256) for s in (1, 2, 4)
                if block_m * bn * bk <= 2 * _GEMV_PER_THREAD * 32 * _GEMV_WARPS]
    tile_ms = (16,) if m <= SPLIT_MAX_M else (64, 128)
    out += [MatmulConfig(block_m=bm, block_n=bn, block_k=128 if bm == 16 else 64, num_warps=4 if bm == 16 else 8,
                         num_stages=stages, split_k=s)
            for bm in tile_ms for bn in (32, 64, 128) for s in (1, 2, 4, 8)]
    return out


def candidates(family: str, arch: str, device: str, m: int, n: int, k: int,
               group_size: int | None) -> tuple[MatmulConfig, ...]:
    """Configs worth timing for the problem (the heuristic pick first, the table's, then variants);
    every one runs the problem (`check` is None), none repeats another as the launcher runs it."""
    _validate(family, arch, group_size)
    pick, _ = heuristic(family, arch, device, m, n, k, group_size)
    seen: dict[MatmulConfig, MatmulConfig] = {}
    for cfg in (pick, *_table(family)[arch], *_variants(family, arch, m)):
        if check(cfg, family, m, k, group_size) is None:
            seen.setdefault(_effective(cfg, family, group_size), cfg)
    return tuple(seen.values())


def check(config: MatmulConfig, family: str, m: int, k: int, group_size: int | None) -> str | None:
    """Why `config` cannot run a `family` matmul with M rows and K columns, or None if it can.

    Every config runs every W8A8 / W8A16 / W4A16 problem: a GEMV config tiles any M (re-reading
    the weight per BLOCK_M rows, so the heuristic keeps it to M <= 4) and a split count above the
    number of K tiles launches only the non-empty splits (`splitk.k_split`).
    """
    if family not in FAMILIES:
        return f"family {family!r} has no Triton kernel; choose from {FAMILIES}"
    if family in _GROUPED and not group_size:
        return f"{family} needs a group_size"
    cfg = _effective(config, family, group_size)
    if family == "w4a8" and (cfg.kernel is not Kernel.TILE or cfg.split_k > 1):
        return (f"W4A8 runs its tile kernel only (kernel=tile, split_k=1), not {cfg.name}: its per-group "
                f"f32 rescale happens inside the K loop, so int32 partials cannot be summed across splits")
    return None


def resolve(config: MatmulConfig | None, family: str, arch: str, device: str, m: int, n: int, k: int,
            group_size: int | None) -> MatmulConfig:
    """The config a launcher runs: `config`, or the heuristic's; raises ValueError if it cannot run."""
    cfg = config if config is not None else heuristic(family, arch, device, m, n, k, group_size)[0]
    why = check(cfg, family, m, k, group_size)
    if why:
        raise ValueError(f"config {cfg.name} cannot run this {family} matmul: {why}")
    return _effective(cfg, family, group_size)
