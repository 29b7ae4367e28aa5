"""`atlas-eqx results claims` (`experiments/studies/_claims*.py`): which runs the protocol asks
for and in what order, paired ablations inherit their reference's rate, seeds and eta_max,
parameter counts are matched, and the verdict follows the twice-the-seed-range rule."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from experiments.studies import _claims
from experiments.studies._claims import Arm, Claim, CLAIMS, LRS, plan, SEEDS, Task
from experiments.studies._claims_page import claims_result, format_page, summarise, verdict
from experiments.studies._claims_run import load_runs, run_one
from experiments.tasks import single_needle


RESULTS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "results"
TINY = Task(steps=2, num_train=64, num_validation=16, num_test=16, batch_size=8)
RANKING = Claim(
    key="tiny-ranking",
    title="a > b",
    paper="a paper",
    kind="ranking",
    task=TINY,
    arms=(Arm("a", "gated_deltanet"), Arm("b", "linear_attention")),
)
PAIRED = Claim(
    key="tiny-paired",
    title="a's window matters",
    paper="a paper",
    kind="paired",
    task=TINY,
    arms=(Arm("a", "omeganet"), Arm("a, c = 1", "omeganet", (("window", 1),))),
    expected=(("a, c = 1", "worse"),),
)
WIDTHS: dict[str, int | None] = {"a": None, "b": None, "a, c = 1": None}


def _finish(runs, planned, validation, test):
    for p in planned:
        runs[p.key] = dict(
            key=p.key, lr=p.lr, seed=p.seed, validation=validation(p), test=test(p),
            parameters=100, diverged_at=None, curve=[(0, 0.0), (2, 0.5)], seconds=1.0,
        )  # fmt: skip


def test_ranking_sweeps_seed_zero_then_runs_the_other_seeds_at_the_validation_choice():
    runs: dict = {}
    first = plan(RANKING, runs, WIDTHS)
    assert sorted((p.arm.name, p.lr, p.seed) for p in first) == sorted(
        (arm, lr, 0) for arm in ("a", "b") for lr in LRS
    )
    # validation prefers the middle rate for a, the largest for b; test would prefer others
    best = {"a": LRS[1], "b": LRS[2]}
    _finish(runs, first, lambda p: 0.9 if p.lr == best[p.arm.name] else 0.1, lambda p: 0.5)
    second = plan(RANKING, runs, WIDTHS)
    assert sorted((p.arm.name, p.lr, p.seed) for p in second) == sorted(
        (arm, best[arm], seed) for arm in ("a", "b") for seed in SEEDS[1:]
    )
    _finish(runs, second, lambda p: 0.9, lambda p: 0.5)
    assert plan(RANKING, runs, WIDTHS) == []


def test_paired_ablation_takes_the_reference_rate_seeds_and_inner_step():
    runs: dict = {}
    first = plan(PAIRED, runs, WIDTHS)
    assert {p.arm.name for p in first} == {"a"}  # only the reference sweeps
    _finish(runs, first, lambda p: 0.9 if p.lr == LRS[0] else 0.1, lambda p: 0.5)
    second = plan(PAIRED, runs, WIDTHS)
    ablation = [p for p in second if p.arm.name == "a, c = 1"]
    assert sorted(p.seed for p in ablation) == list(SEEDS)
    assert {p.lr for p in ablation} == {LRS[0]}
    reference_eta = _claims._preset_layer(PAIRED.arms[0], TINY).config.lr_max
    assert ablation[0].options == {"window": 1, "lr_max": reference_eta}
    # without the pairing the preset would have changed eta_max with c
    assert _claims._preset_layer(PAIRED.arms[1], TINY).config.lr_max != reference_eta


def test_page_counts_only_the_runs_the_protocol_reads(tmp_path):
    """A run left from an earlier choice of rate stays in runs.jsonl but is neither read nor
    counted in the page's runs and core-hours."""
    runs: dict = {}
    for _ in range(2):
        _finish(runs, plan(PAIRED, runs, WIDTHS), lambda p: 0.9 if p.lr == LRS[0] else 0.1,
                lambda p: 0.5)  # fmt: skip
    assert len(runs) == len(LRS) + 2 * len(SEEDS) - 1  # the sweep, 2 more seeds, the ablation
    ablation = PAIRED.arms[1]
    options = _claims._options(PAIRED, ablation)
    stale = _claims.PlannedRun(PAIRED.task, ablation, options, None, LRS[1], SEEDS[0]).key
    assert stale not in runs
    runs[stale] = dict(next(iter(runs.values())), key=stale, lr=LRS[1], seconds=7200.0)
    text, _ = format_page([PAIRED], runs, tmp_path)
    assert f"{len(runs) - 1} runs so far, 0.0 core-hours of training (1 more in" in text


