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

    Leading axes are batch axes. `newton_schulz(0) == 0` with finite gradients.

    **Arguments:**

    - `G`: a matrix, or a batch of matrices, of shape `(*batch, m, n)`.
    - `steps`: the number of iterations $k$ (NS-5 is `steps=5`).
    - `coefficients`: the odd polynomial's `(a, b, c)`.
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
    a, b, c = coefficients
    transpose = G.shape[-2] > G.shape[-1]
    X = jnp.swapaxes(G, -1, -2) if transpose else G
    X = X / (_safe_frobenius_norm(X) + eps)

    def iteration(X, _):
        A = X @ jnp.swapaxes(X, -1, -2)
        B = b * A + c * (A @ A)
        return a * X + B @ X, None

    X, _ = jax.lax.scan(iteration, X, None, length=steps)
    return jnp.swapaxes(X, -1, -2) if transpose else X
