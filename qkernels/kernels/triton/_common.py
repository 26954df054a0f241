"""Shared pieces of the Triton kernel families: configs, arch lookup, dtypes, rounding, checks.

Configs are frozen dataclasses (block sizes, warps, stages); they change speed, never numerics:
every family accumulates integer products exactly and rescales in DESIGN.md section 4's order
whatever the tile shape (a test proves two configs give identical integer outputs).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from qkernels import hardware
from torch_bindings.ops import device_of as device_kind_of  # noqa: F401  (one definition, re-exported)
from torch_bindings.ops import platform_of

__all__ = [
    "Kernel", "MatmulConfig", "QuantizeConfig", "ARCHS", "interpreting", "platform_of", "arch_of", "pick_config",
    "TORCH_DTYPES", "torch_dtype", "device_kind_of", "rint_half_even", "round_to_bf16", "round_to_e4m3",
    "as_fnuz", "unpack_int4_tile",
    "Output", "check_device", "dot_upcast", "batch_stride", "store_rescaled",
]

ARCHS = ("sm_80", "sm_90", "gfx942", "interpret")
"""Config tables every family ships: three deployment targets and small blocks for the interpreter."""

_FLOAT_OUT = ("float32", "float16", "bfloat16")

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """torch dtype for an output dtype name ('bfloat16') or a torch dtype (returned as is)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in TORCH_DTYPES or name == "int8":
        raise ValueError(f"out_dtype={name!r} is not supported by the Triton kernels; use one of {_FLOAT_OUT}")
    return TORCH_DTYPES[name]


class Kernel(enum.Enum):
    """Which kernel a `MatmulConfig` runs.

    TILE: the tensor-core kernel of the family (`tl.dot` on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]
          tiles), optionally split along K.
    GEMV: the no-tensor-core kernel for a few rows (`qkernels.kernels.triton.gemv`): each program
          streams a [BLOCK_N, BLOCK_K] weight tile once and reduces it with `tl.sum` for all M rows.
    """

    TILE = "tile"
    GEMV = "gemv"


_GEMV_MAX_M = 16  # a GEMV program holds every row: beyond 16 the tile kernel's MMA wins


