"""`atlas_eqx.MemoryLayer` and the presets' memories, checked at the memory level.

Every preset reduction is compared with a closed form written here in NumPy (DeltaNet, Gated
DeltaNet, the masked quadratic form of linear attention, the SWLA coefficients, the Dot residual
recursion), with `jax.nn.dot_product_attention`, or with the naive token-by-token loop of
`_helpers.naive_omega`, always on the layer's own per-head inputs (`MemoryLayer.memory_inputs`).
The layer's forward pass around the memory (projections, convolution, SiLU, norms, gates, output
norm and gate) is compared with a NumPy re-implementation from its parameters.

Sizes: d_model 16, 2 heads (head_dim 8), T = 7; float64 (tests/conftest.py).
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_close, chunk_starts, Inputs, naive_omega
from hypothesis import given, settings, strategies as st

import atlas_eqx as ae
from atlas_eqx._layer import causal_depthwise_conv


D_MODEL, N_HEADS, T = 16, 2, 7
D_HEAD = D_MODEL // N_HEADS
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
FEW = settings(max_examples=max(2, settings().max_examples // 3))


def sequence(seed: int, T: int = T) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, D_MODEL))


@eqx.filter_jit
def memory_inputs(layer: ae.MemoryLayer, x):
    return layer.memory_inputs(x)


@eqx.filter_jit
def run_memory(layer: ae.MemoryLayer, inputs: ae.MemoryInputs, state=None):
    return layer.run_memory(inputs, state)


@eqx.filter_jit
def full_call(layer, x):
    return layer(x)


@eqx.filter_jit
def stream(layer, x, state):
    return layer.stream(x, state)


@eqx.filter_jit
def combine_heads(layer: ae.MemoryLayer, x, y):
    return layer.combine_heads(x, y)


def head(tree, h: int):
    """Head `h` of a module or pytree stacked over heads."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda a: a[h], arrays), static)


def head_inputs(inputs: ae.MemoryInputs, h: int) -> Inputs:
    """Head `h` of the layer's memory inputs in the layout of `_helpers.naive_omega`."""

    def pick(a) -> np.ndarray:
        return np.asarray(a[h])

    i = inputs
    optional = [None if a is None else pick(a) for a in (i.momentum, i.gamma)]
    return Inputs(pick(i.q), pick(i.k), pick(i.v), pick(i.lr), pick(i.decay), *optional)


def np_inputs(inputs: ae.MemoryInputs) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(getattr(inputs, name))
        for name in ("q", "k", "v", "lr", "decay", "momentum", "gamma")
        if getattr(inputs, name) is not None
    }


def delta_rule(W0, q, k, v, beta, alpha, *, decay_first: bool):
    """DeltaNet-family closed forms, one head, in each model's own symbols.

    decay_first=False: W_t = W_{t-1}(alpha_t I - beta_t k_t k_t^T) + beta_t v_t k_t^T (Titans-);
    decay_first=True:  W_t = alpha_t W_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T (Gated
    DeltaNet). Returns the reads W_t q_t and the final W.
    """
    W = np.array(W0, dtype=np.float64)
    eye = np.eye(k.shape[1])
    ys = []
    for t in range(q.shape[0]):
        kk = np.outer(k[t], k[t])
        if decay_first:
            W = alpha[t] * W @ (eye - beta[t] * kk) + beta[t] * np.outer(v[t], k[t])
        else:
            W = W @ (alpha[t] * eye - beta[t] * kk) + beta[t] * np.outer(v[t], k[t])
        ys.append(W @ q[t])
    return np.stack(ys), W


# ----------------------------------------------------------------------------------------------
# The forward pass around the memory.


