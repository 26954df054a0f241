"""bench.jax_cases.overhead: the host-overhead rows (harness only: speed is never asserted)."""

from __future__ import annotations

import qkernels as qk
from bench import jax_cases


def test_overhead_rows_and_table():
    rows = jax_cases.overhead((qk.W8A16,), shapes=((1, 64, 64),), budget_s=0.0, max_reps=60)
    assert [(r["method"], r["mode"], r["recipe"]) for r in rows] == [
        ("lax.dot_general", "jit", "f32"), ("lax.dot_general", "eager", "f32"),
        ("qkernels.dot_general", "jit", "w8a16"), ("qkernels.dot_general", "eager", "w8a16")]
    base = {r["mode"]: r["median_us"] for r in rows if r["method"] == "lax.dot_general"}
    for r in rows:
        assert r["shape"] == "M1-N64-K64" and 50 <= r["reps"] <= 60 and 0 < r["min_us"] <= r["median_us"]
        assert r["above_lax_us"] == r["median_us"] - base[r["mode"]]
    from jax_bindings import native

    assert rows[2]["impl"] == ("xla-native" if native.unavailable() is None else "xla")
    text = jax_cases.overhead_markdown(rows, "t")
    assert text.startswith("# t") and text.count("\n| M1-N64-K64 |") == 4