@dataclass(frozen=True, kw_only=True, slots=True)
class MatmulConfig:
    """Kernel variant, tile shape, K split and pipelining of a matmul. Cannot change numerics (only speed).

    `max_m`: this config is chosen for calls with M <= max_m (None: any M); a family's table is
    ordered from the smallest `max_m` up, the first that covers M wins.
    `kernel`: `Kernel.TILE` (tensor cores; every block >= 16) or `Kernel.GEMV` (no MMA; M <= block_m,
    block_m may be 1..16).
    `split_k`: K is cut into up to `split_k` ranges, each a whole number of BLOCK_K tiles (so a
    range never straddles a quantization group), computed by separate programs; their partials
    (int32 for integer recipes: exact; f32 for float recipes) are summed in fixed split order by
    `qkernels.kernels.triton.splitk` before the rescale, so integer outputs stay bit-exact.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8
    max_m: int | None = None
    kernel: Kernel = Kernel.TILE
    split_k: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.kernel, Kernel):
            raise ValueError(f"kernel={self.kernel!r} is not one of {[k.value for k in Kernel]}")
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v!r} must be a power of two")
        if self.kernel is Kernel.TILE and min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError(f"blocks {self.block_m}x{self.block_n}x{self.block_k}: tl.dot needs every "
                             f"block dimension >= 16 (use kernel=Kernel.GEMV for fewer rows)")
        if self.kernel is Kernel.GEMV and (self.block_m > _GEMV_MAX_M or min(self.block_n, self.block_k) < 16):
            raise ValueError(f"GEMV blocks {self.block_m}x{self.block_n}x{self.block_k}: block_m must be <= "
                             f"{_GEMV_MAX_M} (use the tile kernel for more rows) and block_n, block_k >= 16")
        if not isinstance(self.split_k, int) or not 1 <= self.split_k <= 16:
            raise ValueError(f"split_k={self.split_k!r} must be an integer in 1..16")
        if self.num_stages < 1 or self.group_m < 1:
            raise ValueError(f"num_stages={self.num_stages} and group_m={self.group_m} must be >= 1")
        if self.max_m is not None and self.max_m < 1:
            raise ValueError(f"max_m={self.max_m} must be >= 1 or None")

    @property
    def name(self) -> str:
        """'m16n64k128w4s4' (tile, as the aot reports name it), '...-sk4' split, 'gemv-m4n64k256w4s2-sk2'."""
        base = f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}"
        prefix = "gemv-" if self.kernel is Kernel.GEMV else ""
        suffix = f"-sk{self.split_k}" if self.split_k > 1 else ""
        return prefix + base + suffix

    def for_group(self, group_size: int) -> MatmulConfig:
        """This config with BLOCK_K clamped to the group size, so that no K tile straddles a group.

        Both are powers of two, so the clamped BLOCK_K divides the group size (DESIGN.md section 4).
        """
        if self.block_k <= group_size:
            return self
        return dataclasses.replace(self, block_k=group_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the kernel by its value); `from_dict` is the inverse."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["kernel"] = self.kernel.value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MatmulConfig:
        """Strict inverse of `to_dict`: unknown keys, missing required keys or bad values raise ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a MatmulConfig is a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown MatmulConfig keys {unknown}; known: {sorted(fields)}")
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in d]
        if missing:
            raise ValueError(f"MatmulConfig keys {missing} are missing from {dict(d)}")
        kw = dict(d)
        for n, v in kw.items():
            if n == "kernel" or (n == "max_m" and v is None):
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"MatmulConfig {n}={v!r} must be an integer")
        if "kernel" in kw:
            try:
                kw["kernel"] = Kernel(kw["kernel"])
            except ValueError:
                raise ValueError(f"kernel={kw['kernel']!r} is not one of {[k.value for k in Kernel]}") from None
        return cls(**kw)


@dataclass(frozen=True, kw_only=True, slots=True)
class QuantizeConfig:
    """Rows per program and K chunk of the activation-quantize kernel. Cannot change numerics."""

    block_rows: int
    block_k: int
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_rows", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two")

    @property
    def name(self) -> str:
        return f"r{self.block_rows}k{self.block_k}w{self.num_warps}"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=64)  # launchers ask per call; a device's capability never changes
def arch_of(device: torch.device) -> str:
    """Config table for a tensor's device: 'sm_80', 'sm_90', 'gfx942' or 'interpret'.

    `hardware.table_arch` decides: sm_86/sm_89 use the sm_80 table (same mma.sync instructions);
    sm_90 and newer the sm_90 table.
    """
    if device.type == "cpu":
        if not interpreting():
            raise RuntimeError("the Triton kernels got CPU tensors but TRITON_INTERPRET is not '1'; move the "
                               "tensors to a GPU, or set TRITON_INTERPRET=1 before importing triton (slow, "
                               "for tests)")
        return "interpret"
    if device.type != "cuda":
        raise RuntimeError(f"the Triton kernels run on CUDA/ROCm devices, not {device.type!r}")
    platform = platform_of(device)
    arch = hardware.table_arch(platform)
    if arch in ARCHS:
        return arch
    if platform.startswith("rocm:"):
        raise RuntimeError(f"ROCm GPU {platform.removeprefix('rocm:')} has no Triton config table; the Triton "
                           f"kernels ship tables for gfx942 (MI300) only")
    raise RuntimeError(f"GPU compute capability {platform.removeprefix('cuda:')} is below sm_80; the Triton kernels "
                       f"need int8/bf16 tensor cores (Ampere or newer)")


def pick_config(table: Mapping[str, tuple[MatmulConfig, ...]], arch: str, m: int) -> MatmulConfig:
    """First config of `table[arch]` whose `max_m` covers `m`."""
    for cfg in table[arch]:
        if cfg.max_m is None or m <= cfg.max_m:
            return cfg
    return table[arch][-1]


