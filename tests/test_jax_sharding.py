"""Sharded inputs under jit (8 host CPU devices from conftest): data-, column-, row-parallel."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qkernels as qk
from qkernels import reference
from qkernels.testing import activations, assert_close, weights

DIMS = (((1,), (0,)), ((), ()))
RECIPES = [pytest.param(qk.W8A8(), id="w8a8"), pytest.param(qk.W4A16(32), id="w4a16-g32")]
LAYOUTS = [  # (activation spec, weight spec over the canonical (N, K_stored) storage)
    pytest.param(P("d", None), P(None, None), id="data-parallel"),
    pytest.param(P(None, None), P("d", None), id="column-parallel"),
    pytest.param(P(None, "d"), P(None, "d"), id="row-parallel"),
]


def _mesh() -> jax.sharding.Mesh:
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by conftest)")
    return jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))  # GSPMD propagation


def _case(recipe):
    rng = np.random.default_rng(0)
    x, w = activations(rng, (32, 256)), weights(rng, (256, 64))
    return x, qk.quantize(jnp.asarray(w), recipe, contracting_axes=(0,))


def _shard(w_q, spec, mesh):
    row_spec = P(spec[0]) if w_q.scale.ndim == 1 else P(spec[0], None)
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    return jax.tree_util.tree_map(lambda a: put(a, spec if a.shape == w_q.qvalue.shape else row_spec), w_q)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("x_spec,w_spec", LAYOUTS)
def test_sharded_layouts_equal_unsharded(x_spec, w_spec, recipe):
    mesh = _mesh()
    x, w_q = _case(recipe)
    f = jax.jit(lambda x, w: qk.dot_general(x, w, DIMS))
    unsharded = f(jnp.asarray(x), w_q)
    out = f(jax.device_put(jnp.asarray(x), NamedSharding(mesh, x_spec)), _shard(w_q, w_spec, mesh))
    x_deq = x if recipe.lhs is None else reference.quantize(x, recipe.lhs).dequantize()
    assert_close(out, unsharded, x_deq, np.asarray(w_q.dequantize()).T, np.float32)


def test_column_parallel_hlo_has_no_all_gather_of_the_weight():
    mesh = _mesh()
    x, w_q = _case(qk.W8A8())
    w_sharded = _shard(w_q, P("d", None), mesh)
    hlo = jax.jit(lambda x, w: qk.dot_general(x, w, DIMS)).lower(jnp.asarray(x), w_sharded).compile().as_text()
    gathers = re.findall(r"all-gather[^\n]*", hlo)
    weight_gathers = [g for g in gathers if "s8[" in g or "64,256" in g]
    assert not weight_gathers, weight_gathers


def test_inside_user_shard_map():
    mesh = _mesh()
    x, w_q = _case(qk.W8A8())

    def local(x, w):
        return qk.dot_general(x, w, DIMS)

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d", None), P()), out_specs=P("d", None)))
    out = f(jnp.asarray(x), w_q)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(local(jnp.asarray(x), w_q)))
