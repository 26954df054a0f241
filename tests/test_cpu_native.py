"""The native CPU kernels (qkernels/kernels/cpu) called through ctypes on NumPy arrays, against the reference.

Integer recipes (W8A8, W4A8) must equal `qkernels.reference` bit for bit (accumulators and rescale order);
weight-only and fp8 ones are within `qkernels.testing.tolerances`. Each case runs on the library built for
this CPU (`-march=native`: AVX-512 VNNI here) and on a portable build (`-march=x86-64-v2`: the plain C loops).
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import platform
import threading

import ml_dtypes
import numpy as np
import pytest

from qkernels import formats, reference, testing
from qkernels.kernels import cpu
from qkernels.kernels.cpu import build
from qkernels.numerics import GROUP_SIZES, NUMPY_OPS

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=str(cpu.unavailable()))

DT = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _portable_path():
    return build.shared_library("qk_cpu_portable", [cpu.SOURCE], extra_flags=("-march=x86-64-v2", "-mtune=generic"))


@functools.cache
def _portable() -> object:
    """The library built without AVX-512 (x86-64-v2): the portable C loops, with the same signatures."""
    return cpu.load(_portable_path())


LIBS = ["native", "openmp"] + (["portable"] if platform.machine() in ("x86_64", "AMD64") else [])


@pytest.fixture(params=LIBS)
def lib(request):
    """The default build (its own thread pool), the OpenMP build the torch binding loads, the portable C."""
    if request.param == "native":
        return cpu.library()
    return cpu.library(openmp=True) if request.param == "openmp" else _portable()


def _ptr(a):
    return None if a is None else a.ctypes.data


def native_matmul(lib, x, rhs: reference.RefQuantized, recipe: formats.Recipe, bias=None, out_dtype="float32",
                  threads=1, input_scale=None):
    """(output, non-finite row count) of the native kernels for `x @ dequant(rhs)^T + bias`."""
    x = np.ascontiguousarray(x)
    m, k = x.shape
    n = rhs.qvalue.shape[0]
    kp = recipe.rhs.padded_k(k)
    out = np.empty((m, n), DT[out_dtype])
    xdt = cpu.DTYPES[str(np.dtype(x.dtype))]
    odt = cpu.DTYPES[out_dtype]
    w = np.ascontiguousarray(rhs.qvalue)
    ws = np.ascontiguousarray(rhs.scale, np.float32)
    kind = cpu.KINDS[recipe.rhs.qtype.name]
    g = recipe.rhs.group_size or 0
    b = None if bias is None else np.ascontiguousarray(bias, np.float32)
    if recipe.lhs is None:
        wz = None if rhs.zero_point is None else np.ascontiguousarray(rhs.zero_point, np.int8)
        rc = lib.qk_linear_float(_ptr(x), xdt, m, k, kp, _ptr(w), kind, n, _ptr(ws), _ptr(wz), g, _ptr(b), _ptr(out),
                                 odt, threads)
    else:
        s = None if input_scale is None else np.asarray([input_scale], np.float32)
        rc = lib.qk_linear_quantized(_ptr(x), xdt, m, k, kp, _ptr(s), _ptr(w), kind, n, _ptr(ws), g, _ptr(b),
                                     _ptr(out), odt, threads)
    return out, cpu.check(rc, "qk_linear")


def _reference(x, rhs, recipe, bias, out_dtype, input_scale=None):
    lhs = recipe.quantize_lhs(NUMPY_OPS, x, input_scale) if recipe.static else x
    return reference.qmatmul(lhs, rhs, recipe, bias=bias, out_dtype=out_dtype)


def _check(actual, expected, x, rhs, recipe, bias, out_dtype, input_scale=None):
    if recipe.accumulation.integer:
        np.testing.assert_array_equal(np.asarray(actual, np.float32), np.asarray(expected, np.float32))
        return
    if recipe.static:
        lhs_q = recipe.quantize_lhs(NUMPY_OPS, x, input_scale)
        ops = testing.float_operands(lhs_q, rhs, recipe)
    else:
        ops = testing.float_operands(x, rhs, recipe)
    testing.assert_close(actual, expected, *ops, out_dtype, bias)


RECIPES = [
    pytest.param(formats.W8A8, id="w8a8"), pytest.param(formats.W8A8(static=True), id="w8a8-static"),
    *(pytest.param(formats.W4A8(g), id=f"w4a8-g{g}") for g in GROUP_SIZES),
    pytest.param(formats.W4A8(64, static=True), id="w4a8-g64-static"),
    pytest.param(formats.W8A16, id="w8a16"),
    *(pytest.param(formats.W4A16(g), id=f"w4a16-g{g}") for g in GROUP_SIZES),
    *(pytest.param(formats.W4A16(g, zero_point=True), id=f"w4a16-g{g}-zp") for g in GROUP_SIZES),
    pytest.param(formats.FP8, id="fp8"), pytest.param(formats.FP8(static=True), id="fp8-static"),
    pytest.param(formats.FP8A16, id="fp8a16"),
]

SHAPES = [  # (M, N, K)
    pytest.param((1, 40, 256), id="M1-N40-K256"),
    pytest.param((6, 19, 67), id="M6-N19-K67-oddK"),
    pytest.param((9, 70, 300), id="M9-N70-K300"),
    pytest.param((1, 3, 1), id="M1-N3-K1"),
    pytest.param((2, 9, 1100), id="M2-N9-K1100"),
    pytest.param((3, 6, 130), id="M3-N6-K130"),  # several K tiles (512) in the weight-only panels and GEMV
    pytest.param((5, 9, 1030), id="M5-N9-K1030"),
]


def _data(shape, act, seed, recipe):
    m, n, k = shape
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((m, k)) * 2).astype(DT[act])
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    bias = rng.standard_normal(n).astype(np.float32)
    scale = None
    if recipe.static:
        qmax = recipe.lhs.qtype.qmax
        scale = float(np.float32(np.abs(np.asarray(x, np.float32)).max(initial=0) * 0.7 / qmax) or 1.0)
    return x, reference.quantize(w, recipe.rhs), bias, scale


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(lib, recipe, shape):
    x, rhs, bias, s = _data(shape, "float32", 0, recipe)
    out, bad = native_matmul(lib, x, rhs, recipe, bias, "float32", input_scale=s)
    assert bad == 0
    _check(out, _reference(x, rhs, recipe, bias, "float32", s), x, rhs, recipe, bias, "float32", s)


@pytest.mark.parametrize("recipe", [formats.W8A8, formats.W4A8(32), formats.W8A16, formats.W4A16(128, zero_point=True),
                                    formats.W4A16(64), formats.FP8, formats.FP8A16], ids=lambda r: r.name)
@pytest.mark.parametrize("act,out_dtype", [("bfloat16", "bfloat16"), ("float16", "float16"), ("bfloat16", "float32"),
                                           ("float32", "bfloat16")])
@pytest.mark.parametrize("m", [2, 5])
def test_dtypes(lib, recipe, act, out_dtype, m):
    x, rhs, bias, s = _data((m, 33, 600), act, 1, recipe)
    out, bad = native_matmul(lib, x, rhs, recipe, bias, out_dtype)
    assert bad == 0 and out.dtype == DT[out_dtype]
    _check(out, _reference(x, rhs, recipe, bias, out_dtype), x, rhs, recipe, bias, out_dtype)


@pytest.mark.parametrize("recipe", [formats.W8A16, formats.FP8A16], ids=lambda r: r.name)
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("edge", ["code-128", "tiny-activations", "tiny-scales"])
def test_bf16_dot_edges(lib, recipe, out_dtype, edge):
    """The edges of the bf16-dot GEMV (qk_cpu.c, AVX-512 BF16): an int8 code -128 (outside what quantize makes,
    possible in a loaded checkpoint), activations and scales small enough that the instruction's flushing of
    subnormals would lose them (those calls take the other kernels); every result within the tolerance."""
    x, rhs, bias, _ = _data((2, 37, 200), "bfloat16", 7, recipe)
    bias = bias * np.float32(1e-38)  # the tiny results must not drown in the bias's share of the tolerance
    qvalue, scale = rhs.qvalue.copy(), rhs.scale.copy()
    if edge == "code-128":
        if recipe.rhs.qtype.name != "int8":
            pytest.skip("int8 codes only")
        qvalue[:, ::7] = -128
        qvalue[:, 3::7] = 127
    elif edge == "tiny-activations":
        x[1] = np.resize(np.asarray([2e-38, -3e-38, 5e-39, 1e-37, 0.0], np.float32), x.shape[1])
    else:
        scale[::3] = 1e-39
    rhs = dataclasses.replace(rhs, qvalue=qvalue, scale=scale)
    out, _ = native_matmul(lib, x, rhs, recipe, bias, out_dtype)
    _check(out, _reference(x, rhs, recipe, bias, out_dtype), x, rhs, recipe, bias, out_dtype)


@pytest.mark.parametrize("recipe", [formats.W8A8, formats.W4A8(128), formats.W4A16(32), formats.FP8, formats.FP8A16],
                         ids=lambda r: r.name)
@pytest.mark.parametrize("shape", [(0, 8, 64), (3, 0, 64), (2, 8, 0), (0, 0, 0)], ids=lambda s: "M%d-N%d-K%d" % s)
def test_zero_size(lib, recipe, shape):
    x, rhs, bias, s = _data(shape, "float32", 2, recipe)
    out, bad = native_matmul(lib, x, rhs, recipe, bias)
    assert bad == 0 and out.shape == shape[:2]
    np.testing.assert_array_equal(out, _reference(x, rhs, recipe, bias, "float32"))


@pytest.mark.parametrize("recipe", [formats.W8A8, formats.W4A8(64), formats.FP8, formats.W8A8(static=True)],
                         ids=lambda r: r.name)
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_rows(lib, recipe, bad_value):
    """Rows with NaN/Inf are counted and come out NaN; the other rows are the reference's."""
    x, rhs, bias, s = _data((4, 16, 128), "float32", 3, recipe)
    x[1, 5] = bad_value
    x[3, 0] = np.nan
    out, bad = native_matmul(lib, x, rhs, recipe, bias, input_scale=s)
    assert bad == 2
    assert np.isnan(out[[1, 3]]).all()
    good = [0, 2]
    expected = _reference(x[good], rhs, recipe, bias, "float32", s)
    np.testing.assert_array_equal(out[good], expected)


