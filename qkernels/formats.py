"""Operand formats, accumulations and recipes: each owns its numerics, once, for every framework.

A recipe names how each side of a matmul is stored, activations (lhs) and weights (rhs), in the
canonical layout of DESIGN.md section 3 (lhs (B, M, K), rhs (B, N, K), K last), and how the products
accumulate and are rescaled (section 4). Everything is written against `numerics.ArrayOps`, so the
NumPy reference, the jnp port (`xla`) and the torch port (`torch-cpu`) execute these definitions;
a new format (fp8, emulated int6, ...) is a new `QType` / `OperandFormat` / `Recipe` value here (or in
the user's code) plus kernels, never a change in dispatch or in the bindings.

    fmt = OperandFormat(qtype=numerics.int_type(6), granularity=Granularity.GROUP, group_size=64)
    w6a16 = Recipe(tag="w6a16", lhs=None, rhs=fmt)      # weight-only: accumulation FLOAT, derived
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import re
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar, NamedTuple

from qkernels import numerics
from qkernels.numerics import FP8_E4M3, GROUP_SIZES, INT4, INT8, NUMPY_OPS, UINT4, ArrayOps, Granularity, QType

__all__ = [
    "Calibration", "OperandFormat", "Accumulation", "ACCUMULATIONS", "Recipe", "W8A8", "W8A16", "W4A16", "W4A8",
    "FP8", "FP8A16", "RECIPES",
    "QOperand", "resolve_recipe", "parse_recipe", "recipe_named",
]


class QOperand(NamedTuple):
    """Framework-neutral quantized operand handed to implementations (torch, JAX or NumPy arrays).

    `packed`: backend-specific prepacked forms of this operand (made once, e.g. `qk.prepack`), or None;
    a kernel uses the one matching its layout and ignores the rest, every other consumer ignores it.
    """

    qvalue: Any
    scale: Any
    zero_point: Any = None
    packed: Any = None


class Calibration(enum.Enum):
    """How a block's scale (and zero point) is chosen from its values."""

    ABSMAX = "absmax"  # symmetric: scale = max|x| / qmax
    MINMAX = "minmax"  # asymmetric: scale = (max - min) / qmax, integer zero point (unsigned types)
    STATIC = "static"  # symmetric, one scale per tensor fixed ahead of time (calibrated), given at quantize


