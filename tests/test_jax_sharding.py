"""Sharded inputs under jit (8 host CPU devices from conftest): data-, column-, row-parallel.

Every layout runs on the 'xla' implementation (GSPMD partitions it), on the Pallas kernels in
interpret mode (custom_partitioning under Auto axes, shard_map under Explicit ones) and on the
host-callback reference (per shard under Explicit axes and in shard_map; once, on gathered
operands, under Auto axes: jax cannot lower a host callback inside custom_partitioning).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import qkernels as qk
from jax_bindings import sharding
from qkernels import dispatch, reference
from qkernels.formats import QOperand
from qkernels.testing import activations, assert_close, weights

DIMS = (((1,), (0,)), ((), ()))
RECIPES = [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A16(32), id="w4a16-g32"),
           pytest.param(qk.W4A8(32), id="w4a8-g32")]
LAYOUTS = [  # (activation spec, weight spec over the canonical (N, K_stored) storage)
    pytest.param(P("d", None), P(None, None), id="data-parallel"),
    pytest.param(P(None, None), P("d", None), id="column-parallel"),
    pytest.param(P(None, "d"), P(None, "d"), id="row-parallel"),
]
AXIS_TYPES = [pytest.param(AxisType.Auto, id="auto"), pytest.param(AxisType.Explicit, id="explicit")]
BACKENDS = [pytest.param("xla", id="xla"), pytest.param("reference.callback", id="callback"),
            pytest.param("pallas.interpret", id="pallas"), pytest.param("xla-native", id="native")]
COLLECTIVES = ("all-gather", "all-gather-start", "all-to-all", "collective-permute", "collective-permute-start",
               "all-reduce", "all-reduce-start", "reduce-scatter")


def _mesh(axis_type=AxisType.Auto, shape=(8,), names=("d",)) -> jax.sharding.Mesh:
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by conftest)")
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def _case(recipe):
    rng = np.random.default_rng(0)
    x, w = activations(rng, (32, 256)), weights(rng, (256, 64))
    return x, qk.quantize(jnp.asarray(w), recipe, contracting_axes=(0,))


def _shard(w_q, spec, mesh):
    row_spec = P(spec[0]) if w_q.scale.ndim == 1 else P(spec[0], None)
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    return jax.tree_util.tree_map(lambda a: put(a, spec if a.shape == w_q.qvalue.shape else row_spec), w_q)


def _assert_matches(out, unsharded, x, w_q, recipe):
    if recipe.accumulation.integer and not recipe.accumulation.grouped:  # int32 partials summed exactly, rescaled once
        np.testing.assert_array_equal(np.asarray(out), np.asarray(unsharded))
        return
    x_deq = x if recipe.lhs is None else reference.quantize(x, recipe.lhs).dequantize()
    assert_close(out, unsharded, x_deq, np.asarray(w_q.dequantize()).T, np.float32)


def _hlo_shapes(hlo: str) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Instruction name -> the (dtype, dims) of its result (several for a tuple)."""
    shapes = {}
    for name, type_ in re.findall(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\(.*?\)|\w+\[[\d,]*\])", hlo, re.M):
        arrays = re.findall(r"(\w+)\[([\d,]*)\]", type_)
        shapes[name] = [(dtype, tuple(int(s) for s in dims.split(",") if s)) for dtype, dims in arrays]
    return shapes


