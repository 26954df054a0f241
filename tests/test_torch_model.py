"""PyTorch model-level workflows: quantize_ skips and summary, dtype moves, safe checkpoints (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qkernels as qk
from qkernels import testing


def _x(shape, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(testing.activations(np.random.default_rng(seed), shape)).to(dtype)


def _encoder_layer() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True).eval()


def test_quantize_skips_multihead_attention_out_proj_and_the_encoder_layer_runs():
    """`F.multi_head_attention_forward` reads `self_attn.out_proj.weight` as a float tensor: swapping
    out_proj crashed the forward inside torch; now it is skipped, with its reason in the summary."""
    layer = _encoder_layer()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = layer(x)
        summary = qk.quantize_(layer, qk.W8A8)
        actual = layer(x)
    assert summary.model is layer
    assert {r.name for r in summary.swapped} == {"linear1", "linear2"}
    (skipped,) = summary.skipped
    assert skipped.name == "self_attn.out_proj" and skipped.shape == (32, 32) and skipped.recipe is None
    assert "reads out_proj.weight directly" in skipped.reason
    assert isinstance(layer.linear1, qk.QLinear) and type(layer.self_attn.out_proj) is not qk.QLinear
    assert testing.snr_db(actual.numpy(), expected.numpy()) > 25
    assert "2 of 3 layers swapped" in str(summary) and "skipped: nn.MultiheadAttention" in str(summary)


def test_quantize_filter_fn_overrides_the_default_rule():
    layer = _encoder_layer()
    summary = qk.quantize_(layer, qk.W8A16, filter_fn=lambda m, fqn: fqn.endswith("out_proj"))
    assert [r.name for r in summary.swapped] == ["self_attn.out_proj"]
    assert {r.reason for r in summary.skipped} == {"filter_fn returned False"}
    with pytest.raises(TypeError, match="got a qkernels QTensor"):  # what the default rule protects against
        layer(torch.randn(2, 5, 32))


def test_quantize_skips_tied_weights():
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "proj": nn.Linear(16, 16)})
    summary = qk.quantize_(model, qk.W8A8)
    assert [r.name for r in summary.swapped] == ["proj"]
    assert summary.skipped[0].name == "head" and "tied" in summary.skipped[0].reason
    assert model["head"].weight is emb.weight


def test_quantize_a_bare_linear_returns_the_new_layer_in_the_summary():
    lin = nn.Linear(40, 8)
    summary = qk.quantize_(lin, qk.W4A8(32))
    assert isinstance(summary.model, qk.QLinear) and summary.layers[0].recipe == "w4a8-g32"


@pytest.mark.parametrize("recipe", [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A16(32), id="w4a16-g32"),
                                    pytest.param(qk.W4A8(32), id="w4a8-g32")])
@pytest.mark.parametrize("move, dtype", [
    pytest.param(lambda m: m.half(), torch.float16, id="half"),
    pytest.param(lambda m: m.bfloat16(), torch.bfloat16, id="bfloat16"),
    pytest.param(lambda m: m.to(torch.float16), torch.float16, id="to-f16"),
    pytest.param(lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16, id="to-cpu-bf16"),
])
def test_dtype_moves_keep_the_quantized_state(recipe, move, dtype):
    """`.half()` used to cast the scale buffers to f16 and the next forward failed with a shape/dtype
    error about `QTensor.scale`; now codes and scales are untouched, the bias and the outputs move."""
    torch.manual_seed(0)
    model = qk.quantize_(nn.Sequential(nn.Linear(70, 24), nn.ReLU(), nn.Linear(24, 9)), recipe).model
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("bias")}
    assert move(model) is model
    for k, v in model.state_dict().items():
        if k.endswith("bias"):
            assert v.dtype == dtype
        else:
            assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k
    x = _x((3, 70), dtype=dtype)
    y = model(x)
    assert y.dtype == dtype and y.shape == (3, 9)
    expected = qk.linear(torch.relu(qk.linear(x, model[0].weight, model[0].bias)), model[2].weight, model[2].bias)
    assert torch.equal(y, expected)
    model.float()
    assert model[0].bias.dtype == torch.float32 and model[0].scale.dtype == torch.float32


def test_qtensor_to_a_dtype_is_refused_clearly():
    wq = qk.quantize(torch.randn(8, 16), qk.W8A8)
    with pytest.raises(TypeError, match="no float dtype to change"):
        wq.to(torch.float16)


@pytest.mark.parametrize("recipe", [pytest.param(qk.W8A8, id="w8a8"),
                                    pytest.param(qk.W4A16(32, zero_point=True), id="w4a16-g32-zp")])
def test_qtensor_loads_with_weights_only(recipe, tmp_path):
    """`torch.load(weights_only=True)` (torch's default since 2.6) refused a saved QTensor."""
    wq = qk.quantize(torch.randn(37, 100), recipe)
    torch.save({"w": wq}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)["w"]
    assert isinstance(loaded, qk.QTensor) and loaded.recipe == wq.recipe and loaded.shape == wq.shape
    for a, b in zip(loaded.tensors(), wq.tensors()):
        assert torch.equal(a, b)


def test_weights_only_load_allows_the_qtensor_rebuild_only(tmp_path):
    """Only the QTensor rebuild is allowed: a pickle calling anything else still fails, and the rebuild
    validates what it is given (a recipe name, not an object; tensors of the recipe's shapes)."""
    import pickle

    from torch_bindings.qtensor import _rebuild_qtensor

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save(Evil(), tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="print"):
        torch.load(tmp_path / "evil.pt", weights_only=True)
    wq = qk.quantize(torch.randn(8, 64), qk.W8A8)
    with pytest.raises(ValueError, match="qvalue has shape"):
        _rebuild_qtensor(wq.qvalue, wq.scale, None, "w8a8", 8, 32)
    with pytest.raises(ValueError, match="not a saved QTensor"):
        _rebuild_qtensor(wq.qvalue, wq.scale, None, qk.W8A8, 8, 64)


def test_qlinear_state_loads_with_weights_only_and_refuses_another_shape(tmp_path):
    src = qk.quantize_(nn.Sequential(nn.Linear(128, 8)), qk.W4A16(32)).model
    torch.save(src.state_dict(), tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    target = qk.quantize_(nn.Sequential(nn.Linear(100, 8)), qk.W4A16(32)).model
    with pytest.raises(ValueError, match=r"'w4a16-g32' and \(out, in\) shape \[8, 128\], but this layer is "
                                         r"'w4a16-g32' \[8, 100\]"):
        target.load_state_dict(state)
    fresh = qk.quantize_(nn.Sequential(nn.Linear(128, 8)), qk.W4A16(32)).model
    fresh.load_state_dict(state)
    x = torch.randn(2, 128)
    assert torch.equal(fresh(x), src(x))