def test_threads_do_not_change_results(lib):
    for recipe in (formats.W8A8, formats.W4A8(32), formats.W4A16(128), formats.FP8):
        x, rhs, bias, s = _data((3, 300, 512), "float32", 4, recipe)
        one, _ = native_matmul(lib, x, rhs, recipe, bias, threads=1)
        many, _ = native_matmul(lib, x, rhs, recipe, bias, threads=3)
        np.testing.assert_array_equal(one, many)


def test_concurrent_callers_share_the_pool(lib):
    """Calls from several threads at once (ctypes releases the GIL), each splitting N over helpers of the one
    shared pool, give the one-thread results: no call takes another's chunks or returns before its own are done."""
    cases = []
    for i, recipe in enumerate((formats.W8A8, formats.W4A16(64), formats.FP8)):
        x, rhs, bias, _ = _data((2, 640, 320), "float32", 10 + i, recipe)
        cases.append((x, rhs, recipe, bias, native_matmul(lib, x, rhs, recipe, bias, threads=1)[0]))
    failures = []

    def worker(j):
        for r in range(12):
            x, rhs, recipe, bias, want = cases[(j + r) % len(cases)]
            got, _ = native_matmul(lib, x, rhs, recipe, bias, threads=2 + r % 3)
            if not np.array_equal(got, want):
                failures.append((j, r, recipe.tag))

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a call did not return"
    assert failures == []


