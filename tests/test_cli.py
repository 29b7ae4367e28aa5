"""The command line: configs from flags and files, clear errors, a train/eval round trip."""

import argparse
import json

import pytest

from experiments._cli import build_parser, main
from experiments._config import add_config_arguments, config_from_args
from experiments._run import TrainConfig


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
    # The same directory with another config is refused rather than silently mixed.
    with pytest.raises(SystemExit, match="another config"):
        main(["train", *common, "--steps", "5", "--out-dir", str(run), "--no-progress"])
