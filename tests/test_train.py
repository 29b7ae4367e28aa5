"""The training loop: schedule, loss, weight-decay mask, learning, and exact resume."""

import dataclasses
import json
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import atlas_eqx as ae
from experiments.training._train import (
    IGNORE_INDEX,
    load_checkpoint,
    make_optimizer,
    make_train_step,
    masked_cross_entropy,
    OptimConfig,
    save_checkpoint,
    train,
    TrainingDiverged,
    weight_decay_mask,
)


VOCAB, T, BATCH = 16, 8, 4


def _model(seed: int = 0):
    return ae.LanguageModel(
        VOCAB,
        8,
        1,
        2,
        key=jax.random.key(seed),
        mixer="transformer",
    )


def _batch_fn(step: int):
    rng = np.random.default_rng(1000 + step)
    tokens = rng.integers(0, VOCAB, (BATCH, T + 1))
    targets = tokens[:, 1:].copy()
    targets[:, : T // 2] = IGNORE_INDEX
    return tokens[:, :-1].astype(np.int32), targets.astype(np.int32)


def test_schedule_is_warmup_then_cosine():
    config = OptimConfig(lr=1e-2, warmup_steps=4, final_lr_fraction=0.1, weight_decay=0.0)
    total = 20
    optimizer = make_optimizer(config, total)
    params = {"w": jnp.zeros(())}
    state = optimizer.init(params)
    lrs = []
    for _ in range(total):
        # With b1 = b2 and a constant unit gradient, Adam's normalised step is exactly 1, so
        # the update is -lr(step).
        updates, state = optimizer.update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(cast(dict[str, Any], updates)["w"]))
    expected = []
    for s in range(total):
        if s < 4:
            expected.append(1e-2 * s / 4)
        else:
            progress = (s - 4) / (total - 4)
            expected.append(1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + np.cos(np.pi * progress)))
    np.testing.assert_allclose(lrs, expected, rtol=1e-4, atol=1e-9)


def test_weight_decay_only_on_matrices():
    config = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, final_lr_fraction=1.0)
    optimizer = make_optimizer(config, 10)
    params = {"matrix": jnp.ones((2, 3)), "vector": jnp.ones((3,))}
    state = optimizer.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, state, params)
    updates = cast(dict[str, Any], updates)
    np.testing.assert_allclose(updates["matrix"], -0.1 * 0.5 * np.ones((2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(updates["vector"], np.zeros(3))


def test_one_compiled_step_serves_every_learning_rate():
    """The peak rate is optimizer state: two rates share one compiled step (one trace), and
    each step equals a plain optax AdamW on the same schedule at that rate."""
    params = eqx.filter(_model(), eqx.is_inexact_array)
    base = OptimConfig(lr=1e-2, warmup_steps=0, final_lr_fraction=1.0, clip_norm=1e9)
    assert make_train_step(base, 10) is make_train_step(dataclasses.replace(base, lr=3e-2), 10)
    gradients = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    traces = []

    @jax.jit
    def update(state):
        traces.append(1)
        return make_optimizer(base, 10).update(gradients, state, params)

    for lr in (1e-2, 3e-2):
        state = make_optimizer(dataclasses.replace(base, lr=lr), 10).init(params)
        updates, _ = update(state)
        plain = optax.adamw(lr, b1=base.b1, b2=base.b2, weight_decay=base.weight_decay,
                            mask=weight_decay_mask)  # fmt: skip
        expected, _ = plain.update(gradients, plain.init(params), params)
        for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert len(traces) == 1


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7))
    targets = rng.integers(0, 7, (2, 5))
    targets[0, :2] = IGNORE_INDEX
    total, count, correct = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    scored = targets != IGNORE_INDEX
    expected = -sum(
        log_probs[b, t, targets[b, t]] for b in range(2) for t in range(5) if scored[b, t]
    )
    np.testing.assert_allclose(float(total), expected, rtol=1e-10)
    assert int(count) == scored.sum()
    assert int(correct) == int(np.sum((logits.argmax(-1) == targets) & scored))


def test_training_lowers_the_loss_on_a_fixed_batch():
    fixed = _batch_fn(0)
    result = train(
        _model(),
        lambda step: fixed,
        steps=30,
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        progress=False,
    )
    losses = [record["loss"] for record in result.history]
    assert losses[-1] < 0.7 * losses[0]


def test_resume_gives_exactly_the_same_parameters(tmp_path):
    optim = OptimConfig(lr=5e-3, warmup_steps=2)
    straight = train(_model(), _batch_fn, steps=6, optim=optim, progress=False)

    checkpoint = tmp_path / "run.eqx"
    log = tmp_path / "metrics.jsonl"
    common: dict[str, Any] = dict(
        steps=6,
        optim=optim,
        progress=False,
        checkpoint_path=checkpoint,
        checkpoint_every=3,
        log_path=log,
    )
    interrupted = train(_model(), _batch_fn, stop_after=3, **common)
    assert len(interrupted.history) == 3
    resumed = train(_model(seed=99), _batch_fn, **common)  # weights come from the checkpoint
    assert [r["step"] for r in resumed.history] == [4, 5, 6]

    for a, b in zip(
        jax.tree.leaves(eqx.filter(straight.model, eqx.is_inexact_array)),
        jax.tree.leaves(eqx.filter(resumed.model, eqx.is_inexact_array)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        [r["loss"] for r in straight.history[3:]], [r["loss"] for r in resumed.history]
    )
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_round_trip(tmp_path):
    model = _model()
    optimizer = make_optimizer(OptimConfig(), 5)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    save_checkpoint(tmp_path / "c.eqx", model, opt_state, 17)
    loaded, _, step = load_checkpoint(tmp_path / "c.eqx", _model(seed=3), opt_state)
    assert step == 17
    tokens = jnp.arange(T) % VOCAB
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(loaded(tokens)))


def test_bad_optim_config_names_the_field():
    with pytest.raises(ValueError, match="`lr`"):
        OptimConfig(lr=0.0)
    with pytest.raises(ValueError, match="`final_lr_fraction`"):
        OptimConfig(final_lr_fraction=2.0)


def test_a_non_finite_loss_stops_training_with_a_clear_error():
    """A model whose loss is NaN (here a NaN embedding row) must not train on silently; an
    out-of-range token is an error under jit before it reaches the loss."""
    model = _model()
    poisoned = eqx.tree_at(lambda m: m.embedding, model, model.embedding.at[0].set(jnp.nan))

    def zero_first(step: int):
        inputs, targets = _batch_fn(step)
        inputs = inputs.copy()
        inputs[0, 0] = 0
        return inputs, targets

    with pytest.raises(TrainingDiverged, match="loss is nan at step 1") as raised:
        train(poisoned, zero_first, steps=2, progress=False)
    assert raised.value.step == 1
    record = TrainingDiverged("x", 7, [dict(step=4.0, accuracy=0.5)]).record("accuracy", 2.0)
    assert record == dict(diverged_at=7, validation=0.0, test=0.0, curve=[(4, 0.5)], seconds=2.0)

    def bad_batch(step: int):
        inputs, targets = _batch_fn(step)
        inputs = inputs.copy()
        inputs[0, 0] = VOCAB + 3
        return inputs, targets

    with pytest.raises(eqx.EquinoxRuntimeError, match=r"must lie in \[0, vocab_size"):
        train(model, bad_batch, steps=2, progress=False)
