"""optax transformations as inner learners on the fast paths (`optimizers.from_optax`).

The sequential path runs the optax transformation itself; the chunked and Pallas paths run the
equivalent built-in learner found by `from_optax`'s linear-form identification. They must agree
in float64 at 1e-10, and every transformation without such a form must be refused by the fast
paths with an error that names it.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import atlas_eqx as ae
import feature_maps as fm
import optimizers as iopt


T, D = 11, 4  # T not a multiple of the chunk


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((T, D)) / np.sqrt(D) for _ in range(2))
    v = rng.standard_normal((T, D))
    lr, decay = rng.uniform(0.05, 0.4, T), rng.uniform(0.8, 1.0, T)
    gamma = rng.uniform(0.3, 1.0, T)
    return q, k, v, lr, decay, gamma


LINEAR = {
    "sgd": (optax.sgd(0.7), iopt.LinearForm(0.0, 0.0, -0.7)),
    "sgd_momentum": (optax.sgd(0.7, momentum=0.8), iopt.LinearForm(0.8, -0.7, 0.0)),
    "trace": (optax.trace(0.6), iopt.LinearForm(0.6, 1.0, 0.0)),
    "nesterov": (
        optax.sgd(0.7, momentum=0.8, nesterov=True),
        iopt.LinearForm(0.8, -0.7 * 0.8, -0.7),
    ),
}
NONLINEAR = {
    "adam": (optax.adam(1e-2), "ScaleByAdamState"),
    "clipped_sgd": (optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), "chain"),
    "weight_decay": (optax.chain(optax.add_decayed_weights(0.1), optax.sgd(1.0)), "chain"),
    "schedule": (optax.sgd(optax.linear_schedule(1.0, 0.1, 5)), "ScaleByScheduleState"),
}


@pytest.mark.parametrize("name", LINEAR)
def test_linear_forms_are_identified(name):
    transformation, expected = LINEAR[name]
    form = iopt.from_optax(transformation).linear_form
    assert form is not None
    np.testing.assert_allclose(form, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NONLINEAR)
def test_other_transformations_have_no_linear_form(name):
    assert iopt.from_optax(NONLINEAR[name][0]).linear_form is None


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize(
    "memory_kind, method, chunk_size",
    [
        ("linear", "chunked", 1),  # the exact form (gd) or the dual form (momentum)
        ("linear", "chunked", 4),
        ("linear", "pallas", 4),
        ("mlp", "chunked", 4),
    ],
)
def test_fast_paths_equal_the_optax_transformation(name, memory_kind, method, chunk_size):
    q, k, v, lr, decay, gamma = _inputs(0)
    key = jax.random.key(1)
    if memory_kind == "linear":
        memory = ae.LinearMemory(D, D, key=key)
    else:
        memory = ae.MLPMemory(D, D, key=key, hidden=8)
    learner = iopt.from_optax(LINEAR[name][0])
    rule: dict[str, Any] = dict(optimizer=learner, objective=ae.l2, window=2)
    rule.update(chunk_size=chunk_size, feature_map=fm.Identity())
    split = 8 if chunk_size == 4 else 5  # at a chunk boundary

    def run(method):
        ys, state = [], None
        for part in (slice(0, split), slice(split, T)):
            tokens = (q[part], k[part], v[part], lr[part], decay[part])
            y, state = ae.omega_scan(
                memory, *tokens, None, gamma[part], **rule, method=method, state=state
            )
            ys.append(y)
        return jnp.concatenate(ys), state

    expected, _ = run("sequential")
    actual, _ = run(method)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-10)

    # Outer gradients agree too (relative to their size: an MLP memory's reach the hundreds).
    def loss(values, method):
        y, _ = ae.omega_scan(memory, q, k, values, lr, decay, None, gamma, **rule, method=method)
        return jnp.sum(jnp.sin(y))

    np.testing.assert_allclose(
        jax.grad(loss)(jnp.asarray(v), method),
        jax.grad(loss)(jnp.asarray(v), "sequential"),
        rtol=1e-9,
        atol=1e-10,
    )


@pytest.mark.parametrize("name", NONLINEAR)
def test_fast_paths_refuse_other_transformations_by_name(name):
    transformation, part = NONLINEAR[name]
    q, k, v, lr, decay, _ = _inputs(0)
    memory = ae.LinearMemory(D, D, key=jax.random.key(1))
    learner = iopt.from_optax(transformation)
    y, _ = ae.omega_scan(memory, q, k, v, lr, decay, optimizer=learner)
    assert np.all(np.isfinite(y))
    with pytest.raises(ValueError, match=f"{part}.*method='sequential'"):
        ae.omega_scan(memory, q, k, v, lr, decay, optimizer=learner, method="chunked")


def test_a_sequential_optax_state_is_not_resumed_by_a_fast_path():
    q, k, v, lr, decay, _ = _inputs(0)
    memory = ae.LinearMemory(D, D, key=jax.random.key(1))
    learner = iopt.from_optax(optax.sgd(0.7, momentum=0.8))
    _, state = ae.omega_scan(memory, q, k, v, lr, decay, optimizer=learner)
    with pytest.raises(ValueError, match="`state` holds another learner's state"):
        ae.omega_scan(memory, q, k, v, lr, decay, optimizer=learner, method="chunked", state=state)


@pytest.mark.parametrize(
    "memory_kind, method, decay_first",
    [
        ("linear", "chunked", False),
        ("linear", "chunked", True),
        ("linear", "pallas", False),
        ("mlp", "chunked", False),
        ("mlp", "chunked", True),  # the materialised form
    ],
)
def test_nesterov_momentum_with_per_token_theta_equals_sequential(memory_kind, method, decay_first):
    q, k, v, lr, decay, gamma = _inputs(1)
    theta = np.random.default_rng(2).uniform(0.0, 0.95, T)
    key = jax.random.key(3)
    if memory_kind == "linear":
        memory = ae.LinearMemory(D, D, key=key)
    else:
        memory = ae.MLPMemory(D, D, key=key, hidden=8)
    rule: dict[str, Any] = dict(optimizer=iopt.momentum(nesterov=True), window=2, chunk_size=4)
    rule.update(decay_first=decay_first)
    expected, expected_state = ae.omega_scan(memory, q, k, v, lr, decay, theta, gamma, **rule)
    actual, state = ae.omega_scan(memory, q, k, v, lr, decay, theta, gamma, **rule, method=method)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-10)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    # Nesterov's step is not plain momentum's.
    plain, _ = ae.omega_scan(
        memory, q, k, v, lr, decay, theta, gamma, **{**rule, "optimizer": iopt.momentum()}
    )
    assert np.max(np.abs(plain - expected)) > 1e-3
