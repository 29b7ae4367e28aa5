"""`method="pallas"` (`atlas_eqx/_pallas.py`, issue 6): the chunk loop as Pallas kernels.

On this CPU machine the kernels run in interpret mode; the same kernels are lowered for the
`cuda` (Triton) and `tpu` (Mosaic) platforms here too (`jax.jit(f).trace(...).lower(...)`),
which proves they lower there (block shapes, operations), not that they compile to PTX or run.

References: `method="chunked"` (the XLA form of the same algorithm) and `method="sequential"`
(the oracle, itself tested against the naive loop of `_helpers.naive_omega`), with the same
`chunk_size`. Interpret-mode compiles cost 1-3 s and gradient programs 5-15 s, so shapes come from
a few fixed values and most gradient configurations run only with `-m slow`.
"""

import contextlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import Inputs, make_inputs, make_memory, OPTIMIZERS
from hypothesis import given, settings, strategies as st
from jax.experimental.pallas import tpu as pltpu, triton as pltriton
from jaxtyping import TypeCheckError

import atlas_eqx as ae
import feature_maps as fm
import optimizers as iopt
from atlas_eqx import _pallas
from atlas_eqx._pallas import exact_pallas_scan, pallas_scan, resolve_backend
from atlas_eqx._scan_inputs import ScanInputs, ScanRule


SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
_N = settings().max_examples
PER_CONFIG = settings(max_examples=max(1, _N // 8))
OBJECTIVES: dict[str, Any] = {"l2": ae.l2, "dot": ae.dot, "huber": ae.huber(0.5)}


def run(memory: ae.AbstractMemory, x: Inputs, **kwargs: Any):
    return ae.omega_scan(memory, *x.arrays(), **kwargs)


def assert_tree_close(actual: Any, desired: Any, *, rel: float = 1e-9) -> None:
    """Same structure, shapes and dtypes; float leaves within `rel * max(1, max |desired|)`."""
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


# --------------------------------------------------------------------------------------------
# Forward: outputs and the whole final state equal the chunked and sequential paths
# --------------------------------------------------------------------------------------------


# (memory, optimizer, T, d, chunk size b, window c, gate kind, objective, gates at 0 / 1): every
# kernel meets every learner, and together they cover T in {5, 8}, d in {4, 8}, b in {1, 2, 4},
# c in {1, 2, 3}, every gate kind and objective. Hypothesis draws the data (the seed).
FORWARD_CONFIGS = [
    ("linear", "gd", 5, 4, 1, 1, "none", "l2", False),
    ("linear", "momentum", 8, 8, 2, 3, "step", "huber", True),
    ("linear", "muon", 5, 8, 4, 2, "token", "l2", True),
    ("linear", "muon_eta_inside", 8, 4, 2, 3, "token", "dot", False),
    ("mlp", "gd", 8, 4, 4, 3, "token", "huber", True),
    ("mlp", "momentum", 5, 8, 1, 2, "step", "l2", False),
    ("mlp", "muon", 8, 8, 2, 2, "step", "l2", True),
    ("mlp", "muon_eta_inside", 5, 4, 4, 1, "none", "dot", True),
]


@pytest.mark.parametrize("config", FORWARD_CONFIGS, ids=lambda c: "-".join(map(str, c)))
@PER_CONFIG
@given(seed=SEEDS)
def test_forward_equals_chunked_and_sequential(config, seed):
    """y and every leaf of the final state (weights, momentum, window buffers), float64, for
    every kernel and learner (linear and MLP memories; GD, momentum, Muon with eta outside and
    inside NS), windows 1-3 and chunk sizes 1, 2, 4 (T = 5 pads the last chunk; n_e = b + c - 1
    pads to a power of 2), no / per-token / per-step gates, gates at exactly 0 or 1, and three
    objectives."""
    kind, opt, T, d, b, window, gate_kind, objective, edges = config
    memory = make_memory(kind, d, d, seed % 2**31)
    x = make_inputs(
        seed,
        T,
        d,
        d,
        window=window,
        gate_kind=gate_kind,
        with_momentum=opt != "gd",
        edges=edges,
    )
    kw = dict(
        optimizer=OPTIMIZERS[opt],
        objective=OBJECTIVES[objective],
        window=window,
        chunk_size=b,
    )
    y, state = run(memory, x, method="pallas", **kw)
    y_chunked, state_chunked = run(memory, x, method="chunked", **kw)
    y_sequential, state_sequential = run(memory, x, method="sequential", **kw)
    assert y.shape == (T, d)
    assert_tree_close(y, y_chunked)
    assert_tree_close(state, state_chunked)
    assert_tree_close(y, y_sequential)
    assert_tree_close(state, state_sequential)


@pytest.mark.parametrize(
    ("kind", "opt", "kernel"),
    [
        ("linear", "gd", "omega_exact_linear"),
        ("linear", "momentum", "omega_dual_linear"),
        ("mlp", "gd", "omega_dual_mlp"),
        ("mlp", "momentum", "omega_dual_mlp"),
        ("linear", "muon", "omega_muon_linear"),
        ("mlp", "muon_eta_inside", "omega_muon_mlp"),
    ],
)
def test_method_pallas_runs_the_kernel(kind, opt, kernel):
    """omega_scan(method="pallas") really traces the Pallas kernel for its configuration (so the
    equalities above are not the chunked path compared with itself), and method="chunked" has
    no pallas_call. Traced only (`jax.make_jaxpr`), never compiled."""
    memory = make_memory(kind, 4, 4, 0)
    x = make_inputs(0, 3, 4, 4, window=2, with_momentum=opt != "gd")
    arrays = [None if a is None else jnp.asarray(a) for a in x.arrays()]
    kw = dict(optimizer=OPTIMIZERS[opt], window=2, chunk_size=2)

    def jaxpr(method):
        return str(
            jax.make_jaxpr(lambda *a: ae.omega_scan(memory, *a, method=method, **kw))(*arrays)
        )

    pallas = jaxpr("pallas")
    assert pallas.count("pallas_call[") == 1
    assert f"name={kernel}" in pallas
    assert "pallas_call" not in jaxpr("chunked")


@pytest.mark.parametrize(
    ("kind", "opt"), [("linear", "momentum"), ("mlp", "muon")], ids=["dual", "muon"]
)
def test_padding_of_every_dimension_is_exact(kind, opt):
    """Feature, value and hidden dimensions that are not powers of 2 (polynomial features of
    d_k = 3: 10 -> 16; d_v = 3 -> 4; hidden 3 -> 4 with GELU), b = 3 -> 4, n_e = 4 and a padded
    last chunk (T = 7): pallas equals sequential and chunked."""
    phi = fm.Polynomial(2)
    key = jax.random.PRNGKey(1)
    d_in = phi.out_dim(3)
    assert d_in == 10
    if kind == "linear":
        memory = ae.LinearMemory(d_in, 3, key=key)
    else:
        memory = ae.MLPMemory(d_in, 3, key=key, hidden=3, depth=3)
    x = make_inputs(2, 7, 3, 3, window=2, gate_kind="token", with_momentum=True)
    kw = dict(feature_map=phi, optimizer=OPTIMIZERS[opt], window=2, chunk_size=3)
    y, state = run(memory, x, method="pallas", **kw)
    y_sequential, state_sequential = run(memory, x, method="sequential", **kw)
    assert_tree_close(y, y_sequential)
    assert_tree_close(state, state_sequential)
    y_chunked, state_chunked = run(memory, x, method="chunked", **kw)
    assert_tree_close(y, y_chunked)
    assert_tree_close(state, state_chunked)


def test_float32_stays_float32_and_agrees():
    """float32 weights: outputs and state stay float32 and agree with the chunked path to
    float32 rounding (2e-5 of the scale)."""
    memory = jax.tree.map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a,
        make_memory("mlp", 4, 4, 3),
    )
    x = make_inputs(3, 8, 4, 4, window=2, gate_kind="token", with_momentum=True)
    x = x.map(lambda a: a.astype(np.float32))
    kw = dict(optimizer=iopt.momentum(), window=2, chunk_size=4)
    y, state = run(memory, x, method="pallas", **kw)
    y_chunked, state_chunked = run(memory, x, method="chunked", **kw)
    assert y.dtype == jnp.float32
    assert_tree_close(y, y_chunked, rel=2e-5)
    assert_tree_close(state, state_chunked, rel=2e-5)


def test_split_call_with_carried_state_equals_one_call():
    """I-7 through the kernels: two chunk-aligned calls with the carried state (weights,
    momentum and the last c - 1 window tokens) equal one call, and equal the chunked path."""
    memory = make_memory("linear", 4, 4, 5)
    x = make_inputs(5, 8, 4, 4, window=3, gate_kind="token", with_momentum=True)
    kw = dict(optimizer=iopt.momentum(), window=3, chunk_size=2)
    y, state = run(memory, x, method="pallas", **kw)
    first = x.map(lambda a: a[:4])
    second = x.map(lambda a: a[4:])
    y1, state1 = run(memory, first, method="pallas", **kw)
    y2, state2 = run(memory, second, method="pallas", state=state1, **kw)
    assert_tree_close(jnp.concatenate([y1, y2]), y)
    assert_tree_close(state2, state)
    y_chunked, state_chunked = run(memory, x, method="chunked", **kw)
    assert_tree_close(y, y_chunked)
    assert_tree_close(state, state_chunked)


# --------------------------------------------------------------------------------------------
# Gradients (custom_vjp through the chunked path), jit and vmap
# --------------------------------------------------------------------------------------------


def _differentiable(memory, feature_map, x: Inputs):
    args = (memory, feature_map) + tuple(None if a is None else jnp.asarray(a) for a in x.arrays())
    return eqx.partition(args, eqx.is_inexact_array)


@eqx.filter_jit
def _value_and_grad(diff, static, weights, kw):
    def loss(diff):
        memory, feature_map, q, k, v, lr, decay, momentum, gamma = eqx.combine(diff, static)
        y, state = ae.omega_scan(
            memory, q, k, v, lr, decay, momentum, gamma, feature_map=feature_map, **kw
        )
        # The final weights and momentum enter the loss too, so their cotangents are exercised.
        carried = eqx.filter((state.memory, state.optimizer_state), eqx.is_inexact_array)
        return jnp.sum(weights * y) + sum(jnp.sum(w * w) for w in jax.tree.leaves(carried))

    return jax.value_and_grad(loss)(diff)


GRAD_CONFIGS = [
    # (memory, optimizer, window, chunk size, gate kind, feature map); T = 7 pads the last chunk.
    # One configuration runs by default (the custom_vjp is the same for every kernel; each
    # gradient program costs 5-15 s to compile here), the others with `-m slow`.
    ("linear", "momentum", 2, 2, "token", "poly2"),
    pytest.param(("mlp", "muon", 2, 4, "step", "identity"), marks=pytest.mark.slow),
    pytest.param(("linear", "muon_eta_inside", 3, 1, "token", "identity"), marks=pytest.mark.slow),
    pytest.param(("mlp", "gd", 3, 2, "token", "poly2"), marks=pytest.mark.slow),
    pytest.param(("mlp", "momentum", 1, 4, "none", "identity"), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("config", GRAD_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_gradients_equal_chunked_and_sequential(config):
    """jax.grad of a loss of y and of the final state, w.r.t. W_0, q, k, v, lr, decay, momentum,
    gamma and the polynomial coefficients a_i, through method="pallas" (Pallas forward, chunked
    backward) equals the gradients through method="chunked" and method="sequential"; every
    input gets a nonzero cotangent (so the comparison is not vacuous)."""
    kind, opt, window, b, gate_kind, phi_name = config
    phi = fm.Polynomial(2) if phi_name == "poly2" else fm.Identity()
    d_in = phi.out_dim(4)
    memory = make_memory(kind, d_in, 4, 7)
    x = make_inputs(7, 7, 4, 4, window=window, gate_kind=gate_kind, with_momentum=opt != "gd")
    diff, static = _differentiable(memory, phi, x)
    weights = jnp.asarray(np.random.default_rng(8).standard_normal((x.T, 4)))
    base = dict(optimizer=OPTIMIZERS[opt], window=window, chunk_size=b)
    loss, grad = _value_and_grad(diff, static, weights, {**base, "method": "pallas"})
    loss_chunked, grad_chunked = _value_and_grad(
        diff, static, weights, {**base, "method": "chunked"}
    )
    loss_seq, grad_seq = _value_and_grad(diff, static, weights, {**base, "method": "sequential"})
    assert_tree_close(loss, loss_chunked)
    assert_tree_close(grad, grad_chunked)
    assert_tree_close(loss, loss_seq)
    assert_tree_close(grad, grad_seq)
    for g in jax.tree.leaves(grad):
        assert np.any(np.asarray(g) != 0)
    if phi_name == "poly2":
        assert jax.tree.leaves(grad[1])  # the a_i are differentiated


def test_vmap_over_heads_under_jit_equals_a_loop():
    """jax.jit(vmap over heads, one W_0 per head) of method="pallas" (the batching rule adds a
    grid axis) equals a loop of single calls and, for a head, the chunked path; heads never
    interact (changing head 1 leaves heads 0 and 2 bit-identical)."""
    H, T, d = 3, 8, 4
    memories = [make_memory("mlp", d, d, h) for h in range(H)]
    stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *memories)
    inputs = [
        make_inputs(20 + h, T, d, d, window=2, gate_kind="token", with_momentum=True)
        for h in range(H)
    ]
    batch = jax.tree.map(lambda *a: jnp.stack(a), *[x.arrays() for x in inputs])
    kw: dict[str, Any] = dict(optimizer=iopt.momentum(), window=2, chunk_size=4)

    def one(memory, q, k, v, lr, decay, momentum, gamma):
        return ae.omega_scan(memory, q, k, v, lr, decay, momentum, gamma, method="pallas", **kw)

    heads = eqx.filter_jit(eqx.filter_vmap(one, in_axes=(eqx.if_array(0),) + (0,) * 7))
    y, state = heads(stacked, *batch)
    assert y.shape == (H, T, d)
    for h in range(H):
        y_h, state_h = run(memories[h], inputs[h], method="pallas", **kw)
        assert_tree_close(y[h], y_h, rel=1e-12)
        assert_tree_close(
            jax.tree.map(lambda a, h=h: a[h], eqx.filter(state, eqx.is_array)),
            eqx.filter(state_h, eqx.is_array),
            rel=1e-12,
        )
    y_chunked, state_chunked = run(memories[0], inputs[0], method="chunked", **kw)
    assert_tree_close(y[0], y_chunked)
    other = jax.tree.map(lambda a: a.at[1].set(a[1][::-1]), batch)
    y_other, _ = heads(stacked, *other)
    np.testing.assert_array_equal(np.asarray(y_other[0]), np.asarray(y[0]))
    np.testing.assert_array_equal(np.asarray(y_other[2]), np.asarray(y[2]))
    assert not np.allclose(np.asarray(y_other[1]), np.asarray(y[1]))


@pytest.mark.slow
def test_vmap_of_grad_equals_a_loop():
    """vmap over heads of jax.grad through method="pallas" equals per-head gradients."""
    H, T, d = 2, 5, 4
    memories = [make_memory("linear", d, d, h) for h in range(H)]
    inputs = [
        make_inputs(30 + h, T, d, d, window=2, gate_kind="token", with_momentum=True)
        for h in range(H)
    ]
    kw: dict[str, Any] = dict(optimizer=iopt.muon(), window=2, chunk_size=2, method="pallas")

    def grad_one(memory, q, k, v):
        x = inputs[0]

        def loss(memory, q, k, v):
            y, _ = ae.omega_scan(memory, q, k, v, x.lr, x.decay, x.momentum, x.gamma, **kw)
            return jnp.sum(y * y)

        return eqx.filter_grad(loss)(memory, q, k, v)

    stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *memories)
    qs, ks, vs = (jnp.stack([getattr(x, name) for x in inputs]) for name in ("q", "k", "v"))
    batched = eqx.filter_jit(eqx.filter_vmap(grad_one, in_axes=(eqx.if_array(0), 0, 0, 0)))
    grads = batched(stacked, qs, ks, vs)
    for h in range(H):
        single = eqx.filter_jit(grad_one)(memories[h], qs[h], ks[h], vs[h])
        assert_tree_close(jax.tree.map(lambda a, h=h: a[h], grads), single, rel=1e-12)


# --------------------------------------------------------------------------------------------
# What is not supported raises, naming what to use instead
# --------------------------------------------------------------------------------------------


def _bad_objective(prediction, target):
    return jnp.sum(jnp.abs(prediction - target))


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("gated", "GatedMLPMemory; use method='chunked'"),
        ("layer_norm", r"MLPMemory\(layer_norm=True\); use method='chunked'"),
        ("decay_first", "decay_first=True`; use method='chunked'"),
        ("muon_per_chunk", "needs method='chunked'"),
        ("from_optax", "method='sequential'"),
        ("objective", "supports the objectives"),
        ("lp_without_eps", "use eps > 0 or method='chunked'"),
        ("preconditioner", "Muon's Newton-Schulz"),
        ("activation", r"activation\(0\) == 0"),
    ],
)
def test_unsupported_configurations_raise(case, match):
    """Everything the kernels do not compute is a ValueError before any work, never a silent
    fallback: the gated MLP, the layer-normalised MLP, decay_first, the per-chunk Muon approximation, opaque learners,
    other objectives, lp's NaN gradient at zero residual, other preconditioners, and a hidden
    width that needs padding with an activation that is not 0 at 0."""
    memory = make_memory("linear", 4, 4, 0)
    x = make_inputs(0, 5, 4, 4, with_momentum=True)
    kw: dict[str, Any] = dict(optimizer=iopt.muon(), method="pallas")
    if case == "gated":
        memory = make_memory("gated", 4, 4, 0)
    elif case == "layer_norm":
        memory = make_memory("mlp", 4, 4, 0, layer_norm=True)
    elif case == "decay_first":
        kw["decay_first"] = True
    elif case == "muon_per_chunk":
        kw["muon_per_chunk"] = True
    elif case == "from_optax":
        import optax

        kw["optimizer"] = iopt.from_optax(optax.adam(1e-2))  # sgd has a linear form and runs
        x = make_inputs(0, 5, 4, 4, with_momentum=False)
    elif case == "objective":
        kw["objective"] = _bad_objective
    elif case == "lp_without_eps":
        kw["objective"] = ae.lp(1.5, 0.0)
    elif case == "preconditioner":
        kw["optimizer"] = iopt.muon()._replace(precondition=iopt.newton_schulz)
    elif case == "activation":
        memory = ae.MLPMemory(4, 4, key=jax.random.PRNGKey(0), hidden=3, activation=jax.nn.sigmoid)
    with pytest.raises(ValueError, match=match):
        run(memory, x, **kw)


