"""Mixture-of-experts rows: quantized grouped matmuls against the unquantized grouped matmul.

    python -m bench --moe [--smoke] [--framework jax|torch|both] [--markdown FILE]

Expert shapes of real models, `tokens` rows per expert (uniform routing, rows sorted by expert):
Qwen3-30B-A3B (hidden 2048, expert intermediate 768: gate/up N=768 K=2048, down N=2048 K=768) and
Mixtral-8x7B (hidden 4096, intermediate 14336: gate/up N=14336 K=4096). On a CPU the expert counts
are cut (Qwen3: 8 of 128, Mixtral: 2 of 8) so that the float weights fit a small machine; every
expert does the same work, so per-expert time is what the rows compare. The float baselines are
`torch._grouped_mm` (f32 on CPU, bf16 on a GPU) and `jax.lax.ragged_dot` under jit; the quantized rows
are `qk.grouped_linear` / `qk.ragged_dot` with experts quantized once (`qk.quantize_experts`).
SNR is against the f64 per-expert matmul of the same float operands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench import device as device_mod
from bench.timing import measure
from qkernels import testing

__all__ = ["MoeShape", "SHAPES", "run", "main"]

RECIPES = ("w8a8", "w4a16-g128")


@dataclass(frozen=True, kw_only=True, slots=True)
class MoeShape:
    model: str
    experts: int
    n: int
    k: int
    tokens: int  # rows per expert

    @property
    def id(self) -> str:
        return f"{self.model}-E{self.experts}-N{self.n}-K{self.k}-t{self.tokens}"


def _set(model: str, experts: int, n: int, k: int, tokens: tuple[int, ...]) -> tuple[MoeShape, ...]:
    return tuple(MoeShape(model=model, experts=experts, n=n, k=k, tokens=t) for t in tokens)


SHAPES: dict[str, tuple[MoeShape, ...]] = {
    "cpu": (_set("qwen3-30b-a3b.up", 8, 768, 2048, (1, 16, 128, 512))
            + _set("qwen3-30b-a3b.down", 8, 2048, 768, (1, 16, 128, 512))
            + _set("mixtral-8x7b.up", 2, 14336, 4096, (1, 16, 128))),
    "accelerator": (_set("qwen3-30b-a3b.up", 128, 768, 2048, (1, 16, 128, 512))
                    + _set("mixtral-8x7b.up", 8, 14336, 4096, (1, 16, 128, 512))),
    "smoke": _set("smoke", 4, 64, 96, (1, 5)),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class _Data:
    x: np.ndarray  # (M, K) f32
    w: np.ndarray  # (E, N, K) f32, F.linear layout
    sizes: np.ndarray  # (E,) int32
    ref: np.ndarray  # (M, N) f64


def _data(s: MoeShape) -> _Data:
    rng = np.random.default_rng([s.experts, s.n, s.k, s.tokens])
    x = testing.activations(rng, (s.experts * s.tokens, s.k))
    w = testing.weights(rng, (s.experts, s.n, s.k))
    ref = np.concatenate([x[e * s.tokens:(e + 1) * s.tokens].astype(np.float64) @ w[e].T.astype(np.float64)
                          for e in range(s.experts)])
    return _Data(x=x, w=w, sizes=np.full(s.experts, s.tokens, np.int32), ref=ref)


def _torch_methods(dev: Any) -> list[tuple[str, str, Callable[[_Data], tuple[Callable[[], Any], Any]]]]:
    import torch

    import qkernels as qk

    where = "cuda" if dev.kind in ("cuda", "rocm") else "cpu"
    dt = torch.bfloat16 if dev.accelerated else torch.float32
    sync = (lambda out: torch.cuda.synchronize()) if where == "cuda" else (lambda out: None)

    def grouped_mm(d: _Data):
        x, w = torch.from_numpy(d.x).to(where, dt), torch.from_numpy(d.w).to(where, dt)
        offs = torch.from_numpy(np.cumsum(d.sizes).astype(np.int32)).to(where)
        wt = w.transpose(1, 2)
        return (lambda: torch._grouped_mm(x, wt, offs=offs)), sync

    def quantized(recipe: str):
        def prepare(d: _Data):
            x = torch.from_numpy(d.x).to(where, dt)
            w_q = qk.quantize_experts(torch.from_numpy(d.w).to(where, dt), recipe)
            offs = torch.from_numpy(np.cumsum(d.sizes).astype(np.int32)).to(where)
            with torch.inference_mode():
                return (lambda: qk.grouped_linear(x, w_q, offs)), sync
        return prepare

    return ([("torch", "torch._grouped_mm", grouped_mm)]
            + [("torch", f"qk.grouped_linear {r}", quantized(r)) for r in RECIPES])


def _jax_methods(dev: Any) -> list[tuple[str, str, Callable[[_Data], tuple[Callable[[], Any], Any]]]]:
    import jax
    import jax.numpy as jnp

    import qkernels as qk

    dt = jnp.bfloat16 if dev.accelerated else jnp.float32
    sync = jax.block_until_ready

    def ragged(d: _Data):
        x, w = jnp.asarray(d.x, dt), jnp.swapaxes(jnp.asarray(d.w, dt), 1, 2)  # rhs (E, K, N)
        gs = jnp.asarray(d.sizes)
        f = jax.jit(jax.lax.ragged_dot)
        return (lambda: f(x, w, gs)), sync

    def quantized(recipe: str):
        def prepare(d: _Data):
            x = jnp.asarray(d.x, dt)
            w_q = qk.quantize_experts(jnp.swapaxes(jnp.asarray(d.w, dt), 1, 2), recipe)
            gs = jnp.asarray(d.sizes)
            f = jax.jit(qk.ragged_dot)
            return (lambda: f(x, w_q, gs)), sync
        return prepare

    return [("jax", "lax.ragged_dot", ragged)] + [("jax", f"qk.ragged_dot {r}", quantized(r)) for r in RECIPES]


def _to_numpy(out: Any) -> np.ndarray:
    if hasattr(out, "detach"):
        return out.detach().float().cpu().numpy()
    return np.asarray(out, np.float32)


def run(dev: Any, shapes: tuple[MoeShape, ...], framework: str, *, per_case_s: float, min_reps: int,
        max_reps: int) -> list[dict[str, Any]]:
    """One row per (shape, method): median seconds, speedup over the framework's float grouped matmul, SNR."""
    methods = []
    if framework in ("torch", "both"):
        methods += _torch_methods(dev)
    if framework in ("jax", "both"):
        methods += _jax_methods(dev)
    rows = []
    for s in shapes:
        d = _data(s)
        base: dict[str, float] = {}
        for fw, name, prepare in methods:
            row: dict[str, Any] = {"shape": s.id, "framework": fw, "method": name}
            try:
                fn, sync = prepare(d)
                out, samples = measure(fn, sync, budget_s=per_case_s, min_reps=min_reps, max_reps=max_reps,
                                       gpu=dev.kind in ("cuda", "rocm"))
            except Exception as e:  # reported as an error row: one failing method does not stop the sweep
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                rows.append(row)
                continue
            base.setdefault(fw, samples.median)  # the float grouped matmul comes first per framework
            flops = 2 * d.x.shape[0] * s.n * s.k
            row.update(median_s=samples.median, reps=len(samples.seconds), tflops=flops / samples.median / 1e12,
                       speedup=base[fw] / samples.median, snr_db=testing.snr_db(_to_numpy(out), d.ref))
            rows.append(row)
    return rows


def markdown(dev: Any, rows: list[dict[str, Any]]) -> str:
    lines = [f"# qkernels MoE benchmark: {dev.name} ({dev.platform})", "",
             "| shape | framework | method | median ms | reps | TFLOP/s | speedup vs float grouped | SNR dB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['framework']} | {r['method']} | error: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['shape']} | {r['framework']} | {r['method']} | {r['median_s'] * 1e3:.3f} | {r['reps']} | "
                     f"{r['tflops']:.4f} | {r['speedup']:.2f}x | {r['snr_db']:.1f} |")
    return "\n".join(lines)


def main(args: Any) -> int:
    """`python -m bench --moe`: reads `smoke`, `framework` and `markdown` from bench's parsed arguments."""
    device_mod.configure_environment()
    dev = device_mod.detect(probe=False)
    shapes = SHAPES["smoke" if args.smoke else "accelerator" if dev.accelerated else "cpu"]
    rows = run(dev, shapes, args.framework, per_case_s=0.05 if args.smoke else 1.0, min_reps=2 if args.smoke else 3,
               max_reps=5 if args.smoke else 30)
    text = markdown(dev, rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 1 if any("error" in r for r in rows) else 0

