"""Entry points of the Pallas family: canonical shapes in, kernels chosen per target, result out.

`qmatmul(lhs, rhs, recipe, bias=..., out_dtype=..., target=..., config=...)` is what the dispatch
implementations call (`run(problem, lhs, rhs, bias)`; on TPU with the config `qkernels.tuning` chose);
`accumulators(...)` exposes the raw int32 accumulators (per group for W4A8) for tests. Without a
config, the target's table entry for the call's M is used. Everything is traceable under `jax.jit`.
"""

from __future__ import annotations

import enum
from typing import Any

import jax.numpy as jnp

from qkernels.formats import W8A8, OperandFormat, QOperand, Recipe
from qkernels.kernels.pallas import configs, quantize, tpu
from qkernels.kernels.pallas.configs import Family
from qkernels.kernels.pallas.layout import Prepacked, ScaleLayout, canonicalize

__all__ = ["Target", "family_of", "qmatmul", "accumulators", "quantize_activations", "scale_layout", "prepack"]


class Target(enum.Enum):
    """Where the kernels run: a TPU generation, a CUDA GPU, or the TPU kernels interpreted on CPU."""

    TPU_V5E = "v5e"
    TPU_V6E = "v6e"
    TPU_V5P = "v5p"
    GPU = "gpu"
    INTERPRET = "interpret"

    @property
    def interpret(self) -> bool:
        return self is Target.INTERPRET

    def tile_config(self, family: Family, m: int) -> configs.TileConfig:
        """Table entry for M rows; interpretation runs the TPU kernels with v5e's table."""
        return configs.tpu_config("v5e" if self.interpret or self is Target.GPU else self.value, family, m=m)


_BY_TAG = {f.value: f for f in Family}


def family_of(recipe: Recipe) -> Family | None:
    """The kernel family serving `recipe` (by its tag), or None (e.g. W8A16 has no Pallas kernel)."""
    return _BY_TAG.get(recipe.tag)


def quantize_activations(x: jnp.ndarray, target: Target, fmt: OperandFormat = W8A8.lhs) -> QOperand:
    """Dynamic per-row quantization to `fmt` (int8 or float8_e4m3fn per row): int8 on TPU/interpret by
    the Pallas kernel, otherwise XLA ops.

    The format's own definition runs as XLA ops (`jax_bindings.arrays.JAX_OPS`) on GPU, where XLA's
    f32 division is correctly rounded and Pallas' Triton lowering does not promise it, and for fp8
    everywhere (the Pallas kernel writes int8 codes).
    """
    if target is Target.GPU or fmt != W8A8.lhs:
        from jax_bindings.arrays import JAX_OPS

        return fmt.quantize(x, JAX_OPS)
    q, s = quantize.quantize_rows(x, interpret=target.interpret)
    return QOperand(q, s)


def _kernels(target: Target, family: Family, m: int, config: Any):
    """(kernel module, config): `config` checked against the target, or the table's when None."""
    if target is Target.GPU:
        from qkernels.kernels.pallas import gpu

        module, kind, default = gpu, configs.GpuConfig, lambda: configs.gpu_config(family)
    else:
        module, kind, default = tpu, configs.TileConfig, lambda: target.tile_config(family, m)
    if config is None:
        return module, default()
    if not isinstance(config, kind):
        raise ValueError(f"config {config!r} is a {type(config).__name__}; the {target.value} kernels take a "
                         f"{kind.__name__} (see qkernels.kernels.pallas.configs)")
    return module, config


