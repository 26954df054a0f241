"""torch: method "gptq-synthetic", GPTQ calibrated on random token ids (`torch_bindings.synthetic`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import qkernels as qk  # noqa: E402
from torch_bindings import synthetic  # noqa: E402


class TokenModel(nn.Module):
    """Embedding -> LayerNorm -> MLP, with outlier and correlated channels in the embeddings (as a
    transformer's residual stream has): where GPTQ's Hessians pay over round to nearest."""

    def __init__(self, vocab: int = 300, d: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        low_rank = torch.randn(vocab, 8, generator=g) @ torch.randn(8, d, generator=g)
        self.embed.weight.data = low_rank + 0.3 * torch.randn(vocab, d, generator=g)
        self.embed.weight.data[:, :4] *= 8.0
        self.norm = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 128), nn.Linear(128, d)
        for lin in (self.up, self.down):
            lin.weight.data = torch.randn(lin.weight.shape, generator=g) * 0.1

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(self.norm(self.embed(input_ids)))))


def test_token_batches_are_seeded_in_range_and_batched():
    model = TokenModel()
    got = synthetic.token_batches(model, sequences=100, length=7, batch=32, seed=3)
    assert [b["input_ids"].shape for b in got] == [(32, 7)] * 3 + [(4, 7)]
    ids = torch.cat([b["input_ids"] for b in got])
    assert ids.dtype == torch.int64 and ids.min() >= 0 and ids.max() < 300
    assert len(ids.unique()) > 250, "uniform over the vocabulary: most ids appear in 700 draws of 300"
    again = torch.cat([b["input_ids"] for b in synthetic.token_batches(model, sequences=100, length=7, seed=3)])
    assert torch.equal(ids, again)
    assert not torch.equal(ids, torch.cat([b["input_ids"] for b in synthetic.token_batches(
        model, sequences=100, length=7, seed=4)]))


def test_gptq_synthetic_keeps_the_output_better_than_data_free_weight_methods():
    model = TokenModel().eval()
    held_out = torch.cat([b["input_ids"] for b in synthetic.token_batches(model, sequences=64, length=12, seed=99)])
    with torch.no_grad():
        ref = model(held_out)
    recipe = qk.W4A16(32, zero_point=True)
    err = {}
    for method in ("rtn", "mse", "gptq-synthetic"):
        summary = qk.quantize_(copy.deepcopy(model), recipe, method=method, progress=False)
        assert [row.name for row in summary.layers if row.recipe] == ["up", "down"]
        with torch.no_grad():
            err[method] = float(((summary.model(held_out) - ref) ** 2).mean() / (ref ** 2).mean())
    assert err["gptq-synthetic"] < 0.8 * min(err["rtn"], err["mse"]), err
    # the same as GPTQ in act-order with clip-searched groups on those batches, given as calibration
    by_hand = qk.quantize_(copy.deepcopy(model), recipe, method="gptq-ao-mse", progress=False, sequential=False,
                           calibration=synthetic.token_batches(model)).model
    auto = qk.quantize_(copy.deepcopy(model), recipe, method="gptq-synthetic", progress=False).model
    assert np.array_equal(by_hand.up.qvalue.numpy(), auto.up.qvalue.numpy())


def test_gptq_synthetic_refuses_what_it_cannot_feed():
    mlp = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="no token embedding.*calibration="):
        qk.quantize_(mlp, qk.W4A16(32), method="gptq-synthetic")
    with pytest.raises(ValueError, match="takes no calibration batches.*gptq-ao-mse"):
        qk.quantize_(TokenModel(), qk.W4A16(32), method="gptq-synthetic", calibration=[torch.zeros(1, 4).long()])
    with pytest.raises(ValueError, match="sequences=0"):
        synthetic.token_batches(TokenModel(), sequences=0)
