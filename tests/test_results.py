"""Results without outer training (`atlas-eqx results capacity`, `niah-probe`): the recall
metric on hand-checkable cases, the capacity bounds, the probe's stream, and the command."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import atlas_eqx as ae
import experiments as ex
import feature_maps as fm
from experiments.cli import main
from experiments.studies._capacity_run import (
    _capacity_stream_fn,
    _features64,
    _online_reads,
    capacity_feature_map,
    exact_recall,
    feature_dim,
    least_squares_reads,
    sphere_feature_dim,
)
from experiments.studies._niah_probe_run import (
    distinct_contexts,
    haystack_bytes,
    haystack_keys_values,
    NiahProbeConfig,
    probe_memories,
    probe_tables,
    run_niah_probe,
)
from experiments.studies._registry import RESULTS
from experiments.tasks._capacity import _write_then_read


def test_exact_recall_is_the_relative_error_threshold():
    values = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # norms 5, 1, 2
    recalled = values + np.array([[0.24, 0.32], [0.0, 0.11], [0.0, -0.2]])  # errors .4, .11, .2
    np.testing.assert_array_equal(exact_recall(recalled, values, 0.1), [True, False, True])
    np.testing.assert_array_equal(exact_recall(recalled, values, 0.12), [True, True, True])
    with pytest.raises(ValueError, match="differ"):
        exact_recall(recalled[:2], values)


@pytest.mark.parametrize("d_k", [4, 8])
def test_orthonormal_keys_store_all_d_k_pairs_and_one_more_random_pair_breaks_it(d_k):
    rng = np.random.default_rng(d_k)
    keys = np.linalg.qr(rng.standard_normal((d_k, d_k)))[0]  # orthonormal rows
    values = rng.standard_normal((d_k, 5))
    # The closed form and one pass of the normalised delta rule through omega_scan store all.
    assert exact_recall(least_squares_reads(keys, values), values, 1e-9).all()
    memory = ae.LinearMemory(d_k, 5, key=jax.random.key(0), init_std=0.0)
    probe = _write_then_read(keys, values, 1, np.float64)
    fn = _capacity_stream_fn(memory, fm.Identity(), "delta_1")
    reads = _online_reads(fn, memory, [probe], piece=8)[0]
    np.testing.assert_allclose(reads, values, atol=1e-10)  # W = V K^T exactly
    assert ex.capacity_recall(reads, probe).accuracy == 1.0
    # d_k + 1 keys in R^{d_k}: K^T u = 0 for a unit u, so any linear W leaves the residual
    # sum_i ||W k_i - v_i||^2 >= ||V^T u||^2 > 0 and not every pair can be exact.
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        keys = rng.standard_normal((d_k + 1, d_k))
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        values = rng.standard_normal((d_k + 1, 5))
        reads = least_squares_reads(keys, values)
        u = np.linalg.svd(keys.T)[2][-1]  # the null vector of K^T
        residual = ((reads - values) ** 2).sum()
        np.testing.assert_allclose(residual, ((values.T @ u) ** 2).sum(), rtol=1e-8)
        assert not exact_recall(reads, values, 0.1).all()


def test_capacity_bounds_are_the_feature_dimensions():
    assert [feature_dim(16, p) for p in (1, 2, 3)] == [16, 153, 969]
    for d in (3, 16):
        assert feature_dim(d, 1) == capacity_feature_map(1).out_dim(d) == d
        for p in (2, 3):
            # hockey stick: sum_{l <= p} C(d + l - 1, l) = C(d + p, p)
            total = sum(math.comb(d + ell - 1, ell) for ell in range(p + 1))
            assert feature_dim(d, p) == total == capacity_feature_map(p).out_dim(d)
    with pytest.raises(ValueError):
        feature_dim(0, 2)


def test_unit_keys_span_the_polynomials_on_the_sphere():
    assert [sphere_feature_dim(16, p) for p in (1, 2, 3)] == [16, 152, 952]
    rng = np.random.default_rng(0)
    for d, p in ((3, 2), (3, 3), (4, 2)):
        phi = capacity_feature_map(p)
        gaussian = rng.standard_normal((3 * feature_dim(d, p), d))
        unit = gaussian / np.linalg.norm(gaussian, axis=1, keepdims=True)
        assert np.linalg.matrix_rank(np.asarray(phi(jnp.asarray(gaussian)))) == feature_dim(d, p)
        assert np.linalg.matrix_rank(np.asarray(phi(jnp.asarray(unit)))) == sphere_feature_dim(d, p)
        # the float64 NumPy features used for the least-squares rows = the library's map
        np.testing.assert_allclose(
            _features64(phi, unit), np.asarray(phi(jnp.asarray(unit))), atol=1e-14
        )


@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize("keys", ["gaussian", "unit"])
def test_least_squares_stores_exactly_up_to_the_feature_rank(degree, keys):
    d_k = 3
    bound = (feature_dim if keys == "gaussian" else sphere_feature_dim)(d_k, degree)
    phi = capacity_feature_map(degree)
    for seed in range(3):
        for n, all_stored in ((bound, True), (bound + 1, False)):
            probe = ex.capacity_probe(n, d_k, 4, seed=seed, keys=keys, dtype=np.float64)
            features = np.asarray(phi(jnp.asarray(probe.keys)))
            stored = exact_recall(least_squares_reads(features, probe.values), probe.values)
            assert stored.all() == all_stored, (seed, n)


def test_probe_keys_depend_only_on_the_last_context_bytes():
    config = NiahProbeConfig(context=4)
    tables = probe_tables(config)
    text = jnp.asarray(haystack_bytes("noise"))
    period = text.shape[0]
    positions = jnp.arange(3 * period)
    keys, values = haystack_keys_values(tables, text, positions, jnp.asarray(7))
    np.testing.assert_allclose(keys[:period], keys[period : 2 * period], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)
    distinct = len(np.unique(np.asarray(keys[:period]).round(5), axis=0))
    assert distinct == distinct_contexts("noise", 4) == 80
    assert values.shape == (3 * period, config.value_dim)


def test_a_needle_written_last_is_recalled_and_deltanet_loses_an_early_one():
    config = NiahProbeConfig(lengths=(512,), examples=2, piece=256)
    memories = tuple(m for m in probe_memories() if m.name == "deltanet")
    depths = np.array([0.9999, 0.0])  # positions 511 (the last token) and 0
    (record,) = run_niah_probe(config, memories, ("noise",), depths=depths, progress=False)
    # The last write is read right back (eta = 1/||k||^2 makes it exact); 511 writes of the
    # 80 noise contexts, which span R^16, overwrite the first (chance is 1/256).
    assert record["correct"] == [True, False]
    assert record["outside_span"] < 1e-6  # rho: nothing of the needle is outside their span


def test_results_cli_quick_writes_the_table_and_the_plot(tmp_path):
    assert set(RESULTS) >= {"capacity", "niah-probe"}
    pytest.importorskip("matplotlib")
    for name, png in (("capacity", "capacity.png"), ("niah-probe", "niah_probe.png")):
        out = tmp_path / name
        assert main(["results", name, "--quick", "--out", str(out)]) == 0
        text = (out / "results.md").read_text()
        assert f"Regenerate with `atlas-eqx results {name} --quick`." in text
        assert "Quick run" in text and "## Against the paper" in text
        assert "|---|" in text
        assert (out / png).stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["results", "no-such-result"])
