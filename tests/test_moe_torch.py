"""`qk.quantize_` on mixture-of-experts models: transformers 5.x experts modules holding 3-D expert weights
(Mixtral, Qwen3-MoE: (E, 2I, H) gate_up / (E, H, I) down; GPT-OSS: transposed, biased, interleaved gate/up)
become `QMoEExperts` running `qk.grouped_linear`; tiny randomly initialised configs, nothing downloaded."""

from __future__ import annotations

import io

import pytest
import torch

import qkernels as qk
from qkernels import testing
from torch_bindings.experts import QGroupedLinear, QMoEExperts

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_oss import modeling_gpt_oss  # noqa: E402
from transformers.models.mixtral import modeling_mixtral  # noqa: E402

E, H, I, TOP_K = 4, 64, 96, 2
EXACT = [pytest.param(qk.W8A8, id="w8a8"), pytest.param(qk.W4A8(32), id="w4a8-g32")]
WEIGHT_ONLY = [pytest.param(qk.W4A16(32), id="w4a16-g32"), pytest.param(qk.W8A16, id="w8a16")]


def _experts(kind: str, seed: int = 0) -> torch.nn.Module:
    """A standalone float experts module with random weights (and biases)."""
    torch.manual_seed(seed)
    if kind == "mixtral":
        config = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                            num_experts_per_tok=TOP_K)
        module = modeling_mixtral.MixtralExperts(config)
    else:
        config = transformers.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                           num_experts_per_tok=TOP_K)
        module = modeling_gpt_oss.GptOssExperts(config)
    config._experts_implementation = "eager"
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05 if p.dim() == 3 else 0.5)
    return module.eval()


def _routing(tokens: int, seed: int = 1, experts: int = E) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    index = torch.stack([torch.randperm(experts, generator=g)[:TOP_K] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, TOP_K, generator=g), -1)
    return x, index, weights


def _loop(q: QMoEExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop with `qk.linear` on each expert's own QTensor (`QExperts.expert(e)`)."""
    up, down = (getattr(q, name) for name in q.projections)
    out = torch.zeros_like(x)
    for e in range(q.num_experts):
        token, pos = torch.where(index == e)
        if not len(token):
            continue
        h = qk.linear(x[token], up.weight.expert(e), None if up.bias is None else up.bias[e])
        h = q._apply_gate(h)
        h = qk.linear(h, down.weight.expert(e), None if down.bias is None else down.bias[e])
        out.index_add_(0, token, h * weights[token, pos, None])
    return out


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("recipe", EXACT + WEIGHT_ONLY)
def test_quantized_experts_equal_a_per_expert_loop_of_the_dense_op(kind, recipe) -> None:
    """Integer recipes bit for bit (each row is quantized alone, top-2 sums commute); weight-only to an SNR floor."""
    q = QMoEExperts.from_float(_experts(kind), recipe)
    x, index, weights = _routing(9)
    with torch.no_grad():
        y, expected = q(x, index, weights), _loop(q, x, index, weights)
    if recipe.accumulation.integer:
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
    else:
        assert testing.snr_db(y.numpy(), expected.numpy()) > 60


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_quantized_experts_are_close_to_the_float_module(kind) -> None:
    float_module = _experts(kind)
    x, index, weights = _routing(16)
    with torch.no_grad():
        ref = float_module(x, index, weights)
        for recipe, floor in ((qk.W8A16, 35), (qk.W8A8, 25), (qk.W4A16(32), 15)):
            y = QMoEExperts.from_float(float_module, recipe)(x, index, weights)
            assert testing.snr_db(y.numpy(), ref.numpy()) > floor, recipe.name


def test_expert_parallel_sentinels_give_zero_rows() -> None:
    """Ids >= num_experts (transformers' expert-parallel sentinels) contribute nothing, as in the eager loop."""
    float_module = _experts("mixtral")
    q = QMoEExperts.from_float(float_module, qk.W8A8)
    x, index, weights = _routing(7, experts=E + 1)  # E is the sentinel
    assert (index == E).any()
    with torch.no_grad():
        torch.testing.assert_close(q(x, index, weights), _loop(q, x, index, weights), rtol=0, atol=0)
        y = q(x, index.masked_fill(index == E, E + 3), weights)  # any id past the experts
    torch.testing.assert_close(y, _loop(q, x, index, weights), rtol=0, atol=0)


def test_input_gets_the_straight_through_gradient() -> None:
    q = QMoEExperts.from_float(_experts("gpt_oss"), qk.W8A16)
    x, index, weights = _routing(5)
    x.requires_grad_(True)
    q(x, index, weights).square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.abs().sum() > 0


def test_gpt_oss_layout_is_read_from_the_class_flags() -> None:
    """GPT-OSS stores (E, in, out) weights with biases: the stacks hold F.linear's (E, out, in) and the biases."""
    float_module = _experts("gpt_oss")
    q = QMoEExperts.from_float(float_module, qk.W8A8)
    assert q.gate_up_proj.shape == (E, 2 * I, H) and q.down_proj.shape == (E, H, I)
    assert q.gate_up_proj.bias is float_module.gate_up_proj_bias
    w = q.gate_up_proj.weight.dequantize()
    assert testing.snr_db(w.numpy(), float_module.gate_up_proj.detach().transpose(1, 2).numpy()) > 35
    assert q.alpha == float_module.alpha and q.limit == float_module.limit


def _tiny(kind: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    common = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=64, num_experts_per_tok=TOP_K)
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(
            intermediate_size=I, num_local_experts=E, **common)).eval()
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        intermediate_size=128, moe_intermediate_size=I, num_experts=E, head_dim=16, **common)).eval()


IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_quantize_model_end_to_end(kind) -> None:
    model = _tiny(kind)
    with torch.no_grad():
        ref = model(IDS).logits
    summary = qk.quantize_(model, qk.W8A8)
    experts = [row for row in summary if "experts" in row.name]
    assert [(r.name, r.shape, r.recipe) for r in experts] == [
        (f"model.layers.{i}.mlp.experts.{name}", shape, "w8a8") for i in range(2)
        for name, shape in (("gate_up_proj", (E, 2 * I, H)), ("down_proj", (E, H, I)))]
    assert not summary.skipped and f"model.layers.0.mlp.experts.gate_up_proj  {E}x{2 * I}x{H}  w8a8" in str(summary)
    assert all(isinstance(layer.mlp.experts, QMoEExperts) for layer in model.model.layers)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]  # no float expert weight left
    with torch.no_grad():
        out = model(IDS).logits
    assert testing.snr_db(out.numpy(), ref.numpy()) > 25


def test_bfloat16_model() -> None:
    model = _tiny("qwen3_moe")
    with torch.no_grad():
        ref = model(IDS).logits
    model.to(torch.bfloat16)
    qk.quantize_(model, qk.W8A8)
    assert model.model.layers[0].mlp.experts.gate_up_proj.scale.dtype == torch.float32
    with torch.no_grad():
        out = model(IDS).logits
    assert out.dtype == torch.bfloat16 and testing.snr_db(out.float().numpy(), ref.numpy()) > 20


def test_filter_fn_sees_the_experts_module() -> None:
    model = _tiny("mixtral")
    seen = []
    summary = qk.quantize_(model, qk.W8A8, filter_fn=lambda m, fqn: seen.append(fqn) or "layers.0." in fqn)
    assert "model.layers.1.mlp.experts" in seen
    rows = {r.name: r for r in summary}
    assert rows["model.layers.0.mlp.experts.down_proj"].recipe == "w8a8"
    assert rows["model.layers.1.mlp.experts.down_proj"].reason == "filter_fn returned False"
    assert isinstance(model.model.layers[1].mlp.experts, modeling_mixtral.MixtralExperts)


