"""JAX binding of qkernels: `dot_general`, `make_dot_general`, `make_einsum`, `QArray`, `quantize`, `prepack`,
`explain`.

Flax linen's `Einsum` with a `dot_general` field is `jax_bindings.flax.Einsum` (imports flax).
Whole Flax models: `jax_bindings.rules.Rule` and `jax_bindings.model.quantize_model` /
`quantize_params` / `quantization_summary` (import flax; `qkernels.` top level loads them lazily).

Its implementations ('xla', 'reference.callback' and the Pallas kernels) are registered by
`qkernels.backends` on the first dispatch of a JAX call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jax_bindings.dot_general import QDotGeneral, dot_general, make_dot_general, plan
from jax_bindings.dot_general import explain as dot_general_explain
from jax_bindings.einsum import QEinsum, make_einsum
from jax_bindings.implementations import current_platform, platform_of
from jax_bindings.qarray import QArray, prepack, quantize
from jax_bindings.ragged import explain as ragged_explain
from jax_bindings.ragged import quantize_experts, ragged_dot

__all__ = ["dot_general", "make_dot_general", "QDotGeneral", "make_einsum", "QEinsum", "QArray", "quantize", "prepack", "explain",
           "plan", "current_platform", "platform_of", "ragged_dot", "quantize_experts", "dot_general_explain",
           "ragged_explain"]


def explain(lhs: Any, rhs: Any, *args: Any, **kwargs: Any) -> Any:
    """The implementations that could run a call, with verdicts and the choice: `explain(lhs, rhs,
    dimension_numbers)` for `dot_general`; `explain(lhs, experts, group_sizes)` for `ragged_dot`, told apart
    by an integer array third (dimension numbers are tuples). Other arguments as the call's own explain
    (`jax_bindings.dot_general.explain`, `jax_bindings.ragged.explain`)."""
    third = args[0] if args else kwargs.get("group_sizes")
    if hasattr(third, "dtype") and np.issubdtype(np.dtype(third.dtype), np.integer):
        return ragged_explain(lhs, rhs, *args, **kwargs)
    return dot_general_explain(lhs, rhs, *args, **kwargs)
