"""The exact chunk-parallel form (`atlas_eqx/_exact_chunked.py`, issue 19): for a linear memory
under GD with `l2` or `dot`, `method="chunked"` runs execution blocks of `block_size` steps that
change the speed only. The oracle is `method="sequential"` with the same `chunk_size` (the
model's b), in float64 at 1e-10, over windows, window gates per token and per step, retention in
either order, feature maps, T not a multiple of the block, and state carried across calls; and
outer gradients. DeltaNet and Gated DeltaNet are also checked against fla's naive recurrences
and chunkwise forms (torch) when fla-core and torch are installed.

Shapes come from a few fixed small values so that compiled scans are shared between examples.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import atlas_eqx as ae
import feature_maps as fm
import optimizers as iopt
from atlas_eqx import _exact_chunked
from atlas_eqx._exact_chunked import execution_block, has_exact_form
from experiments.bench._peer_packages import load_fla_naive


D_K, D_V = 3, 2
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
_N = settings().max_examples
MOST = settings(max_examples=max(4, 2 * _N // 3))
FEW = settings(max_examples=max(3, _N // 3))
PHIS: dict[str, fm.AbstractFeatureMap] = {
    "identity": fm.Identity(),
    "poly2": fm.Polynomial(2),
    "elementwise": fm.Elementwise(2),
}
OBJECTIVES = {"l2": ae.l2, "dot": ae.dot}


def _inputs(seed: int, T: int, window: int, gate_kind: str, *, edges: bool = False):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, D_K))
    k = rng.standard_normal((T, D_K))
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    v = rng.standard_normal((T, D_V))
    lr = rng.uniform(0.0, 1.0, T)
    decay = rng.uniform(0.5, 1.0, T)
    gamma = {
        "none": None,
        "token": rng.uniform(0.0, 1.0, T),
        "step": rng.uniform(0.0, 1.0, (T, window)),
    }[gate_kind]
    if edges:  # exact zeros and ones: alpha_t = 0 resets, eta_t = 0 skips a write
        lr[rng.random(T) < 0.2] = 0.0
        decay[rng.random(T) < 0.2] = 0.0
        decay[rng.random(T) < 0.2] = 1.0
    return q, k, v, lr, decay, gamma


def _memory(feature_map: fm.AbstractFeatureMap, seed: int) -> ae.LinearMemory:
    d_in = feature_map.out_dim(D_K)
    return ae.LinearMemory(d_in, D_V, key=jax.random.PRNGKey(seed % 2**31), init_std=0.5)


def _scan(memory, arrays, **kw):
    q, k, v, lr, decay, gamma = arrays
    return ae.omega_scan(memory, q, k, v, lr, decay, None, gamma, **kw)


def _close(actual: Any, desired: Any, rel: float = 1e-10) -> None:
    for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        a, d = np.asarray(a), np.asarray(d)
        if a.dtype == bool:
            np.testing.assert_array_equal(a, d)
        else:
            scale = max(1.0, float(np.abs(d).max(initial=0.0)))
            np.testing.assert_allclose(a, d, rtol=rel, atol=rel * scale)


@st.composite
def models(draw):
    return dict(
        window=draw(st.sampled_from([1, 2, 3]), label="window"),
        chunk_size=draw(st.sampled_from([1, 1, 2, 3]), label="chunk_size"),
        decay_first=draw(st.booleans(), label="decay_first"),
        gate_kind=draw(st.sampled_from(["none", "token", "step"]), label="gates"),
        phi=draw(st.sampled_from(sorted(PHIS)), label="phi"),
        objective=draw(st.sampled_from(sorted(OBJECTIVES)), label="objective"),
    )


def _options(model: dict, **extra: Any) -> dict:
    return dict(
        feature_map=PHIS[model["phi"]],
        objective=OBJECTIVES[model["objective"]],
        window=model["window"],
        chunk_size=model["chunk_size"],
        decay_first=model["decay_first"],
        **extra,
    )


@MOST
@given(
    model=models(),
    block_size=st.sampled_from([1, 2, 4, 8]),
    T=st.sampled_from([7, 9]),
    edges=st.booleans(),
    seed=SEEDS,
)
def test_exact_chunked_equals_sequential_for_every_block(model, block_size, T, edges, seed):
    """y and the final state of `method="chunked"` at any execution block equal the sequential
    oracle with the same `chunk_size` (T = 7, 9 is not a multiple of the blocks 2, 4, 8; gates
    at exactly 0 and 1 with `edges`)."""
    memory = _memory(PHIS[model["phi"]], seed)
    arrays = _inputs(seed, T, model["window"], model["gate_kind"], edges=edges)
    y_seq, state_seq = _scan(memory, arrays, method="sequential", **_options(model))
    y, state = _scan(memory, arrays, method="chunked", block_size=block_size, **_options(model))
    _close(y, y_seq)
    _close(state, state_seq)


@FEW
@given(model=models(), block_size=st.sampled_from([2, 4]), seed=SEEDS)
def test_pallas_kernel_equals_sequential_with_gradients(model, block_size, seed):
    """`method="pallas"` runs the same block loop as a Pallas kernel (interpret mode on CPU):
    y, the final state and the gradient with respect to v equal the sequential oracle."""
    memory = _memory(PHIS[model["phi"]], seed)
    arrays = tuple(
        None if a is None else jnp.asarray(a)
        for a in _inputs(seed, 9, model["window"], model["gate_kind"])
    )
    y_seq, state_seq = _scan(memory, arrays, method="sequential", **_options(model))
    y, state = _scan(memory, arrays, method="pallas", block_size=block_size, **_options(model))
    _close(y, y_seq)
    _close(state, state_seq)

    def grad_v(method, block):
        def loss(v):
            y, _ = _scan(
                memory,
                (*arrays[:2], v, *arrays[3:]),
                method=method,
                block_size=block,
                **_options(model),
            )
            return jnp.sum(jnp.sin(y))

        return jax.grad(loss)(arrays[2])

    _close(grad_v("pallas", block_size), grad_v("sequential", None), rel=1e-9)


@FEW
@given(model=models(), block_size=st.sampled_from([2, 4]), seed=SEEDS, data=st.data())
def test_state_carried_across_calls(model, block_size, seed, data):
    """Two exact chunked calls split at a chunk boundary, with the carried state (W and the
    last c - 1 tokens), equal one sequential call; and the state is interchangeable with the
    sequential path's."""
    T, b = 9, model["chunk_size"]
    memory = _memory(PHIS[model["phi"]], seed)
    arrays = _inputs(seed, T, model["window"], model["gate_kind"])
    split = data.draw(st.sampled_from(list(range(b, T, b))), label="split")
    first = tuple(None if a is None else a[:split] for a in arrays)
    second = tuple(None if a is None else a[split:] for a in arrays)
    options = _options(model, block_size=block_size)
    y_full, state_full = _scan(memory, arrays, method="sequential", **_options(model))
    y1, state1 = _scan(memory, first, method="chunked", **options)
    y2, state2 = _scan(memory, second, method="chunked", state=state1, **options)
    _close(jnp.concatenate([y1, y2]), y_full)
    _close(state2, state_full)
    y2_seq, _ = _scan(memory, second, method="sequential", state=state1, **_options(model))
    _close(y2, y2_seq)


