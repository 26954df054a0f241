"""`quantize_model` / `quantize_params`: quantize a Flax linen or NNX model without editing its code.

How a model is intercepted (the Qwix approach, our own code):
- linen: the returned model is the same module under a subclass whose `__call__` runs inside
  `nn.intercept_methods`; every submodule method call whose path matches a rule runs with
  `jax.lax.dot_general` and `jax.numpy.einsum` replaced by quantizing versions, and with the
  module's `param` and `promote_dtype` replaced so that a `QArray` param passes Flax's shape check
  and dtype promotion. `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum` and any custom module that calls
  `lax.dot_general` / `jnp.einsum` on one of its own params are covered, and so are mixture-of-experts
  layers: `jax.lax.ragged_dot(x, experts, group_sizes)` on an (E, K, N) param of the module becomes
  `qkernels.ragged_dot` with the experts quantized per expert (a `QArray` param with batch axis 0,
  contracting axis 1), and an einsum over an expert axis (`"EMK,EKN->EMN"`, `"TK,EKN->TEN"`) goes through
  `qkernels.einsum`, the expert axis a batch or a free axis of the weight (per-expert scales either way).
- NNX: each module of the (cloned) model gets a subclass whose `__call__` does the same;
  `nnx.Linear` / `nnx.LinearGeneral` / `nnx.Einsum` hold their default `dot_general` / `einsum_op`
  / `promote_dtype` as attributes, and those are replaced by the same functions. NNX modules are
  stateful, so `quantize_model` runs them once on example inputs: that call quantizes the kernels
  in place (mode "serve") and creates the calibration statistics (mode "calibrate").
The replacement functions are installed while a matched module runs (one thread-local stack of
module scopes; other threads see `lax.dot_general` / `lax.ragged_dot` unchanged) and removed after. `x @ w`,
`jnp.dot` / `jnp.matmul` and a dot_general given to a module as a field are not intercepted.

Which operand is the weight: the `QArray` one, else the operand that is one of the module's own
parameters (tracked by identity from `param` / the NNX attribute through `promote_dtype`). A call
with no parameter operand (attention's q.k, scores.v) runs float, as Qwix does for activations.

Modes (what the quantized call does with the weight):
- "serve": weights are `QArray` params (`init` creates them; `quantize_params` converts float
  params). A float kernel met in `apply` is an error naming the module. Static-range recipes
  also hold `<param>_input_scale`, one f32 per tensor.
- "qat": weights stay float and are quantized on the fly per call; gradients are straight-through
  (`qkernels.dot_general`'s custom_vjp). `quantize_params` of the trained params then serves
  bit-identically (W8A8, W4A8: same codes, same integer kernel).
- "calibrate": the forward stays float; each quantized call's activation range (absmax, or a
  percentile of |x|, per tensor) is max-merged into the 'calibration' collection
  (`<param>_input_amax`), for `quantize_params(..., calibration=...)` to turn into static scales;
  for a rule with a data-aware `weight_method` (GPTQ's, 'awq') the Gram matrix of the inputs is summed
  too (`<param>_input_gram`, (K, K) f32, and `<param>_input_rows`; AWQ also `<param>_input_abs`, sum |x|
  per channel), for `quantize_params(..., method=...)` (Qwix's GPTQ takes the same route: statistics in
  a calibration pass, the algorithm in quantize_params). AWQ's factors are a `<param>_smooth` param of
  the served model, which divides the activations by them before the quantized call.
  The Gram matrices of all matched layers are held at once (K x K f32 each) and come from one pass of
  the float model; the torch binding calibrates block by block.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import meta
from flax.linen import dtypes as linen_dtypes
from flax.nnx.nn import dtypes as nnx_dtypes
from jax.sharding import NamedSharding

from jax_bindings import einsum as qeinsum
from jax_bindings.arrays import JAX_OPS
from jax_bindings.dot_general import _constrain, _lax_order, dot_general
from jax_bindings.qarray import QArray, quantize
from jax_bindings.ragged import ragged_dot
from jax_bindings.rules import Entry, Rule, Summary, check_rules, quantized_entry
from qkernels import calibration as qcal
from qkernels import quality

__all__ = ["quantize_model", "quantize_params", "quantization_summary", "MODES", "CALIBRATION"]

MODES = ("serve", "qat", "calibrate")
CALIBRATION = "calibration"  # the variable collection of activation ranges
INPUT_SCALE = "_input_scale"  # suffix of a static recipe's per-tensor activation scale param
INPUT_AMAX = "_input_amax"  # suffix of a calibration statistic
INPUT_GRAM = "_input_gram"  # suffix of GPTQ's statistic: the sum of X^T X over the calibration rows (K, K)
INPUT_ROWS = "_input_rows"  # and the number of those rows
INPUT_ABS = "_input_abs"  # AWQ's too: the sum of |x| per input channel (K,)
SMOOTH = "_smooth"  # suffix of AWQ's per-input-channel factors param (K,): the layer's input is divided by them
DATA_AWARE = (*quality.GPTQ_METHODS, "awq")  # the weight methods whose statistics mode="calibrate" collects

_LAX_DOT_GENERAL = jax.lax.dot_general
_JNP_EINSUM = jnp.einsum
_LAX_RAGGED_DOT = jax.lax.ragged_dot
_LOCAL = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = [0]


class CalibrationStat(nnx.Variable):
    """An NNX model's activation range for a static-range recipe (mode "calibrate")."""


