"""Properties of `optimizers`: Newton-Schulz (digest section 4.2, I-33 to I-36, I-18, I-9) and the
inner learners `gd` / `momentum` / `muon` / `from_optax` (digest section 4.1, I-14 to I-16).

Every test compares against an independent oracle: a NumPy loop of the documented update, the SVD,
a closed form, or central finite differences. Shapes come from small fixed sets so that the jitted
helpers below compile once per shape; Hypothesis draws seeds and scalars.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st
from jaxtyping import ArrayLike, Float

import optimizers
from optimizers import CUBIC_COEFFICIENTS, JORDAN_COEFFICIENTS, newton_schulz
from optimizers._newton_schulz import _iterate, _iterate_plain


SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
SMALL_SHAPES = [(4, 7), (7, 4), (5, 5)]  # wide, tall (transposed inside NS), square
BIG_SHAPES = [(64, 256), (256, 64), (32, 128)]  # the digest's I-34 / I-35 shapes
GRAD_SHAPES = SMALL_SHAPES[:2]

_ns = jax.jit(newton_schulz, static_argnames=("steps", "coefficients", "eps"))


def _gaussian(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _ns_numpy(G, steps=5, coefficients=JORDAN_COEFFICIENTS, eps=1e-7) -> np.ndarray:
    """Keller Jordan's `zeropower_via_newtonschulz5` (digest 4.2), in float64 NumPy."""
    a, b, c = coefficients
    X = np.asarray(G, np.float64)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = np.swapaxes(X, -1, -2)
    X = X / (np.linalg.norm(X, axis=(-2, -1), keepdims=True) + eps)
    for _ in range(steps):
        A = X @ np.swapaxes(X, -1, -2)
        X = a * X + (b * A + c * A @ A) @ X
    return np.swapaxes(X, -1, -2) if tall else X


def _ns_scalar(x: np.ndarray, steps: int, coefficients) -> np.ndarray:
    """The composed odd polynomial f acting on singular values: NS(G) = U f(S / (|G|_F + eps)) V^T."""
    a, b, c = coefficients
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def _singular_values(X) -> np.ndarray:
    # Eigenvalues of the small Gram matrix: much cheaper than an SVD of a 64 x 256 matrix.
    X = np.asarray(X, np.float64)
    X = X if X.shape[-2] <= X.shape[-1] else X.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(X @ X.T), 0.0, None))


def _polar_factor(G: np.ndarray) -> np.ndarray:
    """U V^T from the SVD G = U S V^T, computed as (G G^T)^(-1/2) G on the wide orientation."""
    if G.shape[0] > G.shape[1]:
        return _polar_factor(G.T).T
    eigenvalues, Q = np.linalg.eigh(G @ G.T)
    return (Q / np.sqrt(eigenvalues)) @ Q.T @ G


# ------------------------------------------------------------------------------------------------
# Newton-Schulz
# ------------------------------------------------------------------------------------------------


def test_coefficients_are_muons_and_the_classical_cubic():
    # Pinned: the reference below reads the same constants, so a typo would otherwise go unseen.
    assert JORDAN_COEFFICIENTS == (3.4445, -4.7750, 2.0315)
    assert CUBIC_COEFFICIENTS == (1.5, -0.5, 0.0)


@given(seed=SEEDS, shape=st.sampled_from(SMALL_SHAPES))
def test_ns_matches_numpy_reference(seed, shape):
    G = _gaussian(seed, shape)
    np.testing.assert_allclose(_ns(G), _ns_numpy(G), rtol=0, atol=1e-12)


@given(seed=SEEDS, shape=st.sampled_from(SMALL_SHAPES))
def test_i33_ns_preserves_singular_vectors(seed, shape):
    # NS(G) = U f(S) V^T with the same U, V as G and f > 0, hence NS(G) G^T is symmetric PSD.
    G = _gaussian(seed, shape)
    X = np.asarray(_ns(G))
    U, s, Vt = np.linalg.svd(G, full_matrices=False)
    f = _ns_scalar(s / (np.linalg.norm(G) + 1e-7), 5, JORDAN_COEFFICIENTS)
    assert np.all(f > 0)
    np.testing.assert_allclose(X, (U * f) @ Vt, rtol=0, atol=1e-10)
    for P in (X @ G.T, G.T @ X):
        np.testing.assert_allclose(P, P.T, rtol=0, atol=1e-10)
        assert np.linalg.eigvalsh((P + P.T) / 2).min() >= -1e-10


