"""JAX rows: `qkernels.dot_general` per recipe, `lax.dot_general` f32/bf16, XLA int8 dot + rescale, AQT;
and the host-overhead section (`overhead`, `python -m bench.jax_cases overhead`).

Weights are laid out as a Flax `Dense` kernel, (K, N), contracted on axis 0, which is the call the
README shows: `qk.dot_general(x, qk.quantize(w, recipe, contracting_axes=(0,)), DN)`.
"""

from __future__ import annotations

import functools
from typing import Any

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.cases import mma_of, Case, Data, Prepared, Unavailable, chosen_name, nbytes
from qkernels import reference
from qkernels.formats import W8A8, Recipe

__all__ = ["cases", "DN", "overhead", "overhead_markdown", "OVERHEAD_SHAPES"]

DN = (((1,), (0,)), ((), ()))
_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _sync(out: Any) -> None:
    jax.block_until_ready(out)


def _to_numpy(out: Any) -> np.ndarray:
    return np.asarray(jnp.asarray(out, jnp.float32))


def _act_dtype(device: Any) -> Any:
    return jnp.bfloat16 if device.accelerated else jnp.float32


def _operands(data: Data, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """x (M, K) and the weight as a (K, N) kernel, on the default device."""
    return jnp.asarray(data.x, dtype), jnp.asarray(np.ascontiguousarray(data.w.T), dtype)


def _lax(dtype_name: str):
    def prepare(data: Data, device: Any) -> Prepared:
        x, w = _operands(data, _DTYPES[dtype_name])
        f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, DN))
        return Prepared(fn=lambda: f(x, w), sync=_sync, to_numpy=_to_numpy,
                        bytes_moved=nbytes(x, w) + data.ref.size * x.dtype.itemsize,
                        impl=f"lax.dot_general {dtype_name}")
    return prepare


def _xla_int8(data: Data, device: Any) -> Prepared:
    """Dynamic per-row int8 activations, XLA's int8 dot (int32 result) against pre-quantized weights,
    then a separate f32 rescale in the same jit."""
    dt = _act_dtype(device)
    w_q = reference.quantize(data.w, W8A8.rhs, name="w")
    wq = jnp.asarray(np.ascontiguousarray(w_q.qvalue.T))  # (K, N) int8
    sw = jnp.asarray(w_q.scale)
    x = jnp.asarray(data.x, dt)

    @jax.jit
    def f(x: jax.Array, wq: jax.Array, sw: jax.Array) -> jax.Array:
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True).astype(jnp.float32)
        sx = jnp.where(amax == 0, 1.0, amax / 127)
        xq = jnp.clip(jnp.round(x.astype(jnp.float32) / sx), -127, 127).astype(jnp.int8)
        acc = jax.lax.dot_general(xq, wq, DN, preferred_element_type=jnp.int32)
        return ((acc.astype(jnp.float32) * sx) * sw).astype(dt)

    return Prepared(fn=lambda: f(x, wq, sw), sync=_sync, to_numpy=_to_numpy,
                    bytes_moved=nbytes(x, wq, sw) + data.ref.size * x.dtype.itemsize,
                    impl="lax.dot_general int8->int32 + f32 rescale")


