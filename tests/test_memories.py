"""The memories compute exactly their documented formulas (ATLAS Eqs 42-43, digest A-4, A-6,
A-32), with the documented shapes, initialisation and residual logic.

Each formula is written again here in NumPy (or plain `jnp`) and compared in float64.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jaxtyping import TypeCheckError

import atlas_eqx as ae


SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
DIMS = st.sampled_from([1, 3])  # few shapes: each new shape compiles


def _gelu_tanh(x):
    """GELU, tanh approximation (jax.nn.gelu's default), written out in NumPy."""
    x = np.asarray(x)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


@eqx.filter_jit
def _apply(memory, x):
    return memory(x)


def _x(seed: int, d: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(d))


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------------------------
# LinearMemory: M(x) = W x, W of shape (d_out, d_in), no bias
# --------------------------------------------------------------------------------------------


@given(seed=SEEDS, d_in=DIMS, d_out=DIMS)
def test_linear_memory_is_w_times_x(seed, d_in, d_out):
    memory = ae.LinearMemory(d_in, d_out, key=jax.random.PRNGKey(seed % 1000))
    assert memory.weight.shape == (d_out, d_in)
    assert (memory.d_in, memory.d_out) == (d_in, d_out)
    leaves = jax.tree.leaves(eqx.filter(memory, eqx.is_inexact_array))
    assert len(leaves) == 1  # exactly one weight matrix, no bias
    x = _x(seed, d_in)
    W = np.asarray(memory.weight)
    _close(_apply(memory, x), W @ np.asarray(x))


def test_linear_memory_initialisation():
    key = jax.random.PRNGKey(0)
    d_in, d_out = 64, 256
    default = ae.LinearMemory(d_in, d_out, key=key)
    assert default.weight.dtype == jnp.float64  # x64 is on in the test suite
    np.testing.assert_allclose(np.std(np.asarray(default.weight)), 1 / math.sqrt(d_in), rtol=0.05)
    assert abs(np.mean(np.asarray(default.weight))) < 0.01
    scaled = ae.LinearMemory(d_in, d_out, key=key, init_std=0.3)
    np.testing.assert_allclose(
        np.asarray(scaled.weight), 0.3 * math.sqrt(d_in) * np.asarray(default.weight), rtol=1e-12
    )
    zero = ae.LinearMemory(d_in, d_out, key=key, init_std=0.0)
    np.testing.assert_array_equal(np.asarray(zero.weight), np.zeros((d_out, d_in)))
    # The key decides W_0: same key, same weights; another key, other weights.
    np.testing.assert_array_equal(ae.LinearMemory(d_in, d_out, key=key).weight, default.weight)
    assert not np.allclose(
        ae.LinearMemory(d_in, d_out, key=jax.random.PRNGKey(1)).weight, default.weight
    )


# --------------------------------------------------------------------------------------------
# MLPMemory: M(x) = [x +] W_L sigma(... sigma(W_1 x))
# --------------------------------------------------------------------------------------------


def _mlp_reference(weights, x, activation, residual):
    h = x
    for W in weights[:-1]:
        h = activation(W @ h)
    out = weights[-1] @ h
    return x + out if residual else out


@given(
    seed=SEEDS,
    d_in=DIMS,
    d_out=DIMS,
    depth=st.sampled_from([1, 3]),
    hidden=st.sampled_from([None, 2]),
)
def test_mlp_memory_formula_shapes_and_residual(seed, d_in, d_out, depth, hidden):
    memory = ae.MLPMemory(
        d_in, d_out, key=jax.random.PRNGKey(seed % 1000), depth=depth, hidden=hidden
    )
    width = 4 * d_out if hidden is None else hidden  # digest A-6: 4 d_v by default
    sizes = [d_in] + [width] * (depth - 1) + [d_out]
    assert [w.shape for w in memory.weights] == [
        (n_out, n_in) for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    assert memory.residual == (d_in == d_out)  # "auto": on exactly when well-typed
    x = _x(seed, d_in)
    weights = [np.asarray(w) for w in memory.weights]
    expected = _mlp_reference(weights, np.asarray(x), _gelu_tanh, memory.residual)
    _close(_apply(memory, x), expected)


def test_mlp_memory_depth_two_is_the_papers_eq_42():
    """depth=2 with d_in = d_out: x + W_1 GELU(W_2 x), where the paper's W_2 is weights[0]."""
    memory = ae.MLPMemory(3, 3, key=jax.random.PRNGKey(0), hidden=5)
    W2, W1 = memory.weights
    assert W2.shape == (5, 3) and W1.shape == (3, 5)
    x = _x(1, 3)
    _close(memory(x), x + W1 @ jnp.asarray(_gelu_tanh(W2 @ x)))


def _layer_norm_reference(u):
    centred = u - u.mean()
    return centred / np.sqrt(np.mean(centred**2) + 1e-5)


@given(seed=SEEDS, depth=st.sampled_from([1, 2]), residual=st.booleans())
def test_mlp_memory_layer_norm_is_x_plus_ln_of_the_branch(seed, depth, residual):
    """`layer_norm=True` (A-5, Miras's form): x + LN(W_L sigma(... W_1 x)), LN without a gain."""
    memory = ae.MLPMemory(
        4, 4, key=jax.random.PRNGKey(seed % 1000), depth=depth, residual=residual, layer_norm=True
    )
    x = _x(seed, 4)
    weights = [np.asarray(w) for w in memory.weights]
    branch = _mlp_reference(weights, np.asarray(x), _gelu_tanh, False)
    expected = _layer_norm_reference(branch) + (np.asarray(x) if residual else 0.0)
    _close(_apply(memory, x), expected)
    gated = ae.GatedMLPMemory(4, 4, key=jax.random.PRNGKey(seed % 1000), layer_norm=True)
    W1, W2, W3 = (np.asarray(w) for w in (gated.W1, gated.W2, gated.W3))
    gated_branch = W1 @ (_gelu_tanh(W2 @ np.asarray(x)) * (W3 @ np.asarray(x)))
    _close(_apply(gated, x), np.asarray(x) + _layer_norm_reference(gated_branch))


@given(seed=SEEDS, scale=st.sampled_from([0.5, 3.0]))
def test_layer_norm_memory_gradient_is_orthogonal_to_the_last_matrix(seed, scale):
    """Why the norm keeps inner loops finite: the read does not change when the last matrix is
    scaled (up to LN's epsilon), so the inner loss's gradient with respect to that matrix is
    orthogonal to it, <grad, W_L> = 0, and a GD step can only grow its norm, by a step that
    shrinks as it grows."""
    key = jax.random.PRNGKey(seed % 1000)
    memory = ae.MLPMemory(4, 4, key=key, init_std=1.0, layer_norm=True)  # var(branch) >> eps
    x, v = _x(seed, 4), _x(seed + 1, 4)
    scaled = eqx.tree_at(lambda m: m.weights[-1], memory, scale * memory.weights[-1])
    np.testing.assert_allclose(np.asarray(scaled(x)), np.asarray(memory(x)), rtol=1e-4, atol=1e-4)
    grad = eqx.filter_grad(lambda m: ae.l2(m(x), v))(memory)
    inner = float(jnp.sum(grad.weights[-1] * memory.weights[-1]))
    size = float(jnp.linalg.norm(grad.weights[-1]) * jnp.linalg.norm(memory.weights[-1]))
    assert abs(inner) < 1e-4 * size and size > 0
    plain = ae.MLPMemory(4, 4, key=key, init_std=1.0)
    plain_grad = eqx.filter_grad(lambda m: ae.l2(m(x), v))(plain)
    assert abs(float(jnp.sum(plain_grad.weights[-1] * plain.weights[-1]))) > 1e-3  # not by chance


def test_layer_norm_memory_has_no_curvature_bound():
    memory = ae.MLPMemory(3, 3, key=jax.random.PRNGKey(0), layer_norm=True)
    with pytest.raises(ValueError, match="sampled_curvature"):
        memory.curvature_bound()
    with pytest.raises(ValueError, match="memory_layer_norm"):
        ae.MemoryLayerConfig(
            d_model=8, n_heads=2, memory_layer_norm=True, lr_normalization="curvature"
        )
    with pytest.raises(TypeCheckError, match="parameter 'memory_layer_norm'"):
        ae.MemoryLayerConfig(d_model=8, n_heads=2, memory_layer_norm="yes")  # pyright: ignore


@pytest.mark.parametrize("residual", [True, False, "auto"])
def test_mlp_memory_residual_switch(residual):
    square = ae.MLPMemory(3, 3, key=jax.random.PRNGKey(0), residual=residual)
    assert square.residual == (residual in (True, "auto"))
    x = _x(2, 3)
    without = _mlp_reference(list(square.weights), x, jax.nn.gelu, False)
    _close(square(x), x + without if square.residual else without)
    if residual is not True:
        rectangular = ae.MLPMemory(3, 2, key=jax.random.PRNGKey(0), residual=residual)
        assert rectangular.residual is False


def test_mlp_memory_custom_activation_and_zero_init():
    memory = ae.MLPMemory(2, 2, key=jax.random.PRNGKey(0), depth=3, hidden=3, activation=jnp.tanh)
    x = _x(3, 2)
    W1, W2, W3 = memory.weights
    _close(memory(x), x + W3 @ jnp.tanh(W2 @ jnp.tanh(W1 @ x)))
    zero = ae.MLPMemory(2, 2, key=jax.random.PRNGKey(0), init_std=0.0)
    for w in zero.weights:
        np.testing.assert_array_equal(np.asarray(w), 0.0)
    _close(zero(x), x)  # residual with zero weights: the identity
    zero_rect = ae.MLPMemory(2, 3, key=jax.random.PRNGKey(0), init_std=0.0)
    _close(zero_rect(x), jnp.zeros(3))


def test_mlp_memory_default_init_scale_is_one_over_sqrt_fan_in():
    memory = ae.MLPMemory(64, 64, key=jax.random.PRNGKey(0), hidden=256)
    W_first, W_last = memory.weights
    np.testing.assert_allclose(np.std(np.asarray(W_first)), 1 / 8, rtol=0.05)
    np.testing.assert_allclose(np.std(np.asarray(W_last)), 1 / 16, rtol=0.05)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"depth": 0}, "`depth` must be >= 1"), ({"hidden": 0}, "`hidden` must be >= 1")],
)
def test_mlp_memory_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ae.MLPMemory(3, 3, key=jax.random.PRNGKey(0), **kwargs)


