"""Where the Triton kernel tests run: compiled on a CUDA GPU when one is present, else in the
interpreter on CPU (TRITON_INTERPRET=1, set by conftest); a test module importing this is skipped
when neither is available. `t` puts a NumPy operand on that device."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("these tests run the Triton kernels on a CUDA GPU or in the interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")


def t(x: np.ndarray | None) -> torch.Tensor | None:
    return None if x is None else torch.from_numpy(np.ascontiguousarray(x)).to(DEVICE)
