"""XLA:CPU paths of the `xla` implementation: what runs instead of the recipe's literal definition
where it measured faster on CPU, with the same numerics contract.

XLA:CPU (jax 0.10.2) runs an int8 x int8 -> int32 dot fast for M >= 2 and slowly at M = 1 (a
4096x4096 weight: ~30 ms at M=1, ~0.6-0.9 ms at M=2..3, against ~2 ms for an f32 GEMV), and it
does not fuse a convert of the weight codes into a float dot (converting int8 codes to f32 inside
the jit and dotting costs 30-40 ms at every small M: the f32 weight is materialized per call). So:

- `Path.PADDED_ROWS` (integer recipes, M = 1): the activations get a second, zero row, the recipe's
  definition runs on the two rows, and row 0 is kept. Activations are quantized per row, so row 0's
  codes, scale, accumulators and output are exactly those of the one-row call.
- `Path.DIGITS` (weight-only recipes with integer weight codes, f32 activations, small M): each
  activation row is split into int8 digits, `x ~= s * (d1 + d2 / B + d3 / B**2)` with
  `s = amax / 127` and B = 254 (each residual is within +-0.5 of a digit, so the next digit is
  within +-127), and ONE exact int8 x int8 -> int32 dot of all 3M digit rows against the weight's
  codes runs; the three accumulators (per group for grouped weights, minus the zero point times the
  digit sums for uint4) are recombined and rescaled in f32. The split is exact to
  `amax * (1 / (2 * 127 * 254**2) + 2**-23)` ~ 1.8e-7 * amax per element (the last digit's
  truncation and the f32 roundings of `x / s` and of the residuals), about one f32 rounding of the
  row's largest value, so the result is within the weight-only tolerance of `qkernels.testing` for data
  whose rows are not dominated by one outlier 10**4 times their typical magnitude. It is more exact
  than the definition in one respect: the weight is not rounded to the activation dtype (f32 only,
  so there is nothing to round). A row with NaN/Inf gives NaN/Inf in its whole output row (its
  scale is not finite), as a float dot does.
- `Path.DEFINITION` everywhere else (`Recipe.matmul` with `JAX_OPS`).

`path_of(problem)` is the one rule; `explain` prints it (the implementation's `note`), and where
the path is known to be slower than `lax.dot_general` f32 (`slower_than_float`, from the shipped
bench results; the implementation's `slower`) explain says so and dispatch's first bind of that problem
warns (`qk.SlowPathWarning`), naming the faster recipe.

Measured (speedup over jit'ed `lax.dot_general` f32, same run; `python -m bench --framework jax --shapes
4096x4096 --m 1,16,256`, 2-core AMD EPYC shared with other jobs, load average ~14, so medians carry up
to 2-3x noise; bench/results/cpu-amd-epyc-2-threads-2026-12-01-jax.md):

| recipe     | M=1   | M=16  | M=256 | path (M=1 / 16 / 256)         | before (definition, M=1 / 16 / 256) |
|------------|-------|-------|-------|-------------------------------|-------------------------------------|
| w8a8       | 1.53x | 9.00x | 1.62x | padded rows / def. / def.     | 0.09x / 2.02x / 1.55x               |
| w8a16      | 3.03x | 1.48x | 0.53x | digits / digits / def.        | 0.11x / 0.09x / 0.29x               |
| w4a16-g128 | 0.26x | 0.17x | 0.52x | digits / digits / def.        | 0.10x / 0.12x / 0.15x               |
| w4a8-g128  | 0.12x | 0.30x | 0.09x | padded rows / def. / def.     | 0.11x / 0.17x / 0.08x               |
| fp8        | 0.05x | 0.20x | 0.50x | definition                    | 0.07x / 0.13x / 0.14x               |
| fp8a16     | 0.06x | 0.23x | 0.73x | definition                    | 0.11x / 0.12x / 0.18x               |

("before": every path the definition, measured earlier the same day under lighter load by a
side-by-side script: jit'ed `qk.dot_general` vs jit'ed `lax.dot_general` f32, the same weights as
a Flax kernel, median of 20 calls.) Not reached with XLA ops: int4 weights need a per-call unpack pass
(~2-6 ms for 4096x4096 here, already at or above lax f32's GEMV) and XLA:CPU runs the per-group
int32 dots as batched dots whose operand transposes cost tens of ms; fp8 codes are not integers (an
e4m3 value needs 18 bits as a fixed-point integer), so neither trick applies. That is what the native C
kernels do instead (`xla-native`, `jax_bindings/native.py`, through the XLA FFI: chosen before `xla` on CPU
where they build; these paths serve where they do not, and above their sizes).
"""

