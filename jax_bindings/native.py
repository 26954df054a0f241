"""`xla-native`: the native CPU kernels (`qkernels/kernels/cpu`, plain C) called from JAX through the XLA FFI.

The handlers (`qkernels/kernels/cpu/xla_ffi.cc`, C++ against jaxlib's `xla/ffi/api/ffi.h`) are compiled with
the kernels on first use (`qkernels.kernels.cpu.build`), registered with `jax.ffi.register_ffi_target`
(platform "cpu") and called with `jax.ffi.ffi_call`, so the implementation works eagerly, under `jit` and
under `vmap` (`vmap_method="expand_dims"`: the handlers broadcast the operands' leading axes, which also
serves batched (B, N, K) weights). Numerics: those of `qkernels.kernels.cpu` (W8A8 / W4A8 bit-identical to
the reference, the rescale unfused; fp8 and weight-only within `qkernels.testing`'s tolerances).

Non-finite activations of the quantizing recipes: their rows come out NaN and nothing raises, as `xla`
under `jit` (the kernels cannot report to the host without a sync); `qk.dot_general(..., check_finite=True)`
checks them with checkify, as for every other JAX implementation. Gradients: `qk.dot_general`'s custom_vjp
(jax_bindings/dot_general.py) differentiates the canonical core independently of the implementation, so
`jax.grad` through a model runs this forward and XLA ops backward.

When it serves (`supports`): platform cpu; the library builds (else the build error is the reason); the
shipped operand formats (int8 per row, int4 / uint4 + zero point per group, e4m3 per row weights; int8 / e4m3
per-row or static activations); f32 / bf16 / f16 activations and outputs; weight-only recipes up to
`MAX_M_WEIGHT_ONLY` rows (beyond it `xla`, dequantizing once and running XLA's f32 GEMM, is as fast: measured
equal at M = 512). Its priority (60) is above `xla` (50): where it serves it was measured faster, or within the
noise of this shared machine.

Measured: `python -m bench --framework jax --shapes 4096x4096 --m 1,16,256 --quick` (the bench's
`qkernels.dot_general[xla]` rows run `xla` in the same run), speedup over jit'ed `lax.dot_general` f32 (4.0,
6.2, 46.5 ms at M = 1, 16, 256); f32 activations; 2-core AMD EPYC Zen 4 (AVX-512 VNNI) shared with other
jobs at load average 3-4, so medians carry up to 2x noise (lax f32 at M = 1 ranged 1.6-5.6 ms in this run):

| recipe     | M=1 native / xla | M=16 native / xla | M=256 native / xla |
|------------|------------------|-------------------|--------------------|
| w8a8       | 10.4x / 3.26x    | 3.65x / 2.07x     | 2.76x / 1.77x      |
| w8a16      | 2.31x / 3.18x    | 1.29x / 1.02x     | 0.79x / 0.62x      |
| w4a16-g128 | 5.26x / 0.54x    | 1.23x / 0.12x     | 0.75x / 0.58x      |
| w4a8-g128  | 8.77x / 0.22x    | 1.75x / 0.16x     | 1.47x / 0.11x      |
| fp8        | 1.91x / 0.12x    | 1.17x / 0.11x     | 0.74x / 0.45x      |
| fp8a16     | 0.48x (*) / 0.11x | 1.29x / 0.11x    | 0.71x / 0.52x      |

(*) a load spike: median 8.4 ms, range 2.7-16.8 ms; side by side right after (jit'ed `qk.dot_general(...,
backend=...)` against `lax.dot_general`, median of 15, twice): fp8a16 native 2.3-2.8 ms, lax f32 2.1-3.1 ms,
fp8 native 1.7-1.8 ms, w8a16 native 0.9-1.5 ms against xla's 1.2-1.5 ms. The e4m3 GEMVs are the closest to
lax f32 at M = 1 (about 1-2x); outside XLA, through ctypes on a quieter moment, fp8a16 took 0.8-1.2 ms. Above
M = 32 the float accumulations (weight-only, fp8) are slower than lax f32 on either path (`slower` says so,
naming W8A8 / W4A8): at M = 64 (side by side, lax f32 7.8 ms) w8a16 9.2 ms, w4a16 7.9, fp8 7.6, fp8a16 7.8.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jax_bindings.arrays import DTYPES
from qkernels import dispatch, numerics
from qkernels.formats import Accumulation, Granularity, QOperand, Recipe
from qkernels.kernels import cpu
from qkernels.kernels.cpu import build

__all__ = ["NAME", "register", "supports", "run", "slower", "unavailable", "threads_for", "MAX_M_WEIGHT_ONLY",
           "SLOWER_ABOVE_M", "SLOWER_E4M3_WEIGHTS", "THREADS_ENV"]

NAME = "xla-native"
PRIORITY = 60  # above `xla` (50), where `supports` says it pays

_TARGETS = {"qk_linear_quantized": "QkLinearQuantized", "qk_matmul_codes": "QkMatmulCodes",
            "qk_linear_float": "QkLinearFloat"}

MAX_M_WEIGHT_ONLY = 256
"""Largest M (rows per batch entry) served for weight-only recipes; see the module docstring."""

SLOWER_ABOVE_M = 8
"""Above this M, the float accumulations (weight-only, fp8) are slower than lax.dot_general f32 here (module
docstring; the quiet rerun of `python -m bench --shapes 4096x4096 --m 1,16,256`, bench/results/cpu-amd-epyc-
2-threads-2026-12-01.md: 0.74-0.90x at M=16); the integer ones (W8A8, W4A8) are faster at every M measured.
float8_e4m3fn weights on small layers are slower at M=1 too (`SLOWER_E4M3_WEIGHTS`)."""

SLOWER_E4M3_WEIGHTS = 1 << 19
"""float8_e4m3fn weights up to this many (N * K) are slower than lax.dot_general f32 at M = 1 (the e4m3 decode
costs more than XLA's f32 GEMV on a weight that stays in cache): 576x576, two threads, 0.69x (fp8; fp8a16
1.0x); 1024x1024 1.5x / 2.0x, 4096x4096 2.1x / 2.0x (PARALLEL_MACS's measurements)."""

THREADS_ENV = "QKERNELS_CPU_THREADS"
PARALLEL_MACS = 1 << 16
"""Up to this many multiply-adds (M * N * K; a 256x256 GEMV) the kernels run on the calling thread; above it
they split N over every CPU, their helpers scheduled on XLA:CPU's intra-op pool (xla_ffi.cc's OnPool), so
they share XLA's workers instead of competing with them. Jit'ed, M = 1, N = K, one / two threads (2-core
Intel Xeon, ms; lax.dot_general f32 beside): N = 576: fp8 0.039 / 0.035, fp8a16 0.033 / 0.030, w8a16 0.030
/ 0.028, w8a8 0.020 / 0.020 (lax 0.022-0.027); N = 1024: fp8a16 0.087 / 0.065, w8a8 0.045 / 0.032; N = 4096:
fp8 1.19 / 0.69, fp8a16 1.18 / 0.71, w8a16 1.08 / 0.66, w8a8 0.74 / 0.75 (lax 1.4-1.7). (Before, with
threads of the library's own started per call, a second thread measured 2-4x slower at M = 1.)
`$QKERNELS_CPU_THREADS` overrides the rule."""


@functools.cache
def _library() -> ctypes.CDLL:
    path = build.shared_library("qk_xla_ffi", [cpu.HERE / "xla_ffi.cc", cpu.SOURCE],
                                include_dirs=(jax.ffi.include_dir(),),
                                extra_flags=(f"-DQK_JAXLIB_VERSION={jaxlib.__version__}",))  # in the cache key
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise build.BuildError(f"the XLA FFI library {path} does not load ({e}); delete it to rebuild") from e
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


@functools.cache
def unavailable() -> str | None:
    """None where the FFI library builds, loads and registers, else why not."""
    try:
        _library()
    except build.BuildError as e:
        return f"native CPU kernels unavailable: {e}"
    return None


_WEIGHTS = {  # accumulation -> the weight formats the kernels take: (qtype, granularity)
    Accumulation.INT32: {(numerics.INT8, Granularity.ROW)},
    Accumulation.INT32_PER_GROUP: {(numerics.INT4, Granularity.GROUP)},
    Accumulation.FLOAT: {(numerics.INT8, Granularity.ROW), (numerics.INT4, Granularity.GROUP),
                         (numerics.UINT4, Granularity.GROUP), (numerics.FP8_E4M3, Granularity.ROW)},
    Accumulation.FLOAT_CODES: {(numerics.FP8_E4M3, Granularity.ROW)},
}
_ACTIVATIONS = {Accumulation.INT32: numerics.INT8, Accumulation.INT32_PER_GROUP: numerics.INT8,
                Accumulation.FLOAT_CODES: numerics.FP8_E4M3}


def _format_reason(recipe: Recipe) -> str | None:
    acc = recipe.accumulation
    rhs = recipe.rhs
    if (rhs.qtype, rhs.granularity) not in _WEIGHTS.get(acc, ()):
        return f"no native kernel for {rhs.describe()} weights accumulating {acc.description}"
    lhs = recipe.lhs
    if lhs is not None and (lhs.qtype != _ACTIVATIONS[acc] or not (lhs.granularity is Granularity.ROW or lhs.static)):
        return f"no native kernel for {lhs.describe()} activations"
    return None


def supports(problem: dispatch.Problem) -> str | None:
    """Pure and cheap (the library's availability is cached after its first build)."""
    if problem.platform != "cpu":
        return f"runs on the host CPU only, not {problem.platform}"
    if (reason := _format_reason(problem.recipe)) is not None:
        return reason
    for what, dtype in (("activations", problem.act_dtype), ("output", problem.out_dtype)):
        if dtype not in cpu.DTYPES and not (what == "activations" and problem.lhs_quantized):
            return f"{what} dtype {dtype} is not taken; use float32, bfloat16 or float16"
    if problem.recipe.lhs is None and problem.m > MAX_M_WEIGHT_ONLY:
        return (f"weight-only at M={problem.m} > {MAX_M_WEIGHT_ONLY}: xla (one dequantize, XLA's f32 GEMM) is as "
                f"fast there (measured, jax_bindings/native.py)")
    return unavailable()


def slower(problem: dispatch.Problem) -> str | None:
    """Where this implementation is known to be slower than lax.dot_general f32 (module docstring), why and what
    is faster; pure and cheap."""
    if problem.recipe.accumulation.integer or 0 in (problem.n, problem.k):
        return None
    if problem.recipe.rhs.qtype.name == "float8_e4m3fn" and problem.n * problem.k <= SLOWER_E4M3_WEIGHTS:
        return (f"slower than lax.dot_general f32 on CPU for float8 weights of {problem.n}x{problem.k} <= "
                f"{SLOWER_E4M3_WEIGHTS} (0.69x at 576x576, M=1: jax_bindings/native.SLOWER_E4M3_WEIGHTS); W8A8 or "
                f"W4A8 is faster here")
    if problem.m <= SLOWER_ABOVE_M:
        return None
    return (f"slower than lax.dot_general f32 on CPU above M={SLOWER_ABOVE_M} rows (measured at 4096x4096: "
            f"0.74-0.90x at M=16, ~0.7x at M=256, jax_bindings/native.py); W8A8 or W4A8 is faster here")


def threads_for(problem: dispatch.Problem) -> int:
    """Threads the kernels split N over: `$QKERNELS_CPU_THREADS`, else one up to `PARALLEL_MACS`, else every
    CPU this process may use."""
    env = os.environ.get(THREADS_ENV)
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"{THREADS_ENV}={env!r} must be a positive integer (threads for the native CPU kernels)")
        return int(env)
    if problem.m * problem.n * problem.k <= PARALLEL_MACS:
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _i64(v: int) -> np.int64:
    return np.int64(v)