def _outer_loss(method: str, model: dict, block_size: int | None):
    options = _options(model, method=method, block_size=block_size)

    def loss(memory, feature_map, q, k, v, lr, decay, gamma):
        y, state = ae.omega_scan(
            memory, q, k, v, lr, decay, None, gamma, **{**options, "feature_map": feature_map}
        )
        weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        return jnp.sum(weights * y) + jnp.sum(jnp.sin(state.memory.weight))  # pyright: ignore[reportAttributeAccessIssue]

    return eqx.filter_jit(eqx.filter_grad(loss))


@FEW
@given(model=models(), block_size=st.sampled_from([2, 4]), seed=SEEDS)
def test_outer_gradients_equal_sequential(model, block_size, seed):
    """Gradients of a loss of y and the final weights with respect to W_0, the feature map's
    coefficients, q, k, v, eta, alpha and gamma agree with the sequential path."""
    memory = _memory(PHIS[model["phi"]], seed)
    arrays = _inputs(seed, 7, model["window"], model["gate_kind"])
    gamma = arrays[-1]
    if gamma is None:  # differentiate through gamma too
        gamma = np.full((7,), 0.7)
    arrays = tuple(jnp.asarray(a) for a in (*arrays[:-1], gamma))
    feature_map = PHIS[model["phi"]]
    grads = _outer_loss("chunked", model, block_size)(memory, feature_map, *arrays)
    expected = _outer_loss("sequential", model, None)(memory, feature_map, *arrays)
    _close(grads, expected, rel=1e-9)


