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
static) int8 / e4m3 activations or none, M up to `MAX_M` (integer recipes) / `MAX_M_FLOAT` (the others),
and not the bfloat16 weight-only calls 'torch-cpu-packed' serves above `PACKED_ABOVE_M` rows (torch's packed
int8 / int4 kernels are as fast or faster there: 0.23-0.27 ms against 0.24-0.27 ms at M=1 below, on a hot
4096x4096 weight; end to end in decode these kernels are faster: `PACKED_ABOVE_M`). Not where the library cannot
be built (no C compiler): `supports` then returns the build's reason and the torch paths serve.

Measured (this repo's 2-core AMD EPYC, 2 threads, quiet; 4096x4096 weight, float32 activations unless
said; speedup over `F.linear` f32 in the same run; the other column is the torch path chosen without
these kernels; a side-by-side script, min over 5 x 10 calls per row; M = 1 / 16 / 256 are also the
`qkernels.linear` rows of `python -m bench --shapes 4096x4096 --m 1,16,256`, bench/results/):

| recipe             | M=1   | M=16  | M=64 | M=256 | other path (M = 1 / 16 / 64 / 256)          |
|--------------------|-------|-------|------|-------|---------------------------------------------|
| W8A8               | 9.1x  | 10.4x | 7.0x | 5.9x  | torch-cpu-w8a8: 10.6x / 7.1x / 6.4x / 5.7x  |
| W4A8 g128          | 10.2x | 6.8x  | 3.6x | 2.8x  | torch-cpu-w4a8: 2.3x / 2.0x / 2.7x / 2.8x   |
| W8A16              | 5.7x  | 3.4x  | 1.8x | 1.5x  | torch-cpu (dequantize + GEMM): 0.06x-0.5x   |
| W4A16 g128         | 6.4x  | 3.3x  | 1.6x | 1.7x  | torch-cpu: 0.05x-0.5x                       |
| FP8                | 5.8x  | 2.5x  | 1.9x | 1.7x  | torch-cpu (codes upcast): 0.04x-0.5x        |
| FP8A16             | 5.8x  | 3.1x  | 1.7x | 1.7x  | torch-cpu: 0.04x-0.5x                       |
| FP8A16, bf16 act.  | 2.8x  | 2.8x  | 1.8x | 1.6x  | torch-cpu: 0.04x                            |

So there every recipe at every M served was faster than the unquantized f32 matmul, and faster than the
other torch path except W8A8 at M=1 (oneDNN's int8 GEMV, 0.27 against 0.32 ms on that
4096x4096 GEMV). End to end the one library call wins for W8A8 too (greedy decode of SmolLM2-135M, 2
threads, 2-core Intel Xeon: 1.36x the fp32 model's tokens/s here against 1.02x when its layers above
512x512 ran `torch._int_mm`; `PARALLEL_MACS`), so every W8A8 layer up to M=64 runs here. W8A8 and W4A8
above M=64 go back to `torch._int_mm` (equal at M=256; larger M not compared).

Host work per call: a module's forward runs the prepared library call (`_prepare`, ops.Runner: one ctypes
call with a fixed `qk_linear_call`), 64x64 at M=1: 5.6-7.1 us above `nn.Linear` in f32 (`python -m bench
overhead`, Intel Xeon, one core).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from qkernels import dispatch, tuning
from qkernels.dispatch import Bound, Problem
from qkernels.formats import Granularity, QOperand, Recipe
from qkernels.kernels import cpu as native
from torch_bindings import cpu, packed
from torch_bindings.arrays import DTYPES

__all__ = ["register", "supports", "Plan", "MAX_M", "MAX_M_FLOAT", "PARALLEL_MACS", "PACKED_ABOVE_M",
           "PACKED_ABOVE_WEIGHTS", "SLOWER_ABOVE_M", "slower"]

MAX_M = 64
"""Largest M (rows of activations) served for the integer recipes (W8A8, W4A8): from there on oneDNN's int8
GEMM (`torch._int_mm`, 'torch-cpu-w8a8' / 'torch-cpu-w4a8') is as fast or faster (the module docstring)."""

MAX_M_FLOAT = 256
"""Largest M served for the float accumulations (weight-only with float32 / float16 activations, FP8): the
other torch paths for them dequantize the whole weight per call (or upcast fp8 codes), slower at every M
measured up to here (the module docstring); larger M was not compared and goes to those paths."""