@given(seed=SEEDS, shape=st.sampled_from(SMALL_SHAPES), c=st.floats(1e-3, 1e3))
def test_i33_ns_scale_invariant(seed, shape, c):
    G = _gaussian(seed, shape)
    np.testing.assert_allclose(_ns(c * G, eps=0.0), _ns(G, eps=0.0), rtol=0, atol=1e-9)
    # With the default eps: cG / (c|G| + eps) = G / (|G| + eps/c), so scaling G rescales eps.
    np.testing.assert_allclose(_ns(c * G), _ns_numpy(G, eps=1e-7 / c), rtol=0, atol=1e-9)


@given(seed=SEEDS, shape=st.sampled_from(SMALL_SHAPES))
def test_i33_ns_is_odd_exactly(seed, shape):
    G = _gaussian(seed, shape)
    np.testing.assert_array_equal(_ns(-G), -np.asarray(_ns(G)))


@given(seed=SEEDS, shape=st.sampled_from(SMALL_SHAPES))
def test_i33_ns_orthogonal_equivariance(seed, shape):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal(shape)
    U, V = _orthogonal(rng, shape[0]), _orthogonal(rng, shape[1])
    lhs = _ns(U @ G @ V)
    rhs = U @ np.asarray(_ns(G)) @ V
    np.testing.assert_allclose(lhs, rhs, rtol=0, atol=1e-10)


@given(seed=SEEDS, shape=st.sampled_from(SMALL_SHAPES))
def test_i33_ns_commutes_with_transpose(seed, shape):
    G = _gaussian(seed, shape)
    np.testing.assert_allclose(_ns(G.T), np.asarray(_ns(G)).T, rtol=0, atol=1e-12)


@given(seed=SEEDS, shape=st.sampled_from(BIG_SHAPES))
def test_i34_jordan_ns5_band_float64_and_no_convergence(seed, shape):
    s = _singular_values(_ns(_gaussian(seed, shape)))
    assert 0.68 <= s.min() and s.max() <= 1.14, (s.min(), s.max())
    # Not the polar factor: do not "fix" this (digest I-34).
    assert np.abs(s - 1).max() > 0.1


@given(seed=SEEDS)
def test_i34_jordan_more_steps_do_not_converge(seed):
    s = _singular_values(_ns(_gaussian(seed, (64, 256)), steps=20))
    assert np.abs(s - 1).max() > 0.1
    assert 0.68 <= s.min() and s.max() <= 1.2, (s.min(), s.max())


@given(seed=SEEDS, shape=st.sampled_from(BIG_SHAPES))
def test_i34_jordan_ns5_band_float32(seed, shape):
    X = _ns(_gaussian(seed, shape).astype(np.float32))
    assert X.dtype == jnp.float32
    s = _singular_values(X)
    assert 0.6 <= s.min() and s.max() <= 1.25, (s.min(), s.max())


@given(seed=SEEDS, shape=st.sampled_from(BIG_SHAPES))
def test_i35_cubic_converges_to_polar_factor(seed, shape):
    G = _gaussian(seed, shape)
    X = np.asarray(_ns(G, steps=10, coefficients=CUBIC_COEFFICIENTS))
    np.testing.assert_allclose(_singular_values(X), 1.0, rtol=0, atol=1e-4)
    np.testing.assert_allclose(X, _polar_factor(G), rtol=0, atol=1e-4)


_ns_positions_heads = jax.jit(jax.vmap(jax.vmap(newton_schulz)))