def check_device(*tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) != 1:
        raise ValueError(f"operands are on different devices {sorted(map(str, devices))}; move them to one")
    return present[0].device


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order (Triton tutorial 03): GROUP_M row tiles
    sweep all column tiles together, so their weight tiles stay in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_rows)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows
    return pid_m, pid_n


@triton.jit
def store_rescaled(acc, out_ptrs, mask, a_scale_ptrs, w_scale_ptrs, bias_ptrs, m_ok, n_ok,
                   RESCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store a whole-K accumulator [BLOCK_M, BLOCK_N] through DESIGN.md section 4's epilogue:
    W8A8 (RESCALE) `(f32(acc) * s_rhs[n]) * s_lhs[m]` (weight scale first: only the last multiply can
    overflow, `Recipe.check_weight_scale`), then `+ bias[n]`, then one cast to the output dtype. The tile, GEMV and split-K reduce kernels all end here, so they round alike."""
    y = acc
    if RESCALE:
        s_a = tl.load(a_scale_ptrs, mask=m_ok, other=1.0)  # [BLOCK_M]
        s_w = tl.load(w_scale_ptrs, mask=n_ok, other=1.0)  # [BLOCK_N]
        y = (acc.to(tl.float32) * s_w[None, :]) * s_a[:, None]  # [BLOCK_M, BLOCK_N] f32
    if HAS_BIAS:
        y = y.to(tl.float32) + tl.load(bias_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def rint_half_even(y):
    """Round f32 to the nearest integer, ties to even (numpy.rint), for |y| < 2**23.

    Written with floor because libdevice `rint` does not run in the interpreter; exact in f32
    (`y - floor(y)` is exact below 2**23) and, with FMA contraction off, the same on every target.
    Callers pass |y| <= qmax (1 + 2**-23), far inside the exact range.
    """
    r = tl.floor(y)
    frac = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)


@triton.jit
def round_to_e4m3(y):
    """f32 |y| <= 448 -> the nearest float8_e4m3fn value, ties to even, kept in f32 (the sign kept: -0 too).

    The quantum of e4m3 around y is 2**(e - 3) for y's exponent e >= -6, and 2**-9 below (subnormal
    codes), so `rint_half_even(y / q) * q` with a power-of-two q, exact in f32, is the correctly
    rounded value. Written out because the interpreter's f32 -> fp8 cast rounds ties away and flushes
    subnormal codes (measured, triton 3.9: 1.0625 -> 1.125, 3 * 2**-10 -> 2**-9); a compiled kernel's
    `cvt.rn.satfinite` would agree, this keeps every target and the interpreter identical.
    """
    bits = y.to(tl.uint32, bitcast=True)
    e = tl.maximum((bits >> 23) & 0xFF, 121)  # biased exponent, at least that of 2**-6
    quantum = ((e - 3) << 23).to(tl.float32, bitcast=True)  # 2**(e - 127 - 3)
    inverse = ((257 - e) << 23).to(tl.float32, bitcast=True)  # 1 / quantum, exactly
    r = tl.abs(rint_half_even(y * inverse) * quantum)
    return tl.where((bits >> 31) == 1, -r, r)


@triton.jit
def as_fnuz(codes):
    """float8_e4m3fn codes -> the same bytes as float8_e4m3fnuz (gfx942's MFMA type), which read as half
    the e4m3fn value (exponent bias 8, not 7; the top exponent is finite in both), except 0x80: -0 in
    e4m3fn, NaN in fnuz, so it becomes +0. A dot of fnuz-read codes is exactly 1/4 of the e4m3fn dot.
    Finite codes only (quantization never writes NaN)."""
    b = codes.to(tl.uint8, bitcast=True)
    return tl.where(b == 0x80, tl.zeros_like(b), b).to(tl.float8e4b8, bitcast=True)


@triton.jit
def unpack_int4_tile(packed, SIGNED: tl.constexpr):
    """[BLOCK_N, BLOCK_K // 2] int8 bytes -> [BLOCK_N, BLOCK_K] int8 codes (low nibble = even k)."""
    if SIGNED:
        lo = (packed << 4) >> 4  # arithmetic shift sign-extends the nibble
        hi = packed >> 4
    else:
        lo = packed & 0xF
        hi = (packed >> 4) & 0xF
    return tl.interleave(lo, hi)


@triton.jit
def round_to_bf16(x):
    """f32 -> the nearest bf16 value (ties to even), kept in f32. For the interpreter only.

    The interpreter's f32 -> bf16 cast truncates (DESIGN.md section 6); compiled kernels cast
    with `.to(tl.bfloat16)`, which rounds to nearest even. Finite inputs only.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def w4a16_step(acc, a_ptrs, w_ptrs, s_ptrs, z_ptrs, k0, offs_k, offs_kb, m_ok, n_ok, K, K_STORED, stride_ak,
               stride_wk, stride_wsg, stride_wzg, GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
               DOT_F32: tl.constexpr):
    """One BLOCK_K step of a W4A16 tile (dense and grouped kernels): the activation tile and the packed
    int4 weight tile at k0, dequantized as the reference does (`(f32(q) - zero) * scale`, one scale and
    zero per tile row: BLOCK_K divides the group size), cast to the activation dtype, one MMA into `acc`."""
    g = k0 // GROUP_SIZE
    k_ok = offs_k < K - k0
    kb_ok = offs_kb < K_STORED - k0 // 2
    a = tl.load(a_ptrs + k0 * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
    packed = tl.load(w_ptrs + (k0 // 2) * stride_wk, mask=n_ok[:, None] & kb_ok[None, :], other=0)
    q = unpack_int4_tile(packed, not ZERO_POINT).to(tl.float32)  # [BLOCK_N, BLOCK_K]
    scale = tl.load(s_ptrs + g * stride_wsg, mask=n_ok, other=1.0)  # [BLOCK_N]
    if ZERO_POINT:
        zero = tl.load(z_ptrs + g * stride_wzg, mask=n_ok, other=0).to(tl.float32)  # [BLOCK_N]
        q = q - zero[:, None]
    w = q * scale[:, None]  # [BLOCK_N, BLOCK_K] f32
    if DOT_F32:  # interpreter only: its bf16 dot and bf16 cast are wrong; f32 holds bf16 values exactly
        return tl.dot(a.to(tl.float32), tl.trans(round_to_bf16(w)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(w.to(a_ptrs.dtype.element_ty)), acc, out_dtype=tl.float32)


class Output:
    """Output buffer of a launcher, with the interpreter's f32 -> bf16 truncation worked around.

    The interpreter casts f32 to bf16 by truncation instead of round-to-nearest-even (DESIGN.md
    section 6), so under interpretation a bf16 result is written as f32 by the kernel and rounded
    by torch (which rounds to nearest even), exactly what a compiled kernel's cast does.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        store = torch.float32 if (interpreting() and dtype == torch.bfloat16) else dtype
        self.buffer = torch.empty(shape, dtype=store, device=device)

    def result(self) -> torch.Tensor:
        return self.buffer if self.buffer.dtype == self.dtype else self.buffer.to(self.dtype)


def dot_upcast(act_dtype: torch.dtype) -> bool:
    """Whether a float MMA must run on f32-upcast operands: the interpreter's bf16 tl.dot is wrong."""
    return interpreting() and act_dtype == torch.bfloat16


def batch_stride(t: torch.Tensor, batched_ndim: int) -> int:
    """Stride of the leading batch axis of an operand with `batched_ndim` axes when batched; 0 for
    an operand with fewer axes, shared by every batch (a 2-D weight with a 3-D lhs)."""
    return t.stride(0) if t.dim() == batched_ndim else 0