def run(call: dispatch.Bound, lhs: Any, rhs: QOperand, bias: Any) -> jax.Array:
    """`Implementation.run`: lhs (B?, M, K) float or a QOperand of codes (B?, M, K) and scales (B?, M)."""
    p = call.problem
    recipe, fmt = p.recipe, p.recipe.rhs
    kp = fmt.padded_k(p.k)
    attrs = {"w_kind": _i64(cpu.KINDS[fmt.qtype.name]), "group_size": _i64(fmt.group_size or 0), "kp": _i64(kp),
             "threads": _i64(threads_for(p)), "has_bias": _i64(bias is not None)}
    b = jnp.zeros((0,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    ws = jnp.asarray(rhs.scale, jnp.float32)
    codes = lhs.qvalue if isinstance(lhs, QOperand) else lhs
    out = jax.ShapeDtypeStruct((*codes.shape[:-1], p.n), DTYPES[p.out_dtype])
    if recipe.lhs is None:
        zero = fmt.zero_point
        wz = jnp.asarray(rhs.zero_point, jnp.int8) if zero else jnp.zeros((0,), jnp.int8)
        target, args = "qk_linear_float", (lhs, rhs.qvalue, ws, wz, b)
        attrs["has_zero"] = _i64(zero)
    elif isinstance(lhs, QOperand):  # static recipes: codes with the calibrated scale, zero-padded to kp
        xq = jnp.pad(lhs.qvalue, [(0, 0)] * (codes.ndim - 1) + [(0, kp - codes.shape[-1])])
        target, args = "qk_matmul_codes", (xq, jnp.asarray(lhs.scale, jnp.float32), rhs.qvalue, ws, b)
    else:
        target, args = "qk_linear_quantized", (lhs, rhs.qvalue, ws, b)
    return jax.ffi.ffi_call(target, out, vmap_method="expand_dims")(*args, **attrs)


def register() -> None:
    """Register `xla-native` with dispatch (`qkernels.backends` calls this); the library builds on first use.

    `accumulate` (the raw int32 accumulators a K-sharded integer matmul all-reduces, jax_bindings.sharding) is
    `xla`'s: XLA's integer dot is exact, so the accumulators are the same, and K-sharded calls are rare
    enough on CPU not to need a kernel of their own."""
    from jax_bindings import implementations

    dispatch.register(dispatch.Implementation(
        name=NAME, framework="jax", priority=PRIORITY, supports=supports, run=run, slower=slower,
        accumulate=implementations.accumulators,
        serves=dispatch.Serves.tags("w8a8", "w8a16", "w4a16", "w4a8", "fp8", "fp8a16"),
        description="native C kernels on the host CPU through the XLA FFI (AVX-512 VNNI int8 dots, exact "
                    "integer accumulators)"))
