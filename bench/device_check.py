"""`make device-check`: the checks a short run on a lent GPU must produce, in minutes, into one folder.

    python3 -m bench.device_check --out $OUT            # on the GPU machine (the H200): <= 8 minutes
    python3 -m bench.device_check --out DIR --dry       # the same script on a CPU: tiny shapes, < 1 minute

It uses the interpreter it runs under (the machine's python3: no venv, nothing installed) and
writes only under `--out` (default `$OUT`), at most 8 files:

| file             | what                                                                                |
|------------------|-------------------------------------------------------------------------------------|
| summary.md       | one row per step (status, seconds / budget, reason), then the key bench rows        |
| summary.json     | the same, machine-readable (`qkernels-device-check/1`)                              |
| versions.json    | python, torch, triton, jax, jaxlib, numpy, CUDA, the GPU and driver, the tools       |
| device-check.log | every step's command and full output, in order                                      |
| bench.json/.md   | `python -m bench` on the key cases (W8A8 M=4096 on 4096x4096 and 14336x4096, W4A16  |
|                  | g128 M=1 and 16 on 8192x8192, fp8 rows when `qkernels.FP8` exists) vs cuBLAS bf16    |
| moe.md           | `python -m bench --moe` (torch): grouped W8A8 / W4A16 on Mixtral / Qwen3 expert shapes |
| tune.json        | the decode table `python -m qkernels.tune` measured (never written into the tree)  |

Steps, each a child process with its own time budget (a step that fails or runs out of time is
recorded and the next one runs; the budgets sum to 7.5 minutes and no step starts past the total):
versions; the Triton tests compiled on the GPU (`tests/test_triton_kernels.py`,
`tests/test_triton_decode.py`, `tests/test_torch_gpu.py`: launches per call, CUDA graphs); compute-sanitizer memcheck of small W8A8 / W8A16 / W4A16 / W4A8
calls through `qk.linear`, checked against the reference, and racecheck of a split-K W8A8 call; the
key bench cases; the MoE (grouped) bench rows; a short decode tune (per recipe, so a timeout keeps the recipes already tuned).

`--dry` rehearses every step on a CPU: the calls run in the Triton interpreter, the tests are only
collected, bench and tune use tiny shapes, and what needs the GPU or its tools (compute-sanitizer)
is skipped with the reason; the same files are written. `tests/test_device_check.py` runs it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOTAL_S = 480.0  # the 8 minutes for the whole check
FILES = ("summary.md", "summary.json", "versions.json", "device-check.log", "bench.json", "bench.md", "moe.md",
         "tune.json")
SCHEMA = "qkernels-device-check/1"
_PACKAGES = ("torch", "triton", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "numpy", "ml_dtypes",
             "pytest", "pytest-xdist", "hypothesis")


@dataclass(kw_only=True)
class Step:
    """One step: a child command (or a function of the run) with its time budget in seconds."""

    name: str
    budget_s: float
    status: str = "pending"  # ok, failed, timeout, skipped
    seconds: float = 0.0
    reason: str = ""
    commands: list[str] = field(default_factory=list)
    started: float = 0.0  # time.monotonic() when it began

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What the steps run: the GPU's cases, or the CPU rehearsal's tiny ones."""

    dry: bool
    tests: tuple[str, ...] = ("tests/test_triton_kernels.py", "tests/test_triton_decode.py", "tests/test_torch_gpu.py")
    bench_shapes: str = "4096x4096x4096,4096x14336x4096,1x8192x8192,16x8192x8192"  # MxNxK
    bench_budget_s: float = 60.0
    tune_shapes: str = "decode-sweep"
    tune_recipes: tuple[str, ...] = ("w4a16-g128", "w8a8", "w8a16")
    tune_max_configs: int = 4  # the heuristic's pick and three more per problem: ~45 timings per recipe

    @classmethod
    def make(cls, dry: bool) -> Plan:
        if not dry:
            return cls(dry=False)
        return cls(dry=True, bench_shapes="4x64x96,1x48x128", bench_budget_s=3.0, tune_shapes="1x32x64",
                   tune_recipes=("w8a8",), tune_max_configs=2)

    def bench_recipes(self) -> list[str]:
        """W8A8 and W4A16 g128, and the fp8 recipe once the package has one."""
        return ["w8a8", "w4a16-g128", *fp8_recipes()]


