"""'torch-cpu-native' (torch_bindings/native.py): the native C kernels through the torch binding. The numbers
are the conformance suite's (tests/test_conformance.py runs this backend through every case); here: what
the binding adds around the library call, selection by M, and what happens without a compiler."""

from __future__ import annotations

import pytest
import torch

import qkernels as qk
from qkernels import dispatch
from qkernels.kernels import cpu as native_cpu
from torch_bindings import native

pytestmark = pytest.mark.skipif(native_cpu.unavailable() is not None, reason=str(native_cpu.unavailable()))

torch.manual_seed(0)

RECIPES = [qk.W8A8, qk.W4A8(32), qk.W8A16, qk.W4A16(64), qk.W4A16(32, zero_point=True), qk.FP8, qk.FP8A16]


def _reference(x: torch.Tensor, w_q, bias: torch.Tensor | None) -> torch.Tensor:
    with qk.use_backend("reference"):
        return qk.linear(x, w_q, bias)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_decode_calls_run_native_with_the_reference_numbers(recipe) -> None:
    """M <= MAX_M picks the native kernels in every float dtype (but bfloat16 weight-only calls of more than
    PACKED_ABOVE_M rows that torch's packed kernels take); 3-D, non-contiguous input and a bias in the
    activations' dtype; integer recipes bit-exact, the others within the conformance tolerance."""
    w_q = qk.quantize(torch.randn(40, 96), recipe)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 96, 3, dtype=dtype).transpose(1, 2)  # (2, 3, 96), not contiguous
        bias = torch.randn(40, dtype=dtype)
        choice = qk.explain(x, w_q)
        packed_serves = {v.implementation.name: v.reason for v in choice.verdicts}.get("torch-cpu-packed", "") is None
        assert choice.chosen.name == ("torch-cpu-packed" if packed_serves else "torch-cpu-native"), str(choice)
        y, want = qk.linear(x, w_q, bias), _reference(x, w_q, bias)
        assert y.shape == (2, 3, 40) and y.dtype == dtype
        if packed_serves:
            continue  # torch's packed kernels' numbers: tests/test_torch_speed.py and the conformance suite
        if recipe.accumulation.integer:
            assert torch.equal(y, want), (recipe.name, dtype)
        else:
            torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_bf16_weight_only_calls_above_the_gemv_rows_go_to_torchs_packed_kernels() -> None:
    w_q = qk.quantize(torch.randn(64, 128), qk.W4A16(32))
    x = torch.randn(native.PACKED_ABOVE_M + 1, 128, dtype=torch.bfloat16)
    choice = qk.explain(x, w_q)
    assert choice.chosen.name == "torch-cpu-packed"
    assert "faster" in {v.implementation.name: v.reason for v in choice.verdicts}["torch-cpu-native"]
    assert qk.explain(x[:native.PACKED_ABOVE_M], w_q).chosen.name == "torch-cpu-native"  # decode: measured faster
    assert qk.explain(x.half(), w_q).chosen.name == "torch-cpu-native"  # fp16: the packed kernels take bf16 only


def test_tall_calls_go_to_the_blas_paths_with_the_reason() -> None:
    w_q = qk.quantize(torch.randn(32, 64), qk.W8A8)
    tall = torch.randn(native.MAX_M + 1, 64)
    choice = qk.explain(tall, w_q)
    assert choice.chosen.name != "torch-cpu-native"
    reason = {v.implementation.name: v.reason for v in choice.verdicts}["torch-cpu-native"]
    assert f"M={native.MAX_M + 1} > {native.MAX_M}" in reason
    assert torch.equal(qk.linear(tall, w_q), _reference(tall, w_q, None))


def test_static_activations_run_on_their_calibrated_codes() -> None:
    """`w8a8-static` / `fp8-static`: the op quantizes with the calibrated scale, the library multiplies the codes."""
    batches = [torch.randn(4, 64) for _ in range(3)]
    for recipe in (qk.W8A8(static=True), qk.FP8(static=True)):
        model = qk.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 24)), recipe).model
        qk.calibrate(model, batches)
        x = torch.randn(3, 64)
        with torch.no_grad(), qk.use_backend("torch-cpu-native"):  # raises if it does not serve the call
            y = model(x)
        with torch.no_grad():
            with qk.use_backend("reference"):
                want = model(x)
        if recipe.accumulation.integer:
            assert torch.equal(y, want)
        else:
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_nonfinite_activations_raise_the_formats_error() -> None:
    w_q = qk.quantize(torch.randn(16, 32), qk.W4A8(32))
    x = torch.randn(3, 32)
    x[1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf in 1 row"):
        qk.linear(x, w_q)


def test_explain_names_the_layout() -> None:
    w_q = qk.quantize(torch.randn(16, 32), qk.W4A16(32))
    assert "layout canonical" in str(qk.explain(torch.randn(1, 32), w_q))


def test_without_a_compiler_the_torch_paths_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """The build's reason is what `supports` returns (explain shows it); the call runs elsewhere, same numbers."""
    w_q = qk.quantize(torch.randn(16, 32), qk.W8A8)
    x = torch.randn(2, 32)
    monkeypatch.setattr(native.native, "unavailable", lambda openmp=False: "native CPU kernels unavailable: no C compiler found")
    dispatch.invalidate()
    try:
        choice = qk.explain(x, w_q)
        assert choice.chosen.name == "torch-cpu-w8a8"
        assert "no C compiler found" in {v.implementation.name: v.reason for v in choice.verdicts}["torch-cpu-native"]
        assert torch.equal(qk.linear(x, w_q), _reference(x, w_q, None))
    finally:
        monkeypatch.undo()
        dispatch.invalidate()


def test_compiled_model_runs_the_native_kernel_inside_the_op() -> None:
    model = qk.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)),
                         qk.W4A8(32)).model
    x = torch.randn(2, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)(x)
    assert torch.equal(eager, compiled)


