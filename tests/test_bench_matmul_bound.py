"""`atlas-eqx bench matmul-bound` (issue 23): the matrix products it finds in a program, the
loop it times each one in, and the bound's arithmetic (speed is never a timed test)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench._flops import count_flops, MatrixProduct
from experiments.bench._matmul_bound import (
    format_table,
    MATMUL_BOUND_CASES,
    MatmulBoundConfig,
    measure,
    product_loop,
)
from experiments.cli._main import main


def _program(x, w, batched):
    def step(carry, _):
        return jnp.tanh(carry @ w), None

    y, _ = jax.lax.scan(step, x, None, length=3)
    return jnp.sum(y) + jnp.sum(jnp.einsum("bij,bjk->bik", batched, batched))


_ARGS = (jnp.ones((4, 8)), jnp.ones((8, 8)), jnp.ones((2, 3, 3)))
_DTYPE = str(_ARGS[0].dtype)  # float64 under the tests' x64 flag


def test_every_product_is_listed_with_the_times_it_runs():
    count = count_flops(_program, *_ARGS)
    in_scan = MatrixProduct((4, 8), (8, 8), _DTYPE, (((1,), (0,)), ((), ())))
    batched = MatrixProduct((2, 3, 3), (2, 3, 3), _DTYPE, (((2,), (1,)), ((0,), (0,))))
    assert dict(count.products) == {in_scan: 3, batched: 1}
    assert in_scan.flops == 2 * 4 * 8 * 8 and batched.flops == 2 * 2 * 3 * 3 * 3
    assert sum(p.flops * n for p, n in count.products.items()) == count.matrix_flops


def test_the_gradient_s_products_are_listed_too():
    """The gradient with respect to x and w of `x @ w` in a scan of 3: per step the forward
    product and one for each cotangent. The batched product does not reach the gradient, so it
    is dropped as dead code, as XLA drops it."""
    loss = lambda x, w: jnp.sum(_program(x, w, _ARGS[2]))
    count = count_flops(jax.grad(loss, argnums=(0, 1)), *_ARGS[:2])
    assert sum(count.products.values()) == 3 * 3
    assert all(product.lhs_shape != (2, 3, 3) for product in count.products)
    assert sum(p.flops * n for p, n in count.products.items()) == count.matrix_flops


@pytest.mark.parametrize(
    "product",
    [
        MatrixProduct((5, 7), (7, 3), "float32", (((1,), (0,)), ((), ()))),
        MatrixProduct((2, 4, 6), (2, 5, 6), "float32", (((2,), (2,)), ((0,), (0,)))),
    ],
)
def test_the_timed_loop_computes_the_product_it_times(product):
    lhs = jax.random.normal(jax.random.key(0), product.lhs_shape)
    rhs = jax.random.normal(jax.random.key(1), product.rhs_shape)
    expected = np.asarray(jax.lax.dot_general(lhs, rhs, product.dimension_numbers))
    last, corner_first, corner_second = jax.jit(product_loop(product, reps=4))(lhs, rhs)
    np.testing.assert_allclose(np.asarray(last), expected, rtol=1e-5, atol=1e-5)
    corner = expected[(0,) * expected.ndim]
    np.testing.assert_allclose(np.asarray(corner_first), np.full(4, corner), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(corner_second), np.full(4, 2 * corner), rtol=1e-5)


def test_the_bound_sums_each_product_s_time_times_its_runs():
    """The rows' arithmetic: tokens over the bound's seconds, the arithmetic bound (the loop's
    own cost subtracted) never above the bound, and the table prints the program's row."""
    config = MatmulBoundConfig(reps=2, repeats=1, min_repeats=1, gemm_size=16)
    program = (lambda x, w: _program(x, w, _ARGS[2]), _ARGS[:2], 4)
    result = measure({"tiny": program}, config)
    (row,) = result["rows"]
    assert row["distinct_products"] == 2
    assert row["matrix_flops"] == count_flops(program[0], *program[1]).matrix_flops
    assert row["bound_seconds"] > 0 and row["tokens_per_s"] > 0
    assert row["bound_tokens_per_s"] == pytest.approx(4 / row["bound_seconds"])
    assert row["bound_over_measured"] == pytest.approx(
        row["bound_tokens_per_s"] / row["tokens_per_s"]
    )
    assert 0 <= row["arithmetic_seconds"] <= row["bound_seconds"]
    assert "| tiny |" in format_table(result)


def test_cases_cover_the_issue_s_targets():
    """Both peer configurations of titans and per-chunk-Muon atlas, and the chunked linear
    path beside its reference at both chunk sizes."""
    described = [description for description, _ in MATMUL_BOUND_CASES.values()]
    for expected in ("titans, dim 64", "titans, dim 128", "atlas muon_per_chunk, dim 64"):
        assert any(d.startswith(expected) for d in described)
    for b in (16, 64):
        for method in ("chunked", "reference"):
            assert f"{method}-b{b}" in MATMUL_BOUND_CASES


@pytest.mark.slow
def test_cli_prints_the_table_and_writes_the_page(tmp_path, capsys):
    argv = ["bench", "matmul-bound", "--cases", "reference-b16", "--repeats", "1"]
    assert main(argv + ["--gemm-size", "64", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| reference linear GD, d 128, b 16, T 8192 |" in out
    page = (tmp_path / "results.md").read_text()
    assert "atlas-eqx bench matmul-bound --cases reference-b16" in page
    assert (tmp_path / "results.json").exists()