def _child_call(path, queue):
    lib = cpu.load(path)
    x, rhs, bias, _ = _data((1, 512, 256), "float32", 3, formats.W8A8)
    queue.put(native_matmul(lib, x, rhs, formats.W8A8, bias, threads=3)[0])


def test_forked_child_starts_with_an_empty_pool(lib):
    """A child forked after the parent's pool has threads inherits none of them: its parallel calls still
    complete with the parent's results (the pool starts empty there, pthread_atfork, and a call never waits for
    a helper that has not started)."""
    x, rhs, bias, _ = _data((1, 512, 256), "float32", 3, formats.W8A8)
    want, _ = native_matmul(lib, x, rhs, formats.W8A8, bias, threads=3)  # the parent's pool has threads now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    path = next(p for p, built in ((cpu.library_path(), cpu.library()), (cpu.library_path(openmp=True), cpu.library(openmp=True)),
                                   (_portable_path(), _portable())) if built is lib)
    child = ctx.Process(target=_child_call, args=(path, queue))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("act", ["float32", "bfloat16", "float16"])
def test_quantize_rows(lib, qtype, act):
    """Codes and scales equal numerics' on tricky values: ties, subnormals, saturation, zero rows."""
    fmt = formats.W8A8.lhs if qtype == "int8" else formats.FP8.lhs
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 70)).astype(np.float32)
    x[1] = 0
    x[2, :4] = [1e-40, -1e-39, 3e-38, 0.5]  # subnormals flushed
    x[3] = np.float32(127) * np.arange(70, dtype=np.float32) / 64  # halfway codes
    x[4, :3] = [448 * 3 * 2.0**-10, -3 * 2.0**-10, 1e-3]  # e4m3 subnormal ties
    x = x.astype(DT[act])
    kp = 72
    codes = np.zeros((6, kp), np.int8 if qtype == "int8" else ml_dtypes.float8_e4m3fn)
    scales = np.zeros(6, np.float32)
    bad = lib.qk_quantize_rows(_ptr(x), cpu.DTYPES[act], 6, 70, kp, cpu.KINDS[qtype], None, _ptr(codes), _ptr(scales))
    assert bad == 0
    ref = fmt.quantize(np.asarray(x))
    np.testing.assert_array_equal(scales, ref.scale)
    np.testing.assert_array_equal(codes[:, :70].view(np.uint8), np.asarray(ref.qvalue).view(np.uint8))
    assert not codes[:, 70:].view(np.uint8).any()


