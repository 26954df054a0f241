"""Flax linen helpers: `Einsum`, `flax.linen.Einsum` with a `dot_general` to inject.

`nn.Dense` and `nn.DenseGeneral` take `dot_general=qk.make_dot_general(...)` directly; linen's
`nn.Einsum` (flax 0.12) has no such field, so this module adds one. For `flax.nnx.Einsum` pass
`einsum_op=qk.make_einsum(recipe)` instead.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import module
from flax.typing import DotGeneralT
from jax import lax

from jax_bindings.einsum import einsum

__all__ = ["Einsum"]


class Einsum(nn.Einsum):
    """`flax.linen.Einsum` (same fields, parameters and bias) whose matmul is `dot_general(inputs, kernel, ...)`.

    `dot_general`: e.g. `qk.make_dot_general(qk.W4A16(128))`; None means `lax.dot_general`. The
    kernel is always the second operand, the one a quantized dot_general treats as the weight.
    `dot_general_cls`, as in `nn.Dense`: a class instantiated per call, taking precedence.
    """

    dot_general: DotGeneralT | None = None
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, inputs: jax.Array, einsum_str: str | None = None) -> jax.Array:
        einsum_str = module.merge_param("einsum_str", self.einsum_str, einsum_str)
        einsum_str = einsum_str.replace(" ", "")
        if "->" not in einsum_str:
            raise ValueError(f"`einsum_str` {einsum_str!r} must be explicit and include '->', e.g. 'btk,kn->btn'")
        if einsum_str.count(",") != 1:
            raise ValueError(f"`einsum_str` {einsum_str!r} must have exactly two operands (inputs, kernel), i.e. "
                             f"one comma; it has {einsum_str.count(',')}")
        kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
        if self.use_bias:
            bias_shape, broadcasted_bias_shape = self._get_bias_shape(einsum_str, inputs, kernel)
            bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype)
        else:
            bias = None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        if self.dot_general_cls is not None:
            dot_general = self.dot_general_cls()
        else:
            dot_general = self.dot_general if self.dot_general is not None else lax.dot_general
        y = einsum(einsum_str, inputs, kernel, dot_general=dot_general, precision=self.precision,
                   preferred_element_type=self.preferred_element_type)
        if bias is not None:
            y += jnp.reshape(bias, broadcasted_bias_shape)
        return y
