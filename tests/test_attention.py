"""`AttentionLayer`, `causal_attention` and `rope` (the Transformer++ mixer; ATLAS Eqs 17-18,
Titans Eq 19) against independent references, in float64:

- `jax.nn.dot_product_attention` with `is_causal` and `local_window_size` (its softmax runs in
  float32 even for float64 inputs, so it is compared at 2e-6) and a float64 masked softmax
  written here (1e-12);
- RoPE as a complex rotation $z_j e^{i m\\theta_j}$ of the pairs $(x_j, x_{j+d/2})$;
- the projections recomputed here as plain matrix products of the layer's weights.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import atlas_eqx as ae


SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
D_MODEL, HEADS = 16, 2
HEAD_DIM = D_MODEL // HEADS


def close(actual, expected, atol=1e-12):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=atol)


def complex_rope(x: np.ndarray, positions: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """Rotate-half RoPE as a complex product: (x_j + i x_{j+d/2}) exp(i m base^{-2j/d})."""
    d = x.shape[-1]
    half = d // 2
    theta = base ** (-2.0 * np.arange(half) / d)
    angle = positions.reshape((-1,) + (1,) * (x.ndim - 2) + (1,)) * theta
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)


def masked_softmax_heads(q, k, v, *, window=None):
    """(T, H, d) attention with an explicit banded causal mask, float64 NumPy."""
    T, _, d = q.shape
    logits = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
    t, i = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (i <= t) if window is None else (i <= t) & (t - i < window)
    logits = np.where(visible[None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v)


def reference_conv(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """y_t = sum_j w[:, j] * x_{t-K+1+j}, with x_s = 0 for s < 0, by a loop over t and j."""
    T, K = x.shape[0], weight.shape[1]
    y = np.zeros_like(x)
    for t in range(T):
        for j in range(K):
            s = t - K + 1 + j
            if s >= 0:
                y[t] += weight[:, j] * x[s]
    return y


def reference_projections(layer: ae.AttentionLayer, x: np.ndarray):
    """q, k (RoPE'd, by the complex form) and v of every head, from the weights directly
    (through the layer's short convolution when it has one)."""
    T = x.shape[0]
    weights = [np.asarray(w.weight) for w in (layer.wq, layer.wk, layer.wv)]
    projected = np.concatenate([x @ w.T for w in weights], axis=-1)
    if layer.conv_weight is not None:
        projected = reference_conv(projected, np.asarray(layer.conv_weight))
    q, k, v = (a.reshape(T, layer.n_heads, layer.head_dim) for a in np.split(projected, 3, -1))
    positions = np.arange(T)
    return q, complex_rope(q, positions), complex_rope(k, positions), v


def make_layer(window=None, n_persistent=0, seed=0, conv_size=0) -> ae.AttentionLayer:
    return ae.AttentionLayer(
        D_MODEL,
        HEADS,
        key=jax.random.PRNGKey(seed),
        window=window,
        n_persistent=n_persistent,
        conv_size=conv_size,
    )


def inputs(seed: int, T: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, D_MODEL))


call = eqx.filter_jit(lambda layer, x: layer(x))
stream = eqx.filter_jit(lambda layer, x, state: layer.stream(x, state))
batched_call = eqx.filter_jit(lambda layer, x: jax.vmap(layer)(x))


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------


@given(seed=SEEDS, base=st.sampled_from([10000.0, 500.0]))
def test_rope_is_the_complex_rotation(seed, base):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((7, HEADS, HEAD_DIM))
    positions = rng.integers(0, 5000, size=7)
    close(ae.rope(jnp.asarray(x), jnp.asarray(positions), base), complex_rope(x, positions, base))


@given(
    seed=SEEDS,
    m=st.integers(0, 3000),
    n=st.integers(0, 3000),
    shift=st.integers(-1000, 1000),
)
def test_rope_scores_depend_only_on_relative_position(seed, m, n, shift):
    rng = np.random.default_rng(seed)
    q, k = jnp.asarray(rng.standard_normal((2, 1, HEAD_DIM)))
    m2, n2 = m + 1000 + shift, n + 1000 + shift
    rotated = lambda x, p: ae.rope(x, jnp.asarray([p]))[0]
    score = jnp.dot(rotated(q, m), rotated(k, n))
    shifted = jnp.dot(rotated(q, m2), rotated(k, n2))
    close(score, shifted, 1e-9 * (1 + abs(float(score))))
    close(jnp.linalg.norm(rotated(q, m)), jnp.linalg.norm(q))
    close(rotated(q, 0), q[0])


# --------------------------------------------------------------------------------------------
# The attention core and the full layer
# --------------------------------------------------------------------------------------------


@given(seed=SEEDS, T=st.sampled_from([5, 9]), window=st.sampled_from([None, 1, 3]))
def test_causal_attention_equals_reference_attention(seed, T, window):
    rng = np.random.default_rng(seed)
    q, k, v = (2.0 * rng.standard_normal((T, HEADS, HEAD_DIM)) for _ in range(3))
    y = ae.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=window)
    close(y, masked_softmax_heads(q, k, v, window=window))
    local = None if window is None else (window - 1, 0)
    library = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local)
    close(y, library, 2e-6)


