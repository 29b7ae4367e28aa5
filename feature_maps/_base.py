import abc

import equinox as eqx
from jaxtyping import Array, Float


class AbstractFeatureMap(eqx.Module):
    r"""A feature map $\phi:\mathbb R^d\to\mathbb R^D$ applied to keys and queries.

    Subclasses implement `__call__`, which maps an array of shape `(*batch, d)` to one of shape
    `(*batch, D)` (every leading axis is a batch axis), and `out_dim`, which gives `D` as a
    function of `d`. Feature maps are pure: randomness is drawn once at construction from an
    explicit `key=`, and learnable parameters are array fields of the module, so that
    `jax.grad`, `jax.jit` and `jax.vmap` apply to them as to any other Equinox module.
    """

    @abc.abstractmethod
    def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch D"]:
        """Map `x` of shape `(*batch, d)` to its features of shape `(*batch, out_dim(d))`."""

    @abc.abstractmethod
    def out_dim(self, d: int) -> int:
        """The feature dimension `D` for inputs of dimension `d`."""


def check_dim(name: str, d: int) -> None:
    if d < 1:
        raise ValueError(f"{name}: the input dimension `d` must be >= 1; got {d}")
