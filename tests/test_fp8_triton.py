"""The Triton fp8 kernels against `qkernels.reference`: compiled on a CUDA GPU when one is present, else
in the interpreter on CPU (TRITON_INTERPRET=1, set by conftest).

What the conformance suite (every `triton.*` implementation through dispatch, FP8 and FP8A16 included)
does not reach: the fused fp8 activation quantization bit for bit (rounding ties, saturation,
subnormal codes, -0), explicit tile / GEMV / split-K configs on awkward shapes, M=1, bias and every
output dtype, the gfx942 (fnuz) form of the tile kernel, batched weights, the launchers' errors and
which platforms the fp8 families serve. Outputs are within `testing.tolerances` (the f32 sum order
differs from the reference's); forms with the same sum order are compared with ==.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from _triton_target import DEVICE, INTERPRET, t, torch  # skips the module without a GPU or interpreter

sys.path.insert(0, str(Path(__file__).parent))
from test_fp8 import _tie_rows  # noqa: E402

from qkernels import dispatch, numerics, reference, testing  # noqa: E402
from qkernels.formats import FP8, FP8A16  # noqa: E402
from qkernels.kernels.triton import FAMILIES, MatmulConfig, fp8_matmul, fp8a16_matmul, quantize_rows  # noqa: E402
from qkernels.kernels.triton._common import Kernel  # noqa: E402
from qkernels.kernels.triton.fp8 import launch_fp8  # noqa: E402

OUT_DTYPES = ("float32", "bfloat16", "float16")
TILE = MatmulConfig(block_m=16, block_n=16, block_k=32, num_warps=1, num_stages=1)
CONFIGS = [
    pytest.param(TILE, id="tile"),
    pytest.param(MatmulConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1, split_k=3), id="split3"),
    pytest.param(MatmulConfig(block_m=4, block_n=16, block_k=32, num_warps=1, num_stages=1, kernel=Kernel.GEMV),
                 id="gemv"),
    pytest.param(MatmulConfig(block_m=2, block_n=16, block_k=32, num_warps=1, num_stages=1, kernel=Kernel.GEMV,
                              split_k=2), id="gemv-split2"),
]
SHAPES = [pytest.param(m, n, k, id=f"M{m}-N{n}-K{k}") for m, n, k in ((1, 1, 1), (1, 40, 97), (3, 17, 65), (19, 33, 130))]


def codes(q: np.ndarray) -> torch.Tensor:
    """float8_e4m3fn NumPy codes on the test device (torch cannot read ml_dtypes arrays)."""
    return torch.from_numpy(np.ascontiguousarray(q).view(np.uint8)).view(torch.float8_e4m3fn).to(DEVICE)


def bits(q: torch.Tensor) -> np.ndarray:
    return q.cpu().view(torch.uint8).numpy()


def data(seed: int, m: int, n: int, k: int, batch: int | None = None):
    rng = np.random.default_rng(seed)
    lead = (batch,) if batch else ()
    x = testing.activations(rng, (*lead, m, k))
    w = testing.weights(rng, (*lead, n, k))
    return x, w, rng.standard_normal(n).astype(np.float32)


# ---------------------------------------------------------------- activation quantization


@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_quantize_rows_fp8_is_bit_exact(dtype: str) -> None:
    """Codes (bytes, so -0 too) and scales equal the reference's: rounding ties (scale 1), realistic rows,
    the subnormal rules, tiny negative values (codes -0) and saturation at +-448."""
    rng = np.random.default_rng(0)
    tiny = -np.abs(testing.activations(rng, (3, 100))) * 1e-3
    tiny[:, 0] = -1.0
    for x in (_tie_rows(rng, 12, 150), testing.activations(rng, (9, 257)), testing.subnormal_rows(64), tiny):
        xt = t(x).to(getattr(torch, dtype))
        q, s = quantize_rows(xt, qtype=numerics.FP8_E4M3)
        want = reference.quantize(xt.float().cpu().numpy(), FP8.lhs)
        assert q.dtype == torch.float8_e4m3fn and q.shape == xt.shape
        np.testing.assert_array_equal(bits(q), want.qvalue.view(np.uint8))
        np.testing.assert_array_equal(s.cpu().numpy(), want.scale)


def test_quantize_rows_fp8_strided_and_non_finite_rows() -> None:
    x = testing.activations(np.random.default_rng(1), (2, 70, 5))
    xt = t(x).transpose(1, 2)  # (2, 5, 70), K strided
    q, s = quantize_rows(xt, qtype=numerics.FP8_E4M3)
    want = reference.quantize(np.ascontiguousarray(np.swapaxes(x, 1, 2)), FP8.lhs)
    np.testing.assert_array_equal(bits(q), want.qvalue.view(np.uint8))
    bad = torch.ones((3, 8), device=DEVICE)
    bad[1, 2], bad[2, 5] = float("nan"), float("inf")
    _, s = quantize_rows(bad, qtype=numerics.FP8_E4M3)
    assert s[0] == pytest.approx(1 / 448) and torch.isnan(s[1]) and torch.isnan(s[2])
    with pytest.raises(ValueError, match="writes .* codes, not uint4"):
        quantize_rows(bad, qtype=numerics.UINT4)


# ---------------------------------------------------------------- matmuls


def _expect(y: torch.Tensor, x: np.ndarray, wq, recipe, bias, out: str) -> None:
    assert y.dtype == getattr(torch, out)
    expected = reference.qmatmul(x, wq, recipe, bias=bias, out_dtype=out)
    testing.assert_close(y.float().cpu().numpy(), expected, *testing.float_operands(x, wq, recipe), out, bias)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_fp8_matmul_matches_the_reference(config: MatmulConfig, m: int, n: int, k: int) -> None:
    """Tile, split-K and GEMV on awkward shapes (M=1, K=1, odd K, partial blocks), bias alternating,
    every output dtype."""
    x, w, bias = data(m + n + k, m, n, k)
    wq = reference.quantize(w, FP8.rhs)
    q, s = quantize_rows(t(x), qtype=numerics.FP8_E4M3)
    for i, out in enumerate(OUT_DTYPES):
        b = bias if i % 2 == 0 else None
        y = fp8_matmul(q, s, codes(wq.qvalue), t(wq.scale), t(b), out_dtype=out, config=config)
        _expect(y, x, wq, FP8, b, out)


def test_fp8_matmul_batched_weights_and_shared_weight() -> None:
    x, w, bias = data(3, 6, 20, 70, batch=2)
    q, s = quantize_rows(t(x), qtype=numerics.FP8_E4M3)
    wq = reference.quantize(w, FP8.rhs)
    y = fp8_matmul(q, s, codes(wq.qvalue), t(wq.scale), t(bias), out_dtype="float32", config=TILE)
    _expect(y, x, wq, FP8, bias, "float32")
    shared = reference.quantize(w[0], FP8.rhs)
    y = fp8_matmul(q, s, codes(shared.qvalue), t(shared.scale), None, out_dtype="float32", config=TILE)
    _expect(y, x, shared, FP8, None, "float32")


@pytest.mark.skipif(not INTERPRET, reason="the fnuz form is gfx942's; elsewhere only the interpreter runs both")
@pytest.mark.parametrize("split", [1, 2], ids=["tile", "split2"])
def test_fnuz_form_is_bit_identical(split: int) -> None:
    """gfx942's form (codes read as e4m3fnuz, accumulator x4) sums the same values in the same order:
    outputs equal the e4m3fn form's bit for bit, -0 codes (NaN in fnuz) included."""
    x, w, bias = data(4, 9, 40, 200)
    x[:, 1::7] = -1e-6  # codes -0 after quantization
    wq = reference.quantize(w, FP8.rhs)
    q, s = quantize_rows(t(x), qtype=numerics.FP8_E4M3)
    assert (bits(q) == 0x80).any()
    cfg = MatmulConfig(block_m=16, block_n=16, block_k=32, num_warps=1, num_stages=1, split_k=split)
    ys = [launch_fp8(q, s, codes(wq.qvalue), t(wq.scale), t(bias), out_dtype="float32", config=cfg, fnuz=f)
          for f in (False, True)]
    assert not torch.isnan(ys[1]).any()
    assert torch.equal(ys[0], ys[1])


