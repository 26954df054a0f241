"""Dispatch: registry, selection by priority, explain(), explicit backends and their errors."""

from __future__ import annotations

import importlib.util

import pytest

import qkernels as qk
from qkernels import dispatch
from qkernels.dispatch import BackendUnavailable, Implementation, Problem

FW = "dispatch-test"  # a framework of its own, so these registrations never meet real calls


def _problem(**kw) -> Problem:
    base = dict(recipe=qk.W8A8, m=16, n=32, k=64, act_dtype="float32", out_dtype="float32",
                framework=FW, platform="cuda:sm_90")
    return Problem(**(base | kw))


def _gpu_only(p: Problem) -> str | None:
    return None if p.device_kind == "cuda" else f"needs a CUDA GPU, platform is {p.platform}"


def _no_bias(p: Problem) -> str | None:
    return "bias is not fused" if p.has_bias else None


@pytest.fixture(scope="module", autouse=True)
def fake_impls():
    for name, prio, supports in (("fast.kernel", 100, _gpu_only), ("mid", 50, _no_bias)):
        dispatch.register(Implementation(name=name, framework=FW, priority=prio, supports=supports,
                                         run=lambda *a, _n=name: _n))


def test_highest_priority_that_supports_wins() -> None:
    assert dispatch.select(_problem()).name == "fast.kernel"
    assert dispatch.select(_problem(platform="cpu")).name == "mid"
    assert dispatch.select(_problem(platform="cpu", has_bias=True)).name == "reference"


def test_explain_lists_every_candidate_with_verdict_and_reason() -> None:
    e = qk.explain(_problem(platform="cpu", has_bias=True))
    names = [v.implementation.name for v in e.verdicts]
    assert names == ["fast.kernel", "mid", "reference"]
    reasons = {v.implementation.name: v.reason for v in e.verdicts}
    assert reasons == {"fast.kernel": "needs a CUDA GPU, platform is cpu", "mid": "bias is not fused", "reference": None}
    text = str(e)
    assert "-> reference" in text and "no: bias is not fused" in text and "chosen: reference" in text


def test_explicit_backend_that_cannot_serve_raises_with_its_reason() -> None:
    with pytest.raises(BackendUnavailable, match="fast.kernel: needs a CUDA GPU, platform is cpu"):
        dispatch.select(_problem(platform="cpu"), backend="fast")
    with qk.use_backend("mid"), pytest.raises(BackendUnavailable, match="bias is not fused"):
        dispatch.select(_problem(has_bias=True))


def test_explicit_backend_is_honoured_over_priority() -> None:
    assert dispatch.select(_problem(), backend="reference").name == "reference"
    with qk.use_backend("mid"):
        assert dispatch.select(_problem()).name == "mid"
    assert dispatch.select(_problem()).name == "fast.kernel"  # context restored


def test_environment_variable(monkeypatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select(_problem()).name == "reference"
    with qk.use_backend("mid"):  # the context manager is more specific than the environment
        assert dispatch.select(_problem()).name == "mid"


def test_unknown_backend_lists_what_exists() -> None:
    with pytest.raises(BackendUnavailable, match="no implementation named 'nope'.*available: .*fast.kernel"):
        dispatch.select(_problem(), backend="nope")


def test_prefix_matches_a_family_only_at_a_dot() -> None:
    assert dispatch.select(_problem(), backend="fast").name == "fast.kernel"
    with pytest.raises(BackendUnavailable, match="no implementation named 'fas'"):
        dispatch.select(_problem(), backend="fas")


def test_registering_invalidates_cached_choices() -> None:
    p = _problem(m=3)
    assert dispatch.select(p).name == "fast.kernel"
    dispatch.register(Implementation(name="faster", framework=FW, priority=200, supports=lambda p: None,
                                     run=lambda *a: None))
    try:
        assert dispatch.select(p).name == "faster"
    finally:
        dispatch._REGISTRY.impls.pop((FW, dispatch.Op.QMATMUL, "faster"))
        dispatch._REGISTRY.version += 1
    assert dispatch.select(p).name == "fast.kernel"


def test_problem_refuses_overflowing_k_and_negative_sizes() -> None:
    with pytest.raises(ValueError, match="K=200000 exceeds 133144"):
        _problem(k=200_000)
    with pytest.raises(ValueError, match="m=-1 is negative"):
        _problem(m=-1)
    assert _problem(recipe=qk.W4A16(128), k=200_000).k == 200_000  # float accumulation: no bound


def test_reference_serves_everything_and_runs() -> None:
    import numpy as np

    from qkernels import reference

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 40)).astype(np.float32), rng.standard_normal((5, 40)).astype(np.float32)
    for recipe in (qk.W8A8, qk.W8A16, qk.W4A16(32, zero_point=True), qk.W4A8(32)):
        p = _problem(recipe=recipe, m=3, n=5, k=40, framework="numpy", platform="cpu")
        call = dispatch.bind(p)
        assert call.implementation.name == "reference"
        wq = reference.quantize(w, recipe.rhs)
        np.testing.assert_array_equal(call.run(x, wq.operand(), None), reference.qmatmul(x, wq, recipe))


