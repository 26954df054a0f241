"""Operand formats and recipes (W8A8, W8A16, W4A16, W4A8) as frozen dataclasses.

A recipe names how each side of a matmul is stored: activations (lhs) and weights (rhs), in the
canonical layout of DESIGN.md section 3 (lhs (B, M, K), rhs (B, N, K), K last). Everything a kernel
or the dispatcher needs to know about numerics is derived from the two `OperandFormat`s, so a new
format (fp8, say) needs a new `QType`/`OperandFormat` and kernels, never a change in dispatch.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, NamedTuple

from qkernels import numerics
from qkernels.numerics import GROUP_SIZES, INT4, INT8, UINT4, Granularity, QType

__all__ = [
    "OperandFormat", "Accumulation", "Recipe", "W8A8", "W8A16", "W4A16", "W4A8", "RECIPES",
    "QOperand", "resolve_recipe", "parse_recipe",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class OperandFormat:
    """How one quantized operand is stored: `x ≈ (qvalue - zero_point) * scale` per block.

    `qvalue` is int8 of shape (..., K_stored): K padded up to a multiple of `group_size` (grouped
    formats), then two codes per byte when `qtype.packed`. `scale` is f32 of shape `(...,)` per row,
    `(..., K_padded // group_size)` per group, `()` per tensor; `zero_point` (unsigned types only)
    is int8 of the scale's shape.
    """

    qtype: QType
    granularity: Granularity
    group_size: int | None = None
    zero_point: bool = False

    def __post_init__(self) -> None:
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
        if self.granularity is Granularity.TENSOR:
            return ()
        if self.granularity is Granularity.ROW:
            return tuple(shape[:-1])
        return (*shape[:-1], self.padded_k(shape[-1]) // self.group_size)

    def describe(self) -> str:
        parts = [self.qtype.name, self.granularity.value]
        if self.group_size:
            parts.append(f"g{self.group_size}")
        if self.zero_point:
            parts.append("zero-point")
        return " ".join(parts)


class Accumulation(enum.Enum):
    """How partial products are accumulated and rescaled (DESIGN.md section 4)."""

    INT32 = "int32"  # one integer dot, rescale by lhs then rhs scale, then bias
    INT32_PER_GROUP = "int32 per group, f32 across groups"
    FLOAT = "f32 (weights dequantized to the activation dtype)"


class QOperand(NamedTuple):
    """Framework-neutral quantized operand handed to implementations (torch or JAX arrays)."""

    qvalue: Any
    scale: Any
    zero_point: Any = None


@dataclass(frozen=True, slots=True)
class Recipe:
    """Base of all recipes: which formats the two sides of a matmul use.

    `quantized_backward`: the two matmuls of the backward pass are quantized too (int8 dynamic,
    per row, as AQT does) instead of running in float against the dequantized operands.
    Recipes are hashable and compare by value, so they can be static arguments under `jax.jit`.
    """

    _: KW_ONLY
    quantized_backward: bool = False

    tag: ClassVar[str] = ""

    @property
    def lhs(self) -> OperandFormat | None:
        """Activation format; None when activations stay in float (weight-only recipes)."""
        raise NotImplementedError

    @property
    def rhs(self) -> OperandFormat:
        """Weight format."""
        raise NotImplementedError

    @property
    def accumulation(self) -> Accumulation:
        if self.lhs is None:
            return Accumulation.FLOAT
        if self.rhs.granularity is Granularity.GROUP:
            return Accumulation.INT32_PER_GROUP
        return Accumulation.INT32

    @property
    def group_size(self) -> int | None:
        return self.rhs.group_size

    @property
    def max_k(self) -> int | None:
        """Largest contraction length served exactly (int32 accumulator bound), None if unbounded."""
        if self.accumulation is Accumulation.INT32:
            return numerics.max_exact_k(self.lhs.qtype, self.rhs.qtype)
        return None  # per-group int32 partials (group <= 256) and float accumulation cannot overflow

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
        """Short stable identifier, e.g. 'w8a8', 'w4a16-g128-zp' (parse_recipe reads it back)."""
        parts = [self.tag]
        if self.group_size:
            parts.append(f"g{self.group_size}")
        if self.rhs.zero_point:
            parts.append("zp")
        if self.quantized_backward:
            parts.append("qbwd")
        return "-".join(parts)

    def describe(self) -> str:
        lhs = self.lhs.describe() if self.lhs else "float"
        return f"{self.name}: lhs {lhs}, rhs {self.rhs.describe()}, accumulate {self.accumulation.value}"


@dataclass(frozen=True, slots=True)
class W8A8(Recipe):
    """int8 activations (per token, quantized on the fly) x int8 weights (per output channel)."""

    tag: ClassVar[str] = "w8a8"

    @property
    def lhs(self) -> OperandFormat:
        return OperandFormat(qtype=INT8, granularity=Granularity.ROW)

    @property
    def rhs(self) -> OperandFormat:
        return OperandFormat(qtype=INT8, granularity=Granularity.ROW)


@dataclass(frozen=True, slots=True)
class W8A16(Recipe):
    """Float activations x int8 weights (per output channel): weight-only int8."""

    tag: ClassVar[str] = "w8a16"

    @property
    def lhs(self) -> None:
        return None

    @property
    def rhs(self) -> OperandFormat:
        return OperandFormat(qtype=INT8, granularity=Granularity.ROW)


@dataclass(frozen=True, slots=True)
class W4A16(Recipe):
    """Float activations x int4 weights with one scale per `group_size` values along K.

    `group_size` may be given positionally (`W4A16(128)`), as users of GPTQ/AWQ-style APIs
    expect; this is the one departure from keyword-only dataclasses (STYLE.md 3).
    `zero_point=True` stores uint4 codes with a per-group zero point (asymmetric), else int4.
    """

    group_size: int = 128
    _: KW_ONLY
    zero_point: bool = False

    tag: ClassVar[str] = "w4a16"

    def __post_init__(self) -> None:
        self.rhs  # validates group_size

    @property
    def lhs(self) -> None:
        return None

    @property
    def rhs(self) -> OperandFormat:
        return OperandFormat(qtype=UINT4 if self.zero_point else INT4, granularity=Granularity.GROUP,
                             group_size=self.group_size, zero_point=self.zero_point)


@dataclass(frozen=True, slots=True)
class W4A8(Recipe):
    """int8 activations (per token) x int4 weights (per group along K), int32 per group."""

    group_size: int = 128

    tag: ClassVar[str] = "w4a8"

    def __post_init__(self) -> None:
        self.rhs  # validates group_size

    @property
    def lhs(self) -> OperandFormat:
        return OperandFormat(qtype=INT8, granularity=Granularity.ROW)

    @property
    def rhs(self) -> OperandFormat:
        return OperandFormat(qtype=INT4, granularity=Granularity.GROUP, group_size=self.group_size)


RECIPES: tuple[type[Recipe], ...] = (W8A8, W8A16, W4A16, W4A8)


def resolve_recipe(recipe: Recipe | type[Recipe] | str | None, default: type[Recipe] = W8A8) -> Recipe:
    """Accept a recipe instance, a recipe class (`qk.W8A8`), a name ('w4a16-g128') or None."""
    if recipe is None:
        return default()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, type) and issubclass(recipe, Recipe) and recipe is not Recipe:
        return recipe()
    if isinstance(recipe, str):
        return parse_recipe(recipe)
    raise TypeError(f"recipe={recipe!r} is not a recipe; pass one of "
                    f"{', '.join(r.__name__ for r in RECIPES)} (class or instance) or a name like 'w4a16-g128'")


_NAME = re.compile(r"^(?P<tag>[a-z0-9]+)(?:-g(?P<g>\d+))?(?P<zp>-zp)?(?P<qb>-qbwd)?$")


def parse_recipe(name: str) -> Recipe:
    """Inverse of `Recipe.name`: 'w8a8', 'w4a16-g64-zp', 'w4a8-g128', 'w8a8-qbwd'."""
    m = _NAME.match(name.strip().lower())
    by_tag = {r.tag: r for r in RECIPES}
    if not m or m["tag"] not in by_tag:
        raise ValueError(f"unknown recipe name {name!r}; expected one of {sorted(by_tag)} "
                         f"optionally followed by -g<group size>, -zp, -qbwd (e.g. 'w4a16-g128-zp')")
    cls = by_tag[m["tag"]]
    kwargs: dict[str, Any] = {"quantized_backward": bool(m["qb"])}
    fields = {f.name for f in dataclasses.fields(cls)}
    if m["g"]:
        if "group_size" not in fields:
            raise ValueError(f"recipe {m['tag']} takes no group size (got {name!r})")
        kwargs["group_size"] = int(m["g"])
    if m["zp"]:
        if "zero_point" not in fields:
            raise ValueError(f"recipe {m['tag']} has no zero-point variant (got {name!r})")
        kwargs["zero_point"] = True
    return cls(**kwargs)
