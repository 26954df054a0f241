"""One conformance suite for every backend runnable here, against the NumPy reference.

The backends are discovered from `dispatch.registered(...)` (one test id per backend, e.g.
`torch:torch-cpu`, `jax:xla`, `torch:triton.interpret.w8a8`): every implementation that serves some
shipped recipe on a platform this machine has (CPU; CUDA for the compiled Triton kernels when a GPU
is present). Each runs what it declares it serves, through the public entry points where they reach
the case (`qk.quantize` + `qk.linear` for torch, `qk.quantize` + `qk.dot_general` under `jax.jit` for
JAX) and through `dispatch.bind(...).run` otherwise (bias on JAX, output dtype != activation dtype
on torch, batched weights, pre-quantized activations):

- integer accumulators (`Bound.accumulate`, where the implementation has one) == `reference.accumulators`;
- integer recipes' outputs == `reference.qmatmul` where the backend honours DESIGN.md section 4's
  rescale order; backends compiled by XLA (framework 'jax', not a host callback) contract the
  epilogue's multiply-adds into FMAs (`jax_bindings.arrays`), so theirs are within
  `testing.fma_bound` wherever a multiply feeds an add (a bias, W4A8's group sum) and == otherwise;
  float-accumulating recipes (weight-only, and fp8 x fp8) within `testing.assert_close`;
- awkward shapes (M=1, odd K, K=1, not block multiples), zero-size dims, every group size, bias
  on/off, every (activation, output) dtype pair the backend accepts, batched (3-D) weights, and a
  backend that refuses a case says why through dispatch.

Also here: recipes defined only in this file (int6 / int3 weights, an int8 x int6 integer recipe, an
accumulation no backend implements) run on the generic backends, and the bad-input errors.
Interpreter backends (not chosen automatically) get fewer and smaller cases: they are slow.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkernels as qk
from qkernels import calibration, dispatch, numerics, reference, testing
from qkernels.dispatch import Implementation, Problem
from qkernels.formats import Accumulation, OperandFormat, QOperand, Recipe
from qkernels.numerics import GROUP_SIZES, INT8, Granularity
from qkernels.reference import np_dtype

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
FLOATS = ("float32", "bfloat16", "float16")

# ---------------------------------------------------------------- recipes

# Formats defined here only, registering nothing in the package: the generic backends execute
# their definitions, the kernel backends refuse them by tag.
INT6 = numerics.int_type(6)
INT3 = numerics.int_type(3)
INT8_ROW = OperandFormat(qtype=INT8, granularity=Granularity.ROW)
W6A16 = Recipe(tag="w6a16", lhs=None, rhs=OperandFormat(qtype=INT6, granularity=Granularity.GROUP, group_size=64))
W3A16 = Recipe(tag="w3a16", lhs=None, rhs=OperandFormat(qtype=INT3, granularity=Granularity.ROW))
W6A8 = Recipe(tag="w6a8", lhs=INT8_ROW, rhs=OperandFormat(qtype=INT6, granularity=Granularity.ROW))
CUSTOM = (W6A16, W3A16, W6A8)

SHIPPED = (qk.W8A8, qk.W8A16, *(qk.W4A16(g) for g in GROUP_SIZES), *(qk.W4A16(g, zero_point=True) for g in GROUP_SIZES),
           *(qk.W4A8(g) for g in GROUP_SIZES), qk.FP8, qk.FP8A16)
CATALOGUE = (*SHIPPED, *CUSTOM)
FAMILIES = (qk.W8A8, qk.W8A16, qk.W4A16(32), qk.W4A16(64, zero_point=True), qk.W4A8(32), qk.FP8, qk.FP8A16)
"""One shipped recipe per family (small groups), for the fixed cases; the recipes defined here have
tests of their own below and are drawn by the hypothesis tests."""


# ---------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    recipe: Recipe
    m: int
    n: int
    k: int
    batch: int | None = None  # batched (3-D) weights (B, N, K) and activations (B, M, K)
    lead: tuple[int, ...] = ()  # leading activation axes (*lead, M, K) against a 2-D weight
    act: str = "float32"
    out: str = "float32"
    bias: bool = False
    seed: int = 0

    @property
    def id(self) -> str:
        b = f"B{self.batch}-" if self.batch is not None else "".join(f"L{n}-" for n in self.lead)
        return (f"{self.recipe.name}-{b}M{self.m}-N{self.n}-K{self.k}-{self.act}->{self.out}"
                f"{'-bias' if self.bias else ''}")


# ---------------------------------------------------------------- backends

UNFUSED_EPILOGUE = {"xla-native"}
"""JAX implementations whose rescale XLA does not compile (native C, built without FMA contraction): their
integer recipes' outputs are compared with ==, as the reference's."""


@dataclass(frozen=True)
class Backend:
    """A registered implementation, the framework whose arrays it takes, and where it runs here."""

    impl: Implementation
    framework: str  # 'numpy' (the framework-neutral reference), 'torch' or 'jax'
    platform: str
    device: str = "cpu"  # torch device of its tensors

    @property
    def id(self) -> str:
        return f"{self.framework}:{self.impl.name}"

    @property
    def name(self) -> str:
        return self.impl.name

    @property
    def slow(self) -> bool:
        """Interpreter variants (never chosen automatically) run kernels op by op on the host."""
        return not self.impl.automatic

    @property
    def fused_epilogue(self) -> bool:
        """XLA compiles it, and XLA contracts the f32 epilogue's multiply-adds (jax_bindings.arrays)."""
        if self.framework != "jax" or self.name in UNFUSED_EPILOGUE:
            return False
        from jax_bindings.implementations import Execution, execution_of

        return execution_of(self.impl) is not Execution.HOST

    @property
    def recipes(self) -> tuple[Recipe, ...]:
        """The catalogue's recipes this implementation declares it serves."""
        return tuple(r for r in CATALOGUE if self.impl.serves.reason(r) is None)

    def problem(self, case: Case, *, lhs_quantized: bool = False) -> Problem:
        return Problem(recipe=case.recipe, m=case.m * math.prod(case.lead), n=case.n, k=case.k, batch=case.batch,
                       act_dtype="int8" if lhs_quantized else case.act, out_dtype=case.out, has_bias=case.bias,
                       lhs_quantized=lhs_quantized, framework=self.framework, platform=self.platform)

    def dtype_pairs(self, recipe: Recipe) -> tuple[tuple[str, str], ...]:
        """(activation, output) dtype pairs it accepts for `recipe` (dispatch's verdicts say)."""
        return tuple((a, o) for a in FLOATS for o in FLOATS
                     if self.impl.verdict(self.problem(Case(recipe=recipe, m=4, n=16, k=64, act=a, out=o))) is None)


