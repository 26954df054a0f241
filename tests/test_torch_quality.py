"""torch: quantization methods through the public API (qk.quantize(method=), qk.quantize_(calibration=, method=))."""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import qkernels as qk  # noqa: E402
from qkernels import testing  # noqa: E402


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(192, 256), nn.GELU(), nn.Linear(256, 96)).eval()


def data(seed: int, rows: int = 256, mixed: bool = True) -> torch.Tensor:
    """Inputs with outlier channels (the same in every batch), correlated across channels when `mixed`:
    where data-aware methods pay (GPTQ from the correlations, AWQ from the salient channels)."""
    mix = (np.random.default_rng(0).standard_normal((192, 192)) * 0.15 + np.eye(192)).astype(np.float32)
    x = testing.activations(np.random.default_rng(seed), (rows, 192), outliers=0)
    x[:, :6] *= 25.0  # the same outlier channels in every batch, as a layer's inputs have
    return torch.from_numpy(x @ mix if mixed else x)


def snr(model: nn.Module, float_model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return testing.snr_db(model(x).numpy(), float_model(x).numpy())


def quantized(method: str, recipe=qk.W4A16(64), **kw) -> nn.Module:
    m = mlp()
    qk.quantize_(m, recipe, method=method, progress=False, **kw)
    return m


def test_mse_clipping_through_quantize_and_quantize_():
    w = mlp()[0].weight.detach()
    rtn, mse = qk.quantize(w, qk.W4A16(64)), qk.quantize(w, qk.W4A16(64), method="mse")
    assert rtn.qvalue.shape == mse.qvalue.shape and not torch.equal(rtn.qvalue, mse.qvalue)
    err = lambda q: float(((q.dequantize() - w) ** 2).sum())  # noqa: E731
    assert err(mse) < err(rtn)
    x = data(1)
    assert snr(quantized("mse"), mlp(), x) > snr(quantized("rtn"), mlp(), x)
    with pytest.raises(ValueError, match="data-free"):
        qk.quantize(w, qk.W4A16(64), method="gptq")


@pytest.mark.parametrize("method", ["mse-wide", "mse-refit", "hqq"])
def test_refit_methods_through_quantize_(method):
    """The data-free refinements run through qk.quantize_ like 'mse': the codes the core chooses, served."""
    from qkernels import quality

    m = quantized(method, qk.W4A16(64, zero_point=True))
    w = mlp()[0].weight.detach()
    want = quality.quantize_weight(w.numpy(), qk.W4A16(64, zero_point=True).rhs, method=method)
    assert np.array_equal(m[0].weight.qvalue.numpy(), want.qvalue)
    x = data(1)
    assert snr(m, mlp(), x) > snr(quantized("rtn", qk.W4A16(64, zero_point=True)), mlp(), x)


@pytest.mark.parametrize("method,kw", [("gptq", {}), ("gptq", {"act_order": True}), ("gptq-mse", {}), ("gptq-ao", {}),
                                       ("gptq-ao-mse", {}), ("awq", {})])
@pytest.mark.parametrize("recipe", [qk.W4A16(64), qk.W4A16(32, zero_point=True), qk.W4A8(64)], ids=lambda r: r.name)
def test_data_aware_methods_beat_rtn_on_held_out_inputs(method, kw, recipe):
    mixed = method != "awq"
    batches = [data(10 + i, 128, mixed) for i in range(3)]
    x = data(99, mixed=mixed)
    m = quantized(method, recipe, calibration=batches, **kw)
    assert all(isinstance(layer, qk.QLinear) for layer in (m[0], m[2]))
    assert (m[0].smooth is not None) == (method == "awq")
    assert snr(m, mlp(), x) > snr(quantized("rtn", recipe), mlp(), x) + 0.5


def test_act_order_method_names_are_gptq_with_act_order():
    """"gptq-ao" is `act_order=True` (static groups: scales from the original weights, codes in K order)."""
    batches = [data(10 + i, 128) for i in range(3)]
    a, b = quantized("gptq-ao", calibration=batches), quantized("gptq", calibration=batches, act_order=True)
    for la, lb in ((a[0], b[0]), (a[2], b[2])):
        assert torch.equal(la.weight.qvalue, lb.weight.qvalue) and torch.equal(la.weight.scale, lb.weight.scale)
    rtn = quantized("rtn")
    assert torch.equal(a[0].weight.scale, rtn[0].weight.scale)  # symmetric groups: absmax of the original weights


def test_awq_model_saves_and_loads_with_its_factors():
    m = quantized("awq", calibration=[data(3, 128)])
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    fresh = mlp(5)
    qk.quantize_(fresh, qk.W4A16(64))
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    x = data(4, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_method_and_calibration_misuse_is_refused():
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantized("gptq")
    with pytest.raises(ValueError, match="used by method='gptq', 'gptq-mse' or 'awq'"):
        quantized("rtn", calibration=[data(0, 8)])
    with pytest.raises(ValueError, match="no batch"):
        quantized("gptq", calibration=[])
    m = nn.Sequential(nn.Linear(192, 8), nn.Linear(8, 8))
    summary = qk.quantize_(m, qk.W4A16(32), calibration=[data(0, 8)], method="gptq", progress=False,
                           filter_fn=None)
    assert [r.recipe for r in summary] == ["w4a16-g32", "w4a16-g32"]
