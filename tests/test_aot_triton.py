"""`python -m qkernels.aot --target sm_80 --target sm_90`: every shipped Triton config compiles with no
GPU, in both specializations the JIT compiles (integers divisible by 16, and not), uses int8 tensor
cores for integer recipes, fp8 (E4M3) ones for FP8 on sm_90, 16-bit ones for weight-only recipes, does
not exceed shared memory, and does not spill in the divisible form model shapes run. (sm_89 and gfx942,
which compile the fp8 kernels too, take minutes more: `python -m qkernels.aot --target sm_89 --target
gfx942`.)"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

from qkernels import aot  # noqa: E402

pytestmark = pytest.mark.slow

INT8_MMA = ("IMMA.", "IGMMA.")
FLOAT_MMA = ("HMMA.", "HGMMA.")
FP8_MMA = ("QGMMA.", "QMMA.")  # with E4M3 operands (checked below): the sm_90 / sm_89 fp8 MMAs


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    path = tmp_path_factory.mktemp("aot") / "triton.json"
    code = aot.main(["--target", "sm_80", "--target", "sm_90", "--json", str(path)])
    data = json.loads(path.read_text())
    failed = [f"{r['target']} {r['kernel']} {r['config']}: {r['problems']}" for r in data if not r["ok"]]
    assert code == 0 and not failed, "\n".join(failed)
    return data


def test_every_family_and_target_is_checked(reports: list[dict]) -> None:
    seen = {(r["target"], r["kernel"]) for r in reports}
    kernels = ("quantize_rows", "w8a8", "w4a8", "w4a16", "w8a16", "gemv-w8a8", "gemv-w8a16", "gemv-w4a16",
               "gemv-w4a16-zp", "splitk_reduce-i32", "splitk_reduce-fp32", "splitk_reduce-fp32-rescale",
               "grouped-w8a8", "grouped-w4a16")  # the grouped (MoE) kernels: qkernels.aot.GROUPED
    fp8 = ("quantize_rows-fp8", "fp8", "fp8a16", "gemv-fp8", "gemv-fp8a16")  # sm_89+ only: no fp8 on sm_80
    assert seen == {(t, k) for t in ("sm_80", "sm_90") for k in kernels} | {("sm_90", k) for k in fp8}


def test_both_specializations_of_every_config_are_compiled(reports: list[dict]) -> None:
    """The JIT compiles model shapes with every integer a multiple of 16 and awkward ones without:
    each config is compiled in both forms; a spill fails the first and is only noted on the second."""
    variants: dict[tuple[str, str, str], set[str]] = {}
    for r in reports:
        variants.setdefault((r["target"], r["kernel"], r["config"]), set()).add(r["variant"])
        if r["variant"] == "div16":
            assert r["spill_bytes"] == 0 and not r["notes"], r
        elif r["spill_bytes"]:
            assert r["notes"] and "awkward-shape form" in r["notes"][0], r
    assert variants and all(v == {"div16", "any"} for v in variants.values()), variants


def test_decode_picks_and_split_variants_are_compiled(reports: list[dict]) -> None:
    """Every config the heuristic picks at decode (M=1..16 on the decode-sweep layers, on the
    target's device kinds) is among the compiled ones, split-K as its partial-storing form."""
    from qkernels.kernels.triton import aot as triton_aot, heuristics
    from qkernels.shapes import shape_set

    compiled = {(r["target"], r["config"]) for r in reports}
    for target, device in (("sm_80", "a100"), ("sm_90", "h100")):
        for family, group in (("w8a8", None), ("w8a16", None), ("w4a16", 128)):
            for s in shape_set("decode-sweep"):
                cfg, _ = heuristics.heuristic(family, target, device, s.m, s.n, s.k, group)
                name = triton_aot.Variant(cfg=cfg.for_group(group) if group else cfg, partial=cfg.split_k > 1).name
                assert (target, name) in compiled, (family, s, name)
    assert any(r["config"].endswith("-partial") for r in reports if r["kernel"] == "w8a8")


@pytest.mark.parametrize("kernel,expected", [
    pytest.param("w8a8", INT8_MMA, id="w8a8-int8-mma"), pytest.param("w4a8", INT8_MMA, id="w4a8-int8-mma"),
    pytest.param("w4a16", FLOAT_MMA, id="w4a16-bf16-mma"), pytest.param("w8a16", FLOAT_MMA, id="w8a16-bf16-mma"),
    pytest.param("fp8", FP8_MMA, id="fp8-e4m3-mma"), pytest.param("fp8a16", FLOAT_MMA, id="fp8a16-bf16-mma"),
    pytest.param("grouped-w8a8", INT8_MMA, id="grouped-w8a8-int8-mma"),
    pytest.param("grouped-w4a16", FLOAT_MMA, id="grouped-w4a16-bf16-mma")])
def test_tensor_core_instruction(reports: list[dict], kernel: str, expected: tuple[str, ...]) -> None:
    checked = [r for r in reports if r["kernel"] == kernel]
    assert checked
    for r in checked:
        assert (r["mma_instruction"] or "").startswith(expected), r
        if kernel == "fp8":
            assert "E4M3" in r["mma_instruction"], r
        assert r["registers"] <= 255 and (r["spill_bytes"] == 0 or r["variant"] == "any"), r


def test_gemv_and_reduce_need_no_tensor_cores_and_do_not_spill(reports: list[dict]) -> None:
    small = [r for r in reports if r["kernel"].startswith(("gemv-", "splitk_reduce-")) and r["variant"] == "div16"]
    assert small and all(r["mma_instruction"] is None and r["spill_bytes"] == 0 for r in small), small


def test_sm90_large_tiles_use_warpgroup_mma(reports: list[dict]) -> None:
    """Hopper's prefill configs (BLOCK_M >= 64) must reach wgmma (IGMMA int8, HGMMA bf16, QGMMA fp8), not the
    Ampere mma.sync path."""
    large = [r for r in reports if r["target"] == "sm_90" and r["kernel"] != "quantize_rows"
             and r["config"].startswith("m128")]
    assert large and all(r["mma_instruction"].startswith(("IGMMA.", "HGMMA.", "QGMMA.")) for r in large), large


def test_unknown_target_is_refused() -> None:
    from qkernels.kernels.triton import aot as triton_aot

    with pytest.raises(ValueError, match="choose from sm_80, sm_89, sm_90, gfx942"):
        triton_aot.check("sm_75")


def test_specializations_mark_integers_as_the_jit_does() -> None:
    """No compile: the divisible form marks sizes and strides `tt.divisibility` 16, the other marks
    no integer; both mark the pointers and fold unit K strides to the constant 1."""
    from qkernels.kernels.triton import aot as triton_aot

    spec = next(s for s in triton_aot.SPECS if s.name == "w8a8")
    cfg = spec.configs("sm_90")[0]
    names = spec.fn.arg_names
    for sp, sizes in ((triton_aot.DIVISIBLE, True), (triton_aot.ANY, False)):
        src = triton_aot._source(spec, cfg, sp)
        marked = {names[i] for (i,), a in src.attrs.items() if ["tt.divisibility", 16] in a}
        assert {"a_ptr", "w_ptr", "out_ptr"} <= marked
        assert ({"M", "N", "K", "stride_am"} <= marked) is sizes and (not {"M", "N", "K"} & marked) is not sizes
        assert src.constants[(names.index("stride_ak"),)] == 1