def test_causal_depthwise_conv_matches_a_loop_and_splits():
    rng = np.random.default_rng(0)
    T_, C, K = 6, 5, 4
    x, w = rng.standard_normal((T_, C)), rng.standard_normal((C, K))
    expected = np.zeros((T_, C))
    for t in range(T_):
        for j in range(K):
            s = t - K + 1 + j  # y_t = sum_j w_j x_{t-K+1+j}, x_s = 0 for s < 0
            if s >= 0:
                expected[t] += w[:, j] * x[s]
    y, history = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(w), jnp.zeros((K - 1, C)))
    assert_close(y, expected)
    assert_close(history, x[-(K - 1) :])
    y1, h1 = causal_depthwise_conv(jnp.asarray(x[:2]), jnp.asarray(w), jnp.zeros((K - 1, C)))
    y2, _ = causal_depthwise_conv(jnp.asarray(x[2:]), jnp.asarray(w), h1)
    assert_close(np.concatenate([y1, y2]), expected)


def _silu(a):
    return a / (1 + np.exp(-a))


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


@pytest.fixture(scope="module")
def gated_layer():
    # Every gate (eta, alpha, theta, per-offset gamma), conv, SiLU, norms, gated output; a linear
    # memory keeps the compile cheap.
    return ae.presets.titans(
        D_MODEL,
        N_HEADS,
        key=jax.random.PRNGKey(3),
        chunk_size=1,
        window=2,
        gamma_mode="offset",
        memory="linear",
    )


def test_forward_around_the_memory_matches_numpy(gated_layer):
    """proj -> conv -> SiLU -> heads -> l2 norm; sigmoid gates; RMSNorm, SiLU gate, projection."""
    layer = gated_layer
    c = layer.config
    x = sequence(1)
    inputs = memory_inputs(layer, x)

    def conv(a, w):  # causal, kernel K, zero history
        K = w.shape[1]
        padded = np.concatenate([np.zeros((K - 1, a.shape[1])), a])
        return sum(w[:, j] * padded[j : j + a.shape[0]] for j in range(K))

    p = jax.tree.map(np.asarray, eqx.filter(layer, eqx.is_array))
    qkv = np.concatenate([x @ p.q_proj.T, x @ p.k_proj.T, x @ p.v_proj.T], axis=1)
    qkv = _silu(conv(qkv, p.conv_weight))
    q, k, v = (a.reshape(T, N_HEADS, D_HEAD).transpose(1, 0, 2) for a in np.split(qkv, 3, axis=1))
    q, k = (a / np.sqrt(np.sum(a * a, -1, keepdims=True) + c.norm_eps) for a in (q, k))

    def gate(g):
        return _sigmoid(x @ g.weight.T + g.bias)

    assert_close(inputs.q, q)
    assert_close(inputs.k, k)
    assert_close(inputs.v, v)
    # Momentum: the step is eta_max sigma (1 - theta) (lr_momentum_scaling); a linear
    # memory's curvature normaliser is 1.
    assert_close(inputs.lr, c.lr_max * gate(p.lr_gate).T * (1 - gate(p.momentum_gate).T))
    assert_close(inputs.decay, gate(p.decay_gate).T)
    assert_close(inputs.momentum, gate(p.momentum_gate).T)
    assert_close(inputs.gamma, gate(p.gamma_gate).reshape(T, N_HEADS, 2).transpose(1, 0, 2))

    y = np.random.default_rng(2).standard_normal((N_HEADS, T, D_HEAD))
    normed = y / np.sqrt(np.mean(y * y, -1, keepdims=True) + c.norm_eps) * p.norm_scale[:, None]
    o = normed.transpose(1, 0, 2).reshape(T, -1) * _silu(x @ p.gate_proj.T)
    assert_close(combine_heads(layer, x, y), o @ p.out_proj.T)

    # __call__ is exactly the three stages composed.
    y_memory, _ = run_memory(layer, inputs)
    assert_close(full_call(layer, x), combine_heads(layer, x, y_memory))


def test_gates_start_at_the_digest_values(gated_layer):
    """With x = 0 every gate is sigmoid(bias): alpha spread over heads from 0.9 to 0.999,
    theta 0.9 (A-7), gamma 0.9, eta = lr_init (times 1 - theta for momentum)."""
    layer = gated_layer
    c = layer.config
    inputs = memory_inputs(layer, np.zeros((T, D_MODEL)))
    alphas = -np.expm1(np.linspace(np.log(0.1), np.log(0.001), N_HEADS))
    assert_close(inputs.decay, np.broadcast_to(alphas[:, None], (N_HEADS, T)))
    assert_close(inputs.momentum, np.full((N_HEADS, T), 0.9))
    assert_close(inputs.gamma, np.full((N_HEADS, T, 2), 0.9))
    assert_close(inputs.lr, np.full((N_HEADS, T), c.lr_init * (1 - 0.9)))
    assert c.lr_init == 0.5 * c.lr_max


