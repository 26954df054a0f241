"""PyTorch rows: `qkernels.linear` per recipe, `F.linear` f32/bf16, `torch._int_mm` + rescale, torchao,
and `torch._scaled_mm` (row-wise fp8, the GPU baseline of the fp8 rows)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.cases import Case, Data, Prepared, Unavailable, chosen_name, mma_of, nbytes
from qkernels import hardware, reference
from qkernels.formats import FP8, W8A8, Recipe

__all__ = ["cases"]

_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def _tdev(device: Any) -> str:
    return "cuda" if device.kind in ("cuda", "rocm") else "cpu"


def _sync_for(device: Any):
    if _tdev(device) == "cuda":
        return lambda out: torch.cuda.synchronize()
    return lambda out: None


def _to_numpy(out: torch.Tensor) -> np.ndarray:
    return out.detach().float().cpu().numpy()


def _act_dtype(device: Any) -> torch.dtype:
    """Activation dtype of the float and weight-only rows: bf16 on accelerators, f32 on CPU."""
    return torch.bfloat16 if device.accelerated else torch.float32


def _timed(fn: Any) -> Any:
    def call() -> Any:
        with torch.inference_mode():
            return fn()
    return call


def _f_linear(dtype_name: str):
    def prepare(data: Data, device: Any) -> Prepared:
        dt = _DTYPES[dtype_name]
        x = torch.from_numpy(data.x).to(_tdev(device), dt)
        w = torch.from_numpy(data.w).to(_tdev(device), dt)
        return Prepared(fn=_timed(lambda: F.linear(x, w)), sync=_sync_for(device), to_numpy=_to_numpy,
                        bytes_moved=nbytes(x, w) + data.ref.size * x.element_size(), impl=f"aten.linear {dtype_name}")
    return prepare


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 as numerics.py defines it (true division, round half to even)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / 127)
    q = torch.clamp(torch.round(x.float() / scale), -127, 127).to(torch.int8)
    return q, scale


def _int_mm(data: Data, device: Any) -> Prepared:
    """Dynamic per-row int8 activations, `torch._int_mm` against pre-quantized weights, then a separate
    f32 rescale: what a user writes by hand without a fused kernel."""
    dt = _act_dtype(device)
    w_q = reference.quantize(data.w, W8A8.rhs, name="w")
    wq_t = torch.from_numpy(w_q.qvalue).to(_tdev(device)).t()  # (K, N) view of the (N, K) codes
    sw = torch.from_numpy(w_q.scale).to(_tdev(device))
    x = torch.from_numpy(data.x).to(_tdev(device), dt)

    def run() -> torch.Tensor:
        xq, sx = _quantize_rows(x)
        return ((torch._int_mm(xq, wq_t).float() * sx) * sw).to(dt)

    return Prepared(fn=_timed(run), sync=_sync_for(device), to_numpy=_to_numpy,
                    bytes_moved=nbytes(x, wq_t, sw) + data.ref.size * x.element_size(),
                    impl="torch._int_mm + f32 rescale")


def _scaled_mm(data: Data, device: Any) -> Prepared:
    """Dynamic per-row float8_e4m3fn activations (quantized by torch ops, as numerics.py defines them),
    `torch._scaled_mm` with row-wise scales against pre-quantized per-channel weights, bf16 out: what
    torchao float8 and vLLM's dynamic fp8 run on CUDA. GPUs with fp8 tensor cores only."""
    if device.kind != "cuda":
        raise Unavailable(f"torch._scaled_mm runs on CUDA GPUs with fp8 tensor cores, not {device.platform}")
    why = hardware.fp8_mma_reason(device.platform)
    if why:
        raise Unavailable(f"torch._scaled_mm: {why}")
    from torch_bindings.arrays import TORCH_OPS

    w_q = reference.quantize(data.w, FP8.rhs, name="w")
    wq_t = torch.from_numpy(w_q.qvalue.view(np.uint8)).view(torch.float8_e4m3fn).to("cuda").t()  # (K, N) view
    sw = torch.from_numpy(w_q.scale).to("cuda")[None, :]  # (1, N)
    x = torch.from_numpy(data.x).to("cuda", torch.bfloat16)

    def run() -> torch.Tensor:
        xq = FP8.lhs.quantize(x, TORCH_OPS)
        return torch._scaled_mm(xq.qvalue, wq_t, scale_a=xq.scale[:, None], scale_b=sw, out_dtype=torch.bfloat16)

    try:
        run()
    except RuntimeError as e:  # row-wise scales need a recent CUDA / sm_90 in some torch builds
        raise Unavailable(f"torch._scaled_mm row-wise fp8 failed here: {str(e).splitlines()[0]}")
    return Prepared(fn=_timed(run), sync=_sync_for(device), to_numpy=_to_numpy,
                    bytes_moved=nbytes(x, wq_t, sw) + data.ref.size * x.element_size(),
                    impl="torch._scaled_mm fp8 row-wise")


