import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._base import AbstractFeatureMap, check_dim


class RandomFeatures(AbstractFeatureMap):
    r"""Positive random features of the exponential kernel (FAVOR+, Choromanski et al. 2021).

    $$\phi(x) = \frac{1}{\sqrt m}\exp\!\Big(Wx - \tfrac12\|x\|^2\Big),\qquad
      W_{jl}\sim\mathcal N(0, 1)\ \text{i.i.d.},\quad W\in\mathbb R^{m\times d},$$

    with the exponential taken element-wise, so that every feature is positive and
    $\mathbb E_W\,\langle\phi(q),\phi(k)\rangle = \exp(q^\top k)$ (each of the $m$ terms is an
    unbiased estimate, because $\mathbb E\,e^{w^\top(q+k)} = e^{\|q+k\|^2/2}$). Option (iv) of
    digest A-2. The projection `weight` $W$ is drawn once from `key` and is fixed: it passes
    through `jax.lax.stop_gradient`. `out_dim(d)` is `num_features`.

    The estimator's variance grows like $e^{\|q+k\|^2}$; apply it to normalised (and, for
    softmax attention, $d^{-1/4}$-scaled) queries and keys.
    """

    weight: Float[Array, "num_features d"]
    d: int = eqx.field(static=True)
    num_features: int = eqx.field(static=True)

    def __init__(self, d: int, num_features: int, *, key: PRNGKeyArray):
        """**Arguments:**

        - `d`: the input dimension.
        - `num_features`: the number $m$ of random features.
        - `key`: the PRNG key for $W$.
        """
        if d < 1:
            raise ValueError(f"RandomFeatures: `d` must be >= 1; got {d}")
        if num_features < 1:
            raise ValueError(f"RandomFeatures: `num_features` must be >= 1; got {num_features}")
        self.weight = jr.normal(key, (num_features, d))
        self.d = d
        self.num_features = num_features

    def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch num_features"]:
        if x.shape[-1] != self.d:
            raise ValueError(
                f"RandomFeatures: `x` must have last dimension d={self.d}; got shape {x.shape}"
            )
        w = jax.lax.stop_gradient(self.weight).astype(x.dtype)
        logits = x @ w.T - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
        return jnp.exp(logits) / jnp.sqrt(jnp.asarray(self.num_features, dtype=x.dtype))

    def out_dim(self, d: int) -> int:
        check_dim("RandomFeatures.out_dim", d)
        if d != self.d:
            raise ValueError(
                f"RandomFeatures.out_dim: `d` must equal the construction dimension {self.d}; "
                f"got {d}"
            )
        return self.num_features
