"""The grouped (ragged) matmul: its definition (`qkernels.grouped`, the reference) and `qk.grouped_linear`
on every torch implementation ('torch-cpu', the Triton grouped kernels in the interpreter or on a GPU).

Checked against a per-expert loop of the dense op: int32 accumulators and W8A8/W4A8 outputs equal it
exactly; weight-only outputs are within `qkernels.testing`'s tolerances. Group sizes come from
hypothesis, zeros, odd sizes, sum(group_sizes) < M and M = 1 included.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkernels as qk
from qkernels import dispatch, grouped, reference, testing
from torch_bindings import grouped as tg

RECIPES = [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A8(32), id="w4a8-g32"),
           pytest.param(qk.W4A16(32), id="w4a16-g32"), pytest.param(qk.W4A16(32, zero_point=True), id="w4a16-g32-zp"),
           pytest.param(qk.W8A16, id="w8a16")]
TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_PREFIX = "triton.interpret.grouped" if os.environ.get("TRITON_INTERPRET") == "1" else "triton.grouped"


@st.composite
def ragged(draw, max_experts: int = 5, max_rows: int = 40):
    """(group sizes, M): sizes with zeros and odd values, and M >= their sum (sometimes more)."""
    e = draw(st.integers(1, max_experts))
    sizes = draw(st.lists(st.sampled_from([0, 0, 1, 2, 3, 7, 16, 17]), min_size=e, max_size=e))
    m = sum(sizes) + draw(st.sampled_from([0, 0, 1, 5]))
    return tuple(sizes), max(m, 1)


def _data(seed: int, sizes: tuple[int, ...], m: int, n: int, k: int):
    rng = np.random.default_rng(seed)
    return testing.activations(rng, (m, k)), testing.weights(rng, (len(sizes), n, k))


def _offsets(sizes) -> torch.Tensor:
    return torch.tensor(np.cumsum(sizes), dtype=torch.int32)


def _loop(x: torch.Tensor, w: torch.Tensor, sizes, recipe) -> torch.Tensor:
    """A per-expert loop of the dense op (`qk.linear` with each expert quantized alone); zero past the groups."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype)
    for seg in grouped.segments(sizes):
        out[seg.start:seg.stop] = qk.linear(x[seg.start:seg.stop], qk.quantize(w[seg.expert], recipe))
    return out


def _compare(y, expected, x, w_q, recipe, sizes) -> None:
    """Exact for integer recipes; weight-only within the tolerance of each row's own expert."""
    if recipe.accumulation.integer:
        np.testing.assert_array_equal(y.float().numpy(), expected.float().numpy())
        return
    w_deq = w_q.dequantize().to(x.dtype).float().numpy()
    wide = np.zeros((x.shape[0], w_deq.shape[1], w_deq.shape[2]), np.float32)  # each row's expert
    for seg in grouped.segments(sizes):
        wide[seg.start:seg.stop] = w_deq[seg.expert]
    bound = testing.tolerances(x.float().numpy()[:, None, :], wide, str(x.dtype).removeprefix("torch."))[:, 0, :]
    testing.assert_within(y.float().numpy(), expected.float().numpy(), bound)


@pytest.mark.parametrize("recipe", RECIPES)
@given(case=ragged(), seed=st.integers(0, 99))
def test_definition_equals_a_per_expert_loop(recipe, case, seed) -> None:
    """The reference (the definition) and 'torch-cpu' against a loop of the dense op over the experts."""
    sizes, m = case
    x, w = _data(seed, sizes, m, 24, 64)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    w_q = qk.quantize_experts(wt, recipe)
    expected = _loop(xt, wt, sizes, recipe)
    for backend in ("torch-cpu", "reference"):
        with qk.use_backend(backend):
            y = qk.grouped_linear(xt, w_q, _offsets(sizes))
        _compare(y, expected, xt, w_q, recipe, sizes)


