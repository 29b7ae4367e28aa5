r"""`atlas-eqx bench matmul-bound`: how fast a program could run if nothing but its matrix
products ran, each at XLA's own speed for its shape on this machine.

Issue 23's speed targets ask our layers and scans for a ratio against a peer, or for a fraction
of a large matmul's FLOP/s. This benchmark measures how far the matrix products alone allow
that:

- `count_flops` lists every `dot_general` of the program's jaxpr with the number of times it
  runs (a `scan` body times its length; `FlopCount.products`).
- Each distinct product is timed on its own (`product_loop`). A `lax.scan` of `reps` steps
  runs it on two independent chains, so the runtime may overlap two products as it may in the
  program. Each step adds 0 x (an element of the previous product) to one element of its
  operand, in place, so XLA can neither hoist nor drop the product and no step copies an
  operand. One product's time is the function's time over `2 reps + 1` (the last product,
  outside the loop, adds one).
- The bound is the sum over products of (times it runs) x (its time): the seconds a call
  would take if everything else were free, each product still one XLA operation. bound
  tokens/s is the tokens of a call over it.
- The arithmetic bound subtracts from each product's time the same loop's time per product
  with a 1 x 1 x 1 product (the cost of a loop step and of launching an operation), as if
  every product were fused into a kernel that launches nothing. The truth for an XLA program
  lies between the two, nearer the first: each of its products is an operation too, unless
  XLA fuses it.
- The program itself, every product loop and a float32 `gemm_size`$^3$ matmul are timed in
  the same interleaved rounds (medians).

The bound is not a proof of impossibility. A fused kernel (Pallas on a GPU, or a hand-written
CPU kernel) could beat XLA's per-shape speed, or do fewer products, and a program whose small
products overlap or fuse can beat the first bound by a little (the plain reference at b 16 ran
at 0.92x its own). It says roughly what the programs as written, in XLA on this machine,
cannot beat.
"""

import time
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import atlas_eqx as ae
import optimizers as iopt

from . import _scan
from ._flops import count_flops, MatrixProduct
from ._flops_bench import markdown_table, TimedBenchConfig, write_page
from ._scan import _time_interleaved, timed_gemm


@dataclass(frozen=True)
class MatmulBoundConfig(TimedBenchConfig):
    cases: tuple[str, ...] = ()
    """Names from `MATMUL_BOUND_CASES`; empty for all of them."""
    reps: int = 32


def product_loop(product: MatrixProduct, reps: int):
    """A function of the two operands running `product` `reps` times on two chains (module
    docstring). It returns the product of the first chain's final operand (equal to
    `lhs` unless a product was not finite) and each step's first element of both products."""
    dimension_numbers = product.dimension_numbers

    def depend(operand, out):
        # operand[0, ..., 0] += 0 * out[0, ..., 0]: an in-place update of one element
        corner = (0,) * operand.ndim
        element = operand[corner] + 0 * out.reshape(-1)[0]
        return jax.lax.dynamic_update_slice(operand, element.reshape((1,) * operand.ndim), corner)

    def run(lhs, rhs):
        def step(carry, _):
            first, second = carry
            out_first = jax.lax.dot_general(first, rhs, dimension_numbers)
            out_second = jax.lax.dot_general(second, rhs, dimension_numbers)
            carry = (depend(first, out_first), depend(second, out_second))
            return carry, (out_first[(0,) * out_first.ndim], out_second[(0,) * out_second.ndim])

        (first, second), (corner_first, corner_second) = jax.lax.scan(
            step, (lhs, 2 * lhs), None, length=reps
        )
        return jax.lax.dot_general(first, rhs, dimension_numbers), corner_first, corner_second

    return run


def _product_operands(product: MatrixProduct, key) -> tuple[jax.Array, jax.Array]:
    dtype = jnp.dtype(product.dtype)
    lhs_key, rhs_key = jax.random.split(key)
    return (
        jax.random.normal(lhs_key, product.lhs_shape, dtype),
        jax.random.normal(rhs_key, product.rhs_shape, dtype),
    )


