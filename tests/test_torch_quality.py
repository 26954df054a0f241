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


class _Block(nn.Module):
    """A residual MLP block called as transformers calls its layers: keyword arguments and a cache to append to."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(64, 96), nn.Linear(96, 64)

    def forward(self, x, scale=None, past_key_values=None, use_cache=False):
        if use_cache and past_key_values is not None:
            past_key_values.update()
        return x + self.down(torch.nn.functional.gelu(self.up(x))) * scale


class CountingCache:
    """Its name ends in "Cache" as transformers' do: a replayed block must not see it."""

    def __init__(self) -> None:
        self.updates = 0

    def update(self) -> None:
        self.updates += 1


class _Chain(nn.Module):
    def __init__(self, between: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.head, self.between = nn.Linear(64, 32), between

    def forward(self, x, cache=None):
        for block in self.blocks:
            x = block(x, scale=0.5, past_key_values=cache, use_cache=cache is not None)
            if self.between != 1.0:
                x = x * self.between
        return self.head(x)


def _chain_batches(cache: bool = False) -> list[dict]:
    mix = torch.from_numpy((np.random.default_rng(0).standard_normal((64, 64)) * 0.3 + np.eye(64)).astype(np.float32))
    out = []
    for i in range(3):
        x = torch.from_numpy(testing.activations(np.random.default_rng(20 + i), (2, 40, 64), outliers=2)) @ mix
        out.append({"x": x, **({"cache": CountingCache()} if cache else {})})
    return out


def _gptq_codes(layer: nn.Linear, inputs: list[torch.Tensor], fmt, targets: list[torch.Tensor] | None = None):
    """The reference: GPTQ of `layer` from a Hessian of exactly `inputs` (summed as ptq does: f32 Gram, f64
    mean); with `targets` (the float model's inputs of the layer), of the asymmetric target."""
    from qkernels import quality

    h, c, n = None, None, 0
    for i, x in enumerate(inputs):
        xf = x.reshape(-1, layer.in_features).to(torch.float32)
        if targets is not None:
            tf = targets[i].reshape(-1, layer.in_features).to(torch.float32)
            c, _ = quality.hessian_merge(c, n, (tf.T @ xf).numpy(), xf.shape[0])
        h, n = quality.hessian_merge(h, n, (xf.T @ xf).numpy(), xf.shape[0])
    w = layer.weight.detach().numpy()
    return quality.gptq(w if c is None else quality.gptq_target(w, h, c), h, fmt).qvalue


@pytest.mark.parametrize("asymmetric", [False, None])
def test_sequential_gptq_takes_each_layer_from_the_quantized_layers_before_it(asymmetric):
    """Block by block, stage by stage (up, then down): every Hessian from inputs through what is already
    quantized; the head (outside the blocks) from one pass of the model with every block quantized. By default
    (asymmetric) each layer's target is the float model's output: the cross term with the float chain's inputs."""
    recipe, batches = qk.W4A16(32), _chain_batches()
    float_model, model = _Chain(), _Chain()
    summary = qk.quantize_(model, recipe, calibration=batches, method="gptq", asymmetric=asymmetric, progress=False)
    assert [r.recipe for r in summary] == ["w4a16-g32"] * 7
    xs = [b["x"] for b in batches]
    fs = xs if asymmetric is None else None  # the float chain
    act = torch.nn.functional.gelu
    with torch.no_grad():
        for ref, q in zip(float_model.blocks, model.blocks):
            assert np.array_equal(q.up.weight.qvalue.numpy(), _gptq_codes(ref.up, xs, recipe.rhs, fs))
            hidden = [act(q.up(x)) for x in xs]
            targets = None if fs is None else [act(ref.up(f)) for f in fs]
            assert np.array_equal(q.down.weight.qvalue.numpy(), _gptq_codes(ref.down, hidden, recipe.rhs, targets))
            xs = [q(x, scale=0.5) for x in xs]
            fs = None if fs is None else [ref(f, scale=0.5) for f in fs]
    assert np.array_equal(model.head.weight.qvalue.numpy(), _gptq_codes(float_model.head, xs, recipe.rhs, fs))
    one_pass = _Chain()
    qk.quantize_(one_pass, recipe, calibration=batches, method="gptq", sequential=False, progress=False)
    assert np.array_equal(one_pass.blocks[0].up.weight.qvalue.numpy(), model.blocks[0].up.weight.qvalue.numpy())
    assert not np.array_equal(one_pass.blocks[2].down.weight.qvalue.numpy(),
                              model.blocks[2].down.weight.qvalue.numpy())


def test_asymmetric_target_is_the_float_output_least_squares():
    """quality.gptq_target: on the quantized inputs, W* reproduces the float model's outputs better than W
    (least squares), and equals W where the inputs are the float model's own."""
    from qkernels import quality

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 48)).astype(np.float32) @ (np.eye(48) + 0.3 * rng.standard_normal((48, 48)))
    # the inputs through quantized layers: a systematic distortion of the float ones, and noise
    xq = x @ (np.eye(48) + 0.1 * rng.standard_normal((48, 48))) + 0.01 * rng.standard_normal(x.shape)
    w = rng.standard_normal((16, 48)).astype(np.float32)
    h, c = 2 / len(x) * xq.T @ xq, 2 / len(x) * x.T @ xq
    wstar = quality.gptq_target(w, h, c)
    err = lambda v: float(np.sum((xq @ v.T - x @ w.T) ** 2))  # noqa: E731
    assert err(wstar) < 0.01 * err(w)  # (the damping keeps it from the unregularized least squares' 48 / 954659)
    np.testing.assert_allclose(quality.gptq_target(w, h, h), w, rtol=0, atol=1e-6)


