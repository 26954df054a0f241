"""Config tables: precedence (user cache > shipped table > heuristic), explain's config line, and
corrupt or foreign tables ignored with a warning, never a crash or a change of numerics."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qkernels import dispatch, tuning
from qkernels.formats import W4A16, W8A8

BACKEND = "fake-tunable"
FRAMEWORK = "fake-framework"


@dataclass(frozen=True, kw_only=True, slots=True)
class Cfg:
    block: int

    @property
    def name(self) -> str:
        return f"b{self.block}"

    @staticmethod
    def parse(d: dict[str, Any]) -> Cfg:
        if set(d) != {"block"} or not isinstance(d["block"], int) or d["block"] < 1:
            raise ValueError(f"bad config {d}")
        return Cfg(block=d["block"])


def _check(cfg: Cfg, problem: dispatch.Problem) -> str | None:
    return f"block {cfg.block} > K={problem.k}" if cfg.block > problem.k else None


FAKE = tuning.register(tuning.Tunable(
    backend=BACKEND, serves=lambda p: None, parse=Cfg.parse, dump=lambda c: {"block": c.block}, check=_check,
    heuristic=lambda p: (Cfg(block=16), "fixed fallback"), candidates=lambda p: (Cfg(block=16), Cfg(block=32))))
dispatch.register(dispatch.Implementation(
    name="fake.kernel", framework=FRAMEWORK, priority=1000, supports=lambda p: None,
    run=lambda *a: None, configure=lambda p: tuning.choose(p, BACKEND)))


def problem(m: int = 3, n: int = 64, k: int = 256, device: str = "h100", recipe: Any = None) -> dispatch.Problem:
    return dispatch.Problem(recipe=recipe or W8A8, m=m, n=n, k=k, act_dtype="bfloat16", out_dtype="bfloat16",
                            framework=FRAMEWORK, platform="cuda:sm_90", device=device)


def write(path: Path, entries: list[tuple[tuning.Key, int]], device: str = "h100") -> None:
    tuning.write_table(path, FAKE, device, [tuning.Entry(key=k, config=Cfg(block=b), seconds=1e-5) for k, b in entries],
                       measured=True, provenance={"tool": "test"})


def test_device_kinds() -> None:
    cases = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA H100 PCIe": "h100", "NVIDIA A100-SXM4-80GB": "a100",
             "NVIDIA H200": "h200", "NVIDIA L4": "l4", "NVIDIA L40S": "l40s", "AMD Instinct MI300X": "mi300x",
             "TPU v5 lite": "tpu-v5e", "TPU v6e": "tpu-v6e", "TPU v5p": "tpu-v5p", "cpu": "cpu",
             "Some New GPU (rev 2)": "some-new-gpu-rev-2"}
    assert {name: tuning.device_kind(name) for name in cases} == cases


@pytest.mark.parametrize("m,bucket", [(1, 1), (2, 2), (3, 4), (9, 16), (16, 16), (17, 32), (4096, 4096), (10**6, 4096)])
def test_m_buckets(m: int, bucket: int) -> None:
    assert tuning.m_bucket(m) == bucket


def test_heuristic_when_no_table(dirs: tuple[Path, Path]) -> None:
    choice = tuning.choose(problem(), BACKEND)
    assert choice.config == Cfg(block=16) and choice.source.startswith("heuristic: fixed fallback")


def test_shipped_table_then_user_cache_override(dirs: tuple[Path, Path]) -> None:
    shipped, cache = dirs
    key = tuning.key_of(problem())
    assert key == tuning.Key(family="w8a8", m=4, n=64, k=256, group_size=None)
    write(shipped / f"{BACKEND}-h100.json", [(key, 64)])
    choice = tuning.choose(problem(), BACKEND)
    assert choice.config == Cfg(block=64) and choice.source.startswith(f"shipped table {BACKEND}-h100.json")
    write(tuning.cache_path(BACKEND, "h100"), [(key, 128)])  # write_table reloads
    choice = tuning.choose(problem(), BACKEND)
    assert choice.config == Cfg(block=128) and choice.source.startswith("user cache")
    # Another device kind, M bucket, N or group size does not match the entry.
    for other in (problem(device="a100"), problem(m=5), problem(n=65), problem(recipe=W4A16(128))):
        assert tuning.choose(other, BACKEND).source.startswith("heuristic")


def test_refused_table_entry_falls_back_with_reason(dirs: tuple[Path, Path]) -> None:
    shipped, _ = dirs
    small = problem(k=48)
    write(shipped / f"{BACKEND}-h100.json", [(tuning.key_of(small), 64)])
    choice = tuning.choose(small, BACKEND)
    assert choice.config == Cfg(block=16)
    assert "shipped table entry refused: block 64 > K=48" in choice.source


def test_explain_shows_config_and_source(dirs: tuple[Path, Path]) -> None:
    shipped, _ = dirs
    write(shipped / f"{BACKEND}-h100.json", [(tuning.key_of(problem()), 64)])
    text = str(dispatch.explain(problem()))
    assert "chosen: fake.kernel" in text
    assert f"config: b64 (shipped table {BACKEND}-h100.json: w8a8 M<=4 N=64 K=256)" in text


CORRUPT = [
    pytest.param(b"\x00\xff not json", "not readable JSON", id="binary-garbage"),
    pytest.param(b'{"format": "qkernels.tuned/1", "backend"', "not readable JSON", id="truncated"),
    pytest.param(b"[1, 2, 3]", "format is 'list'", id="json-list"),
    pytest.param(b'{"format": "autotune-cache/7", "entries": []}', "format is 'autotune-cache/7'", id="foreign-format"),
    pytest.param(json.dumps({"format": tuning.TABLE_FORMAT, "backend": "other", "device": "h100", "entries": []}).encode(),
                 "for backend 'other'", id="other-backend"),
    pytest.param(json.dumps({"format": tuning.TABLE_FORMAT, "backend": BACKEND, "device": "a100", "entries": []}).encode(),
                 "on 'a100'", id="other-device"),
    pytest.param(json.dumps({"format": tuning.TABLE_FORMAT, "backend": BACKEND, "device": "h100", "entries": 5}).encode(),
                 "'entries' is not a list", id="entries-not-list"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "RecursionError", id="deep-nesting"),
    pytest.param(b'{"format": "qkernels.tuned/1", "entries": [' + b"9" * 5000 + b"]}", "ValueError",
                 id="integer-beyond-the-digit-limit"),
    pytest.param(b" " * (17 * 2**20) + b"{}", "more than a table of configs needs", id="oversized"),
]


@pytest.mark.parametrize("content,message", CORRUPT)
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(dirs: tuple[Path, Path], content: bytes,
                                                           message: str) -> None:
    shipped, _ = dirs
    write(shipped / f"{BACKEND}-h100.json", [(tuning.key_of(problem()), 64)])
    path = tuning.cache_path(BACKEND, "h100")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    tuning.reload()
    with pytest.warns(RuntimeWarning, match="ignoring tuned-config file") as record:
        choice = tuning.choose(problem(), BACKEND)
    assert message in str(record[0].message)
    assert choice.config == Cfg(block=64), "the shipped table still serves"


def test_bad_entries_are_dropped_and_good_ones_kept(dirs: tuple[Path, Path]) -> None:
    _, cache = dirs
    good = {"key": {"family": "w8a8", "m": 4, "n": 64, "k": 256, "group_size": None}, "config": {"block": 32}}
    rows = [{"key": {"family": "w8a8", "m": 3, "n": 64, "k": 256}, "config": {"block": 8}},  # 3 is no bucket
            {"key": good["key"], "config": {"block": -1}},
            {"key": good["key"], "config": {"block": 8, "warps": 4}},
            {"config": {"block": 8}},
            {"key": good["key"], "config": {"block": 16}, "seconds": 10**400},  # float() overflows
            {"key": good["key"], "config": [[[["deep"]]]]},
            good]
    path = tuning.cache_path(BACKEND, "h100")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": tuning.TABLE_FORMAT, "backend": BACKEND, "device": "h100", "entries": rows}))
    tuning.reload()
    with pytest.warns(RuntimeWarning, match="dropped 6 unusable entries"):
        choice = tuning.choose(problem(), BACKEND)
    assert choice.config == Cfg(block=32) and choice.source.startswith("user cache")


def test_unreadable_directory_in_place_of_the_cache_file(dirs: tuple[Path, Path]) -> None:
    path = tuning.cache_path(BACKEND, "h100")
    path.mkdir(parents=True)  # a directory where the file should be: read fails with an OSError
    tuning.reload()
    with pytest.warns(RuntimeWarning, match="ignoring tuned-config file"):
        assert tuning.choose(problem(), BACKEND).source.startswith("heuristic")


def test_table_round_trip_is_sorted_json(dirs: tuple[Path, Path]) -> None:
    _, cache = dirs
    keys = [tuning.Key(family="w8a8", m=m, n=64, k=256) for m in (16, 1, 4)]
    path = cache / "t.json"
    write(path, [(k, 16 * (i + 1)) for i, k in enumerate(keys)])
    doc = json.loads(path.read_text())
    assert doc["format"] == tuning.TABLE_FORMAT and doc["measured"] is True
    assert [r["key"]["m"] for r in doc["entries"]] == [1, 4, 16]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = tuning.load_table(path, FAKE, "h100")
    assert {e.key: e.config.block for e in table.entries} == {keys[0]: 16, keys[1]: 32, keys[2]: 48}
