"""`atlas-eqx bench scan`: its timing harness and its table. Speed is never asserted."""

import jax.numpy as jnp

from experiments import _bench


def _recorder(calls: list[str], name: str):
    def call():
        calls.append(name)
        return jnp.zeros(())

    return call


def test_rounds_interleave_the_methods_after_two_untimed_calls_each():
    calls: list[str] = []
    functions = {name: (_recorder(calls, name), ()) for name in ("a", "b", "c")}
    seconds = _bench._time_interleaved(functions, repeats=4)
    assert calls == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 4
    assert set(seconds) == {"a", "b", "c"}
    assert all(s >= 0 for s in seconds.values())


def test_rounds_stop_at_min_repeats_once_the_budget_is_spent():
    calls: list[str] = []
    functions = {name: (_recorder(calls, name), ()) for name in ("a", "b")}
    _bench._time_interleaved(functions, repeats=10, min_repeats=3, budget_s=0.0)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3


def test_the_table_has_a_row_per_method_with_the_ratio_against_the_first(capsys):
    config = _bench.ScanBenchConfig(
        lengths=(16,),
        chunk_sizes=(4,),
        d_k=4,
        d_v=4,
        window=2,
        repeats=1,
        min_repeats=1,
        setups=("linear+gd",),
        methods=("sequential", "chunked"),
    )
    rows = _bench.run_scan_benchmark(config)
    assert [row["method"] for row in rows] == ["sequential", "chunked"]
    assert all(row["forward_tokens_per_s"] > 0 and row["backward_tokens_per_s"] > 0 for row in rows)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].split()[3] == "chunked"
    assert len(printed[-1].split()) == 10  # the second row carries both ratios
