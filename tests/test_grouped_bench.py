"""bench/moe_cases.py in smoke mode: every MoE row runs, the float grouped matmul is each framework's baseline."""

from __future__ import annotations

from bench import device as device_mod
from bench import moe_cases


def test_moe_smoke_rows() -> None:
    dev = device_mod.detect(probe=False)
    rows = moe_cases.run(dev, moe_cases.SHAPES["smoke"], "both", per_case_s=0.01, min_reps=1, max_reps=2)
    assert not [r for r in rows if "error" in r], rows
    methods = {(r["framework"], r["method"]) for r in rows}
    assert ("torch", "torch._grouped_mm") in methods and ("jax", "lax.ragged_dot") in methods
    for r in rows:
        if r["method"] in ("torch._grouped_mm", "lax.ragged_dot"):
            assert r["speedup"] == 1.0 and r["snr_db"] > 100
        else:  # quantized: int8 well above int4, both far above noise
            assert r["snr_db"] > (30 if "w8a8" in r["method"] else 15), r
    assert "| smoke-E4-N64-K96-t1 | torch | qk.grouped_linear w8a8 |" in moe_cases.markdown(dev, rows)