def test_outer_gradients_match_finite_differences():
    """One direction of the exact chunked path's gradient against a central difference in
    float64 (Gated DeltaNet's order, window 2, per-token gates, block 4, T 9)."""
    model = dict(
        window=2, chunk_size=1, decay_first=True, gate_kind="token", phi="identity", objective="l2"
    )
    memory = _memory(fm.Identity(), 3)
    q, k, v, lr, decay, gamma = (jnp.asarray(a) for a in _inputs(3, 9, 2, "token"))
    options = _options(model, method="chunked", block_size=4)

    def loss(lr, decay, v):
        y, _ = ae.omega_scan(memory, q, k, v, lr, decay, None, gamma, **options)
        return jnp.sum(jnp.sin(y))

    rng = np.random.default_rng(0)
    directions = [rng.standard_normal(x.shape) for x in (lr, decay, v)]
    grads = jax.grad(loss, argnums=(0, 1, 2))(lr, decay, v)
    eps = 1e-6
    plus = loss(*(x + eps * d for x, d in zip((lr, decay, v), directions, strict=True)))
    minus = loss(*(x - eps * d for x, d in zip((lr, decay, v), directions, strict=True)))
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(jnp.sum(g * d) for g, d in zip(grads, directions, strict=True))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-7)


@given(n=st.sampled_from([1, 2, 3, 8, 13]), scale=st.sampled_from([0.1, 1.0]), seed=SEEDS)
def test_unit_lower_inverse_is_the_inverse(n, scale, seed):
    """(I + N)^-1 by halving equals NumPy's inverse, and is unit lower triangular (float64)."""
    rng = np.random.default_rng(seed)
    strict = np.tril(scale * rng.standard_normal((n, n)), -1)
    inverse = np.asarray(_exact_chunked.unit_lower_inverse(jnp.asarray(strict)))
    np.testing.assert_allclose(inverse, np.linalg.inv(np.eye(n) + strict), rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(np.triu(inverse, 1), 0.0)
    np.testing.assert_array_equal(np.diag(inverse), 1.0)


@pytest.mark.parametrize("n", [5, 8])
def test_unit_lower_inverse_derivatives_match_finite_differences(n):
    """Its own derivative rule, forward (jvp) and reverse (vjp), equals a central difference of
    NumPy's inverse along a strictly lower direction, in float64."""
    rng = np.random.default_rng(n)
    strict = np.tril(0.5 * rng.standard_normal((n, n)), -1)
    direction = np.tril(rng.standard_normal((n, n)), -1)
    cotangent = rng.standard_normal((n, n))
    eps = 1e-6
    inverse_of = lambda N: np.linalg.inv(np.eye(n) + N)  # noqa: E731
    expected = (inverse_of(strict + eps * direction) - inverse_of(strict - eps * direction)) / (
        2 * eps
    )
    _, tangent = jax.jvp(
        _exact_chunked.unit_lower_inverse, (jnp.asarray(strict),), (jnp.asarray(direction),)
    )
    np.testing.assert_allclose(np.asarray(tangent), expected, rtol=1e-7, atol=1e-8)
    _, vjp = jax.vjp(_exact_chunked.unit_lower_inverse, jnp.asarray(strict))
    (gradient,) = vjp(jnp.asarray(cotangent))
    np.testing.assert_allclose(
        float(np.sum(np.asarray(gradient) * direction)),
        float(np.sum(expected * cotangent)),
        rtol=1e-7,
    )
    np.testing.assert_array_equal(np.triu(np.asarray(gradient)), 0.0)


def test_dispatch_and_execution_block():
    """Which models take the exact form, and the block actually run (a multiple of b)."""
    key = jax.random.PRNGKey(0)
    linear = ae.LinearMemory(3, 2, key=key)
    mlp = ae.MLPMemory(3, 2, key=key, hidden=4)
    assert has_exact_form(linear, iopt.gd(), ae.l2)
    assert has_exact_form(linear, iopt.gd(), ae.dot)
    assert not has_exact_form(linear, iopt.momentum(), ae.l2)
    assert not has_exact_form(linear, iopt.muon(), ae.l2)
    assert not has_exact_form(linear, iopt.gd(), ae.huber(1.0))
    assert not has_exact_form(mlp, iopt.gd(), ae.l2)
    assert execution_block(1, None) == _exact_chunked.DEFAULT_BLOCK_SIZE
    assert execution_block(3, 8) == 9
    assert execution_block(16, 8) == 16
    assert execution_block(4, 8) == 8


@pytest.mark.parametrize("method", ["chunked", "pallas"])
def test_fast_methods_run_the_exact_form(monkeypatch, method):
    """`omega_scan(method="chunked")` and `"pallas"` send a linear GD memory with l2 to the
    exact form."""
    calls = []
    original = _exact_chunked._block_inputs

    def spy(*args, **kwargs):
        calls.append(kwargs["chunk_size"])
        return original(*args, **kwargs)

    monkeypatch.setattr(_exact_chunked, "_block_inputs", spy)
    memory = _memory(fm.Identity(), 0)
    arrays = _inputs(0, 5, 1, "none")
    jax.eval_shape(lambda: _scan(memory, arrays, method=method, block_size=2))
    assert calls == [1]


def test_block_size_is_validated():
    memory = _memory(fm.Identity(), 0)
    arrays = _inputs(0, 5, 1, "none")
    for bad in (0, -2, True):
        with pytest.raises(ValueError, match="`block_size` must be an integer >= 1 or None"):
            _scan(memory, arrays, method="chunked", block_size=bad)
    with pytest.raises(TypeError, match="block_size"):  # the annotation, checked by beartype
        _scan(memory, arrays, method="chunked", block_size=2.0)


def test_float32_long_sequence_stays_close_to_sequential():
    """At float32, T = 512, head dimension 16 and block 64 (a preset's scale), the exact form
    stays within float32 rounding of the sequential recurrence (Gated DeltaNet at beta near 1,
    the hardest case for the triangular solve)."""
    rng = np.random.default_rng(1)
    T, d = 512, 16
    memory = ae.LinearMemory(d, d, key=jax.random.PRNGKey(0), init_std=0.0)
    memory = jax.tree.map(lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, memory)
    k = rng.standard_normal((T, d))
    k = (k / np.linalg.norm(k, axis=1, keepdims=True)).astype(np.float32)
    q = rng.standard_normal((T, d)).astype(np.float32)
    v = rng.standard_normal((T, d)).astype(np.float32)
    lr = rng.uniform(0.8, 1.0, T).astype(np.float32)
    decay = rng.uniform(0.9, 1.0, T).astype(np.float32)
    options: dict[str, Any] = dict(decay_first=True)
    y_seq, _ = ae.omega_scan(memory, q, k, v, lr, decay, method="sequential", **options)
    y, _ = ae.omega_scan(memory, q, k, v, lr, decay, method="chunked", block_size=64, **options)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, y_seq, atol=2e-4 * float(np.abs(y_seq).max()))


