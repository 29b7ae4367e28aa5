"""Kernel memories (`kernel_memory_scan`, `kernel_memory_stream`; digest 5.1-5.5, I-28..I-32).

Every identity is checked in float64 against a reference that shares no code with
`atlas_eqx._kernel`:

- `jax.nn.dot_product_attention` (its softmax runs in float32 even for float64 inputs, so it is
  compared at 1e-6) and a float64 masked softmax written here (compared at 1e-12);
- plain Python loops over tokens: the unnormalised attention sum, the digest's residual
  recursion, a kernel-form loop over coefficient vectors, and a NumPy feature-space loop
  $W_t = \\alpha_tW_{t-1} - \\eta_t\\nabla\\ell$ on explicit tensor-power features of a finite
  polynomial kernel;
- `omega_scan` with explicit features (`Polynomial`, `TaylorExp`) and a zero-initialised
  `LinearMemory`, objective `ae.dot` (Hebbian) or `ae.l2` (delta; both with the same signs and
  the 1/2 as the kernel rules).

Queries and keys are l2-normalised where the delta rule runs on the exp kernel, so that
$\\eta\\kappa(k, k) \\le e^{1/\\sqrt d}$ keeps the residual recursion bounded.
"""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jaxtyping import Array, TypeCheckError

import atlas_eqx as ae
import feature_maps as fm


SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
RTOL = 1e-10


# --------------------------------------------------------------------------------------------
# Kernels (module-level functions, so jit caches hit) and inputs
# --------------------------------------------------------------------------------------------


@functools.cache
def taylor_kernel(order: int):
    """The degree-`order` truncation of exp, elementwise: sum_{i<=P} s^i / i!."""

    def kernel(s: Array) -> Array:
        return sum((s**i / math.factorial(i) for i in range(1, order + 1)), jnp.ones_like(s))

    kernel.__name__ = f"taylor{order}"
    return kernel


POLY_COEFFICIENTS = (0.7, 1.3, 0.4)  # a positive, non-Taylor polynomial kernel


def poly_kernel(s: Array) -> Array:
    a0, a1, a2 = POLY_COEFFICIENTS
    return a0 + a1 * s + a2 * s**2


def poly_features(x: np.ndarray) -> np.ndarray:
    """Explicit tensor-power features of `poly_kernel`: [sqrt a0; sqrt a1 x; sqrt a2 x (x) x]."""
    a0, a1, a2 = POLY_COEFFICIENTS
    outer = (x[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1)
    return np.concatenate(
        [np.full((x.shape[0], 1), np.sqrt(a0)), np.sqrt(a1) * x, np.sqrt(a2) * outer], 1
    )


def draw_qkv(seed: int, T: int, d_k: int, d_v: int, *, unit: bool = False):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((T, d_k)), rng.standard_normal((T, d_k))
    if unit:
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        k /= np.linalg.norm(k, axis=1, keepdims=True)
    return q, k, rng.standard_normal((T, d_v))


def draw(seed: int, T: int, d_k: int, d_v: int, *, unit: bool = False):
    """q, k, v and gates lr in [0, 1], decay in [0, 1], with exact 0 and 1 edges."""
    q, k, v = draw_qkv(seed, T, d_k, d_v, unit=unit)
    rng = np.random.default_rng(seed + 1)
    lr = rng.uniform(0.0, 1.0, T)
    decay = rng.uniform(0.0, 1.0, T)
    lr[rng.random(T) < 0.15] = 0.0
    decay[rng.random(T) < 0.15] = 0.0
    decay[rng.random(T) < 0.3] = 1.0
    return q, k, v, lr, decay


scan = eqx.filter_jit(ae.kernel_memory_scan)
stream = eqx.filter_jit(ae.kernel_memory_stream)


def close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


def masked_softmax(q, k, v, *, window=None):
    T, d = q.shape
    logits = q @ k.T / np.sqrt(d)
    t, i = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (i <= t) if window is None else (i <= t) & (t - i < window)
    logits = np.where(visible, logits, -np.inf)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)) @ v