def test_activation_check_accepts_exact_padding():
    """The activation check only bites when the hidden width is padded: sigmoid with hidden 4
    (no padding) runs and equals the chunked path; GELU with hidden 3 is accepted (gelu(0) = 0,
    its equality is `test_padding_of_every_dimension_is_exact`)."""
    memory = ae.MLPMemory(4, 4, key=jax.random.PRNGKey(0), hidden=4, activation=jax.nn.sigmoid)
    x = make_inputs(4, 5, 4, 4)
    y, state = run(memory, x, method="pallas", chunk_size=2)
    y_chunked, state_chunked = run(memory, x, method="chunked", chunk_size=2)
    assert_tree_close(y, y_chunked)
    assert_tree_close(state, state_chunked)
    gelu = ae.MLPMemory(4, 4, key=jax.random.PRNGKey(0), hidden=3)
    _pallas.check_supported(gelu, iopt.gd(), ae.l2, decay_first=False, backend="interpret")


# --------------------------------------------------------------------------------------------
# Backend choice, and lowering for GPU (Triton) and TPU (Mosaic) from this CPU machine
# --------------------------------------------------------------------------------------------


def test_backend_choice():
    """CPU -> interpret mode; an explicit backend wins; anything else is a ValueError. Triton
    gets its compiler params (a plain pallas_call would pick Mosaic GPU on jax 0.10.2), TPU its
    own; padded sizes are powers of 2 (at least 16 on Triton)."""
    assert jax.default_backend() == "cpu"
    assert resolve_backend() == "interpret"
    for backend in _pallas.BACKENDS:
        assert resolve_backend(backend) == backend
    # Under the test suite's jaxtyping hook the annotation rejects it first; without it the
    # function's own check does.
    with pytest.raises((ValueError, TypeCheckError), match="backend"):
        resolve_backend("cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`backend` must be one of"):
        resolve_backend.__wrapped__("cuda")  # type: ignore[attr-defined]
    assert _pallas._call_options("interpret") == {"interpret": True}
    triton_params = _pallas._call_options("triton")["compiler_params"]
    assert isinstance(triton_params, pltriton.CompilerParams)
    assert isinstance(_pallas._call_options("mosaic_tpu")["compiler_params"], pltpu.CompilerParams)
    sizes = {n: _pallas._padded_size(n, "interpret") for n in (1, 2, 3, 5, 8, 10, 17)}
    assert sizes == {1: 1, 2: 2, 3: 4, 5: 8, 8: 8, 10: 16, 17: 32}
    assert [_pallas._padded_size(n, "triton") for n in (1, 16, 17, 64)] == [16, 16, 32, 64]