def _collectives_moving(hlo: str, arrays) -> list[str]:
    """Collective ops whose operand or result has the dtype and the global or per-shard shape of one of
    `arrays` (the weight's leaves), read from the compiled HLO text."""
    targets = set()
    for a in arrays:
        dtype = {"int8": "s8", "float32": "f32"}[a.dtype.name]
        targets.add((dtype, tuple(a.shape)))
        targets.add((dtype, tuple(a.sharding.shard_shape(a.shape))))
    shapes = _hlo_shapes(hlo)
    found = []
    pattern = rf"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*? ({'|'.join(COLLECTIVES)})\(([^)]*)\)"
    for line in re.finditer(pattern, hlo, re.M):
        name, _, operands = line.groups()
        moved = set(shapes.get(name, []))
        for operand in re.findall(r"%?([\w.\-]+)", operands):
            moved |= set(shapes.get(operand, []))
        if moved & targets:
            found.append(line.group(0).strip())
    return found


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("x_spec,w_spec", LAYOUTS)
def test_sharded_layouts_equal_unsharded(x_spec, w_spec, recipe, axis_type, backend):
    mesh = _mesh(axis_type)
    x, w_q = _case(recipe)
    f = jax.jit(lambda x, w: qk.dot_general(x, w, DIMS))
    with qk.use_backend(backend):
        unsharded = f(jnp.asarray(x), w_q)
        out = f(jax.device_put(jnp.asarray(x), NamedSharding(mesh, x_spec)), _shard(w_q, w_spec, mesh))
    _assert_matches(out, unsharded, x, w_q, recipe)


@pytest.mark.parametrize("backend,axis_type", [
    pytest.param("xla", AxisType.Auto, id="xla-auto"),
    pytest.param("xla", AxisType.Explicit, id="xla-explicit"),
    pytest.param("pallas.interpret", AxisType.Auto, id="pallas-auto"),
    pytest.param("pallas.interpret", AxisType.Explicit, id="pallas-explicit"),
    pytest.param("reference.callback", AxisType.Explicit, id="callback-explicit"),
])
@pytest.mark.parametrize("recipe", [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A16(32), id="w4a16-g32")])
def test_column_parallel_hlo_moves_no_weight(recipe, backend, axis_type):
    mesh = _mesh(axis_type)
    x, w_q = _case(recipe)
    w_sharded = _shard(w_q, P("d", None), mesh)
    f = jax.jit(lambda x, w: qk.dot_general(x, w, DIMS))
    with qk.use_backend(backend):
        hlo = f.lower(jnp.asarray(x), w_sharded).compile().as_text()
    assert not _collectives_moving(hlo, jax.tree_util.tree_leaves(w_sharded))


def test_hlo_check_sees_a_weight_gather():
    """The check above is not vacuous: the host callback under Auto axes gathers the weight."""
    mesh = _mesh()
    x, w_q = _case(qk.W8A8)
    w_sharded = _shard(w_q, P("d", None), mesh)
    with qk.use_backend("reference.callback"):
        hlo = jax.jit(lambda x, w: qk.dot_general(x, w, DIMS)).lower(jnp.asarray(x), w_sharded).compile().as_text()
    moved = _collectives_moving(hlo, jax.tree_util.tree_leaves(w_sharded))
    assert moved and all("all-gather" in m for m in moved), moved


def _row_parallel_hlo(recipe, axis_type) -> tuple[str, list[tuple[str, str]]]:
    """The compiled program of a K-split call (Pallas interpreter) and its all-reduces as (dtype, shape)."""
    mesh = _mesh(axis_type)
    x, w_q = _case(recipe)
    f = jax.jit(lambda x, w: qk.dot_general(x, w, DIMS))
    with qk.use_backend("pallas.interpret"):
        hlo = f.lower(jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(None, "d"))),
                      _shard(w_q, P(None, "d"), mesh)).compile().as_text()
    return hlo, re.findall(r"= (\w+)\[([\d,]*)\][^\n]* all-reduce(?:-start)?\(", hlo)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_row_parallel_w8a8_all_reduces_int32_accumulators(axis_type):
    hlo, reduces = _row_parallel_hlo(qk.W8A8, axis_type)
    assert ("s32", "32,64") in reduces, reduces  # the accumulators, once
    assert ("f32", "32") in reduces, reduces  # the activations' row absmax (global scale)
    assert not re.search(r"all-gather", hlo)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_row_parallel_fp8_quantizes_with_the_global_row_scale(axis_type, backend):
    """K split 8 ways: each shard's activations carry outlier channels or none (`testing.activations`),
    so a per-shard row scale would change codes by whole fp8 steps, far outside the f32
    summation-order bound this holds to."""
    mesh = _mesh(axis_type)
    recipe = qk.FP8
    x, w_q = _case(recipe)
    f = jax.jit(lambda x, w: qk.dot_general(x, w, DIMS))
    with qk.use_backend(backend):
        unsharded = f(jnp.asarray(x), w_q)
        out = f(jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(None, "d"))), _shard(w_q, P(None, "d"), mesh))
        layout = sharding.choose_layout(dispatch.select(_problem(recipe), backend), _problem(recipe),
                                        [(), ("d",)], [(), ("d",)], {"d": 8})
    assert layout.k == ("d",), layout.notes
    _assert_matches(out, unsharded, x, w_q, recipe)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_row_parallel_fp8_all_reduces_the_row_absmax_and_f32_accumulators(axis_type):
    hlo, reduces = _row_parallel_hlo(qk.FP8, axis_type)
    assert ("f32", "32,64") in reduces, reduces  # the f32 accumulators, once
    assert ("f32", "32") in reduces, reduces  # the activations' row absmax (global scale)
    assert not re.search(r"all-gather", hlo)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("backend", ["xla", "pallas.interpret"])
