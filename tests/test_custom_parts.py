"""A researcher's own memory, feature map, objective and inner learner above `omega_scan`:
in `MemoryLayerConfig`, the presets, `LanguageModel` and the command line, as objects and as
import paths. Objects equal to a built-in name compute exactly what the name does.

Sizes: d_model 16, 2 heads (head_dim 8), T = 8; float64 (tests/conftest.py).
"""

import dataclasses
import functools
import json

import _custom_parts as custom
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxtyping import TypeCheckError

import atlas_eqx as ae
import feature_maps as fm
import optimizers as iopt
from experiments.cli import main


D_MODEL, N_HEADS, T = 16, 2, 8
KEY = jax.random.key(0)


def sequence(seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((T, D_MODEL)))


def layer(**fields) -> ae.MemoryLayer:
    config = ae.MemoryLayerConfig(D_MODEL, N_HEADS, chunk_size=4, **fields)
    return ae.MemoryLayer(config, key=KEY)


def assert_same_model(a: eqx.Module, b: eqx.Module, x: jax.Array) -> None:
    """Equal parameters leaf by leaf, and equal outputs, to the last bit."""
    leaves_a = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    leaves_b = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    assert len(leaves_a) == len(leaves_b)
    for leaf_a, leaf_b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(leaf_a, leaf_b)
    np.testing.assert_array_equal(a(x), b(x))  # pyright: ignore[reportCallIssue]


@pytest.mark.parametrize(
    "named, given",
    [
        (dict(memory="linear"), dict(memory=ae.LinearMemory)),
        (dict(objective="l2"), dict(objective=ae.l2)),
        (dict(objective="huber"), dict(objective=ae.huber())),
        (dict(objective="lp", optimizer="gd"), dict(objective=ae.lp(), optimizer=iopt.gd())),
        (dict(optimizer="momentum"), dict(optimizer=iopt.momentum())),
        (dict(optimizer="muon"), dict(optimizer=iopt.muon())),
        (
            dict(feature_map="elementwise", feature_include_constant=False),
            dict(feature_map=fm.Elementwise(2, learnable=True, include_constant=False)),
        ),
        (dict(feature_map="identity"), dict(feature_map=fm.Identity())),
    ],
)
def test_objects_equal_to_the_defaults_compute_the_same_layer(named, given):
    base = dict(memory="mlp", optimizer="gd")
    assert_same_model(layer(**{**base, **named}), layer(**{**base, **given}), sequence())


@pytest.mark.parametrize(
    "preset, given",
    [
        ("titans", dict(optimizer=iopt.momentum(), objective=ae.l2)),
        # deltanet starts from W_0 = 0 (memory_init_std=0.0, which configures built-ins only)
        ("deltanet", dict(memory=functools.partial(ae.LinearMemory, init_std=0.0))),
        ("deltanet", dict(feature_map=fm.Identity())),
        ("atlas", dict(optimizer=iopt.muon())),
    ],
)
def test_presets_take_objects_equal_to_their_defaults(preset, given):
    factory = getattr(ae.presets, preset)
    named = factory(D_MODEL, N_HEADS, key=KEY)
    objects = factory(D_MODEL, N_HEADS, key=KEY, **given)
    assert objects.config.lr_max == named.config.lr_max
    assert_same_model(named, objects, sequence())


def test_import_paths_equal_the_objects_they_name():
    paths = dict(
        memory="_custom_parts:LowRankMemory",
        feature_map="_custom_parts:SignedSquare",
        objective="_custom_parts:log_cosh",
        optimizer="_custom_parts:sgd_momentum",
        method="sequential",
    )
    objects = dict(
        memory=custom.LowRankMemory,
        feature_map=custom.SignedSquare(),
        objective=custom.log_cosh,
        optimizer=custom.sgd_momentum(),
        method="sequential",
    )
    by_path, by_object = layer(**paths), layer(**objects)
    x = sequence()
    np.testing.assert_array_equal(by_path(x), by_object(x))
    # The config keeps the string: it stays JSON-serialisable.
    json.dumps(
        {f.name: getattr(by_path.config, f.name) for f in dataclasses.fields(by_path.config)}
    )


def test_configs_with_objects_hash_and_compare_by_value():
    a = ae.MemoryLayerConfig(D_MODEL, N_HEADS, feature_map=custom.SignedSquare(0.5))
    b = ae.MemoryLayerConfig(D_MODEL, N_HEADS, feature_map=custom.SignedSquare(0.5))
    c = ae.MemoryLayerConfig(D_MODEL, N_HEADS, feature_map=custom.SignedSquare(0.25))
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert dataclasses.replace(a, chunk_size=4) != a
    # A static field: two layers with equal configs share one compiled program.
    traces = []

    @eqx.filter_jit
    def run(model, x):
        traces.append(None)
        return model(x)

    x = sequence()
    run(ae.MemoryLayer(a, key=KEY), x)
    run(ae.MemoryLayer(b, key=jax.random.key(1)), x)
    assert len(traces) == 1


