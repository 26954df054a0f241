"""The 'pallas' Tunable: heuristic (table entry by M), check, candidates, parse/dump through a tuned
table, and the pallas.tpu implementations running and explaining the chosen config. No TPU needed:
problems are built for a TPU platform directly and nothing here runs a TPU kernel."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from qkernels import dispatch, reference, testing, tuning
from qkernels.formats import W4A8, W4A16, W8A8, QOperand
from qkernels.kernels.pallas import configs, ops, tunable
from qkernels.kernels.pallas.configs import Family, TileConfig


def problem(recipe=None, m: int = 1, n: int = 8192, k: int = 8192, arch: str = "v5e", act: str = "bfloat16",
            **kw) -> dispatch.Problem:
    return dispatch.Problem(recipe=recipe or W8A8, m=m, n=n, k=k, act_dtype=act, out_dtype=act, framework="jax",
                            platform=f"tpu:{arch}", device=f"tpu-{arch}", **kw)


def test_registered_for_the_tune_cli():
    assert tuning.tunables()["pallas"] is tunable.TUNABLE
    assert tunable.TUNABLE.measure is not None


def test_serves_tpu_generations_only():
    assert tunable.serves(problem()) is None
    assert "runs on TPU, not cuda:sm_90" in tunable.serves(
        dispatch.Problem(recipe=W8A8, m=1, n=64, k=64, act_dtype="bfloat16", out_dtype="bfloat16",
                         framework="jax", platform="cuda:sm_90"))
    assert "no Pallas config for TPU v7x" in tunable.serves(problem(arch="v7x"))


@pytest.mark.parametrize("recipe", [W8A8, W4A16(128), W4A8(128)], ids=lambda r: r.name)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_heuristic_picks_the_decode_entry_for_small_m(recipe, m, dirs):
    family = ops.family_of(recipe)
    config, why = tunable.heuristic(problem(recipe, m=m))
    assert config.max_m == configs.SMALL_M and config == configs.tpu_configs("v5e", family)[0]
    assert why == f"TPU v5e {family.value} table entry for M={m}"
    choice = tuning.choose(problem(recipe, m=m), "pallas")
    assert choice.config == config and choice.source == f"heuristic: {why}"


@pytest.mark.parametrize("arch", configs.TPU_GENERATIONS)
def test_heuristic_takes_the_any_m_entry_above_small_m(arch):
    for family, recipe in ((Family.W8A8, W8A8), (Family.W4A16, W4A16(32, zero_point=True))):
        config, _ = tunable.heuristic(problem(recipe, m=configs.SMALL_M + 1, arch=arch, act="float32"))
        assert config.max_m is None and config == configs.tpu_configs(arch, family)[-1]


def test_check_accepts_every_table_entry_for_the_m_it_serves():
    for arch in configs.TPU_GENERATIONS:
        for recipe in (W8A8, W4A16(32, zero_point=True), W4A16(256), W4A8(32)):
            for config in configs.tpu_configs(arch, ops.family_of(recipe)):
                m = config.max_m or 4096
                assert tunable.check(config, problem(recipe, m=m, arch=arch, act="float32")) is None


REFUSED = [
    pytest.param(TileConfig(block_m=32, block_n=2048, block_k=2048, max_m=16), problem(m=17),
                 "bm32-bn2048-bk2048-M<=16 serves M <= 16, not M=17; use an entry with a larger max_m",
                 id="M-above-max_m"),
    pytest.param(TileConfig(block_m=32, block_n=2048, block_k=2048, max_m=16),
                 problem(W4A16(32, zero_point=True), m=16, act="float32"),
                 "over TPU v5e's 16 MiB scoped VMEM; use a smaller block_n or block_k", id="vmem-v5e"),
    pytest.param(TileConfig(block_m=32, block_n=4096, block_k=4096), problem(m=1, arch="v6e"),
                 "over TPU v6e's 32 MiB scoped VMEM", id="vmem-v6e"),
    pytest.param(configs.GpuConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3), problem(),
                 "is a GpuConfig, not a TileConfig", id="gpu-config"),
    pytest.param(TileConfig(block_m=32, block_n=128, block_k=256), problem(arch="v4"),
                 "Mosaic rejects int8 matmul on TPU v4", id="tpu-v4"),
]


@pytest.mark.parametrize("config,prob,message", REFUSED)
def test_check_refuses_with_the_reason(config, prob, message):
    why = tunable.check(config, prob)
    assert why is not None and message in why, why


def test_heuristic_skips_an_entry_over_vmem_and_shrinks_when_none_fits(monkeypatch):
    big = TileConfig(block_m=32, block_n=4096, block_k=4096, max_m=16)
    huge_any = TileConfig(block_m=512, block_n=4096, block_k=4096)
    fits_any = configs.tpu_configs("v5e", Family.W4A16)[-1]
    prob = problem(W4A16(128), m=4)
    monkeypatch.setitem(configs.TPU_CONFIGS["v5e"], Family.W4A16, (big, fits_any))
    config, why = tunable.heuristic(prob)
    assert config == fits_any
    assert why.startswith("TPU v5e w4a16 table entry for M=4 (skipped bm32-bn4096-bk4096-M<=16: ")
    monkeypatch.setitem(configs.TPU_CONFIGS["v5e"], Family.W4A16, (big, huge_any))
    config, why = tunable.heuristic(prob)
    assert "shrunk to fit" in why and tunable.check(config, prob) is None
    assert config.block_m == 512 and config.block_n < 4096


@pytest.mark.parametrize("recipe", [W8A8, W4A16(64, zero_point=True), W4A8(32)], ids=lambda r: r.name)
def test_candidates_valid_distinct_and_led_by_the_table(recipe):
    prob = problem(recipe, m=8, n=8192, k=4096)
    cands = tunable.candidates(prob)
    assert cands[0] == tunable.heuristic(prob)[0]
    assert all(tunable.check(c, prob) is None for c in cands)
    assert len({tunable._tiling(c, prob) for c in cands}) == len(cands), "no two tile the problem alike"
    assert sum(c.max_m == configs.SMALL_M for c in cands) >= 3, [c.name for c in cands]
    large = tunable.candidates(problem(recipe, m=512, n=8192, k=4096))
    assert large and all(c.max_m is None for c in large)


def test_tuned_table_round_trip_and_bad_entries(dirs):
    """A user cache written through dump/parse serves its key; unknown keys in a config are dropped."""
    prob = problem(W4A16(128), m=8, n=4096, k=4096)
    tuned = TileConfig(block_m=32, block_n=512, block_k=2048, max_m=16)
    path = tuning.cache_path("pallas", "tpu-v5e")
    tuning.write_table(path, tunable.TUNABLE, "tpu-v5e", [tuning.Entry(key=tuning.key_of(prob), config=tuned,
                                                                       seconds=2e-5)],
                       measured=True, provenance={"tool": "test"})
    choice = tuning.choose(prob, "pallas")
    assert choice.config == tuned and choice.source.startswith("user cache pallas-tpu-v5e.json")
    doc = json.loads(path.read_text())
    assert doc["entries"][0]["config"] == {"block_m": 32, "block_n": 512, "block_k": 2048, "max_m": 16}
    doc["entries"][0]["config"]["num_warps"] = 4
    path.write_text(json.dumps(doc))
    tuning.reload()
    with pytest.warns(RuntimeWarning, match=r"unknown TileConfig keys \['num_warps'\]"):
        choice = tuning.choose(prob, "pallas")
    assert choice.source.startswith("heuristic")


def test_explain_shows_the_config_line(dirs):
    text = str(dispatch.explain(problem(W8A8, m=1)))
    assert "chosen: pallas.tpu.w8a8" in text
    assert "config: bm32-bn2048-bk2048-M<=16 (heuristic: TPU v5e w8a8 table entry for M=1)" in text
    text = str(dispatch.explain(problem(W4A8(128), m=64, arch="v6e")))
    assert "config: bm256-bn1024-bk512-anyM (heuristic: TPU v6e w4a8 table entry for M=64)" in text


def test_tpu_run_uses_the_chosen_config(dirs, monkeypatch):
    """The pallas.tpu implementation hands tuning's choice to the kernels (intercepted: no TPU here)."""
    prob = problem(W4A8(128), m=2, n=256, k=512)
    tuned = TileConfig(block_m=32, block_n=128, block_k=512, max_m=4)
    tuning.write_table(tuning.cache_path("pallas", "tpu-v5e"), tunable.TUNABLE, "tpu-v5e",
                       [tuning.Entry(key=tuning.key_of(prob), config=tuned)], measured=True, provenance={})
    seen = {}
    monkeypatch.setattr(ops, "qmatmul", lambda *a, **kw: seen.update(kw) or "out")
    call = dispatch.bind(prob)
    assert call.implementation.name == "pallas.tpu.w4a8"
    assert call.run(None, None, None) == "out"
    assert seen["config"] == tuned and seen["target"] is ops.Target.TPU_V5E