_MARKER = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
_BACKEND: dict[str, _pallas.Backend] = {"cuda": "triton", "tpu": "mosaic_tpu"}


def _lowering_context(platform: str):
    """jax >= 0.11 needs an abstract GPU to lower Triton kernels on a machine without one."""
    if platform != "cuda" or not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def _lower(platform, kind, opt, *, T, d, b, window, hidden=None, heads=None) -> str:
    """Lower pallas_scan (float32, as on an accelerator) for `platform`; the lowered text."""
    key = jax.random.PRNGKey(0)
    if kind == "linear":
        memory = ae.LinearMemory(d, d, key=key)
    else:
        memory = ae.MLPMemory(d, d, key=key, hidden=hidden or 2 * d)
    memory = jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, memory)
    optimizer = OPTIMIZERS[opt]
    state = ae.init_omega_state(memory, optimizer, window)
    f32 = jnp.float32
    shape = (T,) if heads is None else (heads, T)
    arrays = (
        jax.ShapeDtypeStruct(shape + (d,), f32),
        jax.ShapeDtypeStruct(shape + (d,), f32),
        jax.ShapeDtypeStruct(shape + (d,), f32),
        jax.ShapeDtypeStruct(shape, f32),
        jax.ShapeDtypeStruct(shape, f32),
        jax.ShapeDtypeStruct(shape, f32),
        jax.ShapeDtypeStruct(shape, f32),
    )

    def scan(state, q, k, v, lr, decay, momentum, gamma):
        inputs = ScanInputs(q, k, v, lr, decay, momentum, gamma)
        rule = ScanRule(objective=ae.l2, optimizer=optimizer, window=window, chunk_size=b)
        y, _ = pallas_scan(state, inputs, rule, backend=_BACKEND[platform])
        return y

    if heads is not None:
        scan = jax.vmap(scan, in_axes=(None,) + (0,) * 7)
    with _lowering_context(platform):
        lowered = jax.jit(scan).trace(state, *arrays).lower(lowering_platforms=(platform,))
    return lowered.as_text()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize(
    ("kind", "opt", "b"),
    [
        ("linear", "gd", 64),
        ("linear", "momentum", 16),
        ("linear", "muon", 16),
        ("mlp", "gd", 16),
        ("mlp", "momentum", 64),
        ("mlp", "muon", 16),
    ],
)
def test_kernels_lower_for_gpu_and_tpu(platform, kind, opt, b):
    """Every kernel (dual linear, dual MLP, Muon) lowers for Triton and Mosaic TPU at the
    shapes a user runs (T = 256, d = 64, b = 16 or 64, window 2, so n_e = b + 1 is padded):
    a rejected block shape or operation raises here. The lowered module holds the backend's
    custom call, so the kernel really went through that backend."""
    text = _lower(platform, kind, opt, T=256, d=64, b=b, window=2)
    assert _MARKER[platform] in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize(("kind", "opt"), [("linear", "momentum"), ("mlp", "muon")])