def _integer(value: Any, name: str, example: str) -> int:
    """`value` as an int: integers (NumPy's too) pass; floats, bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} ({type(value).__name__}) must be an integer, e.g. {name}={example}")
    return int(value)


def _flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} ({type(value).__name__}) must be True or False")


@dataclass(frozen=True, kw_only=True, slots=True)
class OperandFormat:
    """How one quantized operand is stored: `x ≈ (qvalue - zero_point) * scale` per block.

    `qvalue` is of the type's storage dtype (int8 codes for integer types, e.g. float8_e4m3fn for
    fp8), shape (..., K_stored): K padded up to a multiple of `group_size` (grouped formats), then two
    codes per byte when `qtype.packed`. `scale` is f32 of shape `(...,)` per row,
    `(..., K_padded // group_size)` per group, `()` per tensor; `zero_point` (MINMAX calibration,
    unsigned types) is int8 of the scale's shape.

    STATIC calibration (activations with a calibrated range, per tensor): `quantize(x, scale=s)` uses the
    given scale and saturates values beyond the calibrated range at +-qmax. Its operands carry `s`
    repeated per row (shape `(...,)`, as a per-row format's), so every kernel that takes per-token
    activations serves them unchanged: with equal row scales the per-row rescale is the per-tensor one.
    """

    qtype: QType
    granularity: Granularity
    group_size: int | None = None
    zero_point: bool = False
    calibration: Calibration | None = None  # None: MINMAX with a zero point, else ABSMAX

    def __post_init__(self) -> None:
        if self.group_size is not None:
            object.__setattr__(self, "group_size", _integer(self.group_size, "group_size", "128"))
        _flag(self.zero_point, "zero_point")
        grouped = self.granularity is Granularity.GROUP
        if grouped and self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"group_size={self.group_size} is not supported; choose one of {GROUP_SIZES}")
        if not grouped and self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} given for a {self.granularity.value} format; "
                             f"use Granularity.GROUP or drop group_size")
        if self.zero_point == self.qtype.signed:
            raise ValueError(
                f"{self.qtype.name} is {'signed' if self.qtype.signed else 'unsigned'}: signed types are "
                f"symmetric (zero_point=False), unsigned types need zero_point=True")
        calibration = self.calibration or (Calibration.MINMAX if self.zero_point else Calibration.ABSMAX)
        if (calibration is Calibration.MINMAX) != self.zero_point:
            raise ValueError(f"calibration {calibration.value} {'needs' if self.zero_point else 'has no'} zero "
                             f"point; use {'MINMAX' if self.zero_point else 'ABSMAX'} for {self.qtype.name}")
        object.__setattr__(self, "calibration", calibration)
        if calibration is Calibration.STATIC and (self.granularity is not Granularity.TENSOR or not self.qtype.signed):
            raise ValueError(f"static calibration is one symmetric scale per tensor: use Granularity.TENSOR "
                             f"with a signed type, not {self.granularity.value} {self.qtype.name}")

    @property
    def static(self) -> bool:
        """The scale is calibrated ahead of time and given at quantize (`Calibration.STATIC`)."""
        return self.calibration is Calibration.STATIC

    @property
    def _rowwise(self) -> bool:
        """Stored with one scale per row: per-row formats, and static ones (their scale repeated per row)."""
        return self.granularity is Granularity.ROW or self.static

    @property
    def packed(self) -> bool:
        return self.qtype.packed

    def padded_k(self, k: int) -> int:
        """Logical K padded to the group size and to an even length for packed types."""
        return numerics.padded_k(k, group_size=self.group_size, packed=self.packed)

    def stored_k(self, k: int) -> int:
        """Length of `qvalue`'s last axis for a logical K."""
        kp = self.padded_k(k)
        return kp // 2 if self.packed else kp

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of `scale` (and `zero_point`) for a logical operand shape (..., K)."""
        if self.granularity is Granularity.TENSOR and not self.static:
            return ()
        if self.granularity is not Granularity.GROUP:  # per row, or a static scale repeated per row
            return tuple(shape[:-1])
        return (*shape[:-1], self.padded_k(shape[-1]) // self.group_size)

    def describe(self) -> str:
        parts = [self.qtype.name, self.granularity.value]
        if self.group_size:
            parts.append(f"g{self.group_size}")
        if self.zero_point:
            parts.append("zero-point")
        if self.static:
            parts.append("static")
        return " ".join(parts)

    # --- numerics, for any ArrayOps --------------------------------------------------------------

    def blocks(self, x: Any) -> Any:
        """(..., K_padded) -> (..., n_blocks, block): one scale per block."""
        if self.granularity is Granularity.GROUP:
            return x.reshape(*x.shape[:-1], x.shape[-1] // self.group_size, self.group_size)
        if self._rowwise:
            return x[..., None, :]
        return x.reshape(*([1] * (x.ndim - 1)), 1, -1)

    def _stored(self, s: Any) -> Any:
        """A per-block value (..., n_blocks, 1) -> the stored scale / zero point shape."""
        s = s[..., 0]
        if self.granularity is Granularity.GROUP:
            return s
        if self._rowwise:
            return s[..., 0]
        return s.reshape(())

    def _per_block(self, s: Any) -> Any:
        """Stored scale / zero point -> broadcastable against `blocks(x)`."""
        if self.granularity is Granularity.GROUP:
            return s[..., None]
        if self._rowwise:
            return s[..., None, None]
        return s

    def quantize(self, x: Any, ops: ArrayOps = NUMPY_OPS, *, amax: Any = None, scale: Any = None) -> QOperand:
        """Quantize float `x` (..., K) along its last axis, calibrated on `x` itself.

        Subnormal inputs are read as 0 (`numerics.flush_subnormals`: flush-to-zero hardware does), then
        K is zero-padded to `padded_k(K)` (zeros change neither an absmax nor a range that includes
        0); packed formats then store two codes per byte. NaN/Inf are not checked here
        (that needs a host sync): callers check with `numerics.check_finite` where they can.
        `amax` (ABSMAX, per-row formats): each row's absolute maximum (...,) to calibrate with
        instead of `x`'s own, e.g. the all-reduced maximum when `x` is one K-shard of longer rows.
        `scale` (STATIC formats, required there): the calibrated f32 scale (a scalar), e.g. from
        `qkernels.calibration.static_scale`.
        """
        if self.static or scale is not None:
            return self._quantize_static(x, ops, scale)
        if amax is not None and (self.calibration is not Calibration.ABSMAX or self.granularity is not Granularity.ROW):
            raise ValueError(f"amax= calibrates symmetric per-row formats only, not {self.describe()}; "
                             f"drop amax to calibrate on x itself")
        x = ops.pad_last(numerics.flush_subnormals(ops.cast(x, "float32"), ops), self.padded_k(x.shape[-1]))
        xb = self.blocks(x)
        zero = None
        if self.calibration is Calibration.MINMAX:
            scale, zero = numerics.asymmetric_params(ops.min(xb), ops.max(xb), self.qtype, ops)
            q = numerics.quantize_asymmetric(xb, scale, zero, self.qtype, ops)
            zero = self._stored(zero)
        else:
            amax = ops.absmax(xb) if amax is None else ops.cast(amax, "float32")[..., None, None]
            scale = numerics.symmetric_scale(amax, self.qtype, ops)
            q = numerics.quantize_symmetric(xb, scale, self.qtype, ops)
        q = q.reshape(*x.shape)
        if self.packed:
            q = numerics.pack_int4(q, ops)
        return QOperand(q, self._stored(scale), zero)

    def _quantize_static(self, x: Any, ops: ArrayOps, scale: Any) -> QOperand:
        if not self.static:
            raise ValueError(f"scale= is for static formats, not {self.describe()}; drop it to calibrate on x")
        if scale is None:
            raise ValueError(f"{self.describe()} quantizes with a calibrated scale: pass scale= (qk.calibrate "
                             f"records one per layer; qkernels.calibration.static_scale computes one)")
        scale = ops.cast(ops.asarray(scale), "float32")
        if tuple(scale.shape) not in ((), (1,)):
            raise ValueError(f"a static scale is one value per tensor, got shape {tuple(scale.shape)}")
        scale = scale.reshape(())
        if ops.host_checks and not (ops.all_finite(scale) and bool(scale > 0)):
            raise ValueError(f"static scale {float(scale)} must be finite and > 0; recalibrate the layer")
        q = numerics.quantize_symmetric(numerics.flush_subnormals(ops.cast(x, "float32"), ops), scale, self.qtype, ops)
        return QOperand(q, ops.broadcast_to(scale, tuple(x.shape[:-1])))

    def check_scale(self, scale: Any, ops: ArrayOps = NUMPY_OPS, *, what: str = "the tensor", fix: str = "") -> None:
        """Raise where a block's scale is not finite: a NaN/Inf value in the block, or a range
        (max - min, MINMAX) beyond f32 that would give NaN outputs silently. A host check: a no-op where
        values cannot be inspected (`ops.host_checks` False: under jax tracing, use checkify)."""
        if ops.host_checks and not ops.all_finite(scale):
            raise ValueError(
                f"{what}: NaN/Inf in {ops.count_nonfinite(scale)} row(s) or group(s), or a group whose range "
                f"overflows f32 (max - min > 3.4e38), and cannot be quantized to {self.describe()}; fix the values "
                f"(e.g. nan_to_num) or scale them down (fold a power of two into the next layer){fix}")

    def quantize_activations(self, x: Any, ops: ArrayOps = NUMPY_OPS, *, scale: Any = None) -> QOperand:
        """`quantize` for activations on the fly: where the framework can check on the host
        (`ops.host_checks`), a row with NaN/Inf (a non-finite scale) raises instead of giving garbage.
        `scale`: the calibrated scale of a STATIC format."""
        if self.static:  # the scale is given: check the values themselves (a calibrated range hides no NaN)
            if ops.host_checks and not ops.all_finite(x):
                raise ValueError(f"activations: {ops.count_nonfinite(x)} NaN/Inf value(s) cannot be quantized to "
                                 f"{self.describe()}; fix the values (e.g. nan_to_num) or use a weight-only recipe")
            return self.quantize(x, ops, scale=scale)
        q = self.quantize(x, ops)
        self.check_scale(q.scale, ops, what="activations", fix=", or use a weight-only recipe")
        return q

    def codes(self, operand: QOperand, k: int, ops: ArrayOps = NUMPY_OPS) -> Any:
        """The codes (..., K_padded), unpacked for packed types (padding included: zero codes)."""
        q = operand.qvalue
        if q.shape[-1] != self.stored_k(k):
            raise ValueError(
                f"qvalue's last axis has {q.shape[-1]} entries but K={k} in format {self.describe()} "
                f"stores {self.stored_k(k)}; the operands' contraction sizes do not match")
        return numerics.unpack_int4(q, self.padded_k(k), self.qtype, ops) if self.packed else q

    def dequantize(self, operand: QOperand, k: int, ops: ArrayOps = NUMPY_OPS, dtype: str = "float32") -> Any:
        """`(f32(q) - zero) * scale` in f32, shape (..., K) (padding removed), then cast to `dtype`."""
        codes = ops.cast(self.codes(operand, k, ops), "float32")
        q = self.blocks(codes)
        if self.zero_point:
            q = q - self._per_block(ops.cast(operand.zero_point, "float32"))
        w = q * self._per_block(ops.cast(operand.scale, "float32"))
        return ops.cast(w.reshape(codes.shape)[..., :k], dtype)


class Accumulation:
    """How the products of a recipe accumulate and are rescaled (DESIGN.md section 4).

    Every accumulation is written as `finish(partial(...))`: `partial` is what may be summed over
    K shards (exactly, when `integer`), `finish` applies what remains of the rescale, bias and the
    one output cast. `accumulators` are the raw integer dots before any rescale (integer kinds):
    (..., M, N), with a trailing group axis (..., M, N, G) when `grouped`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    integer: ClassVar[bool] = False
    grouped: ClassVar[bool] = False

    INT32: ClassVar[Accumulation]
    INT32_PER_GROUP: ClassVar[Accumulation]
    FLOAT: ClassVar[Accumulation]
    FLOAT_CODES: ClassVar[Accumulation]

    def __repr__(self) -> str:
        return f"Accumulation.{self.name}"

    def __reduce__(self) -> Any:
        if getattr(Accumulation, self.name, None) is self:  # the shipped ones unpickle as themselves
            return (getattr, (Accumulation, self.name))
        return (type(self), ())

    def max_k(self, recipe: Recipe) -> int | None:
        """Largest contraction served exactly, None if unbounded."""
        return None

    def rescale_bound(self, recipe: Recipe, k: int) -> float | None:
        """Largest weight scale the rescale takes for a contraction of length `k` without an
        intermediate overflow, None if any finite scale is safe (the result then overflows only where
        the exact result is beyond f32, up to quantization error).

        The integer accumulations apply the weight scale first: `|f32(acc) * s_rhs|` (W8A8), and
        every partial sum of `f32(acc_g) * s_rhs[n, g]` (W4A8), are at most `K * qmax_l * qmax_r *
        max(s_rhs)`; the bound is FLT_MAX / (2 * K * qmax_l * qmax_r), the factor 2 covering the
        roundings of the int32 -> f32 cast, the scale and the sums (each within 2**-24, fewer than
        2**24 groups). A weight within it has |w| <= ~FLT_MAX / (2 * K * qmax_l), 3.3e32 at K=4096.
        """
        return None

    def lhs_operand(self, recipe: Recipe, ops: ArrayOps, lhs: Any) -> Any:
        """The activations as the accumulation takes them: quantized (integer kinds) or float as is."""
        if recipe.lhs is None or isinstance(lhs, QOperand):
            return lhs
        return recipe.lhs.quantize_activations(lhs, ops)

    def accumulators(self, recipe: Recipe, ops: ArrayOps, lhs: Any, rhs: QOperand, *, k: int, batched: bool) -> Any:
        raise ValueError(f"{recipe.name} accumulates in {self.description}; it has no integer accumulators")

    def partial(self, recipe: Recipe, ops: ArrayOps, lhs: Any, rhs: QOperand, *, k: int, batched: bool,
                act_dtype: str) -> Any:
        raise NotImplementedError

    def finish(self, recipe: Recipe, ops: ArrayOps, part: Any, lhs: Any, rhs: QOperand, bias: Any,
               out_dtype: str) -> Any:
        raise NotImplementedError

    def matmul(self, recipe: Recipe, ops: ArrayOps, lhs: Any, rhs: QOperand, bias: Any, *, k: int,
               batched: bool, act_dtype: str, out_dtype: str) -> Any:
        """`out[..., m, n] = rescale(sum_k lhs[..., m, k] * rhs[..., n, k]) + bias[n]`, cast once."""
        lhs = self.lhs_operand(recipe, ops, lhs)
        part = self.partial(recipe, ops, lhs, rhs, k=k, batched=batched, act_dtype=act_dtype)
        return self.finish(recipe, ops, part, lhs, rhs, bias, out_dtype)

    @staticmethod
    def _epilogue(ops: ArrayOps, y: Any, bias: Any, out_dtype: str) -> Any:
        if bias is not None:
            y = y + ops.cast(bias, "float32")
        return ops.cast(y, out_dtype)

    @classmethod
    def _row_rescale(cls, ops: ArrayOps, part: Any, lhs: QOperand, rhs: QOperand, bias: Any, out_dtype: str) -> Any:
        """`y = (f32(acc) * s_rhs[n]) * s_lhs[m]`, then `+ bias[n]`, one cast (per-row scales on both sides):
        weight scale first, so only the last multiply can overflow (`_IntegerDot`, `rescale_bound`)."""
        y = (ops.cast(part, "float32") * ops.cast(rhs.scale, "float32")[..., None, :]) \
            * ops.cast(lhs.scale, "float32")[..., :, None]
        return cls._epilogue(ops, y, bias, out_dtype)

    @staticmethod
    def _int_codes(recipe: Recipe, ops: ArrayOps, lhs: QOperand, rhs: QOperand, k: int) -> tuple[Any, Any]:
        """Activation codes zero-padded to the weight's padded K, and the weight's codes."""
        kp = recipe.rhs.padded_k(k)
        a = ops.pad_last(recipe.lhs.codes(lhs, lhs.qvalue.shape[-1], ops), kp)
        return a, recipe.rhs.codes(rhs, k, ops)


def _first_scale_bound(recipe: Recipe, k: int) -> float:
    """Largest first-applied (weight) scale whose products with the accumulators stay finite."""
    return numerics.FLT_MAX / (2.0 * max(k, 1) * recipe.lhs.qtype.qmax * recipe.rhs.qtype.qmax)


class _IntegerDot(Accumulation):
    """One exact int32 dot of the codes; `y = (f32(acc) * s_rhs[n]) * s_lhs[m] + bias[n]`.

    Weight scale first, activation scale last (as W4A8 does), so the one multiply that can overflow
    is the last: the weight scale is bounded once, at quantize time (`rescale_bound`), and
    activations of any finite size give inf only where the result itself is beyond f32. The other
    fixed orders each fail somewhere: `(acc * s_lhs) * s_rhs` overflows in the middle for activations
    near 1e33 although the result fits (and activations, quantized on the fly on the device, cannot be
    checked without a host sync); `acc * (s_lhs * s_rhs)` gives inf * 0 = NaN for a zero accumulator
    and a subnormal, imprecise product for small scales. (A departure from DESIGN.md section 4, which
    wrote `(f32(acc) * s_lhs[m]) * s_rhs[n]`: every backend changed with it, so outputs stay identical.)
    """

    name = "INT32"
    description = "int32"
    integer = True

    def max_k(self, recipe: Recipe) -> int:
        return numerics.max_exact_k(recipe.lhs.qtype, recipe.rhs.qtype)

    def accumulators(self, recipe, ops, lhs, rhs, *, k, batched):
        a, w = self._int_codes(recipe, ops, lhs, rhs, k)
        return ops.int_dot(a, w, batched)

    def partial(self, recipe, ops, lhs, rhs, *, k, batched, act_dtype):
        return self.accumulators(recipe, ops, lhs, rhs, k=k, batched=batched)

    def rescale_bound(self, recipe, k):
        return _first_scale_bound(recipe, k)

    def finish(self, recipe, ops, part, lhs, rhs, bias, out_dtype):
        return self._row_rescale(ops, part, lhs, rhs, bias, out_dtype)


class _GroupedIntegerDot(Accumulation):
    """An exact int32 dot per group of K; `y = 0; for g: y = y + f32(acc_g) * s_rhs[n, g]`, then
    `y * s_lhs[m] + bias[n]` (groups summed in order, each product rounded once)."""

    name = "INT32_PER_GROUP"
    description = "int32 per group, f32 across groups"
    integer = True
    grouped = True

    def accumulators(self, recipe, ops, lhs, rhs, *, k, batched):
        a, w = self._int_codes(recipe, ops, lhs, rhs, k)
        return ops.grouped_int_dot(a, w, recipe.rhs.group_size, batched)

    def rescale_bound(self, recipe, k):
        return _first_scale_bound(recipe, k)

    def partial(self, recipe, ops, lhs, rhs, *, k, batched, act_dtype):
        a, w = self._int_codes(recipe, ops, lhs, rhs, k)
        return ops.grouped_scaled_sum(a, w, ops.cast(rhs.scale, "float32"), recipe.rhs.group_size, batched)

    def finish(self, recipe, ops, part, lhs, rhs, bias, out_dtype):
        return self._epilogue(ops, part * ops.cast(lhs.scale, "float32")[..., :, None], bias, out_dtype)


class _FloatDot(Accumulation):
    """Weights dequantized to the activation dtype, a float dot accumulating in f32, bias, one cast."""

    name = "FLOAT"
    description = "f32 (weights dequantized to the activation dtype)"

    def partial(self, recipe, ops, lhs, rhs, *, k, batched, act_dtype):
        w = recipe.rhs.dequantize(rhs, k, ops, act_dtype)
        return ops.float_linear(lhs, w, None, "float32", batched)

    def finish(self, recipe, ops, part, lhs, rhs, bias, out_dtype):
        return self._epilogue(ops, part, bias, out_dtype)

    def matmul(self, recipe, ops, lhs, rhs, bias, *, k, batched, act_dtype, out_dtype):
        # one fused call: some frameworks add the bias inside the GEMM (one rounding either way)
        w = recipe.rhs.dequantize(rhs, k, ops, act_dtype)
        return ops.float_linear(lhs, w, bias, out_dtype, batched)


class _FloatCodesDot(Accumulation):
    """One f32 dot of float codes (fp8 x fp8), then `y = (acc * s_rhs[n]) * s_lhs[m] + bias[n]`, one cast.

    Every product of two e4m3 codes is exact in f32 (4 x 4 significant bits; magnitudes 2**-18 to
    448**2), so backends differ only in the order of the f32 sum (`qkernels.testing.tolerances`'
    accumulation term), not in the products: the reference sums in f64 and rounds once, torch on CPU
    upcasts the codes to f32 (emulated), XLA multiplies the float8 operands with an f32 preferred type,
    the Triton kernels run fp8 tensor-core MMAs accumulating in f32. The rescale is W8A8's (DESIGN.md
    section 4), in the same order. Unbounded K (no integer accumulator to overflow).
    """

    name = "FLOAT_CODES"
    description = "f32 dot of the float codes (exact products), f32 rescale"

    def partial(self, recipe, ops, lhs, rhs, *, k, batched, act_dtype):
        a, w = self._int_codes(recipe, ops, lhs, rhs, k)  # the padding rule is the integer codes'
        return ops.float_linear(a, w, None, "float32", batched)

    def rescale_bound(self, recipe, k):
        return _first_scale_bound(recipe, k)  # |acc| <= K * 448 * 448, as an integer accumulator's bound

    def finish(self, recipe, ops, part, lhs, rhs, bias, out_dtype):
        return self._row_rescale(ops, part, lhs, rhs, bias, out_dtype)


Accumulation.INT32 = _IntegerDot()
Accumulation.INT32_PER_GROUP = _GroupedIntegerDot()
Accumulation.FLOAT = _FloatDot()
Accumulation.FLOAT_CODES = _FloatCodesDot()

ACCUMULATIONS: tuple[Accumulation, ...] = (Accumulation.INT32, Accumulation.INT32_PER_GROUP, Accumulation.FLOAT,
                                           Accumulation.FLOAT_CODES)
"""The shipped accumulations: written in `ArrayOps` primitives alone, so every generic backend (the
reference, `torch-cpu`, `xla`) executes them and declares exactly these; a shipped accumulation added
here is served there with no change in a binding. A user-defined one is not listed: generic backends
refuse it by name (only the reference runs it)."""


def _derive_accumulation(lhs: OperandFormat | None, rhs: OperandFormat) -> Accumulation:
    if lhs is None:
        return Accumulation.FLOAT
    if lhs.qtype.integer and rhs.qtype.integer and lhs.granularity is not Granularity.GROUP:
        return Accumulation.INT32_PER_GROUP if rhs.granularity is Granularity.GROUP else Accumulation.INT32
    ungrouped = Granularity.GROUP not in (lhs.granularity, rhs.granularity)
    if not lhs.qtype.integer and not rhs.qtype.integer and ungrouped and not lhs.zero_point and not rhs.zero_point:
        return Accumulation.FLOAT_CODES
    raise ValueError(f"no accumulation is derived for activations {lhs.describe()} x weights {rhs.describe()}; "
                     f"pass accumulation= explicitly")


_BY_NAME: dict[str, Recipe] = {}


@dataclass(frozen=True, kw_only=True, slots=True, eq=True, unsafe_hash=False)
class Recipe:
    """Which formats the two sides of a matmul use, and how the products accumulate.

    `tag` names the kernel family (what kernels declare they serve: 'w8a8', 'w4a16', ...);
    `lhs` is None when activations stay float (weight-only); `accumulation` is derived from the
    formats unless given. `quantized_backward`: the two matmuls of the backward pass are quantized
    too (int8 dynamic, per row, as AQT does) instead of running in float against the dequantized
    operands. Recipes are values: hashable, compared by value (static arguments under `jax.jit`),
    and calling one returns a copy with fields replaced (`qk.W8A8(quantized_backward=True)`).
    """

    tag: str
    lhs: OperandFormat | None
    rhs: OperandFormat
    accumulation: Accumulation | None = field(default=None, compare=False)
    quantized_backward: bool = False
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _flag(self.quantized_backward, "quantized_backward")
        if not isinstance(self.tag, str) or not re.fullmatch(r"[a-z][a-z0-9]*", self.tag):
            raise ValueError(f"recipe tag {self.tag!r} must be lower-case letters and digits, e.g. 'w6a16'")
        if self.accumulation is None:
            object.__setattr__(self, "accumulation", _derive_accumulation(self.lhs, self.rhs))
        # recipes key every per-call cache (bound calls, tuned configs): hash the nested formats once
        object.__setattr__(self, "_hash", hash((type(self), self.tag, self.lhs, self.rhs, self.quantized_backward)))
        known = _BY_NAME.setdefault(self.name, self)
        if known != self:
            raise ValueError(f"a different recipe is already named {self.name!r} ({known.describe()}); "
                             f"give this one another tag")

    def __repr__(self) -> str:
        return f"<Recipe {self.describe()}>"

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt through __init__: the cached hash is per process (string hashes are salted)
        init = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return (_rebuild_recipe, (type(self), init))

    def __call__(self, **changes: Any) -> Recipe:
        """This recipe with `changes` applied (`qk.W8A8()` is `qk.W8A8`)."""
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def group_size(self) -> int | None:
        return self.rhs.group_size

    @property
    def max_k(self) -> int | None:
        """Largest contraction length served exactly (int32 accumulator bound), None if unbounded."""
        return self.accumulation.max_k(self)

    def check_weight_scale(self, scale: Any, k: int, ops: ArrayOps = NUMPY_OPS, *, what: str = "the weight") -> None:
        """Refuse a quantized weight whose scales are not finite (`OperandFormat.check_scale`) or beyond
        the accumulation's `rescale_bound` for a contraction of length `k`: its rescale would give inf
        where the exact result fits in f32. A host check (no-op where `ops.host_checks` is False)."""
        self.rhs.check_scale(scale, ops, what=what)
        bound = self.accumulation.rescale_bound(self, k)
        if bound is None or not ops.host_checks:
            return
        worst = float(ops.absmax(ops.cast(scale, "float32").reshape(1, -1)).max()) if math.prod(scale.shape) else 0.0
        if worst > bound:
            qr, ql = self.rhs.qtype.qmax, self.lhs.qtype.qmax
            raise ValueError(
                f"{what}: a scale of {worst:.4g} (|values| up to ~{worst * qr:.4g}) exceeds {bound:.4g}, the largest "
                f"{self.name} rescales without overflowing f32 at K={k} (weight scale * K * {ql} * {qr} <= "
                f"FLT_MAX / 2, |values| up to ~{bound * qr:.4g}); scale the weight down by a power of two and fold "
                f"it into the layer's output (or the next layer), or use a weight-only recipe (W8A16/W4A16)")

    def check_k(self, k: int) -> None:
        """Refuse a contraction that would overflow the int32 accumulator (never wrap silently)."""
        limit = self.max_k
        if limit is not None and k > limit:
            q = f"{self.lhs.qtype.qmax}*{self.rhs.qtype.qmax}"
            raise ValueError(
                f"K={k} exceeds {limit}, the largest contraction {self.name} accumulates exactly in int32 "
                f"(K*{q} < 2**31); split the contraction into chunks of at most {limit} and sum the "
                f"outputs, or use a weight-only recipe (W8A16/W4A16)")

    @property
    def name(self) -> str:
        """Short stable identifier, e.g. 'w8a8', 'w4a16-g128-zp' (`recipe_named` reads it back)."""
        parts = [self.tag]
        if self.group_size:
            parts.append(f"g{self.group_size}")
        if self.rhs.zero_point:
            parts.append("zp")
        if self.lhs is not None and self.lhs.static:
            parts.append("static")
        if self.quantized_backward:
            parts.append("qbwd")
        return "-".join(parts)

    def describe(self) -> str:
        lhs = self.lhs.describe() if self.lhs else "float"
        return f"{self.name}: lhs {lhs}, rhs {self.rhs.describe()}, accumulate {self.accumulation.description}"

    @property
    def static(self) -> bool:
        """Activations are quantized with a calibrated per-tensor scale (`quantize_lhs(..., input_scale)`)."""
        return self.lhs is not None and self.lhs.static

    def quantize_lhs(self, ops: ArrayOps, x: Any, input_scale: Any = None) -> QOperand:
        """The activations as this recipe quantizes them: per token on the fly, or, for a static recipe,
        with the layer's calibrated `input_scale`. Bindings serving a static recipe call this and hand the
        result to dispatch as pre-quantized activations (`Problem(lhs_quantized=True)`)."""
        if self.lhs is None:
            raise ValueError(f"{self.name} is weight-only: its activations stay float")
        if self.static and input_scale is None:
            raise ValueError(f"{self.name} quantizes activations with a calibrated scale, and this layer has none; "
                             f"calibrate it first (qk.calibrate) or use the dynamic recipe (static=False)")
        if not self.static and input_scale is not None:
            raise ValueError(f"input_scale given, but {self.name} quantizes activations per token on the fly; "
                             f"use {self.name}-static (static=True) to serve with calibrated scales")
        return self.lhs.quantize_activations(x, ops, scale=input_scale)

    def matmul(self, ops: ArrayOps, lhs: Any, rhs: QOperand, bias: Any = None, *, k: int, batched: bool,
               act_dtype: str, out_dtype: str) -> Any:
        """The canonical quantized matmul in `ops`' framework (see `Accumulation.matmul`)."""
        return self.accumulation.matmul(self, ops, lhs, rhs, bias, k=k, batched=batched, act_dtype=act_dtype,
                                        out_dtype=out_dtype)


def _rebuild_recipe(cls: type[Recipe], init: dict[str, Any]) -> Recipe:
    return cls(**init)


_INT8_ROW = OperandFormat(qtype=INT8, granularity=Granularity.ROW)
_INT8_STATIC = OperandFormat(qtype=INT8, granularity=Granularity.TENSOR, calibration=Calibration.STATIC)


def _int8_activations(static: bool) -> OperandFormat:
    _flag(static, "static")
    return _INT8_STATIC if static else _INT8_ROW


@dataclass(frozen=True, slots=True, repr=False)
class W8A8Recipe(Recipe):
    """int8 activations (per token, quantized on the fly) x int8 weights (per output channel).
    `qk.W8A8` is its value; `qk.W8A8(static=True)` ('w8a8-static') quantizes activations with one
    calibrated scale per layer instead (torchao's static int8, SmoothQuant's W8A8-O1)."""

    _: KW_ONLY
    static: bool = False
    tag: str = field(default="w8a8", init=False)
    lhs: OperandFormat | None = field(default=_INT8_ROW, init=False)
    rhs: OperandFormat = field(default=_INT8_ROW, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lhs", _int8_activations(self.static))
        Recipe.__post_init__(self)


@dataclass(frozen=True, slots=True, repr=False)
class W8A16Recipe(Recipe):
    """Float activations x int8 weights (per output channel): weight-only int8. `qk.W8A16` is its value."""

    tag: str = field(default="w8a16", init=False)
    lhs: OperandFormat | None = field(default=None, init=False)
    rhs: OperandFormat = field(default=_INT8_ROW, init=False)


@dataclass(frozen=True, slots=True, repr=False)
class W4A16(Recipe):
    """Float activations x int4 weights with one scale per `group_size` values along K.

    `group_size` may be given positionally (`W4A16(128)`), as users of GPTQ/AWQ-style APIs
    expect; this is the one departure from keyword-only dataclasses (STYLE.md 3).
    `zero_point=True` stores uint4 codes with a per-group zero point (asymmetric), else int4.
    """

    group_size: int = 128
    _: KW_ONLY
    zero_point: bool = False
    tag: str = field(default="w4a16", init=False)
    lhs: OperandFormat | None = field(default=None, init=False)
    rhs: OperandFormat = field(default=None, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_size", _integer(self.group_size, "group_size", "128"))
        _flag(self.zero_point, "zero_point")
        object.__setattr__(self, "rhs", OperandFormat(
            qtype=UINT4 if self.zero_point else INT4, granularity=Granularity.GROUP, group_size=self.group_size,
            zero_point=self.zero_point))
        Recipe.__post_init__(self)


@dataclass(frozen=True, slots=True, repr=False)
class W4A8(Recipe):
    """int8 activations (per token; `static=True`: one calibrated scale) x int4 weights (per group along
    K), int32 per group."""

    group_size: int = 128
    _: KW_ONLY
    static: bool = False
    tag: str = field(default="w4a8", init=False)
    lhs: OperandFormat | None = field(default=_INT8_ROW, init=False)
    rhs: OperandFormat = field(default=None, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_size", _integer(self.group_size, "group_size", "128"))
        object.__setattr__(self, "lhs", _int8_activations(self.static))
        object.__setattr__(self, "rhs", OperandFormat(qtype=INT4, granularity=Granularity.GROUP,
                                                      group_size=self.group_size))
        Recipe.__post_init__(self)


_FP8_ROW = OperandFormat(qtype=FP8_E4M3, granularity=Granularity.ROW)
_FP8_STATIC = OperandFormat(qtype=FP8_E4M3, granularity=Granularity.TENSOR, calibration=Calibration.STATIC)


@dataclass(frozen=True, slots=True, repr=False)
class FP8Recipe(Recipe):
    """float8_e4m3fn activations (per token, quantized on the fly) x float8_e4m3fn weights (per output
    channel), f32 accumulation (`Accumulation.FLOAT_CODES`): what torch `_scaled_mm` with row-wise scales,
    torchao float8 and vLLM's dynamic fp8 compute. Codes saturate at +-448. `qk.FP8` is its value;
    `qk.FP8(static=True)` ('fp8-static') quantizes activations with one calibrated scale per layer
    (vLLM's and torchao's static fp8; calibrate with `qkernels.calibration.static_scale(..., qtype=FP8_E4M3)`)."""

    _: KW_ONLY
    static: bool = False
    tag: str = field(default="fp8", init=False)
    lhs: OperandFormat | None = field(default=_FP8_ROW, init=False)
    rhs: OperandFormat = field(default=_FP8_ROW, init=False)

    def __post_init__(self) -> None:
        _flag(self.static, "static")
        object.__setattr__(self, "lhs", _FP8_STATIC if self.static else _FP8_ROW)
        Recipe.__post_init__(self)


@dataclass(frozen=True, slots=True, repr=False)
class FP8A16Recipe(Recipe):
    """Float activations x float8_e4m3fn weights (per output channel): weight-only fp8 (accumulation
    FLOAT: weights dequantized to the activation dtype). `qk.FP8A16` is its value."""

    tag: str = field(default="fp8a16", init=False)
    lhs: OperandFormat | None = field(default=None, init=False)
    rhs: OperandFormat = field(default=_FP8_ROW, init=False)


W8A8 = W8A8Recipe()
W8A16 = W8A16Recipe()
FP8 = FP8Recipe()
FP8A16 = FP8A16Recipe()

RECIPES: tuple[Recipe, ...] = (W8A8, W8A16, W4A16(), W4A8(), FP8, FP8A16)
"""One value of each shipped recipe family (W4A16 and W4A8 at their default group size 128)."""

_TYPES: dict[str, type[Recipe]] = {"w8a8": W8A8Recipe, "w8a16": W8A16Recipe, "w4a16": W4A16, "w4a8": W4A8,
                                   "fp8": FP8Recipe, "fp8a16": FP8A16Recipe}


def resolve_recipe(recipe: Recipe | type[Recipe] | str | None, default: Recipe = W8A8) -> Recipe:
    """Accept a recipe value (`qk.W8A8`, `qk.W4A16(128)`), a recipe class (`qk.W4A16`), a name or None."""
    if recipe is None:
        return default
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, type) and issubclass(recipe, Recipe) and recipe in _TYPES.values():
        return recipe()
    if isinstance(recipe, str):
        return recipe_named(recipe)
    raise TypeError(f"recipe={recipe!r} is not a recipe; pass one of qk.W8A8, qk.W8A16, qk.W4A16(group_size), "
                    f"qk.W4A8(group_size), qk.FP8, qk.FP8A16, another qkernels.Recipe, or a name like 'w4a16-g128'")


def recipe_named(name: str) -> Recipe:
    """The recipe whose `name` is `name`: every recipe value made in this process (user-defined ones
    too) is known by name, so this is a dictionary lookup; a shipped recipe not yet made is parsed."""
    recipe = _BY_NAME.get(name)
    return recipe if recipe is not None else parse_recipe(name)


_NAME = re.compile(r"^(?P<tag>[a-z0-9]+)(?:-g(?P<g>\d+))?(?P<zp>-zp)?(?P<st>-static)?(?P<qb>-qbwd)?$")


def parse_recipe(name: str) -> Recipe:
    """Inverse of `Recipe.name` for the shipped families: 'w8a8', 'w4a16-g64-zp', 'w4a8-g128', 'w8a8-qbwd',
    'w8a8-static'."""
    m = _NAME.match(name.strip().lower())
    if not m or m["tag"] not in _TYPES:
        raise ValueError(f"unknown recipe name {name!r}; expected one of {sorted(_TYPES)} "
                         f"optionally followed by -g<group size>, -zp, -static, -qbwd (e.g. 'w4a16-g128-zp')")
    cls = _TYPES[m["tag"]]
    kwargs: dict[str, Any] = {"quantized_backward": bool(m["qb"])}
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    if m["g"]:
        if "group_size" not in fields:
            raise ValueError(f"recipe {m['tag']} takes no group size (got {name!r})")
        kwargs["group_size"] = int(m["g"])
    if m["zp"]:
        if "zero_point" not in fields:
            raise ValueError(f"recipe {m['tag']} has no zero-point variant (got {name!r})")
        kwargs["zero_point"] = True
    if m["st"]:
        if "static" not in fields:
            raise ValueError(f"recipe {m['tag']} has no static-activation variant (got {name!r})")
        kwargs["static"] = True
    return cls(**kwargs)
