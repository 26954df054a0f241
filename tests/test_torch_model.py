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


# --- QAT ------------------------------------------------------------------------------------------------------------

QAT_RECIPES = [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A8(32), id="w4a8-g32"),
               pytest.param(qk.W8A16, id="w8a16"), pytest.param(qk.W4A16(32, zero_point=True), id="w4a16-g32-zp")]


def _awkward_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(100, 37), nn.ReLU(), nn.Linear(37, 19, bias=False))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("recipe", QAT_RECIPES)
def test_convert_is_bit_identical_to_the_fake_quant_forward(recipe, dtype):
    """Awkward shapes (K=100 and 37: padded groups, odd K, M=1 and a 3-D batch): the fake-quant forward runs
    the recipe's own quantized op, so the converted model computes the same bits (weight-only recipes too)."""
    model = qk.prepare_qat(_awkward_mlp(), recipe).to(dtype)
    assert isinstance(model[0], qk.QATLinear) and model[0].weight.requires_grad
    xs = [_x((1, 100), dtype=dtype), _x((2, 3, 100), seed=2, dtype=dtype)]
    with torch.no_grad():
        fake = [model(x) for x in xs]
    converted = qk.convert(model)
    assert isinstance(converted[0], qk.QLinear) and converted[0].recipe == recipe
    with torch.no_grad():
        for x, y in zip(xs, fake):
            assert torch.equal(converted(x), y)


@pytest.mark.parametrize("recipe", QAT_RECIPES)
def test_qat_gradients_are_straight_through(recipe):
    """d/dx, d/dw, d/db of the surrogate `fq(x) @ fq(w)^T + b` with d fq = 1."""
    from torch_bindings.arrays import TORCH_OPS

    layer = qk.prepare_qat(nn.Linear(40, 7), recipe)
    x = _x((5, 40)).requires_grad_(True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    wq = qk.quantize(layer.weight.detach(), recipe).dequantize()
    xd = x.detach()
    xs = xd if recipe.lhs is None else recipe.lhs.dequantize(recipe.lhs.quantize(xd, TORCH_OPS), 40, TORCH_OPS)
    torch.testing.assert_close(x.grad, g @ wq)
    torch.testing.assert_close(layer.weight.grad, g.T @ xs)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_qat_recovers_what_post_training_w4a8_loses():
    """Regression on strongly correlated inputs (rank-2 latent + noise), where rounding each int4 weight on
    its own (post-training) errs along the high-variance directions; QAT moves the weights to grid points
    that compensate. Metric R^2 on held-out data: PTQ loses > 1%, QAT is within 1% of float."""
    g = torch.Generator().manual_seed(0)
    d, rank, out, n = 64, 2, 8, 1024
    mix = torch.randn(rank, d, generator=g)

    def data() -> torch.Tensor:
        return torch.randn(n, rank, generator=g) @ mix + 0.05 * torch.randn(n, d, generator=g)

    w_true = torch.randn(out, d, generator=g) / d**0.5
    x_train, x_test = data(), data()
    y_train, y_test = x_train @ w_true.T, x_test @ w_true.T

    def r2(model: nn.Module) -> float:
        with torch.no_grad():
            return 1 - float(((model(x_test) - y_test) ** 2).mean() / y_test.var())

    def float_model() -> nn.Module:  # least squares: the float optimum, deterministic
        model = nn.Sequential(nn.Linear(d, out))
        sol = torch.linalg.lstsq(torch.cat([x_train, torch.ones(n, 1)], 1), y_train).solution
        with torch.no_grad():
            model[0].weight.copy_(sol[:-1].T)
            model[0].bias.copy_(sol[-1])
        return model

    recipe = qk.W4A8(64)
    r2_float = r2(float_model())
    r2_ptq = r2(qk.quantize_(float_model(), recipe).model)
    qat = qk.prepare_qat(float_model(), recipe)
    opt = torch.optim.Adam(qat.parameters(), lr=1e-3)
    for _ in range(150):
        loss = ((qat(x_train) - y_train) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    r2_qat = r2(qat)
    converted = qk.convert(qat)
    print(f"R^2 float {r2_float:.4f} ptq {r2_ptq:.4f} qat {r2_qat:.4f}")
    assert r2_float > 0.999
    assert r2_ptq < r2_float - 0.01, (r2_ptq, r2_float)
    assert r2_qat >= r2_float - 0.01, (r2_qat, r2_float)
    assert r2(converted) == r2_qat


def test_prepare_qat_skips_like_quantize_and_refuses_what_it_cannot_train():
    layer = qk.prepare_qat(_encoder_layer(), qk.W8A8)
    assert isinstance(layer.linear1, qk.QATLinear) and type(layer.self_attn.out_proj) is not qk.QATLinear
    layer(torch.randn(2, 5, 32)).sum().backward()
    assert layer.linear1.weight.grad is not None
    qk.prepare_qat(layer, qk.W8A8)  # idempotent: QAT layers are not wrapped again
    assert isinstance(layer.linear1, qk.QATLinear) and isinstance(layer.linear1.weight, nn.Parameter)
    with pytest.raises(NotImplementedError, match="quantized backward"):
        qk.prepare_qat(nn.Linear(8, 8), qk.W8A8(quantized_backward=True))


# --- LoRA -----------------------------------------------------------------------------------------------------------

def _lora_model(recipe=qk.W4A8(32), rank: int = 4, seed: int = 0) -> nn.Module:
    model = qk.quantize_(_awkward_mlp(seed), recipe).model
    torch.manual_seed(seed + 1)
    return qk.add_lora(model, rank=rank, alpha=8.0)


@pytest.mark.parametrize("recipe", [pytest.param(qk.W4A8(32), id="w4a8-g32"), pytest.param(qk.W4A16(32), id="w4a16-g32")])
def test_lora_loss_falls_with_the_quantized_base_unchanged(recipe):
    model = _lora_model(recipe)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".base." in k}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    x = _x((64, 100))
    with torch.no_grad():
        start = model(x)
    torch.testing.assert_close(start, qk.quantize_(_awkward_mlp(), recipe).model(x), rtol=0, atol=0)  # B = 0
    target = torch.randn(64, 19, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (model(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for k, v in model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]) and v.dtype == base[k].dtype, k


def test_lora_compiles_forward_and_backward():
    model = qk.add_lora(qk.quantize_(nn.Sequential(nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 8)), qk.W8A8).model,
                        rank=2)
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_B.normal_()
    x = _x((4, 48))

    def step(fn):
        model.zero_grad()
        loss = fn(x).square().sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in (model[0].lora_A, model[0].lora_B, model[2].lora_B)]

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b)