def _custom_model(key=KEY, optimizer=iopt.momentum()) -> ae.LanguageModel:
    options = dict(
        memory=custom.LowRankMemory,
        feature_map=custom.SignedSquare(),
        objective=custom.log_cosh,
        optimizer=optimizer,
        chunk_size=4,
    )
    return ae.LanguageModel(32, D_MODEL, 1, N_HEADS, key=key, mixer="titans", mixer_options=options)


@pytest.mark.parametrize(
    "optimizer",
    [iopt.momentum(), iopt.from_optax(optax.adam(1e-2)), custom.sgd_momentum()],
    ids=["momentum", "optax_adam", "optax_sgd_momentum"],
)
def test_custom_parts_reach_a_language_model_with_finite_nonzero_gradients(optimizer):
    model = _custom_model(optimizer=optimizer)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, T + 1)))

    def loss(model):
        logits = jax.vmap(model)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    grads = eqx.filter_grad(loss)(model)
    mixer = grads.blocks[0].mixer
    for name, part in (("memory", mixer.memory), ("feature_map", mixer.feature_map)):
        leaves = jax.tree.leaves(eqx.filter(part, eqx.is_array))
        assert leaves, name
        for leaf in leaves:
            assert np.all(np.isfinite(leaf)), name
            assert np.any(leaf != 0), name
    for leaf in jax.tree.leaves(eqx.filter(grads, eqx.is_array)):
        assert np.all(np.isfinite(leaf))


def test_custom_parts_survive_a_checkpoint_round_trip(tmp_path):
    model = _custom_model()
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, model)
    like = _custom_model(jax.random.key(7))
    restored = eqx.tree_deserialise_leaves(path, like)
    tokens = jnp.arange(T) % 32
    np.testing.assert_array_equal(restored(tokens), model(tokens))


def test_optax_learners_in_a_layer_and_their_errors():
    x = sequence()
    adam = iopt.from_optax(optax.adam(1e-2))
    by_default = layer(memory="linear", optimizer=adam)
    sequential = layer(memory="linear", optimizer=adam, method="sequential")
    assert by_default.config.scan_method == "sequential"  # adam has no chunked form
    np.testing.assert_array_equal(by_default(x), sequential(x))
    sgd = layer(memory="linear", optimizer=iopt.from_optax(optax.sgd(0.5, momentum=0.5)))
    assert sgd.config.scan_method == "chunked"
    np.testing.assert_allclose(
        sgd(x),
        layer(memory="linear", optimizer=sgd.config.optimizer, method="sequential")(x),
        rtol=0,
        atol=1e-10,
    )
    with pytest.raises(ValueError, match="from_optax"):
        layer(optimizer=optax.adam(1e-2))
    memory = ae.LinearMemory(8, 8, key=KEY)
    q = jnp.ones((T, 8))
    with pytest.raises(TypeError, match=r"wrap it: optimizer=optimizers.from_optax"):
        ae.omega_scan(memory, q, q, q, jnp.full(T, 0.1), jnp.ones(T), optimizer=optax.sgd(1.0))


def test_bad_parts_are_clear_errors():
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        layer(memory="no_such_module:Memory")
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        layer(objective="_custom_parts:Missing")
    # Under the test suite's jaxtyping import hook the annotation check speaks first.
    with pytest.raises((ValueError, TypeCheckError), match="feature_map"):
        layer(feature_map=3)

    def wrong_width(d_in, d_out, *, key):
        return ae.LinearMemory(d_in, d_out + 1, key=key)

    with pytest.raises(ValueError, match="returned a memory with d_in=.*d_out=9"):
        layer(memory=wrong_width)
    with pytest.raises(ValueError, match="memory='kernel' has two rules"):
        ae.MemoryLayerConfig(D_MODEL, N_HEADS, memory="kernel", objective=ae.l2)


def test_abstract_mixer_is_exported():
    assert issubclass(ae.MemoryLayer, ae.AbstractMixer)
    assert issubclass(ae.AttentionLayer, ae.AbstractMixer)


def test_the_command_line_trains_a_custom_memory_named_by_import_path(tmp_path, capsys):
    run = tmp_path / "run"
    options = {"memory": "_custom_parts:LowRankMemory", "objective": "_custom_parts:log_cosh"}
    config = tmp_path / "config.json"  # a config file may give preset_options as an object
    config.write_text(json.dumps({"preset": "titans", "preset_options": options}))
    argv = ["train", "--config", str(config)]
    argv += ["--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--seq-len", "16"]
    argv += ["--num-kv-pairs", "2", "--vocab-size", "32", "--num-train", "64"]
    argv += ["--num-test", "32", "--batch-size", "8", "--steps", "2", "--eval-every", "0"]
    assert main([*argv, "--out-dir", str(run), "--no-progress"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert json.loads(saved["preset_options"]) == options
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["loss"] == pytest.approx(json.loads((run / "eval.json").read_text())["loss"])
