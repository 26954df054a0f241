"""Recipes as values: uniform forms, names, hashing across processes, user-defined recipes, bound-call caching."""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys

import numpy as np
import pytest

import qkernels as qk
from qkernels import dispatch, formats
from qkernels.formats import Accumulation

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None


def test_shipped_recipes_are_values_with_names():
    assert isinstance(qk.W8A8, qk.Recipe) and isinstance(qk.W8A16, qk.Recipe)
    assert isinstance(qk.W4A16(128), qk.Recipe) and isinstance(qk.W4A8(32), qk.Recipe)
    assert (qk.W8A8.name, qk.W8A16.name, qk.W4A16(128).name, qk.W4A8(32).name) == (
        "w8a8", "w8a16", "w4a16-g128", "w4a8-g32")
    assert qk.W4A16(64, zero_point=True).name == "w4a16-g64-zp"
    assert qk.W8A8() is qk.W8A8  # calling a recipe with no changes is the recipe
    assert qk.W8A8(quantized_backward=True).name == "w8a8-qbwd"
    assert qk.resolve_recipe(qk.W4A16) == qk.W4A16(128)  # a class stands for its default value
    assert qk.resolve_recipe("w4a8-g64") == qk.W4A8(64)
    assert [r.name for r in qk.RECIPES] == ["w8a8", "w8a16", "w4a16-g128", "w4a8-g128", "fp8", "fp8a16"]


def test_accumulations_are_derived_from_the_formats():
    assert qk.W8A8.accumulation is Accumulation.INT32
    assert qk.W4A8(32).accumulation is Accumulation.INT32_PER_GROUP
    assert qk.W8A16.accumulation is Accumulation.FLOAT and qk.W4A16(32).accumulation is Accumulation.FLOAT
    assert qk.W8A8.max_k == 133_144 and qk.W4A16(32).max_k is None


def test_recipes_pickle_and_hash_across_processes():
    """The hash is cached per process (string hashes are salted): an unpickled recipe rebuilds it."""
    recipes = [qk.W8A8, qk.W4A16(32, zero_point=True), qk.W4A8(64)]
    back = pickle.loads(pickle.dumps(recipes))
    assert back == recipes and [hash(r) for r in back] == [hash(r) for r in recipes]
    assert back[0].accumulation is Accumulation.INT32
    script = ("import pickle, sys, qkernels as qk; r = pickle.loads(sys.stdin.buffer.read()); "
              "print({qk.W8A8: 'a', qk.W4A16(32, zero_point=True): 'b', qk.W4A8(64): 'c'}[r[0]] + "
              "{qk.W8A8: 'a', qk.W4A16(32, zero_point=True): 'b', qk.W4A8(64): 'c'}[r[1]] + "
              "{qk.W8A8: 'a', qk.W4A16(32, zero_point=True): 'b', qk.W4A8(64): 'c'}[r[2]])")
    out = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(recipes), capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == "abc"


def test_user_recipe_is_known_by_name_and_a_clashing_name_is_refused():
    fmt = qk.OperandFormat(qtype=qk.int_type(5), granularity=qk.Granularity.ROW)
    w5 = qk.Recipe(tag="w5a16test", lhs=None, rhs=fmt)
    assert qk.recipe_named("w5a16test") is w5
    assert qk.Recipe(tag="w5a16test", lhs=None, rhs=fmt) == w5  # the same value again is fine
    other = qk.OperandFormat(qtype=qk.int_type(3), granularity=qk.Granularity.ROW)
    with pytest.raises(ValueError, match="already named 'w5a16test'"):
        qk.Recipe(tag="w5a16test", lhs=None, rhs=other)
    with pytest.raises(ValueError, match="lower-case letters and digits"):
        qk.Recipe(tag="W5-A16", lhs=None, rhs=fmt)


def test_a_recipe_without_a_derivable_accumulation_must_name_one():
    fp8 = qk.OperandFormat(qtype=formats.numerics.FP8_E4M3, granularity=qk.Granularity.ROW)
    int8 = qk.OperandFormat(qtype=formats.numerics.INT8, granularity=qk.Granularity.ROW)
    with pytest.raises(ValueError, match="pass accumulation= explicitly"):
        qk.Recipe(tag="fp8int8test", lhs=fp8, rhs=int8)  # mixed float x integer codes


def test_fp8_weight_only_format_runs_on_the_reference():
    """A float storage type fits the same definitions: fp8 e4m3 weights, weight-only (accumulation FLOAT)."""
    from qkernels import reference

    fmt = qk.OperandFormat(qtype=formats.numerics.FP8_E4M3, granularity=qk.Granularity.ROW)
    recipe = qk.Recipe(tag="f8a16test", lhs=None, rhs=fmt)
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((7, 40)).astype(np.float32), rng.standard_normal((3, 40)).astype(np.float32)
    wq = reference.quantize(w, fmt)
    assert wq.qvalue.dtype.name == "float8_e4m3fn" and np.abs(wq.qvalue.astype(np.float32)).max() == 448
    deq = wq.dequantize()
    assert np.abs(deq - w).max() <= np.abs(w).max() * 2**-3  # e4m3 has 3 mantissa bits
    np.testing.assert_allclose(reference.qmatmul(x, wq, recipe), x @ deq.T, rtol=1e-5, atol=1e-5)


