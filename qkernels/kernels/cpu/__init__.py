"""Native CPU kernels (qk_cpu.c, the ABI in qk_cpu.h), compiled on first use, loaded through ctypes.

    from qkernels.kernels import cpu
    if cpu.unavailable() is None:
        lib = cpu.library()     # ctypes.CDLL with argtypes / restype set for every qk_* entry point
        lib.qk_linear_float(...)

`unavailable()` is None where the library builds and loads, else the reason (no compiler, a compile error),
which the implementations using it return from `supports`. `DTYPES` and `KINDS` map qkernels' dtype and
code-type names to the header's constants. The bindings (`jax_bindings/native.py`, `torch_bindings/native.py`)
call these entry points; this module imports neither framework.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

from qkernels.kernels.cpu.build import BuildError, shared_library

__all__ = ["HERE", "HEADER", "SOURCE", "DTYPES", "KINDS", "ABI_VERSION", "library", "load", "library_path", "unavailable",
           "BuildError", "check", "LinearCall", "CALL_LINEAR_FLOAT", "CALL_LINEAR_QUANTIZED", "OPENMP_FLAGS"]

HERE = pathlib.Path(__file__).parent
HEADER = HERE / "qk_cpu.h"
SOURCE = HERE / "qk_cpu.c"
ABI_VERSION = 2

DTYPES: dict[str, int] = {"float32": 0, "bfloat16": 1, "float16": 2}
"""Activation and output dtypes the kernels take: QK_F32 / QK_BF16 / QK_F16."""

KINDS: dict[str, int] = {"int8": 0, "int4": 1, "uint4": 2, "float8_e4m3fn": 3}
"""Weight code types (`QType.name`): QK_INT8 / QK_INT4 / QK_UINT4 / QK_FP8_E4M3."""

EINVAL, ENOMEM = -1, -2

_p, _i32, _i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
_SIGNATURES: dict[str, tuple[type, list[type]]] = {
    "qk_abi_version": (_i32, []),
    # x, x_dtype, m, k, kp, code_kind, static_scale, codes, scales
    "qk_quantize_rows": (_i64, [_p, _i32, _i64, _i64, _i64, _i32, _p, _p, _p]),
    # xq, x_scale, m, kp, w, w_kind, n, w_scale, group_size, bias, out, out_dtype, threads
    "qk_matmul_int": (_i32, [_p, _p, _i64, _i64, _p, _i32, _i64, _p, _i64, _p, _p, _i32, _i32]),
    # xq, x_scale, m, kp, w, n, w_scale, bias, out, out_dtype, threads
    "qk_matmul_fp8": (_i32, [_p, _p, _i64, _i64, _p, _i64, _p, _p, _p, _i32, _i32]),
    # x, x_dtype, m, k, kp, static_scale, w, w_kind, n, w_scale, group_size, bias, out, out_dtype, threads
    "qk_linear_quantized": (_i64, [_p, _i32, _i64, _i64, _i64, _p, _p, _i32, _i64, _p, _i64, _p, _p, _i32, _i32]),
    # x, x_dtype, m, k, kp, w, w_kind, n, w_scale, w_zero, group_size, bias, out, out_dtype, threads
    "qk_linear_float": (_i32, [_p, _i32, _i64, _i64, _i64, _p, _i32, _i64, _p, _p, _i64, _p, _p, _i32, _i32]),
    # call (a LinearCall), x, m, out, threads
    "qk_run_linear": (_i64, [_p, _p, _i64, _p, _i32]),
}

CALL_LINEAR_FLOAT, CALL_LINEAR_QUANTIZED = 0, 1


class LinearCall(ctypes.Structure):
    """qk_cpu.h's qk_linear_call: a float-activation entry point with its arguments but x, m, out, threads."""

    _fields_ = [("entry", _i32), ("x_dtype", _i32), ("w_kind", _i32), ("out_dtype", _i32), ("k", _i64),
                ("kp", _i64), ("n", _i64), ("group_size", _i64), ("w", _p), ("w_scale", _p), ("w_zero", _p),
                ("bias", _p)]


OPENMP_FLAGS = ("-fopenmp", "-DQK_OPENMP")
"""The build whose parallel calls run on the process's OpenMP team (qk_cpu.c, parallel_n): the torch binding's.
Loaded after torch, it binds to the libgomp torch loaded (the same soname), so its threads are torch's
intra-op threads: no second team competes with torch's for the cores."""


@functools.cache
def library_path(openmp: bool = False) -> pathlib.Path:
    """The built library (compiled on the first call in a fresh cache); raises `BuildError`. `openmp`: the
    `OPENMP_FLAGS` build."""
    return shared_library("qk_cpu_omp" if openmp else "qk_cpu", [SOURCE], extra_flags=OPENMP_FLAGS if openmp else ())


@functools.cache
def library(openmp: bool = False) -> ctypes.CDLL:
    """The loaded library with every entry point's argtypes and restype set; raises `BuildError`."""
    return load(library_path(openmp))


def load(path: pathlib.Path) -> ctypes.CDLL:
    """A built qk_cpu library at `path` (any build of qk_cpu.c) with its signatures set; raises `BuildError`."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise BuildError(f"the native CPU library {path} does not load ({e}); delete it to rebuild") from e
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if lib.qk_abi_version() != ABI_VERSION:
        raise BuildError(f"{path} has ABI version {lib.qk_abi_version()}, this qkernels expects {ABI_VERSION}; "
                         f"delete it to rebuild")
    return lib


@functools.cache
def unavailable(openmp: bool = False) -> str | None:
    """None where the native library (`openmp`: that build) builds and loads, else why not (for `supports`
    and explain)."""
    try:
        library(openmp)
    except BuildError as e:
        return f"native CPU kernels unavailable: {e}"
    return None


def check(rc: int, entry: str) -> int:
    """`rc` if the call succeeded (>= 0), else raise naming the entry point and the error."""
    if rc == EINVAL:
        raise ValueError(f"{entry}: an argument the native kernels do not take (a dtype, kind, group size or "
                         f"size out of range); the caller's supports() should have refused this problem")
    if rc == ENOMEM:
        raise MemoryError(f"{entry}: out of memory for the native kernels' scratch buffers")
    if rc < 0:
        raise RuntimeError(f"{entry} returned the unknown error code {rc}")
    return rc
