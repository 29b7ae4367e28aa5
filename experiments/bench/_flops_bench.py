r"""`atlas-eqx bench flops`: FLOPs per token of each preset's layer, split by part, and the
fraction of a matmul's speed its forward+backward reaches, all measured in one run.

For each size (`d_model`, `n_heads`) and each preset, on a batch of `batch` sequences of
`seq_len` tokens:

- FLOPs per token of the forward (the layer, vmapped over the batch) and of the
  forward+backward (the gradient of $\mathrm{mean}(y^2)$ with respect to the layer's
  parameters and its input), counted by `count_flops` on the traced program, divided by
  `batch * seq_len`, and split into memory, feature map, Newton-Schulz, attention and the rest
  (`experiments/bench/_flops.py` says what each part holds);
- the forward+backward's tokens/s, and a float32 `gemm_size`$^3$ matmul's FLOP/s, timed in
  the same interleaved rounds (every round calls every preset and the matmul once; medians);
- achieved fraction = (forward+backward FLOPs per token) x (its tokens/s) / (the matmul's
  FLOP/s).
"""

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import atlas_eqx as ae

from ._flops import count_flops, PARTS
from ._scan import _time_interleaved, timed_gemm


_PART_TITLES = {
    "memory": "memory",
    "feature_map": "feature map",
    "newton_schulz": "Newton-Schulz",
    "attention": "attention",
    "rest": "rest",
}


@dataclass(frozen=True)
class TimedBenchConfig:
    """What every benchmark written by `write_page` shares: the float32 `gemm_size`^3 matmul
    timed beside it, its interleaved rounds (at most `repeats`; at least `min_repeats`, then
    none started after `round_budget_s`), where the page goes, and the seed of its inputs."""

    gemm_size: int = 1024
    repeats: int = 5
    min_repeats: int = 3
    round_budget_s: float = 120.0
    out_dir: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class FlopsBenchConfig(TimedBenchConfig):
    presets: tuple[str, ...] = tuple(ae.presets.__all__)
    sizes: tuple[tuple[int, int], ...] = ((64, 4),)  # (d_model, n_heads)
    seq_len: int = 2048
    batch: int = 1


def _layer_functions(layer: Any, x: jax.Array):
    """The forward and the forward+backward of `layer` on a batch `x`, as functions of
    `(layer, x)`."""

    def forward(layer_and_x):
        layer, x = layer_and_x
        return jax.vmap(layer)(x)

    def loss(layer_and_x):
        return jnp.mean(forward(layer_and_x) ** 2)

    return forward, eqx.filter_grad(loss)


def measure_size(
    config: FlopsBenchConfig, d_model: int, n_heads: int, *, timed: bool = True
) -> dict[str, Any]:
    """Counts for every preset at one size, and (with `timed`) the interleaved timings."""
    key = jax.random.key(config.seed)
    tokens = config.batch * config.seq_len
    x = jax.random.normal(jax.random.fold_in(key, 1), (config.batch, config.seq_len, d_model))
    rows: list[dict[str, Any]] = []
    timed_functions = {}
    for name in config.presets:
        layer = getattr(ae.presets, name)(d_model, n_heads, key=jax.random.fold_in(key, 2))
        forward, backward = _layer_functions(layer, x)
        row: dict[str, Any] = dict(preset=name, d_model=d_model, n_heads=n_heads)
        for label, function in (("forward", forward), ("backward", backward)):
            count = count_flops(function, (layer, x))
            row[label] = {part: count.flops[part] / tokens for part in PARTS}
            row[label]["total"] = count.total / tokens
            row[label]["transcendentals"] = count.transcendentals / tokens
            row.setdefault("unknown", set()).update(count.unknown)
        row["unknown"] = sorted(row["unknown"])
        rows.append(row)
        if timed:
            timed_functions[name] = (eqx.filter_jit(backward), ((layer, x),))
    result: dict[str, Any] = dict(d_model=d_model, n_heads=n_heads, rows=rows)
    if not timed:
        return result
    n = config.gemm_size
    timed_functions["gemm"] = timed_gemm(n, jax.random.fold_in(key, 3))
    seconds = _time_interleaved(
        timed_functions, config.repeats, config.min_repeats, config.round_budget_s
    )
    gemm_flops_per_s = 2 * n**3 / seconds["gemm"]
    result["gemm_flops_per_s"] = gemm_flops_per_s
    for row in rows:
        tokens_per_s = tokens / seconds[row["preset"]]
        row["backward_tokens_per_s"] = tokens_per_s
        row["backward_flops_per_s"] = row["backward"]["total"] * tokens_per_s
        row["fraction_of_gemm"] = row["backward_flops_per_s"] / gemm_flops_per_s
    return result


def _k(value: float) -> str:
    return f"{value / 1e3:,.1f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table of `rows` under `header`, each line ending in a newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def format_tables(result: dict[str, Any]) -> str:
    """Markdown: FLOPs per token by part for the forward and the forward+backward (kFLOP),
    and where timed, tokens/s, GFLOP/s and the fraction of the matmul's FLOP/s."""
    rows = result["rows"]
    timed = "gemm_flops_per_s" in result
    parts = [_PART_TITLES[p] for p in PARTS]
    tables = []
    for label, title in (("forward", "forward"), ("backward", "forward+backward")):
        header = ["preset", f"{title} kFLOP/token", *parts]
        if label == "backward" and timed:
            header += ["f+b tokens/s", "GFLOP/s", "of GEMM"]
        table_rows = []
        for row in rows:
            counts = row[label]
            total = counts["total"]
            cells = [row["preset"], _k(total)]
            for part in PARTS:
                share = counts[part] / total if total else 0.0
                cells.append(f"{_k(counts[part])} ({share:.0%})" if counts[part] else "0")
            if label == "backward" and timed:
                cells += [
                    f"{row['backward_tokens_per_s']:,.0f}",
                    f"{row['backward_flops_per_s'] / 1e9:.2f}",
                    f"{row['fraction_of_gemm']:.1%}",
                ]
            table_rows.append(cells)
        tables.append(markdown_table(header, table_rows))
    unknown = sorted({name for row in rows for name in row["unknown"]})
    if unknown:
        tables.append(
            f"Primitives without a rule, counted as 1 FLOP per output element: {unknown}.\n"
        )
    return "\n".join(tables)