def test_longer_runs_start_after_the_rate_is_chosen_and_show_on_the_page(tmp_path):
    """`Claim.longer`: the arm again at its validation-chosen rate and seed 0 with the steps
    multiplied, planned only once that rate is known, counted, and tabled on the page."""
    claim = dataclasses.replace(RANKING, longer=("b", (3,)))
    widths = _claims.matched_mlp_hidden(claim)  # what the page computes
    runs: dict = {}
    first = plan(claim, runs, widths)
    assert all(p.task.steps == TINY.steps for p in first)
    _finish(runs, first, lambda p: 0.9 if p.lr == LRS[2] else 0.1, lambda p: 0.5)
    longer = [p for p in plan(claim, runs, widths) if p.task.steps != TINY.steps]
    assert [(p.arm.name, p.task.steps, p.lr, p.seed) for p in longer] == [
        ("b", 3 * TINY.steps, LRS[2], SEEDS[0])
    ]
    _finish(runs, plan(claim, runs, widths), lambda p: 0.9, lambda p: 0.5)
    runs[longer[0].key]["curve"] = [(0, 0.0), (2, 0.1), (4, 0.3), (6, 0.4)]
    assert plan(claim, runs, widths) == []
    text, _ = format_page([claim], runs, tmp_path)
    assert f"{len(runs)} runs so far" in text
    assert f"Trained longer: b at its chosen rate {LRS[2]:g}, seed 0" in text
    assert "| 2 | 0.900 | - | 0.500 | 1 |" in text  # the claim's own seed-0 run
    assert "| 6 | 0.900 | +0.100 | 0.500 | 1 |" in text  # 0.4 at step 6 less 0.3 at step 4


def _summaries(claim, tests_by_arm):
    runs: dict = {}
    for _ in range(2):
        _finish(
            runs,
            plan(claim, runs, WIDTHS),
            lambda p: 0.9 if p.lr == LRS[0] else 0.1,
            lambda p: tests_by_arm[p.arm.name][p.seed],
        )
    return summarise(claim, runs, WIDTHS)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((0.90, 0.91, 0.92), (0.50, 0.52, 0.54), "reproduced"),  # gap 0.39 > 2 x 0.04
        ((0.50, 0.52, 0.54), (0.90, 0.91, 0.92), "refuted"),
        ((0.60, 0.70, 0.80), (0.50, 0.60, 0.70), "not resolved"),  # gap 0.1 < 2 x 0.2
    ],
)
def test_verdict_follows_twice_the_seed_range(a, b, expected):
    summaries = _summaries(RANKING, {"a": dict(enumerate(a)), "b": dict(enumerate(b))})
    result, lines = verdict(RANKING, summaries)
    assert result == expected
    assert len(lines) == 1 and "twice the seed range" in lines[0]


