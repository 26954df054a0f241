"""`QArray`: a quantized JAX weight in canonical packed layout, and `quantize()` that makes one.

A weight `w` of any rank is stored for `dot_general` as the canonical rhs of DESIGN.md section 3:
its batch axes, then its free (kept) axes, then its contracting axes, flattened to
`(B?, N, K)` and quantized along K. `qvalue` is int8 `(B?, N, K_stored)` (K padded to the group
size, two int4 per byte when packed), `scale` f32 `(B?, N)` per channel or `(B?, N, G)` per group,
`zero_point` int8 like `scale` (uint4 formats) or None. The static part (recipe, logical shape,
dtype, which axes contract and which are batch) maps it back to the original axes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_bindings import quant
from jax_bindings.arrays import JAX_OPS
from qkernels import numerics, quality
from qkernels.formats import QOperand, Recipe, resolve_recipe

__all__ = ["QArray", "quantize", "normalize_axes", "prepack", "PREPACK_BACKENDS"]


def normalize_axes(axes: Sequence[int] | int, ndim: int, what: str) -> tuple[int, ...]:
    """Axes as non-negative ints, checked against `ndim` and for duplicates."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    out = []
    for a in axes:
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"{what} axis {a} is out of range for an array of rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{what} axes {axes} repeat an axis")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class QArray:
    """A quantized weight: `w ≈ dequantize()`, with `(codes - zero_point) * scale` per block along K.

    Invariant (canonical layout): `qvalue` is `(B?, N, K_stored)` int8, where B is the product of the
    `batch_axes` sizes, N of the free axes (in increasing axis order), K of the `contracting_axes`
    (in the order given) of the logical `shape`; the padding codes beyond K are zero.
    A registered pytree: `qvalue`, `scale`, `zero_point` and `packed` are its leaves, the rest is static.
    `packed`: backend layouts of the same values made once by `prepack` (e.g. the Pallas TPU kernels'
    scale layouts, `qkernels.kernels.pallas.layout.Prepacked`), () when none; the canonical leaves stay
    what is serialized (a restored array has `packed=()`: prepack after loading).
    """

    qvalue: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    recipe: Recipe
    shape: tuple[int, ...]
    dtype: Any
    contracting_axes: tuple[int, ...]
    batch_axes: tuple[int, ...] = ()
    packed: tuple[Any, ...] = ()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def free_axes(self) -> tuple[int, ...]:
        skip = set(self.contracting_axes) | set(self.batch_axes)
        return tuple(a for a in range(self.ndim) if a not in skip)

    @property
    def k(self) -> int:
        """Logical contraction length (product of the contracting axes)."""
        return math.prod(self.shape[a] for a in self.contracting_axes)

    @property
    def n(self) -> int:
        return math.prod(self.shape[a] for a in self.free_axes)

    @property
    def batch(self) -> int | None:
        return math.prod(self.shape[a] for a in self.batch_axes) if self.batch_axes else None

    def operand(self) -> QOperand:
        return QOperand(self.qvalue, self.scale, self.zero_point, self.packed or None)

    def __getitem__(self, key: Any) -> QArray:
        """`q[...]` is `q` (how `flax.nnx` reads a variable's value); any other index is refused."""
        if key is Ellipsis:
            return self
        raise TypeError(f"a QArray cannot be indexed with {key!r} (its storage is packed); index "
                        f"q.dequantize() instead, or quantize the slice you need")

    def storage_specs(self, spec: Any) -> QArray:
        """This array with `PartitionSpec` leaves: where each storage leaf goes when the float weight
        was sharded as `spec` (a PartitionSpec or tuple over the logical axes; None: replicated).

        Column-parallel (free axes sharded): the rows of `qvalue`, `scale` and `zero_point` follow.
        Row-parallel (contracting axes sharded): `qvalue`'s packed K axis follows, and a grouped
        `scale`'s group axis; a per-channel scale is replicated. A flattened N or K axis keeps the
        mesh axes of its parts in order when that is the row-major split (no unsharded part of size
        > 1 before a sharded one); otherwise it is replicated (the partitioner gathers it).
        """
        from jax.sharding import PartitionSpec as P

        spec = tuple(spec or ()) + (None,) * (self.ndim - len(tuple(spec or ())))

        def merged(axes: tuple[int, ...]) -> Any:
            names: list[str] = []
            for a in axes:
                entry = spec[a]
                if entry is None:
                    if names or self.shape[a] == 1:
                        continue
                    if any(spec[b] is not None for b in axes[axes.index(a) + 1:]):
                        return None  # a sharded part after an unsharded one: not a row-major split
                    continue
                names.extend(entry if isinstance(entry, tuple) else (entry,))
            return None if not names else names[0] if len(names) == 1 else tuple(names)

        lead = (merged(self.batch_axes),) if self.batch_axes else ()
        n, k = merged(self.free_axes), merged(self.contracting_axes)
        per_group = self.scale.ndim == self.qvalue.ndim
        scale = P(*lead, n, k) if per_group else P(*lead, n)
        return dataclasses.replace(self, qvalue=P(*lead, n, k), scale=scale,
                                   zero_point=None if self.zero_point is None else scale,
                                   packed=jax.tree_util.tree_map(lambda _: P(), self.packed))  # replicated

    def canonical_permutation(self) -> tuple[int, ...]:
        """Axes order (batch, free, contracting) that maps the logical array onto the storage."""
        return (*self.batch_axes, *self.free_axes, *self.contracting_axes)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """Float array of the logical `shape` (original axis order), in `dtype` (default: `self.dtype`)."""
        w = quant.dequantize_operand(self.operand(), self.recipe.rhs, self.k, jnp.float32)
        perm = self.canonical_permutation()
        w = w.reshape(tuple(self.shape[a] for a in perm))
        return jnp.transpose(w, np.argsort(perm)).astype(dtype or self.dtype)