def library_attention(q, k, v, *, window=None):
    local = None if window is None else (window - 1, 0)
    out = jax.nn.dot_product_attention(
        q[:, None], k[:, None], v[:, None], is_causal=True, local_window_size=local
    )
    return out[:, 0]


def kernel_loop(q, k, v, lr, decay, *, kernel, scale, rule, c=1, normalize=False):
    """The kernel-form rule token by token: one coefficient vector per stored key (W_0 = 0).

    W_t = alpha_t W_{t-1} + eta_t sum_{i=t-c+1..t} r_i phi(k_i)^T with r_i = v_i (Hebbian) or
    r_i = v_i - W_{t-1} phi(k_i) (delta); W phi(x) = sum_j coef_j kappa(k_j, x).
    """
    T = q.shape[0]
    lr = np.ones(T) if lr is None else lr
    decay = np.ones(T) if decay is None else decay
    values = np.concatenate([v, np.ones((T, 1))], 1) if normalize else v

    def kappa(a, b):
        return float(kernel(scale * float(a @ b)))

    coef: dict[int, np.ndarray] = {}
    out = []
    for t in range(T):
        window = [i for i in range(t - c + 1, t + 1) if i >= 0]
        residuals = {}
        for i in window:
            prediction = sum((coef[j] * kappa(k[j], k[i]) for j in coef), np.zeros(values.shape[1]))
            residuals[i] = values[i] - prediction if rule == "delta" else values[i]
        coef = {j: decay[t] * b for j, b in coef.items()}
        for i in window:
            coef[i] = coef.get(i, np.zeros(values.shape[1])) + lr[t] * residuals[i]
        out.append(sum((coef[j] * kappa(k[j], q[t]) for j in coef), np.zeros(values.shape[1])))
    y = np.stack(out)
    return y[:, :-1] / y[:, -1:] if normalize else y


def feature_loop(phi_q, phi_k, v, lr, decay, *, rule, c=1, normalize=False):
    """The feature-space rule W_t = alpha_t W_{t-1} - eta_t grad at W_{t-1}, W_0 = 0, NumPy.

    Hebbian: loss -sum_i <W phi_i, v_i>, grad -sum_i v_i phi_i^T. Delta: loss
    sum_i 0.5 ||W phi_i - v_i||^2, grad sum_i (W phi_i - v_i) phi_i^T.
    """
    T = phi_q.shape[0]
    lr = np.ones(T) if lr is None else lr
    decay = np.ones(T) if decay is None else decay
    values = np.concatenate([v, np.ones((T, 1))], 1) if normalize else v
    W = np.zeros((values.shape[1], phi_k.shape[1]))
    out = []
    for t in range(T):
        grad = np.zeros_like(W)
        for i in range(max(0, t - c + 1), t + 1):
            if rule == "delta":
                grad += np.outer(W @ phi_k[i] - values[i], phi_k[i])
            else:
                grad -= np.outer(values[i], phi_k[i])
        W = decay[t] * W - lr[t] * grad
        out.append(W @ phi_q[t])
    y = np.stack(out)
    return y[:, :-1] / y[:, -1:] if normalize else y


@eqx.filter_jit
def omega_outputs(feature_map, q, k, v, lr, decay, objective, window, d_v):
    memory = ae.LinearMemory(
        feature_map.out_dim(q.shape[1]), d_v, key=jax.random.PRNGKey(0), init_std=0.0
    )
    y, _ = ae.omega_scan(
        memory, q, k, v, lr, decay, feature_map=feature_map, objective=objective, window=window
    )
    return y


def omega_reference(feature_map, q, k, v, lr, decay, *, rule, c=1, normalize=False):
    T = q.shape[0]
    lr = np.ones(T) if lr is None else lr
    decay = np.ones(T) if decay is None else decay
    values = np.concatenate([v, np.ones((T, 1))], 1) if normalize else v
    objective = ae.l2 if rule == "delta" else ae.dot
    y = np.asarray(
        omega_outputs(feature_map, q, k, values, lr, decay, objective, c, values.shape[1])
    )
    return y[:, :-1] / y[:, -1:] if normalize else y


