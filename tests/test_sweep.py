"""The main job's sweep (`experiments/studies/_sweep.py`): the rate is chosen on validation, the
table reports test accuracy there, and a difference is called resolved only beyond twice the
larger seed range."""

from experiments.studies._sweep import format_sweep, summarise, SweepConfig


def _run(preset, lr, seed, validation, test, parameters=100, diverged_at=None):
    return dict(
        preset=preset,
        lr=lr,
        seed=seed,
        steps=10,
        validation=validation,
        test=test,
        parameters=parameters,
        diverged_at=diverged_at,
    )


CONFIG = SweepConfig(presets=("a", "b"), lrs=(0.1, 0.2, 0.3), seeds=(0, 1), steps=10)
RECORDS = [
    # a: 0.2 is best on validation although 0.1 has the better test accuracy.
    _run("a", 0.1, 0, 0.5, 0.99),
    _run("a", 0.1, 1, 0.5, 0.99),
    _run("a", 0.2, 0, 0.9, 0.80),
    _run("a", 0.2, 1, 0.9, 0.90),
    _run("a", 0.3, 0, 0.0, 0.0, diverged_at=3),
    _run("b", 0.3, 0, 0.4, 0.40, parameters=125),
    _run("b", 0.3, 1, 0.4, 0.42, parameters=125),
    _run("b", 0.3, 1, 0.9, 0.9, parameters=125) | dict(steps=20),  # another length: ignored
]


def test_rate_chosen_on_validation_and_test_reported_there():
    summaries, _ = summarise(RECORDS, CONFIG.presets, CONFIG.steps)
    a, b = summaries
    assert (a.preset, a.lr, a.test_min, a.test_max) == ("a", 0.2, 0.80, 0.90)
    assert abs(a.test_mean - 0.85) < 1e-12
    assert (b.lr, b.diverged) == (0.3, 0) and abs(b.test_mean - 0.41) < 1e-12


def test_reading_states_resolution_and_confounds():
    text = format_sweep(RECORDS, CONFIG)
    # gap 0.44; the larger seed range is 0.10, twice that 0.20: resolved.
    assert "- a - b: +0.440 against twice the seed range 0.200: resolved." in text
    assert "100 to 125 (25% apart)" in text
    assert "(the best may lie beyond it): b." in text
    assert "Runs whose loss became non-finite: 1." in text
    assert "div@3" in text
    close = [_run("a", 0.1, s, 0.5, t) for s, t in ((0, 0.5), (1, 0.7))]
    close += [_run("b", 0.1, s, 0.5, t) for s, t in ((0, 0.45), (1, 0.55))]
    assert "not resolved" in format_sweep(close, CONFIG)
