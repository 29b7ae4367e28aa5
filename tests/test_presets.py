"""Every preset of `atlas_eqx.presets` at the layer level, and the presets' configuration errors.

For each preset (tiny: d_model 16, 2 heads, T = 6, chunk_size 1 so that streaming is exact):
causality (changing tokens after t leaves outputs up to t unchanged, and does change the later
ones), batch independence (`jax.vmap` equals separate calls), streaming token by token and in
pieces equals the full call (digest I-7, I-8, I-39, I-40), and gradients with respect to every
parameter are finite and not all zero (frozen parameters excepted). All of a preset's checks
run in one jitted function, so each preset compiles once.

Chunk-aligned prefill + decode with `chunk_size > 1` is compared with the matching
frozen-anchor reference (`_helpers.naive_omega` with the prefill's chunk starts, then one chunk
per decoded token) for the parametric memories whose result depends on the chunking (`-m slow`;
the default run checks this for `atlas` in test_layer.py).
"""

import inspect
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_close, Inputs, naive_omega

import atlas_eqx as ae
from atlas_eqx._mixer import AbstractMixer


D_MODEL, N_HEADS, T, CUT, PIECE = 16, 2, 6, 2, 3
NAMES = tuple(ae.presets.__all__)
HYBRID = dict(chunk_size=1, attention_window=3, n_persistent=2)
OPTIONS = {name: dict(chunk_size=1) for name in NAMES}
OPTIONS.update(swa=dict(window=3), transformer={}, mag=HYBRID, mal=HYBRID)


def frozen_paths(layer) -> set[str]:
    """Parameters with zero gradient by design: a fixed initial memory W_0 (`stop_gradient`)."""
    if isinstance(layer, ae.MemoryLayer):
        return set() if layer.config.learn_initial_memory else {".memory.weight"}
    if isinstance(layer, ae.MAGLayer | ae.MALLayer):
        return {".memory" + path for path in frozen_paths(layer.memory)}
    return set()


def specs(default: list, slow: list) -> list:
    """`default` in every run, `slow` only with `-m slow`: every preset compiles anew (the
    scans' runtime checks are host callbacks, which the persistent compile cache skips)."""

    def spec_id(p) -> str:
        name, *rest = p if isinstance(p, tuple) else (p,)
        options = rest[0] if rest else {}
        if "memory_preset" in options:
            name += f"-{options['memory_preset']}-persistent{options.get('n_persistent', 0)}"
        return name

    return [
        pytest.param(*(p if isinstance(p, tuple) else (p,)), id=spec_id(p)) for p in default
    ] + [pytest.param(*p, marks=pytest.mark.slow, id=spec_id(p) + "-slow") for p in slow]


def test_the_presets_are_the_papers_models():
    expected = {
        "atlas",
        "atlas_pp",
        "omeganet",
        "titans",
        "deltanet",
        "gated_deltanet",
        "linear_attention",
        "deep_transformer",
        "swdt",
        "dot",
        "dla",
        "swla",
        "transformer",
        "swa",
        "mag",
        "mal",
    }
    assert set(NAMES) == expected


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_has_the_common_signature(name):
    parameters = inspect.signature(getattr(ae.presets, name)).parameters
    assert list(parameters)[:2] == ["d_model", "n_heads"]
    for keyword in ("key", "chunk_size", "window"):
        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


@eqx.filter_jit
def layer_properties(layer, xs):
    """One compile per preset: a batch of three sequences, `xs[0]` streamed token by token and
    in pieces (each by a `lax.scan` over `stream`), and the gradient of a loss of `xs[0]`."""
    y_batch = jax.vmap(layer)(xs)
    x = xs[0]

    def step(state, piece):
        y, state = layer.stream(piece, state)
        return state, y

    _, y_tokens = jax.lax.scan(step, layer.init_state(T), x[:, None])
    _, y_pieces = jax.lax.scan(step, layer.init_state(T), x.reshape(T // PIECE, PIECE, -1))
    grads = eqx.filter_grad(lambda m: jnp.sum(jnp.sin(3.0 * m(x))))(layer)
    return y_batch, y_tokens.reshape(T, -1), y_pieces.reshape(T, -1), grads


HYBRID_DELTANET = dict(HYBRID, memory_preset="deltanet", n_persistent=0)
LAYER_SPECS = specs(
    [("deltanet", {}), ("deep_transformer", {}), ("swa", {}), ("mag", HYBRID_DELTANET)],
    [(name, {}) for name in NAMES if name not in ("deltanet", "deep_transformer", "swa")]
    + [("mal", HYBRID_DELTANET), ("mag", dict(HYBRID, memory_preset="deltanet"))],
)


@pytest.mark.parametrize("name, options", LAYER_SPECS)
def test_layer_properties(name, options):
    options = options or OPTIONS[name]
    layer = getattr(ae.presets, name)(D_MODEL, N_HEADS, key=jax.random.PRNGKey(0), **options)
    assert isinstance(layer, AbstractMixer) and layer.d_model == D_MODEL
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, D_MODEL))
    x_changed = x.copy()
    x_changed[CUT + 1 :] = rng.standard_normal((T - CUT - 1, D_MODEL))
    xs = np.stack([x, x_changed, rng.standard_normal((T, D_MODEL))])
    y_batch, y_tokens, y_pieces, grads = layer_properties(layer, xs)
    y, y_changed = y_batch[0], y_batch[1]

    assert y_batch.shape == (3, T, D_MODEL) and y_batch.dtype == jnp.float64
    # Causality (I-8): the outputs up to CUT are unchanged; the later ones do change.
    assert_close(y_changed[: CUT + 1], y[: CUT + 1], rtol=1e-12, atol=1e-12)
    assert not np.allclose(y_changed[CUT + 1 :], y[CUT + 1 :], atol=1e-6)
    # Streaming (I-7, I-40), and batch independence (I-39): the single-sequence stream of
    # xs[0] equals its row of the batch, whatever the other rows hold.
    assert_close(y_tokens, y)
    assert_close(y_pieces, y)
    # Outer gradients: finite, and nonzero for every learned parameter.
    for path, g in jax.tree_util.tree_flatten_with_path(eqx.filter(grads, eqx.is_array))[0]:
        where = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), where
        if where in frozen_paths(layer):
            assert np.all(g == 0), where  # stop_gradient on the fixed W_0
        else:
            assert np.any(g != 0), where


