import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._base import AbstractFeatureMap, check_dim
from ._polynomial import check_degree, monomial_features, taylor_coefficients


class TaylorExp(AbstractFeatureMap):
    r"""Features of the exponential kernel truncated at order $P$ (ATLAS Eq 4).

    $$\langle\phi(q), \phi(k)\rangle = \sum_{i=0}^{P} \frac{(\tau^2\, q^\top k)^i}{i!}
      \approx \exp(\tau^2\, q^\top k),$$

    the compact monomial form of [`feature_maps.Polynomial`][] with the *fixed* coefficients
    $a_i = 1/i!$ (the truncation of $\phi^*$, digest §3.1 and I-32), applied to $\tau x$ where
    $\tau$ is `temperature` (no scaling when it is `None`). For example $\tau = d^{-1/4}$ on
    both queries and keys gives the softmax-attention kernel $\exp(q^\top k/\sqrt d)$. With
    $\ell_2$-normalised inputs and $\tau = 1$ the error is at most $e/(P+1)!$ (I-27); even $P$
    gives a strictly positive kernel for every real $q^\top k$ (I-26).

    There are no learnable parameters. `out_dim(d)` is $\binom{d+P}{P}$.
    """

    order: int = eqx.field(static=True)
    temperature: float | None = eqx.field(static=True)

    def __init__(self, order: int, *, temperature: float | None = None):
        r"""**Arguments:**

        - `order`: the truncation order $P \ge 1$.
        - `temperature`: a positive scale $\tau$ applied to the inputs before the map, or
          `None` for $\tau = 1$.
        """
        check_degree("TaylorExp", "order", order)
        if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(
                f"TaylorExp: `temperature` must be a finite number > 0 or None; got {temperature}"
            )
        self.order = order
        self.temperature = temperature

    @property
    def coefficients(self) -> Float[Array, " order_plus_one"]:
        r"""The fixed $a_i = 1/i!$, $i = 0..P$."""
        return jnp.asarray(taylor_coefficients(self.order))

    def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch D"]:
        if self.temperature is not None:
            x = self.temperature * x
        scales = jnp.asarray(np.sqrt(taylor_coefficients(self.order)), dtype=x.dtype)
        return monomial_features(x, scales, self.order, include_constant=True)

    def out_dim(self, d: int) -> int:
        check_dim("TaylorExp.out_dim", d)
        return math.comb(d + self.order, self.order)