def fp8_recipes() -> list[str]:
    """The names of `qkernels.FP8` (a recipe, or a tuple of them) where the package defines it."""
    import qkernels

    fp8 = getattr(qkernels, "FP8", None)
    if fp8 is None:
        return []
    return [r.name for r in (fp8 if isinstance(fp8, (tuple, list)) else (fp8,))]


class Run:
    """The output folder, the log every step appends to, and the clock of the whole check."""

    def __init__(self, out: Path, plan: Plan, total_s: float) -> None:
        self.out, self.plan, self.total_s = out, plan, total_s
        self.start = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "device-check.log"
        self.log_path.write_text(f"# python -m bench.device_check{' --dry' if plan.dry else ''} ({sys.executable})\n")
        self.env = self._env()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
                   PYTHONUNBUFFERED="1", QKERNELS_CACHE_DIR=str(self.out / ".cache"))
        if self.plan.dry:
            env.update(TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
        else:
            env.pop("TRITON_INTERPRET", None)
        return env

    def left_s(self) -> float:
        return self.total_s - (time.monotonic() - self.start)

    def log(self, text: str) -> None:
        with self.log_path.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def command(self, step: Step, argv: list[str], *, env: dict[str, str] | None = None,
                timeout_s: float | None = None) -> subprocess.CompletedProcess[str] | None:
        """Run a child for `step` within `timeout_s`, what is left of the step's budget and of the
        whole check; None if it ran out of time."""
        left = min(step.left_s() if timeout_s is None else timeout_s, step.left_s(), self.left_s())
        step.commands.append(" ".join(argv))
        self.log(f"\n## {step.name}: {' '.join(argv)}  (timeout {left:.0f} s)")
        try:
            done = subprocess.run(argv, cwd=ROOT, env=env or self.env, capture_output=True, text=True,
                                  timeout=max(left, 1.0))
        except subprocess.TimeoutExpired as e:
            self.log(_text(e.stdout) + _text(e.stderr) + f"\n[timed out after {left:.0f} s]")
            return None
        self.log(done.stdout + done.stderr + f"\n[exit status {done.returncode}]")
        return done


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


# ---------------------------------------------------------------- steps


def _python() -> list[str]:
    return [sys.executable]


def _finish(step: Step, done: subprocess.CompletedProcess[str] | None, what: str) -> None:
    if done is None:
        step.status, step.reason = "timeout", f"{what} ran past its budget; see device-check.log"
    elif done.returncode:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        step.status, step.reason = "failed", f"{what}: exit status {done.returncode}: {tail[0][:200]}"
    else:
        step.status = "ok"


def step_versions(run: Run, step: Step) -> None:
    """Interpreter, packages, git commit, the GPU as torch and nvidia-smi see it, and the tools."""
    out: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                           "platform": platform.platform(), "dry": run.plan.dry}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    git = _tool_output(["git", "rev-parse", "HEAD"])
    out["git"] = git.strip() if git else None
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0))) if out["gpu"] else None
    except ImportError as e:
        out["torch_error"] = str(e)
    smi = _tool_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                        "--format=csv,noheader"])
    out["nvidia_smi"] = smi.strip() if smi else None
    for tool in ("compute-sanitizer", "ncu", "nvcc"):
        path = find_tool(tool)
        version = _tool_output([path, "--version"]) if path else None
        out[tool] = {"path": path, "version": version.strip().splitlines()[-1] if version else None}
    (run.out / "versions.json").write_text(json.dumps(out, indent=2) + "\n")
    run.log(f"\n## {step.name}\n{json.dumps(out, indent=2)}")
    step.status = "ok"