def test_lora_adapters_save_and_load_on_their_own(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _lora_model()
    with torch.no_grad():
        model[0].lora_B.normal_()
    state = qk.lora_state_dict(model)
    assert sorted(state) == ["0._extra_state", "0.lora_A", "0.lora_B", "2._extra_state", "2.lora_A", "2.lora_B"]
    save_file(state, tmp_path / "adapters.safetensors")
    fresh = _lora_model(seed=0)
    x = _x((3, 100))
    assert not torch.equal(fresh(x), model(x))
    qk.load_lora(fresh, load_file(tmp_path / "adapters.safetensors"))
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match=r"rank 4 and alpha 8.0, but this layer's is rank 2 alpha 8.0"):
        qk.load_lora(_lora_model(rank=2), state)
    with pytest.raises(ValueError, match=r"missing \['2._extra_state', '2.lora_A', '2.lora_B'\]"):
        qk.load_lora(fresh, {k: v for k, v in state.items() if k.startswith("0.")})


def test_add_lora_needs_quantized_layers_and_does_not_wrap_twice():
    with pytest.raises(ValueError, match="no QLinear layer"):
        qk.add_lora(_awkward_mlp(), rank=4)
    model = _lora_model()
    with pytest.raises(ValueError, match="already has an adapter"):
        qk.add_lora(model, rank=4)
    assert isinstance(model[0], qk.LoRALinear) and isinstance(model[0].base, qk.QLinear)


# --- static W8A8, calibration, SmoothQuant ----------------------------------------------------------------------------