# --------------------------------------------------------------------------------------------
# I-28, I-29: softmax attention and its sliding window
# --------------------------------------------------------------------------------------------


@given(seed=SEEDS, d=st.sampled_from([4, 8]))
def test_i28_hebbian_normalized_is_causal_softmax_attention(seed, d):
    T = 7
    q, k, v = draw_qkv(seed, T, d, d)
    q, k = 2.0 * q, 2.0 * k  # logits of order 1-10, so the softmax is far from uniform
    y = scan(q, k, v, normalize=True)
    close(y, masked_softmax(q, k, v), 1e-12)
    np.testing.assert_allclose(y, library_attention(q, k, v), atol=2e-6, rtol=0)


@given(seed=SEEDS, T=st.sampled_from([5, 7]), d=st.sampled_from([4, 8]))
def test_i28_unnormalized_is_the_exp_sum(seed, T, d):
    q, k, v = draw_qkv(seed, T, d, d)
    expected = np.stack(
        [sum(v[i] * np.exp(q[t] @ k[i] / np.sqrt(d)) for i in range(t + 1)) for t in range(T)]
    )
    close(scan(q, k, v), expected)


@given(seed=SEEDS, window=st.sampled_from([1, 2, 3]))
def test_i29_window_is_sliding_window_softmax(seed, window):
    T = 7
    q, k, v = draw_qkv(seed, T, 4, 4)
    q, k = 2.0 * q, 2.0 * k
    y = scan(q, k, v, normalize=True, window=window)
    close(y, masked_softmax(q, k, v, window=window), 1e-12)
    np.testing.assert_allclose(y, library_attention(q, k, v, window=window), atol=2e-6, rtol=0)


@pytest.mark.parametrize("window, c, normalize", [(1, 1, True), (2, 1, False), (3, 2, True)])
@given(seed=SEEDS)
def test_window_is_the_memory_rebuilt_over_the_last_w_tokens(window, c, normalize, seed):
    """With gates and an Omega window, y_t under `window=w` equals the read of a fresh memory
    written with tokens t-w+1..t only (the documented definition)."""
    T = 7
    q, k, v, lr, decay = draw(seed, T, 4, 3)
    lr = lr + 0.1  # keep every normaliser positive
    y = scan(q, k, v, lr, decay, window=window, omega_window=c, normalize=normalize)
    expected = []
    for t in range(T):
        s = slice(max(0, t - window + 1), t + 1)
        rebuilt = kernel_loop(
            q[s],
            k[s],
            v[s],
            lr[s],
            decay[s],
            kernel=np.exp,
            scale=0.5,
            rule="hebbian",
            c=c,
            normalize=normalize,
        )
        expected.append(rebuilt[-1])
    close(y, np.stack(expected))


def test_normalized_exp_is_stable_for_large_logits():
    q, k, v = draw_qkv(0, 7, 4, 4)
    q, k = 30.0 * q, 30.0 * k  # logits up to ~1e3: exp overflows without the row maximum
    y = scan(q, k, v, normalize=True)
    close(y, masked_softmax(q, k, v), 1e-12)
    y = scan(q, k, v, normalize=True, window=2)
    close(y, masked_softmax(q, k, v, window=2), 1e-12)


