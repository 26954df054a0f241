"""Triton kernels (CUDA sm_80+, ROCm gfx942) for the quantized matmul recipes, registered with dispatch.

One module per family: `w8a8`, `w4a8`, `w4a16`, `w8a16`, `fp8`, `fp8a16` (matmuls with the rescale
fused) and `quantize` (activations -> int8 or float8_e4m3fn codes + per-row scale). The fp8 families
serve CUDA sm_89+ and gfx942 only (`hardware.fp8_mma_reason`). `register()` (called by `qkernels.backends`; needs
torch and triton) registers, for framework 'torch', each family declared for its recipe tag:

| name                       | op       | priority | serves                                         |
|----------------------------|----------|----------|------------------------------------------------|
| triton.<family>            | qmatmul  | 100      | cuda:sm_80+ and rocm:gfx942                    |
| triton.quantize            | quantize | 100      | same                                           |
| triton.interpret.<family>  | qmatmul  | -10      | cpu, only when TRITON_INTERPRET=1 (tests)      |
| triton.interpret.quantize  | quantize | -10      | same                                           |

so `with qkernels.use_backend("triton"): ...` runs the real kernels in the interpreter on CPU
tensors, and automatic selection never picks the (slow) interpreter (`automatic=False`).

Each matmul runs with the config its bound call carries (`call.config`, from
`qkernels.tuning.choose(problem, "triton")` at bind time: kernel variant — tile, split-K tile or GEMV —
and block sizes, by M bucket, N, K and device: user cache, shipped table, then `heuristics`);
`qkernels.explain` prints it with its source.

A dispatched call is checked once, when it is bound (`supports` below, the binding's shape checks,
the `Problem` and the config choice), so the implementations call each family's unchecked
`launch_<family>`, never the checked public `<family>_matmul`; `_launch`'s docstring says what covers
each of the public launcher's checks on this path.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qkernels import dispatch, hardware, tuning
from qkernels.formats import FP8, W8A8, OperandFormat, QOperand
from qkernels.kernels.triton._common import ARCHS, MatmulConfig, QuantizeConfig
from qkernels.kernels.triton.fp8 import fp8_matmul, launch_fp8
from qkernels.kernels.triton.fp8a16 import fp8a16_matmul, launch_fp8a16
from qkernels.kernels.triton.quantize import quantize_rows
from qkernels.kernels.triton.tunable import BACKEND as _TUNED
from qkernels.kernels.triton.w4a8 import launch_w4a8, w4a8_matmul
from qkernels.kernels.triton.w4a16 import launch_w4a16, w4a16_matmul
from qkernels.kernels.triton.w8a8 import launch_w8a8, w8a8_matmul
from qkernels.kernels.triton.w8a16 import launch_w8a16, w8a16_matmul
from qkernels.numerics import INT4, UINT4, Granularity

__all__ = [
    "MatmulConfig", "QuantizeConfig", "quantize_rows", "w8a8_matmul", "w4a8_matmul", "w4a16_matmul",
    "w8a16_matmul", "fp8_matmul", "fp8a16_matmul", "FAMILIES", "register",
]

_INT8_ROW = W8A8.lhs  # int8 per row: W8A8's activations and weights, W4A8's activations, W8A16's weights
# activations the int8 kernels take: per row, or static (always pre-quantized, its scale repeated per row)
_INT8_ACTS = (_INT8_ROW, W8A8(static=True).lhs)
_FP8_ROW = FP8.lhs  # float8_e4m3fn per row: FP8's activations and weights, FP8A16's weights
_FP8_ACTS = (_FP8_ROW, FP8(static=True).lhs)  # per row, or static (pre-quantized, its scale repeated per row)
_QUANTIZED_ACTS = (_INT8_ROW, _FP8_ROW)  # what the fused activation-quantize kernel writes
_OUT_DTYPES = ("bfloat16", "float16", "float32")
_FLOAT_ACTS = ("bfloat16", "float16")  # weight-only recipes multiply in the activation dtype
_ANY_FLOAT_ACTS = ("bfloat16", "float16", "float32")  # integer recipes quantize them in the kernel


@dataclass(frozen=True, kw_only=True, slots=True)
class Family:
    """A kernel family as dispatch sees it: which operand formats and activation dtypes it takes."""

    name: str
    accepts_rhs: Callable[[OperandFormat], bool]
    rhs_description: str
    lhs: tuple[OperandFormat, ...]  # activation formats it takes (quantized in the kernel or by the caller); (): float
    run: Callable[..., Any]
    accumulate: Callable[..., Any] | None = None  # the raw int32 accumulators (integer families)
    fp8: bool = False  # fp8 operands: only GPUs with fp8 tensor cores (`hardware.fp8_mma_reason`)

    def reason(self, problem: dispatch.Problem) -> str | None:
        recipe = problem.recipe
        if not self.accepts_rhs(recipe.rhs):
            return f"weights {recipe.rhs.describe()} are not {self.rhs_description}"
        quantized = bool(self.lhs)
        if quantized != (recipe.lhs is not None):
            return "activations stay float in this recipe" if quantized else "activations are quantized"
        if quantized and recipe.lhs not in self.lhs:
            return f"activations {recipe.lhs.describe()} are not {self.lhs[0].describe()}"
        if problem.lhs_quantized and not quantized:
            return "pre-quantized activations need a recipe that quantizes them"
        if self.fp8 and problem.device_kind != "cpu":
            why = hardware.fp8_mma_reason(problem.platform)
            if why:
                return why
        acts = _ANY_FLOAT_ACTS if quantized else _FLOAT_ACTS
        if not problem.lhs_quantized and problem.act_dtype not in acts:
            return (f"activation dtype {problem.act_dtype} is not one of {acts}; cast the activations "
                    f"(x.to(torch.bfloat16))")
        if problem.out_dtype not in _OUT_DTYPES:
            return f"output dtype {problem.out_dtype} is not one of {_OUT_DTYPES}"
        return None


def _flat(x: Any, k: int) -> Any:
    return x.reshape(math.prod(x.shape[:-1]), k)  # explicit rows: -1 is ambiguous for K=0


def _lhs_codes(problem: dispatch.Problem, lhs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8 / fp8) and per-row f32 scales of the activations, quantized in the fused kernel if float."""
    if problem.lhs_quantized:
        return lhs.qvalue, lhs.scale
    return quantize_rows(lhs, qtype=problem.recipe.lhs.qtype)