def _systematic_outliers(seed: int = 0, rows: int = 512 + 1024, k: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """LLM-like activations: standard normal channels plus 4 systematic outlier channels (LLM.int8's outlier
    features: the same channels in every token, with a persistent sign and magnitude, here 20 +- 5%).
    Returns 8 calibration batches of 64 tokens and 1024 held-out tokens."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(testing.activations(rng, (rows, k), outliers=0))
    cols = torch.from_numpy(rng.choice(k, 4, replace=False))
    spread = torch.from_numpy(rng.standard_normal((rows, 4), dtype=np.float32))
    x[:, cols] = torch.tensor([1.0, -1.0, 1.0, -1.0]) * 20 * (1 + 0.05 * spread)
    return list(x[:512].split(64)), x[512:]


def _varying_outliers(seed: int = 0, k: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`testing.activations` (outlier channels 20x a standard normal, so their magnitude varies per token),
    the same channels in the calibration batches and the held-out tokens (one draw)."""
    x = torch.from_numpy(testing.activations(np.random.default_rng(seed), (128 + 256, k)))
    return list(x[:128].split(32)), x[128:]


def _snr(model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> float:
    with torch.no_grad():
        return testing.snr_db(model(x).numpy(), ref.numpy())


def _float_layer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 128))


@pytest.mark.parametrize("seed", [0, 1])
def test_calibrated_static_w8a8_is_within_1db_of_dynamic(seed, record_property):
    batches, x = _systematic_outliers(seed)
    with torch.no_grad():
        ref = _float_layer(seed)(x)
    dynamic = qk.quantize_(_float_layer(seed), qk.W8A8).model
    static = qk.quantize_(_float_layer(seed), qk.W8A8(static=True)).model
    ranges = qk.calibrate(static, batches, method="percentile", percentile=99.99)
    assert set(ranges) == {"0"} and 19 < ranges["0"] < 25
    assert static[0].input_scale.dtype == torch.float32 and static[0].input_scale.shape == ()
    snr_dynamic, snr_static = _snr(dynamic, x, ref), _snr(static, x, ref)
    record_property("snr_db", {"dynamic": snr_dynamic, "static": snr_static})
    print(f"W8A8 dynamic {snr_dynamic:.2f} dB, static (percentile 99.99) {snr_static:.2f} dB")
    assert snr_static >= snr_dynamic - 1.0


def test_static_forward_is_the_recipe_on_its_calibrated_codes():
    """The static layer's output equals the reference backend fed `Recipe.quantize_lhs(x, input_scale)`;
    values beyond the calibrated range saturate at +-127 instead of failing."""
    from torch_bindings.arrays import TORCH_OPS

    batches, x = _systematic_outliers()
    model = qk.quantize_(_float_layer(), qk.W4A8(32, static=True)).model
    qk.calibrate(model, batches, method="absmax")
    layer = model[0]
    x = torch.cat([x[:8], 3 * x[8:16]])  # rows past the calibrated range
    with torch.no_grad():
        got = model(x)
        with qk.use_backend("reference"):
            ref = model(x)
    assert torch.equal(got, ref)
    codes = layer.recipe.quantize_lhs(TORCH_OPS, x, layer.input_scale).qvalue
    assert int(codes.abs().max()) == 127 and bool((codes[8:].abs() == 127).any())


def test_static_layer_without_calibration_raises_clearly():
    model = qk.quantize_(_float_layer(), qk.W8A8(static=True)).model
    with pytest.raises(ValueError, match="calibrate it first"):
        model(torch.randn(2, 256))
    with pytest.raises(ValueError, match="no QLinear with a static recipe"):
        qk.calibrate(qk.quantize_(_float_layer(), qk.W8A8).model, [torch.randn(2, 256)])
    with pytest.raises(ValueError, match="no batch"):
        qk.calibrate(model, [])
    two = qk.quantize_(nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)}), qk.W8A8(static=True)).model
    two.forward = lambda x: two["a"](x)
    with pytest.raises(ValueError, match=r"layers \['b'\] saw no input"):
        qk.calibrate(two, [torch.randn(2, 8)])
    with pytest.raises(ValueError, match="static recipe"):
        qk.prepare_qat(nn.Linear(8, 8), qk.W8A8(static=True))


