"""Flax injection (Dense, DenseGeneral, jnp.einsum) and QArray as a pytree / serialized state."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

import qkernels as qk
from qkernels.testing import activations, weights


class MLP(nn.Module):
    recipe: qk.Recipe

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dg = qk.make_dot_general(self.recipe)
        x = nn.relu(nn.Dense(32, dot_general=dg)(x))
        x = nn.DenseGeneral((2, 8), dot_general=dg)(x)
        return nn.Dense(1, dot_general=dg)(x.reshape(*x.shape[:-2], 16))


def test_flax_mlp_trains_and_loss_falls():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 16), dtype=np.float32))
    y = jnp.sin(x[:, :1] * 2) + x[:, 1:2]
    model = MLP(qk.W8A8())
    params = model.init(jax.random.key(0), x)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]


def test_einsum_with_quantized_dot_general_under_jit():
    rng = np.random.default_rng(1)
    x, w = jnp.asarray(activations(rng, (2, 3, 64))), jnp.asarray(weights(rng, (4, 64, 8)))
    dg = qk.make_dot_general(qk.W4A16(32))
    assert hash(dg) == hash(qk.make_dot_general(qk.W4A16(32))) and dg == qk.make_dot_general(qk.W4A16(32))
    f = jax.jit(lambda x, w: jnp.einsum("bsk,hkn->bshn", x, w, _dot_general=dg))
    out = f(x, w)
    exact = jnp.einsum("bsk,hkn->bshn", x, w, precision=jax.lax.Precision.HIGHEST)
    assert out.shape == (2, 3, 4, 8)
    assert qk.testing.snr_db(out, exact) > 15  # int4 g32: ~20 dB of quantization noise


def test_qarray_is_a_pytree_that_jits_and_serializes():
    w = jnp.asarray(weights(np.random.default_rng(2), (70, 24)))
    w_q = qk.quantize(w, qk.W4A16(32, zero_point=True), contracting_axes=(0,))
    assert w_q.qvalue.shape == (24, 48) and w_q.scale.shape == (24, 3) and w_q.zero_point.shape == (24, 3)
    leaves, tree = jax.tree_util.tree_flatten(w_q)
    assert len(leaves) == 3 and jax.tree_util.tree_unflatten(tree, leaves) == w_q
    doubled = jax.jit(lambda q: q.dequantize() * 2)(w_q)
    np.testing.assert_array_equal(np.asarray(doubled), 2 * np.asarray(w_q.dequantize()))
    params = {"dense": {"kernel": w_q}}
    blob = serialization.to_bytes(params)
    empty = jax.tree_util.tree_map(jnp.zeros_like, params)
    restored = serialization.from_bytes(empty, blob)["dense"]["kernel"]
    for a, b in zip(jax.tree_util.tree_leaves(restored), leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.recipe == w_q.recipe and restored.shape == (70, 24)
