"""Compile native shared libraries on first use, into a cache keyed by everything that changes the binary.

    path = shared_library("qk_cpu", [HERE / "qk_cpu.c"])            # C, the package's kernels
    path = shared_library("qk_xla_ffi", [HERE / "xla_ffi.cc", HERE / "qk_cpu.c"], cxx=True,
                          include_dirs=(jax.ffi.include_dir(),))    # C++, XLA FFI handlers

The cache directory is `$QKERNELS_CACHE_DIR`, else `~/.cache/qkernels`. A library's file name holds a hash
of its sources' contents (and the headers beside them), the flags, the compiler's `--version` text and the
CPU's feature flags (`-march=native` code is only valid where it was built). Compilation writes a
temporary file and renames it into place (`os.replace`, atomic on POSIX), so pytest-xdist workers building
the same library at once both end with one complete file. The compiler is `$CC` (C) / `$CXX` (C++), else
the first of gcc, cc (g++, c++) found; none, or a failed compile, raises `BuildError` whose message is
the reason implementations return from `supports`.

Flags: `-O3 -march=native -ffp-contract=off -fPIC -shared`, never -ffast-math: the integer recipes'
rescale needs each multiply and add rounded on its own and `x / scale` an IEEE division (qk_cpu.c).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

__all__ = ["BuildError", "FLAGS", "cache_dir", "shared_library", "compiler"]

FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared")
CACHE_ENV = "QKERNELS_CACHE_DIR"
COMPILE_TIMEOUT_S = 600


class BuildError(RuntimeError):
    """A native library could not be built: the message says why (no compiler, the compiler's errors)."""


def cache_dir() -> pathlib.Path:
    """Where built libraries live: `$QKERNELS_CACHE_DIR`, else `~/.cache/qkernels`."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "qkernels")


def compiler(cxx: bool = False) -> str:
    """The compiler command: `$CXX` / `$CC` if set, else the first of g++, c++ (gcc, cc) on PATH."""
    env = os.environ.get("CXX" if cxx else "CC")
    if env:
        return env
    for name in ("g++", "c++") if cxx else ("gcc", "cc"):
        found = shutil.which(name)
        if found:
            return found
    raise BuildError(f"no {'C++' if cxx else 'C'} compiler found (looked for {'$CXX, g++, c++' if cxx else '$CC, gcc, cc'}); "
                     f"install gcc (e.g. apt-get install build-essential) or set {'CXX' if cxx else 'CC'}")


@functools.cache
def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"the compiler {cc!r} does not run ({e}); install gcc or set CC / CXX") from e
    if done.returncode != 0:
        raise BuildError(f"`{cc} --version` failed with exit code {done.returncode}: {done.stderr.strip()[:500]}")
    return done.stdout


@functools.cache
def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native reads), or the machine name where /proc is absent."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _key(sources: Sequence[pathlib.Path], cmd: Sequence[str], version: str) -> str:
    h = hashlib.sha256()
    headers = sorted({p for s in sources for p in s.parent.glob("*.h")})
    for path in [*sources, *headers]:
        h.update(str(path.name).encode())
        h.update(path.read_bytes())
    for part in (*cmd, version, _cpu_flags()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def shared_library(name: str, sources: Sequence[str | os.PathLike[str]], *, cxx: bool = False,
                   include_dirs: Sequence[str | os.PathLike[str]] = (), extra_flags: Sequence[str] = ()) -> pathlib.Path:
    """The path of `lib<name>-<hash>.so` built from `sources`, compiling it first where the cache lacks it.

    `cxx`: compile as C++17 (every source, C files included, so one compiler links them). `include_dirs`
    go to `-I` and into the key. Raises `BuildError` with the compiler's messages on failure.
    """
    srcs = [pathlib.Path(s).resolve() for s in sources]
    for s in srcs:
        if not s.is_file():
            raise BuildError(f"source {s} is missing from the installed package; reinstall qkernels")
    cc = compiler(cxx)
    lang = ["-x", "c++", "-std=c++17"] if cxx else ["-std=c11"]
    cmd = [cc, *FLAGS, *extra_flags, *lang, *(f"-I{d}" for d in include_dirs)]
    version = _compiler_version(cc)
    out_dir = cache_dir()
    target = out_dir / f"lib{name}-{_key(srcs, cmd, version)}.so"
    if target.is_file():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=out_dir)
        os.close(fd)
    except OSError as e:
        raise BuildError(f"cannot write the native library cache {out_dir} ({e}); set {CACHE_ENV} to a writable "
                         f"directory") from e
    try:
        try:
            done = subprocess.run([*cmd, "-o", tmp, *map(str, srcs), "-lpthread", "-lm"], capture_output=True,
                                  text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            raise BuildError(f"compiling {name} with {cc} failed to run: {e}") from e
        if done.returncode != 0:
            raise BuildError(f"compiling {name} with {cc} failed (exit code {done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
