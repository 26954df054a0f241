"""Numerics contract: quantize/dequantize, packing, calibration edge cases, formats and recipes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qkernels as qk
from qkernels import numerics, reference
from qkernels.formats import OperandFormat
from qkernels.numerics import GROUP_SIZES, INT4, INT8, UINT4, Granularity

FORMATS = [
    pytest.param(OperandFormat(qtype=INT8, granularity=Granularity.ROW), id="int8-row"),
    pytest.param(OperandFormat(qtype=INT8, granularity=Granularity.TENSOR), id="int8-tensor"),
    *(pytest.param(OperandFormat(qtype=INT4, granularity=Granularity.GROUP, group_size=g), id=f"int4-g{g}")
      for g in GROUP_SIZES),
    *(pytest.param(OperandFormat(qtype=UINT4, granularity=Granularity.GROUP, group_size=g, zero_point=True),
                   id=f"uint4zp-g{g}") for g in GROUP_SIZES),
    pytest.param(OperandFormat(qtype=INT8, granularity=Granularity.GROUP, group_size=32), id="int8-g32"),
]

finite_f32 = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)


def arrays(max_k: int = 300):
    shapes = st.tuples(st.integers(1, 4), st.integers(1, max_k))
    return shapes.flatmap(lambda s: hnp.arrays(np.float32, s, elements=finite_f32))


def _block_scale(q: reference.RefQuantized) -> np.ndarray:
    """Scale broadcast to each element of the logical array."""
    kp = q.fmt.padded_k(q.k)
    if q.fmt.granularity is Granularity.GROUP:
        per_element = np.repeat(q.scale, q.fmt.group_size, axis=-1)
    else:
        per_element = q.scale[..., None] if q.fmt.granularity is Granularity.ROW else q.scale
    return np.broadcast_to(per_element, (*q.qvalue.shape[:-1], kp))[..., :q.k]


@pytest.mark.parametrize("fmt", FORMATS)
@given(x=arrays())
def test_roundtrip_error_is_at_most_half_a_step(fmt: OperandFormat, x: np.ndarray) -> None:
    q = reference.quantize(x, fmt)
    err = np.abs(q.dequantize().astype(np.float64) - x)
    # Half a quantization step, plus f32 rounding of x/scale and of the dequantized product.
    step = _block_scale(q).astype(np.float64)
    assert np.all(err <= step / 2 + step * 2**-20 + np.abs(x) * 2**-22), err.max()


@pytest.mark.parametrize("fmt", FORMATS)
@given(x=arrays(), zeros=st.integers(1, 5))
def test_codes_stay_in_range_and_zero_point_rule(fmt: OperandFormat, x: np.ndarray, zeros: int) -> None:
    """Codes lie in [qmin, qmax]; the K padding holds the code of 0.0 (the zero point of the row's
    last group, or 0); and 0.0 dequantizes to exactly 0.0 (every `zeros`-th value is set to 0)."""
    x = x.copy()
    x[..., ::zeros] = 0
    q = reference.quantize(x, fmt)
    c = reference.codes(q.operand(), fmt, q.k)
    assert c.min() >= fmt.qtype.qmin and c.max() <= fmt.qtype.qmax
    pad = c[..., q.k:]
    if fmt.zero_point:
        # zero is an integer code in range; the padding (zeros before calibration) holds it
        assert q.zero_point.min() >= 0 and q.zero_point.max() <= fmt.qtype.qmax
        np.testing.assert_array_equal(pad, np.broadcast_to(q.zero_point[..., -1:], pad.shape))
    else:
        assert q.zero_point is None
        np.testing.assert_array_equal(pad, 0)
    np.testing.assert_array_equal(q.dequantize()[x == 0], 0)


@pytest.mark.parametrize("fmt", FORMATS)
@given(x=arrays())
def test_quantize_is_idempotent_on_representable_inputs(fmt: OperandFormat, x: np.ndarray) -> None:
    """Re-quantizing dequantized values reproduces the codes exactly; re-calibration may move a
    scale by an f32 rounding of `qmax * scale / qmax`, never more."""
    once = reference.quantize(x, fmt)
    twice = reference.quantize(once.dequantize(), fmt)
    np.testing.assert_array_equal(twice.qvalue, once.qvalue)
    if fmt.zero_point:
        np.testing.assert_array_equal(twice.zero_point, once.zero_point)
    np.testing.assert_allclose(twice.scale, once.scale, rtol=4 * np.finfo(np.float32).eps)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [1, 7, 64, 129])
def test_all_zero_input_gives_zero_codes_and_unit_scale(fmt: OperandFormat, k: int) -> None:
    q = reference.quantize(np.zeros((3, k), np.float32), fmt)
    np.testing.assert_array_equal(q.scale, np.ones_like(q.scale))
    np.testing.assert_array_equal(q.dequantize(), np.zeros((3, k), np.float32))
    if fmt.zero_point:
        np.testing.assert_array_equal(q.zero_point, 0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nan_or_inf_raises_naming_the_tensor(fmt: OperandFormat, bad: float) -> None:
    x = np.ones((2, 40), np.float32)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="my_weight contains 1 NaN/Inf"):
        reference.quantize(x, fmt, name="my_weight")


@pytest.mark.parametrize("qtype", [INT4, UINT4], ids=["int4", "uint4"])
@given(data=st.data(), k=st.integers(1, 65), rows=st.integers(1, 3))
def test_pack_unpack_is_a_bijection(qtype, data, k: int, rows: int) -> None:
    codes = data.draw(hnp.arrays(np.int8, (rows, k), elements=st.integers(qtype.qmin, qtype.qmax)))
    packed = numerics.pack_int4(codes)
    assert packed.shape == (rows, (k + 1) // 2) and packed.dtype == np.int8
    np.testing.assert_array_equal(numerics.unpack_int4(packed, k, qtype), codes)
    if k % 2:  # odd K: the pad nibble is zero
        assert np.all(packed.view(np.uint8)[:, -1] >> 4 == 0)


def test_pack_layout_low_nibble_is_even_k() -> None:
    packed = numerics.pack_int4(np.array([[1, -2, 7]], np.int8))
    assert packed.view(np.uint8).tolist() == [[0xE1, 0x07]]


def test_every_byte_unpacks_and_repacks() -> None:
    every_byte = np.arange(256, dtype=np.uint8).view(np.int8)[None, :]
    for qtype in (INT4, UINT4):
        np.testing.assert_array_equal(numerics.pack_int4(numerics.unpack_int4(every_byte, 512, qtype)), every_byte)


@pytest.mark.parametrize(("x", "expected"), [
    ([0.5, 1.5, 2.5, -0.5, -2.5, 2.4999], [0, 2, 2, 0, -2, 2]),
])
def test_round_half_even(x, expected) -> None:
    np.testing.assert_array_equal(numerics.round_half_even(np.array(x, np.float32)), expected)


def test_symmetric_saturates_and_never_produces_the_most_negative_code() -> None:
    s = np.float32(1.0)
    np.testing.assert_array_equal(numerics.quantize_symmetric(np.array([-1e9, -127.6, 1e9], np.float32), s, INT8),
                                  [-127, -127, 127])
    np.testing.assert_array_equal(numerics.quantize_symmetric(np.array([-9.0, 9.0], np.float32), s, INT4), [-7, 7])


def test_scale_uses_ieee_division() -> None:
    amax = np.float32(1.0)
    assert numerics.symmetric_scale(amax, INT8) == np.float32(1.0) / np.float32(127)


def test_overflow_bounds() -> None:
    assert numerics.max_exact_k(INT8, INT8) == 133_144
    assert 133_144 * 127 * 127 < 2**31 <= 133_145 * 127 * 127
    assert qk.W8A8.max_k == 133_144 and qk.W4A16().max_k is None and qk.W4A8().max_k is None
    qk.W8A8.check_k(133_144)
    with pytest.raises(ValueError, match="K=133145 exceeds 133144"):
        qk.W8A8.check_k(133_145)


def test_padding_recorded() -> None:
    q = reference.quantize(np.ones((2, 100), np.float32), qk.W4A16(64).rhs)
    assert q.k == 100 and q.shape == (2, 100)
    assert q.qvalue.shape == (2, 64) and q.scale.shape == (2, 2)  # K padded to 128, two codes per byte


@pytest.mark.parametrize("recipe", [qk.W8A8, qk.W8A16, qk.W4A16(32), qk.W4A16(256, zero_point=True),
                                    qk.W4A8(64), qk.W8A8(quantized_backward=True)], ids=lambda r: r.name)
def test_recipe_names_round_trip(recipe) -> None:
    assert qk.parse_recipe(recipe.name) == recipe
    assert hash(recipe) == hash(qk.parse_recipe(recipe.name))


def test_recipes_accept_class_instance_and_positional_group_size() -> None:
    assert qk.resolve_recipe(qk.W8A8) == qk.W8A8
    assert qk.W4A16(128) == qk.W4A16(group_size=128)
    assert qk.resolve_recipe(None) == qk.W8A8


@pytest.mark.parametrize(("make", "message"), [
    (lambda: qk.W4A16(100), "group_size=100 is not supported"),
    (lambda: qk.W4A8(group_size=16), "group_size=16 is not supported"),
    (lambda: qk.parse_recipe("w3a3"), "unknown recipe name"),
    (lambda: qk.parse_recipe("w8a8-g128"), "takes no group size"),
    (lambda: qk.resolve_recipe(42), "is not a recipe"),
    (lambda: OperandFormat(qtype=UINT4, granularity=Granularity.GROUP, group_size=32), "need zero_point=True"),
])
def test_bad_formats_raise_clearly(make, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        make()
