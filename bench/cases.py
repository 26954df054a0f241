"""What one benchmark row runs: a `Case` (method, recipe, framework) prepared on one shape's data.

A case's `prepare(data, device)` builds everything outside the timed region (weights quantized,
functions compiled lazily on the warm-up call) and returns a `Prepared` whose `fn()` is the timed
call. `Unavailable` means the method cannot run here (library missing, platform unsupported): the
row is reported with that reason. Any other exception is reported as an error row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkernels import testing
from qkernels.shapes import Shape

__all__ = ["Unavailable", "Data", "Prepared", "Case", "make_data", "ROLES", "MMAS", "mma_of", "nbytes", "chosen_name"]

ROLES = ("float", "baseline", "qkernels")  # float: what users run today; baseline: other quantized paths
MMAS = ("f32", "bf16", "int8", "fp8")  # multiply types of the roofline peaks (`qkernels.hardware.Peak`)


class Unavailable(Exception):
    """The method cannot run on this machine; the message says why and what would enable it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Data:
    """One shape's operands (the same values for every row) and the float result they are judged by.

    `x` (M, K): realistic activations (normal, a few outlier channels), `w` (N, K): weights, both f32.
    `ref` (M, N): the f32 float matmul `x @ w.T`, the reference of every row's signal-to-noise ratio.
    """

    shape: Shape
    x: np.ndarray
    w: np.ndarray
    ref: np.ndarray


@dataclass(frozen=True, kw_only=True, slots=True)
class Prepared:
    """A timed call and what the metrics need to know about it."""

    fn: Callable[[], Any]
    sync: Callable[[Any], None]
    to_numpy: Callable[[Any], np.ndarray]
    bytes_moved: int  # activations in + weights as stored (codes, scales, zero points) + output
    impl: str  # what actually ran (for qkernels rows: the implementation `qkernels.explain` chose)


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """One method at one recipe. `mma` is the multiply type of its roofline peak: 'f32', 'bf16', 'int8', 'fp8'."""

    method: str
    framework: str
    recipe: str
    role: str
    mma: str
    prepare: Callable[[Data, Any], Prepared]

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r}; choose one of {ROLES}")
        if self.mma not in MMAS:
            raise ValueError(f"mma={self.mma!r}; choose one of {MMAS}")


def mma_of(recipe: Any, act: str) -> str:
    """The multiply type of a qkernels row: the activations' codes (int8, fp8), else the activation dtype."""
    if recipe.lhs is None:
        return act
    return "int8" if recipe.lhs.qtype.integer else "fp8"


def make_data(shape: Shape, seed: int = 0) -> Data:
    """Deterministic operands for `shape` (2-D: a batched shape is folded into M)."""
    m = shape.m * (shape.batch or 1)
    rng = np.random.default_rng([seed, m, shape.n, shape.k])
    x = testing.activations(rng, (m, shape.k))
    w = testing.weights(rng, (shape.n, shape.k))
    return Data(shape=shape, x=x, w=w, ref=x @ w.T)


def nbytes(*arrays: Any) -> int:
    """Total bytes of NumPy, torch or JAX arrays (None entries count 0)."""
    total = 0
    for a in arrays:
        if a is None:
            continue
        if hasattr(a, "nbytes"):
            total += int(a.nbytes)
        else:  # torch.Tensor
            total += int(a.numel() * a.element_size())
    return total


def chosen_name(explanation: Any) -> str:
    """The implementation `qkernels.explain` says a call runs (with its kernel config and where the
    config came from: 'triton.w4a16 [gemv-m1n64k128w4s3-sk4, heuristic]'), or why none can."""
    chosen = getattr(explanation, "chosen", None)
    if chosen is not None:
        choice = getattr(explanation, "config", None)
        if choice is None:
            return chosen.name
        config = str(choice).removesuffix(f" ({choice.source})")
        return f"{chosen.name} [{config}, {choice.source.split(':')[0]}]"
    return f"none ({getattr(explanation, 'error', explanation)})"