def _platforms(framework: str) -> list[tuple[str, str]]:
    """(platform, torch device) pairs this machine offers a framework's arrays on."""
    if framework == "torch":
        import torch

        from torch_bindings.ops import platform_of

        out = [("cpu", "cpu")]
        if torch.cuda.is_available():
            out.append((platform_of(torch.device("cuda")), "cuda"))
        return out
    if framework == "jax":
        from jax_bindings.implementations import current_platform

        return [(current_platform(), "cpu")]
    return [("cpu", "cpu")]


def discover() -> list[Backend]:
    """Every registered qmatmul implementation that serves some shipped recipe on a platform here.

    The framework-neutral reference is run with NumPy arrays and through the torch op (which hands
    it NumPy); JAX reaches it only as 'reference.callback', listed on its own.
    """
    found: list[Backend] = []
    for framework in ("numpy", *(("torch",) if HAS_TORCH else ()), *(("jax",) if HAS_JAX else ())):
        for impl in dispatch.registered(framework, dispatch.Op.QMATMUL):
            if framework == "jax" and impl.framework == dispatch.ANY_FRAMEWORK:
                continue
            if framework == "numpy" and impl.framework != dispatch.ANY_FRAMEWORK:
                continue
            for platform, device in _platforms(framework):
                backend = Backend(impl, framework, platform, device)
                if any(backend.dtype_pairs(r) for r in SHIPPED if impl.serves.reason(r) is None):
                    found.append(backend)
                    break
    return found


BACKENDS = discover()


def backends(where: Any = None) -> list[Any]:
    return [pytest.param(b, id=b.id) for b in BACKENDS if where is None or where(b)]


def examples(backend: Backend) -> int:
    """Hypothesis examples for a backend: the profile's, a third of it for interpreters."""
    n = settings().max_examples
    return max(2, n // 3) if backend.slow else n


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Data:
    """A case's NumPy operands and the reference's quantized weight."""

    x: np.ndarray  # activations in the case's dtype, (B?, M, K)
    w: np.ndarray  # f32 weight (B?, N, K)
    bias: np.ndarray | None
    rq: reference.RefQuantized

    @classmethod
    def of(cls, case: Case) -> Data:
        rng = np.random.default_rng(case.seed)
        batch = () if case.batch is None else (case.batch,)
        x = testing.activations(rng, (*batch, *case.lead, case.m, case.k)).astype(np_dtype(case.act))
        w = testing.weights(rng, (*batch, case.n, case.k))
        bias = (rng.standard_normal(case.n) * 0.1).astype(np.float32) if case.bias else None
        return cls(x, w, bias, reference.quantize(w, case.recipe.rhs))


def expect_output(backend: Backend, case: Case, data: Data, y: np.ndarray, dtype: str, lhs: Any = None) -> None:
    """`y` (a backend's output as f32, of dtype name `dtype`) against `reference.qmatmul`."""
    recipe = case.recipe
    lhs = data.x if lhs is None else lhs
    expected = reference.qmatmul(lhs, data.rq, recipe, bias=data.bias, out_dtype=case.out)
    assert dtype == case.out, f"{backend.id}: output dtype {dtype}, expected {case.out}"
    what = f"{backend.id} {case.id}"
    contractible = recipe.accumulation.grouped or data.bias is not None  # a multiply feeding an add
    if not recipe.accumulation.integer:
        testing.assert_close(y, expected, *testing.float_operands(lhs, data.rq, recipe, case.act), case.out,
                             data.bias, what=what)
    elif backend.fused_epilogue and contractible:
        bound = testing.fma_bound(testing.epilogue_terms(lhs, data.rq, recipe, data.bias), case.out)
        testing.assert_within(y, expected, bound, what=what)
    else:
        assert y.shape == expected.shape, what
        np.testing.assert_array_equal(y, expected.astype(np.float32), err_msg=what)


def expect_codes(backend: Backend, got: QOperand, data: Data) -> None:
    """A framework's `qk.quantize` stores exactly the reference's codes, scales and zero points."""
    want = data.rq.operand()
    for field, g, r in zip(want._fields, got, want):
        assert (g is None) == (r is None), f"{backend.id}: {field}"
        if r is not None:
            np.testing.assert_array_equal(to_numpy(g), r, err_msg=f"{backend.id}: {field}")


# ---------------------------------------------------------------- running a case


def to_numpy(y: Any) -> np.ndarray:
    """Any framework's array as NumPy (floats as f32; torch bf16 has no NumPy dtype)."""
    if HAS_TORCH:
        import torch

        if isinstance(y, torch.Tensor):
            y = y.detach().cpu()
            return (y.float() if y.is_floating_point() else y).numpy()
    y = np.asarray(y)
    return y.astype(np.float32) if y.dtype.kind == "f" or y.dtype == np_dtype("bfloat16") else y


def dtype_of(y: Any) -> str:
    return str(y.dtype).removeprefix("torch.")


def native(backend: Backend, x: Any) -> Any:
    """A NumPy array (or QOperand, or None) as the backend's framework's array, same dtype."""
    if x is None:
        return None
    if isinstance(x, (QOperand, reference.RefQuantized)):
        op = x.operand() if isinstance(x, reference.RefQuantized) else x
        return QOperand(*(native(backend, a) for a in op))
    if backend.framework == "torch":
        import torch

        from torch_bindings.arrays import DTYPES

        name = "bfloat16" if x.dtype == np_dtype("bfloat16") else x.dtype.name
        wide = x.astype(np.float32) if x.dtype.kind == "V" else x  # ml_dtypes' bf16 / fp8: exact as f32
        return torch.from_numpy(np.ascontiguousarray(wide)).to(device=backend.device, dtype=DTYPES[name])
    if backend.framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)
    return x


