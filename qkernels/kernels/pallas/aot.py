"""Compile the shipped Pallas configs without the hardware: `check(target)` for `python -m qkernels.aot`.

TPU targets ('tpu-v5e', 'tpu-v6e', 'tpu-v5p'): the real Mosaic/XLA TPU compiler from libtpu, on
a topology description (no TPU needed); reports the VMEM estimate of the blocks and
`memory_analysis()`. Every entry of the generation's tables (`configs.TPU_CONFIGS`) is compiled at
shapes of the M range it serves — decode entries at M=1 and M=16 on 8192x8192 and an awkward
M=3 x 4096x4095, the any-M entry at M=1024 and an awkward M=17 — with bf16 activations and g128;
for the int4 families the largest-VMEM variant (f32 activations, g32, zero points for W4A16; g32 for
W4A8) is compiled too, with the config the 'pallas' tunable's heuristic picks for it. A config whose
VMEM estimate exceeds the scoped VMEM fails (`tunable.check` would refuse it). The W4A16 program
must hold no unpacked or dequantized copy of the weight: no array with an N axis and K or more
elements across its other axes anywhere in the compiled HLO (the shapes have M < N). Temp bytes are
reported, not bounded: on v5p XLA prefetches the operands (packed weight included) into on-chip
memory space S(1) with copy-start/copy-done and `memory_analysis()` counts those staging buffers,
the even/odd-k activation reordering and the per-group scale relayouts as temp (v5e and v6e report 0
for the same program), so a temp bound flagged those, not a weight copy.
GPU targets ('pallas-sm_80', 'pallas-sm_90'): export for cuda under an abstract GPU of the target's
arch (`abstract_gpu`; jax 0.11 needs it, 0.10 ignores it), take the Triton IR out of the custom call,
compile it with the triton wheel, and require int8 tensor-core instructions (W8A8, W4A8), tensor-core
MMAs for FP8 (the fp8 MMA, or on sm_90 the f16 MMA Triton runs the Pallas fp8 dot as: `gpu.py`; a note
says which) and 16-bit MMAs for FP8A16. A family `pallas.gpu` refuses on the target (fp8 below
sm_89) is not compiled: its row passes and carries the refusal as a note.
The TPU tables' FP8 entries are not compiled: `pallas.tpu.fp8` refuses every generation with tables
(no fp8 MXU), and a family refused there is skipped.
Targets (topologies, GPU archs) and instruction patterns are `qkernels.hardware`'s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from qkernels import dispatch, hardware
from qkernels.aot import ConfigReport
from qkernels.formats import FP8, FP8A16, W4A8, W4A16, W8A8, Recipe
from qkernels.kernels.pallas import configs, gpu, tpu, tunable
from qkernels.kernels.pallas.configs import Family

__all__ = ["check"]

_TARGETS = {name: t for name, t in hardware.AOT_TARGETS.items() if t.backend == "pallas"}
# (m, n, k) per kind of entry: the M range's ends on a realistic layer, and an awkward shape
_DECODE_SHAPES = ((1, 8192, 8192), (configs.SMALL_M, 8192, 8192), (3, 4096, 4095))
_ANY_M_SHAPES = ((1024, 4096, 4096), (configs.SMALL_M + 1, 4096, 4095))
_GROUP = 128


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Variant:
    """Operand formats a config is compiled for: activation dtype, group size, zero points."""

    act: str = "bfloat16"
    group: int = _GROUP
    zero_point: bool = False

    @property
    def tag(self) -> str:
        return f"{'f32' if self.act == 'float32' else 'bf16'}-g{self.group}{'-zp' if self.zero_point else ''}"

    def recipe(self, family: Family) -> Recipe:
        if family in (Family.W8A8, Family.FP8, Family.FP8A16):
            return {Family.W8A8: W8A8, Family.FP8: FP8, Family.FP8A16: FP8A16}[family]
        if family is Family.W4A16:
            return W4A16(self.group, zero_point=self.zero_point)
        return W4A8(self.group)


_DEFAULT = _Variant()
# the largest VMEM working set of each family's kernel (most groups per block, f32 dequantization)
_LARGEST = {Family.W4A16: _Variant(act="float32", group=32, zero_point=True), Family.W4A8: _Variant(group=32)}


def _fn_and_args(family: Family, cfg, m: int, n: int, k: int, module, sharding=None, variant: _Variant = _DEFAULT):
    sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    group = variant.group
    kp = -(-k // group) * group
    if family in (Family.W8A8, Family.FP8):
        codes = jnp.int8 if family is Family.W8A8 else jnp.float8_e4m3fn
        kernel = module.w8a8 if family is Family.W8A8 else module.fp8
        args = (sd((1, m, k), codes), sd((1, m), jnp.float32), sd((1, n, k), codes), sd((1, n), jnp.float32))
        return lambda a, sa, w, sw: kernel(a, sa, w, sw, None, out_dtype=jnp.bfloat16, config=cfg), args
    if family is Family.FP8A16:
        args = (sd((1, m, k), jnp.bfloat16), sd((1, n, k), jnp.float8_e4m3fn), sd((1, n), jnp.float32))
        return lambda a, w, sw: module.fp8a16(a, w, sw, None, out_dtype=jnp.bfloat16, config=cfg), args
    w = (sd((1, n, kp // 2), jnp.int8), sd((1, n, kp // group), jnp.float32))
    if family is Family.W4A16:
        out = jnp.dtype(variant.act)
        z = sd((1, n, kp // group), jnp.int8) if variant.zero_point else None
        args = (sd((1, m, k), jnp.dtype(variant.act)), *w, z)
        return lambda a, wq, ws, wz: module.w4a16(a, wq, ws, wz, None, group=group, out_dtype=out,
                                                  config=cfg), args
    args = (sd((1, m, k), jnp.int8), sd((1, m), jnp.float32), *w)
    return lambda a, sa, wq, ws: module.w4a8(a, sa, wq, ws, None, group=group, out_dtype=jnp.bfloat16,
                                             config=cfg), args


def _problem(arch: str, family: Family, variant: _Variant, m: int, n: int, k: int,
             platform: str | None = None) -> dispatch.Problem:
    return dispatch.Problem(recipe=variant.recipe(family), m=m, n=n, k=k, act_dtype=variant.act,
                            out_dtype=variant.act, framework="jax", platform=platform or f"tpu:{arch}",
                            device="" if platform else f"tpu-{arch}")


def _jobs(arch: str) -> list[tuple[Family, configs.TileConfig, _Variant, tuple[int, int, int]]]:
    """(family, config, variant, shape) to compile: see the module docstring."""
    from qkernels.kernels.pallas import supports_tpu

    jobs = []
    for family in configs.TPU_FAMILIES:
        if supports_tpu(_problem(arch, family, _DEFAULT, *_ANY_M_SHAPES[0])):
            continue  # refused on this generation (FP8: no fp8 MXU), so never run with these tables
        for cfg in configs.tpu_configs(arch, family):
            shapes = _ANY_M_SHAPES if cfg.max_m is None else _DECODE_SHAPES
            jobs.extend((family, cfg, _DEFAULT, shape) for shape in shapes)
            if family in _LARGEST:
                m, n, k = shapes[0] if cfg.max_m is None else shapes[1]
                picked, _ = tunable.heuristic(_problem(arch, family, _LARGEST[family], m, n, k))
                jobs.append((family, picked, _LARGEST[family], (m, n, k)))
    return jobs


_ARRAY = re.compile(r"\b(?:bf16|f16|f32|s8|u8|s32|u32|s4|u4)\[([\d,]*)\]")


def _dequantized_copy(hlo: str, n: int, k: int) -> list[str]:
    """Why a compiled W4A16 program looks like it unpacks or dequantizes the weight outside the
    kernel, if it does: an array with an N axis whose other axes hold K or more elements (the packed
    weight's hold K/2; byte-level bitcasts, which have no N axis, are not weight copies)."""
    for dims in _ARRAY.findall(hlo):
        shape = [int(d) for d in dims.split(",") if d]
        if n in shape and math.prod(shape) // n >= k:
            return [f"an array of shape {shape} (N={n} by K={k} or more) in the compiled HLO: the weight is "
                    f"unpacked or dequantized outside the kernel"]
    return []


def _check_tpu(target: str) -> list[ConfigReport]:
    from jax.experimental import topologies

    # compiling needs no TPU, so do not let libtpu's single-process lock refuse a second user
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    arch = _TARGETS[target].arch
    device = topologies.get_topology_desc(topology_name=_TARGETS[target].topology, platform="tpu").devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    reports = []
    for family, cfg, variant, (m, n, k) in _jobs(arch):
        problem = _problem(arch, family, variant, m, n, k)
        vmem = configs.vmem_estimate(cfg, family, m=m, act_bytes=jnp.dtype(variant.act).itemsize,
                                     group=variant.group, zero_point=variant.zero_point)
        r = ConfigReport(kernel=f"pallas.tpu.{family.value}", config=f"{cfg.name} {variant.tag} M{m}-N{n}-K{k}",
                         target=target, mma_instruction="MXU int8" if family is not Family.W4A16 else "MXU bf16",
                         vmem_bytes=vmem)
        try:
            fn, args = _fn_and_args(family, cfg, m, n, k, tpu, sharding, variant)
            compiled = jax.jit(fn).trace(*args).lower().compile()
            mem = compiled.memory_analysis()
            r.memory_analysis = {f: int(getattr(mem, f)) for f in (
                "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                "generated_code_size_in_bytes")}
        except Exception as e:  # a compile error is this config's verdict, reported not raised
            r.problems.append(f"compile failed: {str(e).splitlines()[0][:300]}")
            reports.append(r)
            continue
        why = tunable.check(cfg, problem)
        if why:
            r.problems.append(f"the tunable refuses it: {why}")
        if family is Family.W4A16:
            r.problems += _dequantized_copy(compiled.as_text(), n, k)
        reports.append(r)
    return reports


PALLAS_TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"
"""The start of jax's DeprecationWarning (id 'jax-pallas-triton', jax >= 0.11) on lowering these kernels."""


def _gpu_device_kind(arch: str) -> str:
    """The name JAX reports for the first part the Triton target of `arch` deploys on ('NVIDIA H100')."""
    kinds = [k for t in hardware.AOT_TARGETS.values() if t.backend == "triton" and t.arch == arch for k in t.devices]
    if not kinds:
        raise ValueError(f"no Triton AOT target of arch {arch!r} names a device kind to lower the Pallas kernels for")
    return f"NVIDIA {kinds[0].upper()}"


def abstract_gpu(arch: str) -> jax.sharding.AbstractMesh:
    """A one-device abstract mesh of a GPU of `arch`, for lowering Pallas GPU kernels with no GPU here.

    jax >= 0.11 lowers a Pallas Triton call for the GPU its `gpu_info` finds: the abstract mesh's
    `AbstractDevice` when one is in context, else the local GPU, else it raises "No supported GPU
    devices found" (jax 0.10 fell back to compute capability 9.0 by itself). The device kind is the
    name a real device reports ('NVIDIA H100' -> 9.0, 'NVIDIA A100' -> 8.0); jax 0.10 ignores it.
    """
    device = jax.sharding.AbstractDevice(device_kind=_gpu_device_kind(arch), num_cores=hardware.ARCHES[arch].units,
                                         platform="gpu")
    return jax.sharding.AbstractMesh((1,), ("_aot",), abstract_device=device)


def _triton_ir(fn, args, arch: str) -> tuple[str, bool]:
    """Text of the Triton module inside the exported `__gpu$xla.gpu.triton` custom call, lowered for a
    GPU of `arch` (`abstract_gpu`: no GPU needed), and whether jax warned that the backend is deprecated."""
    from jax import export
    from jax._src.interpreters import mlir as jmlir
    from jax._src.lib.mlir import ir as jir

    with jax.sharding.use_abstract_mesh(abstract_gpu(arch)), warnings.catch_warnings(record=True) as seen:
        # jax >= 0.11 warns on each lowering that the Pallas Triton backend is deprecated: recorded here
        # and reported as a note on the config (the move to Mosaic GPU / jax_triton: `pallas.gpu`)
        warnings.filterwarnings("always", message=PALLAS_TRITON_DEPRECATION, category=DeprecationWarning)
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    for w in seen:
        if not str(w.message).startswith(PALLAS_TRITON_DEPRECATION):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # not ours to swallow
    deprecated = any(str(w.message).startswith(PALLAS_TRITON_DEPRECATION) for w in seen)
    from jax._src.lib import triton as jax_triton_lib

    ctx = jmlir.make_ir_context()
    jax_triton_lib.dialect.register_dialect(ctx)  # 'tt', to read the kernel's bytecode back
    with ctx:
        module = jir.Module.parse(exported.mlir_module())
        found = []

        def walk(op):
            for region in op.regions:
                for block in region.blocks:
                    for o in block.operations:
                        if o.operation.name == "stablehlo.custom_call" and "gpu.triton" in str(
                                o.attributes["call_target_name"]):
                            found.append(o)
                        walk(o.operation)

        walk(module.operation)
        if not found:
            raise RuntimeError("no __gpu$xla.gpu.triton custom call in the exported module")
        blob = jir.StringAttr(found[0].attributes["mhlo.backend_config"]["ir"]).value_bytes
        # the bytecode of jax's MLIR does not load in triton's; its text form does
        return jir.Module.parse(blob).operation.get_asm(enable_debug_info=False), deprecated


# The MMA kinds (`hardware.MMA_PATTERNS`) a family's SASS must show, any of them; the first is the one
# that needs no note. FP8 on sm_90: Triton runs the Pallas fp8 dot as f16 MMAs (`gpu.py`).
_GPU_MMA: dict[Family, tuple[str, ...]] = {Family.W8A8: ("int8",), Family.W4A8: ("int8",), Family.W4A16: (),
                                           Family.FP8: ("fp8", "16bit"), Family.FP8A16: ("16bit",)}


def _check_gpu(target: str) -> list[ConfigReport]:
    import triton
    from triton.backends.compiler import GPUTarget

    from qkernels.kernels.pallas import supports_gpu

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    reports = []
    for family in Family:
        cfg = configs.gpu_config(family)
        m, n, k = 256, 512, 1024
        r = ConfigReport(kernel=f"pallas.gpu.{family.value}", config=f"{cfg.describe()} M{m}-N{n}-K{k}", target=target)
        refused = supports_gpu(_problem(_TARGETS[target].arch, family, _DEFAULT, m, n, k,
                                        platform=hardware.aot_sm(_TARGETS[target])), family)
        if refused:
            r.notes.append(f"not compiled: pallas.gpu.{family.value} refuses {target}: {refused}")
            reports.append(r)
            continue
        try:
            fn, args = _fn_and_args(family, cfg, m, n, k, gpu)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "kernel.ttir"
                text, deprecated = _triton_ir(fn, args, _TARGETS[target].arch)
                src.write_text(text)
                # fp fusion stated (triton 3.9 warns when it is left to its changing default): on, as
                # XLA's Triton pipeline compiles these kernels (`gpu.py`: not controllable from Pallas)
                compiled = triton.compile(str(src), target=GPUTarget(*_TARGETS[target].gpu),
                                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                                       enable_fp_fusion=True))
                cubin = Path(tmp) / "kernel.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True).stdout
            r.shared_bytes = compiled.metadata.shared
            r.registers = getattr(compiled, "n_regs", None)
            r.spill_bytes = getattr(compiled, "n_spills", None)
            mma = sorted(set(re.findall(r"\b(I?G?MMA\.[\w.]+|HMMA\.[\w.]+|HGMMA\.[\w.]+)", sass)))
            r.mma_instruction = ", ".join(mma)[:26] or None
            if deprecated:
                r.notes.append("jax deprecates the Pallas Triton backend (see qkernels.kernels.pallas.gpu)")
            kinds = [kind for kind in _GPU_MMA[family] if re.search(hardware.MMA_PATTERNS[("cuda", kind)], sass)]
            if _GPU_MMA[family] and not kinds:
                r.problems.append(f"no {' or '.join(_GPU_MMA[family])} tensor-core instruction in SASS; "
                                  f"found {mma or 'none'}")
            elif kinds and kinds[0] != _GPU_MMA[family][0]:
                r.notes.append(f"no {_GPU_MMA[family][0]} MMA: Triton runs this dot as {kinds[0]} MMAs "
                               f"(see qkernels.kernels.pallas.gpu)")
        except Exception as e:  # report the blocker for this config instead of crashing the whole check
            r.problems.append(f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        reports.append(r)
    return reports


def check(target: str) -> list[ConfigReport]:
    """Compile every shipped Pallas config for `target`; see the module docstring."""
    if target not in _TARGETS:
        raise ValueError(f"unknown Pallas target {target!r}; choose from {', '.join(_TARGETS)}")
    return _check_tpu(target) if _TARGETS[target].topology else _check_gpu(target)