# ----------------------------------------------------------------------------------------------
# Prefill then decode with chunk_size 2 (I-40).

PREFILL = 4


@eqx.filter_jit
def prefill_then_decode(layer, x):
    state = layer.init_state(T)
    y, state = layer.stream(x[:PREFILL], state)
    outputs = [y]
    for t in range(PREFILL, T):
        y, state = layer.stream(x[t : t + 1], state)
        outputs.append(y)
    return jnp.concatenate(outputs), layer.memory_inputs(x)


def _head(tree, h):
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda a: a[h], arrays), static)


@pytest.mark.parametrize(
    "name",
    specs([], [("gated_deltanet",), ("omeganet",), ("titans",), ("dla",), ("swla",)]),
)
def test_prefill_then_decode_equals_the_matching_reference(name):
    """Chunk starts {0, 2} in the prefill, then one chunk per decoded token: {4, 5}."""
    layer = getattr(ae.presets, name)(D_MODEL, N_HEADS, key=jax.random.PRNGKey(2), chunk_size=2)
    c = layer.config
    x = np.random.default_rng(3).standard_normal((T, D_MODEL))
    y, inputs = prefill_then_decode(layer, x)
    reads = []
    i = inputs
    for h in range(N_HEADS):
        required = [np.asarray(a[h]) for a in (i.q, i.k, i.v, i.lr, i.decay)]
        optional = [None if a is None else np.asarray(a[h]) for a in (i.momentum, i.gamma)]
        reads.append(
            naive_omega(
                _head(layer.memory, h),
                Inputs(*required, *optional),
                feature_map=_head(layer.feature_map, h),
                objective=ae.dot if c.objective == "dot" else ae.l2,
                optimizer=c.optimizer,
                window=c.window,
                starts={0, 2, 4, 5},
                decay_first=c.decay_first,
            )[0]
        )
    expected = eqx.filter_jit(lambda m, x, r: m.combine_heads(x, r))(layer, x, np.stack(reads))
    assert_close(y, expected)


@pytest.mark.slow
def test_prefill_then_decode_is_exact_for_linear_attention():
    """A Hebbian linear memory's gradient does not depend on the state (I-3): prefill + decode
    equals the full call whatever the chunk size."""
    layer = ae.presets.linear_attention(D_MODEL, N_HEADS, key=jax.random.PRNGKey(4), chunk_size=3)
    x = np.random.default_rng(5).standard_normal((T, D_MODEL))

    @eqx.filter_jit
    def both(layer, x):
        state = layer.init_state(T)
        y, state = layer.stream(x[:PREFILL], state)
        outputs = [y]
        for t in range(PREFILL, T):
            y, state = layer.stream(x[t : t + 1], state)
            outputs.append(y)
        return jnp.concatenate(outputs), layer(x)

    y_stream, y_full = both(layer, x)
    assert_close(y_stream, y_full)


# ----------------------------------------------------------------------------------------------
# Configuration errors.


@pytest.mark.parametrize("name", ["atlas", "deltanet", "deep_transformer"])
def test_unknown_override_lists_the_valid_fields(name):
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['memroy'\].*'memory'"):
        getattr(ae.presets, name)(D_MODEL, N_HEADS, key=jax.random.PRNGKey(0), memroy="mlp")