def bind(backend: Backend, case: Case, **kw: Any) -> dispatch.Bound:
    return dispatch.bind(backend.problem(case, **kw), backend.name)


def bound_array(backend: Backend, x: Any) -> Any:
    """What a bound call of the backend takes: its framework's arrays, or NumPy for a
    framework-neutral implementation (bindings convert for it, `bind` does not)."""
    return x if backend.impl.framework == dispatch.ANY_FRAMEWORK else native(backend, x)


def run(backend: Backend, case: Case, data: Data, *, public: bool = True) -> tuple[np.ndarray, str]:
    """The backend's output for `case` as (f32 values, dtype name), through the public entry point
    where it reaches the case (unless not `public`); the weight is quantized by the framework's
    `qk.quantize` there, else by the reference."""
    if public and backend.framework == "torch" and case.batch is None and case.out == case.act:
        import torch

        w_q = qk.quantize(torch.from_numpy(data.w).to(backend.device), case.recipe)
        expect_codes(backend, w_q.operand(), data)
        with qk.use_backend(backend.name):
            assert qk.explain(native(backend, data.x), w_q).chosen is backend.impl
            y = qk.linear(native(backend, data.x), w_q, native(backend, data.bias))
    elif public and backend.framework == "jax" and data.bias is None:
        batched = case.batch is not None
        w_q = qk.quantize(native(backend, data.w), case.recipe, contracting_axes=(data.w.ndim - 1,),
                          batch_axes=(0,) if batched else ())
        expect_codes(backend, w_q.operand(), data)
        dims = (((data.x.ndim - 1,), (data.w.ndim - 1,)), (((0,), (0,)) if batched else ((), ())))
        y = traced(backend, lambda x, w: qk.dot_general(x, w, dims, preferred_element_type=np_dtype(case.out),
                                                        backend=backend.name))(native(backend, data.x), w_q)
    else:
        y = run_bound(backend, case, data.x, data.rq, data.bias)
    return to_numpy(y), dtype_of(y)


def traced(backend: Backend, f: Any) -> Any:
    """`f` as JAX callers run it, under `jax.jit`; as is for the other frameworks."""
    if backend.framework != "jax":
        return f
    import jax

    return jax.jit(f)


def run_bound(backend: Backend, case: Case, lhs: Any, rq: Any, bias: Any, **kw: Any) -> Any:
    """`dispatch.bind(problem, backend).run(lhs, rhs, bias)` with the backend's arrays."""
    call = bind(backend, case, **kw)
    assert call.implementation is backend.impl
    return traced(backend, call.run)(bound_array(backend, lhs), bound_array(backend, rq), bound_array(backend, bias))


def accumulate(backend: Backend, case: Case, lhs: Any, rq: Any, **kw: Any) -> Any:
    return traced(backend, bind(backend, case, **kw).accumulate)(bound_array(backend, lhs), bound_array(backend, rq))


def expect_accumulators(backend: Backend, case: Case, data: Data, lhs: Any = None, **kw: Any) -> None:
    """`Bound.accumulate`: int32, identical to the reference's exact accumulators (per group for W4A8)."""
    lhs = data.x if lhs is None else lhs
    acc = accumulate(backend, case, lhs, data.rq, **kw)
    assert dtype_of(acc) == "int32", backend.id
    np.testing.assert_array_equal(to_numpy(acc).astype(np.int64), reference.accumulators(lhs, data.rq, case.recipe),
                                  err_msg=f"{backend.id} {case.id}")


# Backends with kernel shape rules (the packed torch CPU GEMMs: K a multiple of 16, N of 16, group sizes
# 32-256; the native CPU kernels: decode sizes, M <= torch_bindings.native.MAX_M, and not the bfloat16 calls
# the packed kernels take): a case outside them is
# refused with a reason naming the size, never run wrong.
SHAPE_LIMITED = {"torch-cpu-packed": ("K=", "N=", "group size"), "torch-cpu-native": ("M=", "torch-cpu-packed serves")}
MAX_M = {"torch-cpu-native": "torch_bindings.native"}
"""M-limited backends, and the module whose `MAX_M` says how tall a case they take: their cases run at
most that tall (`servable`; `tests/test_torch_native.py` checks the refusal above it)."""
# Backends that serve some (activation, output) dtype pairs only, and which.
DTYPE_LIMITED = {"torch-cpu-packed": {("bfloat16", "bfloat16")}}