@pytest.mark.parametrize("cls", [ae.LinearMemory, ae.MLPMemory, ae.GatedMLPMemory])
def test_memories_reject_empty_dimensions(cls):
    with pytest.raises(ValueError, match="`d_in` and `d_out` must be >= 1"):
        cls(0, 3, key=jax.random.PRNGKey(0))


# --------------------------------------------------------------------------------------------
# GatedMLPMemory: M(x) = [x +] W_1 (GELU(W_2 x) * W_3 x)   (Atlas++, Eq 43)
# --------------------------------------------------------------------------------------------


@given(seed=SEEDS, d_in=DIMS, d_out=DIMS, hidden=st.sampled_from([None, 2]))
def test_gated_mlp_memory_formula(seed, d_in, d_out, hidden):
    memory = ae.GatedMLPMemory(d_in, d_out, key=jax.random.PRNGKey(seed % 1000), hidden=hidden)
    width = 4 * d_out if hidden is None else hidden
    assert memory.W1.shape == (d_out, width)
    assert memory.W2.shape == memory.W3.shape == (width, d_in)  # digest A-32
    assert memory.residual == (d_in == d_out)
    x = np.asarray(_x(seed, d_in))
    W1, W2, W3 = (np.asarray(w) for w in (memory.W1, memory.W2, memory.W3))
    out = W1 @ (_gelu_tanh(W2 @ x) * (W3 @ x))
    _close(_apply(memory, jnp.asarray(x)), x + out if memory.residual else out)


