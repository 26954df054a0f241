"""Triton kernels against `qkernels.reference`: compiled on a CUDA GPU when one is present, else in
the interpreter on CPU (TRITON_INTERPRET=1, set by conftest).

What the conformance suite (test_conformance.py, every `triton.*` implementation through dispatch)
does not reach: the fused activation-quantization kernel, the launchers' raw int32 accumulators
(`return_acc`; the dispatch implementations expose no `accumulate`), explicit configs (which never
change numerics), strided weights, launcher errors and family selection on each platform.
Shapes stay small (the interpreter is slow) and blocks small.
"""

from __future__ import annotations

import numpy as np
import pytest

from _triton_target import DEVICE, INTERPRET, t, torch  # skips the module without a GPU or interpreter
PREFIX = "triton.interpret." if INTERPRET else "triton."  # implementations the dispatch tests select

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qkernels import dispatch, formats, reference, testing  # noqa: E402
from qkernels.kernels.triton import MatmulConfig, quantize_rows  # noqa: E402
from qkernels.kernels.triton import w4a8_matmul, w4a16_matmul, w8a8_matmul  # noqa: E402

OUT_DTYPES = ("float32", "bfloat16", "float16")
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMALL = MatmulConfig(block_m=16, block_n=16, block_k=32, num_warps=1, num_stages=1)
WIDE = MatmulConfig(block_m=32, block_n=64, block_k=64, num_warps=1, num_stages=1)


def f32(y: torch.Tensor) -> np.ndarray:
    return y.float().cpu().numpy()


def problem_data(seed: int, batch: int | None, m: int, n: int, k: int, weight_3d: bool):
    rng = np.random.default_rng(seed)
    x = testing.activations(rng, (batch, m, k) if batch else (m, k))
    w = testing.weights(rng, (batch, n, k) if weight_3d else (n, k))
    bias = rng.standard_normal(n).astype(np.float32)
    return x, w, bias


shapes = st.tuples(
    st.sampled_from([None, 2]),  # batch
    st.integers(1, 40),  # M
    st.integers(1, 70),  # N
    st.integers(1, 200),  # K
    st.booleans(),  # 3-D weight (batched) when batch
)


# ---------------------------------------------------------------- activation quantization


