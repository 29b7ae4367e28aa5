"""The README's "A new update rule in 30 lines", executed: its module is written to disk, its
Python runs, and its command lines run through the CLI at a smaller size (flags appended to
each line override the README's defaults, as later flags do)."""

import json
import pathlib
import re
import shlex
import sys

import numpy as np
import pytest

from experiments.cli import main


README = pathlib.Path(__file__).parent.parent / "README.md"
SECTION = "## A new update rule in 30 lines"
SMALL = ["--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--seq-len", "16"]
SMALL += ["--num-kv-pairs", "2", "--vocab-size", "32", "--num-train", "64", "--num-test", "32"]
SMALL += ["--batch-size", "8", "--steps", "2", "--eval-every", "0", "--no-progress"]


def _section_blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end], flags=re.DOTALL)


def test_the_new_rule_section_runs(tmp_path, monkeypatch, capsys):
    blocks = _section_blocks()
    assert [language for language, _ in blocks] == ["python", "python", "bash"]
    module, usage, commands = (code for _, code in blocks)
    assert len(module.strip().splitlines()) <= 30
    (tmp_path / "my_rule.py").write_text(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rule", raising=False)

    namespace: dict = {}
    exec(compile(usage, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (16, 64)
    assert np.all(np.isfinite(namespace["logits"]))

    evaluations = {}
    for line in commands.strip().splitlines():
        argv = shlex.split(line)
        if argv[0].startswith("PYTHONPATH="):
            argv = argv[1:]  # tmp_path, where my_rule.py lives, is on sys.path already
        assert argv[0] == "atlas-eqx"
        argv = argv[1:]
        if argv[0] == "train":
            assert main([*argv, *SMALL]) == 0
        else:
            capsys.readouterr()
            assert main(argv) == 0
            evaluations[argv[1]] = json.loads(capsys.readouterr().out)
    assert set(evaluations) == {"runs/my-rule", "runs/titans"}
    for result in evaluations.values():
        assert 0.0 <= result["accuracy"] <= 1.0 and np.isfinite(result["loss"])
    # The rule's run really used the rule: its config names the parts.
    saved = json.loads((tmp_path / "runs/my-rule/config.json").read_text())
    assert json.loads(saved["preset_options"])["memory"] == "my_rule:LowRankMemory"
    assert evaluations["runs/my-rule"]["loss"] != pytest.approx(
        evaluations["runs/titans"]["loss"], rel=1e-9
    )