def test_gated_mlp_memory_options():
    x = _x(4, 3)
    plain = ae.GatedMLPMemory(
        3, 3, key=jax.random.PRNGKey(0), residual=False, activation=jax.nn.sigmoid
    )
    assert plain.residual is False
    _close(plain(x), plain.W1 @ (jax.nn.sigmoid(plain.W2 @ x) * (plain.W3 @ x)))
    zero = ae.GatedMLPMemory(3, 3, key=jax.random.PRNGKey(0), init_std=0.0)
    for w in (zero.W1, zero.W2, zero.W3):
        np.testing.assert_array_equal(np.asarray(w), 0.0)
    _close(zero(x), x)
    with pytest.raises(ValueError, match="`hidden` must be >= 1"):
        ae.GatedMLPMemory(3, 3, key=jax.random.PRNGKey(0), hidden=0)
    # W_2 and W_3 are drawn independently.
    assert not np.allclose(np.asarray(plain.W2), np.asarray(plain.W3))


# --------------------------------------------------------------------------------------------
# Shared behaviour
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp", "gated"])
def test_memory_checks_its_input_dimension_and_maps_over_tokens_with_vmap(kind):
    key = jax.random.PRNGKey(0)
    memory = {
        "linear": ae.LinearMemory(3, 2, key=key),
        "mlp": ae.MLPMemory(3, 2, key=key),
        "gated": ae.GatedMLPMemory(3, 2, key=key),
    }[kind]
    X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    _close(jax.vmap(memory)(X), jnp.stack([memory(x) for x in X]))
    with pytest.raises(TypeError):  # the matrix product (or jaxtyping) rejects d != d_in
        memory(jnp.ones(4))
    # Every array leaf is a fast weight the inner optimiser trains.
    grads = eqx.filter_grad(lambda m: jnp.sum(m(X[0]) ** 2))(memory)
    for g in jax.tree.leaves(grads):
        assert np.any(np.asarray(g) != 0.0)
