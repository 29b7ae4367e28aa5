"""`atlas-eqx bench peers` (issue 8): the cross-check against titans-pytorch and fla, the
message when the peers are missing, and the logic of the report. Speed is never asserted."""

import importlib.util
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import (
    _cross_check as cross_check,
    _op_profile as op_profile,
    _peer_packages as packages,
    _peers_measure as measure,
    _peers_report as report,
    _peers_runs as runs,
    _subprocess as sub,
)
from experiments.cli import main


def _hide_peers(monkeypatch):
    # A None entry in sys.modules makes `import torch` raise ModuleNotFoundError.
    for name in ("torch", "titans_pytorch"):
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_peers_say_what_to_install(monkeypatch):
    _hide_peers(monkeypatch)
    with pytest.raises(packages.PeersMissing) as error:
        packages.require_peers()
    message = str(error.value)
    assert "missing: torch" in message
    for needed in ("pip install 'atlas-eqx[bench]'", "torch==2.13.0", "titans-pytorch==0.5.5"):
        assert needed in message
    with pytest.raises(SystemExit, match=r"torch==2\.13\.0.*titans-pytorch==0\.5\.5"):
        main(["bench", "peers", "--quick", "--out-dir", "unused"])


def test_bench_extra_pins_the_versions_the_message_names():
    import tomllib

    with open("pyproject.toml", "rb") as file:
        extra = tomllib.load(file)["project"]["optional-dependencies"]["bench"]
    assert f"torch=={packages.TORCH_VERSION}" in extra
    assert f"titans-pytorch=={packages.TITANS_VERSION}" in extra
    assert f"fla-core=={packages.FLA_CORE_VERSION}" in extra


def _check(rows):
    assert rows
    for row in rows:
        assert row["passed"], row
        if not row["expect_equal"]:
            # A definitional difference must be far above rounding, or the row proves nothing.
            assert row["max_abs_error"] > 100 * row["tolerance"], row


def test_omega_scan_equals_the_numpy_titans_pytorch_rule_without_torch():
    """Our omega_scan = the NumPy transcription of titans-pytorch's rule at chunk_size=1
    (batch_size = our chunk_size) and = DeltaNet's recurrence; needs no torch."""
    rows = cross_check.cross_check_numpy(T=24, d=6, seed=3)
    _check(rows)
    names = {row["case"] for row in rows}
    assert any("deltanet" in n for n in names) and any("titans: MLP" in n for n in names)


def test_numpy_titans_rule_with_no_write_only_decays():
    rng = np.random.default_rng(0)
    T, d = 5, 3
    W = [rng.normal(size=(d, d))]
    q, k, v = rng.normal(size=(3, T, d))
    keep = np.full(T, 0.5)
    y = cross_check.numpy_titans_reference(W, q, k, v, np.zeros(T), keep, None, batch_size=2)
    expected = np.stack([q[t] @ (W[0] * 0.5 ** (t + 1)) for t in range(T)])
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def test_omega_scan_equals_titans_pytorch_and_fla():
    pytest.importorskip("torch")
    pytest.importorskip("titans_pytorch")
    rows = cross_check.cross_check_peers(T=24, d=6, seed=1)
    _check(rows)
    references = {row["reference"] for row in rows}
    assert "titans-pytorch NeuralMemory" in references
    if packages.load_fla_naive_delta_rule() is not None:
        assert "fla delta_rule_recurrence" in references


def test_time_calls_stops_at_the_budget():
    calls = []
    first, median, n = measure._time_calls(lambda: calls.append(1), repeats=4)
    assert (len(calls), n) == (5, 4) and first >= 0 and median >= 0
    calls.clear()
    _, _, n = measure._time_calls(lambda: calls.append(1), repeats=4, budget_s=0.0)
    assert (len(calls), n) == (2, 1)


def _layer_row(config, name, fwd, bwd) -> dict[str, Any]:
    return dict(
        config=config,
        implementation=name,
        forward_tok_s=fwd,
        backward_tok_s=bwd,
        first_forward_s=1.0,
        first_backward_s=2.0,
        peak_rss_mib=100.0,
        rss_imports_mib=50.0,
        xla_backward_mib=None,
        repeats_used="5/5",
    )


def test_targets_and_ratios_are_computed_from_the_rows():
    rows = [
        _layer_row("A", "ours titans", 300.0, 250.0),
        _layer_row("A", "titans-pytorch", 100.0, 100.0),
        _layer_row("A", "titans-pytorch batch_size=chunk", 50.0, 50.0),
        _layer_row("A", "ours atlas", 90.0, 120.0),
    ]
    lm = [
        dict(T=8192, preset="transformer", step_tok_s=10.0),
        dict(T=8192, preset="titans", step_tok_s=15.0),
        dict(T=512, preset="titans", step_tok_s=1.0),
    ]
    targets = report.format_targets(rows, lm)
    assert "| titans f+b >= 2x titans-pytorch | A | 2.50x | yes |" in targets
    assert "fwd 0.90x, f+b 1.20x | no |" in targets  # atlas: forward slower than the peer
    assert "| recurrent LM step faster than attention at T = 8192 | titans | 1.50x | yes |" in (
        targets
    )
    table = report.format_layer_table(rows)
    assert "| A | ours titans | 300 | 250 | 2.50 | 5.00 |" in table
    assert math.isclose(float(report._ratio(3.0, 2.0)), 1.5)