# --------------------------------------------------------------------------------------------
# fla's own DeltaNet and Gated DeltaNet (torch), when installed
# --------------------------------------------------------------------------------------------


def _fla_naive(ops_module: str):
    """fla-core's `fla/ops/<ops_module>/naive.py` (torch), or skip."""
    pytest.importorskip("torch")
    module = load_fla_naive(ops_module)
    if module is None:
        pytest.skip(f"fla-core (or its ops/{ops_module}/naive.py) is not installed")
    return module


def _fla_inputs(T: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, d))
    k = rng.standard_normal((T, d))
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    v = rng.standard_normal((T, d))
    beta = rng.uniform(0.1, 1.0, T)
    alpha = rng.uniform(0.8, 1.0, T)
    return q, k, v, beta, alpha


def _ours(q, k, v, beta, alpha, *, decay_first: bool, block_size: int):
    """Our exact chunked scan with fla's conventions: W_0 = 0, q scaled by d^-1/2."""
    T, d = q.shape
    memory = ae.LinearMemory(d, d, key=jax.random.PRNGKey(0), init_std=0.0)
    y, state = ae.omega_scan(
        memory,
        q * d**-0.5,
        k,
        v,
        beta,
        alpha,
        method="chunked",
        block_size=block_size,
        decay_first=decay_first,
    )
    return np.asarray(y), np.asarray(state.memory.weight)  # pyright: ignore[reportAttributeAccessIssue]


