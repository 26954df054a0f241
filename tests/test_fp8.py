"""fp8 (float8_e4m3fn) recipes: the definition (saturating round-to-even codes, NaN/Inf refusal, names),
and the generic backends that execute it (reference, torch-cpu, xla) agreeing with each other.

Every backend's outputs against the reference, on awkward shapes, bias and every dtype pair, are in
`tests/test_conformance.py` (FP8 and FP8A16 are in its catalogue); the Triton kernels in
`tests/test_fp8_triton.py`.
"""

from __future__ import annotations

import pickle

import ml_dtypes
import numpy as np
import pytest

import qkernels as qk
from qkernels import numerics, reference, testing
from qkernels.formats import Accumulation, QOperand

E4M3 = ml_dtypes.float8_e4m3fn
DIMS = (((1,), (1,)), ((), ()))  # x (M, K) . w (N, K): contract K


def _ops(name: str):
    if name == "numpy":
        return numerics.NUMPY_OPS
    if name == "torch":
        pytest.importorskip("torch")
        from torch_bindings.arrays import TORCH_OPS

        return TORCH_OPS
    pytest.importorskip("jax")
    from jax_bindings.arrays import JAX_OPS

    return JAX_OPS


def _np(x) -> np.ndarray:
    """Any framework's array as NumPy, float8 codes kept as float8."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu()
        return x.float().numpy().astype(E4M3) if x.dtype.is_floating_point and x.element_size() == 1 else x.numpy()
    return np.asarray(x)


OPS = ["numpy", "torch", "jax"]

# (x / scale, code): ties go to the even neighbour, beyond +-448 saturates, subnormal codes are kept.
CODES = [
    (1.0625, 1.0), (1.1875, 1.25), (17.0, 16.0), (19.0, 20.0), (-17.0, -16.0),  # ties to even
    (447.0, 448.0), (448.0, 448.0), (464.0, 448.0), (500.0, 448.0), (-1e30, -448.0), (3e38, 448.0),  # saturation
    (3 * 2.0**-10, 2.0**-8), (2.0**-9, 2.0**-9), (5 * 2.0**-11, 2.0**-9), (2.0**-10, 0.0), (1e-4, 0.0),  # subnormal
    (0.0, 0.0), (0.3, 0.3125),
]


@pytest.mark.parametrize("ops", OPS)
def test_codes_saturate_and_round_ties_to_even(ops: str) -> None:
    """`numerics.to_codes` for float8_e4m3fn in every framework: the table of `quantize_symmetric`."""
    o = _ops(ops)
    y = o.asarray(np.array([c[0] for c in CODES], np.float32))
    got = _np(numerics.to_codes(y, numerics.FP8_E4M3, o)).astype(np.float32)
    np.testing.assert_array_equal(got, np.array([c[1] for c in CODES], np.float32))
    assert not np.isnan(got).any()


def _tie_rows(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Rows whose absmax is 448 (scale exactly 1, so x / scale = x) holding e4m3 rounding ties,
    saturating neighbours, subnormal codes and random values."""
    grid = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid)])
    mids = (grid[:-1] + grid[1:]) / 2  # exactly representable in f32: every e4m3 tie
    x = rng.choice(np.concatenate([mids, grid, rng.standard_normal(256).astype(np.float32) * 30]), (rows, k))
    x[:, 0] = 448.0 * rng.choice([-1, 1], rows)
    return x.astype(np.float32)


@pytest.mark.parametrize("ops", OPS)
def test_quantize_matches_the_reference_in_every_framework(ops: str) -> None:
    """`OperandFormat.quantize` with each framework's ops gives the reference's codes and scales bit
    for bit: rounding ties (scale 1), and realistic rows (scales from amax / 448)."""
    o = _ops(ops)
    rng = np.random.default_rng(1)
    fmt = qk.FP8.lhs
    for x in (_tie_rows(rng, 16, 300), testing.activations(rng, (9, 257)), testing.subnormal_rows(64)):
        want = fmt.quantize(x)
        got = fmt.quantize(o.asarray(x), o)
        assert _np(got.qvalue).dtype == E4M3
        np.testing.assert_array_equal(_np(got.qvalue).astype(np.float32), want.qvalue.astype(np.float32))
        np.testing.assert_array_equal(_np(got.scale), want.scale)
    assert np.abs(want.qvalue.astype(np.float32)).max() == 448


