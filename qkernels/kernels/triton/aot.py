"""Compile every shipped Triton config for sm_80 / sm_90 / gfx942 with no GPU, and check the machine code.

`check(target)` (used by `python -m qkernels.aot --target sm_80`) compiles, for `target`, each
family's table configs, the heuristic's decode/split-K/GEMV picks (`matmul_variants`), every config
of the tuned tables shipped for the target's device kinds, the GEMV kernel and the split-K reduce,
with `triton.compile(ASTSource(...), target=GPUTarget(...))`, in both forms the JIT specializes a call
into (`SPECIALIZATIONS`: every integer argument a multiple of 16, as model shapes give, and none, as odd
K / N / M give; aligned pointers, unit K strides, bf16 activations/outputs, bias on), then reads the
machine code: SASS through the wheel's `cuobjdump` (tensor-core instruction, registers, spills) or
the AMDGCN text (v_mfma, VGPRs, spills, LDS). A config fails if it does not compile, lacks the
expected tensor-core instruction, spills in the divisible form, or uses more shared memory than the
target has (`Specialization`). This also warms Triton's compilation cache.
Targets, their device kinds, shared-memory limits and instruction patterns are `qkernels.hardware`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from qkernels import hardware, numerics, tuning
from qkernels.aot import ConfigReport
from qkernels.kernels.triton import fp8, gemv, heuristics, quantize, splitk, tunable, w4a8, w4a16, w8a8, w8a16
from qkernels.kernels.triton._common import Kernel, MatmulConfig, interpreting
from qkernels.shapes import shape_set

__all__ = ["check", "GPU_TARGETS"]


GPU_TARGETS: dict[str, hardware.AotTarget] = {
    name: t for name, t in hardware.AOT_TARGETS.items() if t.backend == tunable.BACKEND}
"""The `qkernels.hardware` AOT targets this module compiles for ('sm_80', 'sm_89', 'sm_90', 'gfx942')."""

# Strides of the contiguous (K, or N for outputs) axis: the JIT specializes a stride of 1 to a constant.
_UNIT_STRIDES = {"stride_ak", "stride_wk", "stride_on", "stride_xk", "stride_qk"}
_GROUP = 128  # group size compiled for the grouped families (BLOCK_K is clamped to it)


@dataclass(frozen=True, kw_only=True, slots=True)
class Variant:
    """One compiled form of a matmul config: split-K only changes the grid and K range (runtime
    arguments), but a split kernel stores raw partials (another constexpr and output dtype)."""

    cfg: MatmulConfig
    partial: bool

    @property
    def name(self) -> str:
        base = dataclasses.replace(self.cfg, split_k=1).name
        return f"{base}-partial" if self.partial else base

    @property
    def num_warps(self) -> int:
        return self.cfg.num_warps

    @property
    def num_stages(self) -> int:
        return self.cfg.num_stages


@dataclass(frozen=True, kw_only=True, slots=True)
class ReduceVariant:
    """The split-K reduce kernel at one row block (`splitk.reduce_block_m` of M = 1..16)."""

    block_m: int
    num_stages: int = 1

    @property
    def num_warps(self) -> int:
        return splitk.reduce_num_warps(self.block_m)

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{splitk.REDUCE_BLOCK_N}w{self.num_warps}"


@dataclass(frozen=True, kw_only=True, slots=True)
class KernelSpec:
    """One kernel as compiled ahead of time: pointer dtypes, constexprs, configs, expected MMA."""

    name: str
    fn: Any
    pointers: Callable[[Any], dict[str, str]]
    constexprs: Callable[[Any], dict[str, Any]]
    configs: Callable[[str], tuple[Any, ...]]  # of a target name
    mma: str | None  # 'int8', '16bit', 'fp8' or None (no matmul)


def _shipped(family: str, arch: str) -> list[MatmulConfig]:
    """Configs of `family` in the tables shipped in the package for device kinds of `arch`."""
    out: list[MatmulConfig] = []
    for path in sorted(tuning.SHIPPED_DIR.glob(f"{tunable.BACKEND}-*.json")):
        device = path.stem.removeprefix(f"{tunable.BACKEND}-")
        kind = hardware.device(device)
        if kind is None or kind.arch != arch:
            continue
        table = tuning.load_table(path, tunable.TUNABLE, device)
        out += [e.config for e in (table.entries if table else ()) if e.key.family == family]
    return out


@functools.lru_cache(maxsize=None)  # the tile and GEMV specs of a family both filter this
def matmul_variants(family: str, target: str, group_size: int | None) -> tuple[Variant, ...]:
    """Every compiled form a `family` call on `target` can run: the family's table for its arch, the
    heuristic's picks for decode and model shapes on the target's device kinds, the shipped tuned tables."""
    arch = GPU_TARGETS[target].arch
    configs = list(importlib.import_module(f"qkernels.kernels.triton.{family}").CONFIGS[arch])
    for device in GPU_TARGETS[target].devices:
        for shape in (*shape_set("decode-sweep"), *shape_set("model")):
            if shape.batch is None:
                configs.append(heuristics.heuristic(family, arch, device, shape.m, shape.n, shape.k, group_size)[0])
    configs += _shipped(family, arch)
    seen: dict[Variant, None] = {}
    for cfg in configs:
        eff = cfg.for_group(group_size) if group_size else cfg
        seen[Variant(cfg=dataclasses.replace(eff, split_k=1, max_m=None), partial=cfg.split_k > 1)] = None
    return tuple(seen)


def _blocks(cfg: MatmulConfig, **extra: Any) -> dict[str, Any]:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, **extra)


def _runs(kernel: Kernel, family: str, group_size: int | None = None) -> Callable[[str], tuple[Variant, ...]]:
    """The spec's `configs`: the `family` variants on a target that run `kernel`."""
    return lambda target: tuple(v for v in matmul_variants(family, target, group_size) if v.cfg.kernel is kernel)


