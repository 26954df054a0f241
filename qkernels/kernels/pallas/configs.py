"""Frozen block-size tables for the Pallas kernels: per TPU generation and M range, and for Pallas-on-GPU.

A config only chooses how the problem is tiled; it can never change numerics (group partials are
summed in the same order, integer accumulators are exact whatever the tiling — tested).
Wrappers shrink a block to the problem (M=1 decode, small N/K), so one table entry serves every
shape in its M range. Each TPU table is ordered by `max_m`, smallest first, and ends with an entry
for any M (`tpu_config` takes the first that serves M):

- decode (M <= 16): the activation block is the M rows themselves and the call is bound by
  streaming the weight from HBM, so the weight block is as wide as the scoped VMEM comfortably allows —
  fewer, larger DMAs and fewer grid steps (each step costs ~0.35 us of pipeline overhead);
- any M: square-ish tiles sized for the MXU (v5e/v5p 4x 128x128, v6e 2x 256x256).

Blocks must fit the generation's *scoped* VMEM default, the limit Mosaic compiles against
(`SCOPED_VMEM`, from `qkernels.hardware`; measured with libtpu: v5e 16 MiB, v6e 32 MiB, v5p 16 MiB);
`vmem_estimate` is an upper estimate of what a config uses, and `python -m qkernels.aot --target
tpu-v5e` compiles every table entry with the real compiler. v5p has two TensorCores per chip that
split the parallel grid axes, so its decode blocks keep N=4096 layers at two N blocks or more.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qkernels import hardware

__all__ = ["Family", "TileConfig", "GpuConfig", "TPU_CONFIGS", "GPU_CONFIGS", "TPU_GENERATIONS", "TPU_FAMILIES",
           "SCOPED_VMEM", "SMALL_M", "tpu_config", "tpu_configs", "gpu_config", "vmem_estimate"]


class Family(enum.Enum):
    """Kernel families shipped by this package (one per accumulation scheme)."""

    W8A8 = "w8a8"  # int8 x int8 -> int32, one rescale
    W4A16 = "w4a16"  # float x int4/uint4 -> f32, per-group scale
    W4A8 = "w4a8"  # int8 x int4 -> int32 per group -> f32 across groups
    FP8 = "fp8"  # float8_e4m3fn x float8_e4m3fn -> f32 (exact products), one rescale
    FP8A16 = "fp8a16"  # float x float8_e4m3fn (dequantized per channel in the kernel) -> f32; GPU only


@dataclass(frozen=True, kw_only=True, slots=True)
class TileConfig:
    """Block sizes (in logical, unpacked elements) for one TPU kernel; cannot change numerics.

    block_k must be a multiple of 256 so that a packed int4 block (block_k / 2 bytes) fills whole
    128-lane vregs, and a multiple of every group size it serves (tiles never straddle a group;
    `qkernels.kernels.pallas.tunable` checks this per problem). `max_m`: the config serves calls
    with M <= max_m (None: any M); it selects, it does not limit what the kernel can run.
    """

    block_m: int
    block_n: int
    block_k: int
    max_m: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "max_m"):
            v = getattr(self, name)
            if not (v is None and name == "max_m") and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"{name}={v!r} must be an int{' or None' if name == 'max_m' else ''}")
        for name in ("block_m", "block_n", "block_k"):
            if getattr(self, name) <= 0 or getattr(self, name) % 32:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive multiple of 32 "
                                 f"(int8 sublane tile); choose e.g. 128")
        if self.block_n % 128 or self.block_k % 256:
            raise ValueError(f"block_n={self.block_n} must be a multiple of 128 and block_k={self.block_k} "
                             f"a multiple of 256 (lane width, packed int4 bytes); round them up")
        if self.max_m is not None and self.max_m < 1:
            raise ValueError(f"max_m={self.max_m} must be a positive row count, or None for any M")

    @property
    def name(self) -> str:
        """Every field: 'bm32-bn2048-bk2048-M<=16', 'bm512-bn512-bk1024-anyM'."""
        return f"bm{self.block_m}-bn{self.block_n}-bk{self.block_k}-" + (
            "anyM" if self.max_m is None else f"M<={self.max_m}")

    def describe(self) -> str:
        return self.name

    def serves(self, m: int) -> bool:
        return self.max_m is None or m <= self.max_m

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TileConfig:
        """Inverse of `to_dict`; ValueError on anything else (unknown or missing keys, bad values)."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"a TileConfig is a JSON object, got {type(raw).__name__} {raw!r}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ValueError(f"unknown TileConfig keys {unknown}; the keys are {fields}")
        missing = [f for f in ("block_m", "block_n", "block_k") if f not in raw]
        if missing:
            raise ValueError(f"TileConfig {dict(raw)} lacks {missing}; give block_m, block_n, block_k "
                             f"(and optionally max_m)")
        return cls(**raw)


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