@given(seed=SEEDS, shape=st.sampled_from(SMALL_SHAPES[:2]))
def test_i36_batched_ns_equals_loop(seed, shape):
    positions, heads = 3, 2
    G = _gaussian(seed, (positions, heads, *shape))
    G[1, 0] = 0.0  # a zero matrix stays exactly zero and does not contaminate its neighbours
    loop = np.stack(
        [np.stack([np.asarray(_ns(G[t, h])) for h in range(heads)]) for t in range(positions)]
    )
    np.testing.assert_array_equal(loop[1, 0], 0.0)
    np.testing.assert_allclose(_ns_positions_heads(G), loop, rtol=0, atol=1e-12)
    np.testing.assert_allclose(_ns(G), loop, rtol=0, atol=1e-12)  # leading axes are batch axes


@given(seed=SEEDS, shape=st.sampled_from(BIG_SHAPES))
def test_i36_float32_close_to_float64(seed, shape):
    # Measured at most 9.6e-7 on CPU over 20 seeds x these shapes; 1e-5 leaves a margin of 10.
    # (TF32 matmuls on a GPU would need 1e-2; this suite runs on CPU.)
    G = _gaussian(seed, shape)
    X32 = np.asarray(_ns(G.astype(np.float32)), np.float64)
    np.testing.assert_allclose(X32, _ns(G), rtol=0, atol=1e-5)


_ns_grad = jax.jit(jax.grad(lambda G, R: jnp.sum(newton_schulz(G) * R)))


@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_i18_ns_of_zero_is_zero_with_finite_gradient(shape):
    zero = np.zeros(shape)
    X = _ns(zero)
    assert not np.any(np.isnan(X))
    np.testing.assert_array_equal(X, 0.0)
    if shape not in GRAD_SHAPES:
        return
    # Near 0, NS(G) = a^k G / eps to first order (the norm's gradient is 0 at 0).
    R = _gaussian(0, shape)
    grad = _ns_grad(zero, R)
    assert np.all(np.isfinite(grad))
    a = JORDAN_COEFFICIENTS[0]
    np.testing.assert_allclose(grad, a**5 / 1e-7 * R, rtol=1e-12)


@pytest.mark.parametrize("shape", GRAD_SHAPES)
def test_ns_amplifies_small_singular_directions_by_a_to_the_k(shape):
    """NS_5 maps every singular value of G / |G|_F through the composed quintic f, whose slope at
    0 is a^5 = 3.4445^5 ~ 485. So at a rank-1 G = s u1 v1^T the derivative along a direction
    u2 v2^T orthogonal to it is exactly a^5 / (s + eps) u2 v2^T: a momentum with tiny singular
    values is amplified ~485 / |G|_F in those directions. This is the sensitivity behind atlas's
    large outer gradient norms (experiments/results/niah-extrapolate/gradient_norm.md)."""
    rng = np.random.default_rng(7)
    U = _orthogonal(rng, shape[0])
    V = _orthogonal(rng, shape[1])
    s = 3.0
    G = s * np.outer(U[:, 0], V[:, 0])
    E = np.outer(U[:, 1], V[:, 1])
    _, tangent = jax.jvp(lambda g: newton_schulz(g), (jnp.asarray(G),), (jnp.asarray(E),))
    a = JORDAN_COEFFICIENTS[0]
    np.testing.assert_allclose(np.asarray(tangent), a**5 / (s + 1e-7) * E, rtol=1e-10, atol=1e-12)
    assert 480 < a**5 < 490


@given(seed=SEEDS, shape=st.sampled_from(GRAD_SHAPES))
def test_i9_ns_gradient_matches_central_differences(seed, shape):
    rng = np.random.default_rng(seed)
    G, R = rng.standard_normal(shape), rng.standard_normal(shape)
    # Central differences of the NumPy reference (equal to the library to 1e-12, see above).
    h = 1e-6
    E = np.eye(G.size).reshape(G.size, *shape)
    plus = np.sum(_ns_numpy(G + h * E) * R, axis=(-2, -1))
    minus = np.sum(_ns_numpy(G - h * E) * R, axis=(-2, -1))
    fd = ((plus - minus) / (2 * h)).reshape(shape)
    grad = np.asarray(_ns_grad(G, R))
    np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-6 * max(1.0, np.abs(fd).max()))