PARALLEL_MACS = 1 << 16
"""Up to this many multiply-adds per call (M * N * K; a 256x256 GEMV) the kernels run on the calling thread;
above it they split N over `torch.get_num_threads()` threads. The library is the OpenMP build
(`qkernels.kernels.cpu.OPENMP_FLAGS`), whose threads are torch's own intra-op threads, awake from torch's
last op: no thread to start, none competing with torch's. Greedy decode of SmolLM2-135M (576-1536 wide
layers, weights read cold every token), 2 threads, this repo's 2-core Intel Xeon, tokens/s against the
fp32 model's at this threshold / 2**18 / 2**22 (`bench/decode.py`'s model, one run each, same session):
W8A8 1.36x / 1.29x / 1.20x, FP8 1.06x / 1.04x / 0.83x, W8A16 f32 1.09x / 1.07x / 0.94x, FP8A16 f32 1.12x /
1.04x / 0.88x. (The library's own thread pool, at the same thresholds, measured 1.13-1.24x for W8A8 and
0.80-0.96x for the others: its threads competed with torch's for the two cores.)"""

PACKED_ABOVE_M = 4
"""bfloat16 weight-only calls (W8A16, W4A16) of more rows than this go to 'torch-cpu-packed' (torch's packed
int8 / int4 GEMMs: as fast or faster from 4096x4096 GEMVs up, the module docstring); up to it (the GEMV
kernels' rows, decode) they run here: greedy decode of SmolLM2-135M in bfloat16, 2 threads, 2-core Intel
Xeon, against the fp32 model's tokens/s: W8A16 1.07x here against 0.85x on torch-cpu-packed, W4A16 g128
1.09x against 0.89x (the bfloat16 float model: 0.81x). Also to torch-cpu-packed: weights of more than
`PACKED_ABOVE_WEIGHTS` elements, where its kernels are faster: one GEMV, two threads, against F.linear f32,
here / torch-cpu-packed: 4096x4096 W8A16 1.50x / 1.85x, W4A16 g128 1.94x / 2.08x; 2048x2048 W8A16 1.65x /
1.46x, W4A16 1.77x / 1.67x."""

PACKED_ABOVE_WEIGHTS = 1 << 23

SLOWER_ABOVE_M = 8
"""Above this M the float accumulations (weight-only, FP8) are known slower than F.linear f32 on some CPUs:
`python -m bench --shapes 4096x4096 --m 1,16,256` on this repo's 2-core Intel Xeon (AMX; its f32 GEMM is
~1.5x the AMD EPYC's of the table above), bench/results/cpu-intel-r-xeon-r-processor-2-threads-2026-12-01.md:
M = 1: 2.4-2.8x; M = 16: 0.96x (FP8A16 with bf16 activations) to 1.44x; M = 256: 0.48-0.58x. `slower` says
so above it, naming W8A8 (3.5x at M = 16, 4.5x at M = 256 in the same run); the integer recipes are faster
at every M measured."""


def slower(problem: Problem) -> str | None:
    """`Implementation.slower`: where this implementation is known slower than F.linear f32 (`SLOWER_ABOVE_M`)."""
    if problem.recipe.accumulation.integer or problem.m <= SLOWER_ABOVE_M or 0 in (problem.n, problem.k):
        return None
    return (f"slower than F.linear f32 on some CPUs above M={SLOWER_ABOVE_M} rows for float accumulations "
            f"(4096x4096, 2-core Intel Xeon: 0.96-1.44x at M=16, 0.48-0.58x at M=256; "
            f"torch_bindings.native.SLOWER_ABOVE_M); W8A8 is faster there (3.5-4.5x)")


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


def _library():
    """The OpenMP build (its threads are torch's: `PARALLEL_MACS`), else, where it does not build (a compiler
    without libgomp), the default one (its own thread pool): slower in parallel decode, the same numbers."""
    return native.library(openmp=True) if native.unavailable(openmp=True) is None else native.library()


def supports(problem: Problem) -> str | None:
    why = cpu._supports(problem) or _weight_kind(problem.recipe)
    if why:
        return why
    limit = MAX_M if problem.recipe.accumulation.integer else MAX_M_FLOAT
    if problem.m > limit:
        return (f"M={problem.m} > {limit}: the BLAS-backed CPU paths serve taller calls "
                f"(torch_bindings.native.{'MAX_M' if limit == MAX_M else 'MAX_M_FLOAT'})")
    if ((problem.m > PACKED_ABOVE_M or problem.n * problem.k > PACKED_ABOVE_WEIGHTS) and problem.recipe.lhs is None
            and packed.SERVES.reason(problem.recipe) is None and packed.supports(problem) is None):
        return (f"M={problem.m}, {problem.n}x{problem.k}: torch-cpu-packed serves this bfloat16 call with torch's packed "
                f"int8 / int4 kernels, as fast or faster than these (measured: torch_bindings.native.PACKED_ABOVE_M)")
    return None if native.unavailable(openmp=True) is None else native.unavailable()


