"""The CPU paths of `xla` (jax_bindings/xla_cpu.py): the rule, and each path against the definition/reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkernels as qk
from jax_bindings import xla_cpu
from jax_bindings.arrays import JAX_OPS
from jax_bindings.qarray import quantize
from qkernels import dispatch, reference
from qkernels.formats import QOperand
from qkernels.testing import activations, assert_close, float_operands, weights

DN = (((1,), (1,)), ((), ()))  # x (M, K) . w (N, K)


def _problem(recipe, m, *, platform="cpu", act="float32", k=256, batch=None):
    return dispatch.Problem(recipe=recipe, m=m, n=64, k=k, batch=batch, act_dtype=act, out_dtype=act,
                            framework="jax", platform=platform)


@pytest.mark.parametrize("recipe, m, path", [
    pytest.param(qk.W8A8, 1, xla_cpu.Path.PADDED_ROWS, id="w8a8-M1"),
    pytest.param(qk.W8A8, 2, xla_cpu.Path.DEFINITION, id="w8a8-M2"),
    pytest.param(qk.W4A8(128), 1, xla_cpu.Path.PADDED_ROWS, id="w4a8-M1"),
    pytest.param(qk.FP8, 1, xla_cpu.Path.DEFINITION, id="fp8-M1"),
    pytest.param(qk.W8A16, 1, xla_cpu.Path.DIGITS, id="w8a16-M1"),
    pytest.param(qk.W8A16, xla_cpu.DIGIT_MAX_M, xla_cpu.Path.DIGITS, id="w8a16-Mmax"),
    pytest.param(qk.W8A16, xla_cpu.DIGIT_MAX_M + 1, xla_cpu.Path.DEFINITION, id="w8a16-Mmax+1"),
    pytest.param(qk.W4A16(128, zero_point=True), 4, xla_cpu.Path.DIGITS, id="w4a16-zp-M4"),
    pytest.param(qk.FP8A16, 1, xla_cpu.Path.DEFINITION, id="fp8a16-M1"),
])
def test_rule_on_cpu(recipe, m, path):
    assert xla_cpu.path_of(_problem(recipe, m)) is path


def test_rule_keeps_the_definition_off_cpu_and_for_narrow_activations():
    assert xla_cpu.path_of(_problem(qk.W8A8, 1, platform="cuda:sm_90")) is xla_cpu.Path.DEFINITION
    assert xla_cpu.path_of(_problem(qk.W8A16, 1, platform="tpu:v5e")) is xla_cpu.Path.DEFINITION
    assert xla_cpu.path_of(_problem(qk.W8A16, 1, act="bfloat16")) is xla_cpu.Path.DEFINITION
    assert xla_cpu.path_of(_problem(qk.W4A16(64), 0)) is xla_cpu.Path.DEFINITION  # zero-size: nothing to split


def test_explain_names_the_cpu_path():
    x = jnp.ones((1, 256), jnp.float32)
    w = quantize(jnp.ones((64, 256), jnp.float32), qk.W8A16, contracting_axes=(1,))
    text = str(qk.explain(x, w, DN))
    assert "xla" in text and xla_cpu.Path.DIGITS.value in text
    text = str(qk.explain(jnp.ones((32, 256), jnp.float32), w, DN))
    assert xla_cpu.Path.DIGITS.value not in text


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("recipe", [qk.W8A8, qk.W4A8(64)], ids=["w8a8", "w4a8-g64"])
def test_padded_rows_equal_the_definition_exactly(recipe, static):
    rng = np.random.default_rng(0)
    recipe = type(recipe)(**({"group_size": recipe.group_size} if recipe.accumulation.grouped else {}), static=static)
    k, n = 192, 48
    x = jnp.asarray(activations(rng, (1, k)))
    w = quantize(jnp.asarray(weights(rng, (n, k))), recipe, contracting_axes=(1,))
    bias = jnp.asarray(rng.standard_normal(n).astype(np.float32))
    lhs = recipe.quantize_lhs(JAX_OPS, x, jnp.float32(0.05)) if static else x
    problem = dispatch.Problem(recipe=recipe, m=1, n=n, k=k, act_dtype="int8" if static else "float32",
                               out_dtype="float32", lhs_quantized=static, framework="jax", platform="cpu")
    impl = next(i for i in dispatch.registered("jax", dispatch.Op.QMATMUL) if i.name == "xla")
    run = jax.jit(lambda a, w, b: xla_cpu.run(dispatch.Bound(problem, impl), a, w, b))
    got = np.asarray(run(lhs, w.operand(), bias))
    want = np.asarray(jax.jit(lambda a, w, b: recipe.matmul(JAX_OPS, a, w, b, k=k, batched=False,
                                                           act_dtype="float32", out_dtype="float32"))(
        lhs, w.operand(), bias))
    assert xla_cpu.path_of(problem) is xla_cpu.Path.PADDED_ROWS
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("recipe", [
    pytest.param(qk.W8A16, id="w8a16"),
    pytest.param(qk.W4A16(32), id="w4a16-g32"),
    pytest.param(qk.W4A16(64, zero_point=True), id="w4a16-g64-zp"),
])
@pytest.mark.parametrize("m, k", [(1, 256), (5, 100), (16, 130)], ids=["M1", "M5-oddK", "M16-K130"])
def test_digits_within_the_weight_only_tolerance(recipe, m, k):
    rng = np.random.default_rng(m * 1000 + k)
    n = 40
    x = activations(rng, (m, k))
    w_np = weights(rng, (n, k))
    bias = rng.standard_normal(n).astype(np.float32)
    w = quantize(jnp.asarray(w_np), recipe, contracting_axes=(1,))
    got = np.asarray(jax.jit(lambda x, w, b: qk.dot_general(x, w, DN) + b)(jnp.asarray(x), w, jnp.asarray(bias)))
    ref_w = reference.quantize(w_np, recipe.rhs)
    want = reference.qmatmul(x, ref_w, recipe) + bias
    assert "xla" in str(qk.explain(jnp.asarray(x), w, DN)) and xla_cpu.path_of(
        _problem(recipe, m, k=k)) is xla_cpu.Path.DIGITS
    assert_close(got, want, *float_operands(x, ref_w, recipe), np.float32, bias=bias)


def test_digits_batched_weight_with_bias():
    rng = np.random.default_rng(3)
    recipe = qk.W4A16(32)
    b, m, k, n = 3, 2, 64, 24
    x = activations(rng, (b, m, k))
    w_np = weights(rng, (b, n, k))
    w = quantize(jnp.asarray(w_np), recipe, contracting_axes=(2,), batch_axes=(0,))
    got = np.asarray(jax.jit(lambda x, w: qk.dot_general(x, w, (((2,), (2,)), ((0,), (0,)))))(jnp.asarray(x), w))
    ref_w = reference.quantize(w_np, recipe.rhs)
    want = reference.qmatmul(x, ref_w, recipe)
    assert_close(got, want, *float_operands(x, ref_w, recipe), np.float32)


def test_split_digits_edge_cases():
    x = np.zeros((4, 64), np.float32)
    x[1] = np.linspace(-3, 5, 64)
    x[2, 7] = -2.5  # one nonzero: its digit is -127, the rest 0
    x[3] = np.float32(1e-30) * np.arange(64)  # tiny row: the scale follows it, the split stays exact-ish
    digits, scale = (np.asarray(a) for a in xla_cpu.split_digits(jnp.asarray(x)))
    assert digits.dtype == np.int8 and digits.shape == (3, 4, 64)
    assert scale[0] == 1 and not digits[:, 0].any()
    assert digits[0, 2, 7] == -127 and np.count_nonzero(digits[:, 2]) == 1
    recon = (digits[0] + digits[1] / 254.0 + digits[2] / 254.0 ** 2) * scale[:, None].astype(np.float64)
    amax = np.abs(x).max(-1, keepdims=True)
    # the last digit's truncation, plus the f32 roundings of x / s and of the residuals times B
    assert np.all(np.abs(recon - x) <= amax * (1 / (2 * 127 * 254 ** 2) + 2.0 ** -23) + 1e-45)


def test_digits_nonfinite_row_gives_nonfinite_output_row():
    rng = np.random.default_rng(4)
    x = activations(rng, (3, 64))
    x[1, 5] = np.nan
    w = quantize(jnp.asarray(weights(rng, (16, 64))), qk.W8A16, contracting_axes=(1,))
    y = np.asarray(jax.jit(lambda x, w: qk.dot_general(x, w, DN))(jnp.asarray(x), w))
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


def test_padded_rows_accept_a_quantized_operand_shape():
    q = QOperand(jnp.ones((2, 1, 8), jnp.int8), jnp.full((2, 1), 0.5, jnp.float32))
    padded = xla_cpu._pad_rows(q)
    assert padded.qvalue.shape == (2, 2, 8) and padded.scale.shape == (2, 2)
    assert float(padded.scale[0, 1]) == 1.0 and not np.asarray(padded.qvalue[:, 1]).any()


@pytest.mark.parametrize("recipe, m, slow", [
    pytest.param(qk.W8A8, 1, False, id="w8a8-M1"),
    pytest.param(qk.W8A16, 16, False, id="w8a16-M16"),
    pytest.param(qk.W8A16, 256, True, id="w8a16-M256"),
    pytest.param(qk.W4A16(128), 1, True, id="w4a16-M1"),
    pytest.param(qk.W4A8(128), 256, True, id="w4a8-M256"),
    pytest.param(qk.FP8, 1, True, id="fp8-M1"),
    pytest.param(qk.FP8A16, 16, True, id="fp8a16-M16"),
])
def test_known_slow_paths_are_named(recipe, m, slow):
    note = xla_cpu.slower_than_float(_problem(recipe, m))
    assert (note is not None) == slow
    if slow:
        assert "slower than lax.dot_general f32" in note and "faster here" in note and xla_cpu.RESULTS in note
    assert xla_cpu.slower_than_float(_problem(recipe, m, platform="tpu:v5e")) is None


def test_a_known_slow_call_warns_and_explain_says_so():
    x = jnp.ones((3, 256), jnp.float32)
    w = quantize(jnp.ones((64, 256), jnp.float32), qk.FP8A16, contracting_axes=(1,))
    assert "slower than lax.dot_general f32" in str(qk.explain(x, w, DN, backend="xla"))
    with pytest.warns(qk.SlowPathWarning, match="fp8a16 .* runs xla, which is slower than lax.dot_general f32 on CPU"):
        jax.jit(lambda x, w: qk.dot_general(x, w, DN, backend="xla")).lower(x, w)