STEPS = st.sampled_from([0, 1, 5])
COEFFICIENTS = st.sampled_from([JORDAN_COEFFICIENTS, CUBIC_COEFFICIENTS])
BATCHED_SHAPES = [(4, 7), (2, 3, 4, 7)]


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _derivatives(X, X_dot, Y_bar, steps, coefficients, plain):
    """Value, tangent, cotangent and a second-order reverse derivative of one NS iteration."""
    iterate = _iterate_plain if plain else _iterate

    def f(X):
        return iterate(X, steps, coefficients)

    Y, Y_dot = jax.jvp(f, (X,), (X_dot,))
    (X_bar,) = jax.vjp(f, X)[1](Y_bar)

    def reverse_along(X):
        return jnp.sum(jax.vjp(f, X)[1](Y_bar)[0] * X_dot)

    return Y, Y_dot, X_bar, jax.grad(reverse_along)(X)


@given(seed=SEEDS, shape=st.sampled_from(BATCHED_SHAPES), steps=STEPS, coefficients=COEFFICIENTS)
def test_ns_tangent_rule_matches_differentiating_the_plain_iteration(
    seed, shape, steps, coefficients
):
    """`_iterate`'s hand-written tangent rule (forward mode, its transpose in reverse mode, and
    reverse mode differentiated again) against JAX differentiating the plain steps, float64."""
    rng = np.random.default_rng(seed)
    X, X_dot, Y_bar = (rng.standard_normal(shape) for _ in range(3))
    X = X / np.linalg.norm(X, axis=(-2, -1), keepdims=True)
    ours = _derivatives(X, X_dot, Y_bar, steps, coefficients, False)
    plain = _derivatives(X, X_dot, Y_bar, steps, coefficients, True)
    for name, got, want in zip(
        ("value", "tangent", "cotangent", "second order"), ours, plain, strict=True
    ):
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * scale, err_msg=name)


# ------------------------------------------------------------------------------------------------
# Inner learners
# ------------------------------------------------------------------------------------------------


class _Memory(eqx.Module):
    w_in: Float[ArrayLike, "6 4"]  # tall: NS runs on the transpose
    w_out: Float[ArrayLike, "4 6"]  # wide
    bias: Float[ArrayLike, " 4"]  # 1-D: plain momentum step under muon


_LEARNERS = {
    "gd": optimizers.gd(),
    "momentum": optimizers.momentum(),
    "muon": optimizers.muon(),
    "muon_eta_inside_ns": optimizers.muon(eta_inside_ns=True),
}


def _tree(kind: str, rng: np.random.Generator, leading: tuple[int, ...] = ()):
    w_in = rng.standard_normal((*leading, 6, 4))
    w_out = rng.standard_normal((*leading, 4, 6))
    bias = rng.standard_normal((*leading, 4))
    # NumPy leaves: filter_jit traces them, and slicing them never compiles an eager op.
    if kind == "module":
        return _Memory(w_in, w_out, bias)
    return {"w_in": w_in, "out": {"w": w_out, "b": bias}}


def _schedules(rng: np.random.Generator, shape: tuple[int, ...]):
    lr = rng.uniform(0.05, 0.5, shape)
    decay = rng.uniform(0.6, 1.0, shape)
    mom = rng.uniform(0.0, 0.95, shape)
    return lr, decay, mom


def _reference(name: str, params, grads_seq, lr, decay, mom):
    """The documented update as a NumPy loop; returns (params after every token, final S)."""
    leaves, treedef = jax.tree.flatten(params)
    W = [np.array(w, np.float64) for w in leaves]
    S = [np.zeros_like(w) for w in W]
    G = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads_seq)]
    history = [[] for _ in W]
    for t in range(len(lr)):
        for i in range(len(W)):
            g = G[i][t]
            P = (lambda x: _ns_numpy(x) if x.ndim == 2 else x) if "muon" in name else (lambda x: x)
            if name == "gd":
                W[i] = decay[t] * W[i] - lr[t] * g
            elif name == "muon_eta_inside_ns":  # S = theta S + eta g;  W = alpha W - NS(S)
                S[i] = mom[t] * S[i] + lr[t] * g
                W[i] = decay[t] * W[i] - P(S[i])
            else:  # S = theta S + g;  W = alpha W - eta P(S)
                S[i] = mom[t] * S[i] + g
                W[i] = decay[t] * W[i] - lr[t] * P(S[i])
            history[i].append(W[i].copy())
    return treedef.unflatten([np.stack(h) for h in history]), treedef.unflatten(S)


