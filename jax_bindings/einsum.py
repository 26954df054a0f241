"""Two-operand einsum on one `dot_general` call, and `make_einsum`: a quantized `jnp.einsum` for Flax.

`einsum(subscripts, x, w, dot_general=...)` always calls `dot_general(x, w, ...)`: the activations
first, the weight (kernel) second, which is how `qkernels.dot_general` tells them apart. The weight
is the `QArray` operand when there is one, whichever position it is given in (`einsum('nk,bk->bn',
w_q, x)` is run as `einsum('bk,nk->bn', x, w_q)`), else the second operand. Plain
`jnp.einsum(..., _dot_general=dg)` does not promise that order (its contraction may pass the kernel
first, e.g. for 'bk,nk->nb'); `QDotGeneral` recognizes that call (`swapped_by_jnp_einsum`).

Supported subscripts: explicit output ('->'), ellipses, batch indices (in both operands and the
output), contracted indices (in both operands, not in the output), and indices of one operand that
are summed away (summed before the matmul, on the float activations or the float weight). An index
repeated within one operand (a diagonal) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import opt_einsum
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_bindings.dot_general import QDotGeneral
from jax_bindings.qarray import QArray
from qkernels.formats import Recipe, resolve_recipe

__all__ = ["einsum", "make_einsum", "QEinsum"]


def parse_subscripts(subscripts: str, lhs: Any, rhs: Any) -> tuple[str, str, str]:
    """(lhs indices, rhs indices, output indices), ellipses expanded to letters."""
    subscripts = subscripts.replace(" ", "")
    if "->" not in subscripts:
        raise ValueError(f"einsum subscripts {subscripts!r} have no output ('->'); write the output explicitly, "
                         f"e.g. 'btk,kn->btn'")
    if subscripts.count(",") != 1:
        raise ValueError(f"einsum subscripts {subscripts!r} name {subscripts.count(',') + 1} operands; a quantized "
                         f"einsum takes two, the activations and the weight")
    shapes = [jax.ShapeDtypeStruct(tuple(a.shape), jnp.float32) for a in (lhs, rhs)]
    inputs, out, _ = opt_einsum.parser.parse_einsum_input((subscripts, *shapes))
    a, b = inputs.split(",")
    for name, idx, arr in (("lhs", a, lhs), ("rhs", b, rhs)):
        if len(idx) != len(arr.shape):
            raise ValueError(f"einsum subscripts {subscripts!r} give the {name} {len(idx)} indices but it has shape "
                             f"{tuple(arr.shape)}")
        repeated = sorted({c for c in idx if idx.count(c) > 1})
        if repeated:
            raise ValueError(f"einsum subscripts {subscripts!r} repeat index {repeated} within the {name} (a "
                             f"diagonal); take the diagonal first (jnp.diagonal), then contract")
    return a, b, out


def _sum_unused(x: Any, idx: str, other: str, out: str, name: str) -> tuple[Any, str]:
    """Sum the axes of `x` whose index appears neither in the other operand nor in the output."""
    unused = tuple(i for i, c in enumerate(idx) if c not in other and c not in out)
    if not unused:
        return x, idx
    if isinstance(x, QArray):
        raise ValueError(f"the QArray {name} has axes {unused} that the einsum sums away; sum the float weight "
                         f"before quantizing it")
    return jnp.sum(x, axis=unused), "".join(c for i, c in enumerate(idx) if i not in unused)


def _permuted_sharding(out_sharding: Any, order: str, out: str) -> Any:
    """`out_sharding` of the einsum output, re-ordered for dot_general's (batch, lhs free, rhs free) result."""
    if out_sharding is None or order == out:
        return out_sharding
    spec = out_sharding.spec if isinstance(out_sharding, NamedSharding) else out_sharding
    spec = tuple(spec) + (None,) * (len(out) - len(spec))
    permuted = P(*(spec[out.index(c)] for c in order))
    return out_sharding.update(spec=permuted) if isinstance(out_sharding, NamedSharding) else permuted


def einsum(subscripts: str, lhs: Any, rhs: Any, *, dot_general: Any = lax.dot_general, precision: Any = None,
           preferred_element_type: Any = None, out_sharding: Any = None) -> jax.Array:
    """`jnp.einsum(subscripts, lhs, rhs)` as `dot_general(x, w, ...)` with the weight `w` second.

    The weight is the `QArray` operand (either position), else `rhs`; a `QArray` must be quantized
    with the contracting (and batch) axes this einsum uses.
    """
    a, b, out = parse_subscripts(subscripts, lhs, rhs)
    if isinstance(lhs, QArray) and not isinstance(rhs, QArray):
        lhs, rhs, a, b = rhs, lhs, b, a
    for c in out:
        if c not in a and c not in b:
            raise ValueError(f"einsum subscripts {subscripts!r}: output index {c!r} is in neither operand")
    lhs, a = _sum_unused(lhs, a, b, out, "lhs")
    rhs, b = _sum_unused(rhs, b, a, out, "rhs")
    batch = [c for c in out if c in a and c in b]
    contracting = [c for c in a if c in b and c not in out]
    dims = ((tuple(a.index(c) for c in contracting), tuple(b.index(c) for c in contracting)),
            (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))
    order = "".join(batch) + "".join(c for c in a if c not in b) + "".join(c for c in b if c not in a)
    kwargs = {} if out_sharding is None else {"out_sharding": _permuted_sharding(out_sharding, order, out)}
    y = dot_general(lhs, rhs, dims, precision, preferred_element_type=preferred_element_type, **kwargs)
    if order != out:
        y = jnp.transpose(y, tuple(order.index(c) for c in out))
    return y


@dataclass(frozen=True)  # no slots: jax.jit and Flax keep weak references to callables
class QEinsum:
    """A hashable quantized `jnp.einsum` for two operands, `(activations, weight)`: what `make_einsum`
    returns, e.g. `flax.nnx.Einsum(..., einsum_op=qk.make_einsum(qk.W4A16(128)))`.

    Same call signature as `jnp.einsum` (`optimize` is accepted and ignored: one contraction has one
    path); the weight is the `QArray` operand in either position, else the second operand, quantized
    with `recipe`.
    """

    recipe: Recipe
    backend: str | None = None
    check_finite: bool = False

    def __call__(self, subscripts: str, *operands: Any, precision: Any = None, preferred_element_type: Any = None,
                 out_sharding: Any = None, optimize: Any = "auto") -> jax.Array:
        del optimize
        if len(operands) != 2:
            raise TypeError(f"a quantized einsum takes two operands, the activations and the weight; got "
                            f"{len(operands)} for {subscripts!r}. Contract the others with jnp.einsum first")
        dot_general = QDotGeneral(self.recipe, self.backend, self.check_finite)
        return einsum(subscripts, *operands, dot_general=dot_general, precision=precision,
                      preferred_element_type=preferred_element_type, out_sharding=out_sharding)


def make_einsum(recipe: Any = None, *, backend: str | None = None, check_finite: bool = False) -> QEinsum:
    """A `jnp.einsum` replacement quantizing the second operand with `recipe` (default W8A8), e.g.
    `flax.nnx.Einsum('btk,kn->btn', (k, n), einsum_op=make_einsum(qk.W4A16(128)), rngs=rngs)`."""
    return QEinsum(resolve_recipe(recipe), backend, check_finite)