def _aqt(data: Data, device: Any) -> Prepared:
    """AQT's int8 dot_general (`aqt.jax.v2`, 8-bit lhs and rhs, per-channel absmax) in serving mode:
    the weight is quantized once outside the timed call and passed as AQT's `rhs_qt`."""
    try:
        from aqt.jax.v2 import aqt_dot_general
        from aqt.jax.v2 import config as aqt_config
    except ImportError as e:
        raise Unavailable(f"aqtp is not installed ({e}); install the bench extra: pip install 'qkernels[bench]'")
    cfg = aqt_config.dot_general_make(lhs_bits=8, rhs_bits=8)
    x, w = _operands(data, _act_dtype(device))

    @jax.jit
    def quantize_rhs(x: jax.Array, w: jax.Array) -> Any:
        q = aqt_config.dot_general_make(lhs_bits=8, rhs_bits=8).fwd  # quantizers are single-use
        q.dg_quantizer.init_calibration()
        _, (rhs_qt, _) = aqt_dot_general.quant(x, w, None, None, q.dg_quantizer, q.lhs, q.rhs, DN, False)
        return rhs_qt

    rhs_qt = quantize_rhs(x, w)
    if rhs_qt.qvalue.dtype != jnp.int8:
        raise RuntimeError(f"AQT stored the weight as {rhs_qt.qvalue.dtype}, expected int8 codes")
    # The float weight still has to be passed for its shape; XLA removes its unused calibration.
    f = jax.jit(lambda x, w, rhs_qt: cfg.dg_core(x, w, None, rhs_qt, DN)[0])
    stored = nbytes(rhs_qt.qvalue, *(rhs_qt.scale or ()))
    return Prepared(fn=lambda: f(x, w, rhs_qt), sync=_sync, to_numpy=_to_numpy,
                    bytes_moved=nbytes(x) + stored + data.ref.size * x.dtype.itemsize,
                    impl="aqt.jax.v2 dot_general int8 (pre-quantized rhs)")


def _qkernels(recipe: Recipe, backend: str | None = None):
    def prepare(data: Data, device: Any) -> Prepared:
        import qkernels as qk

        x, w = _operands(data, _act_dtype(device))
        w_q = qk.quantize(w, recipe, contracting_axes=(0,))
        ex = qk.explain(x, w_q, DN, backend=backend)
        if ex.chosen is None:
            raise Unavailable(ex.error)
        impl = chosen_name(ex)
        f = jax.jit(lambda x, w_q: qk.dot_general(x, w_q, DN, backend=backend))
        stored = nbytes(w_q.qvalue, w_q.scale, getattr(w_q, "zero_point", None))
        return Prepared(fn=lambda: f(x, w_q), sync=_sync, to_numpy=_to_numpy,
                        bytes_moved=nbytes(x) + stored + data.ref.size * x.dtype.itemsize, impl=impl)
    return prepare


def cases(device: Any, recipes: tuple[Recipe, ...]) -> list[Case]:
    act = "bf16" if device.accelerated else "f32"
    names = {r.name for r in recipes}
    out = [Case(method="lax.dot_general", framework="jax", recipe=dt, role="float", mma=dt, prepare=_lax(dt))
           for dt in ("f32", "bf16")]
    if "w8a8" in names:
        out.append(Case(method="xla.int8-dot+rescale", framework="jax", recipe="w8a8", role="baseline",
                        mma="int8", prepare=_xla_int8))
        out.append(Case(method="aqt.int8", framework="jax", recipe="w8a8", role="baseline", mma="int8",
                        prepare=_aqt))
    for r in recipes:
        out.append(Case(method="qkernels.dot_general", framework="jax", recipe=r.name, role="qkernels",
                        mma=mma_of(r, act),
                        prepare=_qkernels(r)))
    if not device.accelerated:  # the generic XLA path beside whatever is chosen (xla-native on CPU)
        out.extend(Case(method="qkernels.dot_general[xla]", framework="jax", recipe=r.name, role="baseline",
                        mma=mma_of(r, act), prepare=_qkernels(r, "xla")) for r in recipes)
    return out


OVERHEAD_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 64, 64), (1, 256, 256))
"""(M, N, K) of the host-overhead section: tiny layers, where a call's cost is dispatch, not math."""


