"""The 'pallas' `qkernels.tuning.Tunable`: which `TileConfig` a Pallas TPU kernel call runs with.

Serves the problems the `pallas.tpu.*` implementations serve (TPU v5e / v6e / v5p). For a problem:

- heuristic: the generation's table entry for M (`configs.TPU_CONFIGS`, decode entries first). An
  entry whose VMEM estimate exceeds the generation's scoped VMEM for this problem (float32
  activations, group size 32 and zero points enlarge the int4 kernels' working set) is skipped for
  the next one serving M; if none fits, the last is halved along N, then K, until it does.
- candidates (the search space of `python -m qkernels.tune --backend pallas`): the table entries
  serving M, those of the other generations, and for M <= `configs.SMALL_M` a grid of decode
  blocks; all passing `check`, none tiling this problem the same way as an earlier one.
- check: refuses a config that cannot run the problem (M above its max_m, a K block straddling a
  scale group, blocks over the scoped VMEM), saying why.
- measure: wall-clock seconds per call of the jitted kernel on the current TPU (tuning only);
  `device` names that TPU (or, for `--list --device tpu-v5e`, a TPU kind without one).

Configs never change numerics, so a choice here only ever changes speed.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

from qkernels import dispatch, hardware, tuning
from qkernels.kernels.pallas import configs, supports_tpu
from qkernels.kernels.pallas.configs import Family, TileConfig

__all__ = ["TUNABLE", "serves", "check", "heuristic", "candidates", "measure", "device"]

_ACT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Decode blocks worth timing (those over the scoped VMEM are dropped by `check`): int8 weight blocks
# of 0.25-16 MiB; the small ones are what fits the int4 kernels with small groups and zero points.
_DECODE_N = (512, 1024, 2048, 4096)
_DECODE_K = (512, 1024, 2048, 4096)


def _family(problem: dispatch.Problem) -> Family:
    from qkernels.kernels.pallas.ops import family_of

    return family_of(problem.recipe)


def serves(problem: dispatch.Problem) -> str | None:
    """None if a `pallas.tpu` kernel serves `problem` (then it runs a config from here), else why not."""
    return supports_tpu(problem)


def check(config: Any, problem: dispatch.Problem) -> str | None:
    """None if `config` can run `problem` on its TPU generation, else why not and what to change."""
    if not isinstance(config, TileConfig):
        return f"{config!r} is a {type(config).__name__}, not a TileConfig of the Pallas TPU kernels"
    why = serves(problem)
    if why:
        return why
    if not config.serves(problem.m):
        return (f"{config.name} serves M <= {config.max_m}, not M={problem.m}; use an entry with a larger "
                f"max_m (or none)")
    group = problem.recipe.group_size
    # TileConfig's block_k % 256 covers today's group sizes (<= 256); this guards any larger one
    if group and config.block_k % group:
        return (f"block_k={config.block_k} is not a multiple of group_size={group}: a K block would straddle "
                f"a scale group; use a multiple of {group}")
    family, arch = _family(problem), problem.arch
    need = configs.vmem_estimate(config, family, m=problem.m, act_bytes=_ACT_BYTES.get(problem.act_dtype, 4),
                                 group=group, zero_point=problem.recipe.rhs.zero_point)
    limit = hardware.ARCHES[arch].scoped_vmem_bytes
    if need > limit:
        return (f"{config.name} needs ~{need / 2**20:.1f} MiB of VMEM for {family.value} at M={problem.m} "
                f"(act {problem.act_dtype}{f', g{group}' if group else ''}"
                f"{', zero point' if problem.recipe.rhs.zero_point else ''}), over TPU {arch}'s "
                f"{limit // 2**20} MiB scoped VMEM; use a smaller block_n or block_k")
    return None


def _shrink(config: TileConfig) -> TileConfig | None:
    """Halve the block along N, else along K; None at the smallest legal block."""
    if config.block_n > 128:
        return TileConfig(block_m=config.block_m, block_n=max(128, config.block_n // 2 // 128 * 128),
                          block_k=config.block_k, max_m=config.max_m)
    if config.block_k > 256:
        return TileConfig(block_m=config.block_m, block_n=config.block_n,
                          block_k=max(256, config.block_k // 2 // 256 * 256), max_m=config.max_m)
    return None


def heuristic(problem: dispatch.Problem) -> tuple[TileConfig, str]:
    """The table entry for M on this generation (see the module docstring), and a one-line reason."""
    arch, family, m = problem.arch, _family(problem), problem.m
    serving = [c for c in configs.tpu_configs(arch, family) if c.serves(m)]
    skipped = []
    for config in serving:
        why = check(config, problem)
        if why is None:
            note = f" ({'; '.join(skipped)})" if skipped else ""
            return config, f"TPU {arch} {family.value} table entry for M={m}{note}"
        skipped.append(f"skipped {config.name}: {why}")
    config = serving[-1]
    while check(config, problem) is not None and (smaller := _shrink(config)) is not None:
        config = smaller
    return config, f"TPU {arch} {family.value} table entry for M={m} shrunk to fit ({skipped[-1]})"


def _tiling(config: TileConfig, problem: dispatch.Problem) -> tuple[int, int, int]:
    """The blocks the kernel wrapper actually uses for `problem` (`tpu._blocks`), to drop duplicates."""
    from qkernels.kernels.pallas.layout import fit_block

    group = problem.recipe.group_size
    if _family(problem) is Family.W8A8:
        k, align = problem.k, 128
    else:
        k, align = problem.recipe.rhs.padded_k(problem.k), max(256, group or 0)
    return (fit_block(problem.m, config.block_m, 32)[0], fit_block(problem.n, config.block_n, 128)[0],
            fit_block(k, config.block_k, align)[0])


def candidates(problem: dispatch.Problem) -> tuple[TileConfig, ...]:
    """Configs worth timing for `problem` (see the module docstring), the heuristic's table first."""
    arch, family, m = problem.arch, _family(problem), problem.m
    pool = [c for c in configs.tpu_configs(arch, family) if c.serves(m)]
    pool += [c for other in hardware.TPU_GENERATIONS if other != arch
             for c in configs.tpu_configs(other, family) if c.serves(m)]
    if m <= configs.SMALL_M:
        pool += [TileConfig(block_m=32, block_n=bn, block_k=bk, max_m=configs.SMALL_M)
                 for bn in _DECODE_N for bk in _DECODE_K]
    seen, out = set(), []
    for config in pool:
        tiling = _tiling(config, problem)
        if tiling not in seen and check(config, problem) is None:
            seen.add(tiling)
            out.append(config)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _operands(problem: dispatch.Problem, target: Any) -> tuple[Any, Any, Any]:
    """Random operands of `problem`'s shapes on the default device (codes and scales in range);
    integer recipes' activations come quantized (by `target`'s quantize kernel)."""
    import jax
    import jax.numpy as jnp

    from qkernels.formats import QOperand
    from qkernels.kernels.pallas import ops

    recipe, lead = problem.recipe, (() if problem.batch is None else (problem.batch,))
    keys = jax.random.split(jax.random.key(0), 5)
    lhs = jax.random.normal(keys[0], (*lead, problem.m, problem.k), jnp.float32).astype(problem.act_dtype)
    stored = recipe.rhs.stored_k(problem.k)
    lo = 0 if recipe.rhs.zero_point else -127
    qvalue = jax.random.randint(keys[1], (*lead, problem.n, stored), lo, 128, jnp.int32).astype(jnp.int8)
    scale_shape = recipe.rhs.scale_shape((*lead, problem.n, problem.k))
    scale = jax.random.uniform(keys[2], scale_shape, jnp.float32, 1e-3, 1e-2)
    zero = None
    if recipe.rhs.zero_point:
        zero = jax.random.randint(keys[3], scale_shape, 0, 16, jnp.int32).astype(jnp.int8)
    bias = jax.random.normal(keys[4], (problem.n,), jnp.float32) if problem.has_bias else None
    if recipe.lhs is not None:  # time the matmul kernel alone: quantize the activations once, here
        lhs = ops.quantize_activations(lhs, target)
        lhs = QOperand(jax.block_until_ready(lhs.qvalue), jax.block_until_ready(lhs.scale))
    return lhs, QOperand(qvalue, scale, zero), bias


