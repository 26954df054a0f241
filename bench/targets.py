"""Speed targets from the kernel issues, checked against a run's rows.

A target holds on a device when every matching row is at least `min_speedup` times faster than the
float baseline of its framework (cuBLAS bf16 via `F.linear` on GPUs, XLA bf16 on TPUs, f32 on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Target", "TARGETS", "evaluate"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Target:
    text: str
    devices: tuple[str, ...]  # device kinds of `bench.device.PEAKS` ('a100', 'tpu-v5e') or 'cpu'
    framework: str
    method: str
    recipe: str
    min_speedup: float
    m_min: int = 1
    m_max: int = 1 << 30
    kn: tuple[tuple[int, int], ...] = ()  # (K, N) pairs; empty: every shape of the run

    def matches(self, row: dict[str, Any]) -> bool:
        return (row["framework"] == self.framework and row["method"] == self.method
                and row["recipe"] == self.recipe and self.m_min <= row["m"] <= self.m_max
                and (not self.kn or (row["k"], row["n"]) in self.kn))


_GPU = ("a100", "h100", "h200")
_L8B = ((4096, 4096), (4096, 14336))

TARGETS: tuple[Target, ...] = (
    Target(text="A100/H100/H200: W8A8 at M>=2048 on 4096x4096 and 4096x14336 >= 1.7x cuBLAS bf16", devices=_GPU,
           framework="torch", method="qkernels.linear", recipe="w8a8", min_speedup=1.7, m_min=2048, kn=_L8B),
    Target(text="A100/H100/H200: W8A8 at M<=16 >= 1.6x cuBLAS bf16", devices=_GPU,
           framework="torch", method="qkernels.linear", recipe="w8a8", min_speedup=1.6, m_max=16),
    Target(text="A100/H100/H200: W4A16 g128 at M<=16 on 8192x8192 >= 2.5x cuBLAS bf16", devices=_GPU,
           framework="torch", method="qkernels.linear", recipe="w4a16-g128", min_speedup=2.5, m_max=16,
           kn=((8192, 8192),)),
    Target(text="A100/H100/H200: W8A16 at M<=16 >= 1.7x cuBLAS bf16", devices=_GPU,
           framework="torch", method="qkernels.linear", recipe="w8a16", min_speedup=1.7, m_max=16),
    Target(text="TPU v5e: W8A8 at large M (>=2048) >= 1.7x XLA bf16", devices=("tpu-v5e",),
           framework="jax", method="qkernels.dot_general", recipe="w8a8", min_speedup=1.7, m_min=2048),
    Target(text="TPU v5e: W4A16 at M<=16 >= 2.5x XLA bf16", devices=("tpu-v5e",),
           framework="jax", method="qkernels.dot_general", recipe="w4a16-g128", min_speedup=2.5, m_max=16),
    Target(text="CPU: qkernels.linear W8A8 M=256 4096->4096 >= 4x F.linear f32", devices=("cpu",),
           framework="torch", method="qkernels.linear", recipe="w8a8", min_speedup=4.0, m_min=256, m_max=256,
           kn=((4096, 4096),)),
    Target(text="CPU: qkernels.dot_general W8A8 256x4096x4096 >= 1.5x lax.dot_general f32", devices=("cpu",),
           framework="jax", method="qkernels.dot_general", recipe="w8a8", min_speedup=1.5, m_min=256, m_max=256,
           kn=((4096, 4096),)),
)


def evaluate(rows: list[dict[str, Any]], device_key: str) -> list[dict[str, Any]]:
    """Each target for this device: the worst matching speedup and whether it holds.

    `status`: 'met', 'missed', or 'not measured' (no matching row ran: shape or recipe not in this run,
    or the rows failed, which the table shows).
    """
    out = []
    for t in TARGETS:
        if device_key not in t.devices:
            continue
        matching = [r for r in rows if t.matches(r)]
        speedups = [r["speedup"] for r in matching if r["speedup"] is not None]
        if not matching or len(speedups) < len(matching):
            status, worst = "not measured", min(speedups, default=None)
        else:
            worst = min(speedups)
            status = "met" if worst >= t.min_speedup else "missed"
        out.append({"target": t.text, "min_speedup": t.min_speedup, "rows": len(matching),
                    "worst_speedup": worst, "status": status})
    return out
