"""`dot_general`: a quantized drop-in for `jax.lax.dot_general`, and `make_dot_general` for Flax.

Any dimension numbers are mapped onto the canonical problem of DESIGN.md section 3: each operand
is permuted to (batch, free, contracting) and flattened to lhs `(B?, M, K)` x rhs `(B?, N, K)`; the
kernel output `(B?, M, N)` is un-flattened to `lax.dot_general`'s `(batch..., lhs free...,
rhs free...)`. The quantized operand (the "weight") is the `QArray` side, or the rhs when both
are float (it is then quantized on the fly with the recipe's weight format, per call); the other
side is the activation (quantized per row on the fly for integer recipes). A `QArray` lhs is
handled by swapping the operands and transposing the result.

Differentiation (`jax.custom_vjp` on the canonical core): straight-through by default, i.e. the
float gradients of `lax.dot_general` evaluated against the dequantized operands; with
`recipe.quantized_backward` the two backward matmuls are themselves W8A8 quantized matmuls (both
operands int8 per row along their contraction, as AQT does). A `QArray` gets zero cotangents.

NaN/Inf: quantizing them gives garbage silently, and checking values needs a host sync. `quantize`
checks concrete weights eagerly. Inside `jit`, pass `check_finite=True` (or
`make_dot_general(..., check_finite=True)`) and wrap the computation in
`jax.experimental.checkify.checkify`; the returned error names the operand (a float weight whose scale
exceeds the integer recipes' rescale bound, `Recipe.check_weight_scale`, is reported the same way):

    err, y = checkify.checkify(jax.jit(f))(x)
    err.throw()   # ValueError-like JaxRuntimeError: "qkernels.dot_general: lhs contains NaN/Inf ..."

`precision` is accepted for compatibility and does not change numerics (integer dots are exact;
weight-only recipes accumulate in f32).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from jax_bindings import implementations, quant, sharding
from jax_bindings.arrays import JAX_OPS
from jax_bindings.qarray import QArray, normalize_axes
from qkernels import dispatch
from qkernels.formats import W8A8, QOperand, Recipe, resolve_recipe

__all__ = ["dot_general", "make_dot_general", "QDotGeneral", "explain", "plan"]


@dataclass(frozen=True, slots=True)
class _Core:
    """Static description of one canonical qmatmul (hashable: a `custom_vjp` non-diff argument)."""

    recipe: Recipe
    k: int
    out_dtype: Any
    backend: str | None
    platform: str
    device: str
    check_finite: bool


@dataclass(frozen=True, slots=True)
class Plan:
    """How a `dot_general` call maps onto the canonical problem, and the problem itself."""

    swap: bool  # the weight is the lhs of the call
    act_perm: tuple[int, ...]
    weight_perm: tuple[int, ...] | None  # None: the weight is a QArray, already canonical
    batch_shape: tuple[int, ...]
    act_free_shape: tuple[int, ...]
    weight_free_shape: tuple[int, ...]
    problem: dispatch.Problem


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def _is_float(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def plan(lhs: Any, rhs: Any, dimension_numbers: Any, preferred_element_type: Any = None, *,
         recipe: Any = None) -> Plan:
    """Validate a call and map it onto the canonical problem (no computation)."""
    (lc, rc), (lb, rb) = dimension_numbers
    if isinstance(lhs, QArray) and isinstance(rhs, QArray):
        raise TypeError("qkernels.dot_general got a QArray on both sides; quantize only the weight and "
                        "pass the activations as a float array (they are quantized on the fly)")
    swap = isinstance(lhs, QArray)
    act, weight = (rhs, lhs) if swap else (lhs, rhs)
    ac, wc, ab, wb = (rc, lc, rb, lb) if swap else (lc, rc, lb, rb)
    act_side, w_side = ("rhs", "lhs") if swap else ("lhs", "rhs")
    if not hasattr(act, "dtype") or not _is_float(act.dtype):
        raise TypeError(
            f"qkernels.dot_general: {act_side} has dtype {getattr(act, 'dtype', type(act).__name__)}; integer "
            f"operands must come as a QArray (qkernels.quantize(w, recipe, contracting_axes=...)) and "
            f"activations as a float array")
    if not isinstance(weight, QArray) and not _is_float(weight.dtype):
        raise TypeError(f"qkernels.dot_general: {w_side} has dtype {weight.dtype}; pass a float array or a "
                        f"QArray from qkernels.quantize")
    ac, ab = normalize_axes(ac, act.ndim, f"{act_side} contracting"), normalize_axes(ab, act.ndim, f"{act_side} batch")
    wc, wb = normalize_axes(wc, weight.ndim, f"{w_side} contracting"), normalize_axes(wb, weight.ndim, f"{w_side} batch")
    if len(ac) != len(wc) or len(ab) != len(wb):
        raise TypeError(f"dot_general requires equal numbers of contracting and of batch dimensions, got "
                        f"{dimension_numbers}")
    if set(ac) & set(ab) or set(wc) & set(wb):
        raise TypeError(f"dot_general dimension_numbers {dimension_numbers} use an axis as both contracting and batch")
    for what, a_axes, w_axes in (("contracting", ac, wc), ("batch", ab, wb)):
        a_sizes = tuple(act.shape[a] for a in a_axes)
        w_sizes = tuple(weight.shape[a] for a in w_axes)
        if a_sizes != w_sizes:
            lhs_s, rhs_s = (w_sizes, a_sizes) if swap else (a_sizes, w_sizes)
            raise TypeError(f"dot_general requires {what} dimensions to have the same shape, got lhs {lhs_s} and "
                            f"rhs {rhs_s} for dimension_numbers {dimension_numbers}")
    if isinstance(weight, QArray):
        if set(wc) != set(weight.contracting_axes) or set(wb) != set(weight.batch_axes):
            raise ValueError(
                f"the QArray {w_side} was quantized with contracting_axes={weight.contracting_axes}, "
                f"batch_axes={weight.batch_axes} but dimension_numbers {dimension_numbers} contract {w_side} axes "
                f"{wc} with batch {wb}; quantize it with contracting_axes={wc}, batch_axes={wb}")
        # Pair the activation's axes with the order the QArray flattened its own.
        ac = tuple(ac[wc.index(a)] for a in weight.contracting_axes)
        ab = tuple(ab[wb.index(a)] for a in weight.batch_axes)
        if recipe is not None and resolve_recipe(recipe) != weight.recipe:
            raise ValueError(f"the QArray was quantized for {weight.recipe.name} but the call asks for "
                             f"{resolve_recipe(recipe).name}; re-quantize the weight or drop the recipe")
        recipe, weight_perm, w_dtype = weight.recipe, None, weight.dtype
    else:
        recipe = resolve_recipe(recipe)
        w_free = tuple(a for a in range(weight.ndim) if a not in wc and a not in wb)
        weight_perm, w_dtype = (*wb, *w_free, *wc), weight.dtype
    a_free = tuple(a for a in range(act.ndim) if a not in ac and a not in ab)
    w_free_axes = weight.free_axes if isinstance(weight, QArray) else weight_perm[len(wb):len(weight_perm) - len(wc)]
    if preferred_element_type is not None:
        if not _is_float(preferred_element_type):
            raise TypeError(f"preferred_element_type={jnp.dtype(preferred_element_type)} is not a float type; "
                            f"quantized matmuls return float (use jnp.float32, bfloat16 or float16)")
        out_dtype = jnp.dtype(preferred_element_type)
    else:
        out_dtype = jnp.result_type(act.dtype, w_dtype)
    batch_shape = tuple(act.shape[a] for a in ab)
    problem = dispatch.Problem(
        recipe=recipe, m=math.prod(act.shape[a] for a in a_free), n=math.prod(weight.shape[a] for a in w_free_axes),
        k=math.prod(act.shape[a] for a in ac), batch=math.prod(batch_shape) if ab else None,
        act_dtype="int8" if recipe.static else _dtype_name(act.dtype), out_dtype=_dtype_name(out_dtype),
        lhs_quantized=recipe.static, framework="jax", platform=implementations.current_platform(),
        device=implementations.current_device())
    return Plan(swap=swap, act_perm=(*ab, *a_free, *ac), weight_perm=weight_perm, batch_shape=batch_shape,
                act_free_shape=tuple(act.shape[a] for a in a_free),
                weight_free_shape=tuple(weight.shape[a] for a in w_free_axes), problem=problem)


def _check_finite(x: jax.Array, what: str) -> None:
    checkify.check(jnp.all(jnp.isfinite(x)),
                   f"qkernels.dot_general: {what} contains NaN/Inf and cannot be quantized; clean it "
                   f"(e.g. jnp.nan_to_num) before the matmul")


def _problem(core: _Core, lhs: jax.Array, n: int, batched: bool, *, lhs_quantized: bool = False,
             recipe: Recipe | None = None) -> dispatch.Problem:
    shape = lhs.qvalue.shape if lhs_quantized else lhs.shape
    return dispatch.Problem(
        recipe=recipe or core.recipe, m=shape[-2], n=n, k=core.k, batch=shape[0] if batched else None,
        act_dtype="int8" if lhs_quantized else _dtype_name(lhs.dtype), out_dtype=_dtype_name(core.out_dtype),
        lhs_quantized=lhs_quantized, framework="jax", platform=core.platform, device=core.device)


def _weight_operand(core: _Core, rhs: Any) -> QOperand:
    if isinstance(rhs, QOperand):
        return rhs
    if core.check_finite:
        _check_finite(rhs, "the weight")
    op = quant.quantize_operand(rhs, core.recipe.rhs)
    bound = core.recipe.accumulation.rescale_bound(core.recipe, core.k)
    if core.check_finite and bound is not None:  # concrete weights: qk.quantize refuses (Recipe.check_weight_scale)
        checkify.check(jnp.max(op.scale, initial=0.0) <= bound,
                       f"qkernels.dot_general: the weight's largest scale {{s}} exceeds {bound:.4g}, the largest "
                       f"{core.recipe.name} rescales without overflowing f32 at K={core.k}; scale the weight down by "
                       f"a power of two (fold it into the output) or use a weight-only recipe",
                       s=jnp.max(op.scale, initial=0.0))
    return op


def _forward(core: _Core, lhs: jax.Array, rhs: Any) -> jax.Array:
    """Canonical qmatmul: lhs (B?, M, K) float x rhs (B?, N, K) float or QOperand -> (B?, M, N)."""
    if core.check_finite and core.recipe.lhs is not None:
        _check_finite(lhs, "lhs (activations)")
    w = _weight_operand(core, rhs)
    batched = w.qvalue.ndim == 3
    problem = _problem(core, lhs, w.qvalue.shape[-2], batched)
    return sharding.run_partitioned(dispatch.bind(problem, core.backend), lhs, w)


def _forward_static(core: _Core, lhs: jax.Array, rhs: Any, input_scale: Any) -> jax.Array:
    """Canonical qmatmul of a static-range recipe: the activations quantized with the calibrated
    per-tensor `input_scale` (`Recipe.quantize_lhs`), dispatched as pre-quantized codes."""
    if core.check_finite:
        _check_finite(lhs, "lhs (activations)")
    w = _weight_operand(core, rhs)
    x = core.recipe.quantize_lhs(JAX_OPS, lhs, jnp.asarray(input_scale, jnp.float32))
    problem = _problem(core, x, w.qvalue.shape[-2], w.qvalue.ndim == 3, lhs_quantized=True)
    return sharding.run_partitioned(dispatch.bind(problem, core.backend), x, w)


def _dequantized(core: _Core, lhs: jax.Array, rhs: Any) -> tuple[jax.Array, jax.Array]:
    """The operands as the forward pass saw them, in f32 (straight-through estimator)."""
    recipe = core.recipe
    a = lhs.astype(jnp.float32)
    if recipe.lhs is not None:
        a = quant.dequantize_operand(quant.quantize_operand(a, recipe.lhs), recipe.lhs, core.k)
    w = quant.dequantize_operand(_weight_operand(core, rhs), recipe.rhs, core.k)
    return a, w


def _qmatmul_w8a8(core: _Core, a: jax.Array, b: jax.Array) -> jax.Array:
    """Quantized backward matmul: a (B?, X, C) x b (B?, Y, C) -> (B?, X, Y) in f32, both int8 per row."""
    bwd = _Core(recipe=W8A8, k=a.shape[-1], out_dtype=jnp.dtype(jnp.float32), backend=core.backend,
                platform=core.platform, device=core.device, check_finite=False)
    return _forward(bwd, a, b)


def _core_fwd(core: _Core, lhs: jax.Array, rhs: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
    return _forward(core, lhs, rhs), (lhs, rhs)


def _core_bwd(core: _Core, res: tuple[jax.Array, Any], g: jax.Array) -> tuple[jax.Array, Any]:
    lhs, rhs = res
    a, w = _dequantized(core, lhs, rhs)
    g = g.astype(jnp.float32)
    mT = (lambda x: jnp.swapaxes(x, -1, -2))  # noqa: E731
    if core.recipe.quantized_backward:
        d_lhs = _qmatmul_w8a8(core, g, mT(w))   # [B?, M, K]: contracts N
        d_w = _qmatmul_w8a8(core, mT(g), mT(a))  # [B?, N, K]: contracts M
    else:
        d_lhs = jnp.einsum("...mn,...nk->...mk", g, w)
        d_w = jnp.einsum("...mn,...mk->...nk", g, a)
    d_lhs = d_lhs.astype(lhs.dtype)
    if isinstance(rhs, QOperand):  # a QArray is not trained: zero cotangents (float0 for integer leaves)
        d_rhs = jax.tree_util.tree_map(
            lambda x: jnp.zeros_like(x) if _is_float(x.dtype) else np.zeros(x.shape, jax.dtypes.float0), rhs)
    else:
        d_rhs = d_w.astype(rhs.dtype)
    return d_lhs, d_rhs


_core = jax.custom_vjp(_forward, nondiff_argnums=(0,))
_core.defvjp(_core_fwd, _core_bwd)


def dot_general(lhs: Any, rhs: Any, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None, *, recipe: Any = None, backend: str | None = None,
                check_finite: bool = False, out_sharding: Any = None, input_scale: Any = None) -> jax.Array:
    """Quantized `jax.lax.dot_general`: same signature, output shape and dtype rules.

    Float operands are quantized on the fly with `recipe` (default W8A8; the rhs is the weight);
    a `QArray` on either side is used as is (its own recipe). `backend` (or
    `qkernels.use_backend`) forces an implementation; `check_finite` adds checkify NaN/Inf checks.
    `input_scale`: a static-range recipe's calibrated per-tensor activation scale (f32 scalar,
    `qkernels.calibration.static_scale`); required by those recipes, refused by the others. The
    static path serves: it has no custom gradient (train with the dynamic recipe).

    Called eagerly (no operand is a tracer), the whole call runs as one cached `jax.jit` program
    keyed by its static arguments, as `lax.dot_general` itself does eagerly: op-by-op dispatch of
    the quantize, dot and rescale costs 0.5-130 ms per call at 64x64 on CPU (measured, jax 0.10.2;
    `python -m bench.jax_cases overhead`), the jit'ed program tens of us. `check_finite=True` stays
    op-by-op there, where `checkify.check` raises eagerly.
    """
    del precision  # integer dots are exact; weight-only recipes accumulate in f32 regardless
    backend = dispatch.requested_backend(backend)
    static = dict(dimension_numbers=_hashable(dimension_numbers), preferred_element_type=preferred_element_type,
                  recipe=recipe, backend=backend, out_sharding=out_sharding)
    if not check_finite and _concrete(lhs, rhs, input_scale) and _is_hashable(static):
        return _eager(lhs, rhs, input_scale, **static)
    return _dot_general(lhs, rhs, dimension_numbers, preferred_element_type, recipe=recipe, backend=backend,
                        check_finite=check_finite, out_sharding=out_sharding, input_scale=input_scale)


def _hashable(dims: Any) -> Any:
    """Dimension numbers as nested tuples (lists are accepted by lax and are not hashable)."""
    return tuple(tuple(tuple(side) if isinstance(side, (list, tuple)) else side for side in part)
                 for part in dims) if isinstance(dims, (list, tuple)) else dims


def _is_hashable(static: dict[str, Any]) -> bool:
    try:
        hash(tuple(static.values()))
    except TypeError:
        return False
    return True


def _concrete(*trees: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(trees))


@functools.partial(jax.jit, static_argnames=("dimension_numbers", "preferred_element_type", "recipe", "backend",
                                             "out_sharding"))
def _eager(lhs: Any, rhs: Any, input_scale: Any, *, dimension_numbers: Any, preferred_element_type: Any,
           recipe: Any, backend: str | None, out_sharding: Any) -> jax.Array:
    return _dot_general(lhs, rhs, dimension_numbers, preferred_element_type, recipe=recipe, backend=backend,
                        check_finite=False, out_sharding=out_sharding, input_scale=input_scale)


def _dot_general(lhs: Any, rhs: Any, dimension_numbers: Any, preferred_element_type: Any, *, recipe: Any,
                 backend: str | None, check_finite: bool, out_sharding: Any, input_scale: Any) -> jax.Array:
    p = plan(lhs, rhs, dimension_numbers, preferred_element_type, recipe=recipe)
    act, weight = (rhs, lhs) if p.swap else (lhs, rhs)
    prob = p.problem
    lead = (prob.batch,) if prob.batch is not None else ()
    a = jnp.transpose(act, p.act_perm).reshape(*lead, prob.m, prob.k)
    if isinstance(weight, QArray):
        w = weight.operand()
    else:
        w = jnp.transpose(weight, p.weight_perm).reshape(*lead, prob.n, prob.k)
    core = _Core(recipe=prob.recipe, k=prob.k, out_dtype=jnp.dtype(prob.out_dtype),
                 backend=backend, platform=prob.platform, device=prob.device, check_finite=check_finite)
    if prob.recipe.static or input_scale is not None:
        if not prob.recipe.static:
            prob.recipe.quantize_lhs(JAX_OPS, a, input_scale)  # raises: the recipe is dynamic
        out = _forward_static(core, a, w, input_scale)  # [B?, M, N]
    else:
        out = _core(core, a, w)  # [B?, M, N]
    out = out.reshape(*p.batch_shape, *p.act_free_shape, *p.weight_free_shape)
    if p.swap:  # lax order is (batch, lhs free, rhs free) = (batch, weight free, activation free)
        nb, na, nw = len(p.batch_shape), len(p.act_free_shape), len(p.weight_free_shape)
        out = jnp.transpose(out, (*range(nb), *range(nb + na, nb + na + nw), *range(nb, nb + na)))
    if out_sharding is not None:
        out = _constrain(out, out_sharding)
    return out


def _constrain(out: jax.Array, out_sharding: Any) -> jax.Array:
    """Give `out` the requested sharding: a reshard under Explicit mesh axes (where
    `with_sharding_constraint` only asserts), a constraint for GSPMD under Auto ones."""
    mesh = jax.typeof(out).sharding.mesh
    if not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types:
        return jax.sharding.reshard(out, out_sharding)
    return lax.with_sharding_constraint(out, out_sharding)


def _jnp_einsum_code() -> Any:
    """The code object of jax.numpy's two-operand contraction (`jax._src.numpy.einsum._einsum`), or None."""
    try:
        from jax._src.numpy import einsum as jnp_einsum
    except ImportError:
        return None
    return getattr(getattr(jnp_einsum, "_einsum", None), "__code__", None)


