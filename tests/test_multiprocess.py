"""Training across processes on this machine (issue 23): `atlas-eqx launch -n 2 train` against
one process, resuming across a change in process count, the launcher's failure handling and
the process flags' errors.

Each run is a fresh `python -m experiments` process (float32, the default), so that
`jax.distributed` starts before any JAX computation; the oracle is the same run in one
process. Two processes differ from one only in the order of floating-point sums (the gradient
all-reduce over gloo), so losses agree to 1e-6, not bit for bit.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.cli import main
from experiments.cli._launch import launch


ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 5
TINY = ["--preset", "deltanet", "--task", "mqar", "--d-model", "16", "--n-layers", "1"]
TINY += ["--n-heads", "2", "--batch-size", "4", "--num-train", "64", "--num-test", "8"]
TINY += ["--steps", str(STEPS), "--eval-every", "0", "--no-progress"]


def _atlas_eqx(*argv: str, devices: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if devices > 1:
        flag = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "experiments", *argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _train(
    run: pathlib.Path, processes: int, *extra: str, devices: int = 1
) -> subprocess.CompletedProcess:
    argv = ["train", *TINY, "--out-dir", str(run), *extra]
    if processes > 1:
        argv = ["launch", "-n", str(processes), *argv]
    return _atlas_eqx(*argv, devices=devices)


def _losses(run: pathlib.Path) -> tuple[list[int], np.ndarray]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return [r["step"] for r in steps], np.array([r["loss"] for r in steps])


def _final_eval(run: pathlib.Path) -> float:
    return json.loads((run / "eval.json").read_text())["loss"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> pathlib.Path:
    run = tmp_path_factory.mktemp("one") / "run"
    _train(run, 1)
    return run


@pytest.mark.slow  # three fresh JAX processes (~25 s on idle cores): CI runs it with the slow tests
def test_two_processes_match_one_process(one_process, tmp_path):
    run = tmp_path / "two"
    done = _train(run, 2)
    steps, losses = _losses(run)
    # Process 0 alone wrote the log: each step once.
    assert steps == list(range(1, STEPS + 1)) == _losses(one_process)[0]
    np.testing.assert_allclose(losses, _losses(one_process)[1], rtol=0, atol=1e-6)
    assert abs(_final_eval(run) - _final_eval(one_process)) <= 1e-6
    assert json.loads((run / "config.json").read_text())["num_processes"] == 2
    # Only process 0 prints the final metrics; the launcher prefixes each process's lines.
    printed = [line for line in done.stdout.splitlines() if line.endswith("{")]
    assert printed == ["[0] {"]


@pytest.mark.slow
def test_resume_across_a_change_in_process_count(one_process, tmp_path):
    # 2 processes for steps 1-2, 1 process for steps 3-4, then step 5 on 2 processes of 2
    # devices each with the heads split within each process.
    run = tmp_path / "changing"
    _train(run, 2, "--stop-after", "2")
    _train(run, 1, "--stop-after", "4")
    _train(run, 2, "--mesh", "data=2,heads=2", devices=2)
    steps, losses = _losses(run)
    assert steps == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, _losses(one_process)[1], rtol=0, atol=1e-6)
    assert abs(_final_eval(run) - _final_eval(one_process)) <= 1e-6
    # The checkpoint gathered from the head-split arrays of both processes holds that model.
    evaluated = json.loads(_atlas_eqx("eval", str(run)).stdout)
    assert evaluated["step"] == STEPS
    assert abs(evaluated["loss"] - _final_eval(run)) <= 1e-6


def test_the_launcher_stops_the_others_when_one_fails(capsys):
    waits = [sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(120)"]
    fails = [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(3)"]
    start = time.perf_counter()
    assert launch([waits, fails]) == 3
    assert time.perf_counter() - start < 60  # the waiting child was stopped, not waited for
    captured = capsys.readouterr()
    assert "[0] waiting" in captured.out.splitlines()
    assert "process 1 exited with status 3; stopping the others" in captured.err


def test_the_launcher_relays_and_succeeds_when_all_succeed(capsys):
    says = [[sys.executable, "-c", f"print('hello from {i}')"] for i in range(3)]
    assert launch(says) == 0
    assert sorted(capsys.readouterr().out.splitlines()) == [
        f"[{i}] hello from {i}" for i in range(3)
    ]


def test_a_failing_train_fails_the_launch(capsys):
    assert main(["launch", "-n", "2", "train", "--d-model", "15", "--n-heads", "4"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"\[[01]\] .*impossible dims", err)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-processes", "0"], "`num_processes` must be >= 1; got 0"),
        (
            ["--num-processes", "2", "--process-id", "2", "--coordinator", "127.0.0.1:1234"],
            "`process_id` must lie in [0, num_processes) = [0, 2); got 2",
        ),
        (["--process-id", "-1"], "`process_id` must lie in [0, num_processes) = [0, 1); got -1"),
        (["--num-processes", "2"], "`num_processes`=2 needs `coordinator`"),
        (["--num-processes", "2", "--coordinator", "node0"], "expected HOST:PORT"),
        (["--num-processes", "2", "--coordinator", "node0:http"], "must be an integer"),
        (["--num-processes", "2", "--coordinator", "node0:70000"], "must lie in [1, 65535]"),
        (["--coordinator", "127.0.0.1:1234"], "only used with `num_processes` > 1"),
        (
            ["--num-processes", "3", "--coordinator", "h:1", "--batch-size", "4"],
            "`batch_size`=4 must be a multiple of `num_processes`=3",
        ),
        (
            ["--num-processes", "2", "--coordinator", "h:1", "--mesh", "heads=2"],
            "data=1 must be a multiple of `num_processes`=2",
        ),
    ],
)
def test_bad_process_flags_are_clear_errors(flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["train", *flags])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["launch", "-n", "0", "train"], "-n must be >= 1; got 0"),
        (["launch", "-n", "2"], "name the subcommand to run"),
        (["launch", "-n", "2", "eval", "runs/x"], "only `train` runs across processes"),
        (
            ["launch", "-n", "2", "train", "--process-id", "1"],
            "the launcher sets --process-id itself",
        ),
        (
            ["launch", "-n", "2", "train", "--coordinator=h:1"],
            "the launcher sets --coordinator itself",
        ),
    ],
)
def test_bad_launch_lines_are_clear_errors(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(argv)