@pytest.mark.parametrize("config", CONFIGS[:3])
@pytest.mark.parametrize("act", ["bfloat16", "float16"])
def test_fp8a16_matmul_matches_the_reference(config: MatmulConfig, act: str) -> None:
    for m, n, k in ((1, 40, 97), (19, 33, 130)):
        x, w, bias = data(m, m, n, k)
        x = x.astype(reference.np_dtype(act))
        wq = reference.quantize(w, FP8A16.rhs)
        xt = t(x.astype(np.float32)).to(getattr(torch, act))
        for out in OUT_DTYPES:
            y = fp8a16_matmul(xt, codes(wq.qvalue), t(wq.scale), t(bias), out_dtype=out, config=config)
            _expect(y, x, wq, FP8A16, bias, out)


# ---------------------------------------------------------------- errors and platforms


def test_launcher_errors_name_the_fix() -> None:
    x, w, _ = data(5, 4, 8, 64)
    wq = reference.quantize(w, FP8.rhs)
    q8, s8 = quantize_rows(t(x))  # int8 codes
    with pytest.raises(TypeError, match="FP8 takes float8_e4m3fn activation codes, got lhs int8"):
        fp8_matmul(q8, s8, codes(wq.qvalue), t(wq.scale))
    q, s = quantize_rows(t(x), qtype=numerics.FP8_E4M3)
    with pytest.raises(TypeError, match="rhs has dtype int8; FP8 weights"):
        fp8_matmul(q, s, t(np.zeros((8, 64), np.int8)), t(wq.scale))
    with pytest.raises(TypeError, match="FP8A16 activations have dtype float32"):
        fp8a16_matmul(t(x), codes(wq.qvalue), t(wq.scale))