def test_large_k_exact_accumulators(lib):
    """K where the raw u8 x s8 sums wrap past 2**31 (K * 255 * 127): the accumulators are still exact."""
    k = 70000
    x = np.full((2, k), 1.0, np.float32)
    x[1] = -1.0
    w = np.full((3, k), 1.0, np.float32)
    rhs = reference.quantize(w, formats.W8A8.rhs)
    out, _ = native_matmul(lib, x, rhs, formats.W8A8)
    np.testing.assert_array_equal(out, _reference(x, rhs, formats.W8A8, None, "float32"))


def test_rejects_bad_arguments(lib):
    x = np.zeros((2, 64), np.float32)
    out = np.zeros((2, 4), np.float32)
    w = np.zeros((4, 32), np.int8)
    s = np.ones((4, 1), np.float32)
    rc = lib.qk_linear_float(_ptr(x), 0, 2, 64, 64, _ptr(w), cpu.KINDS["int4"], 4, _ptr(s), None, 48, None, _ptr(out),
                             0, 1)
    assert rc == cpu.EINVAL
    with pytest.raises(ValueError, match="qk_linear_float"):
        cpu.check(rc, "qk_linear_float")
    assert lib.qk_linear_float(_ptr(x), 7, 2, 64, 64, _ptr(w), 0, 4, _ptr(s), None, 0, None, _ptr(out), 0, 1) == cpu.EINVAL


def test_cache_key_and_atomic_build(tmp_path, monkeypatch):
    """A fresh cache builds once; a second call reuses the file; a compile error is a clear BuildError."""
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    src = tmp_path / "ok.c"
    src.write_text("int qk_one(void) { return 1; }\n")
    first = build.shared_library("probe", [src])
    assert first.parent == tmp_path and first.is_file()
    mtime = first.stat().st_mtime_ns
    assert build.shared_library("probe", [src]) == first and first.stat().st_mtime_ns == mtime
    src.write_text("int qk_one(void) { return 2; }\n")
    assert build.shared_library("probe", [src]) != first
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    bad = tmp_path / "bad.c"
    bad.write_text("int broken( {\n")
    with pytest.raises(build.BuildError, match="compiling bad with .* failed"):
        build.shared_library("bad", [bad])
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(build.BuildError, match="does not run"):
        build.shared_library("probe2", [src])