def _out(v: Variant, partial: str, final: str = "*bf16") -> dict[str, str]:
    return dict(out_ptr=partial if v.partial else final)


def _fp8_only(configs: Callable[[str], tuple[Any, ...]],
              backend: str | None = None) -> Callable[[str], tuple[Any, ...]]:
    """`configs` on the targets whose GPU multiplies fp8 (`hardware.fp8_mma_reason`; of `backend` only, if
    given), none elsewhere: Triton refuses the fp8e4nv type below sm_89."""
    def on(target: str) -> tuple[Any, ...]:
        gpu = GPU_TARGETS[target]
        ok = hardware.fp8_mma_reason(hardware.aot_sm(gpu)) is None and backend in (None, gpu.gpu[0])
        return configs(target) if ok else ()
    return on


def _gemv_spec(family: str, weight: gemv.GemvWeight, act: str, group_size: int | None) -> KernelSpec:
    int_act = family in ("w8a8", "fp8")  # activations arrive as codes with per-row scales
    float_codes = family == "fp8"
    codes = "*fp8e4nv" if family.startswith("fp8") else "*i8"
    acc = "*i32" if int_act and not float_codes else "*fp32"
    suffix = "-zp" if weight.zero_point else ""
    configs = _runs(Kernel.GEMV, family, group_size)
    return KernelSpec(
        name=f"gemv-{family}{suffix}", fn=gemv.gemv_kernel,
        pointers=lambda v: dict(a_ptr=act, a_scale_ptr="*fp32", w_ptr=codes, w_scale_ptr="*fp32", w_zero_ptr="*i8",
                                bias_ptr="*fp32" if int_act else "*bf16", **_out(v, acc)),
        constexprs=lambda v: dict(**weight.constexprs(), INT_ACT=int_act, FLOAT_CODES=float_codes, PARTIAL=v.partial,
                                  HAS_BIAS=True,
                                  ROUND_BF16=False, GROUP_SIZE=group_size or 1, BLOCK_M=v.cfg.block_m,
                                  BLOCK_N=v.cfg.block_n, BLOCK_K=v.cfg.block_k),
        configs=_fp8_only(configs) if family.startswith("fp8") else configs, mma=None)