def _problem(recipe, platform: str) -> dispatch.Problem:
    return dispatch.Problem(recipe=recipe, m=8, n=64, k=64, act_dtype="bfloat16", out_dtype="bfloat16",
                            framework="torch", platform=platform)


@pytest.mark.parametrize("platform,served", [("cuda:sm_80", False), ("cuda:sm_86", False), ("cuda:sm_89", True),
                                             ("cuda:sm_90", True), ("rocm:gfx942", True), ("rocm:gfx90a", False)])
def test_fp8_families_serve_fp8_tensor_core_gpus_only(platform: str, served: bool) -> None:
    fams = {f.name: f for f in FAMILIES}
    for recipe in (FP8, FP8A16):
        reason = fams[recipe.tag].reason(_problem(recipe, platform))
        if served:
            assert reason is None, (recipe.name, platform, reason)
        else:
            assert "fp8" in reason and platform.split(":")[1] in reason, reason
    assert fams["w8a8"].reason(_problem(FP8, "cuda:sm_90")).startswith("weights float8_e4m3fn per-row are not int8")


def test_dispatch_chooses_the_fp8_kernels_when_asked() -> None:
    import qkernels as qk

    x, w, _ = data(6, 5, 24, 64)
    prefix = "triton.interpret." if INTERPRET else "triton."
    for recipe, act in ((qk.FP8, "float32"), (qk.FP8A16, "bfloat16")):
        w_q = qk.quantize(torch.from_numpy(w), recipe).to(DEVICE)
        xx = t(x).to(getattr(torch, act))
        with qk.use_backend(prefix + recipe.tag):
            assert qk.explain(xx, w_q).chosen.name == prefix + recipe.tag
            y = qk.linear(xx, w_q)
        _expect(y, x.astype(reference.np_dtype(act)), reference.quantize(w, recipe.rhs), recipe, None, act)
    assert ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max == numerics.FP8_E4M3.qmax
