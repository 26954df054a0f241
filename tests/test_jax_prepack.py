"""`qk.prepack`: the Pallas TPU kernels' scale layouts made once on the QArray (interpret mode on CPU)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import qkernels as qk
from qkernels.kernels.pallas import configs, ops
from qkernels.kernels.pallas.layout import Prepacked, ScaleOrder
from qkernels.testing import activations, weights

DN = (((1,), (1,)), ((), ()))
INTERPRET = "pallas.interpret"
INT4 = [pytest.param(qk.W4A16(128), id="w4a16-g128"), pytest.param(qk.W4A16(64, zero_point=True), id="w4a16-g64-zp"),
        pytest.param(qk.W4A8(128), id="w4a8-g128")]


def _weight(recipe, n=256, k=512, seed=0):
    rng = np.random.default_rng(seed)
    return quantized(recipe, weights(rng, (n, k))), jnp.asarray(activations(rng, (2, k)))


def quantized(recipe, w):
    return qk.quantize(jnp.asarray(w), recipe, contracting_axes=(1,))


def _poisoned(w: qk.QArray) -> qk.QArray:
    """The canonical scales (and zero points) replaced by NaN: a call that reads them gives NaN."""
    nan = jnp.full_like(w.scale, jnp.nan)
    return dataclasses.replace(w, scale=nan, zero_point=None if w.zero_point is None else nan.astype(jnp.int8) * 0 + 99)


@pytest.mark.parametrize("recipe", INT4)
def test_prepack_makes_one_form_per_table_layout(recipe):
    w, _ = _weight(recipe)
    packed = qk.prepack(w, target="interpret").packed
    family = ops.family_of(recipe)
    want = {ops.tpu.scale_layout(c, w.n, recipe.rhs.stored_k(w.k), recipe.group_size,
                                 lhs_int=recipe.lhs is not None) for c in configs.tpu_configs("v5e", family)}
    assert {p.layout for p in packed} == want and len(packed) == len(want)
    order = ScaleOrder.GROUP_MAJOR if recipe.lhs is not None else ScaleOrder.CHANNEL_MAJOR
    assert all(p.layout.order is order for p in packed)
    for p in packed:
        np.testing.assert_array_equal(np.asarray(p.scale), np.asarray(p.layout.apply(w.scale[None])))
        assert (p.zero_point is None) == (w.zero_point is None)


@pytest.mark.parametrize("recipe", INT4)
def test_prepacked_call_reads_the_packed_leaves_and_matches_the_canonical_call(recipe):
    w, x = _weight(recipe)
    pre = qk.prepack(w, target="interpret")
    f = jax.jit(lambda x, w: qk.dot_general(x, w, DN, backend=INTERPRET))
    want = np.asarray(f(x, w))
    np.testing.assert_array_equal(np.asarray(f(x, pre)), want)
    # with NaN canonical scales, the prepacked call is unchanged: it never relays the canonical ones out
    np.testing.assert_array_equal(np.asarray(f(x, _poisoned(pre))), want)
    assert np.isnan(np.asarray(f(x, _poisoned(w)))).all()


def test_a_config_without_a_prepacked_layout_relays_the_canonical_scales():
    recipe = qk.W4A8(128)
    w, x = _weight(recipe, k=2048)  # K above both blocks, so each config has its own K block
    pre = qk.prepack(w, target="interpret", configs=[configs.TileConfig(block_m=32, block_n=256, block_k=1024)])
    other = configs.TileConfig(block_m=32, block_n=256, block_k=512)  # another K block: another layout
    run = lambda w, cfg: np.asarray(ops.qmatmul(x, w.operand(), recipe, target=ops.Target.INTERPRET, config=cfg))  # noqa: E731
    want = run(w, other)
    np.testing.assert_array_equal(run(pre, other), want)
    assert np.isnan(run(_poisoned(pre), other)).all()
    np.testing.assert_array_equal(run(_poisoned(pre), configs.TileConfig(block_m=32, block_n=256, block_k=1024)),
                                  want)


def test_explain_names_the_scale_layout():
    recipe = qk.W4A16(128)
    w, x = _weight(recipe)
    before = str(qk.explain(x, w, DN, backend=INTERPRET))
    after = str(qk.explain(x, qk.prepack(w, target="interpret"), DN, backend=INTERPRET))
    layout = ops.scale_layout(recipe, ops.Target.INTERPRET, None, m=2, n=w.n, k=w.k)
    assert f"layout: scales relaid out per call to {layout.name}" in before and "qk.prepack" in before
    assert f"layout: scales prepacked {layout.name}" in after
    w8 = quantized(qk.W8A8, np.ones((256, 512), np.float32))
    assert "layout: scales canonical" in str(qk.explain(x, qk.prepack(w8, target="interpret"), DN, backend=INTERPRET))
    assert "layout:" not in str(qk.explain(x, w, DN))  # xla reads canonical scales: nothing to say


def test_recipes_without_a_relayout_are_returned_unchanged():
    for recipe in (qk.W8A8, qk.W8A16, qk.FP8):
        w = quantized(recipe, np.ones((128, 256), np.float32))
        assert qk.prepack(w, target="v5e").packed == ()


def test_prepack_walks_a_params_tree_and_leaves_other_leaves():
    w, _ = _weight(qk.W4A8(128), k=2048)
    params = {"dense": {"kernel": w, "bias": jnp.ones(256)}, "step": 3}
    out = qk.prepack(params, target="v6e")
    assert out["step"] == 3 and out["dense"]["bias"] is params["dense"]["bias"]
    assert out["dense"]["kernel"].packed and {p.layout.block_k for p in out["dense"]["kernel"].packed} == {
        c.block_k for c in configs.tpu_configs("v6e", configs.Family.W4A8)}


def test_serialized_form_stays_canonical():
    w, _ = _weight(qk.W4A16(64, zero_point=True))
    pre = qk.prepack(w, target="interpret")
    state, canonical = serialization.to_state_dict(pre), serialization.to_state_dict(w)
    assert state.keys() == canonical.keys()
    for key in state:
        np.testing.assert_array_equal(np.asarray(state[key]), np.asarray(canonical[key]))
    restored = serialization.from_state_dict(pre, state)
    assert restored.packed == () and np.array_equal(np.asarray(restored.scale), np.asarray(w.scale))


def test_storage_specs_replicate_the_packed_leaves():
    pre = qk.prepack(_weight(qk.W4A8(128))[0], target="interpret")
    specs = pre.storage_specs(P("data", None))
    assert jax.tree_util.tree_structure(specs.packed, is_leaf=lambda x: isinstance(x, P)) is not None
    assert all(s == P() for s in jax.tree_util.tree_leaves(specs.packed, is_leaf=lambda x: isinstance(x, P)))
    assert all(isinstance(p, Prepacked) for p in specs.packed)


def test_prepack_errors_say_what_to_pass():
    w, _ = _weight(qk.W4A16(128))
    with pytest.raises(ValueError, match="target="):
        qk.prepack(w)  # this process runs on CPU: the TPU generation must be named
    with pytest.raises(ValueError, match="no prepacked layout for backend 'triton'"):
        qk.prepack(w, backend="triton", target="v5e")
    with pytest.raises(ValueError, match="not a Pallas TPU target"):
        qk.prepack(w, target="v4")
    with pytest.raises(ValueError, match="canonical scales"):
        qk.prepack(w, target="gpu")


def _placed(w: qk.QArray, spec: Any, mesh: Any) -> qk.QArray:
    specs = w.storage_specs(spec)
    return jax.tree_util.tree_map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), w, specs,
                                  is_leaf=lambda x: isinstance(x, P))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_prepacked_weight_on_a_mesh(axis_type):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by conftest)")
    mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
    recipe = qk.W4A8(128)
    w, x = _weight(recipe, n=1024)
    pre = qk.prepack(w, target="interpret")
    f = jax.jit(lambda x, w: qk.dot_general(x, w, DN, backend=INTERPRET))
    want = np.asarray(f(x, w))
    x_rep = jax.device_put(x, NamedSharding(mesh, P()))
    # replicated weight on the mesh: the partitioned op hands the prepacked leaves to the kernel
    np.testing.assert_array_equal(np.asarray(f(x_rep, _placed(_poisoned(pre), None, mesh))), want)
    # column-parallel weight: each shard's layout differs from the prepacked one; it relays its own scales
    out = f(x_rep, _placed(pre, P("d", None), mesh))
    np.testing.assert_array_equal(np.asarray(out), want)  # a config never changes numerics
