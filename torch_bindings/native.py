"""'torch-cpu-native': the native C kernels (`qkernels/kernels/cpu`, ABI in qk_cpu.h) on CPU tensors, through
ctypes, for the small M of decode and online serving, priority 70 (above every other CPU path where it runs).

Why: at decode shapes a CPU matmul is bound by reading the weight, and the torch paths either read more
than the codes (the generic path dequantizes the whole weight per call; W4A8 keeps a second, int8 copy
of its codes) or pay for many small torch ops per call (W8A8's activation quantization is ~10 ops, ~40
us above `F.linear` at 64x64). The C kernels read the canonical codes as they are stored (int8, int4 /
uint4 two per byte, e4m3) and do a whole call in one library call: quantize the activation rows,
the dots, the rescale, the bias and the output cast. No second layout is made (explain: layout
`canonical`).

Numerics: those of the definition (qk_cpu.h says how): the integer recipes (W8A8, W4A8) quantize
activations as `qkernels.numerics` does and give the reference's outputs bit for bit (the conformance
suite checks); FP8 sums exact products in f32 (the order of the sum differs: within tolerance); the
weight-only recipes accumulate in f32 (within the weight-only tolerance). Activations with NaN/Inf in a
row (integer and fp8 recipes) are refused with the format's own error (the generic path raises it).

Served: CPU, 2-D weights, activations and outputs float32 / bfloat16 / float16, the shipped weight
formats (int8 per channel, int4 / uint4 + zero point per group, e4m3 per channel) with per-token (or
static) int8 / e4m3 activations or none, and M up to `MAX_M` (above it the BLAS-backed paths win:
oneDNN's int8 and bf16 GEMMs, measured in the docstring of `MAX_M`). Not where the library cannot be
built (no C compiler): `supports` then returns the build's reason and the torch paths serve.
"""

from __future__ import annotations

import torch

from qkernels import dispatch
from qkernels.dispatch import Bound, Problem
from qkernels.formats import Granularity, QOperand, Recipe
from qkernels.kernels import cpu as native
from torch_bindings import cpu
from torch_bindings.arrays import DTYPES

__all__ = ["register", "supports", "MAX_M"]

MAX_M = 16
"""Largest M (rows of activations) served. Measured: see the module docstring and README."""

_TAGS = ("w8a8", "w4a8", "w8a16", "w4a16", "fp8", "fp8a16")


def _weight_kind(recipe: Recipe) -> str | None:
    """Why the recipe's formats are not the kernels' (None: they are)."""
    rhs, lhs = recipe.rhs, recipe.lhs
    name = rhs.qtype.name
    if name not in native.KINDS:
        return f"weights of type {name}: the native kernels take {', '.join(native.KINDS)}"
    grouped = rhs.granularity is Granularity.GROUP
    if grouped != rhs.packed or (not grouped and rhs.granularity is not Granularity.ROW):
        return f"weights {rhs.describe()}: the native kernels take int4 per group or 8-bit codes per channel"
    if lhs is None:
        return None
    integer = lhs.qtype.name == "int8" and name in ("int8", "int4")
    fp8 = lhs.qtype.name == name == "float8_e4m3fn"
    if not (integer or fp8) or not (lhs.granularity is Granularity.ROW or lhs.static) or lhs.zero_point:
        return f"activations {lhs.describe()} x weights {rhs.describe()}: not a pair the native kernels multiply"
    return None


def supports(problem: Problem) -> str | None:
    why = cpu._supports(problem) or _weight_kind(problem.recipe)
    if why:
        return why
    if problem.m > MAX_M:
        return f"M={problem.m} > {MAX_M}: the BLAS-backed CPU paths are faster there (torch_bindings.native.MAX_M)"
    return native.unavailable()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _run(call: Bound, lhs: torch.Tensor | QOperand, rhs: QOperand, bias: torch.Tensor | None) -> torch.Tensor:
    p = call.problem
    recipe = p.recipe
    if p.m == 0 or p.n == 0 or p.k == 0:  # nothing to multiply: the definition's path (zeros, bias), same numbers
        return cpu._run(call, lhs, rhs, bias)
    rows, lead = cpu._rows(lhs)
    m = (rows.qvalue if isinstance(rows, QOperand) else rows).shape[0]
    out = torch.empty((m, p.n), dtype=DTYPES[p.out_dtype])
    lib = native.library()
    fmt = recipe.rhs
    kp = fmt.padded_k(p.k)
    kind = native.KINDS[fmt.qtype.name]
    group = fmt.group_size or 0
    w, w_scale, b = rhs.qvalue.contiguous(), _f32(rhs.scale), _f32(bias)
    out_dtype, threads = native.DTYPES[p.out_dtype], torch.get_num_threads()
    if isinstance(rows, QOperand):  # static activations, quantized by the op with their calibrated scale
        codes = rows.qvalue if rows.qvalue.shape[1] == kp else torch.nn.functional.pad(
            rows.qvalue.view(torch.int8), (0, kp - rows.qvalue.shape[1])).view(rows.qvalue.dtype)
        codes, x_scale = codes.contiguous(), _f32(rows.scale)
        if recipe.accumulation.integer:
            rc = lib.qk_matmul_int(codes.data_ptr(), x_scale.data_ptr(), m, kp, w.data_ptr(), kind, p.n,
                                   w_scale.data_ptr(), group, _ptr(b), out.data_ptr(), out_dtype, threads)
        else:
            rc = lib.qk_matmul_fp8(codes.data_ptr(), x_scale.data_ptr(), m, kp, w.data_ptr(), p.n,
                                   w_scale.data_ptr(), _ptr(b), out.data_ptr(), out_dtype, threads)
        native.check(rc, "qk_matmul")
    else:
        x = rows.contiguous()
        x_dtype = native.DTYPES[str(x.dtype).removeprefix("torch.")]
        if recipe.lhs is None:
            rc = lib.qk_linear_float(x.data_ptr(), x_dtype, m, p.k, kp, w.data_ptr(), kind, p.n, w_scale.data_ptr(),
                                     _ptr(rhs.zero_point), group, _ptr(b), out.data_ptr(), out_dtype, threads)
            native.check(rc, "qk_linear_float")
        else:
            rc = native.check(lib.qk_linear_quantized(
                x.data_ptr(), x_dtype, m, p.k, kp, None, w.data_ptr(), kind, p.n, w_scale.data_ptr(), group,
                _ptr(b), out.data_ptr(), out_dtype, threads), "qk_linear_quantized")
            if rc:  # rows with NaN/Inf: the definition's path raises the format's error for them
                cpu._run(call, lhs, rhs, bias)
                raise AssertionError(f"the native kernels found {rc} non-finite activation row(s) the generic "
                                     f"path accepted; report this")
    return out.reshape(*lead, p.n)


def _note(problem: Problem) -> str:
    return "layout canonical: the stored codes, read by the C kernels (one library call per matmul)"


def register() -> None:
    dispatch.register(dispatch.Implementation(
        name="torch-cpu-native", framework="torch", priority=70, supports=supports, run=_run,
        serves=dispatch.Serves.tags(*_TAGS), accumulate=cpu._accumulate, note=_note,
        description=f"native C kernels on CPU (qkernels/kernels/cpu) for M <= {MAX_M}: one call, stored codes"))

