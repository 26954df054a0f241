"""One catalogue of matmul shapes, shared by tests, benchmarks and tuning.

Each `Shape` is a canonical problem size (M tokens, N output features, K input features, optional
batch) with tags: `decode` (M <= 16, memory-bound), `prefill` (large M, compute-bound), `awkward`
(not multiples of any block size: M=1, odd K, primes), `model` (a real transformer layer), `square`.
Named sets (`SETS`) are what `python -m bench --shapes NAME` and `python -m qkernels.tune` take.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Shape", "LAYERS", "M_VALUES", "DECODE_M", "SETS", "shape_set", "parse_shapes", "tagged"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Shape:
    m: int
    n: int
    k: int
    batch: int | None = None
    layer: str = ""
    tags: frozenset[str] = field(default_factory=frozenset)

    @property
    def id(self) -> str:
        """Readable test/bench id, e.g. 'M1-N4096-K4096' or 'B2-M3-N5-K7'."""
        b = f"B{self.batch}-" if self.batch is not None else ""
        return f"{b}M{self.m}-N{self.n}-K{self.k}"

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k * (self.batch or 1)


# Real transformer layers as (name, in_features K, out_features N).
LAYERS: tuple[tuple[str, int, int], ...] = (
    ("llama3-8b.attn_o", 4096, 4096),
    ("llama3-8b.mlp_up", 4096, 14336),
    ("llama3-8b.mlp_down", 14336, 4096),
    ("llama3-8b.attn_kv", 4096, 1024),
    ("llama3-70b.mlp_up", 8192, 28672),
    ("square-8192", 8192, 8192),
)

M_VALUES = (1, 16, 64, 256, 1024, 4096)


def _tags_for_m(m: int) -> frozenset[str]:
    return frozenset({"decode"} if m <= 16 else {"prefill"} if m >= 1024 else set())


def _model(max_nk: int | None = None, ms: tuple[int, ...] = M_VALUES) -> tuple[Shape, ...]:
    return tuple(
        Shape(m=m, n=n, k=k, layer=name, tags=frozenset({"model"}) | _tags_for_m(m))
        for name, k, n in LAYERS if max_nk is None or max(n, k) <= max_nk
        for m in ms)


_SQUARE = tuple(Shape(m=s, n=s, k=s, layer=f"square-{s}", tags=frozenset({"square"}) | _tags_for_m(s))
                for s in (256, 512, 1024, 2048, 4096, 8192))

_AWKWARD = tuple(Shape(m=m, n=n, k=k, batch=b, tags=frozenset({"awkward"}) | _tags_for_m(m)) for m, n, k, b in (
    (1, 1, 1, None), (1, 37, 100, None), (3, 5, 7, None), (1, 96, 257, None), (17, 33, 65, None),
    (5, 130, 129, 2), (64, 100, 384, None), (129, 255, 513, None), (1, 4096, 4095, None),
))

# Decode row counts the small-M kernels and tuned tables are built for (issue targets: M = 1..16).
DECODE_M = (1, 2, 4, 8, 16)

_DECODE_SWEEP = tuple(Shape(m=m, n=n, k=k, layer=name, tags=frozenset({"model", "decode"}))
                      for name, k, n in LAYERS if name in ("square-8192", "llama3-8b.attn_o", "llama3-8b.mlp_up")
                      for m in DECODE_M)

SETS: dict[str, tuple[Shape, ...]] = {
    "model": _model(),
    "llama3-8b": tuple(s for s in _model() if s.layer.startswith("llama3-8b")),
    "cpu": _model(max_nk=4096),
    "square": _SQUARE,
    "awkward": _AWKWARD,
    "decode": tuple(s for s in _model() if "decode" in s.tags),
    "decode-sweep": _DECODE_SWEEP,
    "prefill": tuple(s for s in _model() if "prefill" in s.tags),
    "smoke": (Shape(m=1, n=64, k=96, tags=frozenset({"decode", "awkward"})),
              Shape(m=33, n=48, k=160, tags=frozenset({"awkward"}))),
}


def shape_set(name: str) -> tuple[Shape, ...]:
    """A named set, or several joined with '+' ('llama3-8b+awkward')."""
    out: list[Shape] = []
    for part in name.split("+"):
        if part not in SETS:
            raise ValueError(f"unknown shape set {part!r}; choose from {', '.join(sorted(SETS))}")
        out.extend(s for s in SETS[part] if s not in out)
    return tuple(out)


def parse_shapes(spec: str, ms: tuple[int, ...] | None = None, *, default_ms: tuple[int, ...] = M_VALUES,
                 ) -> tuple[Shape, ...]:
    """Shapes from a comma-separated spec of named sets ('llama3-8b+awkward'), `MxNxK` and `NxK`
    (N output features by K input features, a torch weight's `(out, in)` shape; one shape per M).

    `ms`: the row counts of `NxK` entries (default `default_ms`) and, when given, a filter on the
    named sets' shapes (M in `ms`). `NxK` shapes of a catalogued layer carry its name and tags.

    | spec                 | ms      | shapes                                            |
    |----------------------|---------|---------------------------------------------------|
    | '14336x4096'         | (1, 16) | M=1, 16 on N=14336, K=4096 (llama3-8b.mlp_up)     |
    | '4096x4096x4096'     | any     | M=N=K=4096                                        |
    | 'decode-sweep'       | (1,)    | the set's M=1 shapes                              |
    """
    layers = {(n, k): name for name, k, n in LAYERS}
    out: list[Shape] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part.split("+")[0] in SETS:
            out.extend(s for s in shape_set(part) if ms is None or s.m in ms)
            continue
        try:
            dims = tuple(int(d) for d in part.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) not in (2, 3) or min(dims) <= 0:
            raise ValueError(f"shape {part!r} is neither MxNxK, NxK (out x in features, with M from --m) nor a "
                             f"shape set ({', '.join(sorted(SETS))})")
        for m in dims[:1] if len(dims) == 3 else (ms or default_ms):
            n, k = dims[-2:]
            layer = layers.get((n, k), "")
            tags = _tags_for_m(m) | ({"model"} if layer.startswith("llama") else set())
            out.append(Shape(m=m, n=n, k=k, layer=layer, tags=frozenset(tags)))
    return tuple(dict.fromkeys(out))


def tagged(tag: str) -> tuple[Shape, ...]:
    """Every catalogued shape with `tag`, each once."""
    seen: dict[Shape, None] = {}
    for shapes in SETS.values():
        seen.update((s, None) for s in shapes if tag in s.tags)
    return tuple(seen)