# ----------------------------------------------------------------------------------------------
# Preset reductions at the memory level (digest section 9.B, 9.D).


@pytest.fixture(scope="module")
def deltanet_layer():
    return ae.presets.deltanet(D_MODEL, N_HEADS, key=jax.random.PRNGKey(0), chunk_size=1)


@FEW
@given(seed=SEEDS)
def test_deltanet_is_the_deltanet_closed_form(deltanet_layer, seed):
    """I-11: W_t = W_{t-1}(I - b k k^T) + b v k^T from W_0 = 0, read y_t = W_t q_t."""
    layer = deltanet_layer
    inputs = memory_inputs(layer, sequence(seed))
    y, state = run_memory(layer, inputs)
    i = np_inputs(inputs)
    assert i.keys() == {"q", "k", "v", "lr", "decay"}  # no momentum, no gamma
    assert np.all(i["decay"] == 1.0) and np.all((i["lr"] > 0) & (i["lr"] < 1))
    for h in range(N_HEADS):
        W0 = np.zeros((D_HEAD, D_HEAD))
        ys, W = delta_rule(
            W0, i["q"][h], i["k"][h], i["v"][h], i["lr"][h], np.ones(T), decay_first=False
        )
        assert_close(y[h], ys)
        assert_close(state.memory.weight[h], W)


@pytest.fixture(scope="module")
def gated_deltanet_layer():
    layer = ae.presets.gated_deltanet(
        D_MODEL, N_HEADS, key=jax.random.PRNGKey(1), chunk_size=1, decay_init=0.7
    )
    # Larger retention-gate weights, so that alpha_t varies visibly between tokens.
    assert layer.decay_gate is not None
    return eqx.tree_at(lambda m: m.decay_gate.weight, layer, 3 * layer.decay_gate.weight)


@FEW
@given(seed=SEEDS)
def test_gated_deltanet_is_decay_first(gated_deltanet_layer, seed):
    """I-12: W_t = alpha_t W_{t-1}(I - b k k^T) + b v k^T (and not the Titans- order)."""
    layer = gated_deltanet_layer
    inputs = memory_inputs(layer, sequence(seed))
    y, _ = run_memory(layer, inputs)
    i = np_inputs(inputs)
    assert not np.allclose(i["decay"], 1.0)
    for h in range(N_HEADS):
        args = (np.zeros((D_HEAD, D_HEAD)), i["q"][h], i["k"][h], i["v"][h], i["lr"][h])
        ys, _ = delta_rule(*args, i["decay"][h], decay_first=True)
        assert_close(y[h], ys)
        other, _ = delta_rule(*args, i["decay"][h], decay_first=False)
        assert not np.allclose(y[h], other, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 16])
def test_linear_attention_is_the_masked_quadratic_form(chunk_size):
    """I-4 (and I-3: the Hebbian linear memory is chunk-exact): Y = tril(Q K^T) V."""
    layer = ae.presets.linear_attention(
        D_MODEL, N_HEADS, key=jax.random.PRNGKey(2), chunk_size=chunk_size
    )
    inputs = memory_inputs(layer, sequence(4))
    y, _ = run_memory(layer, inputs)
    i = np_inputs(inputs)
    assert np.all(i["lr"] == 1.0) and np.all(i["decay"] == 1.0)
    for h in range(N_HEADS):
        expected = np.tril(i["q"][h] @ i["k"][h].T) @ i["v"][h]
        assert_close(y[h], expected)