@eqx.filter_jit
def _step(optimizer, params, state, grads, lr, decay, mom):
    updates, state = optimizer.update(grads, state, params, lr=lr, decay=decay, momentum=mom)
    return optimizers.apply_updates(params, updates), state


def _run_loop(optimizer, params, grads_seq, lr, decay, mom):
    state = optimizer.init(params)
    history = []
    for t in range(len(lr)):
        grads = jax.tree.map(lambda g, t=t: g[t], grads_seq)
        s = [np.asarray(x[t]) for x in (lr, decay, mom)]
        params, state = _step(optimizer, params, state, grads, *s)
        history.append(params)
    return jax.tree.map(lambda *xs: np.stack(xs), *history), state


def _run_scan(optimizer, params, grads_seq, lr, decay, mom):
    def body(carry, xs):
        params, state = carry
        grads, lr_t, decay_t, mom_t = xs
        updates, state = optimizer.update(
            grads, state, params, lr=lr_t, decay=decay_t, momentum=mom_t
        )
        params = optimizers.apply_updates(params, updates)
        return (params, state), params

    init = (params, optimizer.init(params))
    (_, state), history = jax.lax.scan(body, init, (grads_seq, lr, decay, mom))
    return history, state


_run_scan_jit = eqx.filter_jit(_run_scan)


@eqx.filter_jit
def _run_scan_over_heads(optimizer, params, grads_seq, lr, decay, mom):
    return jax.vmap(lambda *args: _run_scan(optimizer, *args))(params, grads_seq, lr, decay, mom)


def _assert_trees_close(actual, expected, rtol=1e-11, atol=1e-14):
    """Leaf by leaf and element by element relative to each element's size (an absolute
    tolerance alone would pass any error in the small entries)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "name, kind", [(name, "module") for name in _LEARNERS] + [("muon", "dict")]
)
@given(seed=SEEDS)
def test_learner_equals_documented_loop(name, kind, seed):
    rng = np.random.default_rng(seed)
    T = 5
    params = _tree(kind, rng)
    grads_seq = _tree(kind, rng, leading=(T,))
    lr, decay, mom = _schedules(rng, (T,))
    history, state = _run_loop(_LEARNERS[name], params, grads_seq, lr, decay, mom)
    expected, expected_S = _reference(name, params, grads_seq, lr, decay, mom)
    _assert_trees_close(history, expected)
    if name == "gd":
        assert state == optimizers.EmptyState()
    else:
        assert isinstance(state, optimizers.MomentumState)
        _assert_trees_close(state.momentum, expected_S)


@pytest.mark.parametrize("name", list(_LEARNERS))
@given(seed=SEEDS)
def test_learner_in_scan_and_vmapped_over_heads(name, seed):
    rng = np.random.default_rng(seed)
    H, T = 3, 4
    params = _tree("module", rng, leading=(H,))
    grads_seq = _tree("module", rng, leading=(H, T))
    lr, decay, mom = _schedules(rng, (H, T))
    optimizer = _LEARNERS[name]
    history, _ = _run_scan_over_heads(optimizer, params, grads_seq, lr, decay, mom)
    for h in range(H):
        head = lambda tree, h=h: jax.tree.map(lambda x: x[h], tree)
        expected, _ = _reference(name, head(params), head(grads_seq), lr[h], decay[h], mom[h])
        _assert_trees_close(head(history), expected)


def test_muon_state_keeps_dtype_in_scan():
    # float32 weights with the float64 per-token scalars that x64 produces: the momentum buffer
    # must stay float32, or the scan carry changes type. (Also: a scan without vmap.)
    rng = np.random.default_rng(0)
    T = 4
    params = jax.tree.map(lambda x: x.astype(np.float32), _tree("module", rng))
    grads_seq = jax.tree.map(lambda x: x.astype(np.float32), _tree("module", rng, leading=(T,)))
    lr, decay, mom = _schedules(rng, (T,))
    history, state = _run_scan_jit(optimizers.muon(), params, grads_seq, lr, decay, mom)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((history, state)))
    expected, _ = _reference("muon", params, grads_seq, lr, decay, mom)
    _assert_trees_close(history, expected, rtol=1e-5, atol=1e-6)  # float32


# I-15 / I-16 on a linear memory W (3 x 4) with the gradient of 1/2 |W k - v|^2 at W_{t-1}.


@eqx.filter_jit
def _memory_step(optimizer, W, state, k, v, lr, decay, mom):
    g = jax.grad(lambda W: 0.5 * jnp.sum((W @ k - v) ** 2))(W)
    updates, state = optimizer.update(g, state, W, lr=lr, decay=decay, momentum=mom)
    return optimizers.apply_updates(W, updates), state


def _memory_run(optimizer, W, keys, values, lr, decay, mom):
    state = optimizer.init(W)
    history = []
    for t in range(len(lr)):
        s = [np.asarray(x[t]) for x in (lr, decay, mom)]
        W, state = _memory_step(optimizer, W, state, keys[t], values[t], *s)
        history.append(np.asarray(W))
    return np.stack(history)


def _memory_grad(W, k, v):
    return np.outer(W @ k - v, k)


def _memory_problem(seed: int, T: int = 6):
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((3, 4))
    keys, values = rng.standard_normal((T, 4)), rng.standard_normal((T, 3))
    decay = rng.uniform(0.8, 1.0, T)
    theta = rng.uniform(0.5, 0.95, T)
    return W0, keys, values, decay, theta


def _titans_run(W, keys, values, eta, decay, theta):
    """Titans' form: S = theta S - eta g;  W = alpha W + S."""
    S = np.zeros_like(W)
    history = []
    for t in range(len(eta)):
        S = theta[t] * S - eta[t] * _memory_grad(W, keys[t], values[t])
        W = decay[t] * W + S
        history.append(W)
    return np.stack(history)