def _environment() -> str:
    device = jax.devices()[0]
    return (
        f"{jax.default_backend()} ({device.device_kind}), {os.cpu_count()} CPU cores "
        f"({platform.machine()}), jax {jax.__version__}, float32"
    )


def run_flops_benchmark(config: FlopsBenchConfig, *, command: str) -> list[dict[str, Any]]:
    """Measure every size of `config`, print the tables, and (unless `out_dir` is None) write
    `results.md` (the tables under `command`) and `results.json` into `out_dir`."""
    start = time.perf_counter()
    results = []
    sections = []
    for d_model, n_heads in config.sizes:
        result = measure_size(config, d_model, n_heads)
        results.append(result)
        title = f"## d_model {d_model}, {n_heads} heads, batch {config.batch} x T {config.seq_len}"
        gemm = result["gemm_flops_per_s"]
        note = (
            f"GEMM peak: float32 {config.gemm_size}^3 matmul, {gemm / 1e9:.2f} GFLOP/s "
            "(median, timed in the same interleaved rounds as the layers)."
        )
        text = f"{title}\n\n{note}\n\n{format_tables(result)}"
        sections.append(text)
        print(text, flush=True)
    if config.out_dir is not None:
        write_page(
            config,
            results,
            title="FLOPs per token by part, and the achieved fraction of a matmul's speed",
            command=command,
            elapsed=time.perf_counter() - start,
            method="Method and what is measured: see the end of this page.",
            body="\n".join(sections) + "\n" + _METHOD,
        )
    return results


def write_page(
    config: TimedBenchConfig,
    results: list[dict[str, Any]],
    *,
    title: str,
    command: str,
    elapsed: float,
    method: str,
    body: str,
) -> None:
    """Write a timed benchmark's `results.md` (`title`, `command`, the machine and the rounds
    of `config`, `method`, then `body`) and `results.json` (`config` and `results`) into
    `config.out_dir` (callers write no page when it is None)."""
    assert config.out_dir is not None
    os.makedirs(config.out_dir, exist_ok=True)
    header = (
        f"# {title}\n\n```\n{command}\n```\n\n"
        f"Machine: {_environment()}; {config.repeats} interleaved rounds at most "
        f"(at least {config.min_repeats}), {elapsed:.0f} s in all. {method}\n\n"
    )
    path = os.path.join(config.out_dir, "results.md")
    with open(path, "w") as file:
        file.write(header + body)
    with open(os.path.join(config.out_dir, "results.json"), "w") as file:
        json.dump(dict(config=asdict(config), results=results), file, indent=1)
    print(f"wrote {path}")


_METHOD = """## Method

- **Counted, not modelled.** Every FLOP count is `count_flops`
  (`experiments/bench/_flops.py`) on the traced program of the layer, forward
  (`jax.vmap(layer)(x)`) and forward+backward (the gradient of mean(y^2) with respect to the
  layer's parameters and `x`), divided by batch x T. It follows XLA's conventions per
  operation (a matmul is 2mnk; element-wise arithmetic 1 per element; exp, tanh, sqrt and
  other transcendentals are not FLOPs) and multiplies every `scan` body by its length. XLA's
  own `cost_analysis()["flops"]` counts a loop body once whatever its trip count, so it
  undercounts every recurrent layer by about its number of chunks; on programs without loops,
  and on fully unrolled scans, the two counts agree (`tests/test_bench_flops.py`: a matmul
  exactly, whole transformer and linear-attention layers within 10%).
- **The split is measured too.** Each operation is charged to the part whose code traced it
  (its source frames): Newton-Schulz = `optimizers.newton_schulz`, feature map = the
  `feature_maps` package, attention = `causal_attention` (scores, softmax, weighted sum),
  memory = `MemoryLayer.run_memory` and the scans under it (reads, inner gradients, momentum,
  the chunked / exact / kernel forms), rest = everything else (q/k/v/gate/output
  projections, the short convolution, gates, norms, RoPE, the sampled curvature of W_0 that
  scales the inner step, the loss). The parts sum to the total exactly. The tests check the
  Newton-Schulz part against the hand count 5 steps x (4m^2n + 2m^3) per m x n matrix
  (m <= n) per chunk, and the rest of a DeltaNet layer against its five d x d projections.
- **Timed in one run.** tokens/s of each preset's forward+backward and the float32 matmul's
  FLOP/s come from the same interleaved rounds (every round calls every preset and the
  matmul once; medians), so a change of load on the shared machine hits them alike. The
  achieved fraction is (f+b FLOPs per token) x (f+b tokens/s) / (matmul FLOP/s). It says how
  much of the machine's matmul speed a layer's arithmetic reaches, not how fast it is: a
  layer can reach a low fraction and still be fast if it does few FLOPs.
"""