def test_flop_table_ratios_rates_and_ceiling_come_from_the_rows():
    flops = lambda total, matrix: dict(
        forward_flops_per_token=total / 4,
        backward_flops_per_token=total,
        forward_matrix_flops_per_token=matrix / 4,
        backward_matrix_flops_per_token=matrix,
        gemm_flops_per_s=1e9,
    )
    ours = _layer_row("A", "ours titans", 300.0, 250.0) | flops(5e5, 4e5)
    peer = _layer_row("A", "titans-pytorch", 100.0, 100.0) | flops(2e5, 2e5)
    peer["forward_flops_per_token"] = peer["backward_flops_per_token"] = None  # torch: products
    table = report.format_flop_table([ours, peer])
    # 4e5 FLOPs x 250 tok/s = 0.1 GFLOP/s, 10% of the GEMM; at 1e9 FLOP/s ours would run
    # 2500 tok/s, 25x the peer's 100.
    assert "| A | ours titans | 125 (100) | 500 (400) | 2.00 | 0.1 | 10% | 25.00 |" in table
    assert "| A | titans-pytorch | n/a (50) | n/a (200) |  | 0.0 | 2% | n/a |" in table
    assert "The GEMM ran at 1-1 GFLOP/s" in table
    ours["backward_time_by_kind"] = dict(zip(op_profile.KINDS, (0.5, 0.25, 0.0, 0.25), strict=True))
    kinds = report.format_time_by_kind([ours, peer])
    assert "| A | ours titans | 50% | 25% | 0% | 25% |" in kinds and "titans-pytorch" not in kinds


@pytest.mark.slow
def test_one_measurement_subprocess_per_framework_reports_its_numbers():
    """The subprocess plumbing: a JAX layer, a titans-pytorch layer and an LM step at tiny
    sizes come back with positive times, a peak RSS above the post-import RSS, and finite
    outputs."""
    config = runs.PeersBenchConfig(repeats=1, budget_s=0.0, lm_repeats=1, lm_d_model=16)
    layer = runs.LayerConfig(dim=8, heads=1, chunk=4, T=16)
    specs = [runs._layer_spec("ours titans", layer, config), runs._lm_spec("titans", 16, config)]
    specs[1]["chunk"] = 4
    if importlib.util.find_spec("titans_pytorch") is not None:
        specs.append(runs._layer_spec("titans-pytorch batch_size=chunk", layer, config))
    for spec in specs:
        result = sub.run_child(spec, threads=2, timeout_s=600)
        assert "error" not in result, result
        assert result["backward_s"] > 0 and result["finite"]
        assert result["peak_rss_mib"] >= result["rss_imports_mib"] > 0
        if spec["kind"] == "layer":
            assert result["forward_s"] > 0
            forward, backward = (
                result[f"{p}_matrix_flops_per_token"] for p in ("forward", "backward")
            )
            assert 0 < forward < backward
            if spec.get("time_by_kind"):
                assert math.isclose(sum(result["backward_time_by_kind"].values()), 1.0)
    gemm = sub.run_child(runs._gemm_spec(config), threads=2, timeout_s=600)
    assert gemm["gemm_flops_per_s"] > 1e8


def test_the_median_round_is_kept_with_the_range():
    rounds = [
        dict(_layer_row("A", "ours titans", 10.0, b), backward_s=1.0 / b) for b in (3.0, 1.0, 2.0)
    ]
    row = runs._median_round(rounds)
    assert row["backward_tok_s"] == 2.0 and row["rounds"] == 3
    assert row["backward_range"] == (1.0, 3.0)
    assert "1-3 (3 rounds)" in report.format_layer_table([row])
    with pytest.raises(ValueError, match="unknown implementation"):
        runs.run_layer_benchmark(runs.PeersBenchConfig(implementations=("nope",)))


def test_exclusive_times_leave_out_the_events_each_event_encloses_on_its_thread():
    event = lambda name, ts, dur, tid=1: dict(ph="X", name=name, ts=ts, dur=dur, pid=1, tid=tid)
    events = [
        event("while.1", 0, 100),
        event("dot.2", 10, 30),
        event("add_fusion", 50, 20),
        event("copy.3", 5, 40, tid=2),  # another thread: not inside the loop
        dict(ph="i", name="marker", ts=0, pid=1, tid=1),  # not a complete event
    ]
    assert op_profile.exclusive_times(events) == {
        "while.1": 50,
        "dot.2": 30,
        "add_fusion": 20,
        "copy.3": 40,
    }


@pytest.mark.parametrize(
    "name, kind",
    [
        ("ynn_fusion.49", "matrix products"),
        ("dot_general.273", "matrix products"),
        ("dot.68", "matrix products"),
        ("copy_bitcast_fusion.5", "data movement"),
        ("dynamic-slice_bitcast_fusion.2", "data movement"),
        ("wrapped_broadcast.10", "data movement"),
        ("fusion.3", "element-wise and reductions"),
        ("multiply_add_fusion.6", "element-wise and reductions"),
        ("while.143", "loops and calls"),
        ("ThunkExecutor::Execute", None),
        ("$_jit.py:206 __call__", None),
        ("end: ynn_fusion", None),
        ("ThreadpoolListener::StartRegion", None),
    ],
)
def test_operation_kinds_follow_xla_cpu_names(name, kind):
    assert op_profile.operation_kind(name) == kind


def test_a_matmul_program_spends_its_time_in_matrix_products():
    a = jnp.ones((512, 512))
    matmul = jax.jit(lambda a: jnp.tanh(a @ a))
    run = lambda: jax.block_until_ready(matmul(a))
    run()
    shares = op_profile.time_by_kind(run)
    assert set(shares) == set(op_profile.KINDS)
    assert math.isclose(sum(shares.values()), 1.0)
    assert shares["matrix products"] > 0.5
