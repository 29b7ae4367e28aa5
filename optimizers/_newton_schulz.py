import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


JORDAN_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
CUBIC_COEFFICIENTS = (1.5, -0.5, 0.0)


def _safe_frobenius_norm(x: Float[Array, "... m n"]) -> Float[Array, "... 1 1"]:
    # sqrt has an infinite derivative at 0; the double `where` keeps NS(0) and its gradient finite.
    squared = jnp.sum(x * x, axis=(-2, -1), keepdims=True)
    is_zero = squared == 0
    return jnp.where(is_zero, 0.0, jnp.sqrt(jnp.where(is_zero, 1.0, squared)))


def _gram(X: Float[Array, "*batch m n"], Y: Float[Array, "*batch m n"]) -> Array:
    r"""$XY^\top$."""
    return jnp.einsum("...ik,...jk->...ij", X, Y)


def _symmetric_times(S: Float[Array, "*batch m m"], Y: Float[Array, "*batch m n"]) -> Array:
    r"""$S^\top Y$, which is $SY$ for a symmetric $S$. Written as $S^\top Y$ so that its
    transpose (reverse mode) is the plain product $S\bar Y$ with no transposed copy of $S$."""
    return jnp.einsum("...ji,...jk->...ik", S, Y)


def _polynomial(X: Array, coefficients: Sequence[float]) -> tuple[Array, Array]:
    r"""$A = XX^\top$ and $P = aI + bA + cA^2$, so that one NS step is $X \mapsto PX$."""
    a, b, c = coefficients
    A = _gram(X, X)
    identity = jnp.eye(A.shape[-1], dtype=A.dtype)
    return A, a * identity + b * A + c * (A @ A)


def _iterate_plain(X: Array, steps: int, coefficients: Sequence[float]) -> Array:
    """The NS steps as written, differentiated by JAX: the oracle `_iterate` is tested against."""

    def iteration(X, _):
        A = X @ jnp.swapaxes(X, -1, -2)
        a, b, c = coefficients
        return a * X + (b * A + c * (A @ A)) @ X, None

    return jax.lax.scan(iteration, X, None, length=steps)[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _iterate(X: Array, steps: int, coefficients: Sequence[float]) -> Array:
    """`_iterate_plain` with a hand-written tangent rule (forward and reverse mode)."""
    for _ in range(steps):
        X = _polynomial(X, coefficients)[1] @ X
    return X


@_iterate.defjvp
def _iterate_jvp(steps, coefficients, primals, tangents):
    r"""One step $X' = PX$ has tangent $\dot X' = P\dot X + \dot PX$ with
    $\dot A = \mathrm{sym}(X\dot X^\top)$ and $\dot P = b\dot A + c\,\mathrm{sym}(A\dot A)$, where
    $\mathrm{sym}(M) = M + M^\top$ ($A$ and $\dot A$ are symmetric, so $A\dot A + \dot AA =
    \mathrm{sym}(A\dot A)$). Autodiff of the plain step instead forms both products and
    transposes every batched matrix; `atlas-eqx bench newton-schulz` times the two."""
    (X,), (X_dot,) = primals, tangents
    _, b, c = coefficients
    for _ in range(steps):
        A, P = _polynomial(X, coefficients)
        X_times_tangent = _gram(X, X_dot)
        A_dot = X_times_tangent + jnp.swapaxes(X_times_tangent, -1, -2)
        A_times_A_dot = _symmetric_times(A, A_dot)
        P_dot = b * A_dot + c * (A_times_A_dot + jnp.swapaxes(A_times_A_dot, -1, -2))
        X, X_dot = P @ X, _symmetric_times(P, X_dot) + P_dot @ X
    return X, X_dot


def newton_schulz(
    G: Float[Array, "*batch m n"],
    steps: int = 5,
    coefficients: Sequence[float] = JORDAN_COEFFICIENTS,
    eps: float = 1e-7,
) -> Float[Array, "*batch m n"]:
    r"""Muon's Newton-Schulz iteration (ATLAS Eqs 32, 40, 57: "NewtonSchulz-k").

    $$X_0 = G / (\|G\|_F + \epsilon),\qquad X_{j+1} = aX_j + (bA_j + cA_j^2)X_j,\quad A_j = X_jX_j^\top$$

    The iteration runs on the wide orientation: a matrix with more rows than columns is
    transposed first and transposed back at the end, exactly as in Keller Jordan's
    `zeropower_via_newtonschulz5`. With the default (Jordan) coefficients the result is *not*
    the polar factor: its singular values settle in roughly [0.68, 1.14] (digest I-34). The
    classical cubic `(1.5, -0.5, 0.0)` converges to the polar factor $UV^\top$ (I-35).

    Leading axes are batch axes. `newton_schulz(0) == 0` with finite gradients. Each step is
    computed as $X_{j+1} = (aI + bA_j + cA_j^2)X_j$, and derivatives (forward and reverse mode)
    come from a hand-written tangent rule rather than from differentiating the steps; both are
    tested against the plain iteration in float64.

    **Arguments:**

    - `G`: a matrix, or a batch of matrices, of shape `(*batch, m, n)`.
    - `steps`: the number of iterations $k$ (NS-5 is `steps=5`).
    - `coefficients`: the odd polynomial's `(a, b, c)`, as Python numbers.
    - `eps`: added to the Frobenius norm in the pre-normalisation.
    """
    if G.ndim < 2:
        raise ValueError(
            f"newton_schulz: `G` must have at least 2 dimensions (m, n); got {G.shape}"
        )
    if steps < 0:
        raise ValueError(f"newton_schulz: `steps` must be >= 0; got {steps}")
    if len(coefficients) != 3:
        raise ValueError(f"newton_schulz: `coefficients` must be (a, b, c); got {coefficients}")
    return _orthogonalise(G, steps, tuple(float(c) for c in coefficients), eps, _iterate)


def _orthogonalise(G: Array, steps: int, coefficients: tuple, eps: float, iterate) -> Array:
    """`newton_schulz` with the steps run by `iterate` (`_iterate`, or `_iterate_plain` for
    the tests and `atlas-eqx bench newton-schulz`)."""
    transpose = G.shape[-2] > G.shape[-1]
    X = jnp.swapaxes(G, -1, -2) if transpose else G
    X = iterate(X / (_safe_frobenius_norm(X) + eps), steps, coefficients)
    return jnp.swapaxes(X, -1, -2) if transpose else X
