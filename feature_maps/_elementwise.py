from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._base import AbstractFeatureMap, check_dim
from ._polynomial import check_coefficients, check_degree, taylor_coefficients


class Elementwise(AbstractFeatureMap):
    r"""An element-wise polynomial, $\phi(x) = \sum_{i=i_0}^{p} a_i\,x^{\odot i}$.

    Here $x^{\odot i}$ is the element-wise power and $i_0 = 0$ if `include_constant` else
    $i_0 = 1$; the output keeps the input dimension $d$. The coefficients $a_i\in\mathbb R$ (ATLAS
    Eq 5 allows any real $a_i$; no square root is taken here, so no sign constraint is needed)
    are the learnable field `coefficients`, initialised at $a_i = 1/i!$ (so that $\phi$ is the
    truncated Taylor series of $e^x$, or of $e^x - 1$ without the constant).

    This is option (ii) of digest A-2: it is cheap, but it does **not** raise the capacity of a
    matrix memory. $\phi$ maps into $\mathbb R^d$, so a matrix memory on $\phi(k)$ still has
    $d_v\times d$ parameters and the rank argument of ATLAS Prop 1 still caps it at $O(d)$
    pairs; only the exact maps ([`feature_maps.Polynomial`][]) give the $O(d^p)$ of Prop 2.
    Unlike the exact maps, $\langle\phi(q),\phi(k)\rangle$ is not a function of $q^\top k$.
    """

    coefficients: Float[Array, " degrees"]
    degree: int = eqx.field(static=True)
    learnable: bool = eqx.field(static=True)
    include_constant: bool = eqx.field(static=True)

    def __init__(
        self,
        degree: int,
        *,
        learnable: bool = True,
        include_constant: bool = False,
        coefficients: ArrayLike | Sequence[float | int] | None = None,
    ):
        r"""**Arguments:**

        - `degree`: the maximal power $p \ge 1$.
        - `learnable`: whether the coefficients $a_i$ receive gradients.
        - `include_constant`: whether the degree-0 term $a_0$ is included.
        - `coefficients`: initial real $a_i$ for $i = i_0..p$ (length $p + 1$ with the
          constant, $p$ without). Defaults to $a_i = 1/i!$.
        """
        check_degree("Elementwise", "degree", degree)
        start = 0 if include_constant else 1
        if coefficients is None:
            initial = taylor_coefficients(degree)[start:]
        else:
            initial = check_coefficients(
                "Elementwise", coefficients, degree + 1 - start, positive=False
            )
        self.coefficients = jnp.asarray(initial)
        self.degree = degree
        self.learnable = learnable
        self.include_constant = include_constant

    @property
    def degrees(self) -> tuple[int, ...]:
        r"""The included powers $i_0, \dots, p$, in the order of `coefficients`."""
        return tuple(range(0 if self.include_constant else 1, self.degree + 1))

    def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
        a = self.coefficients
        if not self.learnable:
            a = jax.lax.stop_gradient(a)
        a = a.astype(x.dtype)
        # Horner: (((a_p x + a_{p-1}) x + ...) x + a_{i0}) x^{i0}.
        out = jnp.broadcast_to(a[-1], x.shape)
        for j in range(len(self.degrees) - 2, -1, -1):
            out = out * x + a[j]
        return out if self.include_constant else out * x

    def out_dim(self, d: int) -> int:
        check_dim("Elementwise.out_dim", d)
        return d
