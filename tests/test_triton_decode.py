"""Decode paths of the Triton kernels: split-K and GEMV against the reference, on a CUDA GPU when
one is present (compiled kernels), else in the interpreter (TRITON_INTERPRET=1, set by conftest).

W8A8: every variant's int32 accumulator and output are identical to the reference's (split-K sums
int32 partials exactly before the one epilogue). W8A16 / W4A16: within `testing.assert_close`, and
every variant equal to the unsplit tile kernel up to f32 summation order. Also: the heuristic's
picks per device, config (de)serialization, `qkernels.explain`'s config line, and the tuner CLI in
the interpreter writing a user cache that dispatch then reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _triton_target import DEVICE, t, torch  # skips the module without a GPU or interpreter

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qkernels import dispatch, formats, hardware, reference, testing, tune, tuning  # noqa: E402
from qkernels.kernels.triton import heuristics, quantize_rows  # noqa: E402
from qkernels.kernels.triton import w4a8_matmul, w4a16_matmul, w8a8_matmul, w8a16_matmul  # noqa: E402
from qkernels.kernels.triton._common import Kernel, MatmulConfig  # noqa: E402
from qkernels.kernels.triton.splitk import k_split  # noqa: E402

TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OUT_DTYPES = tuple(TORCH)
TILE = MatmulConfig(block_m=16, block_n=16, block_k=32, num_warps=1, num_stages=1)


def npy(y: torch.Tensor) -> np.ndarray:
    return y.float().cpu().numpy() if y.is_floating_point() else y.cpu().numpy()


def variant(kernel: Kernel, split: int, m: int, block_n: int = 16) -> MatmulConfig:
    block_m = min(16, 1 << max(m - 1, 0).bit_length()) if kernel is Kernel.GEMV else 16
    return MatmulConfig(block_m=block_m, block_n=block_n, block_k=32, num_warps=1, num_stages=1, kernel=kernel,
                        split_k=split)


def data(seed: int, batch: int | None, m: int, n: int, k: int):
    rng = np.random.default_rng(seed)
    x = testing.activations(rng, (batch, m, k) if batch else (m, k))
    w = testing.weights(rng, (n, k))
    return x, w, rng.standard_normal(n).astype(np.float32)


decode = st.tuples(
    st.sampled_from([None, 2]),  # batch
    st.integers(1, 16),  # M
    st.sampled_from([1, 7, 33, 70]),  # N: below, across and not a multiple of BLOCK_N
    st.sampled_from([1, 31, 97, 300]),  # K: odd, below one tile, not a multiple of BLOCK_K
)
kernels = st.sampled_from(list(Kernel))
splits = st.integers(1, 8)


# ---------------------------------------------------------------- W8A8: exact whatever the variant


@settings(max_examples=25)
@given(shape=decode, kernel=kernels, split=splits, has_bias=st.booleans(), out=st.sampled_from(OUT_DTYPES),
       seed=st.integers(0, 99))
def test_w8a8_decode_variants_exact(shape, kernel: Kernel, split: int, has_bias: bool, out: str, seed: int) -> None:
    batch, m, n, k = shape
    x, w, bias = data(seed, batch, m, n, k)
    recipe = formats.W8A8
    wq = reference.quantize(w, recipe.rhs)
    q, s = quantize_rows(t(x))
    cfg = variant(kernel, split, m)
    acc = w8a8_matmul(q, s, t(wq.qvalue), t(wq.scale), return_acc=True, config=cfg)
    np.testing.assert_array_equal(npy(acc), reference.accumulators(x, wq, recipe))
    b = bias if has_bias else None
    y = w8a8_matmul(q, s, t(wq.qvalue), t(wq.scale), t(b), out_dtype=out, config=cfg)
    assert y.dtype == TORCH[out]
    expected = reference.qmatmul(x, wq, recipe, bias=b, out_dtype=out).astype(np.float32)
    np.testing.assert_array_equal(npy(y), expected)


@pytest.mark.parametrize("split", range(1, 9))
@pytest.mark.parametrize("kernel", list(Kernel), ids=lambda k: k.value)
def test_w8a8_every_split_count_is_bit_identical(kernel: Kernel, split: int) -> None:
    x, w, bias = data(split, None, 5, 45, 289)  # 10 K tiles of 32: splits of 1..8 tiles, some uneven
    wq = reference.quantize(w, formats.W8A8.rhs)
    q, s = quantize_rows(t(x))
    run = lambda cfg: w8a8_matmul(q, s, t(wq.qvalue), t(wq.scale), t(bias), out_dtype="float32", config=cfg)
    assert torch.equal(run(variant(kernel, split, 5)), run(TILE))


# ---------------------------------------------------------------- weight-only: accurate


def _weight_only(recipe, x, act: str):
    xt = t(x).to(TORCH[act])
    return xt, npy(xt).astype(reference.np_dtype(act))


def _run_weight_only(recipe, xt, wq, b, out: str, cfg: MatmulConfig | None) -> torch.Tensor:
    if recipe.group_size:
        return w4a16_matmul(xt, t(wq.qvalue), t(wq.scale), t(wq.zero_point), t(b), group_size=recipe.group_size,
                            out_dtype=out, config=cfg)
    return w8a16_matmul(xt, t(wq.qvalue), t(wq.scale), t(b), out_dtype=out, config=cfg)


weight_only = st.sampled_from([formats.W8A16, formats.W4A16(32), formats.W4A16(64, zero_point=True),
                               formats.W4A16(128), formats.W4A16(256, zero_point=True)])


@settings(max_examples=25)
@given(shape=decode, recipe=weight_only, kernel=kernels, split=splits, act=st.sampled_from(["bfloat16", "float16"]),
       has_bias=st.booleans(), out=st.sampled_from(OUT_DTYPES), seed=st.integers(0, 99))
def test_weight_only_decode_variants_close(shape, recipe, kernel: Kernel, split: int, act: str, has_bias: bool,
                                           out: str, seed: int) -> None:
    batch, m, n, k = shape
    x, w, bias = data(seed, batch, m, n, k)
    wq = reference.quantize(w, recipe.rhs)
    xt, xn = _weight_only(recipe, x, act)
    b = bias if has_bias else None
    y = _run_weight_only(recipe, xt, wq, b, out, variant(kernel, split, m))
    assert y.dtype == TORCH[out]
    expected = reference.qmatmul(xn, wq, recipe, bias=b, out_dtype=out)
    testing.assert_close(npy(y), expected, xn, wq.dequantize(act), out)


@pytest.mark.parametrize("split", range(1, 9))
@pytest.mark.parametrize("recipe", [formats.W8A16, formats.W4A16(32, zero_point=True)], ids=lambda r: r.name)
def test_weight_only_split_counts_agree_with_the_tile_kernel(recipe, split: int) -> None:
    """Same dequantized bf16 weights, same f32 products: only the f32 summation order differs."""
    x, w, bias = data(split, None, 3, 40, 300)
    wq = reference.quantize(w, recipe.rhs)
    xt, xn = _weight_only(recipe, x, "bfloat16")
    base = npy(_run_weight_only(recipe, xt, wq, bias, "float32", TILE))
    for kernel in Kernel:
        y = npy(_run_weight_only(recipe, xt, wq, bias, "float32", variant(kernel, split, 3)))
        # Summation-order bound: K * eps_f32 * sum |x * w| per output.
        bound = 300 * np.finfo(np.float32).eps * (np.abs(xn) @ np.abs(wq.dequantize("bfloat16")).T) + 1e-30
        assert np.all(np.abs(y - base) <= bound), (kernel, split)


# ---------------------------------------------------------------- configs and the heuristic


def test_k_split_launches_only_non_empty_ranges() -> None:
    assert k_split(300, 32, 4) == (96, 4)
    assert k_split(300, 32, 8) == (64, 5)
    assert k_split(1, 32, 8) == (32, 1)
    assert k_split(0, 32, 3) == (32, 1)


def test_config_dict_round_trip_and_strictness() -> None:
    cfg = MatmulConfig(block_m=4, block_n=64, block_k=256, num_warps=4, num_stages=3, kernel=Kernel.GEMV, split_k=4)
    assert cfg.name == "gemv-m4n64k256w4s3-sk4"
    assert MatmulConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, match in [({**cfg.to_dict(), "unroll": 2}, "unknown MatmulConfig keys"),
                       ({**cfg.to_dict(), "kernel": "wgmma"}, "kernel='wgmma'"),
                       ({**cfg.to_dict(), "block_n": 64.0}, "block_n=64.0"),
                       ({**cfg.to_dict(), "split_k": 32}, "split_k=32"),
                       ({k: v for k, v in cfg.to_dict().items() if k != "block_k"}, "missing")]:
        with pytest.raises(ValueError, match=match):
            MatmulConfig.from_dict(bad)
    with pytest.raises(ValueError, match="tl.dot needs"):
        MatmulConfig(block_m=4, block_n=64, block_k=64)
    with pytest.raises(ValueError, match="block_m must be <= 16"):
        MatmulConfig(block_m=32, block_n=64, block_k=64, kernel=Kernel.GEMV)


@pytest.mark.parametrize("family,group", [("w8a8", None), ("w8a16", None), ("w4a16", 128)])
@pytest.mark.parametrize("device,arch,sms", [("h100", "sm_90", 132), ("a100", "sm_80", 108), ("", "sm_80", 108)])
def test_heuristic_fills_the_device_at_decode(family: str, group, device: str, arch: str, sms: int) -> None:
    for m in (1, 2, 4):
        cfg, why = heuristics.heuristic(family, arch, device, m, 8192, 8192, group)
        assert cfg.kernel is Kernel.GEMV and cfg.block_m >= m and "GEMV" in why
        assert -(-8192 // cfg.block_n) * cfg.split_k >= sms
    for m in (8, 16):
        cfg, why = heuristics.heuristic(family, arch, device, m, 4096, 4096, group)
        assert cfg.kernel is Kernel.TILE and cfg.block_m == 16
        assert -(-4096 // cfg.block_n) * cfg.split_k >= sms and cfg.split_k > 1, why
    big, why = heuristics.heuristic(family, arch, device, 4096, 8192, 8192, group)
    assert big.kernel is Kernel.TILE and big.split_k == 1 and big.block_m >= 64, why


def test_w4a8_never_splits_and_refuses_decode_variants() -> None:
    cfg, why = heuristics.heuristic("w4a8", "sm_90", "h100", 1, 8192, 8192, 128)
    assert cfg.kernel is Kernel.TILE and cfg.split_k == 1, why
    assert "W4A8" in heuristics.check(variant(Kernel.GEMV, 1, 1), "w4a8", 1, 256, 128)
    x, w, _ = data(0, None, 2, 16, 64)
    wq = reference.quantize(w, formats.W4A8(32).rhs)
    q, s = quantize_rows(t(x))
    with pytest.raises(ValueError, match="W4A8 runs its tile kernel only"):
        w4a8_matmul(q, s, t(wq.qvalue), t(wq.scale), group_size=32, config=variant(Kernel.TILE, 2, 2))


@pytest.mark.parametrize("family,group", [("w8a8", None), ("w4a16", 64), ("w8a16", None), ("w4a8", 128)])
def test_candidates_all_run_and_are_distinct(family: str, group) -> None:
    for arch, m in (("sm_90", 1), ("sm_80", 16), ("gfx942", 256), ("interpret", 3)):
        cands = heuristics.candidates(family, arch, "", m, 4096, 4096, group)
        assert cands and cands[0] == heuristics.heuristic(family, arch, "", m, 4096, 4096, group)[0]
        assert all(heuristics.check(c, family, m, 4096, group) is None for c in cands)
        effective = [c.for_group(group) if group else c for c in cands]
        assert len(set(effective)) == len(effective)


def _gpu_problem(recipe, m: int, device: str = "h100") -> dispatch.Problem:
    return dispatch.Problem(recipe=recipe, m=m, n=8192, k=8192, act_dtype="bfloat16", out_dtype="bfloat16",
                            framework="torch", platform="cuda:sm_90", device=device)


def test_explain_shows_the_decode_config_and_its_source() -> None:
    explanation = dispatch.explain(_gpu_problem(formats.W4A16(128), 1))
    assert explanation.chosen.name == "triton.w4a16"
    text = str(explanation)
    assert "chosen: triton.w4a16" in text.splitlines() and "-> triton.w4a16" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("config:"))
    assert "gemv-m1n" in line and "heuristic: M=1 <= 4: GEMV" in line and "132 SMs" in line
    line = next(ln for ln in str(dispatch.explain(_gpu_problem(formats.W8A16, 16))).splitlines()
                if ln.startswith("config:"))
    assert "-sk" in line and "split-K" in line


def _problem_here(recipe, m: int, n: int, k: int) -> dispatch.Problem:
    """A bf16 problem on the device these tests run on, as the tuner builds it."""
    from torch_bindings.ops import device_of, platform_of

    return dispatch.Problem(recipe=recipe, m=m, n=n, k=k, act_dtype="bfloat16", out_dtype="bfloat16",
                            framework="torch", platform=platform_of(DEVICE), device=device_of(DEVICE))


def test_tune_cli_writes_the_cache_dispatch_reads(dirs: tuple[Path, Path], capsys) -> None:
    assert tune.main(["--recipes", "w8a8,w4a16-g32", "--shapes", "2x40x96", "--max-configs", "3"]) == 0
    problem = _problem_here(formats.W8A8, 2, 40, 96)
    table = json.loads((dirs[1] / "tuned" / f"triton-{problem.device}.json").read_text())
    assert table["format"] == tuning.TABLE_FORMAT and len(table["entries"]) == 2
    choice = tuning.choose(problem, "triton")
    assert choice.source == f"user cache triton-{problem.device}.json: w8a8 M<=2 N=40 K=96"
    # The tuned config runs the call, with the reference's exact result.
    x, w, _ = data(1, None, 2, 40, 96)
    wq = reference.quantize(w, formats.W8A8.rhs)
    q, s = quantize_rows(t(x))
    acc = w8a8_matmul(q, s, t(wq.qvalue), t(wq.scale), return_acc=True, config=choice.config)
    np.testing.assert_array_equal(npy(acc), reference.accumulators(x, wq, formats.W8A8))
    assert "best" in capsys.readouterr().out


def test_tune_list_for_a_named_gpu_without_one(capsys) -> None:
    assert tune.main(["--recipes", "w4a16-g128", "--shapes", "8192x8192", "--m", "1,16", "--list",
                      "--device", "h100"]) == 0
    out = capsys.readouterr().out
    assert "on torch/cuda:sm_90" in out and "gemv-m1n64k128" in out and "-sk" in out
    with pytest.raises(SystemExit, match="only goes with --list"):
        tune.main(["--recipes", "w8a8", "--shapes", "1x64x64", "--device", "h100"])
    with pytest.raises(SystemExit, match="not a known GPU kind"):
        tune.main(["--recipes", "w8a8", "--shapes", "1x64x64", "--list", "--device", "tpu-v5e"])

    defaults = [d.kind for d in tune.default_devices("triton", tuning.tunables()["triton"])]
    assert {"a100", "h100", "h200", "mi300x"} <= set(defaults) and len(set(defaults)) == len(defaults)
    assert all(hardware.device(k).arch for k in defaults)  # GPU kinds with a config table


def test_tune_ship_writes_the_package_table(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    shipped, cache = dirs
    assert tune.main(["--recipes", "w8a16", "--shapes", "1x24x64", "--max-configs", "2", "--ship"]) == 0
    problem = _problem_here(formats.W8A16, 1, 24, 64)
    assert (shipped / f"triton-{problem.device}.json").is_file()
    assert not (cache / "tuned").exists()
    tuning.reload()
    assert tuning.choose(problem, "triton").source.startswith(f"shipped table triton-{problem.device}.json")
    with pytest.raises(SystemExit):
        tune.main(["--recipes", "w8a16", "--shapes", "1x24x64", "--ship", "--out", str(tmp_path / "x.json")])