_JNP_EINSUM_CODE = _jnp_einsum_code()


def swapped_by_jnp_einsum(lhs: Any, rhs: Any, caller: Any) -> bool:
    """Whether `caller` (a frame) is `jnp.einsum` passing the einsum's second operand, the weight, first.

    `jnp.einsum(s, x, w, _dot_general=dg)` calls `dg` in whichever order needs no transpose of the
    result (jax 0.10: `_einsum` tries `(rhs, lhs)` first, and its `lhs` / `rhs` are the operands in
    the order of the contraction path, `operand_indices`), so the position of a float operand does not
    say which one is the weight. With one two-operand contraction, `operand_indices` maps them back
    to the einsum's own operands. Any other caller: False (the rhs is the weight, as for lax).
    Raises a TypeError where jnp.einsum's call cannot be mapped back (an einsum with single-operand
    steps, or a jax whose `_einsum` holds other names): use `make_einsum` there.
    """
    if _JNP_EINSUM_CODE is None or caller is None or caller.f_code is not _JNP_EINSUM_CODE:
        return False
    held = caller.f_locals
    contractions, indices = held.get("contractions"), tuple(held.get("operand_indices") or ())
    second = None
    if isinstance(contractions, (list, tuple)) and len(contractions) == 1 and sorted(indices) == [0, 1]:
        second = held.get("lhs") if indices[0] == 1 else held.get("rhs")
    if second is not None and lhs is second:
        return True
    if second is not None and rhs is second:
        return False
    raise TypeError("qkernels: jnp.einsum called a quantized dot_general in a way that does not tell which operand "
                    "is the weight (its second); use qkernels.make_einsum(recipe)(subscripts, x, w) instead of "
                    "jnp.einsum(..., _dot_general=...)")