# --------------------------------------------------------------------------------------------
# Gated Hebbian (DeepTransformer, SWDT) and delta (Dot, I-31) against feature space
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule, c, normalize",
    [("hebbian", 1, False), ("hebbian", 3, True), ("delta", 1, False), ("delta", 3, True)],
)
@given(seed=SEEDS)
def test_i31_polynomial_kernel_equals_feature_space_recurrence(rule, c, normalize, seed):
    """A finite positive polynomial kernel: the kernel trick == the NumPy loop on explicit
    features == `omega_scan` with `Polynomial` features and W_0 = 0 (c = 1 delta is I-31)."""
    T, d_k, d_v = 7, 3, 2
    q, k, v, lr, decay = draw(seed, T, d_k, d_v, unit=True)
    if normalize:
        lr = lr + 0.1
    y = scan(
        q,
        k,
        v,
        lr,
        decay,
        kernel=poly_kernel,
        rule=rule,
        omega_window=c,
        normalize=normalize,
        scale=1.0,
    )
    loop = feature_loop(
        poly_features(q), poly_features(k), v, lr, decay, rule=rule, c=c, normalize=normalize
    )
    close(y, loop)
    phi = fm.Polynomial(2, coefficients=POLY_COEFFICIENTS, learnable=False)
    close(y, omega_reference(phi, q, k, v, lr, decay, rule=rule, c=c, normalize=normalize))


@given(seed=SEEDS, T=st.sampled_from([5, 7]))
def test_i31_exp_kernel_delta_is_the_residual_recursion(seed, T):
    """Digest 5.5: r_i = v_i - sum_{j<i} eta_j r_j kappa(k_j, k_i), y_t = sum_{i<=t} eta_i r_i
    kappa(k_i, q_t), with alpha = 1 and c = 1."""
    d = 4
    q, k, v, lr, _ = draw(seed, T, d, d, unit=True)
    kappa = lambda a, b: np.exp(a @ b / np.sqrt(d))
    r = []
    for i in range(T):
        r.append(v[i] - sum((lr[j] * r[j] * kappa(k[j], k[i]) for j in range(i)), np.zeros(d)))
    expected = np.stack(
        [sum(lr[i] * r[i] * kappa(k[i], q[t]) for i in range(t + 1)) for t in range(T)]
    )
    close(scan(q, k, v, lr, rule="delta"), expected)


@pytest.mark.parametrize("rule", ["hebbian", "delta"])
@given(seed=SEEDS, c=st.sampled_from([1, 3]), normalize=st.booleans())
def test_exp_kernel_with_gates_equals_the_kernel_form_loop(rule, seed, c, normalize):
    T, d = 7, 4
    q, k, v, lr, decay = draw(seed, T, d, 3, unit=True)
    if normalize:
        lr = lr + 0.1
    y = scan(q, k, v, lr, decay, rule=rule, omega_window=c, normalize=normalize)
    expected = kernel_loop(
        q,
        k,
        v,
        lr,
        decay,
        kernel=np.exp,
        scale=1 / np.sqrt(d),
        rule=rule,
        c=c,
        normalize=normalize,
    )
    close(y, expected)


# --------------------------------------------------------------------------------------------
# I-32: Taylor features in omega_scan -> the exp kernel
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, c", [("hebbian", 2), ("delta", 1)])
@given(seed=SEEDS, order=st.sampled_from([1, 3]))
def test_i32_taylor_features_equal_the_truncated_kernel(rule, c, seed, order):
    """`omega_scan` with `TaylorExp(P, temperature=tau)` features (linear memory, W_0 = 0) ==
    `kernel_memory_scan` with the degree-P truncated exp kernel and scale tau^2."""
    T, d = 7, 3
    tau = 0.8
    q, k, v, lr, decay = draw(seed, T, d, 2, unit=True)
    y = scan(
        q, k, v, lr, decay, kernel=taylor_kernel(order), rule=rule, omega_window=c, scale=tau**2
    )
    phi = fm.TaylorExp(order, temperature=tau)
    close(y, omega_reference(phi, q, k, v, lr, decay, rule=rule, c=c))


