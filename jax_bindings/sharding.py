"""Running a selected implementation under `jit` where the operands may be sharded over a mesh.

`run_partitioned` splits the canonical problem `out (B?, M, N) = lhs (B?, M, K) . rhs (B?, N, K)`
into per-shard calls of the same implementation on local data:

- batch/M-sharded activations and N-sharded (column-parallel) weights: each shard runs the kernel
  on its own rows and columns; nothing is gathered, the weight never moves.
- K-sharded (row-parallel) weights and activations: each shard computes a partial result over its
  slice of K, then one all-reduce over the K axes. The sum happens where it is exact:
  W8A8 (int32 accumulation): the activations are quantized with their *global* per-row scale (the
  row absmax all-reduced over the K shards) before the per-shard calls, each shard returns its
  int32 accumulators (`Implementation.accumulate`), those are all-reduced in int32 and rescaled
  once in DESIGN.md order: bit-identical to the unsharded call. W4A8 (int32 per group): same global
  activation scale; each shard sums its groups in f32 in order (the kernel with a unit activation
  scale), the f32 partials are all-reduced, then multiplied by the activation scale: the group sum
  is reassociated across shards (within `qkernels.testing.tolerances`, not bit-identical).
  FP8 (f32 dot of the codes): the same global activation scale, so every shard multiplies the
  codes the unsharded call does; each shard returns its f32 accumulators (the kernel with unit
  scales on both sides: `(acc * 1) * 1` is exact), those are all-reduced and rescaled once in the
  order of the formats: equal to the unsharded call up to the order of the f32 sum.
  W4A16 / W8A16 / FP8A16 (f32 accumulation): f32 partials all-reduced before bias and output cast.
- anything else (a dimension not divisible by its mesh axes, a padded or group-straddling K, an
  axis claimed by two dimensions, an implementation that cannot produce the partials) is
  replicated: the partitioner gathers that dimension first. Correct, slower; the reasons are logged
  at debug level ('qkernels.sharding') and `choose_layout` returns them.
Conflicts are settled in the order batch, N, K, M: the weight's sharding wins over the
activations' (an activation gather is cheaper than a weight gather at inference).

Where the layout comes from depends on the mesh:
- a user's `shard_map` (every mesh axis manual) or one device: the operands are local already; the
  implementation runs as is. (The Pallas kernels annotate their outputs for `check_vma=True`; only
  `pallas.interpret` needs `check_vma=False` there: jax 0.10's HLO interpreter of Pallas kernels
  fails the varying-axes check on the kernel's own constants.)
- Explicit axes (`jax.sharding.AxisType.Explicit`): shardings are part of the operands' types, so
  the layout is chosen while tracing and the per-shard computation runs under `jax.shard_map` for
  every implementation, 'xla' included (under Explicit axes a contraction over a sharded K needs
  its output sharding spelled out; the shard_map is that).
- Auto axes (GSPMD/Shardy propagation): 'xla' is ordinary XLA ops and GSPMD partitions it (it
  all-reduces the activations' row absmax and the int32 partials itself). Opaque kernels (Pallas
  custom calls) go through `jax.experimental.custom_partitioning`, whose rule picks the layout from
  the shardings the propagation assigned (a Shardy sharding rule, and `infer_sharding_from_operands`
  for the GSPMD partitioner). Host-callback implementations ('reference.callback') cannot: jax
  drops the host callbacks of the per-shard computation custom_partitioning lowers (measured on jax
  0.10.2: the call crashes), so under Auto axes they run once on the full arrays (operands gathered,
  as `pure_callback` always does); use Explicit axes or `shard_map` to run them per shard.
Under `vmap` a shared weight stays partitioned (the mapped axis is folded into M); a per-example
weight runs the implementation's own batching rule, unpartitioned.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_bindings import implementations, quant
from jax_bindings.implementations import Execution
from qkernels import dispatch
from qkernels.formats import Accumulation, QOperand
from qkernels.numerics import Granularity

__all__ = ["Layout", "choose_layout", "run", "run_partitioned"]

log = logging.getLogger("qkernels.sharding")

Axes = tuple[str, ...]


def run(impl: dispatch.Implementation, problem: dispatch.Problem, lhs: Any, rhs: QOperand,
        bias: Any = None) -> jax.Array:
    """Call `impl` on JAX arrays, bound to `problem` (a shard's own problem gets its own config)."""
    return _run_bound(dispatch.Bound.of(problem, impl), lhs, rhs, bias)


def _run_bound(call: dispatch.Bound, lhs: Any, rhs: QOperand, bias: Any = None) -> jax.Array:
    """A bound call on JAX arrays; framework-neutral (NumPy) implementations go through a host callback."""
    if call.implementation.framework == dispatch.ANY_FRAMEWORK:
        return implementations.run_host(call, lhs, rhs, bias)
    return call.run(lhs, rhs, bias)


def _accumulate(impl: dispatch.Implementation, problem: dispatch.Problem, lhs: Any, rhs: QOperand) -> jax.Array:
    call = dispatch.Bound.of(problem, impl)  # a shard's own problem gets its own config
    if impl.framework == dispatch.ANY_FRAMEWORK:
        return implementations.accumulate_host(call, lhs, rhs)
    return call.accumulate(lhs, rhs)


@dataclass(frozen=True, slots=True)
class Layout:
    """Mesh axes each canonical dimension is split over; partial results are all-reduced over `k`.

    `axis_sizes` are the mesh's (name, size) pairs; `notes` say why a sharding was dropped.
    """

    batch: Axes = ()
    m: Axes = ()
    n: Axes = ()
    k: Axes = ()
    axis_sizes: tuple[tuple[str, int], ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)

    def count(self, axes: Axes) -> int:
        sizes = dict(self.axis_sizes)
        return math.prod(sizes[a] for a in axes)

    def local(self, problem: dispatch.Problem) -> dispatch.Problem:
        """The problem each shard solves."""
        batch = None if problem.batch is None else problem.batch // self.count(self.batch)
        return dataclasses.replace(problem, m=problem.m // self.count(self.m), n=problem.n // self.count(self.n),
                                   k=problem.k // self.count(self.k), batch=batch)


def _entry(axes: Axes) -> str | tuple[str, ...] | None:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _dims(spec: Any, ndim: int, allowed: frozenset[str]) -> tuple[Axes, ...]:
    """A PartitionSpec as one tuple of mesh axes per dimension (axes outside `allowed` dropped)."""
    out = []
    for d in range(ndim):
        entry = spec[d] if spec is not None and d < len(spec) else None
        axes = () if entry is None or entry is P.UNCONSTRAINED else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(tuple(a for a in axes if a in allowed))
    return tuple(out)


def _k_split_refusal(impl: dispatch.Implementation, problem: dispatch.Problem, shards: int) -> str | None:
    """None if K can be split into `shards` equal slices for `impl`, else why not."""
    recipe, k = problem.recipe, problem.k
    fmt = recipe.rhs
    if k % shards:
        return f"K={k} is not divisible by {shards} shards"
    k_local = k // shards
    if fmt.padded_k(k) != k or fmt.padded_k(k_local) != k_local or fmt.stored_k(k_local) * shards != fmt.stored_k(k):
        return (f"K={k} in {shards} shards of {k_local} straddles the weight's {fmt.describe()} storage "
                f"(padding, groups or packing)")
    local = dataclasses.replace(problem, k=k_local, out_dtype="float32")
    if _global_scale(recipe):
        local = dataclasses.replace(local, lhs_quantized=True, act_dtype="int8")
    if recipe.accumulation.integer and not recipe.accumulation.grouped and impl.accumulate is None:
        return f"{impl.name} exposes no int32 accumulators to sum over K shards"
    reason = impl.verdict(local)
    return None if reason is None else f"{impl.name} cannot run a K shard ({local.describe()}): {reason}"


def choose_layout(impl: dispatch.Implementation, problem: dispatch.Problem, lhs_dims: Sequence[Axes],
                  rhs_dims: Sequence[Axes], axis_sizes: dict[str, int]) -> Layout:
    """The per-shard layout for operands sharded as `lhs_dims` (B?, M, K) and `rhs_dims` (B?, N, K_stored).

    Each entry is the tuple of mesh axes that dimension is split over. Pure (no computation).
    """
    batched = problem.batch is not None
    lb, lm, lk = (tuple(lhs_dims) if batched else ((), *lhs_dims))
    wb, wn, wk = (tuple(rhs_dims) if batched else ((), *rhs_dims))
    notes: list[str] = []
    used: set[str] = set()
    sizes = {"batch": problem.batch or 1, "m": problem.m, "n": problem.n, "k": problem.k}
    wanted = {
        "batch": lb or wb,
        "n": wn,
        "k": lk if lk == wk or not wk else wk if not lk else (),
        "m": lm,
    }
    if lk and wk and lk != wk:
        notes.append(f"K is split over {lk} in the activations but {wk} in the weight: K replicated")
    chosen: dict[str, Axes] = {}
    for dim in ("batch", "n", "k", "m"):  # the order settles conflicts: the weight's axes before M
        axes = wanted[dim]
        if not axes:
            chosen[dim] = ()
            continue
        count = math.prod(axis_sizes[a] for a in axes)
        reason = None
        if used & set(axes):
            reason = f"mesh axes {sorted(used & set(axes))} already split another dimension"
        elif sizes[dim] % count:
            reason = f"{dim}={sizes[dim]} is not divisible by {count} shards"
        elif dim == "k":
            reason = _k_split_refusal(impl, problem, count)
        if reason is not None:
            notes.append(f"{dim} over {axes} replicated: {reason}")
            chosen[dim] = ()
            continue
        chosen[dim] = axes
        used |= set(axes)
    return Layout(batch=chosen["batch"], m=chosen["m"], n=chosen["n"], k=chosen["k"],
                  axis_sizes=tuple(axis_sizes.items()), notes=tuple(notes))


@dataclass(frozen=True, slots=True)
class _Call:
    """Static part of one partitioned call (hashable): what runs and how its operands are flattened."""

    impl: dispatch.Implementation
    problem: dispatch.Problem
    lhs_quantized: bool  # lhs comes as a QOperand: (codes, per-row scales)
    zero_point: bool
    bias: bool
    # the weight's prepacked forms (QOperand.packed): their treedef and leaf ranks. They travel as trailing
    # replicated operands; a shard whose local layout differs from theirs relays its own scales out
    packed: Any = None
    packed_ranks: tuple[int, ...] = ()

    @property
    def n_lhs(self) -> int:
        return 2 if self.lhs_quantized else 1


def _call_of(impl: dispatch.Implementation, problem: dispatch.Problem, lhs: Any, rhs: QOperand, bias: Any) -> _Call:
    leaves, tree = jax.tree_util.tree_flatten(rhs.packed)
    return _Call(impl, problem, isinstance(lhs, QOperand), rhs.zero_point is not None, bias is not None,
                 tree if leaves else None, tuple(x.ndim for x in leaves))


def _flatten(lhs: Any, rhs: QOperand, bias: Any) -> list[jax.Array]:
    args = [lhs.qvalue, lhs.scale] if isinstance(lhs, QOperand) else [lhs]
    args += [rhs.qvalue, rhs.scale]
    if rhs.zero_point is not None:
        args.append(rhs.zero_point)
    if bias is not None:
        args.append(bias)
    return args + jax.tree_util.tree_leaves(rhs.packed)


def _unflatten(call: _Call, args: Sequence[jax.Array]) -> tuple[Any, QOperand, Any]:
    args = list(args)
    lhs = QOperand(args.pop(0), args.pop(0)) if call.lhs_quantized else args.pop(0)
    q, s = args.pop(0), args.pop(0)
    zero = args.pop(0) if call.zero_point else None
    bias = args.pop(0) if call.bias else None
    packed = None if call.packed is None else jax.tree_util.tree_unflatten(call.packed, args)
    return lhs, QOperand(q, s, zero, packed), bias


def _specs(call: _Call, layout: Layout, scale_ndim: int) -> tuple[tuple[P, ...], P]:
    """PartitionSpecs of the flat operands and of the output under `layout`."""
    b = (_entry(layout.batch),) if call.problem.batch is not None else ()
    m, n, k = _entry(layout.m), _entry(layout.n), _entry(layout.k)
    specs = [P(*b, m, k)] + ([P(*b, m)] if call.lhs_quantized else [])
    rhs_scale = P(*(*b, n, k)[:scale_ndim])  # per channel (B?, N), per group (B?, N, G), per tensor ()
    specs += [P(*b, n, k), rhs_scale] + ([rhs_scale] if call.zero_point else []) + ([P(n)] if call.bias else [])
    return tuple(specs) + (P(),) * len(call.packed_ranks), P(*b, m, n)


def _global_scale(recipe: Any) -> bool:
    """Whether K shards quantize the activations with the whole row's scale (see the module docstring):
    the accumulations whose per-shard partials are sums of the codes' products."""
    return recipe.accumulation.integer or recipe.accumulation is Accumulation.FLOAT_CODES


def _quantize_global(x: jax.Array, call: _Call, axes: Axes) -> QOperand:
    """Per-row codes (int8, float8) of a K shard with the scale of the whole row (absmax all-reduced over `axes`)."""
    amax = lax.pmax(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1), axes)
    op = quant.quantize_operand(x, call.problem.recipe.lhs, amax=amax)
    return QOperand(op.qvalue, op.scale)


def _per_shard(call: _Call, layout: Layout, *args: jax.Array) -> jax.Array:
    """The computation of one shard, on local operands; collectives over `layout.k` only."""
    lhs, rhs, bias = _unflatten(call, args)
    impl, local = call.impl, layout.local(call.problem)
    if not layout.k:
        return run(impl, local, lhs, rhs, bias)
    f32 = jnp.float32
    recipe = local.recipe
    part = dataclasses.replace(local, out_dtype="float32", has_bias=False)  # a partial sum: f32, no bias
    if not _global_scale(recipe):
        y = lax.psum(run(impl, part, lhs, rhs).astype(f32), layout.k)
    else:
        lhs_op = lhs if isinstance(lhs, QOperand) else _quantize_global(lhs, call, layout.k)
        part = dataclasses.replace(part, lhs_quantized=True, act_dtype="int8")
        lhs_scale = lhs_op.scale.astype(f32)[..., :, None]
        if not recipe.accumulation.integer:  # FLOAT_CODES: the f32 accumulators, read through unit scales
            units = (QOperand(lhs_op.qvalue, jnp.ones_like(lhs_op.scale, f32)),
                     QOperand(rhs.qvalue, jnp.ones_like(rhs.scale, f32)))
            acc = lax.psum(run(impl, part, *units).astype(f32), layout.k)
            y = (acc * rhs.scale.astype(f32)[..., None, :]) * lhs_scale  # the formats' row-rescale order
        elif not recipe.accumulation.grouped:
            acc = lax.psum(_accumulate(impl, part, lhs_op, rhs), layout.k)  # exact: |sum| < 2**31 (check_k)
            y = (acc.astype(f32) * rhs.scale.astype(f32)[..., None, :]) * lhs_scale  # formats' INT32 order
        else:  # each shard's groups in order, unit activation scale; the activation scale once at the end
            ones = QOperand(lhs_op.qvalue, jnp.ones_like(lhs_op.scale))
            y = lax.psum(run(impl, part, ones, rhs).astype(f32), layout.k) * lhs_scale
    if bias is not None:
        y = y + bias.astype(f32)
    return y.astype(local.out_dtype)


def _whole(call: _Call, *args: jax.Array) -> jax.Array:
    """The unpartitioned call (one device, or every mesh axis manual)."""
    lhs, rhs, bias = _unflatten(call, args)
    return run(call.impl, call.problem, lhs, rhs, bias)


def _layout_of(call: _Call, lhs_spec: Any, rhs_spec: Any, axis_sizes: dict[str, int],
               allowed: frozenset[str]) -> Layout:
    ndim = 3 if call.problem.batch is not None else 2
    layout = choose_layout(call.impl, call.problem, _dims(lhs_spec, ndim, allowed), _dims(rhs_spec, ndim, allowed),
                           axis_sizes)
    for note in layout.notes:
        log.debug("qkernels: %s on %s: %s", call.problem.describe(), call.impl.name, note)
    return layout


# --- Auto axes: custom_partitioning ---------------------------------------------------------------

def _cp_layout(call: _Call, mesh: Any, arg_shapes: Sequence[Any]) -> Layout:
    lhs_sharding, rhs_sharding = arg_shapes[0].sharding, arg_shapes[call.n_lhs].sharding
    if mesh.empty or not isinstance(lhs_sharding, NamedSharding) or not isinstance(rhs_sharding, NamedSharding):
        return Layout(notes=("the operands' shardings name no mesh axes: replicated",))
    return _layout_of(call, lhs_sharding.spec, rhs_sharding.spec, dict(mesh.shape), frozenset(mesh.axis_names))


def _cp_partition(call: _Call, mesh: Any, arg_shapes: Sequence[Any], result_shape: Any):
    layout = _cp_layout(call, mesh, arg_shapes)
    specs, out_spec = _specs(call, layout, len(arg_shapes[call.n_lhs + 1].shape))
    lower = functools.partial(_per_shard, call, layout)
    return mesh, lower, NamedSharding(mesh, out_spec), tuple(NamedSharding(mesh, s) for s in specs)


def _cp_infer(call: _Call, mesh: Any, arg_shapes: Sequence[Any], result_shape: Any) -> NamedSharding:
    layout = _cp_layout(call, mesh, arg_shapes)
    return NamedSharding(mesh, _specs(call, layout, len(arg_shapes[call.n_lhs + 1].shape))[1])


def _sharding_rule(call: _Call) -> tuple[str, dict[str, Any]]:
    """Shardy's view of the op (einsum-like factors); the partition callback has the last word.

    K is one factor `k` shared by both operands when the weight stores it unpadded and unpacked
    per channel; per group it is `(g r)` in the activations, `(g s)` in the packed weight and `g`
    in the scales, so only whole groups are split. A padded K is not split at all.
    """
    problem, fmt = call.problem, call.problem.recipe.rhs
    b = "b " if problem.batch is not None else ""
    kwargs: dict[str, Any] = {}
    if fmt.granularity is Granularity.GROUP and fmt.padded_k(problem.k) == problem.k:
        r, s = fmt.group_size, fmt.stored_k(fmt.group_size)
        lk, wk, scale = "(g r)", "(g s)" if s != r else "(g r)", f"{b}n g"
        kwargs = dict(reduction_factors=("g",), need_replication_factors=("r", "s") if s != r else ("r",), r=r)
        if s != r:
            kwargs["s"] = s
    elif fmt.granularity is Granularity.ROW and fmt.stored_k(problem.k) == problem.k:
        lk, wk, scale = "k", "k", f"{b}n"
        kwargs = dict(reduction_factors=("k",))
    else:
        lk, wk = "k", "kw"
        scale = {Granularity.GROUP: f"{b}n g", Granularity.ROW: f"{b}n"}.get(fmt.granularity, "")
        kwargs = dict(need_replication_factors=("k", "kw", "g") if "g" in scale else ("k", "kw"))
    operands = [f"{b}m {lk}"] + ([f"{b}m"] if call.lhs_quantized else []) + [f"{b}n {wk}", scale]
    operands += ([scale] if call.zero_point else []) + (["n"] if call.bias else [])
    packed = [[f"p{i}_{d}" for d in range(rank)] for i, rank in enumerate(call.packed_ranks)]  # replicated
    operands += [" ".join(f) for f in packed]
    if packed:
        kwargs["need_replication_factors"] = (*kwargs.get("need_replication_factors", ()), *(x for f in packed for x in f))
    return f"{', '.join(operands)} -> {b}m n", kwargs


def _vmap_rule(call: _Call, axis_size: int, in_batched: Sequence[bool], *args: jax.Array):
    """Fold a mapped activation axis into M (the weight stays partitioned); else vmap the whole call."""
    if any(in_batched[call.n_lhs:]):  # per-example weights or bias: nothing shared to partition
        in_axes = [0 if b else None for b in in_batched]
        return jax.vmap(functools.partial(_whole, call), in_axes=in_axes)(*args), True
    lhs = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(args[:call.n_lhs], in_batched)]
    batched = call.problem.batch is not None
    m = call.problem.m

    def fold(a: jax.Array) -> jax.Array:  # (V, B?, M, ...) -> (B?, V*M, ...)
        a = jnp.moveaxis(a, 0, 1) if batched else a
        lead = a.shape[:1] if batched else ()
        return a.reshape(*lead, axis_size * m, *a.shape[len(lead) + 2:])

    folded = dataclasses.replace(call, problem=dataclasses.replace(call.problem, m=axis_size * m))
    out = _op(folded)(*map(fold, lhs), *args[call.n_lhs:])  # [B?, V*M, N]
    out = out.reshape(*out.shape[:-2], axis_size, m, out.shape[-1])
    return (jnp.moveaxis(out, 1, 0) if batched else out), True