from __future__ import annotations

import enum
from typing import Any

import jax.numpy as jnp

from jax_bindings.arrays import DTYPES, JAX_OPS
from qkernels import dispatch, numerics
from qkernels.formats import Granularity, QOperand, Recipe

__all__ = ["Path", "path_of", "run", "split_digits", "slower_than_float", "DIGITS", "BASE", "DIGIT_MAX_M",
           "RESULTS"]

DIGITS = 3
BASE = 254
DIGIT_MAX_M = 16
"""Largest M (rows per batch entry) the digit path serves: 3M digit rows cost about as much as an f32
dot of M rows at M = 16 on this CPU, and more beyond."""


class Path(enum.Enum):
    """What `xla` runs on CPU for a problem (`path_of`)."""

    DEFINITION = "the recipe's definition"
    PADDED_ROWS = "int8 dot on M padded to 2 rows (XLA:CPU's int8 dot is slow at M=1)"
    DIGITS = "f32 activations split into 3 int8 digits per row, one exact int8 dot against the weight codes"


def path_of(problem: dispatch.Problem) -> Path:
    """The path `run` takes for `problem` (pure, cheap: the rule of this module's docstring)."""
    if problem.platform != "cpu" or 0 in (problem.m, problem.n, problem.k):
        return Path.DEFINITION
    recipe = problem.recipe
    if recipe.accumulation.integer:
        return Path.PADDED_ROWS if problem.m == 1 else Path.DEFINITION
    if (recipe.lhs is None and recipe.rhs.qtype.integer and problem.act_dtype == "float32"
            and problem.m <= DIGIT_MAX_M and problem.k <= numerics.max_exact_k(numerics.INT8, recipe.rhs.qtype)):
        return Path.DIGITS
    return Path.DEFINITION


RESULTS = "bench/results/cpu-amd-epyc-2-threads-2026-12-01-jax.md"
"""The shipped bench results the slow-path rule is read from."""


def slower_than_float(problem: dispatch.Problem) -> str | None:
    """Why `xla` is known to be slower than `lax.dot_general` f32 for `problem` on CPU (`RESULTS`), naming
    the faster recipe, or None. Pure and cheap, like `path_of`."""
    if problem.platform != "cpu" or 0 in (problem.m, problem.n, problem.k):
        return None
    recipe = problem.recipe
    faster = "W8A8 or W8A16" if problem.m <= DIGIT_MAX_M else "W8A8"
    if not recipe.rhs.qtype.integer:
        why = "fp8 codes run as an f32 dot on codes converted per call (0.05-0.73x at 4096x4096)"
    elif recipe.rhs.granularity is Granularity.GROUP:
        why = "int4 weights are unpacked per call and grouped int dots are slow on XLA:CPU (0.09-0.52x at 4096x4096)"
    elif recipe.lhs is None and path_of(problem) is Path.DEFINITION:
        why = f"above M={DIGIT_MAX_M} the weight is dequantized per call (0.53x at M=256, 4096x4096)"
    else:
        return None
    return f"slower than lax.dot_general f32 on CPU: {why}, {RESULTS}; {faster} is faster here"


def split_digits(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """f32 rows (..., M, K) -> (int8 digits (..., DIGITS, M, K), per-row scale (..., M)).

    | input            | scale            | digits                                      |
    |------------------|------------------|---------------------------------------------|
    | all-zero row     | 1                | all 0                                       |
    | amax in the row  | amax / 127       | d1 = +-127, d2 = d3 = 0                      |
    | NaN/Inf in a row | NaN/Inf          | garbage, multiplied by the non-finite scale |
    """
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True, initial=0.0)
    scale = jnp.where(amax == 0, jnp.float32(1), amax / jnp.float32(127))
    r = x / scale
    digits = []
    for _ in range(DIGITS):
        d = jnp.clip(jnp.round(r), -127, 127)
        digits.append(d.astype(jnp.int8))
        r = (r - d) * jnp.float32(BASE)
    return jnp.stack(digits, axis=-3), scale[..., 0]


