"""Pallas kernels (TPU through Mosaic, GPU through Pallas' Triton lowering) and their registration.

`register()` (called by `qkernels.backends`, JAX installed) registers, for framework 'jax' and
`Op.QMATMUL`, each declared for its family's recipe tag:
  pallas.tpu.<family>   priority 100, platforms tpu:v5e / tpu:v6e / tpu:v5p
  pallas.gpu.<family>   priority 90,  platforms cuda:sm_80 and newer (fp8: sm_89 and newer)
  pallas.interpret      priority -10, platform cpu: the TPU kernels with interpret=True (tests;
                        never chosen automatically, `use_backend('pallas')` selects it on CPU)
for the families w8a8, w4a16 (int4 and uint4 + zero point), w4a8 and fp8; fp8a16 on GPU only (its
kernel is the GPU one). FP8 is refused on every TPU generation with tables, with the reason of
`hardware.fp8_mma_reason`: none has an fp8 MXU (`hardware.TPU_FP8_MXU`), and although Mosaic compiles
the fp8 kernel for them (`tpu.py`) it cannot multiply fp8 natively there; `xla` serves FP8 on v5e, v6e
and v5p. `run` follows dispatch's
convention with JAX arrays and is traceable under `jax.jit`. The TPU implementations run the
`TileConfig` that `qkernels.tuning` chooses for backend 'pallas' (`tunable.py`: user cache, shipped
table, else the generation's table entry for M); `explain` shows it. The GPU and interpreted kernels
use the tables in `configs.py` directly (interpretation: v5e's entry for the call's M).
"""

from __future__ import annotations

import functools
from typing import Any

from qkernels import hardware

__all__ = ["supports_tpu", "supports_gpu", "supports_interpret", "register"]

_FLOAT_ACTS = ("bfloat16", "float16", "float32")


def _family(problem: Any):
    from qkernels.kernels.pallas.ops import family_of

    return family_of(problem.recipe)


def _common(problem: Any, family: Any) -> str | None:
    from qkernels.dispatch import Op

    if problem.op is not Op.QMATMUL:
        return f"Pallas kernels implement qmatmul, not {problem.op.value}"
    if 0 in (problem.m, problem.n, problem.k):
        return (f"zero-size dims (M={problem.m}, N={problem.n}, K={problem.k}) give the kernels no grid; "
                f"the XLA implementation serves them")
    got = _family(problem)
    if got is None:
        return f"no Pallas kernel for {problem.recipe.name}; Pallas serves w8a8, w4a16, w4a8, fp8 and fp8a16"
    if family is not None and got is not family:
        return f"this kernel serves {family.value}, not {problem.recipe.name}"
    if problem.recipe.lhs is None and problem.act_dtype not in _FLOAT_ACTS:
        return f"activations of dtype {problem.act_dtype} for weight-only {problem.recipe.name}; pass one of {_FLOAT_ACTS}"
    if problem.recipe.lhs is not None and not problem.lhs_quantized and problem.act_dtype not in _FLOAT_ACTS:
        return f"activations of dtype {problem.act_dtype} cannot be quantized on the fly; pass one of {_FLOAT_ACTS}"
    return None


def _fp8(problem: Any) -> bool:
    """Whether the recipe multiplies float8 codes on either side (FP8, FP8A16)."""
    return any(f is not None and not f.qtype.integer for f in (problem.recipe.lhs, problem.recipe.rhs))


def supports_tpu(problem: Any, family: Any = None) -> str | None:
    """None if the Mosaic TPU kernel of `family` serves `problem`, else why not."""
    if problem.device_kind != "tpu":
        return f"runs on TPU, not {problem.platform}"
    arch = problem.arch or "unknown"
    if _fp8(problem) and arch in (*hardware.TPU_NO_INT8_MXU, *hardware.TPU_GENERATIONS):
        why = hardware.fp8_mma_reason(problem.platform)
        if why:
            return why
    elif arch in hardware.TPU_NO_INT8_MXU and problem.recipe.lhs is not None:
        return f"Mosaic rejects int8 matmul on TPU {arch}; use TPU v5e/v6e/v5p or a weight-only recipe on XLA"
    if arch not in hardware.TPU_GENERATIONS:
        return f"no Pallas config for TPU {arch}; configs exist for {', '.join(hardware.TPU_GENERATIONS)}"
    return _common(problem, family)


