"""Data- and head-parallel training on 8 fake CPU devices (issue 9).

The sharded computations run in a subprocess (`tests/_mesh_worker.py`, with
`--xla_force_host_platform_device_count=8`) so that every other test keeps one device. The
oracle is the same computation on one device, in float64: the loss and gradients of a batch
split over `"data"` with the heads split over `"heads"`, one AdamW step, and `atlas-eqx train`
with and without `--mesh` (also interrupted on one mesh and resumed on another).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import atlas_eqx as ae
from experiments.training._run import TrainConfig, training_mesh


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def worker() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_mesh_worker.py")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_the_worker_sees_eight_devices(worker):
    assert worker["devices"] == 8
    assert {(r["preset"], r["mesh"]) for r in worker["runs"]} == {
        ("atlas", "data=4,heads=2"),
        ("transformer", "data=4,heads=2"),
        ("transformer", "data=2,heads=4"),
        ("transformer", "data=8"),
    }


def test_sharded_loss_and_gradients_equal_one_device(worker):
    for run in worker["runs"]:
        label = f"{run['preset']} on {run['mesh']}"
        assert run["loss_diff"] <= 1e-12 * max(1.0, run["loss_single"]), label
        assert run["grad_diff"] <= 1e-12 * run["grad_scale"], label
        # One AdamW step (clipping, bias correction, weight decay) on the mesh = on one device.
        assert run["step_param_diff"] <= 1e-12, label
        assert run["step_state_diff"] <= 1e-12, label


def test_parameters_and_optimizer_state_are_sharded_as_declared(worker):
    for run in worker["runs"]:
        label = f"{run['preset']} on {run['mesh']}"
        for tree in ("params", "mu", "nu"):
            placement = run[tree]
            assert all(placement["equivalent"]), (label, tree, placement)
        assert run["count_spec"] == "P()", label
        assert run["embedding_spec"] == "P()", label
        heads = int(run["mesh"].split("heads=")[1]) if "heads=" in run["mesh"] else 1
        data = int(run["mesh"].split("data=")[1].split(",")[0])
        # The batch is split over "data": each device holds B / data sequences.
        assert run["batch"]["shard"] == [8 // data, 8], label
        # Per-head weights are split over "heads" (whole heads per device).
        rows, columns = run["q_proj"]["shape"]
        assert run["q_proj"]["shard"] == [rows // heads, columns], label
        assert run["out_proj"]["shard"][1] == rows // heads, label
        leaf = run["memory_leaf"]
        assert leaf["shard"] == [leaf["shape"][0] // heads, *leaf["shape"][1:]], label
    atlas = next(r for r in worker["runs"] if r["preset"] == "atlas")
    # q, k, v, gate and out projections, 4 gates (weight, bias), norm scale, the stacked
    # MLP memory (2 matrices) and the feature map's coefficients: all over "heads".
    assert atlas["params"]["sharded_over_heads"] >= 12
    assert atlas["memory_leaf"]["shape"][0] == 4  # the memories are stacked over 4 heads


def test_each_device_holds_only_its_own_heads_memories(worker):
    """In the compiled sharded program the stacked memory weights of `atlas` (4 heads) appear
    only at their per-device shape (2 heads on heads=2): no device gathers all the memories,
    so each scans its own heads. The partitioner's collectives are recorded, not fixed."""
    program = worker["atlas_program"]
    assert program["shard_shape_in_program"]
    assert not program["full_shape_in_program"]
    assert program["collectives"]["all-reduce"] >= 1  # the gradient and output reductions


def test_train_command_with_mesh_equals_one_device(worker):
    single, mesh, resumed = (worker["cli"][k] for k in ("single", "mesh", "resumed"))
    for other in (mesh, resumed):
        assert other["step"] == single["step"] == 4
        assert abs(other["loss"] - single["loss"]) <= 1e-12
        assert other["accuracy"] == single["accuracy"]


def test_mesh_errors_name_the_option(worker):
    assert "data=3 x heads=2 = 6 devices, but 8 are available" in worker["bad_product"]
    assert "heads=8 does not divide the 4 heads" in worker["bad_heads"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=4,heads", "AXIS=SIZE"),
        ("data=four", "must be an integer"),
        ("model=2", "unknown axis"),
        ("data=0", "size >= 1"),
        ("data=2,data=2", "given twice"),
    ],
)
def test_parse_mesh_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        ae.parse_mesh(spec)


def test_parse_mesh_sizes_and_device_count():
    assert ae.parse_mesh("data=4,heads=2", 8) == {"data": 4, "heads": 2}
    assert ae.parse_mesh("heads=2") == {"data": 1, "heads": 2}
    assert ae.parse_mesh({"data": 8}, 8) == {"data": 8, "heads": 1}
    with pytest.raises(ValueError, match="product of the axis sizes"):
        ae.parse_mesh("data=4,heads=2", 4)


def test_train_config_checks_the_mesh_against_batch_and_heads():
    with pytest.raises(ValueError, match=r"--mesh data=3\): data=3 does not divide `batch_size`"):
        TrainConfig(mesh="data=3", batch_size=32)
    with pytest.raises(ValueError, match=r"heads=3 does not divide `n_heads`=4"):
        TrainConfig(mesh="heads=3", n_heads=4)
    with pytest.raises(ValueError, match=r"`mesh` \(--mesh\)"):
        TrainConfig(mesh="rows=2")
    # This process has one device: a two-device mesh is refused, naming the option.
    with pytest.raises(SystemExit, match=r"--mesh data=2: .* 1 are available"):
        training_mesh(TrainConfig(mesh="data=2"))
    assert training_mesh(TrainConfig()) is None