def _recombine(acc: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Digit accumulators stacked on `axis` -> f32 `acc_1 + acc_2 / B + acc_3 / B**2` (Horner, low first)."""
    acc = jnp.moveaxis(acc.astype(jnp.float32), axis, 0)
    y = acc[-1]
    for a in acc[-2::-1]:
        y = a + y * jnp.float32(1.0 / BASE)
    return y


def _digit_matmul(recipe: Recipe, lhs: jnp.ndarray, rhs: QOperand, bias: Any, *, k: int, batched: bool,
                  out_dtype: str) -> jnp.ndarray:
    fmt = recipe.rhs
    kp = fmt.padded_k(k)
    digits, s_x = split_digits(JAX_OPS.pad_last(lhs, kp))  # [..., D, M, Kp], [..., M]
    lead, m = digits.shape[:-3], digits.shape[-2]
    rows = digits.reshape(*lead, DIGITS * m, kp)  # [..., D*M, Kp]: every digit row in one dot
    w = fmt.codes(rhs, k, JAX_OPS)  # [B?, N, Kp] int8
    s_w = rhs.scale.astype(jnp.float32)
    grouped = fmt.granularity is Granularity.GROUP
    if grouped:
        acc = JAX_OPS.grouped_int_dot(rows, w, fmt.group_size, batched)  # [..., D*M, N, G] int32, exact
        if fmt.zero_point:  # sum_k d_k (q_k - z) = acc - z * sum_k d_k, per group, still exact
            sums = jnp.sum(rows.reshape(*rows.shape[:-1], -1, fmt.group_size).astype(jnp.int32), axis=-1)
            acc = acc - sums[..., :, None, :] * rhs.zero_point.astype(jnp.int32)[..., None, :, :]
        t = _recombine(acc.reshape(*lead, DIGITS, m, *acc.shape[-2:]), axis=-4)  # [..., M, N, G]
        y = jnp.sum(t * s_w[..., None, :, :], axis=-1)
    else:
        acc = JAX_OPS.int_dot(rows, w, batched)  # [..., D*M, N] int32, exact
        if fmt.zero_point:
            sums = jnp.sum(rows.astype(jnp.int32), axis=-1)
            acc = acc - sums[..., :, None] * rhs.zero_point.astype(jnp.int32)[..., None, :]
        y = _recombine(acc.reshape(*lead, DIGITS, m, acc.shape[-1]), axis=-3) * s_w[..., None, :]
    y = y * s_x[..., :, None]
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(DTYPES[out_dtype])


def _pad_rows(x: Any) -> Any:
    """One zero row appended on the M axis (-2) of float activations or of a quantized operand."""
    if isinstance(x, QOperand):  # pre-quantized (static recipes): codes 0, scale 1
        q = jnp.pad(x.qvalue, [(0, 0)] * (x.qvalue.ndim - 2) + [(0, 1), (0, 0)])
        s = jnp.pad(x.scale, [(0, 0)] * (x.scale.ndim - 1) + [(0, 1)], constant_values=1)
        return QOperand(q, s, x.zero_point)
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, 1), (0, 0)])


def run(call: dispatch.Bound, lhs: Any, rhs: QOperand, bias: Any) -> jnp.ndarray:
    """`xla`'s run: the path `path_of(call.problem)` names."""
    p = call.problem
    act = p.act_dtype if not p.lhs_quantized else "float32"
    batched = p.batch is not None
    path = path_of(p)
    if path is Path.DIGITS:
        return _digit_matmul(p.recipe, lhs, rhs, bias, k=p.k, batched=batched, out_dtype=p.out_dtype)
    if path is Path.PADDED_ROWS:
        y = p.recipe.matmul(JAX_OPS, _pad_rows(lhs), rhs, bias, k=p.k, batched=batched, act_dtype=act,
                            out_dtype=p.out_dtype)
        return y[..., :1, :]
    return p.recipe.matmul(JAX_OPS, lhs, rhs, bias, k=p.k, batched=batched, act_dtype=act, out_dtype=p.out_dtype)