@pytest.mark.parametrize("recipe", [W8A8, W4A16(32, zero_point=True), W4A8(64)], ids=lambda r: r.name)
def test_measure_operands_run_the_kernels(recipe):
    """`measure`'s operands have the shapes the kernels take (run here interpreted: no TPU)."""
    prob = problem(recipe, m=3, n=200, k=300, arch="v5e", act="float32", has_bias=True)
    lhs, rhs, bias = tunable._operands(prob, ops.Target.INTERPRET)
    config = tunable.heuristic(prob)[0]
    out = ops.qmatmul(lhs, rhs, recipe, bias=bias, out_dtype=jnp.float32, target=ops.Target.INTERPRET, config=config)
    assert out.shape == (3, 200) and bool(jnp.all(jnp.isfinite(out)))
    host = lambda x: None if x is None else np.asarray(x)
    rq = reference.RefQuantized(qvalue=host(rhs.qvalue), scale=host(rhs.scale), zero_point=host(rhs.zero_point),
                                fmt=recipe.rhs, k=300)
    if isinstance(lhs, QOperand):
        lq = reference.RefQuantized(qvalue=host(lhs.qvalue), scale=host(lhs.scale), zero_point=None, fmt=recipe.lhs,
                                    k=300)
        ref, operands = reference.qmatmul(lq, rq, recipe, bias=host(bias)), (lq.dequantize(), rq.dequantize())
    else:
        x = host(lhs)
        ref, operands = reference.qmatmul(x, rq, recipe, bias=host(bias)), (x, rq.dequantize(x.dtype))
    testing.assert_close(out, ref, *operands, np.float32)


