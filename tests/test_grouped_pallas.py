"""The Pallas grouped (megablox-style) kernels: interpreted on CPU against the reference, and compiled for
TPU targets with the real TPU compiler (libtpu, no TPU present)."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkernels as qk
from qkernels import dispatch, grouped, reference, testing
from qkernels.formats import QOperand
from qkernels.kernels.pallas.grouped import gmm_w4a16, gmm_w8a8, group_metadata


@st.composite
def ragged(draw):
    e = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.sampled_from([0, 0, 1, 5, 32, 33]), min_size=e, max_size=e))
    return tuple(sizes), max(1, sum(sizes) + draw(st.sampled_from([0, 7])))


def _case(seed, sizes, m, k, n):
    rng = np.random.default_rng(seed)
    return (testing.activations(rng, (m, k)), testing.weights(rng, (len(sizes), k, n)),
            jnp.asarray(sizes, jnp.int32))


def test_group_metadata_worked_example() -> None:
    group, block, start, end = (np.asarray(a) for a in group_metadata(jnp.asarray([3, 0, 5], jnp.int32), 10, 12, 4))
    assert group.tolist() == [0, 2, 2, 3, 4, 4] and block.tolist() == [0, 0, 1, 2, 2, 2]
    assert start.tolist() == [0, 3, 3, 8, 12] and end.tolist() == [3, 3, 8, 12, 12]


@settings(max_examples=6)
@given(case=ragged(), seed=st.integers(0, 99))
def test_w8a8_accumulators_and_outputs_are_exact(case, seed) -> None:
    """Raw int32 accumulators equal the reference; f32 outputs too (the kernel honours the rescale order)."""
    sizes, m = case
    x, w, gs = _case(seed, sizes, m, 300, 136)
    w_q = qk.quantize_experts(jnp.asarray(w), qk.W8A8)
    problem = dispatch.Problem(op=dispatch.Op.RAGGED_QMATMUL, recipe=qk.W8A8, m=m, n=136, k=300, groups=len(sizes),
                               act_dtype="float32", out_dtype="float32", framework="jax", platform="cpu")
    rhs = QOperand(np.asarray(w_q.qvalue), np.asarray(w_q.scale))
    ref = dispatch.Bound(problem, next(i for i in dispatch.registered("any", dispatch.Op.RAGGED_QMATMUL)
                                       if i.name == "reference"))  # NumPy in, NumPy out
    acc = dispatch.bind(problem, "pallas.interpret.grouped").accumulate(jnp.asarray(x), w_q.operand(), gs)
    np.testing.assert_array_equal(np.asarray(acc), ref.accumulate(x, rhs, np.asarray(sizes)))
    with qk.use_backend("pallas"):
        y = qk.ragged_dot(jnp.asarray(x), w_q, gs)
    np.testing.assert_array_equal(np.asarray(y), ref.run(x, rhs, np.asarray(sizes)))


@pytest.mark.parametrize("recipe,dtype", [pytest.param(qk.W4A16(128), jnp.bfloat16, id="g128-bf16"),
                                          pytest.param(qk.W4A16(32, zero_point=True), jnp.float32, id="g32-zp-f32")])
@pytest.mark.parametrize("sizes,m", [pytest.param((40, 0, 70, 1), 160, id="odd-sizes-empty-expert"),
                                     pytest.param((1,), 1, id="M1"), pytest.param((0, 2), 9, id="tail-rows")])
def test_w4a16_within_tolerance(recipe, dtype, sizes, m) -> None:
    x, w, gs = _case(3, sizes, m, 300, 200)
    x = jnp.asarray(x, dtype)
    w_q = qk.quantize_experts(jnp.asarray(w, dtype), recipe)
    with qk.use_backend("pallas"):
        y = np.asarray(qk.ragged_dot(x, w_q, gs).astype(jnp.float32))
    with qk.use_backend("reference"):
        expected = np.asarray(qk.ragged_dot(x, w_q, gs).astype(jnp.float32))
    w_deq = np.asarray(w_q.dequantize(dtype).astype(jnp.float32))
    bound = np.zeros(y.shape)
    for seg in grouped.segments(sizes):
        rows = slice(seg.start, seg.stop)
        bound[rows] = testing.tolerances(np.asarray(x.astype(jnp.float32))[rows], w_deq[seg.expert].T,
                                         jnp.dtype(dtype).name)
    testing.assert_within(y, expected, bound)
    assert not y[sum(sizes):].any()


def test_w4a8_is_left_to_xla() -> None:
    x, w, gs = _case(4, (2, 3), 5, 64, 128)
    text = str(qk.explain(dispatch.Problem(op=dispatch.Op.RAGGED_QMATMUL, recipe=qk.W4A8(32), m=5, n=128, k=64,
                                           groups=2, act_dtype="float32", out_dtype="float32", framework="jax",
                                           platform="tpu:v5e"), verbose=True))
    assert "-> xla" in text and "pallas.tpu.grouped.w8a8" in text and "serves recipes w8a8, not w4a8-g32" in text


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed: pip install 'qkernels[tpu]'")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_compiles_for_tpu(topology) -> None:
    """Mixtral-sized experts (E=8, N=14336, K=4096) at 16 tokens per expert, through Mosaic, no TPU present."""
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
    on = jax.sharding.SingleDeviceSharding(device)
    e, n, k, m = 8, 14336, 4096, 128
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on)  # noqa: E731
    gs = spec((e,), jnp.int32)
    w8 = jax.jit(lambda a, s, w, ws, g: gmm_w8a8(a, s, w, ws, g, out_dtype=jnp.bfloat16)).trace(
        spec((m, k), jnp.int8), spec((m,), jnp.float32), spec((e, n, k), jnp.int8), spec((e, n), jnp.float32), gs)
    w4 = jax.jit(lambda a, w, s, g: gmm_w4a16(a, w, s, None, g, group=128, out_dtype=jnp.bfloat16)).trace(
        spec((m, k), jnp.bfloat16), spec((e, n, k // 2), jnp.int8), spec((e, n, k // 128), jnp.float32), gs)
    for traced in (w8, w4):
        compiled = traced.lower().compile()
        assert compiled.memory_analysis().generated_code_size_in_bytes > 0
        assert "tpu_custom_call" in compiled.as_text()