def _bound_run(launch: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    """A family's `run`: dispatch's calling convention onto its unchecked `launch(problem, config, lhs,
    rhs, bias)` with the bound call's config; leading lhs axes fold into M when unbatched (and the
    output keeps any trailing axes past N: the per-group accumulators' G)."""
    def run(call: dispatch.Bound, lhs: Any, rhs: QOperand, bias: Any = None) -> Any:
        problem, config = call.problem, call.config.config
        if problem.batch is not None:
            return launch(problem, config, lhs, rhs, bias)
        lead = tuple((lhs.qvalue if isinstance(lhs, QOperand) else lhs).shape[:-1])
        if isinstance(lhs, QOperand):
            flat = QOperand(_flat(lhs.qvalue, problem.k), lhs.scale.reshape(math.prod(lead)))
        else:
            flat = _flat(lhs, problem.k)
        out = launch(problem, config, flat, rhs, bias)
        return out.reshape(*lead, *out.shape[1:])
    return run


def _w8a8(problem: dispatch.Problem, config: MatmulConfig, x: Any, w: QOperand, b: Any) -> torch.Tensor:
    q, s = _lhs_codes(problem, x)
    return launch_w8a8(q, s, w.qvalue, w.scale, b, out_dtype=problem.out_dtype, config=config)


def _w4a8(problem: dispatch.Problem, config: MatmulConfig, x: Any, w: QOperand, b: Any) -> torch.Tensor:
    q, s = _lhs_codes(problem, x)
    return launch_w4a8(q, s, w.qvalue, w.scale, b, group_size=problem.recipe.group_size,
                       out_dtype=problem.out_dtype, config=config)


def _acc_w8a8(problem: dispatch.Problem, config: MatmulConfig, x: Any, w: QOperand, b: Any) -> torch.Tensor:
    q, s = _lhs_codes(problem, x)
    return launch_w8a8(q, s, w.qvalue, w.scale, None, out_dtype=problem.out_dtype, config=config, return_acc=True)


def _acc_w4a8(problem: dispatch.Problem, config: MatmulConfig, x: Any, w: QOperand, b: Any) -> torch.Tensor:
    q, s = _lhs_codes(problem, x)
    return launch_w4a8(q, s, w.qvalue, w.scale, None, group_size=problem.recipe.group_size,
                       out_dtype=problem.out_dtype, config=config, return_acc=True)


def _w4a16(problem: dispatch.Problem, config: MatmulConfig, x: Any, w: QOperand, b: Any) -> torch.Tensor:
    return launch_w4a16(x, w.qvalue, w.scale, w.zero_point, b, group_size=problem.recipe.group_size,
                        out_dtype=problem.out_dtype, config=config)


def _w8a16(problem: dispatch.Problem, config: MatmulConfig, x: Any, w: QOperand, b: Any) -> torch.Tensor:
    return launch_w8a16(x, w.qvalue, w.scale, b, out_dtype=problem.out_dtype, config=config)


def _fp8(problem: dispatch.Problem, config: MatmulConfig, x: Any, w: QOperand, b: Any) -> torch.Tensor:
    q, s = _lhs_codes(problem, x)
    return launch_fp8(q, s, w.qvalue, w.scale, b, out_dtype=problem.out_dtype, config=config)


def _fp8a16(problem: dispatch.Problem, config: MatmulConfig, x: Any, w: QOperand, b: Any) -> torch.Tensor:
    return launch_fp8a16(x, w.qvalue, w.scale, b, out_dtype=problem.out_dtype, config=config)


def _run_quantize(call: dispatch.Bound, x: torch.Tensor) -> QOperand:
    q, s = quantize_rows(x, qtype=call.problem.recipe.lhs.qtype)
    return QOperand(q, s, None)


def _grouped(qtype: Any) -> Callable[[OperandFormat], bool]:
    return lambda f: f.qtype == qtype and f.granularity is Granularity.GROUP


FAMILIES: tuple[Family, ...] = (
    Family(name="w8a8", accepts_rhs=lambda f: f == _INT8_ROW, rhs_description="int8 per-channel",
           lhs=_INT8_ACTS, run=_bound_run(_w8a8), accumulate=_bound_run(_acc_w8a8)),
    Family(name="w4a8", accepts_rhs=_grouped(INT4), rhs_description="int4 per-group", lhs=_INT8_ACTS,
           run=_bound_run(_w4a8), accumulate=_bound_run(_acc_w4a8)),
    Family(name="w4a16", accepts_rhs=lambda f: _grouped(INT4)(f) or _grouped(UINT4)(f),
           rhs_description="int4 or uint4+zero-point per-group", lhs=(), run=_bound_run(_w4a16)),
    Family(name="w8a16", accepts_rhs=lambda f: f == _INT8_ROW, rhs_description="int8 per-channel",
           lhs=(), run=_bound_run(_w8a16)),
    Family(name="fp8", accepts_rhs=lambda f: f == _FP8_ROW, rhs_description="float8_e4m3fn per-channel",
           lhs=_FP8_ACTS, run=_bound_run(_fp8), fp8=True),
    Family(name="fp8a16", accepts_rhs=lambda f: f == _FP8_ROW, rhs_description="float8_e4m3fn per-channel",
           lhs=(), run=_bound_run(_fp8a16), fp8=True),
)


_GPU_ARCHS = tuple(a for a in ARCHS if a != "interpret")  # the archs with config tables


def _gpu_platform_reason(problem: dispatch.Problem) -> str | None:
    if problem.device_kind in ("cuda", "rocm") and hardware.table_arch(problem.platform) in _GPU_ARCHS:
        return None
    if problem.device_kind == "cuda":
        return f"platform {problem.platform} is older than sm_80 (no int8/bf16 tensor-core path)"
    return f"platform {problem.platform} is not a CUDA sm_80+ or ROCm gfx942 GPU"


def _interpret_platform_reason(problem: dispatch.Problem) -> str | None:
    if problem.platform != "cpu":
        return f"the interpreter variant serves CPU tensors only, not {problem.platform}"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "set TRITON_INTERPRET=1 before importing triton to run the Triton kernels in its CPU interpreter"
    return None


def _supports(platform_reason: Callable[[dispatch.Problem], str | None],
              family_reason: Callable[[dispatch.Problem], str | None]) -> Callable[[dispatch.Problem], str | None]:
    def supports(problem: dispatch.Problem) -> str | None:
        return platform_reason(problem) or family_reason(problem)
    return supports


def _quantize_reason(problem: dispatch.Problem) -> str | None:
    lhs = problem.recipe.lhs
    if lhs not in _QUANTIZED_ACTS:
        return (f"activation format {lhs.describe() if lhs else 'float'} is not one of "
                f"{', '.join(f.describe() for f in _QUANTIZED_ACTS)}")
    if lhs == _FP8_ROW and problem.device_kind != "cpu" and hardware.fp8_mma_reason(problem.platform):
        return hardware.fp8_mma_reason(problem.platform)
    if problem.act_dtype not in _ANY_FLOAT_ACTS:
        return f"activation dtype {problem.act_dtype} is not one of {_ANY_FLOAT_ACTS}"
    return None


def register() -> None:
    """Register every family (compiled, and interpreted for tests) with dispatch."""
    variants = (("triton", 100, _gpu_platform_reason, "", True),
                ("triton.interpret", -10, _interpret_platform_reason, " in the Triton interpreter (CPU, slow; tests)",
                 False))
    for prefix, priority, platform_reason, where, automatic in variants:
        for fam in FAMILIES:
            dispatch.register(dispatch.Implementation(
                name=f"{prefix}.{fam.name}", framework="torch", op=dispatch.Op.QMATMUL, priority=priority,
                supports=_supports(platform_reason, fam.reason), run=fam.run, serves=dispatch.Serves.tags(fam.name),
                accumulate=fam.accumulate,
                automatic=automatic, configure=functools.partial(tuning.choose, backend=_TUNED),
                description=f"Triton {fam.name} kernel, rescale fused{where}"))
        dispatch.register(dispatch.Implementation(
            name=f"{prefix}.quantize", framework="torch", op=dispatch.Op.QUANTIZE, priority=priority,
            supports=_supports(platform_reason, _quantize_reason), run=_run_quantize, automatic=automatic,
            description=f"Triton fused activation quantization (int8 / float8_e4m3fn per row){where}"))
