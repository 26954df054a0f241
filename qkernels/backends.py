"""The one explicit list of backends: what dispatch, tune, aot, bench and explain iterate over.

Each backend is a module with a `register()` function that adds its implementations to
`qkernels.dispatch`; nothing registers as an import side effect. `load(framework)` registers, once,
every backend of that framework (and the framework-neutral reference) whose requirements are
installed, so `explain` shows them even before the binding was used. A backend that is installed
but fails to import raises: a broken backend is never hidden behind the fallback.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass

__all__ = ["Backend", "BACKENDS", "by_name", "load", "available"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Backend:
    """A family of implementations: `name` is the prefix of theirs (`use_backend(name)` selects it).

    `module` holds `register()`; `framework` is 'torch', 'jax' or 'any'; `requires` are the
    top-level packages it needs; `tunable` names its `qkernels.tuning` table prefix, if it has one;
    `aot_targets` are the `python -m qkernels.aot` targets that compile its kernels.
    """

    name: str
    module: str
    framework: str
    requires: tuple[str, ...] = ()
    tunable: str | None = None
    aot_targets: tuple[str, ...] = ()
    description: str = ""

    def installed(self) -> bool:
        return all(_installed(r) for r in self.requires)


BACKENDS: tuple[Backend, ...] = (
    Backend(name="reference", module="qkernels.reference", framework="any",
            description="NumPy reference: every recipe, exact, slow (also `reference.callback` from JAX)"),
    Backend(name="torch-cpu", module="torch_bindings.cpu", framework="torch", requires=("torch",),
            description="torch on CPU: executes any recipe's definition (torch._int_mm for integer dots)"),
    Backend(name="torch-cpu-packed", module="torch_bindings.packed", framework="torch", requires=("torch",),
            description="torch on CPU, bf16 activations: packed int8 / int4 weight GEMMs, layout made once per weight"),
    Backend(name="torch-cpu-native", module="torch_bindings.native", framework="torch", requires=("torch",),
            description="native C kernels on CPU tensors (compiled on first use), decode sizes: stored codes, one call"),
    Backend(name="triton", module="qkernels.kernels.triton", framework="torch", requires=("torch", "triton"),
            tunable="triton", aot_targets=("sm_80", "sm_89", "sm_90", "gfx942"),
            description="Triton kernels on CUDA sm_80+ / ROCm gfx942 (interpreter variants for tests)"),
    Backend(name="xla", module="jax_bindings.implementations", framework="jax", requires=("jax",),
            description="XLA ops: executes any recipe's definition on every JAX platform"),
    Backend(name="xla-native", module="jax_bindings.native", framework="jax", requires=("jax",),
            description="native C kernels (qkernels/kernels/cpu, compiled on first use) through the XLA FFI, CPU"),
    Backend(name="pallas", module="qkernels.kernels.pallas", framework="jax", requires=("jax",),
            tunable="pallas", aot_targets=("tpu-v5e", "tpu-v6e", "tpu-v5p", "pallas-sm_80", "pallas-sm_90"),
            description="Pallas kernels: TPU (Mosaic), GPU (Triton lowering), interpreter for tests"),
)


def by_name(name: str) -> Backend:
    for b in BACKENDS:
        if b.name == name:
            return b
    raise ValueError(f"unknown backend {name!r}; backends: {', '.join(b.name for b in BACKENDS)}")


def available(framework: str | None = None) -> tuple[Backend, ...]:
    """Installed backends of `framework` (and framework-neutral ones); all frameworks if None."""
    return tuple(b for b in BACKENDS if (framework is None or b.framework in (framework, "any")) and b.installed())


@functools.cache
def load(framework: str | None) -> None:
    """Register the implementations of every installed backend of `framework` (all if None), once."""
    for backend in available(framework):
        _register(backend.name)


@functools.cache
def _register(name: str) -> None:
    importlib.import_module(by_name(name).module).register()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # an import hook refusing the name counts as not installed
        return False
