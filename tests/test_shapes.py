"""The shared shape catalogue: named sets, tags and ids that tests and benchmarks rely on."""

from __future__ import annotations

import pytest

from qkernels import shapes


def test_sets_have_unique_readable_ids_and_tags() -> None:
    for name, group in shapes.SETS.items():
        ids = [s.id + s.layer for s in group]
        assert len(ids) == len(set(ids)), name
        assert group, name
    assert shapes.Shape(m=1, n=4096, k=4095).id == "M1-N4096-K4095"
    assert shapes.Shape(m=3, n=5, k=7, batch=2).id == "B2-M3-N5-K7"


def test_catalogue_covers_the_issue_shapes() -> None:
    model = shapes.shape_set("model")
    layers = {(s.k, s.n) for s in model}
    assert {(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024), (8192, 28672)} <= layers
    assert {s.m for s in model} == set(shapes.M_VALUES)
    assert all(max(s.n, s.k) <= 4096 for s in shapes.shape_set("cpu"))
    assert all(s.m <= 16 for s in shapes.tagged("decode"))
    sweep = shapes.shape_set("decode-sweep")  # issue 8's decode targets: M = 1..16 on 8192x8192
    assert {s.m for s in sweep if (s.n, s.k) == (8192, 8192)} == set(shapes.DECODE_M) == {1, 2, 4, 8, 16}
    awkward = shapes.shape_set("awkward")
    assert any(s.m == 1 for s in awkward) and any(s.k % 2 for s in awkward) and any(s.batch for s in awkward)


def test_joined_sets_and_unknown_names() -> None:
    joined = shapes.shape_set("smoke+awkward")
    assert len(joined) == len(shapes.SETS["smoke"]) + len(shapes.SETS["awkward"])
    with pytest.raises(ValueError, match="unknown shape set 'nope'"):
        shapes.shape_set("nope")
