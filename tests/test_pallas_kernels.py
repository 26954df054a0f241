"""Pallas kernels (TPU kernels interpreted on CPU, GPU kernels interpreted too) beyond the
conformance suite (test_conformance.py runs `pallas.interpret` through dispatch for every case):
the activation-quantization kernel, configs (decode table entries, block sizes that cannot change
numerics, VMEM bounds, strict parsing), race detection, the GPU (Triton-lowering) variants and
registration per platform.

Integer accumulators are compared with ==. Float outputs: W8A8 without bias is == (the kernel
honours DESIGN.md's order and XLA:CPU has nothing to contract); where a multiply feeds an add
(bias, W4A8's group sum) XLA:CPU — which executes interpret mode — contracts them into an FMA
(measured: `x * s + b` under jit differs from NumPy by an ulp), so those outputs are compared with
`qkernels.testing.assert_close`, as W4A16 always is (float path, accurate not bit-exact).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from qkernels import dispatch, hardware, reference, testing
from qkernels.formats import FP8, FP8A16, W4A8, W4A16, W8A8, W8A16, QOperand
from qkernels.kernels.pallas import configs, gpu, ops
from qkernels.kernels.pallas.configs import Family, TileConfig
from qkernels.numerics import GROUP_SIZES


def _data(seed: int, m: int, n: int, k: int, recipe):
    rng = np.random.default_rng(seed)
    x = testing.activations(rng, (m, k))
    rq = reference.quantize(testing.weights(rng, (n, k)), recipe.rhs)
    bias = rng.standard_normal(n).astype(np.float32)
    return x, rq, bias


def _jax(op: reference.RefQuantized) -> QOperand:
    return QOperand(*(None if a is None else jnp.asarray(a) for a in op.operand()))


def _float_operands(x, rq, recipe):
    """The float operands a backend multiplies, for `testing.tolerances`."""
    if recipe.lhs is None:
        return x, rq.dequantize(x.dtype)
    return reference.quantize(x, recipe.lhs).dequantize(), rq.dequantize()


@settings(max_examples=5)
@given(rows=st.integers(1, 80), k=st.integers(1, 700), seed=st.integers(0, 2**16), zero_rows=st.booleans())
def test_quantize_kernel_bit_exact_on_cpu(rows, k, seed, zero_rows):
    """Interpret mode divides correctly rounded, so codes and scales equal numerics.py's exactly.
    On TPU the division is approximate: a code may differ by one at a rounding tie (not tested here)."""
    x = testing.activations(np.random.default_rng(seed), (rows, k))
    if zero_rows:
        x[::2] = 0
    q, s = ops.quantize_activations(jnp.asarray(x), ops.Target.INTERPRET)[:2]
    ref = reference.quantize(x, W8A8.lhs)
    np.testing.assert_array_equal(np.asarray(q), ref.qvalue)
    np.testing.assert_array_equal(np.asarray(s), ref.scale)


def test_config_cannot_change_numerics():
    """Different block sizes, decode entry included: identical outputs (group order is kept)."""
    recipe = W4A8(64)
    x, rq, bias = _data(11, 40, 200, 700, recipe)
    kw = dict(group=64, out_dtype=jnp.float32, interpret=True)
    a_q, a_s = ops.quantize_activations(jnp.asarray(x)[None], ops.Target.INTERPRET)[:2]
    args = (a_q, a_s, jnp.asarray(rq.qvalue)[None], jnp.asarray(rq.scale)[None], jnp.asarray(bias))
    from qkernels.kernels.pallas import tpu

    small = TileConfig(block_m=32, block_n=128, block_k=256)
    outs = [np.asarray(tpu.w4a8(*args, config=c, **kw))
            for c in (small, *configs.tpu_configs("v6e", Family.W4A8))]
    for out in outs[1:]:
        np.testing.assert_array_equal(outs[0], out)


SMALL_M_RECIPES = {Family.W8A8: W8A8, Family.W4A16: W4A16(128, zero_point=True), Family.W4A8: W4A8(64)}
"""A recipe per TPU family to run its decode entries with (FP8 runs W8A8's kernel and entries)."""


def _small_m_configs():
    """Every distinct decode (max_m) table entry of every TPU generation, with its family."""
    seen = {(family, c) for arch in configs.TPU_GENERATIONS for family in SMALL_M_RECIPES
            for c in configs.tpu_configs(arch, family) if c.max_m is not None}
    return sorted(seen, key=lambda fc: (fc[0].value, fc[1].block_n, fc[1].block_k))


@pytest.mark.parametrize("m", [1, 3, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("family,config", [pytest.param(f, c, id=f"{f.value}-{c.name}") for f, c in _small_m_configs()])
def test_small_m_table_configs_match_reference(family, config, m):
    """Each decode entry, interpreted, on N and K just past its blocks (padded, several blocks):
    exact int32 accumulators (W8A8, W4A8 per group); outputs equal (W8A8) or within tolerance."""
    assert m <= config.max_m
    recipe = SMALL_M_RECIPES[family]
    n, k = config.block_n + 136, config.block_k + 200
    x, rq, bias = _data(m + config.block_n, m, n, k, recipe)
    if recipe.lhs is not None:
        acc = ops.accumulators(jnp.asarray(x), _jax(rq), recipe, config=config)
        np.testing.assert_array_equal(np.asarray(acc), reference.accumulators(x, rq, recipe))
    if family is Family.W8A8:
        out = ops.qmatmul(jnp.asarray(x), _jax(rq), recipe, config=config)
        np.testing.assert_array_equal(np.asarray(out), reference.qmatmul(x, rq, recipe))
        return
    out = ops.qmatmul(jnp.asarray(x), _jax(rq), recipe, bias=jnp.asarray(bias), config=config)
    testing.assert_close(out, reference.qmatmul(x, rq, recipe, bias=bias), *_float_operands(x, rq, recipe),
                         np.float32)


def test_interpret_runs_the_decode_entry_for_small_m():
    for family in configs.TPU_FAMILIES:
        assert ops.Target.INTERPRET.tile_config(family, 16) == configs.tpu_config("v5e", family, m=16)
        assert ops.Target.INTERPRET.tile_config(family, 16).max_m == configs.SMALL_M
        assert ops.Target.INTERPRET.tile_config(family, 17).max_m is None


def test_qmatmul_refuses_a_config_of_the_wrong_kind():
    recipe = W8A8
    x, rq, _ = _data(1, 2, 8, 16, recipe)
    with pytest.raises(ValueError, match="take a TileConfig"):
        ops.qmatmul(jnp.asarray(x), _jax(rq), recipe, config=configs.gpu_config(Family.W8A8))


def test_detect_races_small_case():
    recipe = W8A8
    x, rq, _ = _data(5, 40, 130, 300, recipe)
    acc = ops.accumulators(jnp.asarray(x), _jax(rq), recipe, interpret=pltpu.InterpretParams(detect_races=True))
    np.testing.assert_array_equal(np.asarray(acc), reference.accumulators(x, rq, recipe))


@pytest.mark.parametrize("recipe", [W8A8, W4A8(32), W4A16(128, zero_point=True)], ids=lambda r: r.name)
def test_gpu_kernels_interpreted(recipe):
    """The Triton-lowering variants, run by the Pallas interpreter."""
    x, rq, bias = _data(2, 17, 150, 300, recipe)
    cfg = configs.gpu_config(ops.family_of(recipe))
    w = (jnp.asarray(rq.qvalue)[None], jnp.asarray(rq.scale)[None])
    kw = dict(out_dtype=jnp.float32, config=cfg, interpret=True)
    if recipe.lhs is None:
        out = gpu.w4a16(jnp.asarray(x)[None], *w, jnp.asarray(rq.zero_point)[None], jnp.asarray(bias),
                        group=recipe.group_size, **kw)
    else:
        lq = reference.quantize(x, recipe.lhs)
        a = (jnp.asarray(lq.qvalue)[None], jnp.asarray(lq.scale)[None])
        if recipe.group_size:
            out = gpu.w4a8(*a, *w, jnp.asarray(bias), group=recipe.group_size, **kw)
        else:
            acc = gpu.w8a8(*a, *w, None, raw=True, **kw)
            np.testing.assert_array_equal(np.asarray(acc[0]), reference.accumulators(x, rq, recipe))
            out = gpu.w8a8(*a, *w, jnp.asarray(bias), **kw)
    testing.assert_close(out[0], reference.qmatmul(x, rq, recipe, bias=bias), *_float_operands(x, rq, recipe),
                         np.float32)


FP8_SHAPES = [pytest.param(m, n, k, id=f"M{m}-N{n}-K{k}") for m, n, k in ((1, 130, 200), (17, 150, 300), (64, 256, 384))]


@pytest.mark.parametrize("m,n,k", FP8_SHAPES)
@pytest.mark.parametrize("out", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("recipe", [FP8, FP8A16], ids=lambda r: r.name)
def test_gpu_fp8_kernels_interpreted(recipe, out, m, n, k):
    """The Triton-lowering FP8 (fp8 x fp8 -> f32, rescale fused) and FP8A16 kernels, interpreted, against
    the reference: awkward shapes (padded M, N and K), M=1, bias, every output dtype."""
    x, rq, bias = _data(m + n, m, n, k, recipe)
    w = (jnp.asarray(rq.qvalue)[None], jnp.asarray(rq.scale)[None])
    assert w[0].dtype == jnp.float8_e4m3fn
    kw = dict(out_dtype=jnp.dtype(out), config=configs.gpu_config(ops.family_of(recipe)), interpret=True)
    if recipe.lhs is None:
        x = x.astype(jnp.bfloat16)
        out_ = gpu.fp8a16(jnp.asarray(x)[None], *w, jnp.asarray(bias), **kw)
    else:
        lq = reference.quantize(x, recipe.lhs)
        out_ = gpu.fp8(jnp.asarray(lq.qvalue)[None], jnp.asarray(lq.scale)[None], *w, jnp.asarray(bias), **kw)
    assert out_.dtype == jnp.dtype(out) and out_.shape == (1, m, n)
    testing.assert_close(out_[0], reference.qmatmul(x, rq, recipe, bias=bias, out_dtype=out),
                         *_float_operands(x, rq, recipe), out, bias)


def test_tpu_fp8_kernel_interpreted_with_batched_weights():
    """The TPU FP8 kernel (W8A8's on float8 codes, f32 accumulator) through `ops.qmatmul`, per-batch weights."""
    rng = np.random.default_rng(7)
    x = testing.activations(rng, (3, 20, 300))
    rq = reference.quantize(testing.weights(rng, (3, 140, 300)), FP8.rhs)
    out = ops.qmatmul(jnp.asarray(x), _jax(rq), FP8, out_dtype=jnp.float32)
    testing.assert_close(out, reference.qmatmul(x, rq, FP8), *_float_operands(x, rq, FP8), np.float32)
    with pytest.raises(ValueError, match="no Pallas TPU kernel to run on interpret"):
        ops.qmatmul(jnp.asarray(x), _jax(reference.quantize(testing.weights(rng, (3, 140, 300)), FP8A16.rhs)), FP8A16)


def _problem(recipe, platform, **kw):
    return dispatch.Problem(recipe=recipe, m=4, n=64, k=128, act_dtype="bfloat16", out_dtype="bfloat16",
                            framework="jax", platform=platform, **kw)


@pytest.mark.parametrize("recipe", [W8A8, W4A8(128), W4A16(128)], ids=lambda r: r.name)
def test_dispatch_registration(recipe):
    family = ops.family_of(recipe).value
    assert dispatch.select(_problem(recipe, "tpu:v5e")).name == f"pallas.tpu.{family}"
    assert dispatch.select(_problem(recipe, "cuda:sm_90")).name == f"pallas.gpu.{family}"
    assert dispatch.select(_problem(recipe, "cpu"), backend="pallas").name == "pallas.interpret"
    auto = dispatch.select(_problem(recipe, "cpu"))
    assert auto.name != "pallas.interpret"  # negative priority: never chosen automatically
    with pytest.raises(dispatch.BackendUnavailable, match="cuda:sm_75"):
        dispatch.select(_problem(recipe, "cuda:sm_75"), backend="pallas.gpu")


@pytest.mark.parametrize("arch", ["v5e", "v6e", "v5p", "v4"])
def test_tpu_generations_without_an_fp8_mxu_refuse_fp8_with_that_reason(arch):
    """`qk.explain` (declared candidates only) shows the Pallas TPU FP8 kernel refusing with the
    hardware table's reason; on the generations with tables XLA serves the call."""
    explanation = dispatch.explain(_problem(FP8, f"tpu:{arch}"))
    reasons = {v.implementation.name: v.reason for v in explanation.verdicts}
    assert reasons["pallas.tpu.fp8"] == hardware.fp8_mma_reason(f"tpu:{arch}")
    assert reasons["pallas.tpu.fp8"].startswith(f"TPU {arch} has no fp8 MXU"), reasons
    if arch in configs.TPU_GENERATIONS:
        assert dispatch.select(_problem(FP8, f"tpu:{arch}")).name == "xla"


@pytest.mark.parametrize("recipe", [FP8, FP8A16], ids=lambda r: r.name)
def test_gpu_fp8_kernels_serve_sm_89_and_newer_only(recipe):
    for platform in ("cuda:sm_89", "cuda:sm_90"):
        assert dispatch.select(_problem(recipe, platform)).name == f"pallas.gpu.{recipe.tag}"
    for platform in ("cuda:sm_80", "cuda:sm_86"):
        reasons = {v.implementation.name: v.reason for v in dispatch.candidates(_problem(recipe, platform))}
        assert "has no fp8 tensor cores" in reasons[f"pallas.gpu.{recipe.tag}"], reasons
    note = dispatch.select(_problem(FP8, "cuda:sm_90")).note
    assert "f16 MMAs" in note(_problem(FP8, "cuda:sm_90")) and note(_problem(FP8, "cuda:sm_89")) is None


def test_tpu_v4_refused_for_int8_mxu():
    for recipe in (W8A8, W4A8(32)):
        reasons = {v.implementation.name: v.reason for v in dispatch.candidates(_problem(recipe, "tpu:v4"))}
        assert "Mosaic rejects int8 matmul on TPU v4" in reasons[f"pallas.tpu.{recipe.tag}"]
    w8a16 = {v.implementation.name: v.reason for v in dispatch.candidates(_problem(W8A16, "tpu:v5e"))}
    assert w8a16["pallas.tpu.w8a8"] == "serves recipes w8a8, not w8a16"
    assert all(r is not None for name, r in w8a16.items() if name.startswith("pallas"))


def test_tile_config_dict_round_trip_and_name():
    decode = TileConfig(block_m=32, block_n=2048, block_k=1024, max_m=16)
    assert decode.to_dict() == {"block_m": 32, "block_n": 2048, "block_k": 1024, "max_m": 16}
    assert TileConfig.from_dict(decode.to_dict()) == decode
    assert decode.name == decode.describe() == "bm32-bn2048-bk1024-M<=16"
    any_m = TileConfig.from_dict({"block_m": 512, "block_n": 512, "block_k": 1024})
    assert any_m.max_m is None and any_m.name == "bm512-bn512-bk1024-anyM"
    assert TileConfig.from_dict(any_m.to_dict()) == any_m


_OK = {"block_m": 32, "block_n": 128, "block_k": 256}
BAD_DICTS = [
    pytest.param({**_OK, "warps": 4}, r"unknown TileConfig keys \['warps'\]", id="unknown-key"),
    pytest.param({"block_m": 32, "block_n": 128}, r"lacks \['block_k'\]", id="missing-key"),
    pytest.param({**_OK, "block_n": 160}, "block_n=160 must be a multiple of 128", id="block_n-lanes"),
    pytest.param({**_OK, "block_k": 384}, "block_k=384 a multiple of 256", id="block_k-packed"),
    pytest.param({**_OK, "block_m": 48}, "block_m=48 must be a positive multiple of 32", id="block_m-sublanes"),
    pytest.param({**_OK, "max_m": 0}, "max_m=0 must be a positive row count", id="max_m-zero"),
    pytest.param({**_OK, "max_m": True}, "max_m=True must be an int or None", id="max_m-bool"),
    pytest.param({**_OK, "block_k": "256"}, "block_k='256' must be an int", id="string-value"),
    pytest.param([32, 128, 256], "a TileConfig is a JSON object", id="not-an-object"),
]


@pytest.mark.parametrize("raw,message", BAD_DICTS)
def test_tile_config_from_dict_is_strict(raw, message):
    with pytest.raises(ValueError, match=message):
        TileConfig.from_dict(raw)


@pytest.mark.parametrize("arch", configs.TPU_GENERATIONS)
def test_tpu_tables_ordered_by_max_m_and_within_scoped_vmem(arch):
    """Decode entry first, any-M entry last; every entry fits the generation's scoped VMEM at the
    largest M it serves for every group size, activation width and zero-point setting."""
    for family in configs.TPU_FAMILIES:
        table = configs.tpu_configs(arch, family)
        assert [c.max_m for c in table] == [configs.SMALL_M, None]
        assert configs.tpu_config(arch, family, m=1) is table[0]
        assert configs.tpu_config(arch, family, m=configs.SMALL_M) is table[0]
        assert configs.tpu_config(arch, family, m=configs.SMALL_M + 1) is table[1]
        groups = (None,) if family in (Family.W8A8, Family.FP8) else GROUP_SIZES
        for config in table:
            for group in groups:
                assert group is None or config.block_k % group == 0
                for act_bytes, zero_point in ((2, False), (4, False), (4, family is Family.W4A16)):
                    need = configs.vmem_estimate(config, family, m=config.max_m or 1024, act_bytes=act_bytes,
                                                 group=group, zero_point=zero_point)
                    assert need <= configs.SCOPED_VMEM[arch], (config.name, group, act_bytes, zero_point, need)


def test_unknown_tpu_generation_is_refused():
    with pytest.raises(ValueError, match="known generations: v5e, v6e, v5p"):
        configs.tpu_config("v4", Family.W8A8, m=1)
    with pytest.raises(ValueError, match="fp8a16 has no Pallas TPU kernel"):
        configs.tpu_config("v5e", Family.FP8A16, m=1)
    assert configs.tpu_configs("v6e", Family.FP8) == configs.tpu_configs("v6e", Family.W8A8)


@pytest.mark.parametrize("target", [ops.Target.INTERPRET, ops.Target.GPU], ids=["kernel", "xla-gpu-path"])
def test_quantize_subnormal_rows_match_the_reference(target):
    """Subnormals read as 0 and a scale below FLT_MIN becomes 1: XLA:CPU and TPUs flush subnormals,
    NumPy does not, and both give the reference's codes and scales."""
    x = testing.subnormal_rows()
    q, s = ops.quantize_activations(jnp.asarray(x), target)[:2]
    ref = reference.quantize(x, W8A8.lhs)
    np.testing.assert_array_equal(np.asarray(q), ref.qvalue)
    np.testing.assert_array_equal(np.asarray(s), ref.scale)