def _prepare(lhs: Any, rhs: QOperand, recipe: Recipe, target: Target):
    """Canonical 3-D operands: (lhs array, lhs scale or None, rhs qvalue/scale/zero, shapes)."""
    if isinstance(lhs, QOperand):
        lhs_q, lhs_s = jnp.asarray(lhs.qvalue), jnp.asarray(lhs.scale, jnp.float32)
        canon = canonicalize(lhs_q.shape, rhs.qvalue.shape)
    else:
        lhs_q, lhs_s = jnp.asarray(lhs), None
        canon = canonicalize(lhs_q.shape, rhs.qvalue.shape)
    recipe.check_k(canon.k)
    stored = recipe.rhs.stored_k(canon.k)
    if rhs.qvalue.shape[-1] != stored:
        raise ValueError(f"rhs qvalue has {rhs.qvalue.shape[-1]} entries along K but K={canon.k} in "
                         f"{recipe.rhs.describe()} stores {stored}; quantize the weight for this K")
    lhs_q = lhs_q.reshape(canon.batch, canon.m, canon.k)
    if recipe.lhs is not None and lhs_s is None:
        act = quantize_activations(lhs_q, target, recipe.lhs)
        lhs_q, lhs_s = act.qvalue, act.scale
    if lhs_s is not None:
        lhs_s = lhs_s.reshape(canon.batch, canon.m)
    w_q = jnp.asarray(rhs.qvalue)
    w_q = w_q if canon.rhs_batched else w_q[None]
    w_s = jnp.asarray(rhs.scale, jnp.float32)
    w_s = w_s if canon.rhs_batched else w_s[None]
    w_z = None if rhs.zero_point is None else jnp.asarray(rhs.zero_point)
    if w_z is not None and not canon.rhs_batched:
        w_z = w_z[None]
    return lhs_q, lhs_s, w_q, w_s, w_z, canon


def qmatmul(lhs: Any, rhs: QOperand, recipe: Recipe, *, bias: Any = None, out_dtype: Any = None,
            target: Target = Target.INTERPRET, config: Any = None) -> jnp.ndarray:
    """`out (..., M, N) = rescale(lhs (..., M, K) @ rhs (..., N, K)^T)` with the Pallas kernels.

    lhs: float activations, or a QOperand of codes (int8, float8_e4m3fn) and per-row scales.
    rhs: QOperand in canonical stored layout. out_dtype: default lhs's dtype (f32 if pre-quantized).
    config: a `TileConfig` (TPU, interpret) or `GpuConfig` (GPU); None: the table's for this M.
    """
    family = family_of(recipe)
    if family is None:
        raise ValueError(f"{recipe.name} has no Pallas kernel; use {', '.join(f.value for f in Family)}, or "
                         f"another backend")
    if not (target is Target.GPU or family in configs.TPU_FAMILIES):
        raise ValueError(f"{recipe.name} has no Pallas TPU kernel to run on {target.value}; its Pallas kernel runs "
                         f"on CUDA GPUs (target=Target.GPU)")
    if out_dtype is None:
        out_dtype = jnp.float32 if isinstance(lhs, QOperand) else jnp.asarray(lhs).dtype
    out_dtype = jnp.dtype(out_dtype)
    lhs_q, lhs_s, w_q, w_s, w_z, canon = _prepare(lhs, rhs, recipe, target)
    module, config = _kernels(target, family, canon.m, config)
    bias = None if bias is None else jnp.asarray(bias)
    out = _LAUNCHERS[family](module, lhs_q, lhs_s, w_q, w_s, w_z, bias, recipe.group_size,
                             out_dtype=out_dtype, config=config, interpret=target.interpret,
                             **_packed(module, family, rhs))
    return out.reshape(canon.out_shape)


def accumulators(lhs: Any, rhs: QOperand, recipe: Recipe, *, target: Target = Target.INTERPRET,
                 interpret: Any = None, config: Any = None) -> jnp.ndarray:
    """Raw int32 accumulators: (..., M, N) for W8A8, (..., M, N, G) per group for W4A8.

    `interpret` overrides the interpret argument of the kernel call (e.g. `pltpu.InterpretParams`).
    """
    family = family_of(recipe)
    if family is None or not recipe.accumulation.integer:
        raise ValueError(f"{recipe.name} accumulates in {recipe.accumulation.description}; it has no Pallas "
                         f"integer accumulators")
    lhs_q, lhs_s, w_q, w_s, w_z, canon = _prepare(lhs, rhs, recipe, target)
    module, config = _kernels(target, family, canon.m, config)
    out = _LAUNCHERS[family](module, lhs_q, lhs_s, w_q, w_s, w_z, None, recipe.group_size, out_dtype=jnp.int32,
                             config=config, raw=True, interpret=target.interpret if interpret is None else interpret,
                             **_packed(module, family, rhs))
    groups = (out.shape[-1],) if recipe.accumulation.grouped else ()
    return out.reshape(*canon.out_shape, *groups)


