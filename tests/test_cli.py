"""The command line: configs from flags and files, clear errors, a train/eval round trip."""

import argparse
import json
import re

import jax
import numpy as np
import pytest

import atlas_eqx as ae
from experiments.cli import build_parser, main
from experiments.training import _train
from experiments.training._config import add_config_arguments, config_from_args
from experiments.training._run import TrainConfig
from experiments.training._train import CheckpointError


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig, {})
    return parser.parse_args(argv)


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"preset": "titans", "d_model": 32, "lr": 0.5}))
    config = config_from_args(TrainConfig, _parse(["--config", str(path), "--lr", "0.25"]))
    assert (config.preset, config.d_model, config.lr) == ("titans", 32, 0.25)
    assert config.n_layers == TrainConfig().n_layers


def test_unknown_file_field_and_bad_values_are_clear_errors(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"d_modle": 32}))
    with pytest.raises(SystemExit, match="unknown field.*d_modle"):
        config_from_args(TrainConfig, _parse(["--config", str(path)]))
    with pytest.raises(SystemExit, match="unknown `preset` 'atlass'"):
        config_from_args(TrainConfig, _parse(["--preset", "atlass"]))
    with pytest.raises(SystemExit, match="impossible dims"):
        config_from_args(TrainConfig, _parse(["--d-model", "30", "--n-heads", "4"]))
    with pytest.raises(SystemExit, match="preset_options"):
        config_from_args(TrainConfig, _parse(["--preset-options", "[1]"]))


def test_every_subcommand_has_help():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    choices: dict[str, argparse.ArgumentParser] = dict(commands.choices)
    assert set(choices) >= {"quickstart", "train", "eval", "bench", "plot", "data", "params"}
    for name, sub in choices.items():
        assert sub.format_help(), name


def test_train_then_eval_reproduces_the_final_evaluation(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--preset", "transformer", "--d-model", "16", "--n-heads", "2", "--n-layers", "1"]
    common += ["--seq-len", "16", "--num-kv-pairs", "2", "--vocab-size", "32"]
    common += ["--num-train", "64", "--num-test", "32", "--batch-size", "16"]
    argv = ["train", *common, "--steps", "3", "--eval-every", "0", "--out-dir", str(run)]
    assert main([*argv, "--no-progress"]) == 0
    trained = json.loads((run / "eval.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["step"] == 3
    assert evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-12)
    assert evaluated["accuracy"] == trained["accuracy"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    # The same directory with another config is refused rather than silently mixed, naming
    # what differs.
    with pytest.raises(SystemExit, match=r"another config \(lr: 0.01 -> 0.5\)"):
        main(["train", *common, "--lr", "0.5", "--out-dir", str(run), "--no-progress"])
    # --steps extends a finished run: steps 4 and 5 are added to the log.
    assert main(["train", *common, "--steps", "5", "--out-dir", str(run), "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 5


SMALL = ["--preset", "transformer", "--d-model", "16", "--n-heads", "2", "--n-layers", "1"]
SMALL += ["--seq-len", "16", "--num-kv-pairs", "2", "--vocab-size", "32", "--num-train", "64"]
SMALL += ["--num-test", "32", "--batch-size", "8", "--eval-every", "0", "--no-progress"]


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    cases = [
        (["train", "--steps", "0"], "`steps` must be >= 1; got 0"),
        (["train", "--batch-size", "0"], "`batch_size` must be >= 1; got 0"),
        (["train", "--config", str(tmp_path / "missing.json")], "missing.json: no such file"),
        (["train", "--config", str(broken)], "broken.json is not valid JSON"),
        (["eval", str(tmp_path / "nowhere")], "nowhere is not a run directory"),
        (["plot", str(tmp_path / "none.jsonl"), "--out", "x.png"], "none.jsonl: no such file"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=re.escape(message)):
            main(argv)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no record with 'loss'"):
        main(["plot", str(empty), "--out", str(tmp_path / "empty.png")])
    assert not (tmp_path / "empty.png").exists()


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "flipped"])
def test_a_damaged_checkpoint_is_named_with_how_to_recover(tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "2", "--out-dir", str(run)]) == 0
    checkpoint = run / "checkpoint.eqx"
    data = checkpoint.read_bytes()
    if damage == "truncated":
        checkpoint.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        checkpoint.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif damage == "empty":
        checkpoint.write_bytes(b"")
    else:  # one byte of the payload altered; the header still parses
        position = len(data) - 10
        checkpoint.write_bytes(data[:position] + bytes([data[position] ^ 1]) + data[position + 1 :])
    capsys.readouterr()
    assert main(["eval", str(run)]) == 1
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert str(checkpoint) in error and f"delete {checkpoint}" in error
    with pytest.raises(CheckpointError, match=re.escape(str(checkpoint))):
        main(["--debug", "eval", str(run)])


def test_a_run_that_never_checkpointed_takes_a_new_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"lr": 99.0}))  # e.g. diverged at once
    assert main(["train", *SMALL, "--steps", "2", "--out-dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["lr"] == 0.01


def test_the_progress_bar_counts_every_step(monkeypatch):
    counts: list[int] = []

    class Recording(_train.tqdm):
        def update(self, n=1):
            result = super().update(n)
            counts.append(self.n)
            return result

    monkeypatch.setattr(_train, "tqdm", Recording)
    batch = (np.zeros((2, 4), np.int32), np.zeros((2, 4), np.int32))
    model = ae.LanguageModel(8, 8, 1, 2, key=jax.random.key(0), mixer="transformer")
    _train.train(model, lambda step: batch, steps=5, progress=True, stop_after=3)
    assert counts == [1, 2, 3]