def _lax_order(y: jax.Array, n_batch: int, n_first: int) -> jax.Array:
    """(batch, A free, B free) -> (batch, B free, A free), A having `n_first` free axes."""
    n = y.ndim
    return jnp.transpose(y, (*range(n_batch), *range(n_batch + n_first, n), *range(n_batch, n_batch + n_first)))


@dataclass(frozen=True)  # no slots: jax.jit(QDotGeneral(...)) needs a weak reference
class QDotGeneral:
    """A hashable drop-in for `lax.dot_general` bound to a recipe (what `make_dot_general` returns).

    Frozen and compared by value, so it can be a Flax module attribute or a static argument of
    `jax.jit`. The weight is the `QArray` operand, else the rhs, except under
    `jnp.einsum(s, x, w, _dot_general=...)`, which may call it as `(w, x)`: that call is recognized
    (`swapped_by_jnp_einsum`) and `w`, the einsum's second operand, is quantized as the weight.
    """

    recipe: Recipe
    backend: str | None = None
    check_finite: bool = False

    def __call__(self, lhs: Any, rhs: Any, dimension_numbers: Any, precision: Any = None,
                 preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
        call = functools.partial(dot_general, precision=precision, preferred_element_type=preferred_element_type,
                                 recipe=self.recipe, backend=self.backend, check_finite=self.check_finite)
        floats = not isinstance(lhs, QArray) and not isinstance(rhs, QArray)
        if floats and swapped_by_jnp_einsum(lhs, rhs, sys._getframe(1)):
            (lc, rc), (lb, rb) = dimension_numbers
            out_sharding = kwargs.pop("out_sharding", None)
            y = _lax_order(call(rhs, lhs, ((rc, lc), (rb, lb)), **kwargs), len(lb), rhs.ndim - len(rc) - len(rb))
            return y if out_sharding is None else _constrain(y, out_sharding)
        return call(lhs, rhs, dimension_numbers, **kwargs)


def make_dot_general(recipe: Any = None, *, backend: str | None = None, check_finite: bool = False) -> QDotGeneral:
    """A `lax.dot_general` replacement quantizing with `recipe` (default W8A8), e.g. for
    `flax.linen.Dense(features, dot_general=make_dot_general(qk.W4A16(128)))`."""
    return QDotGeneral(resolve_recipe(recipe), backend, check_finite)


def explain(lhs: Any, rhs: Any, dimension_numbers: Any, precision: Any = None, preferred_element_type: Any = None,
            *, recipe: Any = None, backend: str | None = None, verbose: bool = False) -> dispatch.Explanation:
    """`qkernels.dispatch.explain` for the problem this `dot_general` call would run (`verbose=True`:
    every registered JAX implementation, other recipes' too)."""
    p = plan(lhs, rhs, dimension_numbers, preferred_element_type, recipe=recipe)
    ex = dispatch.explain(p.problem, backend, verbose=verbose)
    weight = lhs if p.swap else rhs
    layout = _layout(ex, weight) if isinstance(weight, QArray) else None
    return ex if layout is None else dataclasses.replace(ex, layout=layout)


def _layout(ex: dispatch.Explanation, weight: QArray) -> str | None:
    """Which scale layout the chosen Pallas TPU (or interpreted) kernel reads: the prepacked one on
    `weight` (`prepack`), or a relayout per call; None for implementations that read canonical scales."""
    chosen = ex.chosen
    if chosen is None or not (chosen.name.startswith("pallas.tpu.") or chosen.name == "pallas.interpret"):
        return None
    from qkernels.kernels.pallas import layout as pallas_layout
    from qkernels.kernels.pallas import ops

    prob = ex.problem
    target = ops.Target.INTERPRET if chosen.name == "pallas.interpret" else ops.Target(prob.arch)
    config = ex.config.config if ex.config is not None else None
    layout = ops.scale_layout(prob.recipe, target, config, m=prob.m, n=prob.n, k=prob.k)
    if layout is None:
        return "scales canonical (the kernel reads them as stored)"
    if pallas_layout.Prepacked.find(weight.packed, layout) is not None:
        return f"scales prepacked {layout.name}"
    return (f"scales relaid out per call to {layout.name} (qk.prepack(params, 'pallas') makes it once: "
            f"{'no prepacked form' if not weight.packed else 'the prepacked forms are for other configs'})")