def _layer_case(preset: str, dim: int, heads: int, chunk: int, T: int, batch: int, **options):
    """The forward+backward of a preset's layer on `batch` sequences (as `bench peers`)."""

    def build(key):
        layer = getattr(ae.presets, preset)(dim, heads, key=key, chunk_size=chunk, **options)
        x = jax.random.normal(jax.random.fold_in(key, 1), (batch, T, dim))
        grad = eqx.filter_grad(lambda m, x: jnp.mean(jax.vmap(m)(x) ** 2))
        return grad, (layer, x), batch * T

    return build


def _scan_case(method: str, chunk: int, dim: int = 128, T: int = 8192, window: int = 4):
    """The forward+backward of `bench scan`'s linear + GD rows: `omega_scan(method="chunked")`
    or the plain chunked reference."""

    def build(key):
        memory = ae.LinearMemory(dim, dim, key=key)
        args = _scan._inputs(T, dim, dim, jax.random.fold_in(key, 1))
        if method == "reference":
            _, grad = _scan._reference_functions(window, chunk)
        else:
            _, grad = _scan._functions(memory, iopt.gd(), window, chunk, method)
        return grad, (memory, *args), T

    return build


_PEER_1 = dict(dim=64, heads=1, chunk=16, T=1024, batch=2)
_PEER_2 = dict(dim=128, heads=2, chunk=64, T=2048, batch=2)
_PER_CHUNK_MUON = dict(window=4, muon_per_chunk=True)

MATMUL_BOUND_CASES = {
    "titans-1": ("titans, dim 64, 1 head, chunk 16, T 1024", _layer_case("titans", **_PEER_1)),
    "titans-2": ("titans, dim 128, 2 heads, chunk 64, T 2048", _layer_case("titans", **_PEER_2)),
    "atlas-chunk-muon-1": (
        "atlas muon_per_chunk, dim 64, 1 head, chunk 16, T 1024",
        _layer_case("atlas", **_PEER_1, **_PER_CHUNK_MUON),
    ),
    "atlas-chunk-muon-2": (
        "atlas muon_per_chunk, dim 128, 2 heads, chunk 64, T 2048",
        _layer_case("atlas", **_PEER_2, **_PER_CHUNK_MUON),
    ),
    "chunked-b16": ("chunked linear GD, d 128, b 16, T 8192", _scan_case("chunked", 16)),
    "reference-b16": ("reference linear GD, d 128, b 16, T 8192", _scan_case("reference", 16)),
    "chunked-b64": ("chunked linear GD, d 128, b 64, T 8192", _scan_case("chunked", 64)),
    "reference-b64": ("reference linear GD, d 128, b 64, T 8192", _scan_case("reference", 64)),
}
"""The programs issue 23's targets are about, by name: (what it is, its builder). The layers
at `bench peers`' two configurations (batch 2), and `bench scan`'s chunked linear path and
its plain reference at d 128."""