def test_deltanet_equals_fla_recurrence_and_chunkwise_form():
    """DeltaNet: our exact chunked form (block 8) = fla's `delta_rule_recurrence` and its
    `delta_rule_chunkwise` (chunk 16), outputs and final state (fla stores S = W^T)."""
    naive = _fla_naive("delta_rule")
    import torch  # pyright: ignore[reportMissingImports]

    T, d = 64, 8
    q, k, v, beta, _ = _fla_inputs(T, d, 0)
    ours_y, ours_W = _ours(q, k, v, beta, np.ones(T), decay_first=False, block_size=8)
    tensor = lambda a: torch.from_numpy(np.asarray(a, np.float64))[None, None]  # noqa: E731
    with torch.no_grad():
        y_rec, S_rec = naive.delta_rule_recurrence(
            tensor(q), tensor(k), tensor(v), tensor(beta), output_final_state=True
        )
        y_chunk, S_chunk = naive.delta_rule_chunkwise(
            tensor(q).float(), tensor(k).float(), tensor(v).float(), tensor(beta).float(), 16
        )
    np.testing.assert_allclose(ours_y, y_rec[0, 0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_W, S_rec[0, 0].numpy().T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_y, y_chunk[0, 0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours_W, S_chunk[0, 0].numpy().T, rtol=1e-4, atol=1e-4)


def test_gated_deltanet_equals_fla_recurrence_and_chunk_form():
    """Gated DeltaNet (`decay_first=True`, alpha = exp(g)): our exact chunked form (block 8)
    = fla's `naive_recurrent_gated_delta_rule` and `naive_chunk_gated_delta_rule` (chunk 16)."""
    naive = _fla_naive("gated_delta_rule")
    import torch  # pyright: ignore[reportMissingImports]

    T, d = 64, 8
    q, k, v, beta, alpha = _fla_inputs(T, d, 1)
    ours_y, ours_W = _ours(q, k, v, beta, alpha, decay_first=True, block_size=8)
    tensor = lambda a: torch.from_numpy(np.asarray(a, np.float32))[None, :, None]  # noqa: E731
    g = np.log(alpha)
    with torch.no_grad():
        y_rec, S_rec = naive.naive_recurrent_gated_delta_rule(
            tensor(q), tensor(k), tensor(v), tensor(beta), tensor(g), output_final_state=True
        )
        y_chunk, S_chunk = naive.naive_chunk_gated_delta_rule(
            tensor(q), tensor(k), tensor(v), tensor(g), tensor(beta), 16, output_final_state=True
        )
    for y_fla, S_fla in ((y_rec, S_rec), (y_chunk, S_chunk)):
        np.testing.assert_allclose(ours_y, y_fla[0, :, 0].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ours_W, S_fla[0, 0].numpy().T, rtol=1e-4, atol=1e-4)
