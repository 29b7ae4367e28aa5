"""The chunk-parallel scan, `method="chunked"` (`atlas_eqx/_chunked.py`; digest section 6 and
invariants I-1 to I-9).

The oracle is `method="sequential"` with the same `chunk_size` (I-1, I-2). Where the sequential
path has no counterpart (the per-chunk Muon approximation, the quadratic form of linear
attention, the decay matrix) the reference is written here from its definition: a plain Python
loop or a closed form in NumPy.

Compile time dominates (each new shape or static option compiles the scan again), so shapes come
from a few fixed small values (`d_k = d_v = 2`, `T` in {5, 7, 9}, hidden widths 3 and 4) and the
number of examples per test is scaled from the Hypothesis profile.
"""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import Inputs, snap_gates_to_edges
from hypothesis import given, settings, strategies as st

import atlas_eqx as ae
import feature_maps as fm
import optimizers as iopt
from atlas_eqx import _chunked
from atlas_eqx._chunked import chunked_scan, decay_matrix
from atlas_eqx._scan_inputs import ScanInputs, ScanRule


D = 2  # d_k = d_v everywhere, so that compiled scans are shared between tests
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
_N = settings().max_examples
MOST = settings(max_examples=max(4, 2 * _N // 3))
FEW = settings(max_examples=max(3, _N // 3))

PHIS: dict[str, fm.AbstractFeatureMap] = {"identity": fm.Identity(), "poly2": fm.Polynomial(2)}
OBJECTIVES: dict[str, Callable[..., Any]] = {"l2": ae.l2, "dot": ae.dot, "huber": ae.huber(0.5)}
OPTIMIZERS: dict[str, iopt.InnerOptimizer] = {
    "gd": iopt.gd(),
    "momentum": iopt.momentum(),
    "muon": iopt.muon(),
    "muon_eta_inside": iopt.muon(eta_inside_ns=True),
}
MEMORIES = ("linear", "mlp2", "mlp3", "gated")
GATE_KINDS = ("none", "token", "step")


# --------------------------------------------------------------------------------------------
# Inputs, references and comparisons
# --------------------------------------------------------------------------------------------


def make_memory(kind: str, d_in: int, seed: int, **kwargs: Any) -> ae.AbstractMemory:
    """`mlp2`: the paper's x + W1 sigma(W2 x) (residual when d_in == d_out); `mlp2_ln`: the same
    with the branch layer-normalised (A-5; at D = 2 the norm is nearly constant, so its
    arithmetic is tested at D = 4 by `test_layer_norm_memory_fast_paths_equal_sequential`);
    `mlp3`: depth 3, no residual."""
    key = jax.random.PRNGKey(seed % (2**31))
    if kind == "linear":
        return ae.LinearMemory(d_in, D, key=key, **kwargs)
    if kind == "mlp2":
        return ae.MLPMemory(d_in, D, key=key, hidden=4, depth=2, **kwargs)
    if kind == "mlp2_ln":
        return ae.MLPMemory(d_in, D, key=key, hidden=4, depth=2, layer_norm=True, **kwargs)
    if kind == "mlp3":
        return ae.MLPMemory(d_in, D, key=key, hidden=3, depth=3, residual=False, **kwargs)
    if kind == "gated":
        return ae.GatedMLPMemory(d_in, D, key=key, hidden=4, **kwargs)
    raise ValueError(kind)


def make_inputs(
    seed: int,
    T: int,
    *,
    window: int,
    gate_kind: str,
    with_momentum: bool,
    edges: bool = False,
    interior: bool = False,
) -> Inputs:
    """Random float64 inputs. `edges=True` sets some gates to exactly 0 or 1 (alpha_t = 0,
    theta_t = 0, eta_t = 0, ...); `interior=True` keeps every gate strictly inside its range
    (for finite differences)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, D))
    k = rng.standard_normal((T, D))
    v = rng.standard_normal((T, D))
    lo, hi = (0.05, 0.95) if interior else (0.0, 1.0)
    lr = rng.uniform(lo, 0.5, T)
    decay = rng.uniform(0.6, hi, T)
    momentum = rng.uniform(lo, 0.9, T) if with_momentum else None
    if gate_kind == "none":
        gamma = None
    elif gate_kind == "token":
        gamma = rng.uniform(lo, hi, T)
    elif gate_kind == "step":
        gamma = rng.uniform(lo, hi, (T, window))
    else:
        raise ValueError(gate_kind)
    if edges:
        snap_gates_to_edges(rng, lr, (decay, momentum, gamma), one_above=0.85)
    return Inputs(q, k, v, lr, decay, momentum, gamma)


def run(memory: ae.AbstractMemory, x: Inputs, **kwargs: Any):
    return ae.omega_scan(memory, *x.arrays(), **kwargs)


def _direct(memory, feature_map, q, k, v, lr, decay, momentum, gamma, *, optimizer, window, **kw):
    """`chunked_scan` on the arguments `omega_scan` would hand it (for its private keywords)."""
    state = ae.init_omega_state(memory, optimizer, window)
    T = q.shape[0]
    momentum = jnp.zeros((T,)) if momentum is None else momentum
    gamma = jnp.ones((T,)) if gamma is None else gamma
    inputs = ScanInputs(feature_map(q), feature_map(k), v, lr, decay, momentum, gamma)
    private = {name: kw.pop(name) for name in ("remat", "force_materialised") if name in kw}
    rule = ScanRule(optimizer=optimizer, window=window, **kw)
    return chunked_scan(state, inputs, rule, **private)


_direct_jit = eqx.filter_jit(_direct)


def run_direct(memory, x: Inputs, *, feature_map: fm.AbstractFeatureMap = fm.Identity(), **kw: Any):
    arrays = [None if a is None else jnp.asarray(a) for a in x.arrays()]
    return _direct_jit(memory, feature_map, *arrays, **kw)


def assert_tree_close(actual: Any, desired: Any, *, rel: float = 1e-9) -> None:
    """Same structure, shapes and dtypes; every float leaf within `rel * max(1, max |desired|)`
    (relative to the leaf's scale: deep memories trained by the Hebbian bias grow large)."""
    a_leaves, a_def = jax.tree.flatten(actual)
    d_leaves, d_def = jax.tree.flatten(desired)
    assert a_def == d_def, (a_def, d_def)
    for i, (a, d) in enumerate(zip(a_leaves, d_leaves, strict=True)):
        a, d = np.asarray(a), np.asarray(d)
        assert a.shape == d.shape and a.dtype == d.dtype, (i, a.shape, d.shape, a.dtype, d.dtype)
        if a.dtype == bool:
            np.testing.assert_array_equal(a, d)
            continue
        assert np.all(np.isfinite(a)), (i, a)
        scale = max(1.0, float(np.max(np.abs(d), initial=0.0)))
        np.testing.assert_allclose(a, d, rtol=0.0, atol=rel * scale, err_msg=f"leaf {i}")


def weight_leaves(memory: ae.AbstractMemory) -> list[np.ndarray]:
    return [np.asarray(w) for w in jax.tree.leaves(eqx.filter(memory, eqx.is_inexact_array))]


def split_params(memory: ae.AbstractMemory):
    params, static = eqx.partition(memory, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)

    def rebuild(new_leaves):
        tree = jax.tree.unflatten(treedef, [jnp.asarray(w) for w in new_leaves])
        return eqx.combine(tree, static)

    return [np.asarray(w, np.float64) for w in leaves], rebuild


@eqx.filter_jit
def _token_grad(memory, x, v, objective):
    grads = eqx.filter_grad(lambda m: objective(m(x), v))(memory)
    return jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))


@eqx.filter_jit
def _read(memory, x):
    return memory(x)


_newton_schulz = jax.jit(iopt.newton_schulz)


def gate_of(x: Inputs, t: int, j: int) -> float:
    """gamma_{t, t-j}: per written token (shape (T,)) or per step and offset (shape (T, c))."""
    if x.gamma is None:
        return 1.0
    return float(x.gamma[t - j] if x.gamma.ndim == 1 else x.gamma[t, j])


def naive_per_chunk_muon(
    memory: ae.AbstractMemory,
    x: Inputs,
    *,
    feature_map: fm.AbstractFeatureMap,
    objective: Callable[..., Any],
    eta_inside: bool,
    window: int,
    b: int,
):
    """`muon_per_chunk=True` from its definition, one chunk of real tokens at a time.

    Per token: g_t = sum_j gamma_{t,t-j} grad l_{t-j}(W_s) at the chunk-start anchor W_s, and
    S_t = theta_t S_{t-1} + g_t (eta_t g_t with eta inside NS). Per chunk: O = NS(S_end) and
    W_end = A_b W_s - (sum_m L_alpha[b, m] eta_m) O (eta_m -> 1 with eta inside NS). Reads:
    y_t = M(phi(q_t); A_t W_s), A_t the chunk-local product of alpha up to and including t.
    """
    W, rebuild = split_params(memory)
    S = [np.zeros_like(w) for w in W]
    phi_q = np.asarray(feature_map(jnp.asarray(x.q)))
    phi_k = np.asarray(feature_map(jnp.asarray(x.k)))
    T = x.T
    theta = np.zeros(T) if x.momentum is None else x.momentum
    ys = []
    for start in range(0, T, b):
        chunk = list(range(start, min(start + b, T)))
        anchor = rebuild(W)
        for t in chunk:
            g = [np.zeros_like(w) for w in W]
            for j in range(min(window, t + 1)):
                grads = _token_grad(anchor, phi_k[t - j], x.v[t - j], objective)
                g = [
                    gi + gate_of(x, t, j) * np.asarray(dg) for gi, dg in zip(g, grads, strict=True)
                ]
            scale_g = x.lr[t] if eta_inside else 1.0
            S = [theta[t] * s + scale_g * gi for s, gi in zip(S, g, strict=True)]
            A_t = math.prod(x.decay[start : t + 1])
            ys.append(np.asarray(_read(rebuild([A_t * w for w in W]), phi_q[t])))
        directions = [np.asarray(_newton_schulz(jnp.asarray(s))) for s in S]
        A_b = math.prod(x.decay[chunk])
        step = sum(
            math.prod(x.decay[m + 1 : chunk[-1] + 1]) * (1.0 if eta_inside else x.lr[m])
            for m in chunk
        )
        W = [A_b * w - step * o for w, o in zip(W, directions, strict=True)]
    return np.stack(ys), W, S


def draw_config(draw, *, memories=MEMORIES, optimizers=tuple(OPTIMIZERS), windows=(1, 2, 3, 5)):
    kind = draw(st.sampled_from(memories), label="memory")
    opt = draw(st.sampled_from(optimizers), label="optimizer")
    window = draw(st.sampled_from(windows), label="window")
    gate_kind = draw(st.sampled_from(GATE_KINDS), label="gates")
    phi = draw(st.sampled_from(sorted(PHIS)), label="phi")
    objective = draw(st.sampled_from(sorted(OBJECTIVES)), label="objective")
    return kind, opt, window, gate_kind, phi, objective


def setup(kind, opt, window, gate_kind, phi, seed, T, *, edges=False, interior=False):
    feature_map = PHIS[phi]
    memory = make_memory(kind, feature_map.out_dim(D), seed)
    x = make_inputs(
        seed,
        T,
        window=window,
        gate_kind=gate_kind,
        with_momentum=opt != "gd",
        edges=edges,
        interior=interior,
    )
    return memory, x


# --------------------------------------------------------------------------------------------
# I-1 / I-2 (and padding, I-6 edges): chunked equals sequential with the same chunk size
# --------------------------------------------------------------------------------------------


@MOST
@given(data=st.data())
def test_i1_i2_chunked_equals_sequential(data):
    """Outputs and every leaf of the final state (weights, momentum, window buffers) across
    memories, optimizers, windows, chunk sizes, gate kinds, objectives, feature maps,
    decay_first, and gates at exactly 0 or 1. T is odd, so most chunk sizes pad the last chunk."""
    draw = data.draw
    kind, opt, window, gate_kind, phi, objective = draw_config(draw)
    b = draw(st.sampled_from([1, 2, 3, 4]), label="chunk_size")
    T = draw(st.sampled_from([5, 7, 9]), label="T")
    decay_first = draw(st.booleans(), label="decay_first")
    edges = draw(st.booleans(), label="edges")
    seed = draw(SEEDS, label="seed")
    memory, x = setup(kind, opt, window, gate_kind, phi, seed, T, edges=edges)
    kw = dict(
        feature_map=PHIS[phi],
        objective=OBJECTIVES[objective],
        optimizer=OPTIMIZERS[opt],
        window=window,
        chunk_size=b,
        decay_first=decay_first,
    )
    y_seq, state_seq = run(memory, x, method="sequential", **kw)
    y_chk, state_chk = run(memory, x, method="chunked", **kw)
    assert y_chk.shape == (T, D)
    assert_tree_close(y_chk, y_seq)
    assert_tree_close(state_chk, state_seq)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", MEMORIES)
def test_i1_every_memory_and_learner_over_several_chunks(kind, opt):
    """A forced grid beside the drawn one: every (memory, learner) pair over T = 11 with b = 3
    (four chunks, the last padded), so each chunk starts from the momentum and window the
    previous one carried; token gates, window 2."""
    memory, x = setup(kind, opt, 2, "token", "identity", 7, 11)
    kw = dict(optimizer=OPTIMIZERS[opt], window=2, chunk_size=3)
    y_seq, state_seq = run(memory, x, method="sequential", **kw)
    y_chk, state_chk = run(memory, x, method="chunked", **kw)
    assert_tree_close(y_chk, y_seq)
    assert_tree_close(state_chk, state_seq)


# --------------------------------------------------------------------------------------------
# I-5: the dual forms are taken, and equal the materialised per-position weights
# --------------------------------------------------------------------------------------------


def _spy_on_chunk_forms(monkeypatch) -> list[str]:
    """Record which chunk forms `chunked_scan` traces. The dual forms are found by name prefix
    (`_linear_dual...`, `_mlp_dual...`), so a per-chunk or a batched variant both count."""
    calls: list[str] = []
    names = [
        name
        for name in vars(_chunked)
        if name.startswith(("_linear_dual", "_mlp_dual"))
        and not name.endswith(("_read", "_factors"))
        and callable(getattr(_chunked, name))
    ]
    names += ["_materialised_chunk", "_per_chunk_muon_chunk"]
    for name in names:
        original = getattr(_chunked, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(_chunked, name, spy)
    return calls


@pytest.mark.parametrize(
    ("opt", "objective", "residual"),
    [("gd", "l2", True), ("momentum", "l2", True), ("momentum", "dot", False)],
)
def test_layer_norm_memory_fast_paths_equal_sequential(opt, objective, residual):
    """`MLPMemory(layer_norm=True)` at d_k = d_v = 4 (where the norm's Jacobian is far from
    zero): the dual form (`_mlp_dual_scan`, which backpropagates through the norm by hand) and
    the materialised chunk equal the sequential oracle in reads, final state and the
    gradients with respect to k and v (float64; T 11, b 3, window 2, token gates)."""
    d, T = 4, 11
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((T, d))) for _ in range(3))
    lr = jnp.asarray(rng.uniform(0.05, 0.9, T))
    decay = jnp.asarray(rng.uniform(0.6, 1.0, T))
    momentum = jnp.asarray(rng.uniform(0.05, 0.9, T)) if opt == "momentum" else None
    gamma = jnp.asarray(rng.uniform(0.1, 1.0, T))
    memory = ae.MLPMemory(
        d, d, key=jax.random.PRNGKey(3), hidden=6, layer_norm=True, residual=residual
    )
    kw: dict[str, Any] = dict(
        objective=OBJECTIVES[objective], optimizer=OPTIMIZERS[opt], window=2, chunk_size=3
    )

    def loss(method, k, v, **extra):
        if method == "direct":
            y, _ = _direct(
                memory, fm.Identity(), q, k, v, lr, decay, momentum, gamma, **kw, **extra
            )
        else:
            y, _ = ae.omega_scan(memory, q, k, v, lr, decay, momentum, gamma, method=method, **kw)
        return jnp.sum(jnp.sin(y))

    arrays = (q, k, v, lr, decay, momentum, gamma)
    y_seq, state_seq = ae.omega_scan(memory, *arrays, method="sequential", **kw)
    y_chk, state_chk = ae.omega_scan(memory, *arrays, method="chunked", **kw)
    y_mat, state_mat = _direct(memory, fm.Identity(), *arrays, force_materialised=True, **kw)
    assert_tree_close(y_chk, y_seq)
    assert_tree_close(state_chk, state_seq)
    assert_tree_close(y_mat, y_seq)
    grads_seq = jax.grad(lambda k, v: loss("sequential", k, v), argnums=(0, 1))(k, v)
    grads_chk = jax.grad(lambda k, v: loss("chunked", k, v), argnums=(0, 1))(k, v)
    assert_tree_close(grads_chk, grads_seq)
    assert float(jnp.max(jnp.abs(grads_seq[1]))) > 1e-3  # the norm passes gradient through


def _form(name: str) -> str:
    for prefix in ("_linear_dual", "_mlp_dual"):
        if name.startswith(prefix):
            return prefix
    return name


@pytest.mark.parametrize(
    ("kind", "opt", "extra", "expected"),
    [
        ("linear", "gd", {}, "_linear_dual"),
        ("linear", "momentum", {}, "_linear_dual"),
        ("mlp2", "gd", {}, "_mlp_dual"),
        ("mlp2_ln", "momentum", {}, "_mlp_dual"),
        ("mlp3", "momentum", {}, "_mlp_dual"),
        ("linear", "momentum", {"force_materialised": True}, "_materialised_chunk"),
        ("mlp2", "gd", {"force_materialised": True}, "_materialised_chunk"),
        ("linear", "gd", {"decay_first": True}, "_linear_dual"),
        ("linear", "momentum", {"decay_first": True}, "_linear_dual"),
        ("mlp3", "momentum", {"decay_first": True}, "_materialised_chunk"),
        ("linear", "muon", {}, "_materialised_chunk"),
        ("mlp2", "muon_eta_inside", {}, "_materialised_chunk"),
        ("gated", "gd", {}, "_materialised_chunk"),
        ("gated", "momentum", {}, "_materialised_chunk"),
        ("linear", "muon", {"muon_per_chunk": True}, "_per_chunk_muon_chunk"),
        ("gated", "muon_eta_inside", {"muon_per_chunk": True}, "_per_chunk_muon_chunk"),
    ],
)
def test_chunk_form_dispatch(monkeypatch, kind, opt, extra, expected):
    """GD and momentum on linear and MLP memories never materialise per-position weights (the
    dual forms of digest 6.2), nor does decay_first on a linear memory; Muon, the gated MLP,
    decay_first on an MLP and `force_materialised` do.
    Only traced (`jax.eval_shape`), never compiled."""
    calls = _spy_on_chunk_forms(monkeypatch)
    memory, x = setup(kind, opt, 2, "token", "identity", 0, 5)
    kw = {"decay_first": False, **extra}
    arrays = [None if a is None else jnp.asarray(a) for a in x.arrays()]
    jax.eval_shape(
        lambda: _direct(
            memory,
            fm.Identity(),
            *arrays,
            objective=ae.l2,
            optimizer=OPTIMIZERS[opt],
            window=2,
            chunk_size=2,
            **kw,
        )
    )
    assert calls and {_form(name) for name in calls} == {expected}, calls


@FEW
@given(data=st.data())
def test_i5_dual_forms_equal_materialised(data):
    """I-5: reads and end-of-chunk states of the dual forms (`_linear_dual_scan`,
    `_linear_dual_decay_first_scan`, `_mlp_dual_scan`) equal those of the materialised
    per-position weights (`force_materialised=True`), for GD and momentum."""
    draw = data.draw
    kind, opt, window, gate_kind, phi, objective = draw_config(
        draw, memories=("linear", "mlp2", "mlp3"), optimizers=("gd", "momentum")
    )
    b = draw(st.sampled_from([2, 3, 4]), label="chunk_size")
    T = draw(st.sampled_from([5, 7, 9]), label="T")
    seed = draw(SEEDS, label="seed")
    decay_first = kind == "linear" and draw(st.booleans(), label="decay_first")
    memory, x = setup(kind, opt, window, gate_kind, phi, seed, T, edges=draw(st.booleans()))
    kw: dict[str, Any] = dict(
        objective=OBJECTIVES[objective],
        optimizer=OPTIMIZERS[opt],
        window=window,
        chunk_size=b,
        decay_first=decay_first,
    )
    y_dual, state_dual = run_direct(memory, x, feature_map=PHIS[phi], **kw)
    y_mat, state_mat = run_direct(memory, x, feature_map=PHIS[phi], force_materialised=True, **kw)
    assert_tree_close(y_dual, y_mat)
    assert_tree_close(state_dual, state_mat)


# --------------------------------------------------------------------------------------------
# I-6: the decay matrix, and exact zeros in alpha and theta
# --------------------------------------------------------------------------------------------


def _product(alpha: np.ndarray, lo: int, hi: int, skip: int = -1) -> float:
    """prod_{j=lo..hi} alpha_j, leaving out j = skip."""
    return math.prod(float(alpha[j]) for j in range(lo, hi + 1) if j != skip)


_decay_matrix = jax.jit(decay_matrix)
_decay_matrix_grad = jax.jit(jax.grad(lambda a, w: jnp.sum(w * decay_matrix(a))))

ALPHA_VALUES = st.one_of(
    st.sampled_from([0.0, 1e-300, 1e-200, 1.0]), st.floats(min_value=0.0, max_value=1.0)
)


@given(
    alpha=st.integers(1, 6).flatmap(lambda b: st.lists(ALPHA_VALUES, min_size=b, max_size=b)),
    seed=SEEDS,
)
def test_i6_decay_matrix_is_the_product_and_its_gradient(alpha, seed):
    """L[t, m] = prod_{j=m+1..t} alpha_j (m <= t, else 0) with exact zeros and alpha -> 0: no
    NaN, and jax.grad equals the analytic gradient of the products (sum over the entries that
    contain alpha_k of the product of the other factors)."""
    alpha = np.asarray(alpha, np.float64)
    b = alpha.shape[0]
    L = np.asarray(_decay_matrix(jnp.asarray(alpha)))
    expected = np.zeros((b, b))
    for t in range(b):
        for m in range(t + 1):
            expected[t, m] = _product(alpha, m + 1, t)
    assert not np.any(np.isnan(L))
    # XLA:CPU flushes subnormal results to zero (5e-324 * 1.0 == 0.0 under jit), so a product
    # below the smallest normal float may come out as 0.
    np.testing.assert_allclose(L, expected, rtol=1e-14, atol=np.finfo(np.float64).tiny)

    w = np.random.default_rng(seed).standard_normal((b, b))
    grad = np.asarray(_decay_matrix_grad(jnp.asarray(alpha), jnp.asarray(w)))
    analytic = np.zeros(b)
    for k in range(b):
        for t in range(b):
            for m in range(t + 1):
                if m < k <= t:
                    analytic[k] += w[t, m] * _product(alpha, m + 1, t, skip=k)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, analytic, rtol=1e-12, atol=1e-300)

    positive = alpha > 1e-100
    if np.all(positive):
        # I-6: equals the log-space form exp(cumsum log alpha) where that is defined.
        c = np.concatenate([[0.0], np.cumsum(np.log(alpha))])
        log_space = np.tril(np.exp(c[1:, None] - c[None, 1:]))
        np.testing.assert_allclose(L, log_space, rtol=1e-10, atol=1e-300)


def _chunk_of(alpha, theta, eta, step_gates) -> Any:
    """A `_Chunk` with these step arrays `(n_chunks, b)` and window gates `(n_chunks, b, c)`."""
    n_chunks, b, window = step_gates.shape
    n_e = b + window - 1
    step_gates = jnp.asarray(step_gates)
    zeros = jnp.zeros((n_chunks, n_e, 1))
    return _chunked._Chunk(
        features_e=zeros,
        values_e=zeros,
        gates=_chunked._band(step_gates),
        step_gates=step_gates,
        features_q=jnp.zeros((n_chunks, b, 1)),
        lr=jnp.asarray(eta),
        decay=jnp.asarray(alpha),
        momentum=jnp.asarray(theta),
        valid=jnp.ones((n_chunks, b)),
    )


def _coefficients_from_products(alpha, theta, eta, band, momentum: bool):
    """The coefficients from their definitions (digest 6.2), with `decay_matrix` (tested above)."""
    L_alpha, L_theta = decay_matrix(alpha), decay_matrix(theta)
    if not momentum:
        L_theta = jnp.eye(alpha.shape[0], dtype=alpha.dtype)
    eta_L = L_alpha * eta[None, :]
    B = jnp.cumprod(theta) if momentum else jnp.zeros_like(theta)
    return dict(
        A=jnp.cumprod(alpha),
        B=B,
        C=eta_L @ L_theta @ band,
        c_S=eta_L @ B,
        C_S=L_theta[-1] @ band if momentum else jnp.zeros_like(band[0]),
        M=eta_L @ L_theta,
        M_S=L_theta[-1] if momentum else jnp.zeros_like(theta),
    )


@pytest.mark.parametrize("momentum", [False, True])
@FEW
@given(b=st.sampled_from([1, 3, 5]), window=st.sampled_from([1, 2, 3]), seed=SEEDS)
def test_i6_chunk_coefficients_are_the_products_they_stand_for(momentum, b, window, seed):
    """`_coefficients` (C = L_alpha diag(eta) L_theta Gamma and the momentum terms) and
    `_step_coefficients` (M = L_alpha diag(eta) L_theta), built by row recurrences, equal their
    definitions from `decay_matrix`, in float64 with exact zeros in alpha and theta; and so do
    their gradients with respect to alpha, theta and eta."""
    rng = np.random.default_rng(seed)
    n_chunks = 2

    def gates_with_zeros(shape):
        x = rng.uniform(size=shape)
        return np.where(rng.uniform(size=shape) < 0.25, 0.0, x)

    alpha, theta = gates_with_zeros((n_chunks, b)), gates_with_zeros((n_chunks, b))
    eta = rng.uniform(size=(n_chunks, b))
    chunk = _chunk_of(alpha, theta, eta, rng.uniform(size=(n_chunks, b, window)))
    weights = {
        name: rng.standard_normal(shape)
        for name, shape in dict(C=(n_chunks, b, b + window - 1), M=(n_chunks, b, b)).items()
    }

    def built(alpha, theta, eta):
        c = eqx.tree_at(lambda ch: (ch.decay, ch.momentum, ch.lr), chunk, (alpha, theta, eta))
        per_token = _chunked._coefficients(c, momentum).chunk_major()
        per_step = _chunked._step_coefficients(c, momentum).chunk_major()
        return dict(
            A=per_token.A,
            B=per_token.B,
            C=per_token.C,
            c_S=per_token.c_S,
            C_S=per_token.C_S,
            M=per_step.C,
            M_S=per_step.C_S,
        )

    def defined(alpha, theta, eta):
        return jax.vmap(_coefficients_from_products, in_axes=(0, 0, 0, 0, None))(
            alpha, theta, eta, chunk.gates, momentum
        )

    arrays = tuple(jnp.asarray(x) for x in (alpha, theta, eta))
    ours, reference = built(*arrays), defined(*arrays)
    for name in reference:
        np.testing.assert_allclose(ours[name], reference[name], rtol=1e-13, atol=1e-15)

    def weighted(coefficients):
        return sum(jnp.sum(weights[k] * coefficients[k]) for k in weights)

    grad_ours = jax.grad(lambda *a: weighted(built(*a)), argnums=(0, 1, 2))(*arrays)
    grad_reference = jax.grad(lambda *a: weighted(defined(*a)), argnums=(0, 1, 2))(*arrays)
    for g, g_ref in zip(grad_ours, grad_reference, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("kind", "opt", "gate_kind"),
    [("linear", "momentum", "token"), ("mlp2", "momentum", "step"), ("gated", "muon", "token")],
)
@FEW
@given(seed=SEEDS)
def test_i6_exact_zero_and_tiny_alpha_theta_match_sequential(kind, opt, gate_kind, seed):
    """Chunked momentum and decays equal the sequential loop when some alpha_t = 0, alpha_t =
    1e-300, theta_t = 0 or eta_t = 0 exactly, inside and at the edges of chunks (dual form for
    linear and MLP, materialised for Muon)."""
    memory, x = setup(kind, opt, 3, gate_kind, "identity", seed, 9)
    assert x.momentum is not None
    x.decay[[1, 5]] = 0.0
    x.decay[6] = 1e-300
    x.momentum[[2, 4, 7]] = 0.0
    x.lr[3] = 0.0
    kw = dict(optimizer=OPTIMIZERS[opt], window=3, chunk_size=4)
    y_seq, state_seq = run(memory, x, method="sequential", **kw)
    y_chk, state_chk = run(memory, x, method="chunked", **kw)
    assert_tree_close(y_chk, y_seq)
    assert_tree_close(state_chk, state_seq)


# --------------------------------------------------------------------------------------------
# I-3, I-4: chunking is exact for the Hebbian linear memory; linear attention's quadratic form
# --------------------------------------------------------------------------------------------


@FEW
@given(data=st.data())
def test_i3_hebbian_linear_memory_is_chunk_exact(data):
    """I-3: with the Hebbian bias and a linear memory the gradient does not depend on W, so the
    chunked outputs and state for any b equal the token-by-token rule (b = 1), for every
    optimizer (Muon included: S_t is state-free too)."""
    draw = data.draw
    opt = draw(st.sampled_from(sorted(OPTIMIZERS)), label="optimizer")
    window = draw(st.sampled_from([1, 3]), label="window")
    gate_kind = draw(st.sampled_from(GATE_KINDS), label="gates")
    phi = draw(st.sampled_from(sorted(PHIS)), label="phi")
    b = draw(st.sampled_from([2, 3, 4]), label="chunk_size")
    seed = draw(SEEDS, label="seed")
    memory, x = setup("linear", opt, window, gate_kind, phi, seed, 7)
    kw = dict(feature_map=PHIS[phi], objective=ae.dot, optimizer=OPTIMIZERS[opt], window=window)
    y_ref, state_ref = run(memory, x, method="sequential", chunk_size=1, **kw)
    y_chk, state_chk = run(memory, x, method="chunked", chunk_size=b, **kw)
    assert_tree_close(y_chk, y_ref)
    assert_tree_close(state_chk, state_ref)


@FEW
@given(
    phi=st.sampled_from(sorted(PHIS)),
    b=st.sampled_from([1, 2, 3, 4]),
    edges=st.booleans(),
    seed=SEEDS,
)
def test_i4_linear_attention_quadratic_form(phi, b, edges, seed):
    """I-4: W_0 = 0, Hebbian, GD, c = 1: y_t = W_t phi(q_t) equals
    Y = (tril(Phi_Q Phi_K^T) o D) V with D[t, i] = prod_{j=i+1..t} alpha_j * eta_i, by both
    methods (alpha_t = 0 included when `edges`)."""
    feature_map = PHIS[phi]
    memory = make_memory("linear", feature_map.out_dim(D), seed, init_std=0.0)
    x = make_inputs(seed, 7, window=1, gate_kind="none", with_momentum=False, edges=edges)
    Phi_q = np.asarray(feature_map(jnp.asarray(x.q)))
    Phi_k = np.asarray(feature_map(jnp.asarray(x.k)))
    T = x.T
    Dm = np.zeros((T, T))
    for t in range(T):
        for i in range(t + 1):
            Dm[t, i] = _product(x.decay, i + 1, t) * x.lr[i]
    expected = (np.tril(Phi_q @ Phi_k.T) * Dm) @ x.v
    for method in ("sequential", "chunked"):
        y, state = run(
            memory, x, objective=ae.dot, chunk_size=b, method=method, feature_map=feature_map
        )
        assert_tree_close(y, expected)
        W_T = sum(Dm[T - 1, i] * np.outer(x.v[i], Phi_k[i]) for i in range(T))
        assert_tree_close(weight_leaves(state.memory), [W_T])


# --------------------------------------------------------------------------------------------
# I-7: split calls with the carried state, across methods
# --------------------------------------------------------------------------------------------

SPLIT_CONFIGS = [
    # (memory, optimizer, window, chunk size, gate kind, phi, decay_first)
    ("linear", "momentum", 3, 3, "token", "poly2", False),
    ("mlp2", "gd", 2, 2, "step", "identity", False),
    ("mlp3", "muon", 5, 4, "token", "identity", False),
    ("linear", "muon_eta_inside", 2, 3, "step", "poly2", True),
]


METHOD_PAIRS = [("chunked", "chunked"), ("sequential", "chunked"), ("chunked", "sequential")]


@FEW
@given(
    config=st.sampled_from(SPLIT_CONFIGS),
    methods=st.sampled_from(METHOD_PAIRS),
    seed=SEEDS,
    data=st.data(),
)
def test_i7_chunk_aligned_split_equals_one_call(config, methods, seed, data):
    """I-7: one chunked call over T = 9 tokens equals two calls split at a chunk boundary with
    the carried state (W, S and the last c - 1 tokens), for chunked -> chunked,
    sequential -> chunked and chunked -> sequential: the state is interchangeable."""
    kind, opt, window, b, gate_kind, phi, decay_first = config
    memory, x = setup(kind, opt, window, gate_kind, phi, seed, 9)
    split = data.draw(st.sampled_from(list(range(b, 9, b))), label="split")
    kw = dict(
        feature_map=PHIS[phi],
        optimizer=OPTIMIZERS[opt],
        window=window,
        chunk_size=b,
        decay_first=decay_first,
    )
    first, second = x.map(lambda a: a[:split]), x.map(lambda a: a[split:])
    y_full, state_full = run(memory, x, method="chunked", **kw)
    y1, state1 = run(memory, first, method=methods[0], **kw)
    y2, state2 = run(memory, second, method=methods[1], state=state1, **kw)
    assert_tree_close(jnp.concatenate([y1, y2]), y_full)
    assert_tree_close(state2, state_full)


# --------------------------------------------------------------------------------------------
# I-8: causality inside a chunk
# --------------------------------------------------------------------------------------------


@FEW
@given(data=st.data())
def test_i8_causality_inside_chunks(data):
    """I-8: with b = 4 and T = 9, perturbing every input at positions > t (t inside a chunk,
    not at its end) leaves y[:t+1] unchanged, for the dual, materialised and per-chunk Muon
    forms; y[t+1] does change."""
    draw = data.draw
    kind, opt, window, gate_kind, phi, objective = draw_config(draw)
    per_chunk = opt.startswith("muon") and draw(st.booleans(), label="muon_per_chunk")
    t = draw(st.sampled_from([1, 2, 5, 6]), label="t")
    seed = draw(SEEDS, label="seed")
    memory, x = setup(kind, opt, window, gate_kind, phi, seed, 9)
    other = make_inputs(seed + 1, 9, window=window, gate_kind=gate_kind, with_momentum=opt != "gd")
    perturbed = x.merge(other, lambda a, o: np.concatenate([a[: t + 1], o[t + 1 :]]))
    kw = dict(
        feature_map=PHIS[phi],
        objective=OBJECTIVES[objective],
        optimizer=OPTIMIZERS[opt],
        window=window,
        chunk_size=4,
        method="chunked",
        muon_per_chunk=per_chunk,
    )
    y, _ = run(memory, x, **kw)
    y_perturbed, _ = run(memory, perturbed, **kw)
    np.testing.assert_array_equal(np.asarray(y_perturbed[: t + 1]), np.asarray(y[: t + 1]))
    assert not np.allclose(y_perturbed[t + 1], y[t + 1])


# --------------------------------------------------------------------------------------------
# I-9 and padding: outer gradients
# --------------------------------------------------------------------------------------------


def _forward(args, kw, direct):
    memory, feature_map, q, k, v, lr, decay, momentum, gamma = args
    if direct:
        return _direct(memory, feature_map, q, k, v, lr, decay, momentum, gamma, **kw)
    return ae.omega_scan(memory, q, k, v, lr, decay, momentum, gamma, feature_map=feature_map, **kw)


@eqx.filter_jit
def _loss(diff, static, weights, kw, direct=False):
    y, _ = _forward(eqx.combine(diff, static), kw, direct)
    return jnp.sum(weights * y)


@eqx.filter_jit
def _value_and_grad(diff, static, weights, kw, direct=False):
    def loss(diff):
        y, _ = _forward(eqx.combine(diff, static), kw, direct)
        return jnp.sum(weights * y), y

    return jax.value_and_grad(loss, has_aux=True)(diff)


def differentiable_args(memory, feature_map, x: Inputs):
    args = (memory, feature_map) + tuple(None if a is None else jnp.asarray(a) for a in x.arrays())
    return eqx.partition(args, eqx.is_inexact_array)


GRAD_CONFIGS = [
    # (memory, optimizer, window, chunk size, gate kind, phi, objective, decay_first); T = 7, so
    # every chunk size here pads the last chunk. Gradient programs take 5-15 s each to compile,
    # so the other Muon variants and deep memories only run with `-m slow`.
    ("linear", "muon", 2, 3, "token", "poly2", "l2", True),
    ("mlp2", "momentum", 3, 2, "step", "identity", "huber", False),
    pytest.param(
        ("linear", "muon_eta_inside", 3, 4, "step", "poly2", "dot", False), marks=pytest.mark.slow
    ),
    pytest.param(("mlp3", "muon", 2, 4, "step", "poly2", "l2", True), marks=pytest.mark.slow),
    pytest.param(
        ("gated", "muon_eta_inside", 2, 2, "token", "identity", "huber", False),
        marks=pytest.mark.slow,
    ),
]


def _config_id(config) -> str:
    return "-".join(map(str, config))


@pytest.mark.parametrize("config", GRAD_CONFIGS, ids=_config_id)
def test_i9_outer_gradients_chunked_equal_sequential_and_finite_differences(config):
    """I-9 and padding: jax.grad of a scalar loss of y through method="chunked" equals that
    through method="sequential" w.r.t. W_0, q, k, v, lr, decay, momentum, gamma and the
    polynomial coefficients a_i (T = 7 is not a multiple of b: nothing leaks from the padding
    into y or the gradients), and equals a central finite difference along a random direction."""
    kind, opt, window, b, gate_kind, phi, objective, decay_first = config
    memory, x = setup(kind, opt, window, gate_kind, phi, 3, 7, interior=True)
    assert x.T % b != 0
    diff, static = differentiable_args(memory, PHIS[phi], x)
    rng = np.random.default_rng(4)
    weights = jnp.asarray(rng.standard_normal((x.T, D)))
    base = dict(
        objective=OBJECTIVES[objective],
        optimizer=OPTIMIZERS[opt],
        window=window,
        chunk_size=b,
        decay_first=decay_first,
    )
    (loss_seq, y_seq), grad_seq = _value_and_grad(
        diff, static, weights, {**base, "method": "sequential"}
    )
    chunked_kw = {**base, "method": "chunked"}
    (loss_chk, y_chk), grad_chk = _value_and_grad(diff, static, weights, chunked_kw)
    assert_tree_close(y_chk, y_seq)
    assert_tree_close(grad_chk, grad_seq)
    # Every input receives a gradient (so the comparison above is not vacuous).
    for g in jax.tree.leaves(grad_chk):
        assert np.any(np.asarray(g) != 0)
    if phi == "poly2":
        assert jax.tree.leaves(grad_chk[1])  # the a_i are differentiated

    # Fourth-order central difference: Newton-Schulz has large third derivatives, so the
    # second-order stencil's O(eps^2) error is ~1e-6 relative at eps = 1e-5.
    direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), diff)
    eps = 1e-5

    def shifted(steps):
        moved = jax.tree.map(lambda a, d: a + steps * eps * d, diff, direction)
        return float(_loss(moved, static, weights, chunked_kw))

    finite_difference = (8 * (shifted(1) - shifted(-1)) - (shifted(2) - shifted(-2))) / (12 * eps)
    directional = sum(
        float(jnp.sum(g * d))
        for g, d in zip(jax.tree.leaves(grad_chk), jax.tree.leaves(direction), strict=True)
    )
    assert abs(finite_difference - directional) <= 1e-7 * max(1.0, abs(directional)), (
        finite_difference,
        directional,
    )