def servable(backend: Backend, case: Case) -> Case:
    """`case`, with N and K rounded up to what a shape-limited backend takes (16, and the group size)."""
    if backend.name in MAX_M:
        return dataclasses.replace(case, m=min(case.m, importlib.import_module(MAX_M[backend.name]).MAX_M))
    if backend.name not in SHAPE_LIMITED or backend.impl.verdict(backend.problem(case)) is None:
        return case
    step = math.lcm(16, case.recipe.group_size or 1)
    return dataclasses.replace(case, n=-(-case.n // 16) * 16, k=-(-case.k // step) * step)


def check_case(backend: Backend, case: Case) -> None:
    """The output against the reference, and for integer recipes the accumulators where exposed."""
    if backend.name in MAX_M:
        case = servable(backend, case)
    if backend.name in SHAPE_LIMITED and (reason := backend.impl.verdict(backend.problem(case))) is not None:
        assert any(word in reason for word in SHAPE_LIMITED[backend.name]), (backend.id, case, reason)
        return
    data = Data.of(case)
    y, dtype = run(backend, case, data)
    expect_output(backend, case, data, y, dtype)
    if case.recipe.accumulation.integer and backend.impl.accumulate is not None:
        expect_accumulators(backend, case, data)


@st.composite
def cases(draw: st.DrawFn, backend: Backend) -> Case:
    """A case the backend declares it serves: recipe, sizes, dtypes and bias drawn."""
    recipe = draw(st.sampled_from(backend.recipes))
    m, n, k = (17, 40, 130) if backend.slow else (33, 70, 300)
    act, out = draw(st.sampled_from(backend.dtype_pairs(recipe)))
    return Case(recipe=recipe, m=draw(st.integers(1, m)), n=draw(st.integers(1, n)), k=draw(st.integers(1, k)),
                act=act, out=out, bias=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def hypothesis_test(backend: Backend, strategy: st.SearchStrategy, check: Any) -> None:
    """Run `check(case)` on the backend's number of examples drawn from `strategy`."""
    settings(max_examples=examples(backend))(given(case=strategy)(check))()


def first_pair(backend: Backend, recipe: Recipe) -> tuple[str, str]:
    """The backend's preferred (activation, output) pair for `recipe`: f32 -> f32 where accepted."""
    pairs = backend.dtype_pairs(recipe)
    return ("float32", "float32") if ("float32", "float32") in pairs else pairs[0]


def fixed(backend: Backend, recipe: Recipe, **kw: Any) -> Case:
    act, out = first_pair(backend, recipe)
    return Case(recipe=recipe, act=act, out=out, **kw)


def families(backend: Backend) -> list[Recipe]:
    return [r for r in FAMILIES if backend.impl.serves.reason(r) is None]


# ---------------------------------------------------------------- the suite


def test_every_runnable_backend_is_discovered() -> None:
    names = {b.id for b in BACKENDS}
    assert "numpy:reference" in names
    if HAS_TORCH:
        assert {"torch:torch-cpu", "torch:reference"} <= names
        if importlib.util.find_spec("triton") is not None:
            import torch

            kernels = ("w8a8", "w4a8", "w4a16", "w8a16", "fp8", "fp8a16")
            if os.environ.get("TRITON_INTERPRET") == "1":
                assert {f"torch:triton.interpret.{f}" for f in kernels} <= names
            elif torch.cuda.is_available():
                assert {f"torch:triton.{f}" for f in kernels} <= names
    if HAS_JAX:
        assert {"jax:xla", "jax:reference.callback", "jax:pallas.interpret"} <= names


@pytest.mark.parametrize("backend", backends())
def test_declared_recipes_and_dtypes(backend: Backend) -> None:
    """Each backend serves every recipe it declares with every output dtype, for some activation
    dtype; every (activation, output) pair it refuses comes with a reason naming the dtype."""
    assert backend.recipes
    for recipe in backend.recipes:
        pairs = backend.dtype_pairs(recipe)
        want = DTYPE_LIMITED.get(backend.name, {o for _, o in pairs} == set(FLOATS) and set(pairs))
        assert want and set(pairs) == want, (backend.id, recipe.name, pairs)
        for act in FLOATS:
            for out in FLOATS:
                if (act, out) not in pairs:
                    reason = backend.impl.verdict(backend.problem(Case(recipe=recipe, m=4, n=16, k=64, act=act, out=out)))
                    assert act in reason or out in reason, (backend.id, recipe.name, act, out, reason)


@pytest.mark.parametrize("backend", backends())
def test_matches_reference(backend: Backend) -> None:
    """Random recipes, sizes, dtype pairs and bias: outputs, and integer accumulators where the
    implementation exposes them (`Bound.accumulate`), against the reference."""
    hypothesis_test(backend, cases(backend), lambda case: check_case(backend, case))


EDGE_SHAPES = [pytest.param(m, n, k, id=f"M{m}-N{n}-K{k}") for m, n, k in (
    (1, 1, 1),  # K=1: one product
    (3, 5, 7),  # odd K below every block and group
    (17, 33, 65),  # one past the interpreter blocks in M, N and K
    (1, 96, 257),  # decode, odd K across several groups and blocks
)]


@pytest.mark.parametrize("m,n,k", EDGE_SHAPES)
@pytest.mark.parametrize("backend", backends())
def test_awkward_shapes(backend: Backend, m: int, n: int, k: int) -> None:
    for i, recipe in enumerate(families(backend)):
        check_case(backend, fixed(backend, recipe, m=m, n=n, k=k, bias=bool(i % 2), seed=m + n + k))


@pytest.mark.parametrize("group", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("backend", backends(lambda b: any(r.rhs.granularity is Granularity.GROUP
                                                           for r in b.recipes if r in SHIPPED)))
def test_every_group_size(backend: Backend, group: int) -> None:
    """Two groups and a partial third (K = 2g + 5), bias on: int4, uint4 + zero point, W4A8."""
    for recipe in (qk.W4A16(group), qk.W4A16(group, zero_point=True), qk.W4A8(group)):
        if backend.impl.serves.reason(recipe) is None:
            check_case(backend, fixed(backend, recipe, m=3, n=20, k=2 * group + 5, bias=True, seed=group))


@pytest.mark.parametrize("backend", backends())
def test_every_output_dtype(backend: Backend) -> None:
    """Every output dtype for each family the backend serves, the activation dtype rotating through
    those it accepts (over three families every accepted pair comes up)."""
    for i, recipe in enumerate(families(backend)):
        pairs = backend.dtype_pairs(recipe)
        for j, out in enumerate(FLOATS):
            acts = [a for a, o in pairs if o == out]
            if not acts and backend.name in DTYPE_LIMITED:
                continue
            case = Case(recipe=recipe, m=5, n=12, k=70, act=acts[(i + j) % len(acts)], out=out, bias=bool(j % 2),
                        seed=i)
            check_case(backend, case)


REFUSES_BATCHED = {"torch-cpu": "batched (3-D) weights are not supported",
                   "torch-cpu-packed": "batched (3-D) weights are not supported",
                   "torch-cpu-w8a8": "batched (3-D) weights are not supported",
                   "torch-cpu-w4a8": "batched (3-D) weights are not supported",
                   "torch-cpu-native": "batched (3-D) weights are not supported"}
"""Backends that refuse batched weights, with (the start of) their reason; every other one serves them."""


@pytest.mark.parametrize("backend", backends())
def test_batched_weights(backend: Backend) -> None:
    """3-D weights (B, N, K) against activations (B, M, K): served correctly, or refused with the
    backend's reason by explain and by an explicit request."""
    for recipe in families(backend):
        case = fixed(backend, recipe, m=3, n=9, k=70, batch=2, bias=True, seed=5)
        problem = backend.problem(case)
        reason = backend.impl.verdict(problem)
        if backend.name not in REFUSES_BATCHED:
            assert reason is None, (backend.id, recipe.name, reason)
            check_case(backend, case)
            continue
        assert reason and reason.startswith(REFUSES_BATCHED[backend.name]), reason
        shown = {v.implementation.name: v.reason for v in dispatch.explain(problem, backend.name).verdicts}
        assert shown[backend.name] == reason
        with pytest.raises(qk.BackendUnavailable, match=re.escape(reason)):
            dispatch.bind(problem, backend.name)


@pytest.mark.parametrize("backend", backends(lambda b: any(r.lhs is not None for r in b.recipes)))
def test_prequantized_activations(backend: Backend) -> None:
    """Recipes that quantize activations (integer, fp8) with activations the caller quantized (a QOperand
    lhs), through `bind`:
    the same outputs and accumulators as quantizing on the fly."""
    for recipe in families(backend):
        if recipe.lhs is None:
            continue
        case = fixed(backend, recipe, m=6, n=11, k=90, bias=True, seed=3)
        data = Data.of(case)
        lhs = reference.quantize(data.x, recipe.lhs)
        y = run_bound(backend, case, lhs, data.rq, data.bias, lhs_quantized=True)
        expect_output(backend, case, data, to_numpy(y), dtype_of(y), lhs=lhs)
        if recipe.accumulation.integer and backend.impl.accumulate is not None:
            expect_accumulators(backend, case, data, lhs, lhs_quantized=True)


@pytest.mark.parametrize("backend", backends(lambda b: any(r.lhs is not None for r in b.recipes)))
def test_static_range_activations(backend: Backend) -> None:
    """Static-range recipes (`static=True`) run the dynamic family's kernels on activations quantized
    with one calibrated scale (`Recipe.quantize_lhs`): a scale below the range saturates codes at
    +-qmax (127, 448 for fp8), and the outputs still equal the reference's for those codes exactly."""
    for recipe in families(backend):
        if recipe.lhs is None:
            continue
        static = recipe(static=True)
        case = dataclasses.replace(fixed(backend, recipe, m=6, n=11, k=90, bias=True, seed=4), recipe=static)
        data = Data.of(case)
        qtype = static.lhs.qtype
        scale = calibration.static_scale(calibration.batch_range(data.x.astype(np.float32)) / 4, qtype=qtype)
        lhs = static.quantize_lhs(numerics.NUMPY_OPS, data.x, scale)
        saturated = np.abs(lhs.qvalue.astype(np.float32)) == qtype.qmax
        assert saturated.any() and np.all(lhs.scale == scale), "some codes saturate"
        y = run_bound(backend, case, lhs, data.rq, data.bias, lhs_quantized=True)
        expect_output(backend, case, data, to_numpy(y), dtype_of(y), lhs=lhs)


@pytest.mark.parametrize("backend", backends())
def test_leading_axes_fold_into_m(backend: Backend) -> None:
    """Activations (2, 3, K) against a 2-D weight through the public entry points (`qk.linear`,
    `qk.dot_general`; `bind` for NumPy): output (2, 3, N)."""
    for i, recipe in enumerate(families(backend)):
        case = servable(backend, fixed(backend, recipe, m=3, n=10, k=50, lead=(2,), bias=bool(i % 2), seed=i))
        data = Data.of(case)
        y, dtype = run(backend, case, data)
        expect_output(backend, case, data, y, dtype)


@pytest.mark.parametrize("backend,recipe", [pytest.param(b, r, id=f"{b.id}-{r.name}")
                                            for b in BACKENDS for r in families(b)])
def test_bound_calls_take_leading_axes(backend: Backend, recipe: Recipe) -> None:
    """dispatch's calling convention: a bound call takes activations (..., M, K) (M = all rows)."""
    case = servable(backend, fixed(backend, recipe, m=3, n=10, k=50, lead=(2,), bias=True, seed=4))
    data = Data.of(case)
    y, dtype = run(backend, case, data, public=False)
    expect_output(backend, case, data, y, dtype)
    if recipe.accumulation.integer and backend.impl.accumulate is not None:
        expect_accumulators(backend, case, data)


ZERO_SIZES = {"M0": (0, 5, 40), "N0": (3, 0, 40), "K0": (3, 5, 0)}


def zero_size_params() -> list[Any]:
    out = []
    for b in BACKENDS:
        for r in families(b):
            for size, mnk in ZERO_SIZES.items():
                out.append(pytest.param(b, r, *mnk, id=f"{b.id}-{r.name}-{size}"))
    return out


@pytest.mark.parametrize("backend,recipe,m,n,k", zero_size_params())
def test_zero_size_dims(backend: Backend, recipe: Recipe, m: int, n: int, k: int) -> None:
    """The contract: M=0 / N=0 give an empty (M, N) output, K=0 the bias broadcast (an empty sum is
    0), in the output dtype, as `F.linear` and `lax.dot_general` do; a backend that cannot serve them
    must refuse through dispatch with its reason, never crash inside a kernel."""
    case = fixed(backend, recipe, m=m, n=n, k=k, bias=True)
    reason = backend.impl.verdict(backend.problem(case))
    if reason is not None:
        with pytest.raises(qk.BackendUnavailable, match=re.escape(reason)):
            bind(backend, case)
        return
    data = Data.of(case)
    y, dtype = run(backend, case, data)
    assert dtype == case.out and y.shape == (m, n), (backend.id, recipe.name, y.shape)
    expected = np.broadcast_to(data.bias.astype(np_dtype(case.out)).astype(np.float32), (m, n))
    np.testing.assert_array_equal(y, expected, err_msg=f"{backend.id} {case.id}")


# ---------------------------------------------------------------- the fma bound itself


def test_fma_bound_holds_for_a_fused_epilogue_and_catches_wrong_results() -> None:
    """`fma_bound` admits W4A8's epilogue computed with fused multiply-adds (each step rounded once,
    from exact float64 products) and rejects results off by one accumulator code or a dropped group."""
    recipe = qk.W4A8(32)
    rng = np.random.default_rng(0)
    x, w = testing.activations(rng, (16, 200)), testing.weights(rng, (24, 200))
    bias = rng.standard_normal(24).astype(np.float32)
    xq, rq = reference.quantize(x, recipe.lhs), reference.quantize(w, recipe.rhs)
    acc = reference.accumulators(x, rq, recipe).astype(np.float64)  # (M, N, G)
    y = np.zeros(acc.shape[:-1], np.float32)
    for g in range(acc.shape[-1]):  # y = fma(acc_g, s_g, y)
        y = (y.astype(np.float64) + acc[..., g] * rq.scale[None, :, g]).astype(np.float32)
    fused = (y.astype(np.float64) * xq.scale[:, None] + bias).astype(np.float32)  # fma(y, s_lhs, bias)
    expected = reference.qmatmul(x, rq, recipe, bias=bias)
    bound = testing.fma_bound(testing.epilogue_terms(x, rq, recipe, bias), "float32")
    assert not np.array_equal(fused, expected)  # the contraction is visible on this data
    testing.assert_within(fused, expected, bound)
    one_code = expected + (rq.scale[None, :, 0] * xq.scale[:, None]).astype(np.float32)  # acc_0 + 1
    dropped = expected - (acc[..., -1] * rq.scale[None, :, -1] * xq.scale[:, None]).astype(np.float32)
    for wrong in (one_code, dropped):
        with pytest.raises(AssertionError, match="outside tolerance"):
            testing.assert_within(wrong, expected, bound)


# ---------------------------------------------------------------- bad inputs


HOST_CHECKED = {"reference", "reference.callback", "torch-cpu", "torch-cpu-w8a8", "torch-cpu-w4a8", "torch-cpu-native"}
"""Backends that quantize activations with host-checked numerics (NumPy, eager torch): NaN/Inf raise.
Every other one (kernels, XLA) cannot look at values: the rows holding them come out NaN."""


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy inside the Triton interpreter
@pytest.mark.parametrize("backend", backends(lambda b: any(r.lhs is not None for r in b.recipes)))
def test_nonfinite_activations_of_integer_recipes(backend: Backend) -> None:
    for recipe in families(backend):
        if recipe.lhs is None:
            continue
        case = fixed(backend, recipe, m=4, n=6, k=40)
        data = Data.of(case)
        data.x[1, 3], data.x[2, 0] = np.nan, np.inf
        if backend.name in HOST_CHECKED:
            with pytest.raises((ValueError, RuntimeError), match="NaN/Inf"):
                run(backend, case, data)
            continue
        y, _ = run(backend, case, data)
        assert np.isnan(y[1:3]).all(), (backend.id, recipe.name, y[1:3])
        clean = Data(np.delete(data.x, [1, 2], axis=0), data.w, data.bias, data.rq)
        expect_output(backend, Case(recipe=recipe, m=2, n=6, k=40), clean, y[[0, 3]], case.out)


@pytest.mark.parametrize("backend", backends())
def test_wrong_contraction_size_is_refused(backend: Backend) -> None:
    """A weight quantized for K=64 against activations with K=65, through the public entry point."""
    recipe = families(backend)[0]
    act, _ = first_pair(backend, recipe)
    x, w = np.ones((2, 65), np_dtype(act)), testing.weights(np.random.default_rng(0), (8, 64))
    with qk.use_backend(backend.name), pytest.raises((ValueError, TypeError), match="65"):
        if backend.framework == "torch":
            import torch

            qk.linear(native(backend, x), qk.quantize(torch.from_numpy(w).to(backend.device), recipe))
        elif backend.framework == "jax":
            qk.dot_general(native(backend, x), qk.quantize(native(backend, w), recipe, contracting_axes=(1,)),
                           (((1,), (1,)), ((), ())))
        else:
            dispatch.bind(backend.problem(Case(recipe=recipe, m=2, n=8, k=65, act=act)), backend.name).run(
                x, reference.quantize(w, recipe.rhs).operand(), None)


@pytest.mark.parametrize("framework", sorted({b.framework for b in BACKENDS}))
def test_unknown_backend_name_lists_the_available_ones(framework: str) -> None:
    """An unknown name, and the name of another framework's backend, raise listing what exists."""
    backend = next(b for b in BACKENDS if b.framework == framework)
    own = dispatch.registered(framework, dispatch.Op.QMATMUL)
    foreign = next(b.name for b in BACKENDS if not any(i.matches(b.name) for i in own))
    for name in ("nope", foreign):
        with qk.use_backend(name), pytest.raises(qk.BackendUnavailable,
                                                 match=f"no implementation named '{name}'.*available: .*{backend.name}"):
            if framework == "torch":
                import torch

                qk.linear(torch.ones(2, 64), qk.quantize(torch.ones(8, 64), qk.W8A8))
            elif framework == "jax":
                qk.dot_general(native(backend, np.ones((2, 64), np.float32)),
                               native(backend, np.ones((64, 8), np.float32)), (((1,), (0,)), ((), ())))
            else:
                dispatch.bind(backend.problem(Case(recipe=qk.W8A8, m=2, n=8, k=64)))


# ---------------------------------------------------------------- formats defined here


def generic(backend: Backend) -> bool:
    """Executes any recipe's definition (declares accumulations, not kernel tags)."""
    return backend.impl.serves.recipes is None


@pytest.mark.parametrize("recipe", [pytest.param(r, id=r.name) for r in (W6A16, W3A16)])
@pytest.mark.parametrize("entry", ["numpy", "torch", "jax"])
def test_new_weight_only_format_through_the_public_api(entry: str, recipe: Recipe) -> None:
    """int6 per group / int3 per row weights, defined above and registered nowhere: `qk.quantize` and
    `qk.linear` / `qk.dot_general` (the generic backends) give the float matmul of the dequantized
    weight, whose codes use the whole range [-qmax, qmax] and no more."""
    rng = np.random.default_rng(6)
    x, w = testing.activations(rng, (5, 150)), testing.weights(rng, (12, 150))
    qmax = recipe.rhs.qtype.qmax
    if entry == "numpy":
        w_q = qk.quantize(w, recipe)
        codes, w_deq = reference.codes(w_q.operand(), recipe.rhs, 150), w_q.dequantize()
        y, chosen = reference.qmatmul(x, w_q, recipe), "reference"
    elif entry == "torch":
        torch = pytest.importorskip("torch")
        w_q = qk.quantize(torch.from_numpy(w), recipe)
        xt = torch.from_numpy(x)
        chosen = qk.explain(xt, w_q).chosen.name
        codes, w_deq, y = w_q.qvalue.numpy(), w_q.dequantize().numpy(), qk.linear(xt, w_q).numpy()
    else:
        jnp = pytest.importorskip("jax.numpy")
        w_q = qk.quantize(jnp.asarray(w.T), recipe, contracting_axes=(0,))  # a Flax-style (in, out) kernel
        dims = (((1,), (0,)), ((), ()))
        chosen = qk.explain(jnp.asarray(x), w_q, dims).chosen.name
        codes, w_deq = np.asarray(w_q.qvalue), np.asarray(w_q.dequantize()).T
        y = np.asarray(qk.dot_general(jnp.asarray(x), w_q, dims))
    assert chosen == {"numpy": "reference", "torch": "torch-cpu", "jax": "xla"}[entry]
    assert codes.dtype == np.int8 and codes.min() >= -qmax and codes.max() <= qmax
    assert np.abs(codes).max() == qmax  # each block's absmax element takes the largest code
    np.testing.assert_array_equal(w_deq, reference.quantize(w, recipe.rhs).dequantize())
    testing.assert_close(y, x.astype(np.float64) @ w_deq.T.astype(np.float64), x, w_deq, "float32")


@pytest.mark.parametrize("backend", backends(generic))
def test_new_formats_on_every_generic_backend(backend: Backend) -> None:
    """The recipes defined here (int6 / int3 weights, int8 x int6) on awkward shapes and batched;
    exact int32 accumulators for W6A8."""
    for recipe in CUSTOM:
        for i, (m, n, k) in enumerate(((1, 1, 1), (3, 5, 7), (1, 96, 257))):
            check_case(backend, fixed(backend, recipe, m=m, n=n, k=k, bias=bool(i % 2), seed=i))
        if backend.name not in REFUSES_BATCHED:
            check_case(backend, fixed(backend, recipe, m=3, n=9, k=70, batch=2, bias=True))


def test_kernel_backends_refuse_new_formats_by_tag() -> None:
    """Every kernel implementation (declared by recipe tag), runnable here or not, refuses them."""
    kernels = [i for fw in ("torch", "jax") for i in dispatch.registered(fw) if i.serves.recipes is not None]
    assert kernels
    for impl in kernels:
        for recipe in CUSTOM:
            assert impl.serves.reason(recipe) == (f"serves recipes {', '.join(sorted(impl.serves.recipes))}, "
                                                  f"not {recipe.name}"), impl.name


class LhsFirstIntegerDot(type(Accumulation.INT32)):
    """An accumulation no backend declares: INT32's exact dot of the codes, rescaled activation scale
    first, `(f32(acc) * s_lhs[m]) * s_rhs[n] + bias[n]`. The reference executes it; nothing else knows it."""

    name = "INT32_LHS_FIRST"
    description = "int32, activation scale first"

    def finish(self, recipe, ops, part, lhs, rhs, bias, out_dtype):
        y = (ops.cast(part, "float32") * ops.cast(lhs.scale, "float32")[..., :, None]) \
            * ops.cast(rhs.scale, "float32")[..., None, :]
        return self._epilogue(ops, y, bias, out_dtype)


W8A8_LHS_FIRST = Recipe(tag="w8a8lhs", lhs=INT8_ROW, rhs=INT8_ROW, accumulation=LhsFirstIntegerDot())


def _refusals(explanation: dispatch.Explanation) -> dict[str, str | None]:
    return {v.implementation.name: v.reason for v in explanation.verdicts}


@pytest.mark.parametrize("entry", ["torch", "jax"])
def test_unknown_accumulation_is_refused_with_a_reason(entry: str) -> None:
    """Generic backends refuse an accumulation they do not implement, naming it; kernels refuse the
    tag; only the reference serves it (chosen automatically, exact); forcing another one raises."""
    rng = np.random.default_rng(8)
    x, w = testing.activations(rng, (4, 96)), testing.weights(rng, (10, 96))
    recipe = W8A8_LHS_FIRST
    expected = reference.qmatmul(x, reference.quantize(w, recipe.rhs), recipe)
    if entry == "torch":
        torch = pytest.importorskip("torch")
        w_q, xt = qk.quantize(torch.from_numpy(w), recipe), torch.from_numpy(x)
        args, generic_names, host, chosen = (xt, w_q), ("torch-cpu",), {"reference"}, "reference"

        def call(backend: str | None = None) -> Any:
            with qk.use_backend(backend):
                return qk.linear(xt, w_q)
    else:
        jnp = pytest.importorskip("jax.numpy")
        dims = (((1,), (1,)), ((), ()))
        w_q, xj = qk.quantize(jnp.asarray(w), recipe, contracting_axes=(1,)), jnp.asarray(x)
        args, generic_names = (xj, w_q, dims), ("xla",)
        host, chosen = {"reference.callback", "reference"}, "reference.callback"

        def call(backend: str | None = None) -> Any:
            return qk.dot_general(xj, w_q, dims, backend=backend)
    verbose = qk.explain(*args, verbose=True)
    reasons = _refusals(verbose)
    for name in generic_names:
        assert "INT32_LHS_FIRST" in reasons[name] and "does not know" in reasons[name], reasons[name]
    kernels = [v for v in verbose.verdicts if v.implementation.serves.recipes is not None]
    assert kernels and {v.implementation.name for v in kernels} | set(generic_names) | host == set(reasons)
    for v in kernels:
        assert v.reason == f"serves recipes {', '.join(sorted(v.implementation.serves.recipes))}, not w8a8lhs"
    assert {n for n, r in reasons.items() if r is None} == host
    assert verbose.chosen.name == chosen
    default = qk.explain(*args)
    assert {v.implementation.name for v in default.verdicts} == host and default.hidden == len(reasons) - len(host)
    np.testing.assert_array_equal(to_numpy(call()), expected)
    for name in generic_names:
        with pytest.raises(qk.BackendUnavailable, match=f"{name}: .*INT32_LHS_FIRST"):
            call(name)


# ---------------------------------------------------------------- the rescale's range

BOUNDED_RECIPES = (qk.W8A8, qk.W4A8(32), qk.FP8)  # the recipes whose rescale has a bound


def _range_data(recipe: Recipe, x_scale: float, w_scale: float, *, k: int = 64) -> Data:
    rng = np.random.default_rng(11)
    x = (testing.activations(rng, (3, k)) * np.float32(x_scale)).astype(np.float32)
    w = (testing.weights(rng, (5, k)) * np.float32(w_scale)).astype(np.float32)
    return Data(x, w, None, reference.quantize(w, recipe.rhs))


@pytest.mark.parametrize("backend", backends(lambda b: any(b.impl.serves.reason(r) is None for r in BOUNDED_RECIPES)))
def test_extreme_finite_operands_rescale_without_overflow(backend: Backend) -> None:
    """Activations near 1e36 against ordinary weights, and weights at half the rescale bound against
    small activations: the exact results fit in f32 (~1e35), and every backend returns them (finite,
    equal to the reference as usual). The old W8A8 order `(acc * s_lhs) * s_rhs` gave inf for the first."""
    for recipe in (r for r in BOUNDED_RECIPES if backend.impl.serves.reason(r) is None):
        k = 64
        w_max = 0.5 * recipe.accumulation.rescale_bound(recipe, k) * recipe.rhs.qtype.qmax
        for x_scale, w_scale in ((1e36, 1.0), (1e-3, w_max / 0.1)):  # testing.weights: |w| <~ 0.1
            data = _range_data(recipe, x_scale, w_scale, k=k)
            case = Case(recipe=recipe, m=3, n=5, k=k)
            y, dtype = run(backend, case, data)
            exact = data.x.astype(np.float64) @ data.w.astype(np.float64).T
            assert np.isfinite(y).all() and np.abs(exact).max() < numerics.FLT_MAX / 100, (backend.id, x_scale)
            expect_output(backend, case, data, y, dtype)


@pytest.mark.parametrize("recipe", BOUNDED_RECIPES, ids=lambda r: r.name)
@pytest.mark.parametrize("entry", ["reference", "torch", "jax"])
def test_weights_beyond_the_rescale_bound_are_refused_at_quantize_time(entry: str, recipe: Recipe) -> None:
    """A weight whose scale times the largest accumulator would overflow f32 (values ~1e36 at K=64) is
    refused where it is quantized, naming the tensor, its scale and the bound; weight-only recipes
    take it (their dequantized weights stay within the values' own range)."""
    k = 64
    data = _range_data(recipe, 1.0, 1e37, k=k)
    bound = recipe.accumulation.rescale_bound(recipe, k)
    assert float(np.max(data.rq.scale)) > bound
    pattern = (rf"weights?\)?: a scale of .* exceeds {re.escape(f'{bound:.4g}')}, the largest {recipe.name} "
               rf"rescales .* at K={k}")
    with pytest.raises(ValueError, match=pattern):
        if entry == "reference":
            reference.qmatmul(data.x, QOperand(data.rq.qvalue, data.rq.scale), recipe)
        elif entry == "torch":
            torch = pytest.importorskip("torch")
            qk.quantize(torch.from_numpy(data.w), recipe)
        else:
            jnp = pytest.importorskip("jax.numpy")
            qk.quantize(jnp.asarray(data.w.T), recipe)
    for weight_only in (qk.W8A16, qk.W4A16(32)):
        assert weight_only.accumulation.rescale_bound(weight_only, k) is None
        np.testing.assert_array_less(np.abs(reference.quantize(data.w, weight_only.rhs).dequantize()),
                                     numerics.FLT_MAX)


def test_traced_weights_beyond_the_rescale_bound_are_reported_by_checkify() -> None:
    """Under jit a float weight is quantized on the fly: check_finite=True reports the bound through checkify."""
    jax = pytest.importorskip("jax")
    from jax.experimental import checkify

    data = _range_data(qk.W8A8, 1.0, 1e37)
    dims = (((1,), (1,)), ((), ()))
    f = checkify.checkify(jax.jit(lambda x, w: qk.dot_general(x, w, dims, check_finite=True)))
    err, _ = f(data.x, data.w)
    assert err.get() is not None and "exceeds" in err.get() and "rescales without overflowing f32 at K=64" in err.get()
    err, y = f(data.x, data.w * np.float32(1e-36))
    assert err.get() is None and np.isfinite(np.asarray(y)).all()