TPU_GENERATIONS = hardware.TPU_GENERATIONS
SCOPED_VMEM: dict[str, int] = {g: hardware.ARCHES[g].scoped_vmem_bytes for g in TPU_GENERATIONS}
"""Bytes of scoped VMEM each generation's Mosaic compiles against (`qkernels.hardware.ARCHES`)."""
SMALL_M = 16
"""Largest M of the decode entries (and of the tuner's small-M candidates)."""


def _decode(block_n: int, block_k: int) -> TileConfig:
    # block_m 32: the int8 sublane tile; an M <= 16 block is the full M extent anyway
    return TileConfig(block_m=32, block_n=block_n, block_k=block_k, max_m=SMALL_M)


# Decode: W8A8 streams 2048x2048 int8 weight blocks (v6e: 2048x4096 in its 32 MiB). The int4
# kernels unpack and dequantize the block in VMEM, which costs 2-12 B per weight element (see
# `vmem_estimate`), so their blocks are sized for the largest case (W4A16 with f32 activations,
# g32 and zero points; W4A8 g32) and keep block_k at 1024, past which the cost per element grows.
# Any M: v5e 512-wide tiles, v6e 256-multiples with larger N, v5p more K. W4A16/W4A8 keep
# block_k at 512-1024 so that the per-group loop inside a block stays short for g=32.
TPU_CONFIGS: dict[str, dict[Family, tuple[TileConfig, ...]]] = {
    "v5e": {
        Family.W8A8: (_decode(2048, 2048), TileConfig(block_m=512, block_n=512, block_k=1024)),
        Family.W4A16: (_decode(1024, 1024), TileConfig(block_m=256, block_n=512, block_k=512)),
        Family.W4A8: (_decode(2048, 1024), TileConfig(block_m=256, block_n=512, block_k=512)),
    },
    "v6e": {
        Family.W8A8: (_decode(2048, 4096), TileConfig(block_m=512, block_n=1024, block_k=1024)),
        Family.W4A16: (_decode(2048, 1024), TileConfig(block_m=256, block_n=1024, block_k=512)),
        Family.W4A8: (_decode(4096, 1024), TileConfig(block_m=256, block_n=1024, block_k=512)),
    },
    "v5p": {
        Family.W8A8: (_decode(2048, 2048), TileConfig(block_m=512, block_n=1024, block_k=1024)),
        Family.W4A16: (_decode(1024, 1024), TileConfig(block_m=256, block_n=512, block_k=1024)),
        Family.W4A8: (_decode(2048, 1024), TileConfig(block_m=256, block_n=512, block_k=1024)),
    },
}


# FP8 runs W8A8's kernel and blocks: its codes are one byte as int8 codes are, and its f32 accumulator
# is the size of the int32 one.
for _tables in TPU_CONFIGS.values():
    _tables[Family.FP8] = _tables[Family.W8A8]

TPU_FAMILIES: tuple[Family, ...] = tuple(f for f in Family if f in TPU_CONFIGS[TPU_GENERATIONS[0]])
"""Families with a TPU kernel and tables (FP8A16 has none: its Pallas kernel is the GPU one)."""


def _check_tables() -> None:
    """A table per TPU generation of `qkernels.hardware`; each: max_m strictly increasing, exactly one
    catch-all entry, last."""
    if tuple(TPU_CONFIGS) != TPU_GENERATIONS:
        raise ValueError(f"TPU_CONFIGS covers {tuple(TPU_CONFIGS)} but qkernels.hardware.TPU_GENERATIONS is "
                         f"{TPU_GENERATIONS}; give every generation a table (and only those)")
    for arch, per_family in TPU_CONFIGS.items():
        if tuple(per_family) != TPU_FAMILIES:
            raise ValueError(f"TPU_CONFIGS[{arch!r}] covers {[f.value for f in per_family]}, the other generations "
                             f"{[f.value for f in TPU_FAMILIES]}; give every generation the same families")
        for family, table in per_family.items():
            bounds = [c.max_m for c in table]
            finite = bounds[:-1]
            if not table or bounds[-1] is not None or None in finite or finite != sorted(set(finite)):
                raise ValueError(f"TPU_CONFIGS[{arch!r}][{family}] max_m {bounds}: order entries by increasing "
                                 f"max_m and end with one max_m=None entry")


_check_tables()