def test_sequential_calibration_never_replays_into_the_cache():
    batches = _chain_batches(cache=True)
    model = _Chain()
    qk.quantize_(model, qk.W4A16(32), calibration=batches, method="gptq-ao", progress=False)
    # the model's own forwards (capture; the float and the quantized pass for the head) update it at most once
    # per block each; a replayed block would add one per stage and one for its outputs, twice (two chains)
    assert all(b["cache"].updates <= 3 * 3 for b in batches)
    plain = _Chain()
    qk.quantize_(plain, qk.W4A16(32), calibration=_chain_batches(), method="gptq-ao", progress=False)
    for a, b in zip(model.modules(), plain.modules()):
        if isinstance(a, qk.QLinear):
            assert torch.equal(a.weight.qvalue, b.weight.qvalue)


def test_blocks_that_do_not_chain_take_one_pass_or_are_refused():
    """A model that transforms the hidden state between its blocks cannot be replayed block by block."""
    batches = _chain_batches()
    auto, one_pass = _Chain(between=2.0), _Chain(between=2.0)
    qk.quantize_(auto, qk.W4A16(32), calibration=batches, method="awq", progress=False)
    qk.quantize_(one_pass, qk.W4A16(32), calibration=batches, method="awq", sequential=False, progress=False)
    for a, b in zip(auto.modules(), one_pass.modules()):
        if isinstance(a, qk.QLinear):
            assert torch.equal(a.weight.qvalue, b.weight.qvalue) and torch.equal(a.smooth, b.smooth)
    with pytest.raises(ValueError, match="not the previous block's output.*sequential=False"):
        qk.quantize_(_Chain(between=2.0), qk.W4A16(32), calibration=batches, method="gptq", sequential=True,
                     progress=False)
    with pytest.raises(ValueError, match="sequential=True: no nn.ModuleList"):
        quantized("gptq", calibration=[data(0, 8)], sequential=True)
    with pytest.raises(ValueError, match="sequential=False is an option of the calibrated methods"):
        quantized("mse", sequential=False)
    with pytest.raises(ValueError, match="asymmetric=True is GPTQ's target"):
        quantized("awq", calibration=[data(0, 8)], asymmetric=True)