def test_dequantized_codes_are_within_half_a_step() -> None:
    """x ~= code * scale with |error| <= 2**-4 |x| (3 mantissa bits, round to nearest), away from subnormals."""
    rng = np.random.default_rng(2)
    w = testing.weights(rng, (32, 512))
    wq = reference.quantize(w, qk.FP8.rhs)
    deq = wq.dequantize()
    normal = np.abs(wq.qvalue.astype(np.float32)) >= 2.0**-6
    err = np.abs(deq - w)[normal]
    assert (err <= np.abs(w)[normal] * 2.0**-4).all()
    assert np.abs(deq - w)[~normal].max(initial=0) <= 2.0**-10 * wq.scale.max()


def test_recipes_are_values_whose_names_parse_back() -> None:
    assert (qk.FP8.name, qk.FP8A16.name) == ("fp8", "fp8a16")
    assert qk.FP8.accumulation is Accumulation.FLOAT_CODES and qk.FP8A16.accumulation is Accumulation.FLOAT
    assert qk.FP8.lhs == qk.FP8.rhs == qk.FP8A16.rhs and qk.FP8A16.lhs is None
    assert qk.FP8.rhs.qtype is numerics.FP8_E4M3 and qk.FP8.max_k is None
    assert qk.FP8(static=True).name == "fp8-static" and qk.FP8(static=True).lhs.static
    assert qk.FP8(static=True).accumulation is Accumulation.FLOAT_CODES
    for r in (qk.FP8, qk.FP8A16, qk.FP8(quantized_backward=True), qk.FP8(static=True)):
        assert qk.recipe_named(r.name) == r and qk.parse_recipe(r.name) == r and qk.resolve_recipe(r.name) == r
        back = pickle.loads(pickle.dumps(r))
        assert back == r and back.accumulation is r.accumulation
    assert qk.resolve_recipe(type(qk.FP8)) == qk.FP8
    with pytest.raises(ValueError, match="takes no group size"):
        qk.parse_recipe("fp8-g128")
    assert qk.FP8 in qk.RECIPES and qk.FP8A16 in qk.RECIPES
    assert Accumulation.FLOAT_CODES in qk.formats.ACCUMULATIONS


def test_a_float_x_float_recipe_derives_the_fp8_accumulation() -> None:
    """Any per-row / per-tensor float x float formats derive FLOAT_CODES (e5m2 too); grouped ones must name one."""
    e5m2 = qk.OperandFormat(qtype=numerics.FP8_E5M2, granularity=qk.Granularity.TENSOR)
    assert qk.Recipe(tag="fp8e5test", lhs=e5m2, rhs=qk.FP8.rhs).accumulation is Accumulation.FLOAT_CODES
    grouped = qk.OperandFormat(qtype=numerics.FP8_E4M3, granularity=qk.Granularity.GROUP, group_size=128)
    with pytest.raises(ValueError, match="pass accumulation= explicitly"):
        qk.Recipe(tag="fp8gtest", lhs=qk.FP8.lhs, rhs=grouped)


def _nonfinite(x: np.ndarray, value: float) -> np.ndarray:
    x = x.copy()
    x[1, 3] = value
    return x


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("recipe", [qk.W8A8, qk.FP8], ids=["w8a8", "fp8"])
def test_nan_and_inf_are_refused_as_for_integer_formats(recipe: qk.Recipe, value: float) -> None:
    """Weights at quantize time (every framework) and activations on the fly (reference, torch) raise
    the same error for fp8 as for int8."""
    rng = np.random.default_rng(3)
    w, x = testing.weights(rng, (6, 40)), testing.activations(rng, (4, 40))
    bad_w, bad_x = _nonfinite(w, value), _nonfinite(x, value)
    with pytest.raises(ValueError, match=r"weight contains 1 NaN/Inf value\(s\) and cannot be quantized"):
        reference.quantize(bad_w, recipe.rhs, name="weight")
    with pytest.raises(ValueError, match=r"lhs contains 1 NaN/Inf value\(s\)"):
        reference.qmatmul(bad_x, reference.quantize(w, recipe.rhs), recipe)
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="NaN/Inf"):
        qk.quantize(torch.from_numpy(bad_w), recipe)
    with pytest.raises(ValueError, match="activations: NaN/Inf in 1 row"):
        qk.linear(torch.from_numpy(bad_x), qk.quantize(torch.from_numpy(w), recipe))
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(ValueError, match="NaN/Inf"):
        qk.quantize(jnp.asarray(bad_w), recipe, contracting_axes=(1,))


def test_jax_checkify_names_nonfinite_fp8_activations() -> None:
    jax = pytest.importorskip("jax")
    from jax.experimental import checkify

    rng = np.random.default_rng(4)
    w, x = testing.weights(rng, (6, 40)), _nonfinite(testing.activations(rng, (4, 40)), np.nan)
    w_q = qk.quantize(jax.numpy.asarray(w), qk.FP8, contracting_axes=(1,))
    err, _ = checkify.checkify(jax.jit(lambda a: qk.dot_general(a, w_q, DIMS, check_finite=True)))(x)
    assert "lhs (activations)" in str(err.get())


