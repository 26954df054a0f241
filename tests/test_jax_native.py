"""`xla-native` (jax_bindings/native.py): the native CPU kernels through the XLA FFI from JAX.

Eager, under `jit` and under `vmap`; chosen automatically on CPU where it pays and refused with a reason
elsewhere; gradients through `qk.dot_general`; NaN rows for non-finite activations. The numerics per
recipe and shape are the conformance suite's (tests/test_conformance.py discovers `jax:xla-native`).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import qkernels as qk  # noqa: E402
from jax_bindings import native  # noqa: E402
from qkernels import dispatch, reference, testing  # noqa: E402
from qkernels.formats import OperandFormat, QOperand, Recipe  # noqa: E402
from qkernels.numerics import NUMPY_OPS, Granularity, int_type  # noqa: E402

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=str(native.unavailable()))

DN = (((1,), (0,)), ((), ()))  # x (M, K) against a Flax-style (K, N) kernel
FAMILIES = [qk.W8A8, qk.W4A8(64), qk.W8A16, qk.W4A16(32), qk.W4A16(128, zero_point=True), qk.FP8, qk.FP8A16]


def _data(m: int, n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return testing.activations(rng, (m, k)), testing.weights(rng, (n, k))


def _expect(y, x, w, recipe, out_dtype="float32"):
    rq = reference.quantize(w, recipe.rhs)
    expected = reference.qmatmul(x, rq, recipe, out_dtype=out_dtype)
    if recipe.accumulation.integer:
        np.testing.assert_array_equal(np.asarray(y, np.float32), expected.astype(np.float32))
    else:
        testing.assert_close(np.asarray(y, np.float32), expected, *testing.float_operands(x, rq, recipe), out_dtype)


@pytest.mark.parametrize("recipe", FAMILIES, ids=lambda r: r.name)
@pytest.mark.parametrize("mode", ["jit", "eager"])
def test_chosen_and_matches_reference(recipe, mode):
    x, w = _data(3, 40, 200)
    w_q = qk.quantize(jnp.asarray(w.T), recipe, contracting_axes=(0,))
    assert qk.explain(jnp.asarray(x), w_q, DN).chosen.name == native.NAME
    f = (lambda a, b: qk.dot_general(a, b, DN))
    y = (jax.jit(f) if mode == "jit" else f)(jnp.asarray(x), w_q)
    _expect(y, x, w, recipe)


@pytest.mark.parametrize("recipe", [qk.W8A8, qk.W4A16(64), qk.FP8], ids=lambda r: r.name)
def test_vmap(recipe):
    """vmap over the activations (the weight shared) and over both (per-example weights)."""
    x, w = _data(4, 24, 96, seed=1)
    w_q = qk.quantize(jnp.asarray(w.T), recipe, contracting_axes=(0,))
    y = jax.jit(jax.vmap(lambda a: qk.dot_general(a[None], w_q, DN)[0]))(jnp.asarray(x))
    _expect(y, x, w, recipe)
    ws = np.stack([w, w[::-1]])
    wq = jax.vmap(lambda v: qk.quantize(v, recipe, contracting_axes=(0,)))(jnp.asarray(np.swapaxes(ws, 1, 2)))
    ys = jax.vmap(lambda a, b: qk.dot_general(a, b, DN))(jnp.asarray(np.stack([x, x])), wq)
    for i in range(2):  # against the codes and scales JAX's quantize stored (its scales may differ in an ulp)
        op = QOperand(*(None if a is None else np.asarray(a[i]) for a in wq.operand()))
        expected = reference.qmatmul(x, op, recipe, out_dtype="float32")
        if recipe.accumulation.integer:
            np.testing.assert_array_equal(np.asarray(ys[i]), expected)
        else:
            testing.assert_close(np.asarray(ys[i]), expected, *testing.float_operands(
                x, reference.RefQuantized(qvalue=op.qvalue, scale=op.scale, zero_point=op.zero_point, fmt=recipe.rhs,
                                          k=x.shape[-1]), recipe), "float32")


def test_batched_weights_through_dot_general():
    x, w = _data(6, 16, 64, seed=2)
    xb, wb = np.stack([x, -x]), np.stack([w, w * 0.5])
    recipe = qk.W4A8(32)
    w_q = qk.quantize(jnp.asarray(wb), recipe, contracting_axes=(2,), batch_axes=(0,))
    dims = (((2,), (2,)), ((0,), (0,)))
    assert qk.explain(jnp.asarray(xb), w_q, dims).chosen.name == native.NAME
    y = jax.jit(lambda a, b: qk.dot_general(a, b, dims))(jnp.asarray(xb), w_q)
    for i in range(2):
        _expect(y[i], xb[i], wb[i], recipe)


def test_static_recipe():
    x, w = _data(5, 12, 70, seed=3)
    recipe = qk.W8A8(static=True)
    scale = np.float32(np.abs(x).max() / 127)
    w_q = qk.quantize(jnp.asarray(w.T), recipe, contracting_axes=(0,))
    y = jax.jit(lambda a, b: qk.dot_general(a, b, DN, input_scale=scale))(jnp.asarray(x), w_q)
    rq = reference.quantize(w, recipe.rhs)
    lhs = recipe.quantize_lhs(NUMPY_OPS, x, scale)
    np.testing.assert_array_equal(np.asarray(y), reference.qmatmul(lhs, rq, recipe, out_dtype="float32"))


@pytest.mark.parametrize("recipe", [qk.W8A8, qk.W4A16(128)], ids=lambda r: r.name)
def test_grad_through_dot_general(recipe):
    """The custom_vjp's backward (straight-through) is the implementation's independent: same as `xla`'s."""
    x, w = _data(2, 8, 128, seed=4)
    w_q = qk.quantize(jnp.asarray(w.T), recipe, contracting_axes=(0,))

    def loss(a, backend):
        return jnp.sum(qk.dot_general(a, w_q, DN, backend=backend) ** 2)

    g_native = jax.jit(jax.grad(lambda a: loss(a, native.NAME)))(jnp.asarray(x))
    g_xla = jax.jit(jax.grad(lambda a: loss(a, "xla")))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g_native), np.asarray(g_xla), rtol=1e-4, atol=1e-4)


