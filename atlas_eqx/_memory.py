import math
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class AbstractMemory(eqx.Module):
    """A memory $\\mathcal M(x; W)$: an Equinox module whose array leaves are the fast weights $W$.

    Subclasses define `d_in` (the dimension of $\\phi(k)$), `d_out` (the dimension of $v$) and
    `__call__` on a single feature vector; `jax.vmap` maps over tokens.
    """

    d_in: eqx.AbstractVar[int]
    d_out: eqx.AbstractVar[int]

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " d_out"]:
        raise NotImplementedError


def _normal(key: PRNGKeyArray, shape: tuple[int, int], std: float) -> Float[Array, "m n"]:
    if std == 0.0:
        return jnp.zeros(shape)
    return std * jax.random.normal(key, shape)


def _resolve_residual(residual: bool | Literal["auto"], d_in: int, d_out: int, name: str) -> bool:
    if residual == "auto":
        return d_in == d_out
    if residual and d_in != d_out:
        raise ValueError(
            f"{name}: `residual=True` needs d_in == d_out (x + f(x) is ill-typed otherwise, "
            f"digest A-4); got d_in={d_in}, d_out={d_out}. Use residual='auto' or False."
        )
    return bool(residual)


class LinearMemory(AbstractMemory):
    r"""Matrix memory $\mathcal M(x; W) = Wx$ with one weight $W \in \mathbb R^{d_{out}\times d_{in}}$.

    No bias: a bias comes from a constant feature of $\phi$ (digest I-24). With the l2
    objective and GD this is the delta rule (ATLAS Eq 11, corrected in digest 2.2).
    """

    weight: Float[Array, "d_out d_in"]
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)

    def __init__(self, d_in: int, d_out: int, *, key: PRNGKeyArray, init_std: float | None = None):
        """**Arguments:**

        - `d_in`, `d_out`: input (feature) and output (value) dimensions.
        - `key`: a JAX PRNG key for $W_0$.
        - `init_std`: standard deviation of $W_0$'s entries; defaults to $1/\\sqrt{d_{in}}$.
          `0.0` gives $W_0 = 0$.
        """
        _check_dims(d_in, d_out, "LinearMemory")
        std = 1.0 / math.sqrt(d_in) if init_std is None else float(init_std)
        self.weight = _normal(key, (d_out, d_in), std)
        self.d_in = d_in
        self.d_out = d_out

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " d_out"]:
        return self.weight @ x


class MLPMemory(AbstractMemory):
    r"""Deep memory (ATLAS Eq 42, Titans 3.1): $\mathcal M(x) = x + W_L\sigma(\cdots\sigma(W_1x))$.

    With `depth=2` this is $x + W_1\sigma(W_2x)$ in the paper's naming, where the paper's $W_2$
    is `weights[0]` (applied first) and its $W_1$ is `weights[1]`. The residual is only
    well-typed when $d_{in} = d_{out}$ (digest A-4); `residual="auto"` switches it on exactly
    then.
    """

    weights: tuple[Float[Array, "_ _"], ...]
    activation: Callable[[Array], Array] = eqx.field(static=True)
    residual: bool = eqx.field(static=True)
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        key: PRNGKeyArray,
        hidden: int | None = None,
        depth: int = 2,
        activation: Callable[[Array], Array] = jax.nn.gelu,
        residual: bool | Literal["auto"] = "auto",
        init_std: float | None = None,
    ):
        """**Arguments:**

        - `d_in`, `d_out`: input (feature) and output (value) dimensions.
        - `key`: a JAX PRNG key for $W_0$.
        - `hidden`: hidden width; defaults to $4 d_{out}$ (digest A-6).
        - `depth`: number of weight matrices $L \\geq 1$.
        - `activation`: $\\sigma$, GELU by default (ATLAS App. E).
        - `residual`: `True`, `False` or `"auto"` (on iff `d_in == d_out`).
        - `init_std`: scale of $W_0$; defaults to $1/\\sqrt{\\text{fan-in}}$ per matrix.
        """
        _check_dims(d_in, d_out, "MLPMemory")
        if depth < 1:
            raise ValueError(f"MLPMemory: `depth` must be >= 1; got {depth}")
        hidden = 4 * d_out if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"MLPMemory: `hidden` must be >= 1; got {hidden}")
        sizes = [d_in] + [hidden] * (depth - 1) + [d_out]
        keys = jax.random.split(key, depth)
        self.weights = tuple(
            _normal(k, (n_out, n_in), 1.0 / math.sqrt(n_in) if init_std is None else init_std)
            for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
        )
        self.activation = activation
        self.residual = _resolve_residual(residual, d_in, d_out, "MLPMemory")
        self.d_in = d_in
        self.d_out = d_out

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " d_out"]:
        h = x
        for weight in self.weights[:-1]:
            h = self.activation(weight @ h)
        out = self.weights[-1] @ h
        return x + out if self.residual else out


class GatedMLPMemory(AbstractMemory):
    r"""Atlas++'s gated memory (ATLAS Eq 43): $\mathcal M(x) = x + W_1(\sigma(W_2x) \odot W_3x)$.

    $W_3$ has the shape of $W_2$ and $\sigma$ is GELU by default (digest A-32).
    """

    W1: Float[Array, "d_out hidden"]
    W2: Float[Array, "hidden d_in"]
    W3: Float[Array, "hidden d_in"]
    activation: Callable[[Array], Array] = eqx.field(static=True)
    residual: bool = eqx.field(static=True)
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        key: PRNGKeyArray,
        hidden: int | None = None,
        activation: Callable[[Array], Array] = jax.nn.gelu,
        residual: bool | Literal["auto"] = "auto",
        init_std: float | None = None,
    ):
        _check_dims(d_in, d_out, "GatedMLPMemory")
        hidden = 4 * d_out if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"GatedMLPMemory: `hidden` must be >= 1; got {hidden}")
        k1, k2, k3 = jax.random.split(key, 3)
        std_in = 1.0 / math.sqrt(d_in) if init_std is None else init_std
        std_hidden = 1.0 / math.sqrt(hidden) if init_std is None else init_std
        self.W1 = _normal(k1, (d_out, hidden), std_hidden)
        self.W2 = _normal(k2, (hidden, d_in), std_in)
        self.W3 = _normal(k3, (hidden, d_in), std_in)
        self.activation = activation
        self.residual = _resolve_residual(residual, d_in, d_out, "GatedMLPMemory")
        self.d_in = d_in
        self.d_out = d_out

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " d_out"]:
        out = self.W1 @ (self.activation(self.W2 @ x) * (self.W3 @ x))
        return x + out if self.residual else out


def _check_dims(d_in: int, d_out: int, name: str) -> None:
    if d_in < 1 or d_out < 1:
        raise ValueError(f"{name}: `d_in` and `d_out` must be >= 1; got {d_in}, {d_out}")