def test_omeganet_with_c1_and_identity_features_is_deltanet():
    """OmegaNet with c = 1, phi = id, linear memory and no retention is DeltaNet (I-11), from
    its learned W_0."""
    layer = ae.presets.omeganet(
        D_MODEL,
        N_HEADS,
        key=jax.random.PRNGKey(5),
        chunk_size=1,
        window=1,
        feature_map="identity",
        memory="linear",
        decay_gate=False,
        gamma_mode="none",
    )
    inputs = memory_inputs(layer, sequence(6))
    y, _ = run_memory(layer, inputs)
    i = np_inputs(inputs)
    W0 = np.asarray(layer.memory.weight)  # pyright: ignore
    assert not np.allclose(W0, 0.0)
    for h in range(N_HEADS):
        ys, _ = delta_rule(
            W0[h], i["q"][h], i["k"][h], i["v"][h], i["lr"][h], np.ones(T), decay_first=False
        )
        assert_close(y[h], ys)


def test_atlas_without_muon_and_momentum_is_omeganet():
    """I-14: Atlas with NS replaced by the identity (optimizer='momentum') and theta = 0 equals
    OmegaNet on the same inputs, and both equal the naive token loop (chunk_size 2)."""
    key = jax.random.PRNGKey(7)
    atlas = ae.presets.atlas(
        D_MODEL, N_HEADS, key=key, chunk_size=2, optimizer="momentum", muon_per_chunk=False
    )
    omeganet = ae.presets.omeganet(D_MODEL, N_HEADS, key=key, chunk_size=2)
    assert_close(
        jax.tree.leaves(eqx.filter(atlas.memory, eqx.is_array)),
        jax.tree.leaves(eqx.filter(omeganet.memory, eqx.is_array)),
    )
    inputs = memory_inputs(atlas, sequence(8))
    assert inputs.momentum is not None
    zero_theta = eqx.tree_at(lambda i: i.momentum, inputs, jnp.zeros_like(inputs.momentum))
    y_atlas, _ = run_memory(atlas, zero_theta)
    no_theta = dataclasses.replace(inputs, momentum=None)
    y_omega, _ = run_memory(omeganet, no_theta)
    assert_close(y_atlas, y_omega)
    for h in range(N_HEADS):
        expected, _, _ = naive_omega(
            head(omeganet.memory, h),
            head_inputs(no_theta, h),
            feature_map=head(omeganet.feature_map, h),
            optimizer="gd",
            window=omeganet.config.window,
            starts=chunk_starts(T, 2),
        )
        assert_close(y_omega[h], expected)
    # theta > 0 changes the result, so the comparison above can fail.
    y_theta, _ = run_memory(atlas, inputs)
    assert not np.allclose(y_theta, y_atlas, atol=1e-8)


SWLA_WINDOW = 3


@pytest.fixture(scope="module")
def swla_layer():
    return ae.presets.swla(
        D_MODEL,
        N_HEADS,
        key=jax.random.PRNGKey(9),
        window=SWLA_WINDOW,
        chunk_size=1,
        lr_gate=False,
        decay_gate=False,
        gamma_mode="none",
    )


@FEW
@given(seed=SEEDS)
def test_swla_is_not_swa(swla_layer, seed):
    """I-30: SWLA with alpha = gamma = eta = 1: W_t = sum_i min(c, t-i+1) v_i k_i^T, so no
    token ever leaves the state, and y_t = W_t q_t."""
    c = SWLA_WINDOW
    layer = swla_layer
    inputs = memory_inputs(layer, sequence(seed))
    i = np_inputs(inputs)
    assert np.all(i["lr"] == 1.0) and np.all(i["decay"] == 1.0) and "gamma" not in i
    state = layer.initial_memory_state()
    for t in range(T):
        step = jax.tree.map(lambda a, t=t: a[:, t : t + 1], inputs)
        y_t, state = run_memory(layer, step, state)
        for h in range(N_HEADS):
            W = sum(min(c, t - s + 1) * np.outer(i["v"][h][s], i["k"][h][s]) for s in range(t + 1))
            assert_close(state.memory.weight[h], W)
            assert_close(y_t[h, 0], W @ i["q"][h][t])