def test_padded_shapes_and_head_grid_lower(platform, kind, opt):
    """Shapes that need padding (d = 48 -> 64, hidden 96 -> 128, b = 12 -> 16, n_e = 14 -> 16,
    T = 100: 9 chunks, a count that is not a power of 2) and vmap over 4 heads (a grid axis)
    lower for both platforms."""
    text = _lower(platform, kind, opt, T=100, d=48, b=12, window=3, hidden=96, heads=4)
    assert _MARKER[platform] in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_gradient_program_lowers_for_gpu_and_tpu(platform):
    """jax.grad through method="pallas" (Pallas forward, chunked XLA backward) lowers for both
    platforms, w.r.t. the state's weights and every array input (MLP memory, Muon)."""
    d, T = 32, 64
    memory = ae.MLPMemory(d, d, key=jax.random.PRNGKey(0), hidden=64)
    memory = jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, memory)
    optimizer = iopt.muon()
    diff, static = eqx.partition(ae.init_omega_state(memory, optimizer, 2), eqx.is_inexact_array)

    def loss(diff, *arrays):
        rule = ScanRule(objective=ae.l2, optimizer=optimizer, window=2, chunk_size=16)
        state = eqx.combine(diff, static)
        y, _ = pallas_scan(state, ScanInputs(*arrays), rule, backend=_BACKEND[platform])
        return jnp.sum(y * y)

    f32 = jnp.float32
    arrays = [jax.ShapeDtypeStruct((T, d), f32)] * 3 + [jax.ShapeDtypeStruct((T,), f32)] * 4
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(8))))
    with _lowering_context(platform):
        lowered = grad.trace(diff, *arrays).lower(lowering_platforms=(platform,))
    assert _MARKER[platform] in lowered.as_text()