@dataclass(frozen=True, slots=True)
class Plan:
    """What one bound call runs, fixed by its problem (made once by `configure`, shown by explain):
    the entry point and the header's constants for the problem's formats and dtypes."""

    entry: str  # 'qk_linear_quantized' (float activations, integer / fp8 recipes), 'qk_linear_float'
    #             (weight-only), 'qk_matmul_int' / 'qk_matmul_fp8' (activations quantized by the op: static)
    kind: int  # the weight's code kind (native.KINDS)
    group: int  # group size along K, 0 per channel
    kp: int  # K padded as the weight stores it (OperandFormat.padded_k)
    x_dtype: int  # native.DTYPES of the activations (unused by the qk_matmul_* entries)
    out_dtype: int
    out_torch: torch.dtype
    parallel: bool  # split N over torch's intra-op threads (`PARALLEL_MACS`), else run on the calling thread

    @property
    def name(self) -> str:
        return f"{self.entry} (kind {self.kind}, group {self.group}, K padded to {self.kp})"


def _configure(problem: Problem) -> tuning.Choice:
    recipe = problem.recipe
    fmt = recipe.rhs
    if problem.lhs_quantized:
        entry = "qk_matmul_int" if recipe.accumulation.integer else "qk_matmul_fp8"
    else:
        entry = "qk_linear_float" if recipe.lhs is None else "qk_linear_quantized"
    plan = Plan(entry=entry, kind=native.KINDS[fmt.qtype.name], group=fmt.group_size or 0, kp=fmt.padded_k(problem.k),
                x_dtype=native.DTYPES.get(problem.act_dtype, -1), out_dtype=native.DTYPES[problem.out_dtype],
                out_torch=DTYPES[problem.out_dtype], parallel=problem.m * problem.n * problem.k > PARALLEL_MACS)
    return tuning.Choice(config=plan, source="fixed by the recipe's formats and the call's dtypes")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype is torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _run(call: Bound, lhs: torch.Tensor | QOperand, rhs: QOperand, bias: torch.Tensor | None) -> torch.Tensor:
    """One library call (the plan's entry point) writing the output tensor; the host work around it is a
    few attribute reads (the 64x64 per-call overhead is what `python -m bench overhead` measures)."""
    p = call.problem
    if p.m == 0 or p.n == 0 or p.k == 0:  # nothing to multiply: the definition's path (zeros, bias), same numbers
        return cpu._run(call, lhs, rhs, bias)
    plan: Plan = call.config.config
    lib = _library()
    lead = None
    codes = lhs.qvalue if isinstance(lhs, QOperand) else lhs
    if codes.dim() != 2:
        lead = tuple(codes.shape[:-1])
        lhs = QOperand(codes.reshape(-1, p.k), lhs.scale.reshape(-1)) if isinstance(lhs, QOperand) else codes.reshape(-1, p.k)
    w = rhs.qvalue if rhs.qvalue.is_contiguous() else rhs.qvalue.contiguous()
    w_scale = _f32(rhs.scale)
    bias = None if bias is None else _f32(bias)  # held until the call returns: the library reads its memory
    b = None if bias is None else bias.data_ptr()
    threads = torch.get_num_threads() if plan.parallel else 1
    if isinstance(lhs, QOperand):  # static activations, quantized by the op with their calibrated scale
        m = lhs.qvalue.shape[0]
        out = torch.empty((m, p.n), dtype=plan.out_torch)
        xq = lhs.qvalue if lhs.qvalue.shape[1] == plan.kp else torch.nn.functional.pad(
            lhs.qvalue.view(torch.int8), (0, plan.kp - lhs.qvalue.shape[1])).view(lhs.qvalue.dtype)
        xq, x_scale = xq.contiguous(), _f32(lhs.scale)
        if plan.entry == "qk_matmul_int":
            rc = lib.qk_matmul_int(xq.data_ptr(), x_scale.data_ptr(), m, plan.kp, w.data_ptr(), plan.kind, p.n,
                                   w_scale.data_ptr(), plan.group, b, out.data_ptr(), plan.out_dtype, threads)
        else:
            rc = lib.qk_matmul_fp8(xq.data_ptr(), x_scale.data_ptr(), m, plan.kp, w.data_ptr(), p.n,
                                   w_scale.data_ptr(), b, out.data_ptr(), plan.out_dtype, threads)
        native.check(rc, plan.entry)
    else:
        x = lhs if lhs.is_contiguous() else lhs.contiguous()
        m = x.shape[0]
        out = torch.empty((m, p.n), dtype=plan.out_torch)
        if plan.entry == "qk_linear_float":
            zero = rhs.zero_point
            native.check(lib.qk_linear_float(
                x.data_ptr(), plan.x_dtype, m, p.k, plan.kp, w.data_ptr(), plan.kind, p.n, w_scale.data_ptr(),
                None if zero is None else zero.data_ptr(), plan.group, b, out.data_ptr(), plan.out_dtype, threads),
                plan.entry)
        elif native.check(lib.qk_linear_quantized(
                x.data_ptr(), plan.x_dtype, m, p.k, plan.kp, None, w.data_ptr(), plan.kind, p.n, w_scale.data_ptr(),
                plan.group, b, out.data_ptr(), plan.out_dtype, threads), plan.entry):
            cpu._run(call, lhs, rhs, bias)  # rows with NaN/Inf: the definition's path raises the format's error
            raise AssertionError("the native kernels found non-finite activation rows the generic path accepted")
    return out if lead is None else out.reshape(*lead, p.n)