def _exact_rows(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Rows whose codes are small integers and one +-448 (scale 1): every partial sum of their products
    is an integer below 2**24, exact in f32 in any order."""
    x = rng.integers(-16, 17, (rows, k)).astype(np.float32)
    x[np.arange(rows), rng.integers(0, k, rows)] = 448.0
    return x


def test_torch_and_jax_fp8_outputs_are_identical_where_the_sum_is_exact() -> None:
    """Same inputs, same codes and an accumulation every order computes exactly: torch (emulated by
    upcasting) and XLA (float8 operands, f32 preferred type) give the reference's outputs bit for bit."""
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(5)
    x, w = _exact_rows(rng, 7, 64), _exact_rows(rng, 12, 64) * np.float32(0.25)
    expected = reference.qmatmul(x, reference.quantize(w, qk.FP8.rhs), qk.FP8)
    yt = qk.linear(torch.from_numpy(x), qk.quantize(torch.from_numpy(w), qk.FP8)).numpy()
    yj = np.asarray(qk.dot_general(jnp.asarray(x), qk.quantize(jnp.asarray(w), qk.FP8, contracting_axes=(1,)), DIMS))
    np.testing.assert_array_equal(yt, expected)
    np.testing.assert_array_equal(yj, expected)


@pytest.mark.parametrize("recipe", [qk.FP8, qk.FP8A16], ids=lambda r: r.name)
@pytest.mark.parametrize("out", ["float32", "bfloat16"])
def test_torch_and_jax_fp8_outputs_agree_within_the_bound(out: str, recipe: qk.Recipe) -> None:
    """Realistic data with bias: the f32 sums run in different orders (and XLA contracts the bias add),
    so torch and JAX differ by at most the sum of their two `testing.tolerances` to the reference."""
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(6)
    x, w = testing.activations(rng, (9, 1000)), testing.weights(rng, (33, 1000))
    b = rng.standard_normal(33).astype(np.float32)
    dt = getattr(torch, out)
    wt = qk.quantize(torch.from_numpy(w), recipe)
    yt = qk.linear(torch.from_numpy(x).to(dt), wt, torch.from_numpy(b).to(dt)).float().numpy()
    wj = qk.quantize(jnp.asarray(w), recipe, contracting_axes=(1,))
    yj = np.asarray(qk.dot_general(jnp.asarray(x).astype(out), wj, DIMS) + jnp.asarray(b).astype(out), np.float32)
    wq = reference.quantize(w, recipe.rhs)
    xr = x.astype(reference.np_dtype(out))
    bound = testing.tolerances(*testing.float_operands(xr, wq, recipe), out, b)
    testing.assert_within(yt, yj, 2 * bound, what="torch vs jax")
    # and not identical by construction: the fp8 result really differs from the float one
    assert testing.snr_db(yt, x.astype(np.float64) @ w.T.astype(np.float64) + b) < 60


def test_fp8_is_accurate_on_realistic_data() -> None:
    """Against the float matmul, fp8 keeps about 3 significant bits per operand: >= 25 dB (measured ~30)."""
    rng = np.random.default_rng(7)
    x, w = testing.activations(rng, (16, 2048)), testing.weights(rng, (64, 2048))
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    for recipe in (qk.FP8, qk.FP8A16):
        assert testing.snr_db(reference.qmatmul(x, reference.quantize(w, recipe.rhs), recipe), exact) >= 25


def test_torch_cpu_explain_says_the_fp8_dot_is_emulated() -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(3, 64)
    text = str(qk.explain(x, qk.quantize(torch.randn(8, 64), qk.FP8)))
    assert "-> torch-cpu" in text and "emulated: float8_e4m3fn codes upcast to float32" in text
    assert "emulated" not in str(qk.explain(x, qk.quantize(torch.randn(8, 64), qk.FP8A16)))
    assert "emulated" not in str(qk.explain(x, qk.quantize(torch.randn(8, 64), qk.W8A8)))


def test_prequantized_fp8_activations_give_the_same_outputs() -> None:
    rng = np.random.default_rng(8)
    x, w = testing.activations(rng, (5, 70)), testing.weights(rng, (9, 70))
    wq = reference.quantize(w, qk.FP8.rhs)
    xq = reference.quantize(x, qk.FP8.lhs)
    np.testing.assert_array_equal(reference.qmatmul(QOperand(xq.qvalue, xq.scale), wq, qk.FP8),
                                  reference.qmatmul(x, wq, qk.FP8))
