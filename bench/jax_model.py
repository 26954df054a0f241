"""python -m bench model: one Flax transformer block quantized by qkernels and by Qwix, same rules.

    python -m bench model [--smoke] [--recipes w8a8,w4a16-g128] [--json FILE]

The model is a linen pre-LN block (attention: DenseGeneral q/k, Einsum v, Dense out; MLP: two
Dense), unedited. Both libraries quantize it for serving from the same float params with the
same rule (every layer): qkernels `quantize_model` + `quantize_params`, Qwix `PtqProvider` +
`quantize_params`. W8A8: int8 weights per output channel, int8 activations per token (Qwix:
`QtRule(weight_qtype=int8, act_qtype=int8)`); W4A16 g128: int4 weights per group of 128 along K,
float activations (Qwix: `weight_qtype=int4, tile_size=128`). Per row: output SNR in dB against the
float block on realistic activations (`qkernels.testing.activations`), the jitted forward's median
time (block_until_ready, compile excluded; every row timed round-robin) and the params' bytes as
stored (`size * itemsize`: Qwix's `jnp.int4` leaves count one byte per value).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any

__all__ = ["main", "run"]

SIZES = {"smoke": dict(batch=1, seq=16, d=128, heads=4, hidden=256, reps=3),
         "cpu": dict(batch=4, seq=128, d=512, heads=8, hidden=2048, reps=30)}


def _block(d: int, heads: int, hidden: int) -> Any:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    head_dim = d // heads

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            h = nn.LayerNorm(name="ln1")(x)
            q = nn.DenseGeneral((heads, head_dim), name="query")(h)
            k = nn.DenseGeneral((heads, head_dim), name="key")(h)
            v = nn.Einsum((d, heads, head_dim), "btk,khd->bthd", name="value")(h)
            s = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim), axis=-1)
            o = jnp.einsum("bhqk,bkhd->bqhd", s, v)
            x = x + nn.Dense(d, name="out")(o.reshape(*o.shape[:-2], d))  # one contracting axis: Qwix tiles per axis
            h = nn.gelu(nn.Dense(hidden, name="up")(nn.LayerNorm(name="ln2")(x)))
            return x + nn.Dense(d, name="down")(h)

    return Block()


def _time_interleaved(calls: list[tuple[Any, tuple]], reps: int) -> list[float]:
    """Median ms of each jitted call, timed round-robin (one sample of each per round), so that a
    shared, loaded CPU slows every row alike instead of whichever ran during the load."""
    import jax

    for f, args in calls:
        jax.block_until_ready(f(*args))  # compile
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(reps):
        for i, (f, args) in enumerate(calls):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            samples[i].append(time.perf_counter() - t)
    return [statistics.median(s) * 1e3 for s in samples]


def _nbytes(tree: Any) -> int:
    import jax

    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def _qkernels(model: Any, recipe: Any, params: Any, x: Any, method: str = "rtn") -> tuple[Any, Any]:
    import jax

    import qkernels as qk

    qmodel = qk.quantize_model(model, [qk.Rule(r".*", recipe, weight_method=method)])
    qparams = qk.quantize_params(params, jax.eval_shape(qmodel.init, jax.random.key(0), x)["params"], method=method)
    return jax.jit(qmodel.apply), {"params": qparams}


def _qkernels_mse(model: Any, recipe: Any, params: Any, x: Any) -> tuple[Any, Any]:
    return _qkernels(model, recipe, params, x, method="mse")


def _qwix(model: Any, recipe: Any, params: Any, x: Any) -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp
    import qwix

    if recipe.lhs is None:  # weight-only
        rule = qwix.QtRule(module_path=".*", weight_qtype=jnp.int4, tile_size=recipe.rhs.group_size)
    else:
        rule = qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)
    qmodel = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(qmodel.init, jax.random.key(0), x)["params"]
    return jax.jit(qmodel.apply), {"params": qwix.quantize_params(params, abstract)}


def run(size: str = "cpu", recipes: tuple[str, ...] = ("w8a8", "w4a16-g128")) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qkernels.formats import parse_recipe
    from qkernels.testing import activations, snr_db

    cfg = SIZES[size]
    model = _block(cfg["d"], cfg["heads"], cfg["hidden"])
    x = jnp.asarray(activations(np.random.default_rng(0), (cfg["batch"], cfg["seq"], cfg["d"])))
    params = model.init(jax.random.key(0), x)["params"]
    f_float = jax.jit(model.apply)
    exact = f_float({"params": params}, x)
    rows = [dict(recipe="float", impl="flax f32", snr_db=math.inf, param_bytes=_nbytes(params))]
    calls = [(f_float, ({"params": params}, x))]
    for name in recipes:
        recipe = parse_recipe(name)
        for impl, build in (("qkernels", _qkernels), ("qkernels mse", _qkernels_mse), ("qwix", _qwix)):
            try:
                f, variables = build(model, recipe, params, x)
                out = f(variables, x)
            except ImportError as e:
                rows.append(dict(recipe=recipe.name, impl=impl, error=f"unavailable: {e}"))
                continue
            except Exception as e:  # a failing row is reported, never dropped (bench/README.md)
                rows.append(dict(recipe=recipe.name, impl=impl, error=f"{type(e).__name__}: {e}"))
                continue
            rows.append(dict(recipe=recipe.name, impl=impl, snr_db=float(snr_db(out, exact)),
                             param_bytes=_nbytes(variables)))
            calls.append((f, (variables, x)))
    timed = [r for r in rows if "error" not in r]
    for row, ms in zip(timed, _time_interleaved(calls, cfg["reps"])):
        row["ms"] = ms
    return rows


def markdown(rows: list[dict[str, Any]], size: str) -> str:
    cfg = SIZES[size]
    lines = [f"Flax block d={cfg['d']} heads={cfg['heads']} hidden={cfg['hidden']}, x {cfg['batch']}x{cfg['seq']}",
             "", "| recipe | library | output SNR (dB) | jitted forward (ms) | params (MB) |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['impl']} | {r['error']} | | |")
        else:
            lines.append(f"| {r['recipe']} | {r['impl']} | {r['snr_db']:.1f} | {r['ms']:.2f} | "
                         f"{r['param_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench model", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny block, 3 samples: checks the harness")
    p.add_argument("--recipes", default="w8a8,w4a16-g128")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    size = "smoke" if args.smoke else "cpu"
    rows = run(size, tuple(r for r in args.recipes.split(",") if r.strip()))
    print(markdown(rows, size))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "config": SIZES[size], "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
