import jax.numpy as jnp
from jax.tree_util import Partial
from jaxtyping import Array, Float, Scalar


def l2(prediction: Float[Array, " d_v"], target: Float[Array, " d_v"]) -> Scalar:
    r"""The l2 attentional bias with the 1/2 (digest A-20): $\tfrac12\|p - t\|_2^2$.

    The paper writes $\|\cdot\|_2^2$; the factor 2 is absorbed into $\eta$.
    """
    return 0.5 * jnp.sum((prediction - target) ** 2)


def dot(prediction: Float[Array, " d_v"], target: Float[Array, " d_v"]) -> Scalar:
    r"""The Hebbian bias (ATLAS Eq 19, sign fixed per digest 2.4): $-\langle p, t\rangle$.

    One GD step with a linear memory gives $W_t = \alpha_t W_{t-1} + \eta_t v_t\phi(k_t)^\top$.
    """
    return -jnp.sum(prediction * target)


def _lp(prediction, target, *, p: float, eps: float):
    return jnp.sum(((prediction - target) ** 2 + eps) ** (0.5 * p)) / p


def lp(p: float = 3.0, eps: float = 1e-6):
    r"""The smoothed $\ell_p$ bias of Moneta (Miras Eqs 21-24): $\tfrac1p\sum_j((p_j-t_j)^2+\epsilon)^{p/2}$.

    $|x| \approx \sqrt{x^2+\epsilon}$ keeps it differentiable at 0; `lp(2.0, 0.0)` equals `l2`.
    """
    if p < 1:
        raise ValueError(f"lp: `p` must be >= 1; got {p}")
    if eps < 0:
        raise ValueError(f"lp: `eps` must be >= 0; got {eps}")
    return Partial(_lp, p=float(p), eps=float(eps))


def _huber(prediction, target, *, delta: float):
    residual = jnp.abs(prediction - target)
    quadratic = 0.5 * residual**2
    linear = delta * (residual - 0.5 * delta)
    return jnp.sum(jnp.where(residual <= delta, quadratic, linear))


def huber(delta: float = 1.0):
    r"""The Huber bias of Yaad (Miras Eq 25), per coordinate:
    $\tfrac12 r^2$ if $|r| \le \delta$, else $\delta(|r| - \tfrac12\delta)$, summed.
    """
    if delta <= 0:
        raise ValueError(f"huber: `delta` must be > 0; got {delta}")
    return Partial(_huber, delta=float(delta))
