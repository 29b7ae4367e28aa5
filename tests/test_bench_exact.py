"""`atlas-eqx bench exact` (issue 19): it runs at a tiny size, writes its table, and every row
computes the sequential recurrence's function (speed itself is never a timed test)."""

import numpy as np

from experiments.bench._exact import ExactBenchConfig, run_exact_benchmark


def test_bench_exact_rows_compute_the_same_function(tmp_path):
    config = ExactBenchConfig(
        length=48,
        dims=(4,),
        windows=(1, 2),
        block_sizes=(4, 16),
        fla_chunk_sizes=(16,),
        repeats=1,
        out_dir=str(tmp_path),
    )
    rows = run_exact_benchmark(config)
    ours = [r for r in rows if not r["name"].startswith("fla")]
    assert [(r["window"], r["name"]) for r in ours] == [
        (c, name) for c in (1, 2) for name in ("sequential", "exact L=4", "exact L=16")
    ]
    for row in rows:  # float32 over 48 steps; fla (when installed) included
        assert row["max_abs_difference"] < 1e-4, row
        assert np.isfinite(row["fwd_tokens_per_s"]) and row["fwd_tokens_per_s"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| 4 | 2 | exact L=16 |" in table
    assert "atlas-eqx bench exact" in table