def test_out_sharding_is_honoured(backend, axis_type):
    mesh = _mesh(axis_type)
    x, w_q = _case(qk.W8A8)
    wanted = NamedSharding(mesh, P("d", None))  # row-parallel: the partial sums come out replicated
    f = jax.jit(lambda x, w: qk.dot_general(x, w, DIMS, out_sharding=wanted))
    with qk.use_backend(backend):
        unsharded = jax.jit(lambda x, w: qk.dot_general(x, w, DIMS))(jnp.asarray(x), w_q)
        out = f(jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(None, "d"))), _shard(w_q, P(None, "d"), mesh))
    assert out.sharding.is_equivalent_to(wanted, out.ndim)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(unsharded))


def test_einsum_out_sharding_follows_the_output_order():
    mesh = _mesh(AxisType.Explicit)
    x = jax.device_put(jnp.asarray(activations(np.random.default_rng(9), (8, 64))), NamedSharding(mesh, P("d", None)))
    w = jnp.asarray(weights(np.random.default_rng(10), (16, 64)))
    op = qk.make_einsum(qk.W8A8)
    wanted = NamedSharding(mesh, P("d", None))  # over n, the kernel's free axis, while x is split over b
    out = jax.jit(lambda x, w: op("bk,nk->nb", x, w, out_sharding=wanted))(x, w)
    assert out.shape == (16, 8) and out.sharding.is_equivalent_to(wanted, 2)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(op("bk,nk->nb", np.asarray(x), w)))


def test_two_axis_mesh_data_and_row_parallel():
    mesh = _mesh(shape=(2, 4), names=("data", "model"))
    x, w_q = _case(qk.W8A8)
    f = jax.jit(lambda x, w: qk.dot_general(x, w, DIMS))
    with qk.use_backend("pallas.interpret"):
        unsharded = f(jnp.asarray(x), w_q)
        x_sharded = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data", "model")))
        w_sharded = jax.tree_util.tree_map(
            lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "model") if a.ndim == 2 else P())), w_q)
        out = f(x_sharded, w_sharded)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(unsharded))
    assert out.sharding.spec[0] == "data"


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_batched_weight_sharded_over_batch(axis_type):
    mesh = _mesh(axis_type)
    rng = np.random.default_rng(3)
    x, w = jnp.asarray(activations(rng, (8, 16, 128))), jnp.asarray(weights(rng, (8, 128, 32)))
    w_q = qk.quantize(w, qk.W8A8, contracting_axes=(1,), batch_axes=(0,))
    dims = (((2,), (1,)), ((0,), (0,)))
    f = jax.jit(lambda x, w: qk.dot_general(x, w, dims))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("d")))  # noqa: E731
    with qk.use_backend("pallas.interpret"):
        unsharded = f(x, w_q)
        out = f(put(x), jax.tree_util.tree_map(put, w_q))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(unsharded))


