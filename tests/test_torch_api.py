"""PyTorch API: custom ops (opcheck), torch.compile, QLinear/quantize_, autograd, save/load, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qkernels as qk
from qkernels import testing
from torch_bindings import LINEAR

RECIPES = [
    pytest.param(qk.W8A8, id="w8a8"),
    pytest.param(qk.W8A16, id="w8a16"),
    pytest.param(qk.W4A16(32), id="w4a16-g32"),
    pytest.param(qk.W4A16(32, zero_point=True), id="w4a16-g32-zp"),
    pytest.param(qk.W4A8(32), id="w4a8-g32"),
]
# Signal-to-noise floors (dB) of a quantized 100 -> 37 -> 19 MLP against the float model.
SNR_FLOOR_DB = {"w8a8": 30.0, "w8a16": 35.0, "w4a16-g32": 15.0, "w4a16-g32-zp": 15.0, "w4a8-g32": 15.0}


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(100, 37), nn.ReLU(), nn.Linear(37, 19, bias=False))


def _x(shape, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(testing.activations(np.random.default_rng(seed), shape)).to(dtype)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("with_bias", [pytest.param(True, id="bias"), pytest.param(False, id="nobias")])
def test_opcheck(recipe, with_bias):
    wq = qk.quantize(torch.randn(11, 45) * 0.02, recipe)
    x = _x((5, 45)).requires_grad_(True)
    bias = torch.randn(11, requires_grad=True) if with_bias else None
    torch.library.opcheck(LINEAR, (x, wq.qvalue, wq.scale, wq.zero_point, bias, recipe.name))


@pytest.mark.parametrize("recipe", [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A16(32), id="w4a16-g32")])
def test_compile_fullgraph_matches_eager(recipe):
    model = qk.quantize_(_mlp(), recipe).model
    x = _x((2, 3, 100))
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("recipe", RECIPES)
def test_quantize_awkward_model_stays_close(recipe, record_property):
    model = _mlp()
    x = _x((8, 100))
    with torch.no_grad():
        expected = model(x)
        qk.quantize_(model, recipe)
        actual = model(x)
    assert isinstance(model[0], qk.QLinear) and isinstance(model[2], qk.QLinear)
    snr = testing.snr_db(actual.numpy(), expected.numpy())
    record_property(f"snr_db_{recipe.name}", snr)
    print(f"{recipe.name}: SNR {snr:.1f} dB")
    assert snr >= SNR_FLOOR_DB[recipe.name], f"{recipe.name}: SNR {snr:.1f} dB < {SNR_FLOOR_DB[recipe.name]} dB"


def test_quantize_filter_fn_and_repr():
    model = qk.quantize_(_mlp(), qk.W4A8(32), filter_fn=lambda m, fqn: fqn == "0").model
    assert isinstance(model[0], qk.QLinear) and type(model[2]) is nn.Linear
    text = repr(model[0])
    assert "recipe=w4a8-g32" in text and "backend=torch-cpu" in text


@pytest.mark.parametrize("recipe", RECIPES)
def test_input_grad_is_straight_through(recipe):
    w = torch.randn(13, 70) * 0.02
    wq = qk.quantize(w, recipe)
    bias = torch.randn(13, requires_grad=True)
    x = _x((2, 4, 70)).requires_grad_(True)
    grad_out = torch.randn(2, 4, 13)
    qk.linear(x, wq, bias).backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ wq.dequantize())
    torch.testing.assert_close(bias.grad, grad_out.sum((0, 1)))


def test_frozen_base_with_adapter_trains():
    """An adapter beside a frozen quantized base: the adapter gets its float gradient, the input the
    straight-through one, `grad_y @ dequantize(W) + grad_y @ A`, and the quantized weight none."""
    model = qk.quantize_(nn.Sequential(nn.Linear(64, 32, bias=False)), qk.W8A8).model
    adapter = nn.Linear(64, 32, bias=False)
    nn.init.normal_(adapter.weight, std=0.02)
    x = _x((4, 64)).requires_grad_(True)
    y = model(x) + adapter(x)
    y.square().sum().backward()
    grad_y = 2 * y.detach()
    torch.testing.assert_close(adapter.weight.grad, grad_y.T @ x.detach())
    torch.testing.assert_close(x.grad, grad_y @ model[0].weight.dequantize() + grad_y @ adapter.weight.detach())
    assert not model[0].weight.requires_grad


def test_qtensor_save_load_roundtrip(tmp_path):
    wq = qk.quantize(torch.randn(37, 100), qk.W4A16(32, zero_point=True))
    torch.save(wq, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=False)
    assert loaded.recipe == wq.recipe and loaded.shape == wq.shape
    for a, b in zip(loaded.tensors(), wq.tensors()):
        assert torch.equal(a, b)
    assert wq.to("cpu").device.type == "cpu"


@pytest.mark.parametrize("recipe", [pytest.param(qk.W8A8, id="w8a8"),
                                    pytest.param(qk.W4A16(32, zero_point=True), id="w4a16-g32-zp")])
def test_qlinear_state_dict_roundtrips_through_safetensors_and_torch_save(recipe, tmp_path):
    model = qk.quantize_(_mlp(0), recipe).model
    x = _x((3, 100))
    expected = model(x)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    for state in (load_file(tmp_path / "m.safetensors"), torch.load(tmp_path / "m.pt")):
        fresh = qk.quantize_(_mlp(7), recipe).model
        fresh.load_state_dict(state)
        assert torch.equal(fresh(x), expected)


def test_float_weight_is_quantized_per_call_with_w8a8():
    w = torch.randn(9, 33) * 0.02
    x = _x((4, 33))
    assert torch.equal(qk.linear(x, w), qk.linear(x, qk.quantize(w, qk.W8A8)))


def test_explain_names_the_choice_and_use_backend_changes_it():
    wq = qk.quantize(torch.randn(8, 16), qk.W8A16)
    x = _x((300, 16))  # taller than the native kernels serve (tests/test_torch_native.py)
    assert qk.explain(x, wq).chosen.name == "torch-cpu"
    with qk.use_backend("reference"):
        assert qk.explain(x, wq).chosen.name == "reference"


def test_bad_inputs_raise_clear_errors():
    wq = qk.quantize(torch.randn(8, 16), qk.W8A8)
    x = _x((2, 16))
    with pytest.raises(TypeError, match="dtype torch.int32"):
        qk.linear(torch.ones(2, 16, dtype=torch.int32), wq)
    with pytest.raises(ValueError, match="in_features=15"):
        qk.linear(_x((2, 15)), wq)
    with pytest.raises(ValueError, match="bias has shape"):
        qk.linear(x, wq, torch.zeros(7))
    meta = qk.QTensor(qvalue=wq.qvalue.to("meta"), scale=wq.scale.to("meta"), zero_point=None,
                      recipe=wq.recipe, shape=wq.shape)
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        qk.linear(x, meta)
    bad = torch.randn(8, 16)
    bad[3, 4] = float("nan")
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="2 NaN/Inf"):
        qk.quantize(bad, qk.W4A16(32))
    x_nan = x.clone()
    x_nan[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf in 1 row"):
        qk.linear(x_nan, wq)
    with pytest.raises(RuntimeError, match="cannot require grad"):
        wq.requires_grad_(True)
    scale = wq.scale.clone().requires_grad_(True)
    trainable = qk.QTensor(qvalue=wq.qvalue, scale=scale, zero_point=None, recipe=wq.recipe, shape=wq.shape)
    with pytest.raises(RuntimeError, match="quantized weights are frozen"):
        qk.linear(x, trainable)
    with pytest.raises(RuntimeError, match="quantized per call"):
        qk.linear(x, torch.randn(8, 16, requires_grad=True))


def test_checkpoint_of_another_shape_or_recipe_is_refused_before_anything_is_overwritten():
    """Packed shapes coincide (in_features 100 and 128 both store 64 bytes per row at int4 g32; W4A16 and
    W4A8 store the same tensors): the layer's identity in the state dict tells them apart."""
    src = qk.quantize_(nn.Sequential(nn.Linear(100, 8)), qk.W4A16(32)).model
    for target in (qk.quantize_(nn.Sequential(nn.Linear(128, 8)), qk.W4A16(32)).model,
                   qk.quantize_(nn.Sequential(nn.Linear(100, 8)), qk.W4A8(32)).model):
        before = {k: v.clone() for k, v in target.state_dict().items()}
        assert before["0.qvalue"].shape == src.state_dict()["0.qvalue"].shape
        with pytest.raises(ValueError, match=r"checkpoint holds a QLinear with recipe 'w4a16-g32' and \(out, in\) "
                                             r"shape \[8, 100\], but this layer is"):
            target.load_state_dict(src.state_dict())
        for k, v in target.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_quantized_model_built_on_meta_loads_a_quantized_checkpoint():
    src = qk.quantize_(_mlp(), qk.W4A16(32)).model
    with torch.device("meta"):
        model = _mlp()
    qk.quantize_(model, qk.W4A16(32))
    assert model[0].qvalue.is_meta
    model.load_state_dict(src.state_dict(), assign=True)
    x = _x((4, 100))
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="meta device and has no values to quantize"):
        qk.quantize(torch.empty(8, 16, device="meta"), qk.W8A8)


def test_torch_func_transforms_are_refused_clearly():
    w = qk.quantize(torch.randn(8, 16), qk.W8A8)
    with pytest.raises(NotImplementedError, match="torch.func transforms"):
        torch.func.grad(lambda x: qk.linear(x, w).sum())(torch.randn(2, 16))
