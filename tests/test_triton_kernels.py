"""Triton kernels against `qkernels.reference`: compiled on a CUDA GPU when one is present, else in
the interpreter on CPU (TRITON_INTERPRET=1, set by conftest).

Integer recipes (W8A8, W4A8): int32 accumulators identical to the reference's, and f32 outputs
identical too (the interpreter honours DESIGN.md section 4's order); bf16/fp16 outputs identical as
well, since both round the same f32 once. Weight-only recipes (W4A16, W8A16): within
`qkernels.testing.assert_close`. Shapes stay small (the interpreter is slow) and blocks small.
"""

from __future__ import annotations

import numpy as np
import pytest

from _triton_target import DEVICE, INTERPRET, t, torch  # skips the module without a GPU or interpreter
PREFIX = "triton.interpret." if INTERPRET else "triton."  # implementations the dispatch tests select

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qkernels import dispatch, formats, reference, testing  # noqa: E402
from qkernels.formats import QOperand  # noqa: E402
from qkernels.kernels.triton import MatmulConfig, quantize_rows  # noqa: E402
from qkernels.kernels.triton import w4a8_matmul, w4a16_matmul, w8a8_matmul, w8a16_matmul  # noqa: E402

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
    ref = reference.quantize(f32(x), formats.W8A8().lhs)
    q, s = quantize_rows(x)
    np.testing.assert_array_equal(q.cpu().numpy(), ref.qvalue)
    np.testing.assert_array_equal(f32(s), ref.scale)


def test_quantize_rows_strided_batched_input() -> None:
    rng = np.random.default_rng(1)
    x = t(testing.activations(rng, (3, 50, 41))).transpose(0, 1)  # (50, 3, 41), not contiguous
    ref = reference.quantize(f32(x), formats.W8A8().lhs)
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


# ---------------------------------------------------------------- integer recipes: exact


@given(shape=shapes, has_bias=st.booleans(), out=st.sampled_from(OUT_DTYPES), seed=st.integers(0, 99))
def test_w8a8_exact(shape, has_bias: bool, out: str, seed: int) -> None:
    batch, m, n, k, w3 = shape
    w3 = w3 and batch is not None
    x, w, bias = problem_data(seed, batch, m, n, k, w3)
    recipe = formats.W8A8()
    wq = reference.quantize(w, recipe.rhs)
    q, s = quantize_rows(t(x))
    acc = w8a8_matmul(q, s, t(wq.qvalue), t(wq.scale), return_acc=True, config=SMALL)
    np.testing.assert_array_equal(acc.cpu().numpy(), reference.accumulators(x, wq, recipe))
    b = bias if has_bias else None
    y = w8a8_matmul(q, s, t(wq.qvalue), t(wq.scale), t(b), out_dtype=out, config=SMALL)
    assert y.dtype == TORCH[out]
    np.testing.assert_array_equal(f32(y), reference.qmatmul(x, wq, recipe, bias=b, out_dtype=out).astype(np.float32))


@given(shape=shapes, group=st.sampled_from(formats.numerics.GROUP_SIZES), has_bias=st.booleans(),
       out=st.sampled_from(OUT_DTYPES), seed=st.integers(0, 99))
def test_w4a8_exact(shape, group: int, has_bias: bool, out: str, seed: int) -> None:
    batch, m, n, k, w3 = shape
    w3 = w3 and batch is not None
    x, w, bias = problem_data(seed, batch, m, n, k, w3)
    recipe = formats.W4A8(group)
    wq = reference.quantize(w, recipe.rhs)
    q, s = quantize_rows(t(x))
    acc = w4a8_matmul(q, s, t(wq.qvalue), t(wq.scale), group_size=group, return_acc=True, config=SMALL)
    np.testing.assert_array_equal(acc.cpu().numpy(), reference.accumulators(x, wq, recipe))
    b = bias if has_bias else None
    y = w4a8_matmul(q, s, t(wq.qvalue), t(wq.scale), t(b), group_size=group, out_dtype=out, config=SMALL)
    np.testing.assert_array_equal(f32(y), reference.qmatmul(x, wq, recipe, bias=b, out_dtype=out).astype(np.float32))