def test_repeated_linear_calls_reuse_the_bound_call(monkeypatch):
    """One bind per distinct call: a repeated call builds no Problem and selects nothing again."""
    torch = pytest.importorskip("torch")
    from torch_bindings import ops

    w = qk.quantize(torch.randn(24, 40), qk.W4A16(32))
    x = torch.randn(3, 40)
    qk.linear(x, w)  # binds
    built = []
    real_problem = ops.Problem
    monkeypatch.setattr(ops, "Problem", lambda **kw: built.append(kw) or real_problem(**kw))
    chosen = []
    real_choose = dispatch._choose
    monkeypatch.setattr(dispatch, "_choose", lambda *a: chosen.append(a) or real_choose(*a))
    for _ in range(5):
        qk.linear(x, w)
    assert built == [] and chosen == []
    qk.linear(torch.randn(4, 40), w)  # another shape binds once
    assert len(built) == 1


def test_the_custom_op_holds_hand_made_operands_to_the_format():
    """`torch.ops.qkernels.linear` called directly (not through a QTensor) checks scales, zero points, dtypes."""
    torch = pytest.importorskip("torch")
    from torch_bindings import LINEAR

    w = qk.quantize(torch.randn(8, 64), qk.W4A16(32))
    x = torch.randn(2, 64)
    zero = torch.zeros(8, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"scale is \(8,\) torch.float32; w4a16-g32 needs \(8, 2\)"):
        LINEAR(x, w.qvalue, w.scale[:, 0], None, None, "w4a16-g32")
    with pytest.raises(ValueError, match="zero_point is .*needs None"):
        LINEAR(x, w.qvalue, w.scale, zero, None, "w4a16-g32")
    with pytest.raises(ValueError, match=r"zero_point is None; w4a16-g32-zp needs \(8, 2\) torch.int8"):
        LINEAR(x, w.qvalue, w.scale, None, None, "w4a16-g32-zp")
    with pytest.raises(TypeError, match="codes are stored as int8"):
        LINEAR(x, w.qvalue.to(torch.int32), w.scale, None, None, "w4a16-g32")
    with pytest.raises(ValueError, match="scale is .*float64"):
        LINEAR(x, w.qvalue, w.scale.double(), None, None, "w4a16-g32")
    torch.testing.assert_close(LINEAR(x, w.qvalue, w.scale, None, None, "w4a16-g32"), qk.linear(x, w))


@pytest.mark.parametrize("make, message", [
    pytest.param(lambda: qk.W4A16(128.0), r"group_size=128.0 \(float\) must be an integer", id="float-group"),
    pytest.param(lambda: qk.W4A8("64"), r"group_size='64' \(str\) must be an integer", id="str-group"),
    pytest.param(lambda: qk.W4A16(128, zero_point=1), r"zero_point=1 \(int\) must be True or False", id="int-flag"),
    pytest.param(lambda: qk.W8A8(quantized_backward="yes"), "quantized_backward='yes'", id="str-flag"),
    pytest.param(lambda: qk.OperandFormat(qtype=qk.int_type(4), granularity=qk.Granularity.GROUP, group_size=32.5),
                 "must be an integer", id="format-group"),
])
def test_wrong_types_are_refused_at_construction(make, message):
    with pytest.raises(TypeError, match=message):
        make()


def test_integer_like_group_sizes_are_normalized():
    r = qk.W4A16(np.int64(64))
    assert type(r.group_size) is int and r == qk.W4A16(64) and hash(r) == hash(qk.W4A16(64)) and r.name == "w4a16-g64"


def test_a_group_whose_range_overflows_f32_is_refused_in_every_port():
    """max - min of finite values can overflow to inf: the scale would be inf and every output NaN."""
    w = np.zeros((4, 64), np.float32)
    w[1, 0], w[1, 1] = 3e38, -3e38
    recipe = qk.W4A16(32, zero_point=True)
    ports = [lambda: qk.quantize(w, recipe)]
    if HAS_TORCH:
        import torch
        ports.append(lambda: qk.quantize(torch.from_numpy(w), recipe))
    if HAS_JAX:
        import jax.numpy as jnp
        ports.append(lambda: qk.quantize(jnp.asarray(w.T), recipe, contracting_axes=(0,)))
    for port in ports:
        with pytest.raises(ValueError, match=r"weight: NaN/Inf in 1 row\(s\) or group\(s\), or a group whose range"):
            port()
    symmetric = qk.quantize(w, qk.W4A16(32))  # absmax / 7 stays finite: served
    assert np.isfinite(symmetric.scale).all()


@pytest.mark.parametrize("recipe", [qk.W8A8, qk.W4A16(32), qk.W4A16(32, zero_point=True), qk.W4A8(32)],
                         ids=lambda r: r.name)
def test_subnormal_amax_gives_the_references_scale_and_codes_in_every_port(recipe):
    """amax / qmax underflows to 0 for a subnormal amax: the rule 'scale 1 when the computed scale is 0'
    is applied to the scale, identically in NumPy, torch and jnp."""
    from qkernels import reference

    w = np.array([[1e-45, -1e-45, 0.0, 3e-45] * 16, [0.0] * 64, [2e-39, -5e-41] * 32], np.float32)
    ref = reference.quantize(w, recipe.rhs)
    assert (ref.scale[0] == 1).all()
    got = []
    if HAS_TORCH:
        import torch
        t = qk.quantize(torch.from_numpy(w), recipe)
        got.append((t.qvalue.numpy(), t.scale.numpy(), None if t.zero_point is None else t.zero_point.numpy()))
    if HAS_JAX:
        import jax.numpy as jnp
        j = qk.quantize(jnp.asarray(w.T), recipe, contracting_axes=(0,))
        got.append(tuple(None if a is None else np.asarray(a) for a in (j.qvalue, j.scale, j.zero_point)))
    for q, s, z in got:
        np.testing.assert_array_equal(q, ref.qvalue)
        np.testing.assert_array_equal(s, ref.scale)
        if z is not None:
            np.testing.assert_array_equal(z, ref.zero_point)