@given(rows=st.integers(1, 40), k=st.integers(1, 300), dtype=st.sampled_from(OUT_DTYPES), seed=st.integers(0, 99))
def test_quantize_rows_bit_exact(rows: int, k: int, dtype: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = t(testing.activations(rng, (rows, k))).to(TORCH[dtype])
    x[0] = 0  # amax 0 -> scale 1
    if k >= 3:  # exact ties x/scale = +-0.5, 1.5 with scale 1 (amax 127)
        x[-1, :3] = torch.tensor([127.0, 0.5, -1.5])
    ref = reference.quantize(f32(x), formats.W8A8.lhs)
    q, s = quantize_rows(x)
    np.testing.assert_array_equal(q.cpu().numpy(), ref.qvalue)
    np.testing.assert_array_equal(f32(s), ref.scale)


def test_quantize_rows_strided_batched_input() -> None:
    rng = np.random.default_rng(1)
    x = t(testing.activations(rng, (3, 50, 41))).transpose(0, 1)  # (50, 3, 41), not contiguous
    ref = reference.quantize(f32(x), formats.W8A8.lhs)
    q, s = quantize_rows(x)
    np.testing.assert_array_equal(q.cpu().numpy(), ref.qvalue)
    np.testing.assert_array_equal(f32(s), ref.scale)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy inside the interpreter
def test_quantize_rows_non_finite_row_gives_nan_scale() -> None:
    x = torch.ones((3, 8), device=DEVICE)
    x[1, 2] = float("nan")
    x[2, 5] = float("inf")
    _, s = quantize_rows(x)
    assert s[0] == pytest.approx(1 / 127) and torch.isnan(s[1]) and torch.isnan(s[2])


# ---------------------------------------------------------------- integer recipes: raw accumulators, configs, layouts


@given(shape=shapes, group=st.sampled_from((None, *formats.numerics.GROUP_SIZES)), seed=st.integers(0, 99))
def test_raw_accumulators_exact(shape, group: int | None, seed: int) -> None:
    """`return_acc=True`: W8A8's int32 accumulator, W4A8's per group, identical to the reference's."""
    batch, m, n, k, w3 = shape
    x, w, _ = problem_data(seed, batch, m, n, k, w3 and batch is not None)
    recipe = formats.W8A8 if group is None else formats.W4A8(group)
    wq = reference.quantize(w, recipe.rhs)
    q, s = quantize_rows(t(x))
    if group is None:
        acc = w8a8_matmul(q, s, t(wq.qvalue), t(wq.scale), return_acc=True, config=SMALL)
    else:
        acc = w4a8_matmul(q, s, t(wq.qvalue), t(wq.scale), group_size=group, return_acc=True, config=SMALL)
    assert acc.dtype == torch.int32
    np.testing.assert_array_equal(acc.cpu().numpy(), reference.accumulators(x, wq, recipe))


@pytest.mark.parametrize("recipe", [pytest.param(formats.W8A8, id="w8a8"),
                                    pytest.param(formats.W4A8(64), id="w4a8-g64")])
def test_configs_never_change_numerics(recipe) -> None:
    x, w, bias = problem_data(7, None, 45, 70, 259, False)
    wq = reference.quantize(w, recipe.rhs)
    q, s = quantize_rows(t(x))
    outs = []
    for cfg in (SMALL, WIDE):
        if recipe.group_size:
            run = lambda **kw: w4a8_matmul(q, s, t(wq.qvalue), t(wq.scale), group_size=recipe.group_size, **kw)
        else:
            run = lambda **kw: w8a8_matmul(q, s, t(wq.qvalue), t(wq.scale), **kw)
        outs.append((run(return_acc=True, config=cfg), run(bias=t(bias), out_dtype="float32", config=cfg)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_strided_weights_are_read_in_place() -> None:
    """A weight that is a transposed view (K not contiguous) is read through its strides."""
    x, w, bias = problem_data(3, None, 9, 33, 100, False)
    recipe = formats.W8A8
    wq = reference.quantize(w, recipe.rhs)
    w_view = t(wq.qvalue.T).t()  # (N, K) with strides (1, N)
    assert not w_view.is_contiguous()
    q, s = quantize_rows(t(x))
    y = w8a8_matmul(q, s, w_view, t(wq.scale), t(bias), out_dtype="float32", config=SMALL)
    np.testing.assert_array_equal(f32(y), reference.qmatmul(x, wq, recipe, bias=bias, out_dtype="float32"))


# ---------------------------------------------------------------- errors


def test_launcher_errors_name_the_fix() -> None:
    x = torch.zeros((4, 65), dtype=torch.float32, device=DEVICE)
    wq = reference.quantize(np.ones((8, 64), np.float32), formats.W4A16(32).rhs)
    with pytest.raises(ValueError, match="K=65 with group_size=32 needs 48"):
        w4a16_matmul(x.to(torch.bfloat16), t(wq.qvalue), t(wq.scale), group_size=32)
    with pytest.raises(TypeError, match="bf16 or fp16"):
        w4a16_matmul(x[:, :64], t(wq.qvalue), t(wq.scale), group_size=32)
    with pytest.raises(ValueError, match="exceeds 133144"):
        w8a8_matmul(torch.zeros((1, 133_145), dtype=torch.int8, device=DEVICE), torch.ones(1, device=DEVICE),
                    torch.zeros((1, 133_145), dtype=torch.int8, device=DEVICE), torch.ones(1, device=DEVICE))


# ---------------------------------------------------------------- dispatch


def make_problem(recipe, *, m, n, k, act="float32", out="float32", platform=None, op=dispatch.Op.QMATMUL):
    from torch_bindings.ops import platform_of

    return dispatch.Problem(op=op, recipe=recipe, m=m, n=n, k=k, act_dtype=act, out_dtype=out, framework="torch",
                            platform=platform or platform_of(DEVICE))


@pytest.mark.parametrize("recipe,name", [
    pytest.param(formats.W8A8, "w8a8", id="w8a8"), pytest.param(formats.W4A8(128), "w4a8", id="w4a8"),
    pytest.param(formats.W4A16(128), "w4a16", id="w4a16"),
    pytest.param(formats.W4A16(64, zero_point=True), "w4a16", id="w4a16-zp"),
    pytest.param(formats.W8A16, "w8a16", id="w8a16")])
def test_dispatch_selects_family_honestly(recipe, name: str) -> None:
    gpu = make_problem(recipe, m=16, n=4096, k=4096, act="bfloat16", out="bfloat16", platform="cuda:sm_90")
    assert dispatch.select(gpu).name == f"triton.{name}"
    assert dispatch.select(make_problem(recipe, m=16, n=64, k=64, act="bfloat16", platform="rocm:gfx942")).priority == 100
    old = make_problem(recipe, m=1, n=8, k=8, act="bfloat16", platform="cuda:sm_75")
    reasons = {v.implementation.name: v.reason for v in dispatch.candidates(old)}
    assert "older than sm_80" in reasons[f"triton.{name}"]
    cpu = make_problem(recipe, m=1, n=8, k=8, act="bfloat16", platform="cpu")
    assert not dispatch.select(cpu).name.startswith("triton")  # the interpreter is never chosen automatically
    if INTERPRET:
        assert dispatch.select(cpu, backend="triton").name == f"triton.interpret.{name}"


def test_dispatch_refuses_float32_activations_for_weight_only() -> None:
    p = make_problem(formats.W4A16(128), m=1, n=8, k=8, act="float32")
    with pytest.raises(dispatch.BackendUnavailable, match="cast the activations"):
        dispatch.select(p, backend="triton")


def test_dispatch_selects_the_quantize_kernel() -> None:
    problem = make_problem(formats.W8A8, m=5, n=0, k=40, out="int8", op=dispatch.Op.QUANTIZE)
    q_impl = dispatch.select(problem, backend="triton")
    assert q_impl.name == f"{PREFIX}quantize" and q_impl.priority == (-10 if INTERPRET else 100)


def test_quantize_rows_subnormal_rows_match_the_reference() -> None:
    """Subnormal values read as 0 and a scale below FLT_MIN becomes 1 (numerics.symmetric_scale), so a
    flush-to-zero device and an IEEE one agree: rows of subnormals, a tiny amax, a scale just above FLT_MIN."""
    x = testing.subnormal_rows()
    ref = reference.quantize(x, formats.W8A8.lhs)
    assert (ref.scale[:2] == 1).all() and ref.scale[2] == np.float32(2.0**-126)
    q, s = quantize_rows(t(x))
    np.testing.assert_array_equal(q.cpu().numpy(), ref.qvalue)
    np.testing.assert_array_equal(f32(s), ref.scale)