def measure(
    programs: dict[str, tuple[Any, tuple, int]], config: MatmulBoundConfig
) -> dict[str, Any]:
    """Time every program (`name -> (function, args, tokens per call)`) with each of its
    distinct matrix products and the matmul, in interleaved rounds; return per program its
    measured and bound tokens/s (module docstring)."""
    key = jax.random.key(config.seed)
    counts = {name: count_flops(function, *args) for name, (function, args, _) in programs.items()}
    products = sorted({product for count in counts.values() for product in count.products})
    timed: dict[Any, tuple[Any, tuple]] = {
        ("program", name): (eqx.filter_jit(function), args)
        for name, (function, args, _) in programs.items()
    }
    for index, product in enumerate(products):
        operands = _product_operands(product, jax.random.fold_in(key, index))
        timed[("product", product)] = (jax.jit(product_loop(product, config.reps)), operands)
    empty = MatrixProduct((1, 1), (1, 1), "float32", (((1,), (0,)), ((), ())))
    timed["empty"] = (jax.jit(product_loop(empty, config.reps)), _product_operands(empty, key))
    timed["gemm"] = timed_gemm(config.gemm_size, jax.random.fold_in(key, len(products)))
    seconds = _time_interleaved(timed, config.repeats, config.min_repeats, config.round_budget_s)
    gemm_flops_per_s = 2 * config.gemm_size**3 / seconds["gemm"]
    step = seconds["empty"] / (2 * config.reps + 1)
    as_operations = {p: seconds[("product", p)] / (2 * config.reps + 1) for p in products}
    rows = []
    for name, (_, _, tokens) in programs.items():
        count = counts[name]
        bound = sum(runs * as_operations[p] for p, runs in count.products.items())
        arithmetic = sum(
            runs * max(as_operations[p] - step, 0.0) for p, runs in count.products.items()
        )
        measured = seconds[("program", name)]
        rows.append(
            dict(
                program=name,
                tokens_per_s=tokens / measured,
                matrix_flops=count.matrix_flops,
                total_flops=count.total,
                distinct_products=len(count.products),
                product_runs=sum(count.products.values()),
                bound_seconds=bound,
                bound_tokens_per_s=tokens / bound,
                bound_over_measured=measured / bound,
                arithmetic_seconds=arithmetic,
                arithmetic_tokens_per_s=tokens / arithmetic if arithmetic else float("inf"),
                arithmetic_over_measured=measured / arithmetic if arithmetic else float("inf"),
                fraction_of_gemm=count.total / measured / gemm_flops_per_s,
            )
        )
    return dict(gemm_flops_per_s=gemm_flops_per_s, loop_step_seconds=step, rows=rows)


def format_table(result: dict[str, Any]) -> str:
    header = [
        "program (forward+backward)",
        "tokens/s",
        "of GEMM",
        "matrix products (distinct)",
        "bound: products as XLA runs them, tokens/s",
        "over measured",
        "bound: their arithmetic alone, tokens/s",
        "over measured",
    ]
    table_rows = [
        [
            row["program"],
            f"{row['tokens_per_s']:,.0f}",
            f"{row['fraction_of_gemm']:.0%}",
            f"{row['product_runs']:,} ({row['distinct_products']})",
            f"{row['bound_tokens_per_s']:,.0f}",
            f"{row['bound_over_measured']:.2f}x",
            f"{row['arithmetic_tokens_per_s']:,.0f}",
            f"{row['arithmetic_over_measured']:.2f}x",
        ]
        for row in result["rows"]
    ]
    return markdown_table(header, table_rows)


def run_matmul_bound_benchmark(config: MatmulBoundConfig, *, command: str) -> dict[str, Any]:
    """Measure the cases of `config`, print the table, and (unless `out_dir` is None) write
    `results.md` and `results.json` into `out_dir`."""
    start = time.perf_counter()
    names = config.cases or tuple(MATMUL_BOUND_CASES)
    unknown = [name for name in names if name not in MATMUL_BOUND_CASES]
    if unknown:
        raise ValueError(
            f"bench matmul-bound: unknown cases {unknown}; choose from {list(MATMUL_BOUND_CASES)}"
        )
    key = jax.random.key(config.seed)
    programs = {MATMUL_BOUND_CASES[name][0]: MATMUL_BOUND_CASES[name][1](key) for name in names}
    result = measure(programs, config)
    text = (
        f"GEMM: float32 {config.gemm_size}^3 matmul, {result['gemm_flops_per_s'] / 1e9:.1f} "
        f"GFLOP/s (median, same rounds). Each product timed over {config.reps} loop steps "
        f"of two chains; the loop's own cost, {result['loop_step_seconds'] * 1e6:.2f} us per "
        f"product, is subtracted in the arithmetic bound.\n\n{format_table(result)}"
    )
    print(text, flush=True)
    if config.out_dir is not None:
        write_page(
            config,
            [result],
            title="The matrix-product bound: each program's products alone, at XLA's speed",
            command=command,
            elapsed=time.perf_counter() - start,
            method="What is measured: `experiments/bench/_matmul_bound.py`.",
            body=text,
        )
    return result