@pytest.mark.parametrize(
    ("kind", "opt"),
    [("linear", "momentum"), pytest.param("linear", "muon", marks=pytest.mark.slow)],
    ids=["dual", "materialised"],
)
def test_remat_does_not_change_values_or_gradients(kind, opt):
    """`jax.checkpoint` per chunk (remat=True, the default) is a memory optimisation only: the
    outputs and all gradients equal those without it, and the flag really inserts a remat."""
    memory, x = setup(kind, opt, 2, "token", "identity", 5, 7)
    diff, static = differentiable_args(memory, fm.Identity(), x)
    weights = jnp.asarray(np.random.default_rng(6).standard_normal((x.T, D)))
    results = {}
    for remat in (False, True):
        kw = dict(objective=ae.l2, optimizer=OPTIMIZERS[opt], window=2, chunk_size=3)
        kw.update(decay_first=False, remat=remat)
        jaxpr = jax.make_jaxpr(lambda d, kw=kw: _forward(eqx.combine(d, static), kw, True))(diff)
        assert ("remat" in str(jaxpr)) == remat
        results[remat] = _value_and_grad(diff, static, weights, kw, True)
    assert_tree_close(results[True], results[False], rel=1e-13)


# --------------------------------------------------------------------------------------------
# muon_per_chunk: the per-chunk Newton-Schulz approximation against its definition
# --------------------------------------------------------------------------------------------


