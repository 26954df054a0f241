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

Flags: `-O3 -march=native -ffp-contract=off -fPIC` (and `-shared` to link), never -ffast-math: the integer recipes'
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

FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC")
"""Compile flags (linking adds -shared); never -ffast-math."""
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


_CXX_SUFFIXES = (".cc", ".cpp", ".cxx")


def shared_library(name: str, sources: Sequence[str | os.PathLike[str]], *, cxx: bool = False,
                   include_dirs: Sequence[str | os.PathLike[str]] = (), extra_flags: Sequence[str] = ()) -> pathlib.Path:
    """The path of `lib<name>-<hash>.so` built from `sources`, compiling it first where the cache lacks it.

    Each source compiles in its own language (`.c`: C11 with the C compiler; `.cc` / `.cpp`: C++17 with the
    C++ compiler); `cxx` (implied by a C++ source) links with the C++ compiler. `include_dirs` go to `-I`
    and, like `extra_flags`, into the key. Raises `BuildError` with the compiler's messages on failure.
    """
    srcs = [pathlib.Path(s).resolve() for s in sources]
    for s in srcs:
        if not s.is_file():
            raise BuildError(f"source {s} is missing from the installed package; reinstall qkernels")
    cxx = cxx or any(s.suffix in _CXX_SUFFIXES for s in srcs)
    includes = [f"-I{d}" for d in include_dirs]
    commands = []
    for s in srcs:
        is_cxx = s.suffix in _CXX_SUFFIXES
        cc = compiler(is_cxx)
        commands.append([cc, *FLAGS, *extra_flags, "-std=c++17" if is_cxx else "-std=c11", *includes, "-c", str(s)])
    linker = compiler(cxx)
    versions = "".join(_compiler_version(c) for c in sorted({c[0] for c in commands} | {linker}))
    out_dir = cache_dir()
    target = out_dir / f"lib{name}-{_key(srcs, [part for c in commands for part in c] + [linker], versions)}.so"
    if target.is_file():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        work = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=out_dir)
    except OSError as e:
        raise BuildError(f"cannot write the native library cache {out_dir} ({e}); set {CACHE_ENV} to a writable "
                         f"directory") from e
    try:
        objects = []
        for i, cmd in enumerate(commands):
            objects.append(os.path.join(work, f"{i}.o"))
            _compile(name, [*cmd, "-o", objects[-1]])
        tmp = os.path.join(work, target.name)
        _compile(name, [linker, *FLAGS, *extra_flags, "-shared", "-o", tmp, *objects, "-lpthread", "-lm"])
        os.replace(tmp, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _compile(name: str, cmd: list[str]) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"compiling {name} with {cmd[0]} failed to run: {e}") from e
    if done.returncode != 0:
        raise BuildError(f"compiling {name} with {cmd[0]} failed (exit code {done.returncode}): "
                         f"{(done.stderr or done.stdout).strip()[-2000:]}")