@pytest.mark.parametrize("recipe", [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W8A8(static=True), id="static")])
def test_smoothquant_improves_snr_on_outlier_channels(recipe, record_property):
    batches, x = _varying_outliers()
    with torch.no_grad():
        ref = _float_layer()(x)
    plain = qk.quantize_(_float_layer(), recipe).model
    if recipe.static:
        qk.calibrate(plain, batches)
    smoothed = _float_layer()
    summary = qk.smoothquant_(smoothed, batches, recipe, alpha=0.5)
    assert [r.recipe for r in summary.swapped] == [recipe.name]
    layer = smoothed[0]
    assert layer.smooth.shape == (256,) and layer.smooth.dtype == torch.float32
    assert (layer.input_scale is not None) == recipe.static
    snr_plain, snr_smooth = _snr(plain, x, ref), _snr(smoothed, x, ref)
    record_property("snr_db", {"plain": snr_plain, "smoothquant": snr_smooth})
    print(f"{recipe.name}: plain {snr_plain:.2f} dB, SmoothQuant {snr_smooth:.2f} dB")
    assert snr_smooth > snr_plain + 1.0
    torch.testing.assert_close(layer.weight.dequantize(), _float_layer()[0].weight, atol=2e-3, rtol=0)


def test_smoothquant_gradients_and_weight_only_refusal():
    batches, x = _varying_outliers()
    model = _float_layer()
    qk.smoothquant_(model, batches, qk.W8A8)
    xg = x[:4].clone().requires_grad_(True)
    g = torch.randn(4, 128)
    model(xg).backward(g)
    torch.testing.assert_close(xg.grad, g @ model[0].weight.dequantize())  # straight-through the logical weight
    with pytest.raises(ValueError, match="keeps its activations float"):
        qk.smoothquant_(_float_layer(), batches, qk.W4A16(32))


@pytest.mark.parametrize("smooth", [pytest.param(False, id="static"), pytest.param(True, id="smoothquant")])
def test_static_and_smoothed_state_round_trips(smooth, tmp_path):
    """A calibrated (and smoothed) model's state loads with weights_only into a freshly quantized model, which
    has no input_scale / smooth buffers yet; QTensor pickles carry both."""
    batches, x = _varying_outliers()
    recipe = qk.W8A8(static=True)

    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))
    if smooth:
        qk.smoothquant_(src, batches, recipe)
    else:
        qk.quantize_(src, recipe)
        qk.calibrate(src, batches)
    torch.save(src.state_dict(), tmp_path / "m.pt")
    fresh = qk.quantize_(nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32)), recipe).model
    assert fresh[0].input_scale is None and fresh[0].smooth is None
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(x), src(x))
    torch.save(src[0].weight, tmp_path / "w.pt")
    wq = torch.load(tmp_path / "w.pt", weights_only=True)
    assert torch.equal(wq.input_scale, src[0].input_scale)
    assert (wq.smooth is not None) == smooth
    with torch.no_grad():
        assert torch.equal(qk.linear(x, wq, src[0].bias), src[0](x))
    src.half()
    assert src[0].input_scale.dtype == torch.float32 and (not smooth or src[0].smooth.dtype == torch.float32)
    assert src(x.half()).dtype == torch.float16


def test_static_op_passes_opcheck_and_a_smoothed_static_model_compiles():
    from torch_bindings import LINEAR

    batches, x = _varying_outliers()
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))
    qk.smoothquant_(model, batches, qk.W8A8(static=True))
    w = model[0].weight
    xs = x[:5].clone().requires_grad_(True)
    torch.library.opcheck(LINEAR, (xs, w.qvalue, w.scale, None, model[0].bias, w.recipe.name, w.input_scale))
    with pytest.raises(ValueError, match=r"input_scale is \(\(2,\), torch.float32\)"):
        LINEAR(x[:5], w.qvalue, w.scale, None, None, w.recipe.name, w.input_scale.repeat(2))
    with pytest.raises(ValueError, match="use w8a8-static"):
        dyn = qk.quantize(torch.randn(8, 256), qk.W8A8)
        LINEAR(x[:5], dyn.qvalue, dyn.scale, None, None, "w8a8", w.input_scale)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=0, atol=0)