@FEW
@given(data=st.data())
def test_muon_per_chunk_equals_its_definition(data):
    """`muon_per_chunk=True` equals `naive_per_chunk_muon` (exact per-token momentum at the
    chunk-start anchor, one Newton-Schulz of the chunk-end momentum, reads from A_t W_s):
    outputs, final weights and final momentum, including a padded last chunk."""
    draw = data.draw
    kind, opt, window, gate_kind, phi, objective = draw_config(
        draw, optimizers=("muon", "muon_eta_inside")
    )
    b = draw(st.sampled_from([2, 3, 4]), label="chunk_size")
    T = draw(st.sampled_from([5, 7, 9]), label="T")
    seed = draw(SEEDS, label="seed")
    memory, x = setup(kind, opt, window, gate_kind, phi, seed, T, edges=draw(st.booleans()))
    y, state = run(
        memory,
        x,
        feature_map=PHIS[phi],
        objective=OBJECTIVES[objective],
        optimizer=OPTIMIZERS[opt],
        window=window,
        chunk_size=b,
        method="chunked",
        muon_per_chunk=True,
    )
    y_ref, W_ref, S_ref = naive_per_chunk_muon(
        memory,
        x,
        feature_map=PHIS[phi],
        objective=OBJECTIVES[objective],
        eta_inside=opt == "muon_eta_inside",
        window=window,
        b=b,
    )
    assert_tree_close(y, y_ref)
    assert_tree_close(weight_leaves(state.memory), W_ref)
    assert_tree_close([np.asarray(s) for s in jax.tree.leaves(state.optimizer_state)], S_ref)