def test_nonfinite_rows_come_out_nan():
    x, w = _data(4, 8, 64, seed=5)
    x[1, 3] = np.nan
    w_q = qk.quantize(jnp.asarray(w.T), qk.W8A8, contracting_axes=(0,))
    y = np.asarray(jax.jit(lambda a, b: qk.dot_general(a, b, DN))(jnp.asarray(x), w_q))
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2, 3]]).all()


def _problem(**kw):
    base = dict(recipe=qk.W8A16, m=1, n=4096, k=4096, act_dtype="float32", out_dtype="float32", framework="jax",
                platform="cpu")
    return dispatch.Problem(**{**base, **kw})


def test_refusals_name_the_reason():
    assert native.supports(_problem()) is None
    assert "host CPU only" in native.supports(_problem(platform="tpu:v5e"))
    reason = native.supports(_problem(m=native.MAX_M_WEIGHT_ONLY + 1))
    assert "xla" in reason and f"M={native.MAX_M_WEIGHT_ONLY + 1}" in reason
    assert native.supports(_problem(recipe=qk.W8A8, m=256)) is None
    assert "float64" in native.supports(_problem(act_dtype="float64"))
    w6 = Recipe(tag="w6a16native", lhs=None, rhs=OperandFormat(qtype=int_type(6), granularity=Granularity.ROW))
    assert "no native kernel" in native.supports(_problem(recipe=w6))


def test_build_failure_is_the_reason(monkeypatch):
    monkeypatch.setattr(native, "unavailable", lambda: "native CPU kernels unavailable: no C compiler found")
    assert native.supports(_problem()) == "native CPU kernels unavailable: no C compiler found"
    ex = dispatch.explain(_problem(), verbose=True)
    assert ex.chosen.name != native.NAME
    shown = {v.implementation.name: v.reason for v in ex.verdicts}
    assert shown[native.NAME] == "native CPU kernels unavailable: no C compiler found"


def test_threads(monkeypatch):
    monkeypatch.delenv(native.THREADS_ENV, raising=False)
    assert native.threads_for(_problem(m=1, n=64, k=64)) == 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    assert native.threads_for(_problem(m=1)) == cpus  # 4096x4096: helpers on XLA's pool pay (measured)
    monkeypatch.setenv(native.THREADS_ENV, "3")
    assert native.threads_for(_problem(m=1)) == 3
    monkeypatch.setenv(native.THREADS_ENV, "zero")
    with pytest.raises(ValueError, match="QKERNELS_CPU_THREADS='zero'"):
        native.threads_for(_problem())


def test_slower_names_the_faster_recipe():
    """No silent slow path: above SLOWER_ABOVE_M rows the float accumulations are known slower than lax f32."""
    big = native.SLOWER_ABOVE_M + 1
    assert native.slower(_problem(m=native.SLOWER_ABOVE_M)) is None
    assert "float8" in native.slower(_problem(recipe=qk.FP8A16, m=1, n=576, k=576))  # small e4m3 layers
    assert native.slower(_problem(recipe=qk.FP8A16, m=1)) is None  # 4096x4096: 2x lax f32
    assert native.slower(_problem(recipe=qk.W8A8, m=256)) is None
    assert native.slower(_problem(recipe=qk.W4A8(128), m=256)) is None
    for recipe in (qk.W8A16, qk.W4A16(32), qk.FP8A16, qk.FP8):
        reason = native.slower(_problem(recipe=recipe, m=big))
        assert reason and "W8A8" in reason and "lax.dot_general f32" in reason
    ex = dispatch.explain(_problem(recipe=qk.FP8, m=big))
    assert ex.chosen.name == native.NAME and "slow:" in str(ex)