def test_paired_verdict_reads_each_ablation_in_the_papers_direction():
    worse = {"a": {0: 0.9, 1: 0.9, 2: 0.9}, "a, c = 1": {0: 0.5, 1: 0.5, 2: 0.5}}
    assert verdict(PAIRED, _summaries(PAIRED, worse))[0] == "reproduced"
    better = {"a": worse["a, c = 1"], "a, c = 1": worse["a"]}
    assert verdict(PAIRED, _summaries(PAIRED, better))[0] == "refuted"


def test_a_diverged_run_never_decides_a_comparison_nor_the_rate():
    """A diverged seed has no score (its record's 0.0 is not an accuracy, and would be a perfect
    bits-per-byte): the comparison is "not resolved" and names it; the rate sweep skips
    diverged rates."""
    runs: dict = {}
    first = plan(RANKING, runs, WIDTHS)
    _finish(runs, first, lambda p: 0.9 if p.lr == LRS[0] else 0.2, lambda p: 0.5)
    for p in first:
        if p.arm.name == "b" and p.lr == LRS[0]:
            runs[p.key]["diverged_at"] = 40
    second = plan(RANKING, runs, WIDTHS)
    assert {(p.arm.name, p.lr) for p in second} == {("a", LRS[0]), ("b", LRS[1])}
    _finish(runs, second, lambda p: 0.9, lambda p: 0.9 if p.arm.name == "a" else 0.1)
    for key, record in runs.items():
        if record["seed"] == 2 and json.loads(key)["preset"] == "linear_attention":
            record["diverged_at"] = 7
    summaries = summarise(RANKING, runs, WIDTHS)
    assert summaries[1].diverged == 1 and len(summaries[1].tests) == 2
    result, lines = verdict(RANKING, summaries)
    assert result == "not resolved"
    assert "b diverged in 1 of 3 seeds" in lines[0]


def test_unfinished_claims_say_how_far_they_are():
    runs: dict = {}
    _finish(runs, plan(RANKING, runs, WIDTHS), lambda p: 0.5, lambda p: 0.5)
    result, _ = verdict(RANKING, summarise(RANKING, runs, WIDTHS))
    assert result == "running (2 of 6 final runs)"


def test_shipped_claims_match_parameter_counts_within_tolerance():
    for claim in CLAIMS:
        if claim.not_tested is not None:
            continue
        widths = _claims.matched_mlp_hidden(claim)
        counts = [
            _claims.parameter_count(arm, _claims._options(claim, arm), claim.task, widths[arm.name])
            for arm in claim.arms
        ]
        assert max(counts) / min(counts) - 1 < _claims.PARAMETER_TOLERANCE, (claim.key, counts)


def test_page_lists_every_claim_with_a_verdict(tmp_path):
    text, rows = format_page(CLAIMS, {}, tmp_path)
    assert [claim.key for claim, _ in rows] == [c.key for c in CLAIMS]
    for claim, result in rows:
        assert result.startswith("not tested here" if claim.not_tested else "running")
    assert "atlas-eqx results claims" in text


def test_committed_claims_runs_are_the_ones_todays_protocol_asks_for():
    """Every run the shipped claims plan is in the committed `runs.jsonl` (its key names the
    whole configuration), so the committed page is what `atlas-eqx results claims` reproduces;
    a change to a claim's task, arms or options shows here as missing runs."""
    runs = load_runs(RESULTS / "claims" / "runs.jsonl")
    for claim in CLAIMS:
        if claim.not_tested is None:
            assert plan(claim, runs, _claims.matched_mlp_hidden(claim)) == [], claim.key


def test_tasks_without_the_newer_fields_keep_their_run_keys():
    """`test_lengths` and `test_pairs` at their defaults stay out of a run's key, so runs
    recorded before those fields existed are still found."""
    key = json.loads(_claims.run_key(TINY, Arm("a", "titans"), {}, None, 0.01, 0))
    assert not {"name", "test_lengths", "test_pairs"} & set(key["task"])
    paired = dataclasses.replace(TINY, test_pairs=(4, 8))
    assert json.loads(_claims.run_key(paired, Arm("a", "titans"), {}, None, 0.01, 0))["task"][
        "test_pairs"
    ] == [4, 8]