@pytest.mark.parametrize(("kind", "opt"), [("linear", "muon"), ("gated", "muon_eta_inside")])
def test_muon_per_chunk_with_b1_has_exact_states_but_decayed_reads(kind, opt):
    """With b = 1 the per-chunk definition gives W_t = alpha_t W_{t-1} - eta_t NS(S_t) (NS of
    the one token's momentum), so the final state equals exact Muon with b = 1; but its read
    is y_t = M(phi(q_t); alpha_t W_{t-1}), before the write, so y differs from exact Muon's
    read-after-write (and equals the definition)."""
    memory, x = setup(kind, opt, 3, "token", "identity", 11, 7)
    kw = dict(optimizer=OPTIMIZERS[opt], window=3, chunk_size=1)
    y_exact, state_exact = run(memory, x, method="sequential", **kw)
    y, state = run(memory, x, method="chunked", muon_per_chunk=True, **kw)
    assert_tree_close(state, state_exact)
    y_ref, _, _ = naive_per_chunk_muon(
        memory,
        x,
        feature_map=fm.Identity(),
        objective=ae.l2,
        eta_inside=opt != "muon",
        window=3,
        b=1,
    )
    assert_tree_close(y, y_ref)
    assert np.max(np.abs(np.asarray(y) - np.asarray(y_exact))) > 1e-3


