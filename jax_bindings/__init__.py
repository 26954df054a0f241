"""JAX binding of qkernels: `dot_general`, `make_dot_general`, `make_einsum`, `QArray`, `quantize`, `explain`.

Flax linen's `Einsum` with a `dot_general` field is `jax_bindings.flax.Einsum` (imports flax).

Importing it registers the JAX implementations with `qkernels.dispatch` ('xla',
'reference.callback') and, when present, the Pallas kernels (`qkernels.kernels.pallas`).
"""

from __future__ import annotations

import importlib
import importlib.util

from jax_bindings import implementations  # noqa: F401  (registers 'xla' and 'reference.callback')
from jax_bindings.dot_general import QDotGeneral, dot_general, explain, make_dot_general, plan
from jax_bindings.einsum import QEinsum, make_einsum
from jax_bindings.implementations import current_platform, platform_of
from jax_bindings.qarray import QArray, quantize

__all__ = ["dot_general", "make_dot_general", "QDotGeneral", "make_einsum", "QEinsum", "QArray", "quantize", "explain",
           "plan", "current_platform", "platform_of"]

# The Pallas kernels register 'pallas.tpu.*', 'pallas.gpu.*' and 'pallas.interpret' when imported.
if importlib.util.find_spec("qkernels.kernels.pallas") is not None:
    importlib.import_module("qkernels.kernels.pallas")
