"""PyTorch binding: `linear`, `QTensor`, `quantize`, `QLinear`, `quantize_`, `explain`, `qkernels::` ops.

Importing it registers the `qkernels::<family>_linear` custom ops, the 'torch-cpu' implementation,
and, when Triton and `qkernels.kernels.triton` are installed, the Triton implementations.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from torch_bindings import cpu, ops  # noqa: F401  (register the ops and 'torch-cpu')
from torch_bindings.functional import explain, linear
from torch_bindings.modules import QLinear, quantize_
from torch_bindings.qtensor import QTensor
from torch_bindings.qtensor import quantize as _quantize

__all__ = ["linear", "explain", "quantize", "quantize_", "QLinear", "QTensor", "OPS"]

OPS = ops.OPS


def quantize(x: Any, recipe: Any = None, **kwargs: Any) -> QTensor:
    """Quantize an (out_features, in_features) float weight for `recipe` (default W8A8) to a QTensor."""
    return _quantize(x, recipe, **kwargs)


if importlib.util.find_spec("triton") is not None and importlib.util.find_spec("qkernels.kernels.triton") is not None:
    importlib.import_module("qkernels.kernels.triton")
