from jaxtyping import Array, Float

from ._base import AbstractFeatureMap, check_dim


class Identity(AbstractFeatureMap):
    r"""The identity feature map, $\phi(x) = x$, with `out_dim(d) == d`.

    This is the feature map of the plain (non-polynomial) models: DeltaNet, linear attention,
    Titans. It is also the $p = 1$, $a = (0, 1)$ limit of
    [`feature_maps.Polynomial`][] (the paper's "input gating" limit, digest I-25).
    """

    def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
        return x

    def out_dim(self, d: int) -> int:
        check_dim("Identity.out_dim", d)
        return d