def supports_gpu(problem: Any, family: Any = None) -> str | None:
    """None if the Pallas-Triton GPU kernel of `family` serves `problem`, else why not."""
    if problem.device_kind != "cuda":
        return f"runs on CUDA GPUs, not {problem.platform}"
    if hardware.table_arch(problem.platform) is None:
        return f"needs int8 tensor cores of sm_80 or newer, got {problem.platform}"
    if _fp8(problem):
        why = hardware.fp8_mma_reason(problem.platform)
        if why:
            return why
    return _common(problem, family)


def supports_interpret(problem: Any) -> str | None:
    """None if the interpreted TPU kernels serve `problem` on CPU (slow: for tests only)."""
    if problem.platform != "cpu":
        return f"interprets the TPU kernels on the host CPU only, not on {problem.platform}"
    return _common(problem, None)


def _gpu_note(problem: Any) -> str | None:
    """`Implementation.note` of the GPU fp8 kernels: what Triton makes of the fp8 dot on Hopper."""
    if _fp8(problem) and problem.recipe.lhs is not None and hardware.table_arch(problem.platform) == "sm_90":
        return ("Triton runs this Pallas fp8 dot as f16 MMAs of the exact codes on sm_90 (Pallas cannot set "
                "max_num_imprecise_acc, which fp8 wgmma needs); the Triton backend's fp8 kernel uses wgmma")
    return None


def _run(call: Any, lhs: Any, rhs: Any, bias: Any, *, target: Any = None) -> Any:
    """`Implementation.run`; on TPU (`target` None) with the tuned config the bound call carries."""
    from qkernels.kernels.pallas import ops

    problem = call.problem
    config = None if target is not None else call.config.config
    return ops.qmatmul(lhs, rhs, problem.recipe, bias=bias, out_dtype=problem.out_dtype,
                       target=target or ops.Target(problem.arch), config=config)


def _accumulate(call: Any, lhs: Any, rhs: Any, *, target: Any = None) -> Any:
    """`Implementation.accumulate`: the kernels' raw int32 accumulators (integer recipes); on TPU
    (`target` None) with the tuned config its `run` uses."""
    from qkernels.kernels.pallas import ops

    config = None if target is not None else call.config.config
    return ops.accumulators(lhs, rhs, call.problem.recipe, target=target or ops.Target(call.problem.arch),
                            config=config)


def register() -> None:
    """Register the TPU, GPU and interpreted implementations with dispatch."""
    from qkernels import dispatch, tuning
    from qkernels.kernels.pallas import tunable  # noqa: F401  (registers the 'pallas' Tunable)
    from qkernels.kernels.pallas.configs import TPU_FAMILIES, Family
    from qkernels.kernels.pallas.ops import Target

    for family in Family:
        integer = family in (Family.W8A8, Family.W4A8)
        serves = dispatch.Serves.tags(family.value)
        if family in TPU_FAMILIES:
            dispatch.register(dispatch.Implementation(
                name=f"pallas.tpu.{family.value}", framework="jax", priority=100, serves=serves,
                supports=functools.partial(supports_tpu, family=family), run=_run,
                accumulate=_accumulate if integer else None,
                configure=functools.partial(tuning.choose, backend="pallas"),
                description=f"Pallas/Mosaic {family.value} kernel, rescale fused, block sizes tuned per TPU and M"))
        fp8 = family in (Family.FP8, Family.FP8A16)
        dispatch.register(dispatch.Implementation(
            name=f"pallas.gpu.{family.value}", framework="jax", priority=90, serves=serves,
            supports=functools.partial(supports_gpu, family=family),
            run=functools.partial(_run, target=Target.GPU),
            # the GPU kernels expose raw accumulators for W8A8 only (per-group ones live in the TPU kernel)
            accumulate=functools.partial(_accumulate, target=Target.GPU) if family is Family.W8A8 else None,
            note=_gpu_note if fp8 else None,
            description=f"Pallas {family.value} kernel through the Triton lowering "
                        f"({'fp8 operands, sm_89+' if fp8 else 'int8 tensor cores'})"))
    dispatch.register(dispatch.Implementation(
        name="pallas.interpret", framework="jax", priority=-10, supports=supports_interpret, automatic=False,
        serves=dispatch.Serves.tags(*(f.value for f in TPU_FAMILIES)),
        run=functools.partial(_run, target=Target.INTERPRET),
        accumulate=functools.partial(_accumulate, target=Target.INTERPRET),
        description="the Pallas TPU kernels run by the Pallas interpreter on CPU: exact, slow, for tests"))
    from qkernels.kernels.pallas import grouped  # the grouped (MoE) kernels: the same platform rules

    grouped.register(supports_tpu, supports_interpret, Family)