def _per_call_us(fn: Any, *, budget_s: float, max_reps: int) -> list[float]:
    """Microseconds per call, each call waited for (`block_until_ready`) as a decode step waits for
    its layer's output; after 20 warm-up calls (compiles, caches)."""
    for _ in range(20):
        jax.block_until_ready(fn())
    out: list[float] = []
    start = time.perf_counter()
    while len(out) < max_reps and (len(out) < 50 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def overhead(recipes: tuple[Recipe, ...], *, shapes: tuple[tuple[int, int, int], ...] = OVERHEAD_SHAPES,
             budget_s: float = 1.0, max_reps: int = 20000) -> list[dict[str, Any]]:
    """Host overhead: us per call of `qk.dot_general` (jit'ed and eager) per recipe beside
    `lax.dot_general` f32 (jit'ed and eager) on tiny shapes, on the default device.

    Rows: shape, method ('lax.dot_general' / 'qkernels.dot_general'), mode ('jit' / 'eager'), recipe
    ('f32' for lax), the implementation that ran, median / min us per call, samples, and `above_lax_us`:
    the median minus lax f32's median in the same mode on the same shape.
    """
    import qkernels as qk

    rows: list[dict[str, Any]] = []
    for m, n, k in shapes:
        rng = np.random.default_rng([m, n, k])
        x = jnp.asarray(rng.standard_normal((m, k), np.float32))
        w = jnp.asarray(rng.standard_normal((k, n), np.float32) * np.float32(0.05))
        lax_jit = jax.jit(lambda a, b: jax.lax.dot_general(a, b, DN))
        calls = [("lax.dot_general", "jit", "f32", "lax", lambda: lax_jit(x, w)),
                 ("lax.dot_general", "eager", "f32", "lax", lambda: jax.lax.dot_general(x, w, DN))]
        for r in recipes:
            w_q = qk.quantize(w, r, contracting_axes=(0,))
            impl = chosen_name(qk.explain(x, w_q, DN))
            f = jax.jit(lambda a, b: qk.dot_general(a, b, DN))
            calls.append(("qkernels.dot_general", "jit", r.name, impl, functools.partial(f, x, w_q)))
            calls.append(("qkernels.dot_general", "eager", r.name, impl,
                          functools.partial(qk.dot_general, x, w_q, DN)))
        base: dict[str, float] = {}
        for method, mode, recipe, impl, fn in calls:
            us = _per_call_us(fn, budget_s=budget_s, max_reps=max_reps)
            med = statistics.median(us)
            if method == "lax.dot_general":
                base[mode] = med
            rows.append({"shape": f"M{m}-N{n}-K{k}", "method": method, "mode": mode, "recipe": recipe, "impl": impl,
                         "median_us": med, "min_us": min(us), "reps": len(us),
                         "above_lax_us": med - base[mode]})
    return rows


def overhead_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The host-overhead table."""
    lines = [f"# {title}", "",
             "us per call, each call waited for (block_until_ready); median (min) over n calls after 20 warm-up "
             "calls; 'above lax' is the median minus lax.dot_general f32's in the same mode and shape.", "",
             "| shape | method | mode | recipe | ran | us median (min) | n | above lax us |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['method']} | {r['mode']} | {r['recipe']} | {r['impl']} | "
                     f"{r['median_us']:.1f} ({r['min_us']:.1f}) | {r['reps']} | {r['above_lax_us']:+.1f} |")
    return "\n".join(lines) + "\n"


def _overhead_main(argv: list[str]) -> int:
    from bench import __main__ as bench_main
    from bench import device as device_mod
    from qkernels.formats import parse_recipe

    p = argparse.ArgumentParser(prog="python -m bench.jax_cases overhead", description=overhead.__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default=bench_main.DEFAULT_RECIPES)
    p.add_argument("--budget", type=float, default=1.0, help="seconds of samples per row (default 1)")
    p.add_argument("--save", action="store_true",
                   help=f"write JSON and markdown to {bench_main.RESULTS}/<device>-jax-overhead-<date>.*")
    args = p.parse_args(argv)
    device_mod.configure_environment()
    dev = device_mod.detect(probe=False)
    recipes = tuple(parse_recipe(r) for r in args.recipes.split(",") if r.strip())
    rows = overhead(recipes, budget_s=args.budget)
    created = time.strftime("%Y-%m-%d", time.gmtime())
    text = overhead_markdown(rows, f"JAX host overhead: {dev.name} ({dev.platform}), {created}")
    print(text)
    if args.save:
        stem = bench_main.RESULTS / f"{dev.slug}-jax-overhead-{created}"
        doc = {"schema": "qkernels-bench-overhead/1", "created": created, "device": dev.to_json(),
               "versions": bench_main._versions(), "budget_s": args.budget, "rows": rows}
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        stem.with_suffix(".md").write_text(text)
        print(f"bench: wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["overhead"]:
        raise SystemExit("usage: python -m bench.jax_cases overhead [--recipes ...] [--budget S] [--save]")
    sys.exit(_overhead_main(sys.argv[2:]))
