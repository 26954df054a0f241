"""Hugging Face round trip of a quantized model: save_pretrained / from_pretrained through safetensors (issue 16)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import qkernels as qk
from qkernels import testing

transformers = pytest.importorskip("transformers")


def _tiny_llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama quantized with two recipes, its logits, and where it was saved."""
    model = _tiny_llama()
    qk.quantize_(model, qk.W4A16(32), filter_fn=lambda m, fqn: "mlp" in fqn)
    qk.quantize_(model, qk.W8A8)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    path = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(path)
    return path, ids, logits


def test_from_pretrained_loads_the_quantized_layers(saved):
    """Before: transformers skipped the unknown layout and rebuilt plain nn.Linear with random weights."""
    path, ids, logits = saved
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "qkernels"
    assert config["layers"]["model.layers.0.mlp.down_proj"] == "w4a16-g32"
    assert config["layers"]["model.layers.0.self_attn.q_proj"] == "w8a8" and config["layers"]["lm_head"] == "w8a8"
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["qkernels.layers"]) == config["layers"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model.model.layers[0].mlp.down_proj, qk.QLinear)
    assert model.model.layers[0].mlp.down_proj.recipe == qk.W4A16(32)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_from_pretrained_in_bfloat16_keeps_scales_f32(saved):
    path, ids, logits = saved
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.scale.dtype == torch.float32 and layer.qvalue.dtype == torch.int8
    with torch.no_grad():
        out = model(ids).logits
    assert out.dtype == torch.bfloat16
    assert testing.snr_db(out.float().numpy(), logits.numpy()) > 20


def test_from_pretrained_refuses_a_checkpoint_that_does_not_match_its_config(saved, tmp_path):
    path, _, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["layers"]["model.layers.0.mlp.down_proj"] = "w4a8-g32"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"recipe 'w4a16-g32' and \(out, in\) shape \[64, 96\], but this layer is "
                                         r"'w4a8-g32' \[64, 96\]"):
        transformers.AutoModelForCausalLM.from_pretrained(bad)
    config["quantization_config"]["layers"]["model.layers.0.mlp.down_proj"] = "w4a16-g32"
    config["quantization_config"]["layers"]["model.layers.0.mlp.no_such_proj"] = "w8a8"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"names quantized layers \['model.layers.0.mlp.no_such_proj'\]"):
        transformers.AutoModelForCausalLM.from_pretrained(bad)


def test_smoothquant_static_model_round_trips_and_uncalibrated_static_refuses_to_save(tmp_path):
    model = _tiny_llama()
    batches = [torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    summary = qk.smoothquant_(model, batches, qk.W8A8(static=True), filter_fn=lambda m, fqn: "layers" in fqn)
    assert len(summary.swapped) == 7 and [r.name for r in summary.skipped] == ["lm_head"]
    ids = batches[0]
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "sq")
    config = json.loads((tmp_path / "sq" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.up_proj" in config["smoothed"] and "lm_head" not in config["layers"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sq")
    layer = loaded.model.layers[0].mlp.up_proj
    assert layer.smooth is not None and layer.input_scale is not None
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    fresh = _tiny_llama()
    qk.quantize_(fresh, qk.W8A8(static=True))
    with pytest.raises(ValueError, match="qk.calibrate the model before save_pretrained"):
        fresh.save_pretrained(tmp_path / "uncalibrated")


def test_a_fresh_process_loads_the_quantized_layers(saved):
    """The 'qkernels' quant_method is registered when qkernels' torch binding is imported after transformers."""
    import os
    import pathlib
    import subprocess
    import sys

    path, ids, logits = saved
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    torch.save({"ids": ids, "logits": logits}, path.parent / "expected.pt")
    code = (
        "import sys, torch, transformers\n"
        "import qkernels as qk\n"
        "qk.QLinear  # imports the torch binding\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
        f"e = torch.load({str(path.parent / 'expected.pt')!r})\n"
        "assert isinstance(m.model.layers[0].mlp.down_proj, qk.QLinear)\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(m(e['ids']).logits, e['logits'])\n"
        "print('loaded')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]