def _reduce_spec(acc: str, rescale: bool) -> KernelSpec:
    return KernelSpec(
        name=f"splitk_reduce-{acc[1:]}{'-rescale' if rescale and acc != '*i32' else ''}",
        fn=splitk.splitk_reduce_kernel,
        pointers=lambda v: dict(part_ptr=acc, a_scale_ptr="*fp32", w_scale_ptr="*fp32",
                                bias_ptr="*fp32" if rescale else "*bf16", out_ptr="*bf16"),
        constexprs=lambda v: dict(RESCALE=rescale, HAS_BIAS=True, BLOCK_M=v.block_m, BLOCK_N=splitk.REDUCE_BLOCK_N),
        configs=lambda target: tuple(ReduceVariant(block_m=splitk.reduce_block_m(m)) for m in (1, 2, 4, 8, 16)),
        mma=None)


def _quantize_spec(qtype: Any) -> KernelSpec:
    fp = not qtype.integer
    return KernelSpec(
        name=f"quantize_rows{'-fp8' if fp else ''}", fn=quantize.quantize_rows_kernel,
        pointers=lambda c: dict(x_ptr="*bf16", q_ptr="*fp8e4nv" if fp else "*i8", scale_ptr="*fp32"),
        constexprs=lambda c: dict(QMAX=float(qtype.qmax), FLOAT8=fp, BLOCK_R=c.block_rows, BLOCK_K=c.block_k),
        configs=(_fp8_only if fp else (lambda f: f))(lambda target: (quantize.CONFIGS[GPU_TARGETS[target].arch],)),
        mma=None)


def _fp8_spec(fnuz: bool) -> KernelSpec:
    """The fp8 tile kernel: e4m3fn codes on CUDA, the same bytes read as e4m3fnuz on ROCm (`fp8.py`)."""
    return KernelSpec(
        name="fp8-fnuz" if fnuz else "fp8", fn=fp8.fp8_kernel,
        pointers=lambda v: dict(a_ptr="*fp8e4nv", a_scale_ptr="*fp32", w_ptr="*fp8e4nv", w_scale_ptr="*fp32",
                                bias_ptr="*fp32", **_out(v, "*fp32")),
        constexprs=lambda v: _blocks(v.cfg, HAS_BIAS=True, PARTIAL=v.partial, FLOAT_CODES=True, FNUZ=fnuz),
        configs=_fp8_only(_runs(Kernel.TILE, "fp8"), "hip" if fnuz else "cuda"), mma="fp8")