@pytest.mark.parametrize("kernel_window", [None, 3])
def test_deep_transformer_without_gates_is_softmax_attention(kernel_window):
    """I-28 (kernel_window None) and I-29 (sliding window w = 3) on the layer's q, k, v: a NumPy
    softmax over the visible keys i <= t (and t - i < w), and `jax.nn.dot_product_attention`
    with a causal (local) mask, which computes its logits in float32."""
    layer = ae.presets.deep_transformer(
        D_MODEL,
        N_HEADS,
        key=jax.random.PRNGKey(10),
        lr_gate=False,
        decay_gate=False,
        kernel_window=kernel_window,
    )
    inputs = memory_inputs(layer, sequence(11))
    y, _ = run_memory(layer, inputs)
    i = np_inputs(inputs)
    w = T if kernel_window is None else kernel_window
    for h in range(N_HEADS):
        logits = i["q"][h] @ i["k"][h].T / math.sqrt(D_HEAD)
        expected = []
        for t in range(T):
            visible = slice(max(0, t - w + 1), t + 1)
            p = np.exp(logits[t, visible] - logits[t, visible].max())
            expected.append((p / p.sum()) @ i["v"][h][visible])
        assert_close(y[h], np.stack(expected))
    q, k, v = (jnp.transpose(a, (1, 0, 2)) for a in (inputs.q, inputs.k, inputs.v))
    local = None if kernel_window is None else (kernel_window - 1, 0)
    attention = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local)
    assert_close(y, jnp.transpose(attention, (1, 0, 2)), rtol=1e-5, atol=1e-6)


def test_dot_with_c1_is_the_kernel_residual_recursion():
    """I-31: r_i = v_i - sum_{j<i} eta_j r_j kappa(k_j, k_i), y_t = sum_{i<=t} eta_i r_i
    kappa(k_i, q_t), kappa(a, b) = exp(a.b / sqrt(d))."""
    layer = ae.presets.dot(D_MODEL, N_HEADS, key=jax.random.PRNGKey(12), window=1, decay_gate=False)
    inputs = memory_inputs(layer, sequence(13))
    y, _ = run_memory(layer, inputs)
    i = np_inputs(inputs)
    for h in range(N_HEADS):
        q, k, v, eta = i["q"][h], i["k"][h], i["v"][h], i["lr"][h]

        def kappa(a, b):
            return math.exp(a @ b / math.sqrt(D_HEAD))

        r = []
        for s in range(T):
            r.append(v[s] - sum(eta[j] * r[j] * kappa(k[j], k[s]) for j in range(s)))
        expected = [sum(eta[s] * r[s] * kappa(k[s], q[t]) for s in range(t + 1)) for t in range(T)]
        assert_close(y[h], np.stack(expected))


# ----------------------------------------------------------------------------------------------
# Atlas end to end: the naive reference, chunk-aligned pieces, prefill then decode (I-7, I-40).


@pytest.fixture(scope="module")
def atlas_b2():
    return ae.presets.atlas(
        D_MODEL,
        N_HEADS,
        key=jax.random.PRNGKey(14),
        chunk_size=2,
        gamma_mode="offset",
        muon_per_chunk=False,
    )


def _naive_heads(layer: ae.MemoryLayer, inputs: ae.MemoryInputs, starts) -> np.ndarray:
    c = layer.config
    objective = ae.dot if c.objective == "dot" else ae.l2
    return np.stack(
        [
            naive_omega(
                head(layer.memory, h),
                head_inputs(inputs, h),
                feature_map=head(layer.feature_map, h),
                objective=objective,
                optimizer=str(c.optimizer),
                window=c.window,
                starts=starts,
                decay_first=c.decay_first,
            )[0]
            for h in range(c.n_heads)
        ]
    )


