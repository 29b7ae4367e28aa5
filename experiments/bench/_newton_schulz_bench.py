r"""`atlas-eqx bench newton-schulz`: Muon's Newton-Schulz on its own, our derivative rule against
JAX differentiating the plain steps, and the fraction of a matmul's speed each reaches.

For each batched shape `(batch, m, n)` (a batch of wide matrices, as the memory layer hands them
to NS: one per chunk or token, head and sequence), with `steps` NS steps:

- the forms: `newton_schulz` (each step $X \mapsto (aI + bA + cA^2)X$ with its hand-written
  tangent rule, `optimizers/_newton_schulz.py`) and `plain` (the steps as written,
  $X \mapsto aX + (bA + cA^2)X$, differentiated by JAX: the form it replaced, kept there as the
  tests' oracle);
- for each form, the forward and the forward+backward (the gradient of
  $\sum \mathrm{NS}(G) \odot R$ with respect to $G$), FLOPs counted by `count_flops` on the
  traced program, and all of them timed with a float32 `gemm_size`$^3$ matmul in the same
  interleaved rounds (every round calls every function once; medians);
- achieved fraction = counted FLOPs x calls/s / (the matmul's FLOP/s), and the plain form's
  time over ours.
"""

import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from optimizers._newton_schulz import (
    _iterate,
    _iterate_plain,
    _orthogonalise,
    JORDAN_COEFFICIENTS,
)

from ._flops import count_flops
from ._flops_bench import markdown_table, TimedBenchConfig, write_page
from ._scan import _time_interleaved, timed_gemm


FORMS = {"newton_schulz": _iterate, "plain": _iterate_plain}


@dataclass(frozen=True)
class NewtonSchulzBenchConfig(TimedBenchConfig):
    shapes: tuple[tuple[int, int, int], ...] = ((128, 16, 64), (512, 16, 64), (128, 32, 128))
    """`(batch, m, n)`. The defaults are what atlas's layer at batch 32 hands NS per chunk step
    at d_model 64 and 4 heads (per-chunk Muon: 128 matrices of 16 x 64; exact Muon at chunk 4:
    512), and at d_model 128 and 4 heads (128 of 32 x 128)."""
    steps: int = 5
    repeats: int = 7
    round_budget_s: float = 60.0


def _functions(form: str, steps: int):
    iterate = FORMS[form]

    def forward(G):
        return _orthogonalise(G, steps, JORDAN_COEFFICIENTS, 1e-7, iterate)

    def backward(G, R):
        return jax.grad(lambda G: jnp.sum(forward(G) * R))(G)

    return forward, backward


def measure_shape(
    config: NewtonSchulzBenchConfig, shape: tuple[int, int, int], *, timed: bool = True
) -> dict[str, Any]:
    """Counts for every form and pass at one shape, and (with `timed`) the interleaved timings."""
    key = jax.random.key(config.seed)
    G, R = (jax.random.normal(k, shape, jnp.float32) for k in jax.random.split(key))
    rows: list[dict[str, Any]] = []
    timed_functions = {}
    for form in FORMS:
        forward, backward = _functions(form, config.steps)
        for label, function, args in (("forward", forward, (G,)), ("f+b", backward, (G, R))):
            count = count_flops(function, *args)
            rows.append(
                dict(form=form, pass_=label, flops=count.total, matrix_flops=count.matrix_flops)
            )
            timed_functions[(form, label)] = (jax.jit(function), args)
    result: dict[str, Any] = dict(shape=list(shape), rows=rows)
    if not timed:
        return result
    n = config.gemm_size
    timed_functions[("gemm", "")] = timed_gemm(n, jax.random.fold_in(key, 3))
    seconds = _time_interleaved(
        timed_functions, config.repeats, config.min_repeats, config.round_budget_s
    )
    gemm_flops_per_s = 2 * n**3 / seconds[("gemm", "")]
    result["gemm_flops_per_s"] = gemm_flops_per_s
    for row in rows:
        row["seconds"] = seconds[(row["form"], row["pass_"])]
        row["flops_per_s"] = row["flops"] / row["seconds"]
        row["fraction_of_gemm"] = row["flops_per_s"] / gemm_flops_per_s
        plain = seconds[("plain", row["pass_"])]
        row["plain_over_this"] = plain / row["seconds"]
    return result


def format_table(result: dict[str, Any]) -> str:
    """Markdown: per form and pass, MFLOP per call (all, and in matrix products) and, where
    timed, ms per call, GFLOP/s, the fraction of the matmul's FLOP/s and the plain form's time
    over this one."""
    timed = "gemm_flops_per_s" in result
    header = ["form", "pass", "MFLOP", "of which matrix products"]
    if timed:
        header += ["ms", "GFLOP/s", "of GEMM", "plain / this"]
    table_rows = []
    for row in result["rows"]:
        cells = [
            f"`{row['form']}`",
            row["pass_"],
            f"{row['flops'] / 1e6:,.1f}",
            f"{row['matrix_flops'] / 1e6:,.1f}",
        ]
        if timed:
            cells += [
                f"{row['seconds'] * 1e3:.2f}",
                f"{row['flops_per_s'] / 1e9:.1f}",
                f"{row['fraction_of_gemm']:.0%}",
                f"{row['plain_over_this']:.2f}x",
            ]
        table_rows.append(cells)
    return markdown_table(header, table_rows)


def run_newton_schulz_benchmark(
    config: NewtonSchulzBenchConfig, *, command: str
) -> list[dict[str, Any]]:
    """Measure every shape of `config`, print the tables, and (unless `out_dir` is None) write
    `results.md` (the tables under `command`) and `results.json` into `out_dir`."""
    start = time.perf_counter()
    results, sections = [], []
    for shape in config.shapes:
        result = measure_shape(config, shape)
        results.append(result)
        batch, m, n = shape
        text = (
            f"## {batch} matrices of {m} x {n}, {config.steps} steps\n\n"
            f"GEMM: float32 {config.gemm_size}^3 matmul, "
            f"{result['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s (median, same rounds).\n\n"
            f"{format_table(result)}"
        )
        sections.append(text)
        print(text, flush=True)
    if config.out_dir is not None:
        write_page(
            config,
            results,
            title="Newton-Schulz on its own: our derivative rule against differentiating the steps",
            command=command,
            elapsed=time.perf_counter() - start,
            method="What is measured: `experiments/bench/_newton_schulz_bench.py`.",
            body="\n".join(sections),
        )
    return results