def test_vmap_keeps_a_shared_weight_partitioned():
    mesh = _mesh()
    x, w_q = _case(qk.W8A8)
    w_sharded = _shard(w_q, P("d", None), mesh)
    f = jax.jit(jax.vmap(lambda xi, w: qk.dot_general(xi, w, DIMS), in_axes=(0, None)))
    xs = jnp.asarray(x).reshape(4, 8, 256)
    with qk.use_backend("pallas.interpret"):
        out = f(xs, w_sharded)
        hlo = f.lower(xs, w_sharded).compile().as_text()
        unsharded = jax.jit(lambda x, w: qk.dot_general(x, w, DIMS))(jnp.asarray(x), w_q)
    np.testing.assert_array_equal(np.asarray(out).reshape(32, 64), np.asarray(unsharded))
    assert not _collectives_moving(hlo, jax.tree_util.tree_leaves(w_sharded))


@pytest.mark.parametrize("backend,check_vma", [
    pytest.param("xla", True, id="xla"),
    pytest.param("reference.callback", True, id="callback"),
    # jax 0.10's Pallas HLO interpreter trips over varying-axis checks (its kernel constants are not
    # marked varying); the compiled kernels annotate their outputs for check_vma=True.
    pytest.param("pallas.interpret", False, id="pallas"),
])
def test_inside_user_shard_map(backend, check_vma):
    mesh = _mesh()
    x, w_q = _case(qk.W8A8)

    def local(x, w):
        return qk.dot_general(x, w, DIMS)

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d", None), P()), out_specs=P("d", None),
                              check_vma=check_vma))
    with qk.use_backend(backend):
        out = f(jnp.asarray(x), w_q)
        expected = jax.jit(local)(jnp.asarray(x), w_q)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_run_partitioned_row_parallel_with_bias_and_prequantized_lhs():
    mesh = _mesh(AxisType.Explicit)
    recipe = qk.W8A8
    x, w_q = _case(recipe)
    bias = jnp.asarray(np.random.default_rng(4).standard_normal(64, dtype=np.float32))
    lhs_ref = reference.quantize(x, recipe.lhs)
    lhs = QOperand(jnp.asarray(lhs_ref.qvalue), jnp.asarray(lhs_ref.scale))
    problem = dispatch.Problem(recipe=recipe, m=32, n=64, k=256, act_dtype="int8", out_dtype="float32",
                               has_bias=True, lhs_quantized=True, framework="jax", platform="cpu")
    impl = dispatch.select(problem, "pallas.interpret")
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    lhs_sharded = QOperand(put(lhs.qvalue, P(None, "d")), put(lhs.scale, P()))
    rhs = w_q.operand()
    rhs_sharded = QOperand(put(rhs.qvalue, P(None, "d")), put(rhs.scale, P()))
    out = jax.jit(lambda l, r, b: sharding.run_partitioned(dispatch.Bound.of(problem, impl), l, r, b))(lhs_sharded, rhs_sharded, bias)
    expected = reference.qmatmul(lhs_ref, rhs, recipe, bias=np.asarray(bias))
    assert_close(out, expected, lhs_ref.dequantize(), np.asarray(w_q.dequantize()).T, np.float32, np.asarray(bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A8(32), id="w4a8-g32")])
def test_accumulate_hook_gives_the_reference_int32_accumulators(recipe, backend):
    """`Implementation.accumulate`, what a row-parallel shard all-reduces, is exact on every backend."""
    x, w_q = _case(recipe)
    lhs_ref = reference.quantize(x, recipe.lhs)
    lhs = QOperand(jnp.asarray(lhs_ref.qvalue), jnp.asarray(lhs_ref.scale))
    problem = dispatch.Problem(recipe=recipe, m=32, n=64, k=256, act_dtype="int8", out_dtype="float32",
                               lhs_quantized=True, framework="jax", platform="cpu")
    impl = dispatch.select(problem, backend)
    acc = jax.jit(lambda l, r: sharding._accumulate(impl, problem, l, r))(lhs, w_q.operand())
    assert acc.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc), reference.accumulators(lhs_ref, w_q.operand(), recipe))


def _problem(recipe, m=32, n=64, k=256, batch=None):
    return dispatch.Problem(recipe=recipe, m=m, n=n, k=k, batch=batch, act_dtype="float32", out_dtype="float32",
                            framework="jax", platform="cpu")