@pytest.mark.parametrize("window, conv_size", [(None, 0), (3, 0), (None, 4), (3, 2)])
@given(seed=SEEDS, T=st.sampled_from([5, 9]))
def test_layer_equals_dot_product_attention_on_rope_projections(window, conv_size, seed, T):
    layer = make_layer(window, seed=seed % 4, conv_size=conv_size)
    x = inputs(seed, T)
    _, q, k, v = reference_projections(layer, x)
    wo = np.asarray(layer.wo.weight)
    expected = masked_softmax_heads(q, k, v, window=window).reshape(T, -1) @ wo.T
    y = call(layer, jnp.asarray(x))
    close(y, expected)
    local = None if window is None else (window - 1, 0)
    library = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local)
    close(y, np.asarray(library).reshape(T, -1) @ wo.T, 1e-5)


@given(seed=SEEDS, T=st.sampled_from([5, 9]))
def test_persistent_tokens_are_visible_beyond_the_window(seed, T):
    """window=1, N_p = 2: y_t attends to x_t itself and the two persistent tokens, whose logits
    use the unrotated query (they carry no position)."""
    layer = make_layer(window=1, n_persistent=2, seed=seed % 4)
    x = inputs(seed, T)
    q, q_rot, k_rot, v = reference_projections(layer, x)
    p = np.asarray(layer.persistent)
    split = lambda w: (p @ np.asarray(w).T).reshape(2, HEADS, HEAD_DIM)
    pk, pv = split(layer.wk.weight), split(layer.wv.weight)
    expected = np.empty((T, HEADS, HEAD_DIM))
    for t in range(T):
        for h in range(HEADS):
            logits = np.array(
                [q[t, h] @ pk[0, h], q[t, h] @ pk[1, h], q_rot[t, h] @ k_rot[t, h]]
            ) / np.sqrt(HEAD_DIM)
            weights = np.exp(logits - logits.max())
            weights /= weights.sum()
            expected[t, h] = weights @ np.stack([pv[0, h], pv[1, h], v[t, h]])
    y = call(layer, jnp.asarray(x))
    close(y, expected.reshape(T, -1) @ np.asarray(layer.wo.weight).T)


# --------------------------------------------------------------------------------------------
# Streaming (KV cache, ring buffer), causality, batches, gradients
# --------------------------------------------------------------------------------------------


STREAM_CONFIGS = [(None, 0, 0), (3, 0, 0), (3, 2, 0), (None, 2, 0), (3, 0, 4), (None, 2, 3)]


@pytest.mark.parametrize("window, n_persistent, conv_size", STREAM_CONFIGS)
@given(seed=SEEDS, pieces=st.sampled_from([(1,) * 11, (4, 1, 6)]))
def test_streaming_equals_the_full_call(window, n_persistent, conv_size, seed, pieces):
    """T = 11 > window = 3, so the ring buffer wraps several times (also within one piece);
    pieces of one token carry the convolution's history across calls."""
    layer = make_layer(window, n_persistent, seed=seed % 4, conv_size=conv_size)
    x = jnp.asarray(inputs(seed, 11))
    state = layer.init_state(11)
    outputs, start = [], 0
    for n in pieces:
        y, state = stream(layer, x[start : start + n], state)
        outputs.append(y)
        start += n
    close(jnp.concatenate(outputs), call(layer, x))
    assert int(state.count) == 11


def test_ring_buffer_has_window_slots_and_keeps_the_last_tokens():
    layer = make_layer(window=3)
    state = layer.init_state(1000)
    assert state.keys.shape == (3, HEADS, HEAD_DIM)
    _, state = stream(layer, jnp.asarray(inputs(0, 11)), state)
    assert sorted(np.asarray(state.positions).tolist()) == [8, 9, 10]
    full = make_layer().init_state(20)
    assert full.keys.shape == (20, HEADS, HEAD_DIM)
    short = layer.init_state(2)  # fewer slots than the window: a plain cache of 2 tokens
    assert short.keys.shape == (2, HEADS, HEAD_DIM)