def test_sequential_gptq_on_a_transformers_model():
    """Llama's layers take the key/value cache and rotary embeddings as keyword arguments; the first stage of
    the first block sees the float model's inputs either way, later layers the quantized layers' outputs."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    models = []
    for sequential in (None, False):
        torch.manual_seed(0)
        models.append(transformers.LlamaForCausalLM(config).eval())
        cal = [torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
        summary = qk.quantize_(models[-1], qk.W4A16(32), calibration=cal, method="gptq", sequential=sequential,
                               progress=False)
        assert sum(r.recipe is not None for r in summary) == 15  # 7 per layer and the (untied) lm_head
    seq, one = (m.model.layers for m in models)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(seq[0].self_attn, name).weight.qvalue, getattr(one[0].self_attn, name).weight.qvalue)
    assert not torch.equal(seq[1].mlp.down_proj.weight.qvalue, one[1].mlp.down_proj.weight.qvalue)
    with torch.no_grad():
        assert torch.isfinite(models[0](torch.arange(20)[None]).logits).all()
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": True}))
    summary = qk.quantize_(tied.eval(), qk.W4A16(32), calibration=cal, method="gptq", progress=False)
    head = next(r for r in summary if r.name == "lm_head")
    assert head.recipe is None and "tied" in head.reason  # its own reason, not "saw no input"


def test_sequential_gptq_on_a_bert_encoder():
    """BERT's layers return tuples and take the attention mask positionally: replayed as they were called."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=128, max_position_embeddings=64)
    cal = [{"input_ids": torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(i)),
            "attention_mask": torch.ones(2, 12, dtype=torch.long)} for i in range(3)]
    models = []
    for sequential in (None, False):
        torch.manual_seed(0)
        models.append(transformers.BertModel(config).eval())
        qk.quantize_(models[-1], qk.W4A16(32), calibration=cal, method="gptq-ao", sequential=sequential,
                     progress=False)
    seq, one = (m.encoder.layer for m in models)
    assert torch.equal(seq[0].attention.self.query.weight.qvalue, one[0].attention.self.query.weight.qvalue)
    assert not torch.equal(seq[1].output.dense.weight.qvalue, one[1].output.dense.weight.qvalue)
    with torch.no_grad():
        assert torch.isfinite(models[0](**cal[0]).last_hidden_state).all()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibration_runs_in_eval_mode_and_leaves_the_model_as_it_was(method):
    """A model handed over in train mode: dropout off and BatchNorm's running statistics untouched while
    calibrating (the codes are those of the eval-mode model), each module's own mode restored."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(192, 256), nn.BatchNorm1d(256), nn.Dropout(0.5), nn.GELU(), nn.Linear(256, 96))

    batches = [data(10 + i, 128) for i in range(3)]
    trained = model().train()
    trained[1].eval()  # a module of its own mode
    running = trained[1].running_mean.clone()
    qk.quantize_(trained, qk.W4A16(64), calibration=batches, method=method, progress=False)
    assert torch.equal(trained[1].running_mean, running)
    assert trained.training and trained[2].training and not trained[1].training
    reference = model().eval()
    qk.quantize_(reference, qk.W4A16(64), calibration=batches, method=method, progress=False)
    assert torch.equal(trained[4].weight.qvalue, reference[4].weight.qvalue)


@pytest.mark.parametrize("method", ["gptq", "gptq-ao-mse", "awq"])
def test_calibration_inputs_with_nan_are_refused(method):
    """A NaN in the calibration batches made GPTQ write codes from a NaN Hessian, silently."""
    bad = data(10, 64)
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="calibration inputs contains .* NaN/Inf"):
        quantized(method, calibration=[data(11, 64), bad])
    with pytest.raises(ValueError, match="calibration inputs contains .* NaN/Inf"):  # beyond AWQ's 512-row sample
        quantized(method, calibration=[data(12 + i, 256) for i in range(4)] + [bad])
