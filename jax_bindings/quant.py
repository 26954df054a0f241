"""The formats' numerics (`qkernels.formats`) in jax.numpy: quantize and dequantize one operand.

Thin: each function executes the format's own definition with `jax_bindings.arrays.JAX_OPS`, so
codes and scales are bit-identical to the NumPy reference where XLA divides correctly rounded.
Everything works along the last axis (K) and traces under jit/vmap/grad.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jax_bindings.arrays import JAX_OPS, dtype_name
from qkernels.formats import OperandFormat, QOperand

__all__ = ["quantize_operand", "dequantize_operand"]


def quantize_operand(x: jnp.ndarray, fmt: OperandFormat, *, amax: jnp.ndarray | None = None) -> QOperand:
    """Quantize float `x` (..., K) along its last axis (`OperandFormat.quantize`).

    NaN/Inf give garbage codes: check before (see `jax_bindings.dot_general`'s `check_finite`).
    `amax` (symmetric per-row formats): the rows' absolute maximum (...,) to calibrate with, e.g.
    the all-reduced maximum when `x` is one K-shard of longer rows.
    """
    return fmt.quantize(x, JAX_OPS, amax=amax)


def dequantize_operand(operand: QOperand, fmt: OperandFormat, k: int, dtype: Any = jnp.float32) -> jnp.ndarray:
    """`(f32(q) - zero) * scale` (..., K) in f32, padding removed, then cast to `dtype`."""
    return fmt.dequantize(operand, k, JAX_OPS, dtype_name(dtype))