def test_atlas_prefill_then_decode_equals_the_matching_reference(atlas_b2):
    """Muon, window 4, per-offset gates, chunk 2: a chunk-aligned prefill of 4 tokens, then
    decode steps of 1 token, equal the frozen-anchor rule with chunk starts {0, 2, 4, 5, 6}
    (I-40), which differs from the full call's chunking {0, 2, 4, 6}: prefill chunking changes
    the model."""
    layer = atlas_b2
    x = sequence(15)
    inputs = memory_inputs(layer, x)
    state = layer.init_state(T)
    y_prefill, state = stream(layer, x[:4], state)
    decoded = [y_prefill]
    for t in range(4, T):
        y_t, state = stream(layer, x[t : t + 1], state)
        decoded.append(y_t)
    y_decode = np.concatenate(decoded)
    reference = _naive_heads(layer, inputs, starts={0, 2, 4, 5, 6})
    assert_close(y_decode, combine_heads(layer, jnp.asarray(x), reference))
    full_chunking = _naive_heads(layer, inputs, starts={0, 2, 4, 6})
    assert not np.allclose(reference, full_chunking, atol=1e-8)


@pytest.mark.slow
def test_atlas_chunk_aligned_pieces_equal_one_call(atlas_b2):
    """I-7 at the layer level: pieces [4, 3] with chunk 2 equal one call."""
    layer = atlas_b2
    x = sequence(16)
    state = layer.init_state(T)
    y_a, state = stream(layer, x[:4], state)
    y_b, _ = stream(layer, x[4:], state)
    assert_close(np.concatenate([y_a, y_b]), full_call(layer, x))


# ----------------------------------------------------------------------------------------------
# Preset defaults that the presets' docstrings promise.


def test_polynomial_presets_pick_a_tractable_feature_map():
    """dla: exact degree-2 monomials up to head_dim 32, element-wise degree 2 above (A-2);
    atlas, atlas_pp and omeganet: element-wise at every head size."""
    key = jax.random.PRNGKey(0)
    for name in ("atlas", "atlas_pp", "omeganet"):
        layer = eqx.filter_eval_shape(getattr(ae.presets, name), 64, 2, key=key)
        assert layer.config.feature_map == "elementwise" and layer.memory.d_in == 32  # pyright: ignore
    small = eqx.filter_eval_shape(ae.presets.dla, 64, 2, key=key)  # head_dim 32
    assert small.config.feature_map == "polynomial" and small.config.feature_degree == 2
    assert small.memory.d_in == math.comb(32 + 2, 2)  # pyright: ignore
    large = eqx.filter_eval_shape(ae.presets.dla, 128, 2, key=key)  # head_dim 64
    assert large.config.feature_map == "elementwise" and large.memory.d_in == 64  # pyright: ignore


@pytest.mark.parametrize("name", ["omeganet", "deltanet", "dot"])
def test_l2_presets_step_size_bound(name):
    """eta_max = 1 / (c kappa): eta_t * sum over the window of ||phi(k_i)||^2 <= 1 (kappa(k, k)
    for the kernel memory), on the layer's own inputs with gates near their maximum."""
    layer = getattr(ae.presets, name)(
        D_MODEL, N_HEADS, key=jax.random.PRNGKey(16), lr_normalization="none"
    )
    c = layer.config
    x = 30.0 * sequence(17)  # saturate the gates
    inputs = memory_inputs(layer, x)
    if c.memory == "kernel":
        sq_norm = np.exp(np.sum(np.asarray(inputs.k) ** 2, -1) / math.sqrt(D_HEAD))
    else:
        phi = jax.vmap(lambda f, k: f(k))(layer.feature_map, inputs.k)
        sq_norm = np.sum(np.asarray(phi) ** 2, -1)
    window_sum = sum(np.roll(sq_norm, j, axis=1) for j in range(c.window))
    assert np.max(np.asarray(inputs.lr) * window_sum) <= 1.0 + 1e-12
    assert np.max(np.asarray(inputs.lr)) > 0.9 * c.lr_max  # the bound is nearly attained


def test_momentum_presets_scale_the_step_by_one_minus_theta():
    """With plain momentum the buffer repeats a gradient ~1/(1 - theta) times, so the layer
    multiplies eta_t by 1 - theta_t (`lr_momentum_scaling`; presets doc); eta_max is the GD
    bound 1 / (c kappa)."""
    key = jax.random.PRNGKey(0)
    titans = eqx.filter_eval_shape(ae.presets.titans, 32, 2, key=key)
    assert math.isclose(titans.config.lr_max, 1.0) and titans.config.lr_momentum_scaling
    omeganet = eqx.filter_eval_shape(
        ae.presets.omeganet, 32, 2, key=key, window=1, feature_map="identity"
    )
    assert math.isclose(omeganet.config.lr_max, 1.0)