def measure(problem: dispatch.Problem, config: TileConfig, *, repeats: int = 5, calls: int = 20) -> float:
    """Seconds per call of the jitted kernel with `config` on the default JAX device (a TPU of
    `problem.arch`): the median of `repeats` timings of `calls` back-to-back calls, after a warm-up."""
    import jax

    from qkernels.kernels.pallas import ops

    why = check(config, problem)
    if why:
        raise ValueError(f"cannot time {config!r} on {problem.describe()}: {why}")
    target = ops.Target(problem.arch)
    lhs, rhs, bias = _operands(problem, target)
    out_dtype = problem.out_dtype
    fn = jax.jit(lambda a, w, b: ops.qmatmul(a, w, problem.recipe, bias=b, out_dtype=out_dtype, target=target,
                                             config=config))
    jax.block_until_ready(fn(lhs, rhs, bias))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(lhs, rhs, bias)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def device(kind: str | None = None) -> tuning.TuningDevice:
    """The TPU configs are tuned on (`kind` None: JAX's default device), or the TPU kind `kind`
    ('tpu-v5e') to list candidates for; raises saying why there is none."""
    if kind is not None:
        if not kind.startswith("tpu-"):
            raise ValueError(f"device {kind!r} is not a TPU kind; use e.g. "
                             f"{', '.join('tpu-' + g for g in hardware.TPU_GENERATIONS)}")
        return tuning.TuningDevice(platform=f"tpu:{kind.removeprefix('tpu-')}", kind=kind, name=kind)
    import jax

    here = jax.devices()[0]
    if here.platform != "tpu":
        raise RuntimeError(f"the Pallas TPU kernels are tuned on a TPU; JAX sees {here.platform}")
    return tuning.TuningDevice(platform=hardware.tpu_platform(here.device_kind),
                               kind=hardware.device_kind(here.device_kind), name=here.device_kind)


TUNABLE = tuning.register(tuning.Tunable(
    backend="pallas", serves=serves, parse=TileConfig.from_dict, dump=TileConfig.to_dict, check=check,
    heuristic=heuristic, candidates=candidates, measure=measure, device=device))
