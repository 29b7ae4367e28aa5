"""The divergence diagnostic (`diagnose_scan`, `MemoryLayer.diagnose`) against `omega_scan`
itself: the same reads, the weight norms of split calls, and the first non-finite step of a
planted divergence. float64."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import atlas_eqx as ae
import optimizers as iopt


T, D = 23, 4


def _inputs(seed: int, lr: float):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((T, D))) for _ in range(3))
    return q, k, v, jnp.full(T, lr), jnp.asarray(rng.uniform(0.9, 1.0, T))


def _norm(memory) -> float:
    leaves = jax.tree.leaves(eqx.filter(memory, eqx.is_inexact_array))
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in leaves)))


@pytest.mark.parametrize("optimizer", ["gd", "momentum"])
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_reads_and_norms_are_those_of_omega_scan(optimizer, chunk_size):
    q, k, v, lr, decay = _inputs(0, 0.05)
    memory = ae.MLPMemory(D, D, key=jax.random.key(1), hidden=8)
    learner = iopt.momentum() if optimizer == "momentum" else iopt.gd()
    momentum = jnp.full(T, 0.8) if optimizer == "momentum" else None
    rule: dict[str, Any] = dict(optimizer=learner, window=2, chunk_size=chunk_size)
    report = ae.diagnose_scan(memory, q, k, v, lr, decay, momentum, **rule)
    y, _ = ae.omega_scan(memory, q, k, v, lr, decay, momentum, **rule)
    np.testing.assert_allclose(report.outputs, y, rtol=1e-12, atol=1e-12)
    ends = list(range(chunk_size, T, chunk_size)) + [T]
    np.testing.assert_array_equal(report.chunk_ends, ends)
    for end, norm in zip(ends, np.asarray(report.weight_norms), strict=True):
        m = None if momentum is None else momentum[:end]
        _, state = ae.omega_scan(
            memory, q[:end], k[:end], v[:end], lr[:end], decay[:end], m, **rule
        )
        np.testing.assert_allclose(norm, _norm(state.memory), rtol=1e-12)
    assert int(report.first_nonfinite_step) == 0
    np.testing.assert_allclose(report.initial_norm, _norm(memory), rtol=1e-12)
    np.testing.assert_allclose(
        report.growth, np.max(report.weight_norms) / report.initial_norm, rtol=1e-12
    )


def test_a_planted_divergence_is_found_at_its_first_non_finite_step():
    q, k, v, lr, decay = _inputs(2, 1e15)
    k = 30.0 * k  # eta ||k||^2 ~ 4e18: each GD step overshoots by that; inf within ~17 steps
    memory = ae.LinearMemory(D, D, key=jax.random.key(3))
    y, _ = ae.omega_scan(memory, q, k, v, lr, jnp.ones(T), chunk_size=1)
    finite = np.all(np.isfinite(np.asarray(y)), axis=-1)
    assert not finite.all(), "the planted divergence must reach inf within T steps"
    expected = int(np.argmin(finite)) + 1
    report = ae.diagnose_scan(memory, q, k, v, lr, jnp.ones(T), chunk_size=1)
    assert int(report.first_nonfinite_step) == expected
    assert float(report.growth) > 1e100


def test_the_layer_diagnoses_every_head():
    layer = ae.presets.titans(16, 2, key=jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(4).standard_normal((12, 16)))
    report = layer.diagnose(x)
    n_chunks = -(-12 // layer.config.chunk_size)
    assert report.outputs.shape == (2, 12, 8) and report.weight_norms.shape == (2, n_chunks)
    inputs = layer.memory_inputs(x)
    c = layer.config
    head = ae.diagnose_scan(
        jax.tree.map(lambda a: a[1] if isinstance(a, jax.Array) else a, layer.memory),
        inputs.q[1],
        inputs.k[1],
        inputs.v[1],
        inputs.lr[1],
        inputs.decay[1],
        None if inputs.momentum is None else inputs.momentum[1],
        None if inputs.gamma is None else inputs.gamma[1],
        feature_map=jax.tree.map(
            lambda a: a[1] if isinstance(a, jax.Array) else a, layer.feature_map
        ),
        objective=c.objective_function(),
        optimizer=c.inner_optimizer(),
        window=c.window,
        chunk_size=c.chunk_size,
        decay_first=c.decay_first,
    )
    np.testing.assert_allclose(report.weight_norms[1], head.weight_norms, rtol=1e-12)
    np.testing.assert_allclose(report.outputs[1], head.outputs, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="memory='kernel' has no fast weights"):
        ae.presets.deep_transformer(16, 2, key=jax.random.key(0)).diagnose(x)


@pytest.mark.parametrize("lr", [0.5, 1.0])
def test_layer_norm_keeps_a_runaway_inner_loop_finite(lr):
    """The failure `MemoryLayerConfig.memory_layer_norm` fixes, reproduced on unit keys
    (d 8, T 256, momentum 0.9, no 1 - theta scaling): the MLP memory of Eq 42 as printed runs
    away within 20 tokens (its curvature grows with its weights until the step overshoots);
    with the branch layer-normalised the same inputs stay finite and the weights grow
    less than 1000-fold (about t^(1/4): each step adds eta^2 |g|^2 to |W|^2, |g| ~ 1/|W|)."""
    d, length = 8, 256
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((length, d)) for _ in range(2))
    q, k = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (q, k))
    v = rng.standard_normal((length, d))
    args = (q, k, v, np.full(length, lr), np.ones(length), np.full(length, 0.9))
    reports = {
        norm: ae.diagnose_scan(
            ae.MLPMemory(d, d, key=jax.random.PRNGKey(0), layer_norm=norm),
            *args,
            optimizer=iopt.momentum(),
        )
        for norm in (False, True)
    }
    assert 0 < int(reports[False].first_nonfinite_step) <= 20
    assert int(reports[True].first_nonfinite_step) == 0
    assert 1.0 < float(reports[True].growth) < 1000.0
    assert np.all(np.isfinite(np.asarray(reports[True].outputs)))