@pytest.mark.parametrize("recipe", [pytest.param(formats.W8A8(), id="w8a8"),
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
    recipe = formats.W8A8()
    wq = reference.quantize(w, recipe.rhs)
    w_view = t(wq.qvalue.T).t()  # (N, K) with strides (1, N)
    assert not w_view.is_contiguous()
    q, s = quantize_rows(t(x))
    y = w8a8_matmul(q, s, w_view, t(wq.scale), t(bias), out_dtype="float32", config=SMALL)
    np.testing.assert_array_equal(f32(y), reference.qmatmul(x, wq, recipe, bias=bias, out_dtype="float32"))


# ---------------------------------------------------------------- weight-only recipes: accurate


@settings(max_examples=8)
@given(shape=shapes, group=st.sampled_from(formats.numerics.GROUP_SIZES), zero_point=st.booleans(),
       act=st.sampled_from(["bfloat16", "float16"]), has_bias=st.booleans(), out=st.sampled_from(OUT_DTYPES),
       seed=st.integers(0, 99))
def test_w4a16_close(shape, group: int, zero_point: bool, act: str, has_bias: bool, out: str, seed: int) -> None:
    batch, m, n, k, w3 = shape
    w3 = w3 and batch is not None
    x, w, bias = problem_data(seed, batch, m, n, k, w3)
    recipe = formats.W4A16(group, zero_point=zero_point)
    wq = reference.quantize(w, recipe.rhs)
    xt = t(x).to(TORCH[act])
    xn = f32(xt).astype(reference.np_dtype(act))
    b = bias if has_bias else None
    y = w4a16_matmul(xt, t(wq.qvalue), t(wq.scale), t(wq.zero_point), t(b), group_size=group, out_dtype=out,
                     config=SMALL)
    assert y.dtype == TORCH[out]
    expected = reference.qmatmul(xn, wq, recipe, bias=b, out_dtype=out)
    testing.assert_close(f32(y), expected, xn, wq.dequantize(act), out)


@settings(max_examples=8)
@given(shape=shapes, act=st.sampled_from(["bfloat16", "float16"]), has_bias=st.booleans(),
       out=st.sampled_from(OUT_DTYPES), seed=st.integers(0, 99))
def test_w8a16_close(shape, act: str, has_bias: bool, out: str, seed: int) -> None:
    batch, m, n, k, w3 = shape
    w3 = w3 and batch is not None
    x, w, bias = problem_data(seed, batch, m, n, k, w3)
    recipe = formats.W8A16()
    wq = reference.quantize(w, recipe.rhs)
    xt = t(x).to(TORCH[act])
    xn = f32(xt).astype(reference.np_dtype(act))
    b = bias if has_bias else None
    y = w8a16_matmul(xt, t(wq.qvalue), t(wq.scale), t(b), out_dtype=out, config=SMALL)
    expected = reference.qmatmul(xn, wq, recipe, bias=b, out_dtype=out)
    testing.assert_close(f32(y), expected, xn, wq.dequantize(act), out)


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


def make_problem(recipe, *, m, n, k, batch=None, act="float32", out="float32", platform=None, bias=False,
                 lhs_quantized=False):
    from torch_bindings.ops import platform_of

    platform = platform or platform_of(DEVICE)
    return dispatch.Problem(recipe=recipe, m=m, n=n, k=k, batch=batch, act_dtype=act, out_dtype=out,
                            has_bias=bias, lhs_quantized=lhs_quantized, framework="torch", platform=platform)


@pytest.mark.parametrize("recipe,name", [
    pytest.param(formats.W8A8(), "w8a8", id="w8a8"), pytest.param(formats.W4A8(128), "w4a8", id="w4a8"),
    pytest.param(formats.W4A16(128), "w4a16", id="w4a16"),
    pytest.param(formats.W4A16(64, zero_point=True), "w4a16", id="w4a16-zp"),
    pytest.param(formats.W8A16(), "w8a16", id="w8a16")])
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


@settings(max_examples=6)
@given(shape=shapes, recipe=st.sampled_from([formats.W8A8(), formats.W4A8(32), formats.W4A16(64, zero_point=True),
                                             formats.W8A16()]),
       lhs_quantized=st.booleans(), has_bias=st.booleans(), seed=st.integers(0, 99))
def test_dispatch_run_matches_reference(shape, recipe, lhs_quantized: bool, has_bias: bool, seed: int) -> None:
    batch, m, n, k, w3 = shape
    weight_3d = w3 and batch is not None
    lhs_quantized = lhs_quantized and recipe.lhs is not None
    x, w, bias = problem_data(seed, batch, m, n, k, weight_3d)
    wq = reference.quantize(w, recipe.rhs)
    act = "float32" if recipe.lhs is not None else "bfloat16"
    xt = t(x).to(TORCH[act])
    xn = f32(xt).astype(reference.np_dtype(act))
    b = bias if has_bias else None
    problem = make_problem(recipe, m=m, n=n, k=k, batch=batch if weight_3d else None,
                           act="int8" if lhs_quantized else act, out="float32", bias=has_bias,
                           lhs_quantized=lhs_quantized)
    with dispatch.use_backend("triton"):
        call = dispatch.bind(problem)
    impl = call.implementation
    assert impl.name.startswith(PREFIX) and impl.priority == (-10 if INTERPRET else 100)
    lhs = QOperand(*quantize_rows(xt)) if lhs_quantized else xt
    y = call.run(lhs, QOperand(t(wq.qvalue), t(wq.scale), t(wq.zero_point)), t(b))
    expected = reference.qmatmul(xn, wq, recipe, bias=b, out_dtype="float32")
    if recipe.lhs is not None:
        np.testing.assert_array_equal(f32(y), expected)
    else:
        testing.assert_close(f32(y), expected, xn, wq.dequantize(act), "float32")
    q_impl = dispatch.select(dispatch.Problem(op=dispatch.Op.QUANTIZE, recipe=formats.W8A8(), m=m, n=0, k=k,
                                              act_dtype=act, out_dtype="int8", framework="torch",
                                              platform=problem.platform), backend="triton")
    assert q_impl.name == f"{PREFIX}quantize"
