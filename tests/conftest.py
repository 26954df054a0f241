"""Shared test setup: interpreter modes without accelerators, hypothesis profiles, 8 host devices.

Hypothesis profile from $QKERNELS_HYPOTHESIS_PROFILE: `ci` (default: deterministic, few examples)
or `thorough` (many examples, still deterministic). Environment variables that must be set before
triton/jax are imported are set here, at collection time.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# No GPU here: run Triton kernels in its interpreter (must precede `import triton`).
if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
# Eight CPU devices for the sharding tests (must precede `import jax`).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# Tests never read or write the developer's own tuned-config cache (qkernels.tuning).
if "QKERNELS_CACHE_DIR" not in os.environ:
    os.environ["QKERNELS_CACHE_DIR"] = tempfile.mkdtemp(prefix="qkernels-test-cache-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_COMMON = dict(derandomize=True, database=None, deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=10, **_COMMON)
settings.register_profile("thorough", max_examples=200, **_COMMON)
settings.load_profile(os.environ.get("QKERNELS_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(shipped-table dir, user cache dir) of `qkernels.tuning`, both empty, for one test."""
    from qkernels import tuning

    shipped, cache = tmp_path / "shipped", tmp_path / "cache"
    monkeypatch.setattr(tuning, "SHIPPED_DIR", shipped)
    monkeypatch.setenv(tuning.CACHE_ENV, str(cache))
    tuning.reload()
    yield shipped, cache
    tuning.reload()
