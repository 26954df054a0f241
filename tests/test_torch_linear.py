"""The torch binding's own numerics helpers against the reference (every backend's `qk.linear` is in
test_conformance.py): dynamic activation quantization and int4 unpacking, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkernels as qk
from qkernels import numerics, reference, testing
from torch_bindings.ops import _to_numpy
from torch_bindings.qtensor import quantize_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@given(m=st.integers(1, 33), k=st.integers(1, 300), seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES))
def test_quantize_rows_matches_reference(m, k, seed, dtype):
    x = torch.from_numpy(testing.activations(np.random.default_rng(seed), (m, k))).to(dtype)
    a, s = quantize_rows(x)
    ref_x = reference.quantize(_to_numpy(x), qk.W8A8.lhs)
    np.testing.assert_array_equal(a.numpy(), ref_x.qvalue)
    np.testing.assert_array_equal(s.numpy(), ref_x.scale)


@pytest.mark.parametrize("qtype", [pytest.param(numerics.INT4, id="int4"), pytest.param(numerics.UINT4, id="uint4")])
def test_unpack_int4_every_byte_matches_numerics(qtype):
    from torch_bindings.qtensor import unpack_int4

    packed = torch.arange(256, dtype=torch.uint8).view(torch.int8).reshape(2, 128)
    np.testing.assert_array_equal(unpack_int4(packed, qtype.signed).numpy(),
                                  numerics.unpack_int4(packed.numpy(), 256, qtype))
