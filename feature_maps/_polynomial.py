import functools
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._base import AbstractFeatureMap, check_dim


_FORMS = ("monomial", "tensor")


def inverse_softplus(a: np.ndarray) -> np.ndarray:
    """softplus^{-1}(a) = log(exp(a) - 1), stable for tiny and large `a > 0` (float64, numpy)."""
    a = np.asarray(a, dtype=np.float64)
    return a + np.log(-np.expm1(-a))


def taylor_coefficients(degree: int) -> np.ndarray:
    """a_i = 1 / i! for i = 0..degree (float64, numpy)."""
    return np.array([1.0 / math.factorial(i) for i in range(degree + 1)])


def check_degree(name: str, argument: str, degree: int) -> None:
    if degree < 1:
        raise ValueError(f"{name}: `{argument}` must be an integer >= 1; got {degree}")


def check_coefficients(
    name: str, coefficients: ArrayLike | Sequence[float | int], n: int, *, positive: bool
) -> np.ndarray:
    array = np.asarray(coefficients, dtype=np.float64)
    if array.shape != (n,):
        raise ValueError(
            f"{name}: `coefficients` must have shape ({n},), one per included degree; "
            f"got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: `coefficients` must be finite; got {array}")
    if positive and not np.all(array > 0):
        raise ValueError(f"{name}: `coefficients` must all be > 0; got {array}")
    return array


