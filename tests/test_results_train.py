"""The results commands that need outer training (`atlas-eqx results mqar-state | lm |
niah-extrapolate`): their metrics on hand-computed cases, and each command's `--quick` run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import s_niah
from experiments.cli import main
from experiments.studies import _lm as lm, _niah_extrapolate as niah, _trained_results as trained
from experiments.studies._registry import RESULTS
from experiments.training._train import evaluate, IGNORE_INDEX


def test_bits_per_byte_is_mean_nll_over_ln2():
    # Four bytes, each predicted with probability 1/4: ln 4 nats = 2 bits each.
    assert trained.bits_per_byte(4 * math.log(4.0), 4) == pytest.approx(2.0, rel=1e-15)
    assert trained.bits_per_byte(math.log(2.0), 1) == pytest.approx(1.0, rel=1e-15)
    with pytest.raises(ValueError, match="num_bytes"):
        trained.bits_per_byte(1.0, 0)


def test_a_uniform_byte_model_scores_eight_bits_per_byte():
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, size=(3, 5)).astype(np.int32)
    targets = rng.integers(0, 256, size=(3, 5)).astype(np.int32)
    targets[0, :2] = IGNORE_INDEX  # unscored positions do not count

    def uniform(tokens):
        return jnp.zeros((tokens.shape[0], 256))

    metrics = evaluate(uniform, [(inputs, targets)])
    assert metrics["bits_per_token"] == pytest.approx(8.0, rel=1e-12)
    count = int(np.sum(targets != IGNORE_INDEX))
    assert trained.bits_per_byte(metrics["loss"] * count, count) == pytest.approx(8.0, rel=1e-12)


def test_answer_exact_match_by_hand():
    targets = jnp.array(
        [
            [IGNORE_INDEX, 2, 1, IGNORE_INDEX],
            [IGNORE_INDEX, 0, 3, IGNORE_INDEX],
            [IGNORE_INDEX] * 4,
        ]
    )
    predicted = jnp.array([[3, 2, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]])  # row 1: one byte wrong
    logits = jax.nn.one_hot(predicted, 4)
    assert trained.answer_exact_match(logits, targets).tolist() == [True, False, True]


def test_exact_match_and_byte_accuracy_on_s_niah_with_a_copying_model():
    # A (non-causal) model that predicts the next *input* byte is right on every answer byte
    # but the last (after it the input is padding): byte accuracy 6/7, exact match 0. With
    # the targets themselves as logits both are 1.
    task = s_niah(4, 512, "pk", seed=0)
    batches = [(task.inputs, task.targets)]

    def copy_next(tokens):
        return jax.nn.one_hot(jnp.roll(tokens, -1), 256)

    assert evaluate(copy_next, batches)["accuracy"] == pytest.approx(6 / 7, rel=1e-12)
    assert trained.exact_match_rate(copy_next, batches) == 0.0
    oracle = jax.nn.one_hot(jnp.where(task.targets == IGNORE_INDEX, 0, task.targets), 256)
    assert bool(jnp.all(trained.answer_exact_match(oracle, jnp.asarray(task.targets))))


def test_next_byte_targets_extend_the_answer_targets_to_every_byte():
    task = s_niah(3, 600, "pk", seed=1)
    full = niah.next_byte_targets(task)
    scored = task.targets != IGNORE_INDEX
    np.testing.assert_array_equal(full[scored], task.targets[scored])
    for row, n in enumerate(task.metadata["lengths"]):
        np.testing.assert_array_equal(full[row, : n - 1], task.inputs[row, 1:n])
        assert full[row, n - 1] == task.targets[row, n - 1] != IGNORE_INDEX
        assert np.all(full[row, n:] == IGNORE_INDEX)
    assert min(task.metadata["lengths"]) < 600  # padding exists, so that branch is exercised


def test_registry_names(capsys):
    assert {"mqar-state", "lm", "niah-extrapolate"} <= set(RESULTS)
    with pytest.raises(SystemExit):
        main(["results", "no-such-result", "--quick", "--no-progress"])
    assert "invalid choice: 'no-such-result'" in capsys.readouterr().err


def test_lm_variants_are_one_change_each_to_atlas():
    variants = {name: (preset, options) for name, preset, options in lm.LM_VARIANTS}
    atlas = dict(variants["atlas"][1])
    for name, change in [
        ("atlas w/o Muon (GD + momentum)", {"optimizer": "momentum"}),
        ("atlas c = 1", {"window": 1}),
        ("atlas w/o polynomial map (identity phi)", {"feature_map": "identity"}),
        ("atlas linear memory", {"memory": "linear"}),
    ]:
        preset, options = variants[name]
        assert preset == "atlas"
        assert {k: v for k, v in options.items() if k not in change} == {
            k: v for k, v in atlas.items() if k not in change and k in options
        }
        assert all(options[k] == v for k, v in change.items())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mqar-state", "lm", "niah-extrapolate"])
def test_quick_command_writes_its_files(name, tmp_path, monkeypatch, capsys):
    # Without a fetched corpus the LM result falls back to the shipped excerpt, and says so.
    monkeypatch.setattr(lm, "default_cache_dir", lambda: tmp_path / "no-corpus")
    out = tmp_path / name
    assert main(["results", name, "--quick", "--no-progress", "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    assert f"atlas-eqx results {name} --out {out} --quick" in text
    assert "## Against the paper" in text
    assert "|---|" in text
    pngs = list(out.glob("*.png"))
    pytest.importorskip("matplotlib")
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000
    if name == "lm":
        assert "shipped 28 KB excerpt" in text
