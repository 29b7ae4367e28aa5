"""A researcher's own parts, defined outside the library, for `test_custom_parts.py` and the
command-line tests (named there by import path, `"_custom_parts:LowRankMemory"`)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

import atlas_eqx as ae
import feature_maps as fm
import optimizers as iopt


class LowRankMemory(ae.AbstractMemory):
    r"""$\mathcal M(x) = U(Vx)$ with $U \in \mathbb R^{d_{out}\times r}$, $V \in \mathbb R^{r\times d_{in}}$."""

    up: Float[Array, "d_out rank"]
    down: Float[Array, "rank d_in"]
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)

    def __init__(self, d_in: int, d_out: int, *, key: PRNGKeyArray, rank: int = 4):
        up_key, down_key = jax.random.split(key)
        self.up = jax.random.normal(up_key, (d_out, rank)) / math.sqrt(rank)
        self.down = jax.random.normal(down_key, (rank, d_in)) / math.sqrt(d_in)
        self.d_in, self.d_out = d_in, d_out

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " d_out"]:
        return self.up @ (self.down @ x)


class SignedSquare(fm.AbstractFeatureMap):
    r"""$\phi(x) = [x;\ s\,x\odot|x|]$ with a learnable scale $s$."""

    scale: Float[Array, ""]

    def __init__(self, scale: float = 0.5):
        self.scale = jnp.asarray(scale)

    def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch D"]:
        return jnp.concatenate([x, self.scale.astype(x.dtype) * x * jnp.abs(x)], axis=-1)

    def out_dim(self, d: int) -> int:
        return 2 * d


def log_cosh(prediction: Float[Array, " d_v"], target: Float[Array, " d_v"]) -> Scalar:
    r"""$\sum_j \log\cosh(p_j - t_j)$: quadratic near 0, linear in the tails."""
    residual = prediction - target
    return jnp.sum(jnp.logaddexp(residual, -residual) - jnp.log(2.0))


def sgd_momentum() -> iopt.InnerOptimizer:
    """`optax.sgd` with momentum 0.5 as the inner learner."""
    return iopt.from_optax(optax.sgd(1.0, momentum=0.5))