def test_attention_and_hybrid_overrides_are_checked():
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['optimizer'\].*head_dim"):
        ae.presets.transformer(D_MODEL, N_HEADS, key=key, optimizer="muon")
    with pytest.raises(ValueError, match=r"presets.mag: unknown override\(s\) \['colour'\]"):
        ae.presets.mag(D_MODEL, N_HEADS, key=key, colour=1)
    with pytest.raises(ValueError, match="`memory_preset` must be one of"):
        ae.presets.mal(D_MODEL, N_HEADS, key=key, memory_preset="swa")


@pytest.mark.parametrize(
    "d_model, overrides, message",
    [
        (15, dict(), "`d_model`=15 is not divisible by `n_heads`=2"),
        (D_MODEL, dict(head_dim=0), "`head_dim` must be an integer >= 1"),
        (D_MODEL, dict(memory="lstm"), "`memory` must be one of"),
        (D_MODEL, dict(optimizer="adam"), "`optimizer` must be one of"),
        (D_MODEL, dict(gamma_mode="pairwise"), "`gamma_mode` must be one of"),
        (D_MODEL, dict(lr_max=-1.0), "`lr_max` must be > 0"),
        (D_MODEL, dict(decay_init=1.0), r"`decay_init` must be a number in \(0, 1\)"),
        (D_MODEL, dict(conv_size=-1), "`conv_size` must be an integer >= 0"),
        (D_MODEL, dict(memory_init_std=0.0), "only allowed for memory='linear'"),
        (D_MODEL, dict(optimizer="gd", muon_per_chunk=True), "`muon_per_chunk=True` needs"),
        (
            D_MODEL,
            dict(memory="kernel", optimizer="gd", muon_per_chunk=False),
            "set feature_map='identity'",
        ),
    ],
)
def test_impossible_configs_raise_clear_errors(d_model, overrides, message):
    with pytest.raises(ValueError, match=message):
        ae.presets.atlas(d_model, N_HEADS, key=jax.random.PRNGKey(0), **overrides)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(window=0), "`window` must be an integer >= 1"),
        (dict(chunk_size=0), "`chunk_size` must be an integer >= 1"),
        (dict(n_heads=0), "`n_heads` must be an integer >= 1"),
    ],
)
def test_impossible_preset_arguments(arguments, message):
    kwargs: dict[str, Any] = dict(d_model=D_MODEL, n_heads=N_HEADS, key=jax.random.PRNGKey(0))
    kwargs.update(arguments)
    with pytest.raises(ValueError, match=message):
        ae.presets.omeganet(**kwargs)


def test_wrong_input_shape_is_a_clear_error():
    """A ValueError naming `x` and its shape; under pytest's jaxtyping import hook the
    annotation (x: Float[Array, "T d_model"]) is checked first, a TypeError naming 'x'."""
    named = r"`x` must have shape \(T, d_model=16\)|parameter 'x'"
    layer = ae.presets.deltanet(D_MODEL, N_HEADS, key=jax.random.PRNGKey(0))
    with pytest.raises((ValueError, TypeError), match=named):
        layer(jnp.zeros((2, T, D_MODEL)))
    with pytest.raises((ValueError, TypeError), match=named):
        layer(jnp.zeros((T, 8)))
    mag = ae.presets.mag(D_MODEL, N_HEADS, key=jax.random.PRNGKey(0), attention_window=4)
    with pytest.raises((ValueError, TypeError), match=named):
        mag(jnp.zeros((T, 8)))


# ----------------------------------------------------------------------------------------------
# The hybrids' formulas.


def test_mag_is_the_gated_combination_of_its_branches():
    """MAG (Titans Eqs 26-28, digest A-17): o = W_o(RMSNorm_g1(SWA*(x~)) * sigmoid(RMSNorm_g2(
    M(x~)))), x~ = [p; x]. The memory branch equals one call of the memory layer over the
    concatenation [p; x] (chunk_size 1), restricted to the positions of x."""
    mag = ae.presets.mag(
        D_MODEL,
        N_HEADS,
        key=jax.random.PRNGKey(6),
        chunk_size=1,
        attention_window=3,
        n_persistent=2,
        memory_preset="deltanet",
    )
    assert mag.persistent is not None
    x = np.random.default_rng(7).standard_normal((T, D_MODEL))
    call = eqx.filter_jit(lambda m, x: m(x))
    with_persistent = eqx.tree_at(
        lambda a: a.persistent, mag.attention, mag.persistent, is_leaf=lambda n: n is None
    )
    y = np.asarray(call(with_persistent, x))
    m = np.asarray(call(mag.memory, np.concatenate([np.asarray(mag.persistent), x])))[2:]

    def rms(a, scale):
        return a / np.sqrt(np.mean(a * a, -1, keepdims=True) + 1e-6) * np.asarray(scale)

    gate = 1 / (1 + np.exp(-rms(m, mag.memory_scale)))
    expected = (rms(y, mag.attention_scale) * gate) @ np.asarray(mag.out_proj).T
    assert_close(call(mag, x), expected)