@dataclass(eq=False)
class _Scope:
    """One running module method of a quantized model."""

    path: str
    module: Any
    rule: Rule | None
    mode: str
    summary: Summary
    flavor: str  # 'linen' | 'nnx'
    converting: bool = False  # NNX: quantize_model's example call may replace float kernels
    weights: dict[int, tuple[str, Any]] = field(default_factory=dict)  # id(array) -> (param name, array)
    used: int = 0

    @property
    def recipe(self) -> Any:
        return None if self.rule is None else self.rule.recipe

    def mark(self, name: str, value: Any) -> None:
        self.weights[id(value)] = (name, value)

    def weight_side(self, lhs: Any, rhs: Any) -> str | None:
        for side, x in (("rhs", rhs), ("lhs", lhs)):
            if isinstance(x, QArray) or id(x) in self.weights:
                return side
        return None

    def name_of(self, w: Any) -> str:
        if id(w) in self.weights:
            return self.weights[id(w)][0]
        for name, v in self.weights.values():  # a QArray rebuilt around the same leaves (unboxing makes new ones)
            if isinstance(v, QArray) and isinstance(w, QArray) and v.qvalue is w.qvalue:
                return name
        return "?"


def _stack() -> list[_Scope | None]:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


def _current() -> _Scope | None:
    stack = _stack()
    return stack[-1] if stack else None


class _scoped:
    """Push a module scope (None: plain JAX, e.g. qkernels' own matmuls) and install the patches."""

    def __init__(self, scope: _Scope | None) -> None:
        self.scope = scope

    def __enter__(self) -> None:
        _stack().append(self.scope)
        with _PATCH_LOCK:
            if _PATCH_DEPTH[0] == 0:
                jax.lax.dot_general = _dot_general_hook
                jnp.einsum = _einsum_hook
                jax.lax.ragged_dot = _ragged_dot_hook
            _PATCH_DEPTH[0] += 1

    def __exit__(self, *exc: Any) -> None:
        _stack().pop()
        with _PATCH_LOCK:
            _PATCH_DEPTH[0] -= 1
            if _PATCH_DEPTH[0] == 0:
                jax.lax.dot_general = _LAX_DOT_GENERAL
                jnp.einsum = _JNP_EINSUM
                jax.lax.ragged_dot = _LAX_RAGGED_DOT


# --- the weight as the mode wants it ------------------------------------------------------------------------------

def _serving_weight(scope: _Scope, w: Any, contracting: tuple[int, ...], batch: tuple[int, ...]) -> QArray:
    recipe, name = scope.recipe, scope.name_of(w)
    if isinstance(w, QArray):
        if w.recipe != recipe:
            raise ValueError(f"module {scope.path!r}: its {name!r} is a QArray quantized for {w.recipe.name} but the "
                             f"rule gives {recipe.name}; convert the float params for this model with "
                             f"qk.quantize_params")
        return w
    method = scope.rule.weight_method
    q = quantize(w, recipe, contracting_axes=contracting, batch_axes=batch, name=f"{scope.path}/{name}",
                 method="rtn" if method in DATA_AWARE else method)  # GPTQ's / AWQ's codes: quantize_params
    if scope.flavor == "linen" and scope.module.is_initializing():
        boxed = scope.module.get_variable("params", name)
        scope.module.put_variable("params", name, _rebox(q, boxed))
    elif scope.flavor == "nnx" and scope.converting:
        q = _placed_like(q, w)
        getattr(scope.module, name).set_value(q)
    else:
        raise ValueError(f"module {scope.path!r} got a float {name!r} {tuple(w.shape)} but the model is quantized for "
                         f"serving; convert the params with qk.quantize_params(params, jax.eval_shape(qmodel.init, "
                         f"...)['params']) (linen) or nnx.update(qmodel, qk.quantize_params(params, qmodel)) (NNX)")
    scope.mark(name, q)
    return q