# 8 warps for 128x128 int8 tiles: 4 warps spill on sm_80 (DESIGN.md section 6).
GPU_CONFIGS: dict[Family, GpuConfig] = {
    Family.W8A8: GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
    Family.W4A16: GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
    Family.W4A8: GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
    Family.FP8: GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
    Family.FP8A16: GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
}


def tpu_configs(arch: str, family: Family) -> tuple[TileConfig, ...]:
    """The table of TPU generation `arch` ('v5e', 'v6e', 'v5p') for `family`, smallest max_m first."""
    if arch not in TPU_CONFIGS:
        raise ValueError(f"no Pallas TPU config for {arch!r}; known generations: {', '.join(TPU_CONFIGS)}")
    if family not in TPU_CONFIGS[arch]:
        raise ValueError(f"{family.value} has no Pallas TPU kernel (TPU families: "
                         f"{', '.join(f.value for f in TPU_FAMILIES)}); its Pallas kernel runs on CUDA GPUs")
    return TPU_CONFIGS[arch][family]


def tpu_config(arch: str, family: Family, *, m: int) -> TileConfig:
    """The table entry for a call with M rows (per batch) on TPU generation `arch`."""
    return next(c for c in tpu_configs(arch, family) if c.serves(m))


def gpu_config(family: Family) -> GpuConfig:
    return GPU_CONFIGS[family]


def _up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# Scoped VMEM per weight element of a (block_n x block_k) block in the int4 kernels: the
# double-buffered packed block, its scales and the unpacked, dequantized block. Measured from
# Mosaic's scoped-VMEM reports (libtpu of jax 0.10, TPU v5e, M=16, block_n 512 and 2048; the larger
# of bf16 and f32 activations), by block_k <= 512, 1024, 2048, more. Keyed by (group size <= 64,
# zero point): small groups and zero points lengthen the per-group select chain that builds the
# scale and zero planes. The last column (block_k 4096) is extrapolated except W4A16 g128, and so is
# g32 with zero points at block_k 512 (a compile at the 16 MiB default passes there).
_INT4_BYTES_PER_WEIGHT = {
    Family.W4A16: {(False, False): (2.8, 2.2, 3.8, 4.6), (False, True): (6.6, 2.9, 5.7, 7.5),
                   (True, False): (8.2, 4.8, 5.2, 6.5), (True, True): (12.0, 8.5, 10.9, 13.0)},
    Family.W4A8: {(False, False): (1.8, 1.4, 1.3, 1.2), (True, False): (2.6, 1.9, 1.6, 1.5)},
}


def vmem_estimate(config: TileConfig, family: Family, *, m: int, act_bytes: int = 2, group: int | None = None,
                  zero_point: bool = False) -> int:
    """Estimate (bytes, 15% margin) of the scoped VMEM the TPU kernel of `family` uses with `config`
    for M rows (per batch), to keep configs under `SCOPED_VMEM`.

    Weight-side: W8A8 (and FP8) its double-buffered one-byte block; int4 kernels `_INT4_BYTES_PER_WEIGHT` per
    element. Row-side: double-buffered activation and output blocks (at most f32), the accumulator
    and the [bm, bn] dot results; plus 0.5 MiB of Mosaic's own scratch. Against 70 of Mosaic's
    reports on v5e (M=16 decode blocks 512..4096 wide, the any-M tables at M=1024) it is 19% to 3x
    above, never below.
    `act_bytes`: itemsize of float activations (W4A16; integer recipes read int8); `group`: the
    recipe's group size (int4 families; None counts as 128).
    """
    bm = _up(min(config.block_m, m), 8)
    bn, bk = config.block_n, config.block_k
    f32 = 4
    rows = 2 * bm * bn * f32 + bm * bn * f32  # output blocks, accumulator
    if family in (Family.W8A8, Family.FP8):
        weight = 2 * bn * bk + 2 * 8 * bn * f32  # int8 block, scales
        rows += 2 * bm * (bk + 128 * f32) + bm * bn * f32  # codes, per-row scales; one dot result
    else:
        column = 0 if bk <= 512 else 1 if bk <= 1024 else 2 if bk <= 2048 else 3
        table = _INT4_BYTES_PER_WEIGHT[family]
        per_weight = table[(group or 128) <= 64, zero_point and family is Family.W4A16][column]
        weight = int(per_weight * bn * bk)
        a = bm * bk * act_bytes if family is Family.W4A16 else bm * (bk + 128 * f32)
        rows += 2 * a + 2 * bm * bn * f32  # activation blocks; dot results of the two nibble halves
    return int(1.15 * (weight + rows + 2**19))
