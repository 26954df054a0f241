"""`ragged_dot`: a quantized drop-in for `jax.lax.ragged_dot` (mixture-of-experts layers).

`ragged_dot(lhs (M, K), rhs (E, K, N), group_sizes (E,))`: rows `[start_e, start_e + group_sizes[e])`
of lhs multiply expert e's weight `rhs[e]`; rows past `sum(group_sizes)` are zero (`qkernels.grouped`
has the definition). `rhs` is a float array, quantized per expert on the fly with `recipe`, or a
`QArray` quantized once per expert with `quantize_experts` (batch axis 0, contracting axis 1: codes
(E, N, K_stored), the canonical layout of every expert). The activations are quantized per token for
integer recipes, once for every expert.

Differentiation (`jax.custom_vjp`): straight-through, i.e. `lax.ragged_dot`'s float gradients
evaluated against the dequantized operands; a `QArray` gets zero cotangents, `group_sizes` none.
`recipe.quantized_backward` is refused: the weight gradient contracts the ragged M axis, for which no
quantized kernel exists here.

Under `jit`, on the 'xla' implementation, the call is ordinary XLA ops, so GSPMD partitions it like
`lax.ragged_dot`: expert-sharded weights (E over a mesh axis) and token-sharded activations work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jax_bindings import implementations, quant
from jax_bindings.arrays import JAX_OPS
from jax_bindings.qarray import QArray, quantize
from qkernels import dispatch, grouped, reference
from qkernels.formats import QOperand, Recipe, resolve_recipe

__all__ = ["ragged_dot", "quantize_experts", "explain", "register"]


@dataclass(frozen=True, slots=True)
class _Core:
    """Static description of one ragged qmatmul (hashable: a `custom_vjp` non-diff argument)."""

    recipe: Recipe
    k: int
    out_dtype: Any
    backend: str | None
    platform: str
    device: str


def quantize_experts(w: Any, recipe: Any = None, *, name: str = "experts") -> QArray:
    """Quantize an (E, K, N) stack of expert weights (`lax.ragged_dot`'s rhs) for `recipe`, each expert
    with its own scales: a `QArray` with batch axis 0 and contracting axis 1 (codes (E, N, K_stored))."""
    w = jnp.asarray(w)
    if w.ndim != 3:
        raise ValueError(f"{name} has shape {tuple(w.shape)}; expert weights are (E, K, N), as lax.ragged_dot's rhs")
    return quantize(w, recipe, contracting_axes=(1,), batch_axes=(0,), name=name)


def _problem(recipe: Recipe, m: int, n: int, k: int, groups: int, act_dtype: Any, out_dtype: Any) -> dispatch.Problem:
    return dispatch.Problem(
        op=dispatch.Op.RAGGED_QMATMUL, recipe=recipe, m=m, n=n, k=k, groups=groups,
        act_dtype=jnp.dtype(act_dtype).name, out_dtype=jnp.dtype(out_dtype).name, framework="jax",
        platform=implementations.current_platform(), device=implementations.current_device())


def _plan(lhs: Any, rhs: Any, group_sizes: Any, preferred_element_type: Any, recipe: Any) -> dispatch.Problem:
    """Validate a call (no computation) and return its problem."""
    if not hasattr(lhs, "dtype") or not jnp.issubdtype(lhs.dtype, jnp.floating) or lhs.ndim != 2:
        raise TypeError(f"qkernels.ragged_dot: lhs must be a float (M, K) array, got "
                        f"{getattr(lhs, 'shape', '')} {getattr(lhs, 'dtype', type(lhs).__name__)}")
    if isinstance(rhs, QArray):
        if rhs.ndim != 3 or rhs.batch_axes != (0,) or rhs.contracting_axes != (1,):
            raise ValueError(f"the QArray rhs has shape {rhs.shape}, batch_axes={rhs.batch_axes}, contracting_axes="
                             f"{rhs.contracting_axes}; ragged_dot takes (E, K, N) experts quantized with "
                             f"qk.quantize_experts(w) (batch axis 0, contracting axis 1)")
        if recipe is not None and resolve_recipe(recipe) != rhs.recipe:
            raise ValueError(f"the QArray was quantized for {rhs.recipe.name} but the call asks for "
                             f"{resolve_recipe(recipe).name}; re-quantize the experts or drop the recipe")
        recipe, w_dtype = rhs.recipe, rhs.dtype
    else:
        if not hasattr(rhs, "dtype") or not jnp.issubdtype(rhs.dtype, jnp.floating) or rhs.ndim != 3:
            raise TypeError(f"qkernels.ragged_dot: rhs must be a float (E, K, N) array or a QArray from "
                            f"qk.quantize_experts, got {getattr(rhs, 'shape', '')} "
                            f"{getattr(rhs, 'dtype', type(rhs).__name__)}")
        recipe, w_dtype = resolve_recipe(recipe), rhs.dtype
    groups, k, n = rhs.shape
    if lhs.shape[1] != k:
        raise TypeError(f"ragged_dot: lhs contracts K={lhs.shape[1]} but rhs (E, K, N) is {tuple(rhs.shape)}")
    gs = getattr(group_sizes, "shape", None)
    if gs != (groups,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(f"ragged_dot: group_sizes must be an integer ({groups},) array (one size per expert), got "
                        f"{gs} {getattr(group_sizes, 'dtype', type(group_sizes).__name__)}")
    if preferred_element_type is not None:
        if not jnp.issubdtype(preferred_element_type, jnp.floating):
            raise TypeError(f"preferred_element_type={jnp.dtype(preferred_element_type)} is not a float type; "
                            f"quantized matmuls return float (use jnp.float32, bfloat16 or float16)")
        out_dtype = preferred_element_type
    else:
        out_dtype = jnp.result_type(lhs.dtype, w_dtype)
    return _problem(recipe, lhs.shape[0], n, k, groups, lhs.dtype, out_dtype)


def _weight_operand(core: _Core, rhs: Any) -> QOperand:
    """The experts in canonical (E, N, K_stored) storage: a QArray's operand, or float (E, K, N) quantized."""
    if isinstance(rhs, QOperand):
        return rhs
    return quant.quantize_operand(jnp.swapaxes(rhs, 1, 2), core.recipe.rhs)


def _forward(core: _Core, lhs: jax.Array, rhs: Any, group_sizes: jax.Array) -> jax.Array:
    w = _weight_operand(core, rhs)
    problem = _problem(core.recipe, lhs.shape[0], w.qvalue.shape[1], core.k, w.qvalue.shape[0], lhs.dtype,
                       core.out_dtype)
    call = dispatch.bind(problem, core.backend)
    if call.implementation.framework == dispatch.ANY_FRAMEWORK:
        return _run_host(call, lhs, w, group_sizes)
    run = lambda lhs, w, gs: call.run(lhs, w, gs.astype(jnp.int32))  # noqa: E731
    mesh = _explicit_mesh(lhs, w, group_sizes)
    if mesh is not None:  # GSPMD partitions the call as under Auto axes; the output keeps lhs's row sharding
        rows = jax.typeof(lhs).sharding.spec[0] if jax.typeof(lhs).sharding.spec else None
        run = jax.sharding.auto_axes(run, out_sharding=jax.sharding.NamedSharding(mesh, P(rows, None)))
    return run(lhs, w, group_sizes)


def _explicit_mesh(*trees: Any) -> Any:
    """The mesh of the operands when it has Explicit axes (sharding in types), else None.

    Selecting an expert (`rhs[e]`) of an Explicit expert-sharded array is refused by JAX's sharding
    rules (jax 0.10: 'slicing on sharded dims ... is not implemented'), so the call runs under
    `auto_axes`, where GSPMD partitions it as it does under Auto axes."""
    for leaf in jax.tree_util.tree_leaves(trees):
        mesh = getattr(jax.typeof(leaf).sharding, "mesh", None)
        if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
            return mesh
    return None


def _fwd(core: _Core, lhs: jax.Array, rhs: Any, group_sizes: jax.Array) -> tuple[jax.Array, tuple[Any, ...]]:
    return _forward(core, lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _bwd(core: _Core, res: tuple[Any, ...], g: jax.Array) -> tuple[Any, ...]:
    lhs, rhs, group_sizes = res
    recipe = core.recipe
    a = lhs.astype(jnp.float32)
    if recipe.lhs is not None:
        a = quant.dequantize_operand(quant.quantize_operand(a, recipe.lhs), recipe.lhs, core.k)
    w = quant.dequantize_operand(_weight_operand(core, rhs), recipe.rhs, core.k)  # [E, N, K] f32
    g = g.astype(jnp.float32)
    d_lhs = lax.ragged_dot(g, w, group_sizes).astype(lhs.dtype)  # [M, K]: each row against its expert's w
    if isinstance(rhs, QOperand):  # a QArray is not trained: zero cotangents (float0 for integer leaves)
        d_rhs = jax.tree_util.tree_map(
            lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating)
            else np.zeros(x.shape, jax.dtypes.float0), rhs)
    else:
        ends = jnp.cumsum(group_sizes)
        row = jnp.arange(lhs.shape[0])
        owner = ((row[None, :] >= (ends - group_sizes)[:, None]) & (row[None, :] < ends[:, None]))  # [E, M]
        d_rhs = jnp.einsum("em,mk,mn->ekn", owner.astype(jnp.float32), a, g).astype(rhs.dtype)  # [E, K, N]
    return d_lhs, d_rhs, np.zeros(group_sizes.shape, jax.dtypes.float0)


_core = jax.custom_vjp(_forward, nondiff_argnums=(0,))
_core.defvjp(_fwd, _bwd)


def ragged_dot(lhs: Any, rhs: Any, group_sizes: Any, precision: Any = None, preferred_element_type: Any = None,
               group_offset: Any = None, *, recipe: Any = None, backend: str | None = None,
               out_sharding: Any = None) -> jax.Array:
    """Quantized `jax.lax.ragged_dot`: same signature, output shape (M, N) and dtype rules.

    A float rhs (E, K, N) is quantized per expert on the fly with `recipe` (default W8A8); a `QArray`
    from `quantize_experts` is used as is (its own recipe). `backend` (or `qkernels.use_backend`)
    forces an implementation. `precision` does not change numerics (integer dots are exact;
    weight-only recipes accumulate in f32).
    """
    del precision
    if group_offset is not None:
        raise NotImplementedError("ragged_dot: group_offset (a shard's first expert) is not supported; shard the "
                                  "experts over a mesh axis and let GSPMD partition the call instead")
    problem = _plan(lhs, rhs, group_sizes, preferred_element_type, recipe)
    if problem.recipe.quantized_backward:
        raise ValueError(f"{problem.recipe.name}: ragged_dot has no quantized backward pass (the weight gradient "
                         f"contracts the ragged rows); use {problem.recipe.name.removesuffix('-qbwd')}")
    core = _Core(recipe=problem.recipe, k=problem.k, out_dtype=jnp.dtype(problem.out_dtype),
                 backend=dispatch.requested_backend(backend), platform=problem.platform, device=problem.device)
    w = rhs.operand() if isinstance(rhs, QArray) else rhs
    out = _core(core, lhs, w, group_sizes)
    if out_sharding is not None:
        out = lax.with_sharding_constraint(out, out_sharding)
    return out


def explain(lhs: Any, rhs: Any, group_sizes: Any, precision: Any = None, preferred_element_type: Any = None, *,
            recipe: Any = None, backend: str | None = None, verbose: bool = False) -> dispatch.Explanation:
    """`qkernels.dispatch.explain` for the problem this `ragged_dot` call would run."""
    return dispatch.explain(_plan(lhs, rhs, group_sizes, preferred_element_type, recipe), backend, verbose=verbose)


# --- implementations (registered by `jax_bindings.implementations.register`) --------------------------------


def _run_xla(call: dispatch.Bound, lhs: Any, rhs: QOperand, group_sizes: Any) -> jax.Array:
    p = call.problem
    act = "float32" if p.lhs_quantized else p.act_dtype
    return grouped.ragged_matmul(p.recipe, JAX_OPS, lhs, rhs, group_sizes, k=p.k, act_dtype=act, out_dtype=p.out_dtype)


def _accumulate_xla(call: dispatch.Bound, lhs: Any, rhs: QOperand, group_sizes: Any) -> jax.Array:
    return grouped.ragged_accumulators(call.problem.recipe, JAX_OPS, lhs, rhs, group_sizes, k=call.problem.k)


def _run_host(call: dispatch.Bound, lhs: Any, rhs: QOperand, group_sizes: Any) -> jax.Array:
    """A framework-neutral (NumPy) implementation's bound call through `jax.pure_callback`."""
    p = call.problem
    out_shape = jax.ShapeDtypeStruct((p.m, p.n), jnp.dtype(reference.np_dtype(p.out_dtype)))

    def host(lhs: Any, rhs: QOperand, group_sizes: Any) -> np.ndarray:
        to_np = lambda t: jax.tree_util.tree_map(np.asarray, t)  # noqa: E731
        return np.asarray(call.run(to_np(lhs), QOperand(*to_np(tuple(rhs))), np.asarray(group_sizes)),
                          out_shape.dtype)

    return jax.pure_callback(host, out_shape, lhs, rhs, group_sizes, vmap_method="sequential")


def _run_reference(call: dispatch.Bound, lhs: Any, rhs: QOperand, group_sizes: Any) -> jax.Array:
    ref = next(i for i in dispatch.registered(dispatch.ANY_FRAMEWORK, dispatch.Op.RAGGED_QMATMUL)
               if i.name == "reference")
    return _run_host(dispatch.Bound(call.problem, ref), lhs, rhs, group_sizes)


def register(supports_xla: Any, serves: dispatch.Serves) -> None:
    """Register 'xla' and 'reference.callback' for `Op.RAGGED_QMATMUL` (the dense op's platform rules)."""
    dispatch.register(dispatch.Implementation(
        name="xla", framework="jax", op=dispatch.Op.RAGGED_QMATMUL, priority=50, supports=supports_xla,
        run=_run_xla, accumulate=_accumulate_xla, serves=serves,
        description="XLA ops executing the grouped definition (every expert's dense recipe matmul, rows selected)"))
    dispatch.register(dispatch.Implementation(
        name="reference.callback", framework="jax", op=dispatch.Op.RAGGED_QMATMUL, priority=1,
        supports=lambda problem: None, run=_run_reference, serves=dispatch.Serves.everything(),
        description="NumPy reference of the grouped matmul through jax.pure_callback (exact, slow)"))