@given(seed=SEEDS, eta=st.floats(0.01, 0.3))
def test_i15_atlas_momentum_equals_titans_form_iff_eta_constant(seed, eta):
    W0, keys, values, decay, theta = _memory_problem(seed)
    T = len(decay)
    momentum = optimizers.momentum()
    constant = np.full(T, eta)
    atlas = _memory_run(momentum, W0, keys, values, constant, decay, theta)
    np.testing.assert_allclose(
        atlas, _titans_run(W0, keys, values, constant, decay, theta), atol=1e-12
    )
    # With a varying eta the forms differ ...
    varying = eta * np.where(np.arange(T) % 2 == 0, 1.0, 3.0)
    titans = _titans_run(W0, keys, values, varying, decay, theta)
    atlas = _memory_run(momentum, W0, keys, values, varying, decay, theta)
    assert np.abs(atlas - titans).max() > 0.1 * eta  # measured >= 2.4 eta over 200 seeds
    # ... and Titans(eta, theta) is Atlas with the momentum rescaled to theta_t eta_{t-1} / eta_t.
    rescaled = theta * np.concatenate([[1.0], varying[:-1]]) / varying
    atlas = _memory_run(momentum, W0, keys, values, varying, decay, rescaled)
    np.testing.assert_allclose(atlas, titans, rtol=0, atol=1e-12)


@given(seed=SEEDS)
def test_i16_muon_plus_and_minus_momentum_forms_agree(seed):
    W0, keys, values, decay, theta = _memory_problem(seed)
    eta = np.random.default_rng(seed + 1).uniform(0.05, 0.5, len(decay))
    atlas = _memory_run(optimizers.muon(), W0, keys, values, eta, decay, theta)
    # S- = theta S- - g;  W = alpha W + eta NS(S-)
    W, S = W0, np.zeros_like(W0)
    minus = []
    for t in range(len(eta)):
        S = theta[t] * S - _memory_grad(W, keys[t], values[t])
        W = decay[t] * W + eta[t] * _ns_numpy(S)
        minus.append(W)
    np.testing.assert_allclose(atlas, np.stack(minus), rtol=0, atol=1e-12)


_SGD = optimizers.from_optax(optax.sgd(1.0))
_SGD_MOMENTUM = optimizers.from_optax(optax.sgd(1.0, momentum=0.9))


