"""Importers of GPTQ / AWQ / compressed-tensors layers: every code and zero point kept, the library's own
dequantization reproduced bit for bit, and what cannot be served refused with a reason."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import qkernels as qk
from qkernels import importers, reference

N, K, G = 24, 96, 32  # N a multiple of 8 (packed zero points), K of the group size


def pack_words(fields: np.ndarray, axis: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """Independent packer (a loop over documented bit positions): 8 nibbles per int32 along `axis`."""
    f = np.moveaxis(np.asarray(fields, np.uint32), axis, 0)
    out = np.zeros((f.shape[0] // 8, *f.shape[1:]), np.uint32)
    for w in range(out.shape[0]):
        for i in range(8):
            pos = w * 8 + (order[i] if order else i)
            out[w] |= (f[pos] & 0xF) << np.uint32(4 * i)
    return np.moveaxis(out, 0, axis).view(np.int32)


def layer(seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (N, K), dtype=np.int8)  # all 16 codes, -8 included in signed terms
    zeros = rng.integers(0, 16, (N, K // G), dtype=np.int8)
    scales = (rng.uniform(0.5, 2.0, (N, K // G)) * 0.01).astype(np.float16)
    return codes, zeros, scales


def expect(imp: importers.Imported, codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray) -> None:
    fmt = imp.recipe.rhs
    assert imp.recipe == qk.W4A16(G, zero_point=True) and imp.shape == (N, K)
    np.testing.assert_array_equal(fmt.codes(imp.operand, K), codes)
    np.testing.assert_array_equal(imp.operand.zero_point, zeros)
    np.testing.assert_array_equal(imp.operand.scale, scales.astype(np.float32))
    want = (codes.astype(np.float32) - np.repeat(zeros, G, 1)) * np.repeat(scales.astype(np.float32), G, 1)
    np.testing.assert_array_equal(fmt.dequantize(imp.operand, K), want)
    x = np.random.default_rng(9).standard_normal((3, K)).astype(np.float32)
    rq = reference.RefQuantized(qvalue=imp.operand.qvalue, scale=imp.operand.scale,
                                zero_point=imp.operand.zero_point, fmt=fmt, k=K)
    np.testing.assert_allclose(reference.qmatmul(x, rq, imp.recipe), x @ want.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_layer(checkpoint_format):
    codes, zeros, scales = layer(1)
    stored = zeros - 1 if checkpoint_format == "gptq" else zeros  # v1 stores zero - 1 (0 wraps to 15)
    imp = importers.from_gptq(pack_words(codes.T, 0), pack_words((stored.astype(np.int16) & 0xF).T, 1),
                              scales.T, np.arange(K) // G, group_size=G, checkpoint_format=checkpoint_format)
    if checkpoint_format == "gptq":  # a zero of 0 reads back as 16, as the libraries' own kernels read it
        zeros = np.where(zeros == 0, 16, zeros).astype(np.int8)
    expect(imp, codes, zeros, scales)


def test_awq_layer():
    codes, zeros, scales = layer(2)
    imp = importers.from_awq(pack_words(codes.T, 1, importers.AWQ_ORDER), pack_words(zeros.T, 1, importers.AWQ_ORDER),
                             scales.T, group_size=G)
    expect(imp, codes, zeros, scales)


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="compressed-tensors not installed")
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_layer_with_its_own_packer(symmetric):
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    codes, zeros, scales = layer(3)
    signed = torch.from_numpy(codes.astype(np.int8) - 8)  # compressed-tensors' codes are signed
    zp_signed = torch.from_numpy((zeros if not symmetric else np.full_like(zeros, 8)).astype(np.int8) - 8)
    packed = pack_to_int32(signed, 4)
    zp = None if symmetric else pack_to_int32(zp_signed, 4, packed_dim=0)
    imp = importers.from_compressed_tensors(packed.numpy(), scales, np.array([N, K]), None if zp is None else zp.numpy(),
                                            group_size=G)
    expect(imp, codes, (zp_signed.numpy() + 8).astype(np.int8), scales)
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=G, symmetric=symmetric)
    theirs = dequantize(signed, torch.from_numpy(scales.astype(np.float32)),
                        None if symmetric else zp_signed, args, dtype=torch.float32)
    np.testing.assert_array_equal(imp.recipe.rhs.dequantize(imp.operand, K), theirs.numpy())


def test_unservable_layers_are_refused_with_the_reason():
    codes, zeros, scales = layer(4)
    qw, qz = pack_words(codes.T, 0), pack_words(zeros.T, 1)
    perm = np.random.default_rng(0).permutation(K) // G
    with pytest.raises(ValueError, match="act-order"):
        importers.from_gptq(qw, qz, scales.T, perm, group_size=G)
    with pytest.raises(ValueError, match="per-channel"):
        importers.from_gptq(qw, qz, scales.T, group_size=-1)
    with pytest.raises(ValueError, match="8-bit"):
        importers.from_gptq(qw, qz, scales.T, bits=8, group_size=G)
    with pytest.raises(ValueError, match=r"do not match \(N, G\)"):
        importers.from_gptq(qw, qz, scales.T, group_size=64)
    bad = scales.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf scale"):
        importers.from_awq(pack_words(codes.T, 1, importers.AWQ_ORDER), pack_words(zeros.T, 1, importers.AWQ_ORDER),
                           bad.T, group_size=G)
    with pytest.raises(TypeError, match="int32 words"):
        importers.unpack_int32(codes, 0)