@functools.lru_cache(maxsize=512)
def _op(call: _Call) -> Any:
    """The partitioned op of one call signature: custom_partitioning inside custom_vmap."""
    cp = custom_partitioning(functools.partial(_whole, call))
    rule, rule_kwargs = _sharding_rule(call)
    cp.def_partition(functools.partial(_cp_partition, call),
                     infer_sharding_from_operands=functools.partial(_cp_infer, call),
                     sharding_rule=rule, **rule_kwargs)
    op = jax.custom_batching.custom_vmap(lambda *args: cp(*args))
    op.def_vmap(functools.partial(_vmap_rule, call))
    return op


# --- Explicit axes: shard_map ---------------------------------------------------------------------

def _run_explicit(call: _Call, mesh: Any, args: Sequence[jax.Array]) -> jax.Array:
    explicit = frozenset(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)
    lhs_spec = jax.typeof(args[0]).sharding.spec
    rhs_spec = jax.typeof(args[call.n_lhs]).sharding.spec
    layout = _layout_of(call, lhs_spec, rhs_spec, {a: mesh.shape[a] for a in explicit}, explicit)
    specs, out_spec = _specs(call, layout, args[call.n_lhs + 1].ndim)
    args = [jax.sharding.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    per_shard = jax.shard_map(functools.partial(_per_shard, call, layout), mesh=mesh, in_specs=specs,
                              out_specs=out_spec, axis_names=explicit, check_vma=False)
    return per_shard(*args)


def _mesh_of(args: Sequence[jax.Array]) -> Any:
    """The mesh the operands' types name (Explicit or Manual axes), else the context mesh, else None."""
    for a in args:
        mesh = jax.typeof(a).sharding.mesh
        if not mesh.empty:
            return mesh
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def run_partitioned(bound: dispatch.Bound, lhs: Any, rhs: QOperand, bias: Any = None) -> jax.Array:
    """The bound call, split over the mesh the operands are sharded on (see the module docstring).

    Takes canonical operands: lhs (B?, M, K) float, or a QOperand of codes and per-row scales
    (its scales must be those of whole rows), rhs a QOperand (B?, N, K_stored), bias (N,) or None.
    """
    lhs_codes = lhs.qvalue if isinstance(lhs, QOperand) else lhs
    if lhs_codes.ndim != rhs.qvalue.ndim or lhs_codes.ndim not in (2, 3):
        raise TypeError(f"run_partitioned takes canonical operands, lhs (B?, M, K) and rhs (B?, N, K_stored) of "
                        f"equal rank 2 or 3; got lhs {lhs_codes.shape} and rhs {rhs.qvalue.shape}. Flatten the "
                        f"activations' leading axes into M (jax_bindings.dot_general does)")
    impl, problem = bound.implementation, bound.problem
    call = _call_of(impl, problem, lhs, rhs, bias)
    args = _flatten(lhs, rhs, bias)
    mesh = _mesh_of(args)
    local = (mesh is not None and all(t == AxisType.Manual for t in mesh.axis_types))  # inside a user's shard_map
    if mesh is not None and not local and AxisType.Explicit in mesh.axis_types:
        return _run_explicit(call, mesh, args)
    if local or implementations.execution_of(impl) is not Execution.KERNEL or jax.device_count() == 1:
        return _run_bound(bound, lhs, rhs, bias)  # XLA ops: GSPMD partitions them; host callbacks: see above
    return _op(call)(*args)