def test_tune_list_for_a_named_tpu_without_one(capsys):
    from qkernels import tune

    assert tune.main(["--recipes", "w8a8", "--shapes", "1x8192x8192", "--backend", "pallas", "--list",
                      "--device", "tpu-v5e"]) == 0
    out = capsys.readouterr().out
    assert "on jax/tpu:v5e" in out and "bm32-" in out
    with pytest.raises(SystemExit, match="not a TPU kind"):
        tune.main(["--recipes", "w8a8", "--shapes", "1x64x64", "--backend", "pallas", "--list", "--device", "h100"])


def test_tune_list_without_a_device_lists_the_default_kinds(capsys):
    """No TPU here and no --device: --list shows the candidates for each TPU generation instead of exiting."""
    from qkernels import tune

    assert tune.main(["--recipes", "w8a8", "--shapes", "1x8192x8192", "--backend", "pallas", "--list"]) == 0
    captured = capsys.readouterr()
    assert "listing for the default device kinds of pallas: tpu-v5e, tpu-v6e, tpu-v5p" in captured.err
    for generation in ("v5e", "v6e", "v5p"):
        assert f"tpu-{generation}: qmatmul w8a8 M=1 N=8192 K=8192" in captured.out
        assert f"jax/tpu:{generation}" in captured.out