@pytest.mark.slow
def test_a_run_is_tested_at_each_number_of_pairs_and_scored_at_the_most(tmp_path, monkeypatch):
    """`Task.test_pairs`: trained and validated with `num_kv_pairs`, tested on MQAR splits with
    each count; the run's score is the last count's, and the page tables every count."""
    from experiments.tasks import _mqar

    made = []

    def recorded(n, seq_len, vocab_size, num_kv_pairs, *, seed):
        made.append((seed, num_kv_pairs))
        return original(n, seq_len, vocab_size, num_kv_pairs, seed=seed)

    original = _mqar.multiquery_ar
    monkeypatch.setattr(_mqar, "multiquery_ar", recorded)
    task = dataclasses.replace(TINY, num_kv_pairs=2, test_pairs=(2, 8))
    record = run_one(task, Arm("a", "gated_deltanet"), {}, None, 0.01, 0)
    assert sorted(made) == [
        (0, 2),
        (_claims.TEST_OFFSET, 2),
        (_claims.TEST_OFFSET, 8),
        (_claims.VALIDATION_OFFSET, 2),
    ]
    assert set(record["test_by_pairs"]) == {"2", "8"}
    assert record["test"] == record["test_by_pairs"]["8"]
    claim = dataclasses.replace(RANKING, task=task, arms=RANKING.arms[:1])
    runs: dict = {}
    for _ in range(2):
        _finish(runs, plan(claim, runs, WIDTHS), lambda p: 0.9, lambda p: 0.5)
    for r in runs.values():
        r["test_by_pairs"] = {"2": 0.75, "8": 0.5}
    text, _ = format_page([claim], runs, tmp_path)
    assert "trained with 2 pairs, tested with 2, 8 pairs" in text
    assert "| arm | 2 pairs | 8 pairs |" in text
    assert "| a | 0.750 [0.750, 0.750] | 0.500 [0.500, 0.500] |" in text


@pytest.mark.slow
def test_claims_command_trains_and_resumes(tmp_path):
    """Two tiny claims end to end (real training, 2 steps), then a second call runs nothing
    new: every run is found in runs.jsonl."""
    claims = [RANKING, PAIRED]
    text = claims_result(tmp_path, claims=claims, progress=False)
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    # ranking: 2 arms x (3 rates + 2 seeds); paired: reference 3 + 2, ablation 3
    assert len(lines) == 2 * (3 + 2) + (3 + 2) + 3
    assert all(json.loads(line)["test"] >= 0 for line in lines)
    assert "## a > b" in text and (tmp_path / "claims-tiny-ranking.png").exists()
    claims_result(tmp_path, claims=claims, progress=False)
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(lines)


def test_single_needle_places_one_pair_and_asks_for_it_at_the_end():
    task = single_needle(64, 20, 16, seed=3)
    inputs, targets = task.inputs, task.targets
    rows = np.arange(64)
    position, key, value = (task.metadata[name] for name in ("position", "key", "value"))
    assert set(position) <= set(range(18)) and len(set(position)) > 5  # depth varies
    np.testing.assert_array_equal(inputs[rows, position], key)
    np.testing.assert_array_equal(inputs[rows, position + 1], value)
    np.testing.assert_array_equal(inputs[:, -1], key)
    np.testing.assert_array_equal(targets[:, -1], value)
    assert (targets[:, :-1] == -100).all()
    haystack = np.ones_like(inputs, bool)
    haystack[rows, position] = haystack[rows, position + 1] = False
    haystack[:, -1] = False
    assert inputs[haystack].min() >= 1 and inputs[haystack].max() < 8  # never a key or value
    assert key.min() >= 8 and key.max() < 12 and value.min() >= 12 and value.max() < 16
    np.testing.assert_array_equal(single_needle(64, 20, 16, seed=3).inputs, inputs)