_INT4 = (Family.W4A16, Family.W4A8)  # the families whose TPU kernels relay scales out (`layout.ScaleLayout`)


def _packed(module: Any, family: Family, rhs: QOperand) -> dict[str, Any]:
    """The prepacked scale layouts for the TPU int4 kernels (the only ones that relay scales out)."""
    return {"packed": rhs.packed} if module is tpu and family in _INT4 and rhs.packed else {}


def scale_layout(recipe: Recipe, target: Target, config: Any, *, m: int, n: int, k: int) -> ScaleLayout | None:
    """The `layout.ScaleLayout` the call's kernel reads its scales in (TPU/interpreted int4 kernels), or
    None where the kernel reads the canonical scales (W8A8: a free reshape; the GPU kernels: a transpose
    of the (B_w, N, G) scales, not prepacked). `config`: the call's `TileConfig`, None for the table's."""
    family = family_of(recipe)
    if family not in _INT4 or target is Target.GPU:
        return None
    config = config if config is not None else target.tile_config(family, m)
    return tpu.scale_layout(config, n, recipe.rhs.stored_k(k), recipe.group_size, lhs_int=family is Family.W4A8)


def prepack(rhs: QOperand, recipe: Recipe, *, k: int, target: Target, tile_configs: Any = None) -> tuple[Prepacked, ...]:
    """Prepacked forms of a canonical weight's scales for the TPU int4 kernels: one per distinct
    `ScaleLayout` of `tile_configs` (default: every entry of the target's table for the recipe's family,
    i.e. the decode and the any-M configs). Empty for recipes whose kernels read canonical scales."""
    family = family_of(recipe)
    if family not in _INT4 or target is Target.GPU:
        return ()
    scale = jnp.asarray(rhs.scale, jnp.float32)
    zero = None if rhs.zero_point is None else jnp.asarray(rhs.zero_point)
    if scale.ndim == 2:  # a shared weight: the kernels take (1, N, G)
        scale, zero = scale[None], None if zero is None else zero[None]
    n = scale.shape[1]
    arch = "v5e" if target in (Target.INTERPRET, Target.GPU) else target.value
    table = tile_configs if tile_configs is not None else configs.tpu_configs(arch, family)
    layouts = dict.fromkeys(tpu.scale_layout(c, n, recipe.rhs.stored_k(k), recipe.group_size,
                                             lhs_int=family is Family.W4A8) for c in table)
    return tuple(Prepacked.of(layout, scale, zero) for layout in layouts)


# One launcher per family: the kernels' argument lists differ (W4A16 takes float activations and a
# zero point, FP8A16 float activations, the others per-row activation scales).
def _launch_w8a8(module, a, a_scale, w, w_scale, w_zero, bias, group, **kw):
    return module.w8a8(a, a_scale, w, w_scale, bias, **kw)


def _launch_w4a16(module, a, a_scale, w, w_scale, w_zero, bias, group, **kw):
    return module.w4a16(a, w, w_scale, w_zero, bias, group=group, **kw)


def _launch_w4a8(module, a, a_scale, w, w_scale, w_zero, bias, group, **kw):
    return module.w4a8(a, a_scale, w, w_scale, bias, group=group, **kw)


def _launch_fp8(module, a, a_scale, w, w_scale, w_zero, bias, group, **kw):
    return module.fp8(a, a_scale, w, w_scale, bias, **kw)


def _launch_fp8a16(module, a, a_scale, w, w_scale, w_zero, bias, group, **kw):
    return module.fp8a16(a, w, w_scale, bias, **kw)


_LAUNCHERS = {Family.W8A8: _launch_w8a8, Family.W4A16: _launch_w4a16, Family.W4A8: _launch_w4a8,
              Family.FP8: _launch_fp8, Family.FP8A16: _launch_fp8a16}