def test_dispatch_names_no_dtype() -> None:
    """Adding a format (fp8, ...) must need no change here: dispatch never mentions a dtype or recipe."""
    import inspect
    import re

    code = "\n".join(l for l in inspect.getsource(dispatch).splitlines() if not l.lstrip().startswith("#"))
    code = re.sub(r'"""[\s\S]*?"""', "", code)
    for word in ("int8", "int4", "uint4", "bfloat16", "float16", "W8A8", "W4A16", "W4A8", "W8A16"):
        assert word not in code, word


def _names(explanation: dispatch.Explanation) -> set[str]:
    return {v.implementation.name for v in explanation.verdicts}


def test_explain_lists_only_the_recipes_automatic_candidates_by_default_torch() -> None:
    """A W4A16 call on CPU tensors: torch-cpu-packed (bf16), torch-cpu-native, torch-cpu, the reference and the W4A16
    Triton kernel; the other families' kernels and the interpreter variants only with verbose=True (or when requested)."""
    torch = pytest.importorskip("torch")
    from torch_bindings import native

    w_q = qk.quantize(torch.randn(16, 64), qk.W4A16(32))
    x = torch.randn(native.PACKED_ABOVE_M + 1, 64, dtype=torch.bfloat16)  # above the native GEMV's rows
    default = qk.explain(x, w_q)
    expected = {"torch-cpu-packed", "torch-cpu-native", "torch-cpu", "reference"} | (
        {"triton.w4a16"} if importlib.util.find_spec("triton") else set())
    assert _names(default) == expected and default.chosen.name == "torch-cpu-packed"
    everything = {i.name for i in dispatch.registered("torch", dispatch.Op.QMATMUL)}
    verbose = qk.explain(x, w_q, verbose=True)
    assert _names(verbose) == everything and default.hidden == len(everything) - len(expected) > 0
    assert f"({default.hidden} more that do not serve w4a16-g32" in str(default)
    if "triton.interpret.w4a16" in everything:
        requested = qk.explain(x, w_q, backend="triton.interpret.w4a16")
        assert _names(requested) == expected | {"triton.interpret.w4a16"}


def test_explain_lists_only_the_recipes_automatic_candidates_by_default_jax() -> None:
    jnp = pytest.importorskip("jax.numpy")
    w_q = qk.quantize(jnp.ones((64, 16)), qk.W4A16(32), contracting_axes=(0,))
    args = (jnp.ones((3, 64), jnp.bfloat16), w_q, (((1,), (0,)), ((), ())))
    default = qk.explain(*args)
    from jax_bindings import native

    expected = {"xla", "xla-native", "reference.callback", "reference", "pallas.tpu.w4a16", "pallas.gpu.w4a16"}
    assert _names(default) == expected
    assert default.chosen.name == ("xla-native" if native.unavailable() is None else "xla")
    everything = {i.name for i in dispatch.registered("jax", dispatch.Op.QMATMUL)}
    assert _names(qk.explain(*args, verbose=True)) == everything
    assert default.hidden == len(everything) - len(expected) > 0
    requested = qk.explain(*args, backend="pallas.interpret")
    assert _names(requested) == expected | {"pallas.interpret"} and requested.chosen.name == "pallas.interpret"