@given(case=ragged(), seed=st.integers(0, 99))
def test_w8a8_accumulators_are_exact(case, seed) -> None:
    """int32 accumulators of every implementation equal the reference's int64 ones, rows past the groups 0."""
    sizes, m = case
    x, w = _data(seed, sizes, m, 20, 96)
    w_q = qk.quantize_experts(torch.from_numpy(w), qk.W8A8)
    rhs = reference.RefQuantized(qvalue=w_q.qvalue.numpy(), scale=w_q.scale.numpy(), zero_point=None,
                                 fmt=qk.W8A8.rhs, k=96)
    exact = np.zeros((m, 20), np.int64)
    for seg in grouped.segments(sizes):
        exact[seg.start:seg.stop] = reference.accumulators(x[seg.start:seg.stop], reference.RefQuantized(
            qvalue=rhs.qvalue[seg.expert], scale=rhs.scale[seg.expert], zero_point=None, fmt=qk.W8A8.rhs, k=96),
            qk.W8A8)
    problem = tg._problem(m, 96, torch.float32, torch.device("cpu"), 20, len(sizes), qk.W8A8)
    operand = w_q.qvalue, w_q.scale, None
    gs = torch.tensor(sizes, dtype=torch.int32)
    names = ["torch-cpu"] + ([f"{TRITON_PREFIX}.w8a8"] if TRITON and DEVICE.type == "cpu" else [])
    for name in names:
        acc = dispatch.bind(problem, name).accumulate(torch.from_numpy(x), qk.formats.QOperand(*operand), gs)
        np.testing.assert_array_equal(np.asarray(acc), exact, err_msg=name)
    acc = dispatch.bind(problem, "reference").accumulate(x, rhs.operand(), np.asarray(sizes, np.int32))
    np.testing.assert_array_equal(acc, exact)


EDGES = [pytest.param((0, 0, 0), 5, id="all-empty"), pytest.param((1,), 1, id="M1"),
         pytest.param((0, 1, 0), 1, id="M1-middle-expert"), pytest.param((3, 0, 2), 9, id="tail-rows"),
         pytest.param((17, 0, 0, 15), 32, id="odd-sizes"), pytest.param((33,), 33, id="one-expert")]


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
@pytest.mark.parametrize("sizes,m", EDGES)
@pytest.mark.parametrize("recipe,dtype", [pytest.param(qk.W8A8, torch.float32, id="w8a8"),
                                          pytest.param(qk.W8A8, torch.bfloat16, id="w8a8-bf16"),
                                          pytest.param(qk.W4A16(32), torch.bfloat16, id="w4a16-g32-bf16"),
                                          pytest.param(qk.W4A16(32, zero_point=True), torch.float16,
                                                       id="w4a16-g32-zp-f16")])
def test_triton_grouped_kernels(recipe, dtype, sizes, m) -> None:
    """One launch over every expert: equal to the per-expert loop (W8A8 bit for bit), tail rows zero."""
    x, w = _data(7, sizes, m, 40, 80)
    xt, wt = torch.from_numpy(x).to(dtype), torch.from_numpy(w)
    w_q = qk.quantize_experts(wt, recipe)
    expected = _loop(xt, wt, sizes, recipe)
    with qk.use_backend("triton"):
        y = qk.grouped_linear(xt.to(DEVICE), w_q.to(DEVICE), _offsets(sizes).to(DEVICE)).cpu()
    _compare(y, expected, xt, w_q, recipe, sizes)
    assert not y[sum(sizes):].any()
    if DEVICE.type == "cpu":
        text = str(tg.explain(xt, w_q, _offsets(sizes), "triton"))
        assert f"-> {TRITON_PREFIX}.{recipe.tag}" in text and "(grouped table: interpret" in text, text


def test_tile_schedule_worked_example() -> None:
    from qkernels.kernels.triton.grouped import tile_schedule

    group, block, start, end = tile_schedule(torch.tensor([3, 0, 5], dtype=torch.int32), 10, 4)
    valid = group <= 3
    assert list(zip(group[valid].tolist(), block[valid].tolist())) == [(0, 0), (2, 0), (2, 1), (3, 2)]
    assert start.tolist() == [0, 3, 3, 8] and end.tolist() == [3, 3, 8, 10]
    assert group.shape == (6,) and (group[~valid] == 4).all()


