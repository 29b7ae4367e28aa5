"""The attentional biases against NumPy closed forms, values and gradients (the gradient is what
the inner loop uses): Huber in both regions (Miras Eq 25) and the smoothed lp (Miras Eqs 21-24)
for p in {1.5, 3} with eps > 0. float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import atlas_eqx as ae


def _residual_pairs(seed: int, delta: float):
    """Predictions and targets whose residuals fall on both sides of `delta`, both signs."""
    rng = np.random.default_rng(seed)
    target = rng.standard_normal(8)
    residual = np.array([0.1, -0.3, 0.49, -0.2, 0.8, -1.7, 3.0, -0.51]) * (delta / 0.5)
    return jnp.asarray(target + residual), jnp.asarray(target), residual


@pytest.mark.parametrize("delta", [0.5, 2.0])
def test_huber_value_and_gradient_in_both_regions(delta):
    prediction, target, r = _residual_pairs(0, delta)
    inside = np.abs(r) <= delta
    assert inside.any() and (~inside).any()
    value = np.sum(np.where(inside, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)))
    slope = np.where(inside, r, delta * np.sign(r))
    objective = ae.huber(delta)
    np.testing.assert_allclose(objective(prediction, target), value, rtol=1e-14)
    np.testing.assert_allclose(jax.grad(objective)(prediction, target), slope, rtol=1e-14)


@pytest.mark.parametrize("p", [1.5, 3.0])
@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_lp_value_and_gradient(p, eps):
    prediction, target, r = _residual_pairs(1, 0.5)
    value = np.sum((r**2 + eps) ** (p / 2)) / p
    slope = r * (r**2 + eps) ** (p / 2 - 1)
    objective = ae.lp(p, eps)
    np.testing.assert_allclose(objective(prediction, target), value, rtol=1e-13)
    np.testing.assert_allclose(jax.grad(objective)(prediction, target), slope, rtol=1e-13)


def test_l2_and_dot_closed_forms():
    prediction, target, r = _residual_pairs(2, 0.5)
    np.testing.assert_allclose(ae.l2(prediction, target), 0.5 * np.sum(r**2), rtol=1e-14)
    np.testing.assert_allclose(jax.grad(ae.l2)(prediction, target), r, rtol=1e-14)
    np.testing.assert_allclose(ae.dot(prediction, target), -(prediction @ target), rtol=1e-14)
    np.testing.assert_allclose(jax.grad(ae.dot)(prediction, target), -target, rtol=1e-14)