@given(seed=SEEDS)
def test_from_optax_sgd_equals_gd_and_momentum(seed):
    rng = np.random.default_rng(seed)
    T = 5
    params = _tree("module", rng)
    grads_seq = _tree("module", rng, leading=(T,))
    lr, decay, mom = _schedules(rng, (T,))
    expected, _ = _run_loop(optimizers.gd(), params, grads_seq, lr, decay, mom)
    actual, _ = _run_loop(_SGD, params, grads_seq, lr, decay, mom)
    _assert_trees_close(actual, expected)

    theta = np.full(T, 0.9)
    expected, _ = _run_loop(optimizers.momentum(), params, grads_seq, lr, decay, theta)
    actual, _ = _run_loop(_SGD_MOMENTUM, params, grads_seq, lr, decay, mom)  # mom is ignored
    _assert_trees_close(actual, expected)


def test_same_factory_arguments_reuse_compiled_code():
    traces = []

    @eqx.filter_jit
    def step(optimizer, params, grads, lr, decay, mom):
        traces.append(None)
        state = optimizer.init(params)
        updates, _ = optimizer.update(grads, state, params, lr=lr, decay=decay, momentum=mom)
        return optimizers.apply_updates(params, updates)

    rng = np.random.default_rng(0)
    params, grads = _tree("module", rng), _tree("module", rng)
    scalars = [np.asarray(x) for x in (0.1, 0.9, 0.5)]

    def count(*learners):
        for learner in learners:
            step(learner, params, grads, *scalars)
        return len(traces)

    assert count(optimizers.muon(), optimizers.muon()) == 1
    assert count(optimizers.muon(5, list(JORDAN_COEFFICIENTS), 1e-7)) == 1
    assert count(optimizers.muon(ns_steps=3)) == 2  # a different static argument does retrace
    assert count(optimizers.momentum(), optimizers.momentum()) == 3
    assert count(optimizers.gd(), optimizers.gd()) == 4
    tx = optax.sgd(1.0, momentum=0.9)
    assert count(optimizers.from_optax(tx), optimizers.from_optax(tx)) == 5
    # New scalar values reuse the trace too: the per-token scalars are traced, not static.
    step(optimizers.muon(), params, grads, *[np.asarray(x) for x in (0.3, 0.7, 0.2)])
    assert len(traces) == 5

    # Equal factory calls give equal, hashable learners, so they also work as static fields.
    assert optimizers.muon() == optimizers.muon()
    assert hash(optimizers.muon()) == hash(optimizers.muon())
    assert optimizers.muon() != optimizers.muon(ns_steps=3)
    assert optimizers.muon() != optimizers.muon(eta_inside_ns=True)
    assert optimizers.momentum() == optimizers.momentum()
    assert optimizers.momentum() != optimizers.muon()

    static_traces = []

    @jax.jit
    def apply(static, params, grads):
        static_traces.append(None)
        optimizer = static.optimizer
        state = optimizer.init(params)
        updates, _ = optimizer.update(grads, state, params, lr=0.1, decay=0.9, momentum=0.5)
        return optimizers.apply_updates(params, updates)

    class Holder(eqx.Module):
        optimizer: optimizers.InnerOptimizer = eqx.field(static=True)

    apply(Holder(optimizers.muon()), params, grads)
    apply(Holder(optimizers.muon()), params, grads)
    assert len(static_traces) == 1


@pytest.mark.parametrize("n", [16, 64])
def test_i34_square_matrices_with_tiny_singular_values_need_eight_steps(n):
    """Square G with singular values from 1e-4 to 1 (below 1e-4 of its Frobenius norm at the
    small end): 5 and 7 steps leave the smallest below the band, 8 bring every one into
    [0.6, 1.25]."""
    rng = np.random.default_rng(n)
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    G = U @ np.diag(np.logspace(-4, 0, n)) @ V.T
    smallest = {}
    for steps in (5, 7, 8):
        singular = np.linalg.svd(np.asarray(_ns(G, steps=steps)), compute_uv=False)
        smallest[steps] = singular.min()
        if steps == 8:
            assert 0.6 <= singular.min() and singular.max() <= 1.25
    assert smallest[5] < smallest[7] < 0.6