def _layer(recipe, bias: bool = True, dtype=torch.float32) -> qk.QLinear:
    lin = torch.nn.Linear(96, 40, bias=bias).to(dtype)
    return qk.quantize_(torch.nn.Sequential(lin), recipe).model[0]


def _full_path(layer: qk.QLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's output through qk.linear (the op's full path, no runner)."""
    return qk.linear(x, layer.weight, layer.bias)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_runs_a_prepared_call_with_the_same_numbers(recipe, dtype) -> None:
    """The second eager call of an activation shape runs a prepared call (ops.Runner): the native kernels'
    fixed library call where they serve it, else the bound call without binding again (torch's packed
    kernels in bf16), with the full path's results (the same kernel: equal), bias in the model's dtype
    included: decode's per-call host work."""
    layer = _layer(recipe, dtype=dtype)
    with torch.no_grad():
        for shape in ((1, 96), (2, 3, 96), (5, 96)):
            x = torch.randn(*shape, dtype=dtype)
            native_serves = qk.explain(x, layer.weight, layer.bias).chosen.name == "torch-cpu-native"
            first, second = layer(x), layer(x)
            runner = layer._runners[(x.shape, x.dtype, x.device, recipe.name)]
            assert runner and hasattr(runner.run, "fixed") == native_serves
            want = _full_path(layer, x)
            assert second.shape == (*shape[:-1], 40) and second.dtype == x.dtype
            assert torch.equal(first, want) and torch.equal(second, want)


def test_a_changed_weight_is_never_read_through_a_stale_runner() -> None:
    """In-place writes (load_state_dict, mul_) are read by the runner, which points into the tensors;
    replaced buffers (a new bias), a requested backend and a non-contiguous input leave it unused: each result
    is the full path's."""
    layer = _layer(qk.W8A8)
    x = torch.randn(1, 96)
    with torch.no_grad():
        layer(x), layer(x)
        other = _layer(qk.W8A8)
        layer.load_state_dict(other.state_dict())  # copies into the same buffers: versions change
        assert torch.equal(layer(x), _full_path(other, x))
        layer(x)
        layer.bias = torch.nn.Parameter(torch.randn(40))
        assert torch.equal(layer(x), _full_path(layer, x))
        layer.scale.mul_(2)
        assert torch.equal(layer(x), _full_path(layer, x))
        calls = []
        runner = layer._runners[(x.shape, x.dtype, x.device, "w8a8")]
        runner.run = lambda x, run=runner.run: calls.append(1) or run(x)
        layer(x)
        assert calls == [1]
        with qk.use_backend("torch-cpu-w8a8"):
            layer(x)
        xt = torch.randn(96, 1).t()  # (1, 96), not contiguous
        assert torch.equal(layer(xt), _full_path(layer, xt.contiguous()))
        assert calls == [1]


def test_nonfinite_rows_through_a_runner_raise_the_formats_error() -> None:
    layer = _layer(qk.W8A8)
    x = torch.randn(1, 96)
    with torch.no_grad():
        layer(x), layer(x)
        x[0, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN|non-finite|finite"):
            layer(x)


def test_runners_are_not_copied_or_saved(tmp_path) -> None:
    """A module's runners hold raw pointers into its tensors: deepcopy and torch.save give a module without
    them, which prepares its own (and reads its own weights)."""
    import copy

    model = torch.nn.Sequential(_layer(qk.W4A16(32)))
    x = torch.randn(1, 96)
    with torch.no_grad():
        model(x), model(x)
        twin = copy.deepcopy(model)
        assert len(twin[0]._runners) == 0
        twin[0].scale.mul_(3)
        assert not torch.equal(twin(x), model(x))
        torch.save(model, tmp_path / "m.pt")
        loaded = torch.load(tmp_path / "m.pt", weights_only=False)
        assert len(loaded[0]._runners) == 0 and torch.equal(loaded(x), model(x))


def test_without_openmp_the_default_build_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler without libgomp: the OpenMP build's failure leaves the default build (its own threads), not the
    slower torch paths."""
    real = native.native.unavailable
    monkeypatch.setattr(native.native, "unavailable",
                        lambda openmp=False: "no libgomp" if openmp else real())
    monkeypatch.setattr(native.native, "library", lambda openmp=False, real=native.native.library: (
        pytest.fail("the OpenMP build was loaded") if openmp else real()))
    dispatch.invalidate()
    try:
        layer = _layer(qk.W8A8)
        x = torch.randn(1, 96)
        assert qk.explain(x, layer.weight).chosen.name == "torch-cpu-native"
        with torch.no_grad():
            assert torch.equal(layer(x), layer(x)) and torch.equal(layer(x), _reference(x, layer.weight, layer.bias))
    finally:
        monkeypatch.undo()
        dispatch.invalidate()


def test_runners_of_a_replaced_weight_are_dropped() -> None:
    """A replaced buffer (or one moved by `.to()`) leaves the old tensors unreferenced by the module's runners:
    the next call prepares for the new ones and drops every runner of the old, other shapes' included."""
    layer = _layer(qk.W8A8)
    xa, xb = torch.randn(1, 96), torch.randn(2, 96)
    with torch.no_grad():
        layer(xa), layer(xb)
        old = layer.qvalue
        assert sum(1 for r in layer._runners.values() if r) == 2
        layer.qvalue = old.clone()
        assert torch.equal(layer(xa), _full_path(layer, xa))
        assert all(r.tensors[0] is layer.qvalue for r in layer._runners.values() if r)
        assert list(layer._runners) == [(xa.shape, xa.dtype, xa.device, "w8a8")]