@functools.lru_cache(maxsize=64)
def monomial_tables(d: int, degree: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    r"""Static gather tables for the monomials $x^\beta$, $1 \le |\beta| \le$ `degree`.

    The monomials of degree $i$ are the multisets $j_1 \le \dots \le j_i$ of variables, in
    lexicographic order (the order of `itertools.combinations_with_replacement(range(d), i)`).
    Each is its *parent* of degree $i - 1$ (drop $j_i$) times the variable $x_{j_i}$. Returns,
    for each degree $i = 1..$`degree`, `(parent, variable, multinomial)`: the parent's index
    in the degree-$(i-1)$ list, $j_i$, and the multinomial coefficient
    $\binom{i}{\beta} = i! / \prod_j \beta_j!$ (float64, exact for every realistic size).
    """
    tables = []
    last = [-1]  # degree 0: the empty monomial, "last variable" below every real one
    trailing = [0]  # how many times the last variable repeats at the end
    multinomial = [1]
    for i in range(1, degree + 1):
        parent, variable, new_last, new_trailing, new_multinomial = [], [], [], [], []
        for j, (lj, tj, mj) in enumerate(zip(last, trailing, multinomial, strict=True)):
            for v in range(max(lj, 0), d):
                count = tj + 1 if v == lj else 1
                parent.append(j)
                variable.append(v)
                new_last.append(v)
                new_trailing.append(count)
                # i!/prod(beta!) from (i-1)!/prod(beta'!): one more factor i, one more count of v.
                new_multinomial.append(mj * i // count)
        tables.append(
            (
                np.array(parent, dtype=np.int32),
                np.array(variable, dtype=np.int32),
                np.array(new_multinomial, dtype=np.float64),
            )
        )
        last, trailing, multinomial = new_last, new_trailing, new_multinomial
    for table in tables:
        for array in table:
            array.setflags(write=False)
    return tuple(tables)


def monomial_features(
    x: Float[Array, "*batch d"],
    scales: Float[Array, " degrees"],
    degree: int,
    include_constant: bool,
) -> Float[Array, "*batch D"]:
    r"""Concatenate $s_{|\beta|}\sqrt{\binom{|\beta|}{\beta}}\,x^\beta$ over the included degrees.

    `scales[j]` is $s_i$ for the `j`-th included degree $i$ (so $s_i = \sqrt{a_i}$ gives
    $\langle\phi(q),\phi(k)\rangle = \sum_i a_i (q^\top k)^i$ by the multinomial theorem).
    """
    d = x.shape[-1]
    blocks = []
    j = 0
    if include_constant:
        blocks.append(jnp.broadcast_to(scales[0], x.shape[:-1] + (1,)).astype(x.dtype))
        j = 1
    block = x
    for i, (parent, variable, multinomial) in enumerate(monomial_tables(d, degree), start=1):
        if i > 1:
            block = block[..., parent] * x[..., variable]
        weight = jnp.asarray(np.sqrt(multinomial), dtype=x.dtype)
        blocks.append(scales[j] * (weight * block))
        j += 1
    return jnp.concatenate(blocks, axis=-1)


def tensor_features(
    x: Float[Array, "*batch d"],
    scales: Float[Array, " degrees"],
    degree: int,
    include_constant: bool,
) -> Float[Array, "*batch D"]:
    r"""Concatenate $s_i\,x^{\otimes i}$ over the included degrees, $x^{\otimes i} = x \otimes
    x^{\otimes(i-1)}$ (Kronecker power, row-major), $x^{\otimes 0} = [1]$."""
    batch = x.shape[:-1]
    blocks = []
    j = 0
    if include_constant:
        blocks.append(jnp.broadcast_to(scales[0], batch + (1,)).astype(x.dtype))
        j = 1
    block = x
    for i in range(1, degree + 1):
        if i > 1:
            block = (x[..., :, None] * block[..., None, :]).reshape(*batch, -1)
        blocks.append(scales[j] * block)
        j += 1
    return jnp.concatenate(blocks, axis=-1)


def polynomial_degree_dims(form: str, d: int, degree: int, include_constant: bool) -> tuple:
    start = 0 if include_constant else 1
    if form == "tensor":
        return tuple(d**i for i in range(start, degree + 1))
    return tuple(math.comb(d + i - 1, i) for i in range(start, degree + 1))


class Polynomial(AbstractFeatureMap):
    r"""The exact polynomial kernel feature map $\phi_a$ with learnable coefficients.

    $$\langle\phi_a(q), \phi_a(k)\rangle = \sum_{i=i_0}^{p} a_i\,(q^\top k)^i,$$

    the learnable-coefficient kernel of ATLAS Eq 5 (Eq 4, the Taylor series of
    $\exp(q^\top k)$, at the initial $a_i = 1/i!$), with $i_0 = 0$ if `include_constant` else
    $i_0 = 1$ (digest §3.1, unifying construction, and invariant I-22). Two exact forms:

    - `form="monomial"` (default; the monomials P1 of ATLAS §3.1 and the proof of Prop 2):
      entries $\sqrt{a_{|\beta|}\binom{|\beta|}{\beta}}\;x^\beta$ over the multi-indices
      $i_0 \le |\beta| \le p$, with $\binom{|\beta|}{\beta} = |\beta|!/\prod_j\beta_j!$.
      Dimension $\binom{d+p}{p}$ (minus 1 without the constant). Ordered by degree, and within
      a degree lexicographically in the sorted variable indices, so with $p = 1$ and
      $a = (1, 1)$, $\phi(x) = [1; x]$ (I-24).
    - `form="tensor"` (the tensor power of ATLAS Eq 22, concatenated over degrees):
      $\phi_a(x) = \mathrm{concat}_{i=i_0}^{p}\ \sqrt{a_i}\,x^{\otimes i}$ with the
      Kronecker power $x^{\otimes i} = x\otimes x^{\otimes(i-1)}$, $x^{\otimes 0} = [1]$.
      Dimension $\sum_{i=i_0}^p d^i$. It has the same kernel as the monomial form but repeats
      every mixed monomial.

    The coefficients are $a_i = \mathrm{softplus}(r_i)$ of the raw parameter
    `raw_coefficients` $r$ (one entry per included degree, $i = i_0..p$), initialised at
    $r_i = \mathrm{softplus}^{-1}(1/i!)$ (digest A-3), or at the given positive `coefficients`.
    With `learnable=False` the raw parameter is still a leaf of the module but passes through
    `jax.lax.stop_gradient`, so its gradient is zero (as in Equinox's FAQ on frozen
    parameters; note that an optimiser with weight decay would still move it unless you filter
    it out).

    Explicit features are only feasible for small `d` and `p`: at `d = 64`, `p = 3` the
    monomial form already has 47,905 features (digest §3.2).
    """

    raw_coefficients: Float[Array, " degrees"]
    degree: int = eqx.field(static=True)
    form: str = eqx.field(static=True)
    learnable: bool = eqx.field(static=True)
    include_constant: bool = eqx.field(static=True)

    def __init__(
        self,
        degree: int,
        *,
        form: str = "monomial",
        learnable: bool = True,
        include_constant: bool = True,
        coefficients: ArrayLike | Sequence[float | int] | None = None,
    ):
        r"""**Arguments:**

        - `degree`: the maximal degree $p \ge 1$.
        - `form`: `"monomial"` (compact, $\binom{d+p}{p}$ features) or `"tensor"`
          (concatenated Kronecker powers, $\sum_i d^i$ features).
        - `learnable`: whether the coefficients $a_i$ receive gradients.
        - `include_constant`: whether the degree-0 term $a_0$ (a constant feature) is included.
        - `coefficients`: initial $a_i > 0$ for the included degrees $i = i_0..p$ (length
          $p + 1$ with the constant, $p$ without). Defaults to $a_i = 1/i!$.
        """
        check_degree("Polynomial", "degree", degree)
        if form not in _FORMS:
            raise ValueError(f"Polynomial: `form` must be one of {_FORMS}; got {form!r}")
        start = 0 if include_constant else 1
        if coefficients is None:
            initial = taylor_coefficients(degree)[start:]
        else:
            initial = check_coefficients(
                "Polynomial", coefficients, degree + 1 - start, positive=True
            )
        self.raw_coefficients = jnp.asarray(inverse_softplus(initial))
        self.degree = degree
        self.form = form
        self.learnable = learnable
        self.include_constant = include_constant

    @property
    def degrees(self) -> tuple[int, ...]:
        r"""The included degrees $i_0, \dots, p$, in the order of `coefficients`."""
        return tuple(range(0 if self.include_constant else 1, self.degree + 1))

    @property
    def coefficients(self) -> Float[Array, " degrees"]:
        r"""The kernel coefficients $a_i = \mathrm{softplus}(r_i)$, $i = i_0..p$."""
        raw = self.raw_coefficients
        if not self.learnable:
            raw = jax.lax.stop_gradient(raw)
        return jax.nn.softplus(raw)

    def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch D"]:
        scales = jnp.sqrt(self.coefficients).astype(x.dtype)
        if self.form == "tensor":
            return tensor_features(x, scales, self.degree, self.include_constant)
        return monomial_features(x, scales, self.degree, self.include_constant)

    def degree_dims(self, d: int) -> tuple[int, ...]:
        r"""The number of features of each included degree $i$: $d^i$ for the tensor form,
        $\binom{d+i-1}{i}$ for the monomial form (digest I-23)."""
        check_dim("Polynomial.degree_dims", d)
        return polynomial_degree_dims(self.form, d, self.degree, self.include_constant)

    def out_dim(self, d: int) -> int:
        r"""$\sum_{i=i_0}^p d^i$ (tensor) or $\binom{d+p}{p} - (1 - [\text{constant}])$
        (monomial)."""
        check_dim("Polynomial.out_dim", d)
        return sum(self.degree_dims(d))