def _tool_output(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH or in the usual CUDA / Nsight folders."""
    found = shutil.which(name)
    if found:
        return found
    for base in ("/usr/local/cuda/bin", "/usr/local/cuda/compute-sanitizer", "/opt/nvidia/nsight-compute"):
        for path in sorted(Path(base).glob(f"**/{name}")) if Path(base).is_dir() else ():
            if os.access(path, os.X_OK) and path.is_file():
                return str(path)
    return None


def step_tests(run: Run, step: Step) -> None:
    """pytest on the Triton test files, compiled for the GPU (no TRITON_INTERPRET); collected only when dry."""
    argv = [*_python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", *run.plan.tests]
    if run.plan.dry:
        argv.append("--collect-only")
    else:
        argv += ["-n", "8", "--durations=10"]
    done = run.command(step, argv)
    _finish(step, done, "pytest")
    if run.plan.dry and step.status == "ok":
        step.reason = "dry: collected only (the GPU run compiles and runs them)"


def step_sanitizer(run: Run, step: Step) -> None:
    """memcheck of the small calls of every recipe, racecheck of a split-K call; plain runs when dry."""
    calls = [*_python(), "-m", "bench.device_check", "--calls"]
    sanitizer = None if run.plan.dry else find_tool("compute-sanitizer")
    if sanitizer is None:
        done = run.command(step, calls)
        _finish(step, done, "small calls")
        if step.status == "ok":
            step.reason = ("dry: the calls ran in the Triton interpreter; compute-sanitizer needs the GPU"
                           if run.plan.dry else "compute-sanitizer not found: the calls ran without it")
            step.status = "ok" if run.plan.dry else "failed"
        return
    # exact allocations, so an out-of-bounds access is not hidden inside a cached block
    env = dict(run.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    reasons = []
    for tool, extra in (("memcheck", []), ("racecheck", ["--split-k"])):
        done = run.command(step, [sanitizer, "--tool", tool, "--error-exitcode", "3", *calls, *extra], env=env,
                           timeout_s=step.budget_s / 2 if tool == "memcheck" else None)
        part = Step(name=tool, budget_s=0)
        _finish(part, done, tool)
        if part.status != "ok":
            reasons.append(part.reason)
            step.status = "timeout" if part.status == "timeout" and step.status != "failed" else "failed"
    if not reasons:
        step.status = "ok"
    step.reason = "; ".join(reasons)


def step_bench(run: Run, step: Step) -> None:
    """`python -m bench` (torch) on the key cases, JSON and markdown into the output folder."""
    argv = [*_python(), "-m", "bench", "--framework", "torch", "--recipes", ",".join(run.plan.bench_recipes()),
            "--shapes", run.plan.bench_shapes, "--budget", str(run.plan.bench_budget_s),
            "--json", str(run.out / "bench.json"), "--markdown", str(run.out / "bench.md")]
    if run.plan.dry:
        argv.append("--smoke")
    _finish(step, run.command(step, argv), "bench")


def step_moe(run: Run, step: Step) -> None:
    """`python -m bench --moe` (torch): quantized grouped matmuls on MoE expert shapes vs the float grouped mm."""
    argv = [*_python(), "-m", "bench", "--moe", "--framework", "torch", "--markdown", str(run.out / "moe.md")]
    if run.plan.dry:
        argv.append("--smoke")
    _finish(step, run.command(step, argv), "bench --moe")


def step_tune(run: Run, step: Step) -> None:
    """The decode tune, one recipe per child with an equal share of the budget, all into tune.json
    (each child merges its entries into the file, so a recipe that runs out of time loses only its own)."""
    failures = []
    for i, recipe in enumerate(run.plan.tune_recipes):
        share = step.left_s() / (len(run.plan.tune_recipes) - i)  # a recipe that runs long leaves the others theirs
        if min(run.left_s(), share) < 5:
            failures.append(f"{recipe}: no time left")
            continue
        argv = [*_python(), "-m", "qkernels.tune", "--recipes", recipe, "--shapes", run.plan.tune_shapes,
                "--max-configs", str(run.plan.tune_max_configs), "--out", str(run.out / "tune.json")]
        part = Step(name=recipe, budget_s=0)
        _finish(part, run.command(step, argv, timeout_s=share), f"tune {recipe}")
        if part.status != "ok":
            failures.append(part.reason)
    step.status = "ok" if not failures else "failed"
    step.reason = "; ".join(failures)
    if run.plan.dry and not failures:
        step.reason = "dry: interpreter timings, stored for device 'cpu'"


STEPS: tuple[tuple[str, float, Callable[[Run, Step], None]], ...] = (
    ("versions", 20.0, step_versions),
    ("triton-tests", 150.0, step_tests),
    ("sanitizer", 80.0, step_sanitizer),
    ("bench", 80.0, step_bench),
    ("moe", 60.0, step_moe),
    ("tune", 60.0, step_tune),
)
"""(name, budget seconds, function): 450 s in all, inside the 480 s total."""


# ---------------------------------------------------------------- the small calls (a child process)


def small_calls(split_k: bool) -> int:
    """qk.linear on small W8A8 / W8A16 / W4A16 g128 / W4A8 g128 problems through the Triton kernels
    (the GPU's, else the interpreter's), each against the reference; `split_k`: a W8A8 decode call
    with K split in four (what racecheck watches). Prints one line per call; exit status 1 on a mismatch."""
    import numpy as np
    import torch

    import qkernels as qk
    from qkernels import reference, testing

    gpu = torch.cuda.is_available()
    device, act = ("cuda" if gpu else "cpu"), torch.bfloat16  # the activation dtype every Triton kernel takes
    prefix = "triton." if gpu else "triton.interpret."
    rng = np.random.default_rng(0)
    bad = 0
    if split_k:
        from qkernels.kernels.triton import quantize_rows, w8a8_matmul
        from qkernels.kernels.triton._common import Kernel, MatmulConfig

        x, w = testing.activations(rng, (1, 1024)), testing.weights(rng, (64, 1024))
        wq = reference.quantize(w, qk.W8A8.rhs)
        cfg = MatmulConfig(block_m=1, block_n=32, block_k=128, num_warps=4, num_stages=2, kernel=Kernel.GEMV,
                           split_k=4)
        q, s = quantize_rows(torch.from_numpy(x).to(device))
        acc = w8a8_matmul(q, s, torch.from_numpy(wq.qvalue).to(device), torch.from_numpy(wq.scale).to(device),
                          config=cfg, return_acc=True)
        ok = np.array_equal(acc.cpu().numpy(), reference.accumulators(x, wq, qk.W8A8))
        print(f"w8a8 split-K x4 M=1 N=64 K=1024 {cfg.name}: accumulators {'== reference' if ok else 'DIFFER'}")
        return 0 if ok else 1
    for recipe in (qk.W8A8, qk.W8A16, qk.W4A16(128), qk.W4A8(128)):
        x, w = testing.activations(rng, (3, 256)), testing.weights(rng, (40, 256))
        xt = torch.from_numpy(x).to(device=device, dtype=act)
        w_q = qk.quantize(torch.from_numpy(w).to(device), recipe)
        backend = prefix + recipe.tag
        with qk.use_backend(backend):
            y = qk.linear(xt, w_q).float().cpu().numpy()
        lhs = xt.float().cpu().numpy().astype(reference.np_dtype("bfloat16"))  # the values the kernel read
        rq = reference.quantize(w, recipe.rhs)
        expected = reference.qmatmul(lhs, rq, recipe, out_dtype="float32")  # weights dequantized to bf16 too
        operands = (lhs if recipe.lhs is None else reference.quantize(lhs, recipe.lhs).dequantize(),
                    rq.dequantize("bfloat16"))
        try:
            if recipe.accumulation.integer:  # DESIGN.md section 4: the same bits as the reference
                exact = reference.qmatmul(lhs, rq, recipe, out_dtype="bfloat16").astype(np.float32)
                np.testing.assert_array_equal(y, exact, err_msg=recipe.name)
                verdict = "equal to the reference"
            else:
                testing.assert_close(y, expected, *operands, "bfloat16", what=recipe.name)
                verdict = "within tolerance of the reference"
        except AssertionError as e:
            bad += 1
            verdict = f"MISMATCH: {str(e).splitlines()[0]}"
        print(f"{recipe.name} {backend} M=3 N=40 K=256: {verdict}")
    return 1 if bad else 0


# ---------------------------------------------------------------- report


def key_rows(out: Path) -> list[dict[str, Any]]:
    """The qkernels rows of bench.json with their speedup over the float baseline, if it was written."""
    try:
        doc = json.loads((out / "bench.json").read_text())
    except (OSError, ValueError):
        return []
    return [{k: r.get(k) for k in ("recipe", "shape", "status", "median_s", "tflops", "gbps", "speedup", "speedup_vs",
                                   "snr_db", "impl", "reason")}
            for r in doc.get("rows", []) if r.get("role") == "qkernels"]


def write_summary(run: Run, steps: list[Step]) -> None:
    rows = key_rows(run.out)
    doc = {"schema": SCHEMA, "dry": run.plan.dry, "total_budget_s": run.total_s,
           "elapsed_s": round(time.monotonic() - run.start, 1), "steps": [asdict(s) for s in steps],
           "bench": rows, "files": [f for f in FILES if (run.out / f).exists()]}
    (run.out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# device check{' (dry run on CPU)' if run.plan.dry else ''}", "",
             f"{doc['elapsed_s']:.0f} s of {run.total_s:.0f} s", "",
             "| step | status | seconds / budget | reason |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} / {s.budget_s:.0f} | {s.reason} |" for s in steps]
    if rows:
        lines += ["", "| recipe | shape | status | median us | TFLOP/s | speedup vs | implementation |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            us = f"{r['median_s'] * 1e6:.1f}" if r["median_s"] else "-"
            tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
            sp = f"{r['speedup']:.2f}x {r['speedup_vs']}" if r["speedup"] else (r["reason"] or "-")
            lines.append(f"| {r['recipe']} | {r['shape']} | {r['status']} | {us} | {tf} | {sp} | {r['impl'] or '-'} |")
    (run.out / "summary.md").write_text("\n".join(lines) + "\n")


def check(out: Path, *, dry: bool, total_s: float = TOTAL_S) -> list[Step]:
    """Run every step into `out`; returns the steps with their status."""
    run = Run(out, Plan.make(dry), total_s)
    steps = [Step(name=name, budget_s=budget) for name, budget, _ in STEPS]
    for step, (_, _, fn) in zip(steps, STEPS):
        if run.left_s() < 5:
            step.status, step.reason = "skipped", "the check's total time was spent"
            continue
        t0 = step.started = time.monotonic()
        try:
            fn(run, step)
        except Exception as e:  # a broken step is a finding: record it and go on
            step.status, step.reason = "failed", f"{type(e).__name__}: {e}"
            run.log(f"\n## {step.name}: {type(e).__name__}: {e}")
        step.seconds = round(time.monotonic() - t0, 1)
        print(f"device-check: {step.name:<13} {step.status:<8} {step.seconds:6.1f} s  {step.reason}", file=sys.stderr)
        write_summary(run, steps)
    shutil.rmtree(run.out / ".cache", ignore_errors=True)
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"),
                   help="output folder (default $OUT); at most 8 files are written there")
    p.add_argument("--dry", action="store_true", default=os.environ.get("DRY", "") not in ("", "0"),
                   help="rehearse on a CPU (also DRY=1): tiny shapes, interpreter, GPU-only parts skipped")
    p.add_argument("--total", type=float, default=TOTAL_S, help=f"seconds for the whole check (default {TOTAL_S:.0f})")
    p.add_argument("--calls", action="store_true", help=argparse.SUPPRESS)  # child: the small calls
    p.add_argument("--split-k", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.calls:
        return small_calls(args.split_k)
    if args.out is None:
        p.error("no output folder: pass --out DIR or set OUT")
    steps = check(args.out, dry=args.dry, total_s=args.total)
    print((args.out / "summary.md").read_text())
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
