"""The PyTorch speed machinery, checked for what it computes (speed itself is measured in bench/):
the direct eager call, the packed CPU layouts and their cache, and the slow-path warnings."""

from __future__ import annotations

import warnings

import pytest
import torch

import qkernels as qk
from torch_bindings import functional, native, ops, packed

torch.manual_seed(0)
TALL = native.MAX_M_FLOAT + 4
"""Rows above the native kernels' decode sizes: the torch paths these tests are about serve such calls."""


def _layer(recipe, n: int = 32, k: int = 64, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(k, n)).to(dtype)
    return qk.quantize_(model, recipe).model


@pytest.mark.parametrize("recipe", [qk.W8A8, qk.W8A16, qk.W4A16(32), qk.W4A8(32), qk.FP8],
                         ids=lambda r: r.name)
def test_direct_eager_call_equals_the_custom_op(recipe) -> None:
    """A plain eager call skips the dispatcher (`functional._direct`) and gives the op's exact result;
    with autograd in play the op runs (gradients still flow)."""
    w_q = qk.quantize(torch.randn(24, 40), recipe)
    x, bias = torch.randn(3, 5, 40), torch.randn(24)
    with torch.no_grad():
        direct = qk.linear(x, w_q, bias)
    via_op = ops.LINEAR(x.reshape(15, 40), w_q.qvalue, w_q.scale, w_q.zero_point, bias, recipe.name, None)
    assert torch.equal(direct, via_op.reshape(3, 5, 24))
    xg = x.clone().requires_grad_(True)
    assert not functional._direct(xg, None)
    y = qk.linear(xg, w_q, bias)
    y.sum().backward()
    assert xg.grad is not None and torch.equal(y.detach(), direct)


def test_direct_path_is_off_under_modes_and_compile() -> None:
    x = torch.randn(2, 8)
    assert functional._direct(x, None)
    with torch.autograd.profiler.profile():
        assert not functional._direct(x, None)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert not functional._direct(x, None)
    assert not functional._direct(torch.nn.Parameter(x), None)  # autograd needed


def test_qlinear_forward_checks_like_linear() -> None:
    layer = _layer(qk.W8A8)[0]
    with pytest.raises(ValueError, match="in_features=63"):
        layer(torch.randn(2, 63))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        layer(torch.ones(2, 64, dtype=torch.int32))
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), qk.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("recipe", [qk.W8A16, qk.W4A16(128), qk.W4A16(64, zero_point=True)], ids=lambda r: r.name)
def test_packed_layout_is_made_once_and_follows_the_weight(recipe) -> None:
    """bf16 activations on CPU run torch-cpu-packed; its layout is made on the first call and reused,
    and rebuilt when the weight's tensors are written in place (load_state_dict) or replaced."""
    model = _layer(recipe, n=48, k=256, dtype=torch.bfloat16)
    layer = model[0]
    x = torch.randn(TALL, 256, dtype=torch.bfloat16)
    assert qk.explain(x, layer.weight, layer.bias).chosen.name == "torch-cpu-packed"
    assert "layout " + packed.layout_of(recipe).name in str(qk.explain(x, layer.weight))
    made = []
    real = packed.layout_of(recipe).make

    def counting(*args):
        made.append(1)
        return real(*args)

    layout = packed.layout_of(recipe)
    object.__setattr__(layout, "make", counting)
    try:
        packed._CACHE.clear()
        with torch.no_grad():
            y1 = layer(x)
            y2 = layer(x)
            assert len(made) == 1 and torch.equal(y1, y2)
            other = _layer(recipe, n=48, k=256, dtype=torch.bfloat16)
            model.load_state_dict(other.state_dict())  # copies into the same buffers: versions change
            y3 = layer(x)
            assert len(made) == 2
            expect = qk.linear(x, other[0].weight, other[0].bias)
            assert torch.equal(y3, expect)
    finally:
        object.__setattr__(layout, "make", real)
    with qk.use_backend("torch-cpu"), torch.no_grad():
        generic = layer(x).float()
    assert torch.allclose(y3.float(), generic, rtol=3e-2, atol=3e-2)


def test_packed_layouts_refuse_what_the_kernels_cannot_take() -> None:
    x = torch.randn(TALL, 40, dtype=torch.bfloat16)
    why = qk.explain(x, qk.quantize(torch.randn(32, 40), qk.W8A16))
    assert why.chosen.name == "torch-cpu" and "K=40" in str(why)
    why = qk.explain(torch.randn(TALL, 64, dtype=torch.bfloat16), qk.quantize(torch.randn(20, 64), qk.W4A16(32)))
    assert why.chosen.name == "torch-cpu" and "N=20" in str(why)
    why = qk.explain(torch.randn(TALL, 64), qk.quantize(torch.randn(32, 64), qk.W4A16(32)))
    assert "bfloat16 only" in str(why)


@pytest.mark.parametrize("recipe,dtype,slow", [
    (qk.W8A16, torch.float32, "dequantizes the whole weight"),
    (qk.W4A16(32), torch.float16, "dequantizes the whole weight"),
    (qk.FP8, torch.float32, "emulated"),
    (qk.W8A8, torch.float32, None),
    (qk.W4A16(32), torch.bfloat16, None),
], ids=lambda v: getattr(v, "name", str(v)))
def test_known_slow_paths_warn_once_and_explain_says_so(recipe, dtype, slow) -> None:
    w_q = qk.quantize(torch.randn(32, 64), recipe)
    x = torch.randn(TALL + 3, 64, dtype=dtype)  # a call shape no other test makes: the warning is per distinct call
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        qk.linear(x, w_q)
        qk.linear(x, w_q)
    warned = [w for w in seen if issubclass(w.category, qk.SlowPathWarning)]
    text = str(qk.explain(x, w_q))
    if slow is None:
        assert not warned and "slow:" not in text
    else:
        assert len(warned) == 1 and slow in str(warned[0].message) and "faster" in str(warned[0].message)
        assert f"slow: " in text and slow in text


def test_compiled_model_is_one_graph_across_layer_shapes_and_recipes() -> None:
    """torch.compile sees one opaque op per layer: layers of different shapes and recipes make one graph
    (no graph break, no recompile per layer shape), and its output equals eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 48),
                                torch.nn.ReLU(), torch.nn.Linear(48, 32))
    qk.quantize_(model, qk.W8A8, filter_fn=lambda m, name: name == "0")
    qk.quantize_(model, qk.W4A16(32), filter_fn=lambda m, name: name == "2")
    qk.quantize_(model, qk.W8A16, filter_fn=lambda m, name: name == "4")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = compiled(x)
        compiled(torch.randn(5, 64))
        assert torch.equal(y, model(x))
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("m", [1, 7, 70], ids=lambda m: f"M{m}")
def test_w4a8_on_unpacked_codes_equals_the_generic_path(m: int) -> None:
    w_q = qk.quantize(torch.randn(48, 500), qk.W4A8(32))
    x, bias = torch.randn(m, 500), torch.randn(48)
    assert qk.explain(x, w_q, bias).chosen.name == ("torch-cpu-native" if m <= native.MAX_M and native.native.unavailable() is None
                                                       else "torch-cpu-w4a8")
    with torch.no_grad(), qk.use_backend("torch-cpu-w4a8"):
        fast = qk.linear(x, w_q, bias)
        with qk.use_backend("torch-cpu"):
            generic = qk.linear(x, w_q, bias)
    assert torch.equal(fast, generic)
    with qk.use_backend("torch-cpu"):
        assert "slow: " in str(qk.explain(x, w_q, bias))
