"""JAX binding of qkernels: `dot_general`, `make_dot_general`, `make_einsum`, `QArray`, `quantize`, `prepack`,
`explain`.

Flax linen's `Einsum` with a `dot_general` field is `jax_bindings.flax.Einsum` (imports flax).
Whole Flax models: `jax_bindings.rules.Rule` and `jax_bindings.model.quantize_model` /
`quantize_params` / `quantization_summary` (import flax; `qkernels.` top level loads them lazily).

Its implementations ('xla', 'reference.callback' and the Pallas kernels) are registered by
`qkernels.backends` on the first dispatch of a JAX call.
"""

from __future__ import annotations

from jax_bindings.dot_general import QDotGeneral, dot_general, explain, make_dot_general, plan
from jax_bindings.einsum import QEinsum, make_einsum
from jax_bindings.implementations import current_platform, platform_of
from jax_bindings.qarray import QArray, prepack, quantize
from jax_bindings.ragged import quantize_experts, ragged_dot

__all__ = ["dot_general", "make_dot_general", "QDotGeneral", "make_einsum", "QEinsum", "QArray", "quantize", "prepack", "explain",
           "plan", "current_platform", "platform_of", "ragged_dot", "quantize_experts"]