@given(seed=SEEDS)
def test_i32_truncation_error_obeys_the_i27_bound_and_decreases(seed):
    """With unit q, k and scale 1 (|s| <= 1), |kappa_P - exp| <= e/(P+1)! entrywise, so
    |y_P - y_exp|_t <= e/(P+1)! sum_{i<=t} |v_i| (Hebbian, no gates)."""
    T, d = 7, 4
    q, k, v = draw_qkv(seed, T, d, 3, unit=True)
    exact = np.asarray(scan(q, k, v, scale=1.0))
    mass = np.cumsum(np.abs(v), axis=0)
    errors = []
    for order in (1, 2, 4, 6, 8):
        approx = np.asarray(scan(q, k, v, kernel=taylor_kernel(order), scale=1.0))
        bound = math.e / math.factorial(order + 1) * mass
        assert np.all(np.abs(approx - exact) <= bound * (1 + 1e-9))
        errors.append(np.max(np.abs(approx - exact)))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    # and the feature-space model itself (omega_scan with TaylorExp(6)) is within the bound
    features = omega_reference(fm.TaylorExp(6), q, k, v, None, None, rule="hebbian")
    assert np.all(np.abs(features - exact) <= math.e / math.factorial(7) * mass * (1 + 1e-9))


# --------------------------------------------------------------------------------------------
# Streaming, causality, gradients
# --------------------------------------------------------------------------------------------


STREAM_CONFIGS = [
    dict(rule="hebbian", normalize=True),
    dict(rule="hebbian", omega_window=3, window=2),  # c > w: some writes hit evicted tokens
    dict(rule="delta"),
    dict(rule="delta", omega_window=3, normalize=True),
]


@pytest.mark.parametrize(
    "config", STREAM_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
@given(seed=SEEDS, pieces=st.sampled_from([(3, 4), (1,) * 7]))
def test_streaming_pieces_equal_one_call(config, seed, pieces):
    T, d_k, d_v = 7, 4, 3
    q, k, v, lr, decay = draw(seed, T, d_k, d_v, unit=True)
    lr = lr + 0.1
    whole = scan(q, k, v, lr, decay, **config)
    normalize, window = config.get("normalize", False), config.get("window")
    state = ae.init_kernel_memory_state(9, d_k, d_v, normalize=normalize, window=window)
    assert state.keys.shape[0] == (9 if window is None else window)  # a ring wraps at T = 7
    outputs, start = [], 0
    for n in pieces:
        s = slice(start, start + n)
        y, state = stream(
            q[s],
            k[s],
            v[s],
            None if lr is None else lr[s],
            None if decay is None else decay[s],
            state,
            **config,
        )
        outputs.append(y)
        start += n
    close(np.concatenate(outputs), whole, 1e-12)
    assert int(state.count) == T


@pytest.mark.parametrize(
    "config", STREAM_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
@given(seed=SEEDS, t=st.integers(0, 5))
def test_causality(config, seed, t):
    """Outputs up to t are bit-identical when every input after t changes, even to values whose
    kernel overflows; and the outputs after t do change (the check can fail)."""
    T = 7
    q, k, v, lr, decay = draw(seed, T, 4, 3, unit=True)
    lr = lr + 0.1
    y = np.asarray(scan(q, k, v, lr, decay, **config))
    q2, k2, v2, lr2, decay2 = (x.copy() for x in (q, k, v, lr, decay))
    q2[t + 1 :] *= 1e3
    k2[t + 1 :] *= 1e3
    v2[t + 1 :] += 5.0
    lr2[t + 1 :] = 0.3
    decay2[t + 1 :] = 0.5
    y2 = np.asarray(scan(q2, k2, v2, lr2, decay2, **config))
    np.testing.assert_array_equal(y[: t + 1], y2[: t + 1])
    assert not np.array_equal(y[t + 1 :], y2[t + 1 :])


@pytest.mark.parametrize(
    "config", STREAM_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_gradients_match_central_differences(config):
    T = 5
    q, k, v, lr, decay = draw(3, T, 4, 3, unit=True)
    lr, decay = 0.2 + 0.6 * lr, 0.2 + 0.6 * decay  # away from the range edges
    inputs = tuple(jnp.asarray(x) for x in (q, k, v, lr, decay))
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((T, 3)))

    @jax.jit
    def loss(inputs):
        return jnp.sum(weights * ae.kernel_memory_scan(*inputs, **config))

    grads = jax.grad(loss)(inputs)
    rng = np.random.default_rng(2)
    directions = tuple(jnp.asarray(rng.standard_normal(x.shape)) for x in inputs)
    eps = 1e-6
    plus = loss(tuple(x + eps * u for x, u in zip(inputs, directions, strict=True)))
    minus = loss(tuple(x - eps * u for x, u in zip(inputs, directions, strict=True)))
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(jnp.sum(g * u) for g, u in zip(grads, directions, strict=True))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.fixture
def _flush_runtime_errors():
    """Drop JAX's runtime tokens after a test whose `eqx.error_if` fired (see test_bad_input)."""
    yield
    try:
        jax.effects_barrier()
    except jax.errors.JaxRuntimeError:
        pass


def _args(T=5, d=3):
    q, k, v, lr, decay = draw(0, T, d, d)
    return q, k, v, lr, decay


@pytest.mark.parametrize(
    "index, name, value",
    [
        (1, "k", np.ones((4, 3))),
        (2, "v", np.ones((6, 3))),
        (3, "lr", np.ones(4)),
        (4, "decay", np.ones(6)),
    ],
)
def test_bad_shapes_name_the_argument(index, name, value):
    args = list(_args())
    args[index] = value
    with pytest.raises(TypeCheckError, match=f"parameter '{name}'"):
        ae.kernel_memory_scan(*args)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(rule="delta", window=2), "`window`"),
        (dict(omega_window=0), "`omega_window`"),
        (dict(window=0), "`window`"),
        (dict(scale=-1.0), "`scale`"),
        (dict(kernel=3.0), "parameter 'kernel'"),
    ],
)
def test_bad_options_raise_value_errors(options, match):
    with pytest.raises((ValueError, TypeCheckError), match=match):
        ae.kernel_memory_scan(*_args(), **options)