def test_quantize_experts_equals_per_expert_quantize() -> None:
    w = torch.from_numpy(testing.weights(np.random.default_rng(0), (3, 8, 70)))
    for recipe in (qk.W8A8, qk.W4A16(32, zero_point=True)):
        q = qk.quantize_experts(w, recipe)
        assert q.shape == (3, 8, 70) and q.experts == 3 and q.out_features == 8 and q.in_features == 70
        for e in range(3):
            one, mine = qk.quantize(w[e], recipe), q.expert(e)
            assert torch.equal(mine.qvalue, one.qvalue) and torch.equal(mine.scale, one.scale)
            if recipe.rhs.zero_point:
                assert torch.equal(mine.zero_point, one.zero_point)
            torch.testing.assert_close(q.dequantize()[e], one.dequantize(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"QExperts.scale .* must be \(3, 8\) torch.float32, got \(3, 1\) torch.float32"):
        q = qk.quantize_experts(w, qk.W8A8)
        tg.QExperts(qvalue=q.qvalue, scale=q.scale[:, :1], zero_point=None, recipe=qk.W8A8, shape=(3, 8, 70))


def test_gradient_is_straight_through() -> None:
    sizes, m = (3, 0, 4), 9
    x, w = _data(1, sizes, m, 16, 32)
    xt = torch.from_numpy(x).requires_grad_()
    w_q = qk.quantize_experts(torch.from_numpy(w), qk.W8A8)
    g = torch.randn(m, 16)
    (qk.grouped_linear(xt, w_q, _offsets(sizes)) * g).sum().backward()
    w_deq = w_q.dequantize()
    expected = torch.zeros(m, 32)
    expected[0:3], expected[3:7] = g[0:3] @ w_deq[0], g[3:7] @ w_deq[2]
    torch.testing.assert_close(xt.grad, expected)


def test_compiles_fullgraph_and_passes_opcheck() -> None:
    sizes, m = (2, 5), 8
    x, w = _data(2, sizes, m, 16, 32)
    xt, w_q, offs = torch.from_numpy(x), qk.quantize_experts(torch.from_numpy(w), qk.W8A8), _offsets(sizes)
    eager = qk.grouped_linear(xt, w_q, offs)
    torch.testing.assert_close(torch.compile(qk.grouped_linear, fullgraph=True)(xt, w_q, offs), eager, rtol=0, atol=0)
    torch.library.opcheck(tg.GROUPED_LINEAR, (xt, w_q.qvalue, w_q.scale, None, offs, "w8a8"))


def test_explain_lists_the_grouped_candidates() -> None:
    x, w = _data(3, (1, 1), 2, 16, 32)
    text = str(tg.explain(torch.from_numpy(x), qk.quantize_experts(torch.from_numpy(w), qk.W8A8),
                          _offsets((1, 1))))
    assert text.startswith("ragged_qmatmul w8a8 E=2 M=2") and "-> torch-cpu" in text


def test_qk_explain_routes_grouped_calls() -> None:
    """`qk.explain` with grouped_linear's arguments explains the grouped op, as with linear's the dense one."""
    x, w = _data(3, (1, 2), 3, 16, 32)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    for weight in (qk.quantize_experts(wt, qk.W4A16(32)), wt):  # a float stack: grouped_linear's W8A8
        got = qk.explain(xt, weight, _offsets((1, 2)), verbose=True)
        assert got.problem.op is dispatch.Op.RAGGED_QMATMUL and got.problem.groups == 2
        assert str(got) == str(tg.explain(xt, weight, _offsets((1, 2)), verbose=True))
    assert qk.explain(xt, qk.quantize(wt[0], qk.W8A8)).problem.op is dispatch.Op.QMATMUL
    unknown = qk.explain(xt, wt, _offsets((1, 2)), "nope")  # the backend argument reaches grouped explain
    assert "no implementation named 'nope' for torch ragged_qmatmul" in unknown.error


@pytest.mark.parametrize("offsets,match", [
    pytest.param([3, 2], "decrease", id="decreasing"), pytest.param([3, 9], "sum to 9 rows but lhs has M=4",
                                                                     id="past-M")])
def test_bad_offsets_are_refused(offsets, match) -> None:
    x, w = _data(4, (1, 1), 4, 8, 16)
    with pytest.raises(ValueError, match=match):
        qk.grouped_linear(torch.from_numpy(x), qk.quantize_experts(torch.from_numpy(w)),
                          torch.tensor(offsets, dtype=torch.int32))


def test_bad_operands_are_refused() -> None:
    x, w = _data(5, (1, 1), 2, 8, 16)
    xt, w_q = torch.from_numpy(x), qk.quantize_experts(torch.from_numpy(w))
    with pytest.raises(TypeError, match="int32"):
        qk.grouped_linear(xt, w_q, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="in_features=15"):
        qk.grouped_linear(xt[:, :15], w_q, _offsets((1, 1)))
    with pytest.raises(ValueError, match="2-D QTensor"):
        qk.grouped_linear(xt, qk.quantize(torch.from_numpy(w[0])), _offsets((1,)))