def _impl(name="pallas.interpret", recipe=qk.W8A8):
    return dispatch.select(_problem(recipe), name)


def test_choose_layout_settles_conflicts_weight_first():
    layout = sharding.choose_layout(_impl(), _problem(qk.W8A8), [("d",), ()], [("d",), ()], {"d": 8})
    assert (layout.m, layout.n, layout.k) == ((), ("d",), ())
    assert any("already split another dimension" in note for note in layout.notes)


def test_choose_layout_replicates_what_does_not_divide():
    layout = sharding.choose_layout(_impl(), _problem(qk.W8A8, m=12), [("d",), ()], [(), ()], {"d": 8})
    assert layout == sharding.Layout(axis_sizes=(("d", 8),))
    assert any("m=12 is not divisible by 8" in note for note in layout.notes)


@pytest.mark.parametrize("k,reason", [
    pytest.param(200, "straddles", id="padded-K"),  # W4A16 g32: 200 pads to 224
    pytest.param(128, "straddles", id="group-split"),  # 4 groups cannot split 8 ways
])
def test_choose_layout_keeps_groups_whole(k, reason):
    recipe = qk.W4A16(32)
    layout = sharding.choose_layout(_impl(recipe=recipe), _problem(recipe, k=k), [(), ("d",)], [(), ("d",)], {"d": 8})
    assert layout.k == ()
    assert any(reason in note for note in layout.notes), layout.notes


def test_choose_layout_adopts_a_one_sided_k_split():
    layout = sharding.choose_layout(_impl(), _problem(qk.W8A8), [(), ("d",)], [(), ()], {"d": 8})
    assert layout.k == ("d",)


def test_run_partitioned_refuses_non_canonical_operands():
    x, w_q = _case(qk.W8A8)
    with pytest.raises(TypeError, match=r"lhs \(2, 16, 256\).*Flatten"):
        sharding.run_partitioned(dispatch.Bound.of(_problem(qk.W8A8), _impl()), jnp.asarray(x).reshape(2, 16, 256), w_q.operand())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed: pip install 'qkernels[tpu]'")
def test_pallas_tpu_kernels_partition_under_explicit_axes_for_a_v5e_mesh():
    """The real Mosaic kernels on a 2x2 v5e topology (no TPU needed): per-shard custom calls, the
    column-parallel program has no collective, the row-parallel one all-reduces int32 accumulators;
    inside a check_vma=True shard_map the kernels compile as they are."""
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: let a second process load libtpu
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = jax.sharding.Mesh(np.array(devices), ("d",), axis_types=(AxisType.Explicit,))
    m, n, k = 64, 512, 1024
    problem = dispatch.Problem(recipe=qk.W8A8, m=m, n=n, k=k, act_dtype="bfloat16", out_dtype="bfloat16",
                               framework="jax", platform="tpu:v5e")
    impl = dispatch.select(problem)
    assert impl.name == "pallas.tpu.w8a8"

    def compiled(f, x_spec, w_spec, s_spec):
        def sds(shape, dtype, spec):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

        args = (sds((m, k), jnp.bfloat16, x_spec), sds((n, k), jnp.int8, w_spec), sds((n,), jnp.float32, s_spec))
        return jax.jit(f).trace(*args).lower().compile().as_text()

    partitioned = lambda x, q, s: sharding.run_partitioned(dispatch.Bound.of(problem, impl), x, QOperand(q, s))  # noqa: E731
    column = compiled(partitioned, P(), P("d", None), P("d"))
    assert "tpu_custom_call" in column and not re.search("|".join(COLLECTIVES), column)
    row = compiled(partitioned, P(None, "d"), P(None, "d"), P())
    assert re.search(r"= s32\[[\d,]*\][^\n]* all-reduce(?:-start)?\(", row)
    local = jax.shard_map(lambda x, q, s: sharding.run_partitioned(dispatch.Bound.of(dataclasses.replace(problem, m=m // 4), impl), x,
                                                                   QOperand(q, s)),
                          mesh=mesh, in_specs=(P("d"), P(), P()), out_specs=P("d"))
    assert "tpu_custom_call" in compiled(local, P("d"), P(), P())
