"""JSON Schema (draft 2020-12) of `python -m bench --json FILE` output; tests validate against it."""

from __future__ import annotations

from typing import Any

__all__ = ["SCHEMA_ID", "SCHEMA"]

SCHEMA_ID = "qkernels-bench/1"

_NUM = {"type": "number"}
_OPT_NUM = {"type": ["number", "null"]}
_OPT_STR = {"type": ["string", "null"]}
_PEAK = {
    "type": "object",
    "required": ["f32", "bf16", "int8", "mem_gbps", "source"],
    "properties": {"f32": _OPT_NUM, "bf16": _OPT_NUM, "int8": _OPT_NUM, "mem_gbps": _NUM, "source": {"type": "string"}},
}

ROW: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["framework", "method", "recipe", "role", "mma", "shape", "layer", "m", "n", "k", "flops",
                 "status", "reason", "impl", "samples_s", "reps", "median_s", "min_s", "max_s", "timing",
                 "bytes_moved", "tflops", "gbps", "roofline_frac", "speedup", "speedup_vs", "snr_db"],
    "properties": {
        "framework": {"enum": ["torch", "jax"]},
        "method": {"type": "string", "minLength": 1},
        "recipe": {"type": "string", "minLength": 1},
        "role": {"enum": ["float", "baseline", "qkernels"]},
        "mma": {"enum": ["f32", "bf16", "int8", "fp8"]},
        "shape": {"type": "string", "pattern": "^(B[0-9]+-)?M[0-9]+-N[0-9]+-K[0-9]+$"},
        "layer": {"type": "string"},
        "m": {"type": "integer", "minimum": 1}, "n": {"type": "integer", "minimum": 1},
        "k": {"type": "integer", "minimum": 1}, "flops": {"type": "integer", "minimum": 0},
        "status": {"enum": ["ok", "error", "unavailable"]},
        "reason": _OPT_STR,
        "impl": _OPT_STR,
        "samples_s": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
        "reps": {"type": "integer", "minimum": 0},
        "median_s": _OPT_NUM, "min_s": _OPT_NUM, "max_s": _OPT_NUM,
        "timing": _OPT_STR,
        "bytes_moved": {"type": ["integer", "null"]},
        "tflops": _OPT_NUM, "gbps": _OPT_NUM, "roofline_frac": _OPT_NUM,
        "speedup": _OPT_NUM, "speedup_vs": _OPT_STR,
        "snr_db": {"anyOf": [{"type": "number"}, {"const": "inf"}, {"type": "null"}]},
    },
    # an ok row has its measurements; a failed one says why
    "allOf": [
        {"if": {"properties": {"status": {"const": "ok"}}},
         "then": {"properties": {"samples_s": {"minItems": 1}, "median_s": _NUM, "min_s": _NUM, "max_s": _NUM,
                                 "tflops": _NUM, "gbps": _NUM, "impl": {"type": "string"},
                                 "snr_db": {"anyOf": [{"type": "number"}, {"const": "inf"}]}}}},
        {"if": {"properties": {"status": {"enum": ["error", "unavailable"]}}},
         "then": {"properties": {"reason": {"type": "string", "minLength": 1}}}},
    ],
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "qkernels benchmark results",
    "type": "object",
    "required": ["schema", "created", "device", "versions", "options", "timing", "rows", "targets"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "created": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T"},
        "device": {
            "type": "object",
            "required": ["kind", "name", "platform", "peak_key", "peak", "threads"],
            "properties": {
                "kind": {"enum": ["cpu", "cuda", "rocm", "tpu"]},
                "name": {"type": "string"}, "platform": {"type": "string"}, "peak_key": _OPT_STR,
                "peak": {"anyOf": [_PEAK, {"type": "null"}]}, "threads": {"type": "integer", "minimum": 1},
            },
        },
        "versions": {"type": "object", "required": ["python", "qkernels", "numpy"],
                     "additionalProperties": _OPT_STR},
        "options": {"type": "object", "required": ["shapes", "recipes", "frameworks", "smoke", "quick"]},
        "timing": {"type": "object", "required": ["budget_s", "per_case_s", "min_reps", "max_reps",
                                                  "reduced_cases", "elapsed_s"]},
        "rows": {"type": "array", "minItems": 1, "items": ROW},
        "targets": {"type": "array", "items": {
            "type": "object", "required": ["target", "min_speedup", "rows", "worst_speedup", "status"],
            "properties": {"status": {"enum": ["met", "missed", "not measured"]}, "worst_speedup": _OPT_NUM}}},
    },
}