def _prepare(call: Bound, rhs: QOperand, bias: torch.Tensor | None):
    """`Implementation.prepare`: `_run`'s library call with everything but the activations fixed in a
    `qk_linear_call` (qk_cpu.h: one ctypes call of five arguments), for float activations (the static recipes'
    op-quantized codes take `_run`). It points into the tensors themselves (ops.Runner's contract), so only
    where they need no conversion: contiguous codes, f32 scales; a bias in another dtype is converted per
    call. The runner returns None where `_run` must run instead: the library found NaN/Inf rows (`_run`
    raises the format's error)."""
    p = call.problem
    plan: Plan = call.config.config
    w, scale, zero = rhs.qvalue, rhs.scale, rhs.zero_point if plan.entry == "qk_linear_float" else None
    if (p.m == 0 or p.n == 0 or p.k == 0 or plan.entry not in ("qk_linear_float", "qk_linear_quantized")
            or not w.is_contiguous() or scale.dtype is not torch.float32 or not scale.is_contiguous()
            or (zero is not None and not zero.is_contiguous()) or (bias is not None and not bias.is_contiguous())):
        return None
    f32_bias = bias is None or bias.dtype is torch.float32
    fixed = native.LinearCall(
        entry=native.CALL_LINEAR_FLOAT if plan.entry == "qk_linear_float" else native.CALL_LINEAR_QUANTIZED,
        x_dtype=plan.x_dtype, w_kind=plan.kind, out_dtype=plan.out_dtype, k=p.k, kp=plan.kp, n=p.n,
        group_size=plan.group, w=w.data_ptr(), w_scale=scale.data_ptr(),
        w_zero=None if zero is None else zero.data_ptr(), bias=bias.data_ptr() if bias is not None and f32_bias else None)
    fn, address, n, k = _library().qk_run_linear, ctypes.addressof(fixed), p.n, p.k
    out_dtype, parallel, empty, threads_now = plan.out_torch, plan.parallel, torch.empty, torch.get_num_threads

    def run(x: torch.Tensor) -> torch.Tensor | None:
        out = empty((*x.shape[:-1], n), dtype=out_dtype)
        if not f32_bias:
            b32 = bias.float()  # held until the call returns
            fixed.bias = b32.data_ptr()
        rc = fn(address, x.data_ptr(), x.numel() // k, out.data_ptr(), threads_now() if parallel else 1)
        return out if rc == 0 else None if rc > 0 else native.check(rc, plan.entry)

    run.fixed = fixed  # the arguments' struct, alive as long as the runner
    return run


def _note(problem: Problem) -> str:
    return "layout canonical: the stored codes, read by the C kernels (one library call per matmul)"


def register() -> None:
    dispatch.register(dispatch.Implementation(
        name="torch-cpu-native", framework="torch", priority=70, supports=supports, run=_run, configure=_configure,
        prepare=_prepare, slower=slower,
        serves=dispatch.Serves.tags(*_TAGS), accumulate=cpu._accumulate, note=_note,
        description=f"native C kernels on CPU (qkernels/kernels/cpu), M <= {MAX_M} (integer) / {MAX_M_FLOAT}: one call"))

