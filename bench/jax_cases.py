"""JAX rows: `qkernels.dot_general` per recipe, `lax.dot_general` f32/bf16, XLA int8 dot + rescale, AQT.

Weights are laid out as a Flax `Dense` kernel, (K, N), contracted on axis 0, which is the call the
README shows: `qk.dot_general(x, qk.quantize(w, recipe, contracting_axes=(0,)), DN)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench.cases import mma_of, Case, Data, Prepared, Unavailable, chosen_name, nbytes
from qkernels import reference
from qkernels.formats import W8A8, Recipe

__all__ = ["cases", "DN"]

DN = (((1,), (0,)), ((), ()))
_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _sync(out: Any) -> None:
    jax.block_until_ready(out)


def _to_numpy(out: Any) -> np.ndarray:
    return np.asarray(jnp.asarray(out, jnp.float32))


def _act_dtype(device: Any) -> Any:
    return jnp.bfloat16 if device.accelerated else jnp.float32


def _operands(data: Data, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """x (M, K) and the weight as a (K, N) kernel, on the default device."""
    return jnp.asarray(data.x, dtype), jnp.asarray(np.ascontiguousarray(data.w.T), dtype)


def _lax(dtype_name: str):
    def prepare(data: Data, device: Any) -> Prepared:
        x, w = _operands(data, _DTYPES[dtype_name])
        f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, DN))
        return Prepared(fn=lambda: f(x, w), sync=_sync, to_numpy=_to_numpy,
                        bytes_moved=nbytes(x, w) + data.ref.size * x.dtype.itemsize,
                        impl=f"lax.dot_general {dtype_name}")
    return prepare


def _xla_int8(data: Data, device: Any) -> Prepared:
    """Dynamic per-row int8 activations, XLA's int8 dot (int32 result) against pre-quantized weights,
    then a separate f32 rescale in the same jit."""
    dt = _act_dtype(device)
    w_q = reference.quantize(data.w, W8A8.rhs, name="w")
    wq = jnp.asarray(np.ascontiguousarray(w_q.qvalue.T))  # (K, N) int8
    sw = jnp.asarray(w_q.scale)
    x = jnp.asarray(data.x, dt)

    @jax.jit
    def f(x: jax.Array, wq: jax.Array, sw: jax.Array) -> jax.Array:
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True).astype(jnp.float32)
        sx = jnp.where(amax == 0, 1.0, amax / 127)
        xq = jnp.clip(jnp.round(x.astype(jnp.float32) / sx), -127, 127).astype(jnp.int8)
        acc = jax.lax.dot_general(xq, wq, DN, preferred_element_type=jnp.int32)
        return ((acc.astype(jnp.float32) * sx) * sw).astype(dt)

    return Prepared(fn=lambda: f(x, wq, sw), sync=_sync, to_numpy=_to_numpy,
                    bytes_moved=nbytes(x, wq, sw) + data.ref.size * x.dtype.itemsize,
                    impl="lax.dot_general int8->int32 + f32 rescale")


def _aqt(data: Data, device: Any) -> Prepared:
    """AQT's int8 dot_general (`aqt.jax.v2`, 8-bit lhs and rhs, per-channel absmax) in serving mode:
    the weight is quantized once outside the timed call and passed as AQT's `rhs_qt`."""
    try:
        from aqt.jax.v2 import aqt_dot_general
        from aqt.jax.v2 import config as aqt_config
    except ImportError as e:
        raise Unavailable(f"aqtp is not installed ({e}); install the bench extra: pip install 'qkernels[bench]'")
    cfg = aqt_config.dot_general_make(lhs_bits=8, rhs_bits=8)
    x, w = _operands(data, _act_dtype(device))

    @jax.jit
    def quantize_rhs(x: jax.Array, w: jax.Array) -> Any:
        q = aqt_config.dot_general_make(lhs_bits=8, rhs_bits=8).fwd  # quantizers are single-use
        q.dg_quantizer.init_calibration()
        _, (rhs_qt, _) = aqt_dot_general.quant(x, w, None, None, q.dg_quantizer, q.lhs, q.rhs, DN, False)
        return rhs_qt

    rhs_qt = quantize_rhs(x, w)
    if rhs_qt.qvalue.dtype != jnp.int8:
        raise RuntimeError(f"AQT stored the weight as {rhs_qt.qvalue.dtype}, expected int8 codes")
    # The float weight still has to be passed for its shape; XLA removes its unused calibration.
    f = jax.jit(lambda x, w, rhs_qt: cfg.dg_core(x, w, None, rhs_qt, DN)[0])
    stored = nbytes(rhs_qt.qvalue, *(rhs_qt.scale or ()))
    return Prepared(fn=lambda: f(x, w, rhs_qt), sync=_sync, to_numpy=_to_numpy,
                    bytes_moved=nbytes(x) + stored + data.ref.size * x.dtype.itemsize,
                    impl="aqt.jax.v2 dot_general int8 (pre-quantized rhs)")


def _qkernels(recipe: Recipe):
    def prepare(data: Data, device: Any) -> Prepared:
        import qkernels as qk

        x, w = _operands(data, _act_dtype(device))
        w_q = qk.quantize(w, recipe, contracting_axes=(0,))
        impl = chosen_name(qk.explain(x, w_q, DN))
        f = jax.jit(lambda x, w_q: qk.dot_general(x, w_q, DN))
        stored = nbytes(w_q.qvalue, w_q.scale, getattr(w_q, "zero_point", None))
        return Prepared(fn=lambda: f(x, w_q), sync=_sync, to_numpy=_to_numpy,
                        bytes_moved=nbytes(x) + stored + data.ref.size * x.dtype.itemsize, impl=impl)
    return prepare


def cases(device: Any, recipes: tuple[Recipe, ...]) -> list[Case]:
    act = "bf16" if device.accelerated else "f32"
    names = {r.name for r in recipes}
    out = [Case(method="lax.dot_general", framework="jax", recipe=dt, role="float", mma=dt, prepare=_lax(dt))
           for dt in ("f32", "bf16")]
    if "w8a8" in names:
        out.append(Case(method="xla.int8-dot+rescale", framework="jax", recipe="w8a8", role="baseline",
                        mma="int8", prepare=_xla_int8))
        out.append(Case(method="aqt.int8", framework="jax", recipe="w8a8", role="baseline", mma="int8",
                        prepare=_aqt))
    for r in recipes:
        out.append(Case(method="qkernels.dot_general", framework="jax", recipe=r.name, role="qkernels",
                        mma=mma_of(r, act),
                        prepare=_qkernels(r)))
    return out