def _placed_like(q: QArray, w: Any) -> QArray:
    """`q` sharded as `QArray.storage_specs` derives from the float weight's `NamedSharding`, if any."""
    sharding = None if isinstance(w, jax.core.Tracer) else getattr(w, "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
        return q
    specs = q.storage_specs(sharding.spec)
    return dataclasses.replace(q, **{f: jax.device_put(getattr(q, f), NamedSharding(sharding.mesh, getattr(specs, f)))
                                     for f in ("qvalue", "scale", "zero_point") if getattr(q, f) is not None})


def _rebox(q: QArray, boxed: Any) -> Any:
    """`q` with each storage leaf boxed like the float param (`nn.Partitioned` names derived), or `q`."""
    if not isinstance(boxed, meta.Partitioned):
        return q
    specs = q.storage_specs(boxed.names)
    leaves = {f: dataclasses.replace(boxed, value=getattr(q, f), names=tuple(getattr(specs, f)))
              for f in ("qvalue", "scale", "zero_point") if getattr(q, f) is not None}
    return dataclasses.replace(q, **leaves)


def _input_scale(scope: _Scope, x: jax.Array, name: str) -> jax.Array:
    """The static-range recipe's per-tensor activation scale: a param next to the kernel."""
    key = name + INPUT_SCALE
    rule = scope.rule

    def measured() -> jax.Array:
        amax = qcal.batch_range(x, JAX_OPS, method=rule.method, percentile=rule.percentile)
        return qcal.static_scale(amax, JAX_OPS)

    if scope.flavor == "linen":
        return scope.module.param(key, lambda _key: measured())
    if not hasattr(scope.module, key):
        if not scope.converting:
            raise ValueError(f"module {scope.path!r} has no {key!r}: quantize the NNX model with example inputs")
        setattr(scope.module, key, nnx.Param(measured()))
    return getattr(scope.module, key)[...]


def _calibrate(scope: _Scope, x: jax.Array, name: str) -> None:
    rule = scope.rule
    amax = qcal.batch_range(jax.lax.stop_gradient(x), JAX_OPS, method=rule.method, percentile=rule.percentile)
    _merge_stat(scope, name + INPUT_AMAX, amax, lambda old, new: qcal.merge_ranges(old, new, JAX_OPS))


def _collect_gram(scope: _Scope, x: jax.Array, x_contracting: tuple[int, ...] | None, batch: tuple[int, ...],
                  name: str) -> None:
    """GPTQ's statistic of this call's activations: X^T X (K, K) summed into `<name>_input_gram` and the rows
    into `<name>_input_rows` (f32; K in the weight's contracting order, as the QArray stores K); for AWQ also
    sum |x| per channel into `<name>_input_abs`."""
    if batch or x_contracting is None:
        raise ValueError(f"module {scope.path!r}: weight_method={scope.rule.weight_method!r} quantizes one matrix per "
                         f"weight from its inputs' statistics; its {name!r} has batch (expert) axes: give this module "
                         f"a Rule with weight_method='rtn' or 'mse'")
    k = math.prod(x.shape[a] for a in x_contracting)
    free = [a for a in range(x.ndim) if a not in x_contracting]
    rows = jnp.transpose(jax.lax.stop_gradient(x), (*free, *x_contracting)).reshape(-1, k).astype(jnp.float32)
    with _scoped(None):
        gram = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
    count = jnp.float32(rows.shape[0])
    stats = [(INPUT_GRAM, gram), (INPUT_ROWS, count)]
    if scope.rule.weight_method == "awq":
        stats.append((INPUT_ABS, jnp.sum(jnp.abs(rows), axis=0)))
    for suffix, value in stats:
        _merge_stat(scope, name + suffix, value, jnp.add)


def _merge_stat(scope: _Scope, key: str, value: jax.Array, merge: Any) -> None:
    """The module's calibration statistic `key` becomes `merge(old, value)` (`value` on the first call)."""
    if scope.flavor == "linen":
        module = scope.module
        if not module.is_mutable_collection(CALIBRATION):
            raise ValueError(f"mode='calibrate' collects statistics into the {CALIBRATION!r} collection; "
                             f"apply with mutable=[{CALIBRATION!r}]")
        stat = module.variable(CALIBRATION, key, lambda: jnp.zeros_like(value))
        stat.value = value if module.is_initializing() else merge(stat.value, value)
    elif not hasattr(scope.module, key):
        setattr(scope.module, key, CalibrationStat(value))
    else:
        stat = getattr(scope.module, key)
        stat.set_value(merge(stat.get_value(), value))


def _prepare(scope: _Scope, x: Any, w: Any, contracting: tuple[int, ...],
             batch: tuple[int, ...], x_contracting: tuple[int, ...] | None) -> dict[str, Any] | None:
    """The weight (and the call's extra arguments) for this mode; None: run the float call.
    `x_contracting`: the activation's axes contracted with `contracting` (pairwise), None where the call
    has no such pairing (ragged_dot)."""
    name = scope.name_of(w)
    if scope.mode != "serve":
        if isinstance(w, QArray):
            raise ValueError(f"module {scope.path!r}: mode={scope.mode!r} runs float params; its {name!r} is a "
                             f"QArray (serve it with mode='serve')")
        if scope.mode == "qat" and scope.recipe.static:
            raise ValueError(f"module {scope.path!r}: {scope.recipe.name} is a static-range recipe; train with its "
                             f"dynamic recipe and calibrate after")
        planned = jax.eval_shape(functools.partial(quantize, recipe=scope.recipe, contracting_axes=contracting,
                                                   batch_axes=batch), jax.ShapeDtypeStruct(w.shape, w.dtype))
        scope.summary.record(dataclasses.replace(quantized_entry(scope.path, scope.module, name, planned),
                                                 stored=None))
        if scope.mode == "qat":
            return {"weight": w, "extra": {}}
        if scope.recipe.static:
            _calibrate(scope, x, name)
        if scope.rule.weight_method in DATA_AWARE:
            _collect_gram(scope, x, x_contracting, batch, name)
        return None
    q = _serving_weight(scope, w, contracting, batch)
    scope.summary.record(quantized_entry(scope.path, scope.module, name, q))
    if scope.rule.weight_method == "awq":
        x = _divide(x, _smooth(scope, name, q.k), x_contracting)
    extra = {"input_scale": _input_scale(scope, x, name)} if q.recipe.static else {}
    return {"weight": q, "extra": extra, "x": x}


def _smooth(scope: _Scope, name: str, k: int) -> jax.Array:
    """AWQ's factors of the module's `name` (a param next to it, ones until `quantize_params` sets them)."""
    key = name + SMOOTH
    if scope.recipe.static:
        raise ValueError(f"module {scope.path!r}: weight_method='awq' divides the activations by per-channel factors "
                         f"before they are quantized, which {scope.recipe.name}'s static range does not see; use a "
                         f"weight-only or dynamic recipe (e.g. qk.W4A16(128))")
    if scope.flavor == "linen":
        return scope.module.param(key, lambda _key: jnp.ones((k,), jnp.float32))
    if not hasattr(scope.module, key):
        if not scope.converting:
            raise ValueError(f"module {scope.path!r} has no {key!r}: quantize the NNX model with example inputs")
        setattr(scope.module, key, nnx.Param(jnp.ones((k,), jnp.float32)))
    return getattr(scope.module, key)[...]


def _divide(x: jax.Array, s: jax.Array, x_contracting: tuple[int, ...] | None) -> jax.Array:
    """`x` divided by `s` (K,) along its contracting axes (K in the weight's contracting order)."""
    if x_contracting is None:
        raise ValueError("weight_method='awq' needs the activation's contracting axes (not lax.ragged_dot's experts)")
    dims = [x.shape[a] for a in x_contracting]
    t = jnp.transpose(s.reshape(dims), np.argsort(x_contracting))  # to the axes' own order
    full = [x.shape[a] if a in x_contracting else 1 for a in range(x.ndim)]
    return x / t.reshape(full).astype(x.dtype)


# --- the replacement functions -----------------------------------------------------------------------------------

def _dot_general_hook(lhs: Any, rhs: Any, dimension_numbers: Any, precision: Any = None,
                      preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
    """`jax.lax.dot_general` inside a quantized module: the weight operand goes through qkernels."""
    scope = _current()
    side = None if scope is None or scope.recipe is None else scope.weight_side(lhs, rhs)
    if side is None:
        return _LAX_DOT_GENERAL(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)
    scope.used += 1
    (lc, rc), (lb, rb) = dimension_numbers
    x, w, (xc, wc), (xb, wb) = (lhs, rhs, (lc, rc), (lb, rb)) if side == "rhs" else (rhs, lhs, (rc, lc), (rb, lb))
    ready = _prepare(scope, x, w, tuple(wc), tuple(wb), tuple(xc))
    if ready is None:
        return _LAX_DOT_GENERAL(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)
    out_sharding = kwargs.pop("out_sharding", None) if side == "lhs" else None
    with _scoped(None):
        y = dot_general(ready.get("x", x), ready["weight"], ((xc, wc), (xb, wb)), precision, preferred_element_type,
                        recipe=scope.recipe, backend=scope.rule.backend, **ready["extra"], **kwargs)
        if side == "lhs":  # lax order: (batch, weight free, activation free)
            y = _lax_order(y, len(xb), x.ndim - len(xc) - len(xb))
            y = y if out_sharding is None else _constrain(y, out_sharding)
    return y


def _einsum_hook(subscripts: Any, *operands: Any, **kwargs: Any) -> jax.Array:
    """`jax.numpy.einsum` inside a quantized module: a two-operand einsum with a weight operand goes
    through `qkernels.einsum` (the weight second, whichever position it was given in)."""
    scope = _current()
    side = None
    if scope is not None and scope.recipe is not None and len(operands) == 2 and isinstance(subscripts, str) \
            and kwargs.get("_dot_general", _LAX_DOT_GENERAL) in (_LAX_DOT_GENERAL, _dot_general_hook):
        side = scope.weight_side(*operands)
    if side is None:
        return _JNP_EINSUM(subscripts, *operands, **kwargs)
    scope.used += 1
    x, w = operands if side == "rhs" else operands[::-1]
    a, b, out = qeinsum.parse_subscripts(subscripts, *operands)
    xi, wi = (a, b) if side == "rhs" else (b, a)
    contracted = [i for i, c in enumerate(wi) if c in xi and c not in out]
    ready = _prepare(scope, x, w, tuple(contracted), tuple(i for i, c in enumerate(wi) if c in xi and c in out),
                     tuple(xi.index(wi[i]) for i in contracted))
    if ready is None:
        return _JNP_EINSUM(subscripts, *operands, **kwargs)
    with _scoped(None):
        return qeinsum.einsum(f"{xi},{wi}->{out}", ready.get("x", x), ready["weight"],
                              dot_general=functools.partial(_call_dot_general, scope.rule, ready["extra"]),
                              precision=kwargs.get("precision"),
                              preferred_element_type=kwargs.get("preferred_element_type"),
                              out_sharding=kwargs.get("out_sharding"))


def _ragged_dot_hook(lhs: Any, rhs: Any, group_sizes: Any, precision: Any = None, preferred_element_type: Any = None,
                     group_offset: Any = None, **kwargs: Any) -> jax.Array:
    """`jax.lax.ragged_dot` inside a quantized module: when rhs, the (E, K, N) experts, is one of the module's
    parameters (or a QArray), the call is `qkernels.ragged_dot` with them quantized per expert (batch axis 0,
    contracting axis 1: `qk.quantize_experts`' layout)."""
    scope = _current()
    if scope is None or scope.recipe is None or scope.weight_side(lhs, rhs) != "rhs":
        return _LAX_RAGGED_DOT(lhs, rhs, group_sizes, precision, preferred_element_type, group_offset, **kwargs)
    if scope.recipe.static:
        raise ValueError(f"module {scope.path!r} calls lax.ragged_dot on its {scope.name_of(rhs)!r} but "
                         f"{scope.recipe.name} is a static-range recipe, which qk.ragged_dot does not serve; give "
                         f"this module a dynamic recipe (e.g. qk.W8A8) in its Rule")
    scope.used += 1
    ready = _prepare(scope, lhs, rhs, (1,), (0,), None)
    if ready is None:
        return _LAX_RAGGED_DOT(lhs, rhs, group_sizes, precision, preferred_element_type, group_offset, **kwargs)
    with _scoped(None):
        return ragged_dot(lhs, ready["weight"], group_sizes, precision, preferred_element_type, group_offset,
                          recipe=scope.recipe, backend=scope.rule.backend, **kwargs)


def _call_dot_general(rule: Rule, extra: dict[str, Any], x: Any, w: Any, dims: Any, precision: Any = None,
                      preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
    return dot_general(x, w, dims, precision, preferred_element_type, recipe=rule.recipe, backend=rule.backend,
                       **extra, **kwargs)


def _promote(promote: Any, scope: _Scope | None, args: Sequence[Any], dtype: Any, inexact: bool) -> list[Any]:
    """`promote_dtype` that lets a QArray through as is (its logical dtype joins the inference) and
    keeps the identity of promoted parameters (a cast parameter is still the weight)."""
    stand_in = [jnp.zeros((), a.dtype) if isinstance(a, QArray) else a for a in args]
    out = list(promote(*stand_in, dtype=dtype, inexact=inexact))
    out = [a if isinstance(a, QArray) else o for a, o in zip(args, out)]
    if scope is not None:
        for a, o in zip(args, out):
            if id(a) in scope.weights and o is not a:
                scope.mark(scope.weights[id(a)][0], o)
    return out


def _linen_promote_hook(*args: Any, dtype: Any = None, inexact: bool = True) -> list[Any]:
    return _promote(linen_dtypes.promote_dtype, _current(), args, dtype, inexact)


def _nnx_promote_hook(args: Any, /, *, dtype: Any = None, inexact: bool = True) -> Any:
    out = _promote(linen_dtypes.promote_dtype, _current(), list(args), dtype, inexact)
    return type(args)(out) if isinstance(args, tuple) else out


# --- linen -------------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _ModelState:
    rules: tuple[Rule, ...]
    mode: str
    summary: Summary
    # linen: each module's parameters by identity, per path, shared by its setup and its other
    # methods (setup runs as a call of its own); emptied when the top-level call returns
    marks: dict[str, dict[int, tuple[str, Any]]] = field(default_factory=dict)
    depth: int = 0


def _own_params(module: Any) -> bool:
    params = module.variables.get("params", {}) if module.scope is not None else {}
    return any(not isinstance(v, Mapping) for v in params.values())


def _linen_param_hook(module: nn.Module, scope: _Scope, name: str, init_fn: Any, *init_args: Any,
                      unbox: bool = True, **init_kwargs: Any) -> Any:
    if module.has_variable("params", name):
        existing = meta.unbox(module.get_variable("params", name))
        if isinstance(existing, QArray):
            declared = jax.eval_shape(lambda: meta.unbox(init_fn(jax.random.key(0), *init_args, **init_kwargs)))
            if tuple(declared.shape) != existing.shape:
                raise ValueError(f"module {scope.path!r} declares {name!r} of shape {tuple(declared.shape)} but the "
                                 f"params hold a QArray of shape {list(existing.shape)}; the quantized params are of "
                                 f"another model")
            scope.mark(name, existing)
            return existing
    value = nn.Module.param(module, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    scope.mark(name, value)
    return value


class _linen_overrides:
    """The module's `param` (and default `promote_dtype`) replaced on the bound instance for one call."""

    def __init__(self, module: nn.Module, scope: _Scope) -> None:
        self.module, self.scope, self.saved = module, scope, {}

    def __enter__(self) -> None:
        m = self.module
        new = {"param": functools.partial(_linen_param_hook, m, self.scope)}
        if getattr(m, "promote_dtype", None) is linen_dtypes.promote_dtype:
            new["promote_dtype"] = _linen_promote_hook
        for k, v in new.items():
            self.saved[k] = m.__dict__.get(k, _MISSING)
            object.__setattr__(m, k, v)

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            if v is _MISSING:
                object.__delattr__(self.module, k)
            else:
                object.__setattr__(self.module, k, v)


_MISSING = object()


def _finish(scope: _Scope, has_params: bool) -> None:
    """Record why a module with parameters of its own was left float."""
    if not has_params or scope.used:
        return
    if scope.rule is None:
        reason = "no rule matches its path"
    elif scope.rule.recipe is None:
        reason = f"rule {scope.rule.module_path!r} gives recipe None"
    else:
        reason = ("it made no lax.dot_general / jnp.einsum / lax.ragged_dot call on one of its parameters (x @ w, "
                  "jnp.dot and a dot_general passed as a module field are not intercepted)")
    scope.summary.record(Entry(path=scope.path, module=type(scope.module).__name__, reason=reason))


def _linen_run(state: _ModelState, module: nn.Module, fun: Any, is_setup: bool, *args: Any, **kwargs: Any) -> Any:
    """`fun(*args, **kwargs)`, a method of the bound `module` (its `setup` if `is_setup`), in its scope."""
    path = "/".join(module.scope.path)
    hit = state.summary.match(path)
    scope = _Scope(path=path, module=module, rule=None if hit is None else hit[1], mode=state.mode,
                   summary=state.summary, flavor="linen", weights=state.marks.setdefault(path, {}))
    for name, value in (module.variables.get("params", {}) if module.scope is not None else {}).items():
        if not isinstance(value, Mapping):  # its own parameters (children are sub-dicts)
            scope.mark(name, meta.unbox(value))
    with _scoped(scope), _linen_overrides(module, scope):
        out = fun(*args, **kwargs)
    if not is_setup:
        _finish(scope, _own_params(module))
    return out


class _top_level:
    """The outermost call of a quantized linen model: interception on, marks emptied after (not after
    the top module's setup, whose parameters its `__call__` uses next). Marks hold their arrays, so a
    stale one can never share its id with a new array."""

    def __init__(self, state: _ModelState, clears: bool = True) -> None:
        self.state, self.clears = state, clears
        self.intercepting = nn.intercept_methods(functools.partial(_linen_interceptor, state))

    def __enter__(self) -> None:
        self.state.depth += 1
        self.intercepting.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.intercepting.__exit__(*exc)
        self.state.depth -= 1
        if self.state.depth == 0 and self.clears:
            self.state.marks.clear()


def _linen_interceptor(state: _ModelState, next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
    if context.module.scope is None:
        return next_fun(*args, **kwargs)
    return _linen_run(state, context.module, next_fun, context.method_name == "setup", *args, **kwargs)


def _unwrapped(method: Any) -> Any:
    while hasattr(method, "method_handler_wrapped"):
        method = method.__wrapped__
    return method


def _quantize_linen(model: nn.Module, rules: tuple[Rule, ...], mode: str) -> nn.Module:
    base = getattr(type(model), "_qk_float_type", type(model))
    state = _ModelState(rules, mode, Summary(rules))
    call = _unwrapped(base.__call__)

    @functools.wraps(call)  # keeps nn.compact's mark
    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with _top_level(state):
            out = _linen_run(state, self, functools.partial(call, self), False, *args, **kwargs)
        state.summary.warn_unmatched()
        return out

    namespace = {"__call__": __call__, "_qk_float_type": base, "_qk_state": state, "__module__": base.__module__,
                 "__qualname__": base.__qualname__}
    if base.setup is not nn.Module.setup:  # flax runs the top module's setup before its __call__
        base_setup = _unwrapped(base.setup)

        @functools.wraps(base_setup)
        def setup(self: nn.Module) -> None:
            with _top_level(state, clears=False):
                _linen_run(state, self, functools.partial(base_setup, self), True)

        namespace["setup"] = setup
    cls = type(base.__name__, (base,), namespace)
    qmodel = model.copy()
    qmodel.__class__ = cls
    return qmodel


# --- NNX ---------------------------------------------------------------------------------------------------------

@functools.cache
def _nnx_class(base: type) -> type:
    """`base` with a `__call__` that runs in a module scope (one class per base, shared by instances)."""
    call = base.__call__

    def __call__(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
        binding = self.__dict__.get("_qk_binding")
        if binding is None:
            return call(self, *args, **kwargs)
        rule = binding.rule
        scope = _Scope(path=binding.path, module=self, rule=rule, mode=binding.state.mode,
                       summary=binding.state.summary, flavor="nnx", converting=_converting())
        for name, v in vars(self).items():
            if isinstance(v, nnx.Param):
                scope.mark(name, v.get_value())
        with _scoped(scope):
            out = call(self, *args, **kwargs)
        _finish(scope, any(isinstance(v, nnx.Param) for v in vars(self).values()))
        return out

    return type(base.__name__, (base,), {"__call__": __call__, "_qk_float_type": base, "__module__": base.__module__,
                                         "__qualname__": base.__qualname__})


@dataclass(frozen=True, eq=False)
class _NnxBinding:
    """Static metadata a quantized NNX module carries (compared by identity, hashable)."""

    path: str
    rule: Rule | None
    state: _ModelState


def _converting() -> bool:
    return getattr(_LOCAL, "converting", False)


_NNX_DEFAULTS = {"dot_general": (_LAX_DOT_GENERAL, _dot_general_hook), "einsum_op": (_JNP_EINSUM, _einsum_hook),
                 "promote_dtype": (nnx_dtypes.promote_dtype, _nnx_promote_hook)}


def _quantize_nnx(model: nnx.Module, rules: tuple[Rule, ...], mode: str, args: tuple, kwargs: dict) -> nnx.Module:
    model = nnx.clone(model)
    state = _ModelState(rules, mode, Summary(rules))
    for path, m in nnx.iter_modules(model):
        p = "/".join(map(str, path))
        hit = state.summary.match(p)
        m.__class__ = _nnx_class(getattr(type(m), "_qk_float_type", type(m)))
        object.__setattr__(m, "_qk_binding", _NnxBinding(p, None if hit is None else hit[1], state))
        if hit is not None and hit[1].recipe is not None:
            for attr, (default, hook) in _NNX_DEFAULTS.items():
                if m.__dict__.get(attr) is default:
                    object.__setattr__(m, attr, hook)
    model.__dict__["_qk_state"] = state
    if mode != "qat" or args or kwargs:
        if not args and not kwargs:
            raise ValueError(f"quantize_model(nnx_model, rules, mode={mode!r}) needs example inputs (as Qwix does): "
                             f"quantize_model(model, rules, {mode!r}, x); the call quantizes the kernels in place")
        _LOCAL.converting = True
        try:
            model(*args, **kwargs)
        finally:
            _LOCAL.converting = False
    state.summary.warn_unmatched(stacklevel=3)  # the caller of quantize_model
    return model


# --- public ------------------------------------------------------------------------------------------------------

def quantize_model(model: Any, rules: Sequence[Rule] | Rule, mode: str = "serve", *example_args: Any,
                   **example_kwargs: Any) -> Any:
    """A copy of the Flax `model` whose matching layers run through qkernels (see the module docstring).

    `rules`: `qk.Rule(module_path_regex, recipe | None, ...)`, first match wins. `mode`: 'serve',
    'qat' or 'calibrate'. NNX models take example inputs after `mode` (needed for 'serve' and
    'calibrate': the call quantizes the kernels / creates the statistics); linen models take none.
    """
    rules = check_rules(rules)
    if mode not in MODES:
        raise ValueError(f"quantize_model mode={mode!r}; use one of {MODES}")
    if isinstance(model, nn.Module):
        if example_args or example_kwargs:
            raise ValueError("a linen model takes no example inputs: its params are made by qmodel.init(key, x)")
        return _quantize_linen(model, rules, mode)
    if isinstance(model, nnx.Module):
        return _quantize_nnx(model, rules, mode, example_args, example_kwargs)
    raise TypeError(f"quantize_model takes a flax.linen or flax.nnx Module, got {type(model).__name__}")


def quantization_summary(qmodel: Any) -> Summary:
    """What `quantize_model` quantized in `qmodel` (linen: filled by its first `init` / `apply`)."""
    state = getattr(type(qmodel), "_qk_state", None) or getattr(qmodel, "__dict__", {}).get("_qk_state")
    if state is None:
        raise TypeError(f"{type(qmodel).__name__} was not made by qk.quantize_model")
    return state.summary


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def _flat(tree: Any) -> dict[tuple, Any]:
    if isinstance(tree, nnx.Module):
        tree = nnx.to_pure_dict(nnx.state(tree, nnx.Param))
    elif isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return traverse_util.flatten_dict(dict(tree) if isinstance(tree, Mapping) else tree)


def _unboxed(x: Any) -> Any:
    return meta.unbox(x)


def _quantize_leaf(path: str, value: Any, target: QArray, method: str = "rtn", solver: Any = None) -> Any:
    value = _unboxed(value)
    abstract = _unboxed(target)
    if tuple(value.shape) != abstract.shape:
        raise ValueError(f"param {path!r} has shape {tuple(value.shape)} but the quantized model expects "
                         f"{list(abstract.shape)}; the params are of another model")
    q = quantize(value, abstract.recipe, contracting_axes=abstract.contracting_axes, batch_axes=abstract.batch_axes,
                 name=path, method=method, solver=solver)
    q = _placed_like(q, value)
    leaf = getattr(target, "qvalue", None)
    if isinstance(leaf, meta.Partitioned):  # the abstract tree's boxes (names derived at init)
        q = dataclasses.replace(q, **{f: dataclasses.replace(getattr(target, f), value=getattr(q, f))
                                      for f in ("qvalue", "scale", "zero_point") if getattr(q, f) is not None})
    return q


def _solver(stats: dict[tuple, Any], path: tuple, name: str, method: str, recipe: Any,
            smooths: dict[tuple, Any]) -> Any:
    """The data-aware `method`'s solver for the param at `path` (`quantize(solver=)`), from its calibration
    statistics: GPTQ on the Hessian `2/n X^T X`; AWQ on `X^T X / n` and mean |x|, its factors put in
    `smooths` under the `<param>_smooth` path."""
    keys = {suffix: (*path[:-1], str(path[-1]) + suffix) for suffix in (INPUT_GRAM, INPUT_ROWS, INPUT_ABS)}
    needed = (INPUT_GRAM, INPUT_ROWS, INPUT_ABS) if method == "awq" else (INPUT_GRAM, INPUT_ROWS)
    missing = [keys[s] for s in needed if keys[s] not in stats]
    if missing:
        raise ValueError(f"method={method!r} needs the inputs of {name!r} but the calibration has no "
                         f"{'/'.join(map(str, missing[0]))!r}: run the model with mode='calibrate' and rules giving its "
                         f"module weight_method={method!r} over example batches, and pass its {CALIBRATION!r} "
                         f"collection (linen) or the calibrated model (NNX) as calibration=")
    n = float(np.asarray(_unboxed(stats[keys[INPUT_ROWS]])))
    if n == 0:
        raise ValueError(f"the calibration saw no input rows of {name!r}; calibrate on batches that reach it")
    gram = np.asarray(_unboxed(stats[keys[INPUT_GRAM]]), np.float64) / n
    if method != "awq":
        return lambda w: quality.gptq_named(w, 2.0 * gram, recipe.rhs, method)

    def awq(w: np.ndarray) -> Any:
        op, s = quality.awq_gram(w, gram, np.asarray(_unboxed(stats[keys[INPUT_ABS]]), np.float64) / n, recipe.rhs)
        smooths[(*path[:-1], str(path[-1]) + SMOOTH)] = jnp.asarray(s)
        return op

    return awq


def quantize_params(params: Any, abstract_quantized_params: Any, calibration: Any = None, *,
                    method: str = "rtn") -> Any:
    """Float params -> the params of a quantized model: every `QArray` leaf of the abstract tree is
    quantized from the float param at the same path (no float copy kept); the rest is passed through.

    linen: `abstract_quantized_params = jax.eval_shape(qmodel.init, key, x)['params']`; returns the
    params tree for `qmodel.apply({'params': ...}, x)`. NNX: pass the quantized model (or its state)
    as the abstract tree and the float model / its `nnx.Param` state / pure dict as `params`; returns
    a pure dict for `nnx.update(qmodel, ...)`. Static-range recipes: `calibration` is the collected
    'calibration' collection (linen) or the calibrated model (NNX); each `<param>_input_scale` is
    `qkernels.calibration.static_scale` of its `<param>_input_amax`. A float param sharded with a
    `NamedSharding` gives a QArray sharded alike (`QArray.storage_specs`). `method`: how the weights'
    codes are chosen: a data-free method ('rtn', 'mse', ...: `qk.quantize`), or GPTQ ('gptq', 'gptq-mse',
    'gptq-ao', 'gptq-ao-mse') and AWQ ('awq': `quality.awq_gram`; the factors fill each `<param>_smooth`)
    from the statistics that `mode="calibrate"` summed for the rules with that `weight_method`
    (`calibration` as above; one pass of the float model, every layer's statistics from the float layers
    before it; the torch binding can also go block by block).
    """
    targets = _flat(abstract_quantized_params) if not isinstance(abstract_quantized_params, nnx.Module) else \
        traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract_quantized_params, nnx.Param)))
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    values = _flat(params)
    stats = {}
    if calibration is not None:
        stats = _flat(nnx.state(calibration, CalibrationStat) if isinstance(calibration, nnx.Module) else calibration)
    out: dict[tuple, Any] = {}
    smooths: dict[tuple, Any] = {}  # AWQ's factors, by the path of their param
    for path, target in sorted(targets.items(), key=lambda item: not _is_qarray(_unboxed(item[1]))):
        name = "/".join(map(str, path))  # (the weights first: AWQ's factors come with them)
        if path in values:
            value = values[path]
            if _is_qarray(_unboxed(target)):
                solver = None
                if method in DATA_AWARE:
                    solver = _solver(stats, path, name, method, _unboxed(target).recipe, smooths)
                out[path] = _quantize_leaf(name, value, target, method, solver)
            else:
                out[path] = value
        elif str(path[-1]).endswith(SMOOTH):
            if path not in smooths:
                raise ValueError(f"param {name!r} holds AWQ's factors; quantize the params with method='awq' (and "
                                 f"the calibration that collected its statistics)")
            out[path] = dataclasses.replace(target, value=smooths[path]) if isinstance(target, meta.Partitioned) \
                else smooths[path]
        elif str(path[-1]).endswith(INPUT_SCALE):
            amax_path = (*path[:-1], str(path[-1])[:-len(INPUT_SCALE)] + INPUT_AMAX)
            if amax_path not in stats:
                raise ValueError(f"param {name!r} is a static activation scale but the calibration has no "
                                 f"{'/'.join(map(str, amax_path))!r}; run the mode='calibrate' model over example "
                                 f"batches and pass its {CALIBRATION!r} collection as calibration=")
            scale = qcal.static_scale(jnp.asarray(_unboxed(stats[amax_path])), JAX_OPS)
            out[path] = dataclasses.replace(target, value=scale) if isinstance(target, meta.Partitioned) else scale
        else:
            raise ValueError(f"the quantized model has param {name!r} but the float params do not; they are of "
                             f"another model")
    extra = sorted("/".join(map(str, p)) for p in values if p not in targets)
    if extra:
        raise ValueError(f"float params {extra} are not in the quantized model; the params are of another model")
    return traverse_util.unflatten_dict(out)
