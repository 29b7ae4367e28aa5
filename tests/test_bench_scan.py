"""`atlas-eqx bench scan`: its timing harness and its table. Speed is never asserted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import atlas_eqx as ae
import optimizers as iopt
from experiments.bench import _scan as _bench


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
        gemm_size=64,
    )
    rows = _bench.run_scan_benchmark(config)
    assert [row["method"] for row in rows] == ["sequential", "chunked", "reference", "floor"]
    assert all(row["forward_tokens_per_s"] > 0 and row["backward_tokens_per_s"] > 0 for row in rows)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[3] for line in printed[-4:-1]] == ["chunked", "reference", "floor"]
    assert all(len(line.split()) == 10 for line in printed[-4:-1])  # rows after the first: ratios
    # the FLOP rates of chunked and reference against the GEMM timed in the same rounds
    assert printed[-1].lstrip().startswith("GEMM 64^3") and "reference f+b" in printed[-1]
    by_method = {row["method"]: row for row in rows}
    for method in ("chunked", "reference"):
        assert 0 < by_method[method]["fraction_of_gemm"] < float("inf")


@pytest.mark.parametrize("T", [16, 13])
def test_the_floor_computes_omega_scan_with_its_anchor_independent_work_given(T):
    """The `floor` row times a real computation: the linear GD dual form's chunk loop, whose
    inputs (chunk layout, coefficients, Gram) are built before timing. Its output and gradient
    equal the sequential oracle's (float64; T a multiple of b and not)."""
    d, b, window = 4, 4, 3
    key = jax.random.key(3)
    memory = ae.LinearMemory(d, d, key=key)
    q, k, v, lr, decay, momentum, gamma = _bench._inputs(T, d, d, jax.random.fold_in(key, 1))
    q, k, v, lr, decay, momentum, gamma = (
        x.astype(jnp.float64) for x in (q, k, v, lr, decay, momentum, gamma)
    )
    memory = jax.tree.map(lambda x: x.astype(jnp.float64), memory)
    expected, _ = ae.omega_scan(
        memory, q, k, v, lr, decay, None, gamma, window=window, chunk_size=b, optimizer=iopt.gd()
    )
    inputs = _bench._floor_inputs(memory, window, b, q, k, v, lr, decay, momentum, gamma)
    forward, gradient = _bench._floor_functions()
    np.testing.assert_allclose(forward(memory.weight, inputs), expected, rtol=1e-12, atol=1e-12)

    def loss(memory):
        y, _ = ae.omega_scan(
            memory,
            q,
            k,
            v,
            lr,
            decay,
            None,
            gamma,
            window=window,
            chunk_size=b,
            optimizer=iopt.gd(),
        )
        return jnp.mean(y**2)

    np.testing.assert_allclose(
        gradient(memory.weight, inputs), jax.grad(loss)(memory).weight, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("T, b, window", [(16, 4, 3), (13, 4, 3), (12, 6, 1)])
def test_the_reference_form_computes_omega_scan(T, b, window):
    """The `reference` row (the plain chunked form the library's path is compared with) computes
    `omega_scan`'s frozen-anchor chunks: outputs and gradients in float64, T a multiple of b
    and not."""
    d = 4
    key = jax.random.key(5)
    memory = jax.tree.map(lambda x: x.astype(jnp.float64), ae.LinearMemory(d, d, key=key))
    q, k, v, lr, decay, momentum, gamma = (
        x.astype(jnp.float64) for x in _bench._inputs(T, d, d, jax.random.fold_in(key, 1))
    )

    def ours(memory, q, k, v, lr, decay, gamma):
        y, _ = ae.omega_scan(
            memory, q, k, v, lr, decay, None, gamma, window=window, chunk_size=b,
            optimizer=iopt.gd(), method="sequential",
        )  # fmt: skip
        return y

    def reference(memory, q, k, v, lr, decay, gamma):
        return _bench.reference_chunked_forward(
            memory.weight, q, k, v, lr, decay, gamma, window=window, chunk_size=b
        )

    args = (memory, q, k, v, lr, decay, gamma)
    np.testing.assert_allclose(reference(*args), ours(*args), rtol=1e-11, atol=1e-12)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    expected = jax.grad(loss(ours), argnums=tuple(range(7)))(*args)
    got = jax.grad(loss(reference), argnums=tuple(range(7)))(*args)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-11)