jax.tree_util.register_dataclass(
    QArray, data_fields=["qvalue", "scale", "zero_point", "packed"],
    meta_fields=["recipe", "shape", "dtype", "contracting_axes", "batch_axes"])


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def quantize(w: Any, recipe: Any = None, *, contracting_axes: Sequence[int] | int = (0,),
             batch_axes: Sequence[int] | int = (), name: str = "weight", method: str = "rtn",
             solver: Any = None) -> QArray:
    """Quantize a float weight for `recipe` (default W8A8) into a canonical packed `QArray`.

    `contracting_axes`: the axes the weight is contracted over in the `dot_general` it feeds, e.g.
    `(0,)` for a Flax `Dense` kernel `(in, out)`, `(1,)` for a PyTorch-style `(out, in)` weight.
    `batch_axes`: its batch axes (default none). With a concrete (non-traced) `w`, NaN/Inf raise a
    ValueError naming `name`; under a trace use `dot_general(..., check_finite=True)` and checkify.
    `method`: "rtn" (round to nearest) or "mse" (per-block clip search, `qkernels.quality`): a concrete
    weight is searched in NumPy, as the torch binding does, so both give the same codes; a traced one in
    jnp (the same definition). `solver`: instead of `method`, a function of the concrete canonical weight
    (N, K) f32 NumPy (K in `contracting_axes`' order) returning its codes as a `QOperand`: the data-aware
    methods (GPTQ, AWQ), which `qk.quantize_params` runs from calibration statistics.
    """
    recipe = resolve_recipe(recipe)
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{name} has dtype {w.dtype}; quantize takes a float array")
    contracting = normalize_axes(contracting_axes, w.ndim, "contracting")
    batch = normalize_axes(batch_axes, w.ndim, "batch")
    if set(contracting) & set(batch):
        raise ValueError(f"axes {sorted(set(contracting) & set(batch))} are both contracting and batch axes")
    if _is_concrete(w):
        numerics.check_finite(np.asarray(w.astype(jnp.float32)), name)
    skeleton = QArray(None, None, None, recipe, tuple(w.shape), jnp.dtype(w.dtype), contracting, batch)
    perm = skeleton.canonical_permutation()
    lead = (skeleton.batch,) if batch else ()
    canon = jnp.transpose(w, perm).reshape(*lead, skeleton.n, skeleton.k)
    recipe.check_k(skeleton.k)
    if solver is not None:
        if batch or not _is_concrete(w):
            raise ValueError(f"{name}: a data-aware method quantizes one concrete matrix, not a traced weight or one "
                             f"with batch axes")
        op = QOperand(*(None if a is None else jnp.asarray(a) for a in solver(np.asarray(canon.astype(jnp.float32)))))
    elif method == "rtn":
        op = quant.quantize_operand(canon, recipe.rhs)
    elif _is_concrete(w):
        op = QOperand(*(None if a is None else jnp.asarray(a) for a in quality.quantize_weight(
            np.asarray(canon.astype(jnp.float32)), recipe.rhs, method=method)))
    else:
        op = quality.quantize_weight(canon, recipe.rhs, JAX_OPS, method=method)
    if _is_concrete(w):
        recipe.check_weight_scale(np.asarray(op.scale), skeleton.k, what=name)
    return dataclasses.replace(skeleton, qvalue=op.qvalue, scale=op.scale, zero_point=op.zero_point)


PREPACK_BACKENDS = ("pallas",)
"""Backends with a prepacked weight layout (`prepack`)."""


