"""Compile every shipped kernel config for a target with no accelerator present.

    python -m qkernels.aot --target sm_80|sm_90|gfx942|tpu-v5e|tpu-v6e|tpu-v5p|pallas-sm_80|pallas-sm_90 [--json FILE]

Reports per config (and, for Triton, per specialization the JIT compiles: `div16` and `any` integer
arguments) the matrix instruction found in the machine code, registers, spills and shared
memory (GPU) or VMEM and `memory_analysis()` (TPU); exits 1 if any config fails to compile, lacks the
expected tensor-core/MXU instruction, spills, or exceeds the target's on-chip memory. Useful to
check a deployment target from a CPU box and to warm a compilation cache.

The targets are `qkernels.hardware.AOT_TARGETS`; each names the `qkernels.backends` entry that
compiles for it, whose `<module>.aot` provides `check(target) -> list[ConfigReport]` (`TARGETS`) for the
dense kernels, and `<module>.grouped` `aot_reports(target)` for the grouped (MoE) ones (`GROUPED`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from qkernels import backends, hardware

__all__ = ["ConfigReport", "TARGETS", "GROUPED", "run_checks", "main"]

TARGETS: dict[str, str] = {
    name: f"{backends.by_name(t.backend).module}.aot" for name, t in hardware.AOT_TARGETS.items()}
"""Target name -> the module whose `check(target)` compiles for it."""

GROUPED: dict[str, str] = {
    name: f"{backends.by_name(t.backend).module}.grouped" for name, t in hardware.AOT_TARGETS.items()
    if t.backend == "triton" or t.topology}
"""Target name -> the module whose `aot_reports(target)` compiles the grouped (MoE) kernels for it: the
Triton grouped kernels for GPU targets, the Pallas TPU grouped kernels for TPU targets (the Pallas
grouped kernels have no GPU lowering, so 'pallas-sm_*' targets have none)."""


@dataclass(kw_only=True, slots=True)
class ConfigReport:
    """What compiling one kernel config for one target showed; `problems` empty means it passed."""

    kernel: str
    config: str
    target: str
    variant: str = ""  # the specialization compiled (Triton: 'div16' or 'any' integer arguments)
    mma_instruction: str | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    vmem_bytes: int | None = None
    memory_analysis: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # findings that do not fail the config

    @property
    def ok(self) -> bool:
        return not self.problems

    def row(self) -> str:
        mem = (f"smem {self.shared_bytes}" if self.shared_bytes is not None
               else f"vmem {self.vmem_bytes}" if self.vmem_bytes is not None else "")
        regs = f"regs {self.registers} spill {self.spill_bytes}" if self.registers is not None else ""
        status = "ok" if self.ok else "FAIL: " + "; ".join(self.problems)
        if self.notes:
            status += " (note: " + "; ".join(self.notes) + ")"
        return f"{self.kernel:<22} {self.config:<40} {self.variant:<6} {self.mma_instruction or '-':<26} {regs:<20} {mem:<14} {status}"


def run_checks(target: str) -> list[ConfigReport]:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    reports = importlib.import_module(TARGETS[target]).check(target)
    if target in GROUPED:
        reports += importlib.import_module(GROUPED[target]).aot_reports(target)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", required=True, choices=list(TARGETS),
                        help="target to compile for (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="write every report as JSON")
    args = parser.parse_args(argv)
    reports: list[ConfigReport] = []
    for target in args.target:
        reports.extend(run_checks(target))
    for r in reports:
        print(f"{r.target:<13} {r.row()}")
    failed = [r for r in reports if not r.ok]
    print(f"{len(reports) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        data: list[dict[str, Any]] = [dataclasses.asdict(r) | {"ok": r.ok} for r in reports]
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    return 1 if failed or not reports else 0


if __name__ == "__main__":
    sys.exit(main())