def test_experts_without_layout_flags_are_skipped_with_the_reason() -> None:
    class Experts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * I, H))
            self.down_proj = torch.nn.Parameter(torch.randn(E, H, I))

    model = torch.nn.Sequential(torch.nn.Linear(H, H), Experts())
    summary = qk.quantize_(model, qk.W8A8)
    assert [r.name for r in summary] == ["0", "1.gate_up_proj", "1.down_proj"]
    assert "does not record their layout (has_gate, has_bias, is_transposed" in summary.layers[1].reason
    assert isinstance(model[1], Experts)


def test_state_dict_round_trip_through_torch_load_weights_only() -> None:
    model = _tiny("mixtral")
    qk.quantize_(model, qk.W4A16(32), filter_fn=lambda m, fqn: "experts" in fqn)
    qk.quantize_(model, qk.W8A8)
    with torch.no_grad():
        logits = model(IDS).logits
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    stack = model.model.layers[0].mlp.experts.gate_up_proj
    assert state["model.layers.0.mlp.experts.gate_up_proj.qvalue"].shape == (E, 2 * I, H // 2)  # int4 packed
    assert state["model.layers.0.mlp.experts.gate_up_proj.scale"].shape == (E, 2 * I, H // 32)
    assert stack.recipe == qk.W4A16(32)

    other = _tiny("mixtral", seed=1)
    qk.quantize_(other, qk.W4A16(32), filter_fn=lambda m, fqn: "experts" in fqn)
    qk.quantize_(other, qk.W8A8)
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other(IDS).logits, logits)

    wrong = _tiny("mixtral", seed=1)
    qk.quantize_(wrong, qk.W8A8)
    with pytest.raises(ValueError, match=r"recipe 'w4a16-g32' and \(E, out, in\) shape \[4, 192, 64\], but this "
                                         r"stack is 'w8a8' \[4, 192, 64\]"):
        wrong.load_state_dict(state)


def test_grouped_linear_keeps_f32_scales_under_a_dtype_cast() -> None:
    stack = QGroupedLinear.from_float(torch.randn(E, 8, 32), torch.randn(E, 8), qk.W8A8)
    stack.to(torch.bfloat16)
    assert stack.scale.dtype == torch.float32 and stack.qvalue.dtype == torch.int8
    assert stack.bias.dtype == torch.bfloat16


def test_hf_save_pretrained_and_from_pretrained(tmp_path) -> None:
    import json

    model = _tiny("mixtral")
    qk.quantize_(model, qk.W4A16(32), filter_fn=lambda m, fqn: "experts" in fqn)
    qk.quantize_(model, qk.W8A8)
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    layers = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["layers"]
    assert layers["model.layers.1.mlp.experts.gate_up_proj"] == "w4a16-g32"
    assert layers["model.layers.1.mlp.experts.down_proj"] == "w4a16-g32"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    experts = loaded.model.layers[1].mlp.experts
    assert isinstance(experts, QMoEExperts) and experts.down_proj.recipe == qk.W4A16(32)
    assert experts.down_proj.qvalue.shape == (E, H, I // 2)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, logits)


def test_gpt_oss_model_end_to_end_and_hf_round_trip(tmp_path) -> None:
    """Transposed (E, in, out) experts with biases and GPT-OSS's own gate, through quantize_ and from_pretrained."""
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, max_position_embeddings=64, num_local_experts=E,
        num_experts_per_tok=TOP_K)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.05)
        ref = model(IDS).logits
    summary = qk.quantize_(model, qk.W8A8)
    rows = {r.name: r for r in summary}
    assert rows["model.layers.0.mlp.experts.gate_up_proj"].shape == (E, 2 * I, H)  # F.linear's layout
    assert rows["model.layers.0.mlp.experts.down_proj"].shape == (E, H, I)
    with torch.no_grad():
        out = model(IDS).logits
    assert testing.snr_db(out.numpy(), ref.numpy()) > 25
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    experts = loaded.model.layers[0].mlp.experts
    assert isinstance(experts, QMoEExperts) and experts.gate_up_proj.bias.shape == (E, 2 * I)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, out)
