"""Running a selected implementation under `jit`, where inputs may be sharded.

The 'xla' implementation is made of ordinary XLA ops, so GSPMD partitions it by itself: batch/M-
sharded activations and N-sharded (column-parallel) weights run locally with no all-gather of the
weight (tests/test_jax_sharding.py asserts it on the HLO); K-sharded (row-parallel) weights get an
all-reduce of the activations' per-row absmax and one of the partial accumulators. Opaque kernels
(Pallas custom calls, the host callback) are not partitioned yet: GSPMD replicates their operands.
`run_partitioned` is the single place where a `custom_partitioning` rule for them belongs.
"""

from __future__ import annotations

from typing import Any

import jax

from jax_bindings import implementations
from qkernels import dispatch
from qkernels.formats import QOperand

__all__ = ["run", "run_partitioned"]


def run(impl: dispatch.Implementation, problem: dispatch.Problem, lhs: Any, rhs: QOperand, bias: Any = None) -> jax.Array:
    """Call `impl` on JAX arrays; framework-neutral (NumPy) implementations go through a host callback."""
    if impl.framework == dispatch.ANY_FRAMEWORK:
        return implementations.run_host(impl, problem, lhs, rhs, bias)
    return impl.run(problem, lhs, rhs, bias)


def run_partitioned(impl: dispatch.Implementation, problem: dispatch.Problem, lhs: Any, rhs: QOperand) -> jax.Array:
    return run(impl, problem, lhs, rhs)
