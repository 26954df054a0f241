"""Frozen block-size tables for the Pallas kernels: one per TPU generation, one for Pallas-on-GPU.

A config only chooses how the problem is tiled; it can never change numerics (group partials are
summed in the same order, integer accumulators are exact whatever the tiling — tested).
Wrappers shrink a block to the problem (M=1 decode, small N/K), so one table entry serves every
shape; the entries are sized for the generation's VMEM (v5e 128 MiB HBM / 16 MiB scoped VMEM
default, v6e and v5p 32 MiB scoped default) and MXU (v5e 4x 128x128, v6e 2x 256x256).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Family", "TileConfig", "GpuConfig", "TPU_CONFIGS", "GPU_CONFIGS", "TPU_GENERATIONS",
           "tpu_config", "gpu_config"]


class Family(enum.Enum):
    """Kernel families shipped by this package (one per accumulation scheme)."""

    W8A8 = "w8a8"  # int8 x int8 -> int32, one rescale
    W4A16 = "w4a16"  # float x int4/uint4 -> f32, per-group scale
    W4A8 = "w4a8"  # int8 x int4 -> int32 per group -> f32 across groups


@dataclass(frozen=True, kw_only=True, slots=True)
class TileConfig:
    """Block sizes (in logical, unpacked elements) for one TPU kernel; cannot change numerics.

    block_k must be a multiple of 256 so that a packed int4 block (block_k / 2 bytes) fills whole
    128-lane vregs, and a multiple of every group size it serves (tiles never straddle a group).
    """

    block_m: int
    block_n: int
    block_k: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            if getattr(self, name) <= 0 or getattr(self, name) % 32:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive multiple of 32 "
                                 f"(int8 sublane tile); choose e.g. 128")
        if self.block_n % 128 or self.block_k % 256:
            raise ValueError(f"block_n={self.block_n} must be a multiple of 128 and block_k={self.block_k} "
                             f"a multiple of 256 (lane width, packed int4 bytes); round them up")

    def describe(self) -> str:
        return f"bm{self.block_m}-bn{self.block_n}-bk{self.block_k}"


@dataclass(frozen=True, kw_only=True, slots=True)
class GpuConfig:
    """Block sizes and launch parameters for Pallas' Triton lowering; cannot change numerics."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16 (Triton tiles); e.g. 64")
        if self.block_k % 64:
            raise ValueError(f"block_k={self.block_k} must be a multiple of 64 (int8 MMA K=32 on packed halves)")

    def describe(self) -> str:
        return f"bm{self.block_m}-bn{self.block_n}-bk{self.block_k}-w{self.num_warps}-s{self.num_stages}"


TPU_GENERATIONS = ("v5e", "v6e", "v5p")

# v5e: 128x128 MXUs, smaller VMEM -> 512-wide tiles; v6e: 256x256 MXUs -> 256-multiples, larger K;
# v5p: 128x128 MXUs with more VMEM than v5e. W4A16/W4A8 keep block_k at 512 so that the per-group
# loop inside a block stays short for g=32 (8..16 groups per block).
TPU_CONFIGS: dict[str, dict[Family, TileConfig]] = {
    "v5e": {
        Family.W8A8: TileConfig(block_m=512, block_n=512, block_k=1024),
        Family.W4A16: TileConfig(block_m=256, block_n=512, block_k=512),
        Family.W4A8: TileConfig(block_m=256, block_n=512, block_k=512),
    },
    "v6e": {
        Family.W8A8: TileConfig(block_m=512, block_n=1024, block_k=1024),
        Family.W4A16: TileConfig(block_m=256, block_n=1024, block_k=512),
        Family.W4A8: TileConfig(block_m=256, block_n=1024, block_k=512),
    },
    "v5p": {
        Family.W8A8: TileConfig(block_m=512, block_n=1024, block_k=1024),
        Family.W4A16: TileConfig(block_m=256, block_n=512, block_k=1024),
        Family.W4A8: TileConfig(block_m=256, block_n=512, block_k=1024),
    },
}

# 8 warps for 128x128 int8 tiles: 4 warps spill on sm_80 (DESIGN.md section 6).
GPU_CONFIGS: dict[Family, GpuConfig] = {
    Family.W8A8: GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
    Family.W4A16: GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
    Family.W4A8: GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
}


def tpu_config(arch: str, family: Family) -> TileConfig:
    """The frozen config for TPU generation `arch` ('v5e', 'v6e', 'v5p')."""
    if arch not in TPU_CONFIGS:
        raise ValueError(f"no Pallas TPU config for {arch!r}; known generations: {', '.join(TPU_CONFIGS)}")
    return TPU_CONFIGS[arch][family]


def gpu_config(family: Family) -> GpuConfig:
    return GPU_CONFIGS[family]