def prepack(tree: Any, backend: str = "pallas", *, target: str | None = None, configs: Any = None) -> Any:
    """`tree` with every `QArray` carrying `backend`'s prepacked layouts (`QArray.packed`), made once here.

    backend "pallas": the scales (and zero points) of int4 weights (W4A16, W4A8) in the layouts the
    Pallas TPU kernels read (`qkernels.kernels.pallas.layout.ScaleLayout`), one per distinct layout of
    the target's config table (decode and any-M entries), or of `configs` (TileConfigs, e.g. tuned ones).
    A call whose config needs another layout relays the canonical scales out itself, as without
    prepacking; `qk.explain` says which it does. W8A8 and the weight-only int8/fp8 recipes have nothing to
    prepack (their kernels read canonical scales) and are returned as they are.
    `target`: the TPU generation ('v5e', 'v6e', 'v5p') or 'interpret' (the interpreted kernels on CPU);
    default: the generation of the default device.

    Do it where the weights become constants of serving (after loading, outside the jit'ed step, or on
    the params passed into it): the packed arrays are then pytree leaves the step reads, not work in its
    graph. Save the canonical tree (the packed leaves are derived; a restored QArray has none).
    """
    if backend not in PREPACK_BACKENDS:
        raise ValueError(f"no prepacked layout for backend {backend!r}; prepack serves {PREPACK_BACKENDS}")
    from jax_bindings.implementations import current_platform
    from qkernels.kernels.pallas import ops

    if target is None:
        platform = current_platform()
        if not platform.startswith("tpu:"):
            raise ValueError(f"prepack(..., backend='pallas') makes the Pallas TPU kernels' layouts and this "
                             f"process runs on {platform}; pass target= one of the TPU generations "
                             f"{[t.value for t in ops.Target if t is not ops.Target.GPU]}")
        target = platform.split(":", 1)[1]
    try:
        tgt = ops.Target(target)
    except ValueError:
        raise ValueError(f"target={target!r} is not a Pallas TPU target; choose one of "
                         f"{[t.value for t in ops.Target if t is not ops.Target.GPU]}") from None
    if tgt is ops.Target.GPU:
        raise ValueError("the Pallas GPU kernels read canonical scales; there is nothing to prepack for target='gpu'")

    def one(x: Any) -> Any:
        if not isinstance(x, QArray):
            return x
        packed = ops.prepack(x.operand()._replace(packed=None), x.recipe, k=x.k, target=tgt, tile_configs=configs)
        return dataclasses.replace(x, packed=packed)

    return jax.tree_util.tree_map(one, tree, is_leaf=lambda x: isinstance(x, QArray))


_STATE_FORMAT = "qkernels.QArray/1"


def _identity(q: QArray) -> dict[str, Any]:
    return {"format": _STATE_FORMAT, "recipe": q.recipe.name, "shape": list(q.shape),
            "contracting_axes": list(q.contracting_axes), "batch_axes": list(q.batch_axes)}


def _to_state_dict(q: QArray) -> dict[str, Any]:
    """The leaves, and the array's identity as `meta` (uint8 JSON: an array, so any checkpointer holds it):
    packed shapes alone cannot tell a 100-wide int4 weight from a 128-wide one, nor W4A16 from W4A8."""
    out = {"qvalue": q.qvalue, "scale": q.scale,
           "meta": np.frombuffer(json.dumps(_identity(q), sort_keys=True).encode(), np.uint8)}
    if q.zero_point is not None:
        out["zero_point"] = q.zero_point
    return out


def _from_state_dict(target: QArray, state: dict[str, Any]) -> QArray:
    """Restore the leaves into `target`'s static layout, refusing a state of another recipe, logical
    shape or axes, or with leaves of other shapes or dtypes (it would fail later, misleadingly)."""
    expected = set(_to_state_dict(target))
    if set(state) != expected:
        raise ValueError(f"QArray state has fields {sorted(state)}, expected {sorted(expected)} for "
                         f"{target.recipe.name}; restore into a target quantized with the same recipe")
    try:
        saved = json.loads(bytes(np.asarray(state["meta"], np.uint8)).decode())
    except (ValueError, TypeError) as e:
        raise ValueError(f"QArray state's meta is not qkernels metadata ({e})") from None
    if saved != _identity(target):
        raise ValueError(f"checkpoint holds a QArray {saved.get('recipe')!r} of shape {saved.get('shape')} "
                         f"(contracting {saved.get('contracting_axes')}, batch {saved.get('batch_axes')}) but the "
                         f"target is {target.recipe.name!r} of shape {list(target.shape)} (contracting "
                         f"{list(target.contracting_axes)}, batch {list(target.batch_axes)}); build the target "
                         f"with the checkpoint's recipe and shapes")
    leaves = {k: jnp.asarray(v) for k, v in state.items() if k != "meta"}
    for name, leaf in leaves.items():
        want = getattr(target, name)
        if leaf.shape != want.shape or leaf.dtype != want.dtype:
            raise ValueError(f"QArray state's {name} is {leaf.shape} {leaf.dtype} but the target's is "
                             f"{want.shape} {want.dtype}; the checkpoint is not of this weight")
    return dataclasses.replace(target, qvalue=leaves["qvalue"], scale=leaves["scale"],
                               zero_point=leaves.get("zero_point"), packed=())


if importlib.util.find_spec("flax") is not None:
    from flax import serialization

    serialization.register_serialization_state(QArray, _to_state_dict, _from_state_dict, override=True)