@pytest.mark.usefixtures("_flush_runtime_errors")
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_finite_inputs_raise(name):
    args = dict(zip(("q", "k", "v", "lr", "decay"), _args(), strict=True))
    args[name] = args[name].copy()
    args[name][1, 0] = np.inf
    with pytest.raises(eqx.EquinoxRuntimeError, match=f"`{name}` contains NaN or inf"):
        jax.block_until_ready(scan(**args))


@pytest.mark.usefixtures("_flush_runtime_errors")
@pytest.mark.parametrize("name, value", [("lr", -0.1), ("decay", 1.5), ("decay", np.nan)])
def test_gates_out_of_range_raise(name, value):
    q, k, v, lr, decay = _args()
    gates = dict(lr=lr.copy(), decay=decay.copy())
    gates[name][2] = value
    with pytest.raises(eqx.EquinoxRuntimeError, match=f"`{name}`"):
        jax.block_until_ready(scan(q, k, v, gates["lr"], gates["decay"]))


@pytest.mark.usefixtures("_flush_runtime_errors")
def test_stream_state_errors():
    q, k, v, lr, decay = _args()
    state = ae.init_kernel_memory_state(4, 3, 3)
    with pytest.raises(eqx.EquinoxRuntimeError, match="capacity"):
        jax.block_until_ready(stream(q, k, v, lr, decay, state))
    with pytest.raises(ValueError, match="normalize"):
        ae.kernel_memory_stream(q, k, v, lr, decay, state, normalize=True)
    with pytest.raises(ValueError, match="`max_length`"):
        ae.init_kernel_memory_state(0, 3, 3)
    with pytest.raises(eqx.EquinoxRuntimeError, match="capacity"):  # 4 slots < window: no ring
        jax.block_until_ready(stream(q, k, v, lr, decay, state, window=5))


@pytest.mark.parametrize("rule", ["hebbian", "delta"])
def test_float32_stays_float32_and_agrees(rule):
    q, k, v, lr, decay = draw(4, 7, 4, 3, unit=True)
    exact = scan(q, k, v, lr, decay, rule=rule, omega_window=2)
    single = (x.astype(np.float32) for x in (q, k, v, lr, decay))
    y = scan(*single, rule=rule, omega_window=2)
    assert y.dtype == jnp.float32 and y.shape == (7, 3)
    close(y, exact, 1e-5)