@pytest.mark.parametrize("window, n_persistent, conv_size", STREAM_CONFIGS)
@given(seed=SEEDS, t=st.integers(0, 7))
def test_causality(window, n_persistent, conv_size, seed, t):
    layer = make_layer(window, n_persistent, conv_size=conv_size)
    x = inputs(seed, 9)
    x2 = x.copy()
    x2[t + 1 :] = 100.0 * np.random.default_rng(seed + 1).standard_normal(x2[t + 1 :].shape)
    y, y2 = call(layer, jnp.asarray(x)), call(layer, jnp.asarray(x2))
    np.testing.assert_array_equal(np.asarray(y)[: t + 1], np.asarray(y2)[: t + 1])
    assert not np.allclose(np.asarray(y)[t + 1], np.asarray(y2)[t + 1])


@given(seed=SEEDS)
def test_vmap_over_a_batch_equals_a_loop_and_examples_never_interact(seed):
    layer = make_layer(window=3, n_persistent=1)
    batch = jnp.asarray(np.stack([inputs(seed + i, 7) for i in range(3)]))
    batched = batched_call(layer, batch)
    for i in range(3):
        close(batched[i], call(layer, batch[i]))
    changed = batch.at[1].set(-batch[1])
    again = batched_call(layer, changed)
    np.testing.assert_array_equal(np.asarray(again)[[0, 2]], np.asarray(batched)[[0, 2]])


@pytest.mark.parametrize("window, n_persistent, conv_size", [(None, 0, 0), (2, 2, 0), (2, 1, 4)])
def test_gradients_match_central_differences(window, n_persistent, conv_size):
    layer = make_layer(window, n_persistent, conv_size=conv_size)
    x = jnp.asarray(inputs(0, 6))
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((6, D_MODEL)))
    params, static = eqx.partition((layer, x), eqx.is_inexact_array)

    @jax.jit
    def loss(params):
        layer, x = eqx.combine(params, static)
        return jnp.sum(weights * layer(x))

    grads = jax.grad(loss)(params)
    rng = np.random.default_rng(2)
    direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
    eps = 1e-6
    shifted = lambda sign: jax.tree.map(lambda a, u: a + sign * eps * u, params, direction)
    numeric = (loss(shifted(1)) - loss(shifted(-1))) / (2 * eps)
    analytic = sum(
        jnp.sum(g * u)
        for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
    )
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=15, n_heads=2), "`d_model`"),
        (dict(d_model=16, n_heads=2, head_dim=7), "`head_dim`"),
        (dict(d_model=16, n_heads=2, window=0), "`window`"),
        (dict(d_model=16, n_heads=2, n_persistent=-1), "`n_persistent`"),
        (dict(d_model=16, n_heads=0), "`n_heads`"),
        (dict(d_model=16, n_heads=2, conv_size=-1), "`conv_size`"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ae.AttentionLayer(**kwargs, key=jax.random.PRNGKey(0))


@pytest.mark.parametrize("window", [None, 6])
def test_full_kv_cache_raises(window):
    layer = make_layer(window)
    state = layer.init_state(4)
    with pytest.raises(eqx.EquinoxRuntimeError, match="KV cache is full"):
        jax.block_until_ready(stream(layer, jnp.asarray(inputs(0, 5)), state))
    try:
        jax.effects_barrier()
    except jax.errors.JaxRuntimeError:
        pass


def test_rope_needs_an_even_head_dim():
    with pytest.raises(ValueError, match="even"):
        ae.rope(jnp.ones((3, 5)), jnp.arange(3))


def test_float32_layer_stays_float32_and_agrees():
    layer = make_layer(window=3, n_persistent=1)
    built = ae.AttentionLayer(
        D_MODEL, HEADS, key=jax.random.PRNGKey(0), window=3, n_persistent=1, dtype=jnp.float32
    )
    assert built.wq.weight.dtype == jnp.float32 and built.persistent is not None
    assert built.persistent.dtype == jnp.float32
    single = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), layer)  # same weights
    x = inputs(0, 9)
    y = call(single, jnp.asarray(x, jnp.float32))
    assert y.dtype == jnp.float32 and y.shape == (9, D_MODEL)
    assert single.init_state(4).keys.dtype == jnp.float32
    close(y, call(layer, jnp.asarray(x)), 1e-5)


def test_transformer_preset_has_the_short_convolution_and_zero_is_the_llama_layer():
    key = jax.random.PRNGKey(3)
    shipped = ae.presets.transformer(D_MODEL, HEADS, key=key)
    assert shipped.conv_size == 4 and shipped.conv_weight is not None
    assert shipped.conv_weight.shape == (3 * D_MODEL, 4)
    llama = ae.presets.transformer(D_MODEL, HEADS, key=key, conv_size=0)
    plain = ae.AttentionLayer(D_MODEL, HEADS, key=key)
    x = jnp.asarray(inputs(0, 7))
    np.testing.assert_array_equal(np.asarray(call(llama, x)), np.asarray(call(plain, x)))
    assert not np.allclose(np.asarray(call(shipped, x)), np.asarray(call(plain, x)))