# --------------------------------------------------------------------------------------------
# float32
# --------------------------------------------------------------------------------------------


def _cast_memory(memory, dtype):
    return jax.tree.map(lambda w: w.astype(dtype) if eqx.is_inexact_array(w) else w, memory)


@pytest.mark.parametrize(
    ("kind", "opt", "per_chunk"),
    [("linear", "momentum", False), ("mlp2", "muon", False), ("linear", "muon", True)],
    ids=["dual", "materialised", "muon_per_chunk"],
)
def test_float32_stays_float32_and_agrees(kind, opt, per_chunk):
    """float32 weights and inputs give float32 outputs and state on the chunked path, within
    1e-4 (relative to the largest |y|) of the float64 computation from the same float32 values
    (the sequential oracle; chunked for the per-chunk approximation, which has no oracle)."""
    memory, x = setup(kind, opt, 2, "token", "poly2", 13, 7)
    memory32 = _cast_memory(memory, jnp.float32)
    x32 = x.map(lambda a: a.astype(np.float32))
    kw = dict(feature_map=PHIS["poly2"], optimizer=OPTIMIZERS[opt], window=2, chunk_size=3)
    y32, state32 = run(memory32, x32, method="chunked", muon_per_chunk=per_chunk, **kw)
    assert y32.dtype == jnp.float32
    for leaf in jax.tree.leaves(eqx.filter(state32, eqx.is_inexact_array)):
        assert leaf.dtype == jnp.float32, leaf.dtype
    memory64 = _cast_memory(memory32, jnp.float64)
    x64 = x32.map(lambda a: a.astype(np.float64))
    reference = "chunked" if per_chunk else "sequential"
    y64, state64 = run(memory64, x64, method=reference, muon_per_chunk=per_chunk, **kw)
    assert_tree_close(np.asarray(y32, np.float64), y64, rel=1e-4)
    assert_tree_close(
        [np.asarray(w, np.float64) for w in weight_leaves(state32.memory)],
        weight_leaves(state64.memory),
        rel=1e-4,
    )