def test_lowering_check_catches_unpadded_shapes(monkeypatch):
    """The lowering tests can fail: without the power-of-2 padding, Triton rejects the kernel
    at d = 48 (the rule these tests guard)."""
    monkeypatch.setattr(_pallas, "_padded_size", lambda n, backend: n)
    with pytest.raises(ValueError, match="power of 2"):
        _lower("cuda", "linear", "gd", T=96, d=48, b=16, window=1)


def test_tpu_lowering_check_catches_unsupported_operations(monkeypatch):
    """The TPU lowering tests can fail too: the kernel body goes through the Mosaic lowering,
    which rejects an operation it has no rule for (a cumulative sum put into the kernel)."""
    monkeypatch.setattr(
        _pallas, "_output_gradient", lambda objective, p, t: jax.lax.cumsum(p - t, axis=0)
    )
    with pytest.raises(NotImplementedError, match="cumsum"):
        _lower("tpu", "linear", "gd", T=64, d=64, b=16, window=1)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize(
    ("window", "decay_first", "d", "heads"), [(1, True, 64, None), (3, False, 48, 4)]
)
def test_exact_kernel_lowers_for_gpu_and_tpu(platform, window, decay_first, d, heads):
    """The exact form's block-loop kernel (linear memory, GD: `exact_pallas_scan`) lowers for
    Triton and Mosaic TPU with its XLA block inputs (the triangular solve) in front: Gated
    DeltaNet's order at d 64, and a window of 3 at d 48 (padded to 64) vmapped over 4 heads."""
    memory = ae.LinearMemory(d, d, key=jax.random.PRNGKey(0))
    memory = jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, memory)
    state = ae.init_omega_state(memory, iopt.gd(), window)
    T = 256
    shape = (T,) if heads is None else (heads, T)
    f32 = jnp.float32
    arrays = [jax.ShapeDtypeStruct(shape + (d,), f32) for _ in range(3)]
    arrays += [jax.ShapeDtypeStruct(shape, f32) for _ in range(3)]

    def scan(state, q, k, v, lr, decay, gamma):
        inputs = ScanInputs(q, k, v, lr, decay, jnp.zeros_like(lr), gamma)
        rule = ScanRule(
            objective=ae.l2,
            optimizer=iopt.gd(),
            window=window,
            chunk_size=1,
            decay_first=decay_first,
            block_size=32,
        )
        y, _ = exact_pallas_scan(state, inputs, rule, backend=_BACKEND[platform])
        return y

    if heads is not None:
        scan = jax.vmap(scan, in_axes=(None,) + (0,) * 6)
    with _lowering_context(platform):
        lowered = jax.jit(scan).trace(state, *arrays).lower(lowering_platforms=(platform,))
    assert _MARKER[platform] in lowered.as_text()
