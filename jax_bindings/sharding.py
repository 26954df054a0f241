"""Running a selected implementation so that it partitions under `jit` with sharded inputs."""

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