SPECS: tuple[KernelSpec, ...] = (
    _quantize_spec(numerics.INT8),
    _quantize_spec(numerics.FP8_E4M3),
    KernelSpec(name="w8a8", fn=w8a8.w8a8_kernel,
               pointers=lambda v: dict(a_ptr="*i8", a_scale_ptr="*fp32", w_ptr="*i8", w_scale_ptr="*fp32",
                                       bias_ptr="*fp32", **_out(v, "*i32")),
               constexprs=lambda v: _blocks(v.cfg, HAS_BIAS=True, PARTIAL=v.partial, FLOAT_CODES=False, FNUZ=False),
               configs=_runs(Kernel.TILE, "w8a8"), mma="int8"),
    KernelSpec(name="w4a8", fn=w4a8.w4a8_kernel,
               pointers=lambda v: dict(a_ptr="*i8", a_scale_ptr="*fp32", w_ptr="*i8", w_scale_ptr="*fp32",
                                       bias_ptr="*fp32", out_ptr="*bf16"),
               constexprs=lambda v: _blocks(v.cfg, HAS_BIAS=True, RETURN_ACC=False, GROUP_SIZE=_GROUP),
               configs=_runs(Kernel.TILE, "w4a8", _GROUP), mma="int8"),
    KernelSpec(name="w4a16", fn=w4a16.w4a16_kernel,
               pointers=lambda v: dict(a_ptr="*bf16", w_ptr="*i8", w_scale_ptr="*fp32", w_zero_ptr="*i8",
                                       bias_ptr="*bf16", **_out(v, "*fp32")),
               constexprs=lambda v: _blocks(v.cfg, HAS_BIAS=True, PARTIAL=v.partial, ZERO_POINT=False, DOT_F32=False,
                                            GROUP_SIZE=_GROUP),
               configs=_runs(Kernel.TILE, "w4a16", _GROUP), mma="16bit"),
    KernelSpec(name="w8a16", fn=w8a16.w8a16_kernel,
               pointers=lambda v: dict(a_ptr="*bf16", w_ptr="*i8", w_scale_ptr="*fp32", bias_ptr="*bf16",
                                       **_out(v, "*fp32")),
               constexprs=lambda v: _blocks(v.cfg, HAS_BIAS=True, PARTIAL=v.partial, DOT_F32=False),
               configs=_runs(Kernel.TILE, "w8a16"), mma="16bit"),
    _fp8_spec(fnuz=False),
    _fp8_spec(fnuz=True),
    KernelSpec(name="fp8a16", fn=w8a16.w8a16_kernel,
               pointers=lambda v: dict(a_ptr="*bf16", w_ptr="*fp8e4nv", w_scale_ptr="*fp32", bias_ptr="*bf16",
                                       **_out(v, "*fp32")),
               constexprs=lambda v: _blocks(v.cfg, HAS_BIAS=True, PARTIAL=v.partial, DOT_F32=False),
               configs=_fp8_only(_runs(Kernel.TILE, "fp8a16")), mma="16bit"),
    _gemv_spec("w8a8", gemv.INT8, "*i8", None),
    _gemv_spec("w8a16", gemv.INT8, "*bf16", None),
    _gemv_spec("w4a16", gemv.INT4, "*bf16", _GROUP),
    _gemv_spec("w4a16", gemv.UINT4_ZP, "*bf16", _GROUP),
    _gemv_spec("fp8", gemv.E4M3, "*fp8e4nv", None),
    _gemv_spec("fp8a16", gemv.E4M3, "*bf16", None),
    _reduce_spec("*i32", rescale=True),
    _reduce_spec("*fp32", rescale=False),
    _reduce_spec("*fp32", rescale=True),  # fp8's f32 partials, rescaled like W8A8's
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Specialization:
    """Which integer arguments the JIT sees as multiples of 16 (`tt.divisibility`), per call shape.

    Triton's JIT compiles one kernel per specialization: an integer argument divisible by 16 gets
    the attribute (so loads along it vectorize and the K loop pipelines), a stride of 1 becomes a
    constant, a 16-byte aligned pointer is marked divisible. Both forms below run in practice and
    compile differently, so the check compiles each config in both. Pointers are always aligned
    (torch allocations are). Without divisibility the loads do not vectorize and the K loop does
    not pipeline through cp.async, which costs registers. Measured here (no GPU): in `ANY`, 8 of the
    43 sm_90 configs spill 8-768 bytes under triton 3.9, and 11 of 43 (sm_90) / 15 of 41 (sm_80)
    under triton 3.6 (the device's version); in `DIVISIBLE` none spills under either. A compile
    failure, a missing tensor-core instruction or too much shared memory fails either form; a spill
    fails `DIVISIBLE` (the form model shapes run) and is a note on `ANY` (awkward shapes run slower,
    with the same results).
    """

    name: str
    sizes: bool  # M, N, K, K_STORED, ... divisible by 16
    strides: bool  # row strides divisible by 16
    strict: bool  # spills fail the config (else they are reported as a note)

    def attrs(self, arg: str) -> list[list[Any]]:
        divisible = self.strides if arg.startswith("stride_") else self.sizes
        return [["tt.divisibility", 16]] if divisible else []


DIVISIBLE = Specialization(name="div16", sizes=True, strides=True, strict=True)
"""Model shapes (M, N, K multiples of 16, e.g. 4096 x 14336 at M=16..4096): what serving runs."""
ANY = Specialization(name="any", sizes=False, strides=False, strict=False)
"""Awkward shapes (odd K, N or M, K = 4095): no integer is known divisible, strides included."""
SPECIALIZATIONS: tuple[Specialization, ...] = (DIVISIBLE, ANY)


def _source(spec: KernelSpec, cfg: Any, specialization: Specialization) -> ASTSource:
    constexprs = spec.constexprs(cfg)
    pointers = spec.pointers(cfg)
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, arg in enumerate(spec.fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in _UNIT_STRIDES:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg in pointers:
            signature[arg] = pointers[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "i32"
            if specialization.attrs(arg):
                attrs[(i,)] = specialization.attrs(arg)
    return ASTSource(spec.fn, signature, constexprs, attrs)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for `arch` (`get_ptxas(arch)` since triton 3.5, no argument before)."""
    try:
        return get_ptxas(arch).path
    except TypeError:
        return get_ptxas().path


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _inspect_cuda(kernel: Any, report: ConfigReport, mma: str | None) -> None:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    with tempfile.NamedTemporaryFile(suffix=".ptx") as f:
        f.write(kernel.asm["ptx"].encode())
        f.flush()
        arch = kernel.metadata.target.arch
        gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        ptxas_path = _ptxas(arch)
        done = subprocess.run([ptxas_path, "-v", f"--gpu-name={gpu_name}", f.name, "-o", os.devnull],
                              capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas -v failed: {done.stderr.strip()[-300:]}")
    ptxas = done.stdout + done.stderr
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    report.registers = int(regs[1]) if regs else None
    # ptxas -v counts spill stores; the stack frame catches local arrays too.
    spill_stores = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", ptxas))
    report.spill_bytes = max(spill_stores, int(stack[1]) if stack else 0)
    if mma:
        found = re.search(hardware.MMA_PATTERNS[("cuda", mma)], sass)
        report.mma_instruction = found[0] if found else None


def _inspect_hip(kernel: Any, report: ConfigReport, mma: str | None) -> None:
    gcn = kernel.asm["amdgcn"]
    vgpr = re.search(r"\.vgpr_count:\s+(\d+)", gcn)
    spills = [int(v) for v in re.findall(r"\.(?:vgpr|sgpr)_spill_count:\s+(\d+)", gcn)]
    report.registers = int(vgpr[1]) if vgpr else None
    report.spill_bytes = 4 * sum(spills)
    if mma:
        found = re.search(hardware.MMA_PATTERNS[("hip", mma)], gcn)
        report.mma_instruction = found[0] if found else None


def _check_one(spec: KernelSpec, cfg: Any, target: str, specialization: Specialization) -> ConfigReport:
    gpu = GPU_TARGETS[target]
    backend = gpu.gpu[0]
    shared_limit = gpu.shared_bytes or hardware.ARCHES[gpu.arch].shared_bytes
    report = ConfigReport(kernel=spec.name, config=cfg.name, target=target, variant=specialization.name)
    options = dict(num_warps=cfg.num_warps, num_stages=getattr(cfg, "num_stages", 1), enable_fp_fusion=False)
    try:
        kernel = triton.compile(_source(spec, cfg, specialization), target=GPUTarget(*gpu.gpu), options=options)
    except Exception as e:  # a compile failure is the finding: report it, do not hide it
        report.problems.append(f"compile failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
        return report
    report.shared_bytes = int(kernel.metadata.shared)
    if backend == "cuda":
        _inspect_cuda(kernel, report, spec.mma)
    else:
        _inspect_hip(kernel, report, spec.mma)
    if spec.mma and report.mma_instruction is None:
        report.problems.append(f"no {spec.mma} tensor-core instruction in the machine code")
    if report.spill_bytes:
        spills = f"spills {report.spill_bytes} bytes; use more warps or smaller tiles"
        (report.problems if specialization.strict else report.notes).append(
            spills if specialization.strict else f"{spills} (awkward-shape form: slower, still correct)")
    if report.shared_bytes > shared_limit:
        report.problems.append(f"shared memory {report.shared_bytes} B > {shared_limit} B on {target}; "
                               f"reduce num_stages or the tile")
    return report


def check(target: str) -> list[ConfigReport]:
    """Compile every config every Triton kernel can run on `target` ('sm_80', 'sm_90', 'gfx942').

    Under TRITON_INTERPRET=1 the kernels are interpreter objects that cannot be compiled, so the
    check runs in a child process without that variable.
    """
    if target not in GPU_TARGETS:
        raise ValueError(f"target {target!r} is not a Triton target; choose from {', '.join(GPU_TARGETS)}")
    if interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-m", __name__, target], env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the AOT check for {target} failed in its child process:\n{done.stderr[-2000:]}")
        return [ConfigReport(**r) for r in json.loads(done.stdout)]
    return [_check_one(spec, cfg, target, sp) for spec in SPECS for cfg in spec.configs(target)
            for sp in SPECIALIZATIONS]


if __name__ == "__main__":  # child process of `check` under the interpreter: reports as JSON on stdout
    print(json.dumps([dataclasses.asdict(r) for r in check(sys.argv[1])]))