@pytest.mark.parametrize("name", ["titans", "atlas", "omeganet"])
def test_deep_memory_presets_stay_finite_at_initialisation(name):
    """A regression: with eta_max = 1 Titans' MLP memory blew up to NaN within 64 tokens of
    ordinary inputs (found by the MQAR quickstart; d_model 64 with 4 heads reproduces it).
    Outputs must stay bounded at init."""
    layer = getattr(ae.presets, name)(64, 4, key=jax.random.PRNGKey(3), chunk_size=16)
    x = jax.random.normal(jax.random.PRNGKey(4), (64, 64))
    y = np.asarray(eqx.filter_jit(layer)(x))
    assert np.all(np.isfinite(y))
    assert np.max(np.abs(y)) < 100.0


@pytest.mark.parametrize("name", ["deltanet", "deep_transformer"])
def test_compiled_layers_hold_no_host_callback(name):
    """`MemoryLayer` runs its scans with `check_values=False` (its gates are sigmoids), so the
    compiled program has no host callback and JAX's persistent cache can store it."""
    layer = getattr(ae.presets, name)(D_MODEL, N_HEADS, key=jax.random.PRNGKey(0))
    jaxpr = str(jax.make_jaxpr(layer)(sequence(5)))
    assert "callback" not in jaxpr
    checked = jax.make_jaxpr(
        lambda q: ae.omega_scan(
            ae.LinearMemory(4, 4, key=jax.random.PRNGKey(0)),
            q,
            q,
            q,
            jnp.ones(5),
            jnp.ones(5),
        )[0]
    )(jnp.ones((5, 4)))
    assert "callback" in str(checked)  # the public default does check


# The outer gradient of the whole atlas layer (projections, convolution, gates, W_0, the a_i of
# the exact polynomial map, output norm and gate) against float64 central differences, with
# exact per-token Muon on both paths and with the per-chunk approximation. T = 10 is not a
# multiple of b = 4 (padding), and c = 4 reaches back over chunk boundaries.
@pytest.mark.parametrize(
    "options",
    [dict(method="sequential"), dict(method="chunked"), dict(muon_per_chunk=True)],
    ids=["sequential", "chunked", "muon_per_chunk"],
)
def test_atlas_layer_gradient_matches_central_differences(options):
    """jax.grad of a random linear functional of the atlas layer's output w.r.t. all of its
    parameters equals a fourth-order central difference along three random directions to 1e-8
    (relative). This is the check behind experiments/results/niah-extrapolate/gradient_norm.md:
    atlas's large outer gradient norms are not a wrong gradient."""
    exact = dict(muon_per_chunk=False, feature_map="polynomial", feature_include_constant=True)
    layer = ae.presets.atlas(4, 1, key=jax.random.PRNGKey(21), chunk_size=4, **exact | options)
    assert layer.config.optimizer == "muon" and layer.config.feature_map == "polynomial"
    rng = np.random.default_rng(22)
    x = jnp.asarray(rng.standard_normal((10, 4)))
    weights = jnp.asarray(rng.standard_normal((10, 4)))
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    @eqx.filter_jit
    def loss(params):
        return jnp.sum(eqx.combine(params, static)(x) * weights)

    grads = eqx.filter_jit(jax.grad(loss))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # The stencil's O(h^4) error is ~1e-6 relative at h = 1e-4 and ~1e-11 at h = 1e-5.
    h = 1e-5
    for _ in range(3):
        direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)

        def at(step, direction=direction):
            moved = jax.tree.map(lambda a, u: a + step * h * u, params, direction)
            return float(loss(moved))

        numeric = (8.0 * (at(1) - at(-1)) - (at(2) - at(-2))) / (12.0 * h)
        analytic = sum(
            float(jnp.sum(g * d))
            for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        )
        assert abs(numeric) > 1e-3  # the direction really moves the loss
        assert abs(analytic - numeric) <= 1e-8 * max(1.0, abs(numeric)), (analytic, numeric)