def _torchao(config_name: str):
    def prepare(data: Data, device: Any) -> Prepared:
        try:
            import torchao.quantization as tq
        except ImportError as e:
            raise Unavailable(f"torchao is not installed ({e}); install the bench extra: pip install 'qkernels[bench]'")
        dt = _act_dtype(device) if config_name == "Int8DynamicActivationInt8WeightConfig" else torch.bfloat16
        config = (tq.Int8DynamicActivationInt8WeightConfig() if config_name == "Int8DynamicActivationInt8WeightConfig"
                  else tq.Int4WeightOnlyConfig(group_size=128))
        n, k = data.w.shape
        model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False, device=_tdev(device), dtype=dt))
        with torch.no_grad():
            model[0].weight.copy_(torch.from_numpy(data.w))
        try:
            tq.quantize_(model, config)
        except (ImportError, NotImplementedError, AssertionError, RuntimeError) as e:
            raise Unavailable(f"torchao {config_name} cannot quantize on {device.platform}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0]}")
        weight = model[0].weight
        if type(weight) in (torch.Tensor, torch.nn.Parameter):
            # quantize_ skips layers its config cannot serve and leaves them in float, silently
            raise Unavailable(f"torchao {config_name} left the ({n}, {k}) weight in float "
                              f"(unsupported shape for this config on {device.platform})")
        x = torch.from_numpy(data.x).to(_tdev(device), dt)
        stored = sum(nbytes(t) for t in _inner_tensors(weight))
        return Prepared(fn=_timed(lambda: model(x)), sync=_sync_for(device), to_numpy=_to_numpy,
                        bytes_moved=nbytes(x) + stored + data.ref.size * x.element_size(),
                        impl=f"torchao {type(weight).__name__}")
    return prepare


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside a torchao tensor subclass (its stored bytes)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return [t]
    names, _ = flatten()
    return [x for name in names for x in _inner_tensors(getattr(t, name))]


def _qkernels(recipe: Recipe, dtype: torch.dtype | None = None):
    def prepare(data: Data, device: Any) -> Prepared:
        import qkernels as qk

        dt = dtype or _act_dtype(device)
        w = torch.from_numpy(data.w).to(_tdev(device), dt)
        x = torch.from_numpy(data.x).to(_tdev(device), dt)
        w_q = qk.quantize(w, recipe)
        impl = chosen_name(qk.explain(x, w_q))
        stored = nbytes(w_q.qvalue, w_q.scale, getattr(w_q, "zero_point", None))
        return Prepared(fn=_timed(lambda: qk.linear(x, w_q)), sync=_sync_for(device), to_numpy=_to_numpy,
                        bytes_moved=nbytes(x) + stored + data.ref.size * x.element_size(), impl=impl)
    return prepare


def cases(device: Any, recipes: tuple[Recipe, ...]) -> list[Case]:
    act = "bf16" if device.accelerated else "f32"
    names = {r.name for r in recipes}
    out = [Case(method="F.linear", framework="torch", recipe=dt, role="float", mma=dt, prepare=_f_linear(dt))
           for dt in ("f32", "bf16")]
    if "w8a8" in names:
        out.append(Case(method="torch._int_mm+rescale", framework="torch", recipe="w8a8", role="baseline",
                        mma="int8", prepare=_int_mm))
        out.append(Case(method="torchao.int8-dynamic", framework="torch", recipe="w8a8", role="baseline",
                        mma="int8", prepare=_torchao("Int8DynamicActivationInt8WeightConfig")))
    if "fp8" in names:
        out.append(Case(method="torch._scaled_mm", framework="torch", recipe="fp8", role="baseline", mma="fp8",
                        prepare=_scaled_mm))
    if "w4a16-g128" in names:
        out.append(Case(method="torchao.int4-weight-only", framework="torch", recipe="w4a16-g128", role="baseline",
                        mma="bf16", prepare=_torchao("Int4WeightOnlyConfig")))
    for r in recipes:
        out.append(Case(method="qkernels.linear", framework="torch", recipe=r.name, role="qkernels", mma=mma_of(r, act),
                        prepare=_qkernels(r)))
        if r.lhs is None and not device.accelerated:  # weight-only: also with the recipe's 16-bit activations
            out.append(Case(method="qkernels.linear bf16", framework="torch", recipe=r.name, role="qkernels",
                            mma=mma_of(r, "bf16"), prepare=_qkernels(r, torch.bfloat16)))
    return out
