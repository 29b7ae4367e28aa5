r"""The `stream` part of `atlas-eqx bench peers` (issue 8, item 4): streaming inference of a
memory-only scan, tokens per second and resident memory against the stream length T.

**What streams.** One head of a preset's memory, alone: the memory $\mathcal M_0$, feature map
$\phi$, inner optimizer, objective, window $c$ and chunk $b$ are those of the preset's
`MemoryLayerConfig` at head dimension `head_dim` (`ae.presets.atlas(head_dim, 1, ...)`: MLP
memory $x + W_1\mathrm{GELU}(W_2x)$ with hidden $4d_v$, the degree-2 polynomial map the preset
picks for the head dimension (at 64: the element-wise $k + k^{\odot2}/2$), $c = 4$, $\ell_2$
objective, Muon with 5 Newton-Schulz steps; `titans`: the same MLP memory, identity $\phi$,
$c = 1$, momentum). No projections, convolution or output layers: queries and keys are random
unit vectors and values random normal vectors of norm about 1, drawn inside the compiled call
from `fold_in(key, call index)`. The gates are fixed at the preset's initial values
($\eta$ = the layer's step at its initial gates, $\alpha$ = `decay_init`, $\theta$ = `momentum_init`, $\gamma$ =
`gamma_init` where the preset has window gates).

**How it streams.** T tokens in T / `call_tokens` calls of `atlas_eqx.omega_scan(...,
method="chunked", state=state)`, one compiled program (the same shapes every call), carrying
the `OmegaState` (fast weights, momentum, the last $c - 1$ tokens). Because `call_tokens` is a
multiple of the chunk, the calls compute exactly what one `omega_scan` over the concatenated
tokens would (digest I-7; `tests/test_bench_stream.py` checks it).

**What is measured**, in one fresh subprocess per (memory, T) pinned to two CPUs (the
`run_child` of `experiments.bench._subprocess`): the first call's time (compilation included) and
the resident memory (`VmRSS`) right after it; tokens/s over the remaining calls (each call
waits for its result, as a consumer of the stream would); `VmRSS` after every call, kept as a
trace, its maximum after the first call and its value at the end; the peak resident memory
(`VmHWM`, not `ru_maxrss`, which in a child holds its parent's peak) of the whole subprocess;
and the bytes of the carried state. "Memory flat in T" is judged from these numbers: the
growth from after the first call to the end must not scale with T (its bytes per token fall
as T grows) and must stay far below what holding the stream's own q, k, v would take
($3d$ float32 per token).

**Exact Muon.** Per-token Muon runs Newton-Schulz on every position's momentum; on a CPU that
is about 1000 tokens/s at head dimension 64. `exact_budget_s` bounds the time spent on exact
rows: exact Muon runs at `exact_lengths`, and at a longer T only if its measured tokens/s
projects that T to under `exact_budget_s` seconds; the long rows use `muon_per_chunk=True`
(Newton-Schulz once per chunk, the documented approximation, digest A-13 (i)).
"""

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from .._plot import pyplot_or_none, save_figure
from ._stream_scan import EXACT, STREAM_MEMORIES
from ._subprocess import run_child


TEN_MILLION = 10 * 2**20  # 10,485,760 tokens: 2560 calls of 4096


@dataclasses.dataclass(frozen=True)
class StreamBenchConfig:
    """The `stream` part: which memories, at which lengths, in calls of how many tokens."""

    lengths: tuple[int, ...] = (2**14, 2**17, 2**20)  # 16K, 128K, 1M tokens
    memories: tuple[str, ...] = tuple(STREAM_MEMORIES)
    exact_lengths: tuple[int, ...] = (2**14,)  # where exact Muon always runs
    exact_budget_s: float = 180.0  # exact Muon at a longer T only if projected below this
    head_dim: int = 64
    chunk: int = 16
    call_tokens: int = 4096
    threads: int = 2
    trace_points: int = 48  # the RSS trace is thinned to about this many samples
    timeout_s: float = 3600.0
    seed: int = 0

    def __post_init__(self):
        for name in ("head_dim", "chunk", "call_tokens", "threads", "trace_points"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"StreamBenchConfig: `{name}` must be an integer >= 1; got {value!r}"
                )
        if self.call_tokens % self.chunk:
            raise ValueError(
                f"StreamBenchConfig: `call_tokens`={self.call_tokens} must be a multiple of "
                f"`chunk`={self.chunk}, so that every call starts a chunk and the calls equal "
                "one scan"
            )
        if not self.lengths:
            raise ValueError("StreamBenchConfig: `lengths` is empty")
        for T in self.lengths + self.exact_lengths:
            if not isinstance(T, int) or T < self.call_tokens or T % self.call_tokens:
                raise ValueError(
                    f"StreamBenchConfig: every length must be a positive multiple of "
                    f"`call_tokens`={self.call_tokens}; got {T!r}"
                )
        unknown = [m for m in self.memories if m not in STREAM_MEMORIES]
        if unknown:
            raise ValueError(
                f"StreamBenchConfig: unknown memories {unknown}; choose from {list(STREAM_MEMORIES)}"
            )
        if not self.exact_budget_s >= 0:
            raise ValueError(
                f"StreamBenchConfig: `exact_budget_s` must be >= 0; got {self.exact_budget_s!r}"
            )


DEFAULT_STREAM_CONFIG = StreamBenchConfig()
QUICK_STREAM_CONFIG = StreamBenchConfig(
    lengths=(512, 1024), exact_lengths=(512,), head_dim=16, chunk=8, call_tokens=256
)


# ---------------------------------------------------------------------------------------------
# The parent: one subprocess per row, the table and the plot.


def _spec(name: str, T: int, config: StreamBenchConfig) -> dict[str, Any]:
    return dict(
        kind="stream",
        framework="jax",
        memory=name,
        T=T,
        head_dim=config.head_dim,
        chunk=config.chunk,
        call_tokens=config.call_tokens,
        trace_points=config.trace_points,
        seed=config.seed,
    )


def _row(name: str, T: int, result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict(memory=name, T=T, **result)
    if "error" not in result:
        timed, seconds = result["timed_tokens"], result["stream_s"]
        row["tok_s"] = timed / seconds if timed and seconds > 0 else None
        row["growth_mib"] = result["rss_end_mib"] - result["rss_first_mib"]
    return row


def format_stream_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"stream T={row['T']:<9d} {row['memory']:22s} ERROR {row['error']}"
    tok_s = row.get("tok_s")
    return (
        f"stream T={row['T']:<9d} {row['memory']:22s} "
        f"{'n/a' if tok_s is None else f'{tok_s:.0f}':>8s} tok/s  RSS first "
        f"{row['rss_first_mib']:.0f}, end {row['rss_end_mib']:.0f}, peak {row['peak_rss_mib']:.0f} MiB"
    )


def run_stream_benchmark(
    config: StreamBenchConfig = StreamBenchConfig(),
    *,
    run: Callable[[dict[str, Any], int, float], dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every memory at every length, one subprocess each (`run`, default `run_child`).
    Exact Muon runs at `exact_lengths` and at a longer T only if its measured tokens/s projects
    that T under `exact_budget_s`. Returns the rows and notes on what was left out and why."""
    if run is None:
        run = run_child
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    lengths = sorted(set(config.lengths))
    for name in config.memories:
        exact = name == EXACT
        todo = sorted(set(config.exact_lengths)) if exact else lengths
        for T in todo:
            row = _row(name, T, run(_spec(name, T, config), config.threads, config.timeout_s))
            rows.append(row)
            print(format_stream_line(row), flush=True)
        if exact:
            measured = [float(r["tok_s"]) for r in rows if r["memory"] == name and r.get("tok_s")]
            tok_s = max(measured) if measured else None
            for T in [T for T in lengths if T not in todo]:
                projected = None if tok_s is None else T / tok_s
                if projected is not None and projected <= config.exact_budget_s:
                    row = _row(
                        name, T, run(_spec(name, T, config), config.threads, config.timeout_s)
                    )
                    rows.append(row)
                    print(format_stream_line(row), flush=True)
                else:
                    notes.append(
                        f"{name} not run at T = {T:,}: "
                        + (
                            "no measured tokens/s to project from"
                            if projected is None
                            else f"{T:,} tokens at {tok_s:.0f} tok/s would take {projected:.0f} s "
                            f"(budget {config.exact_budget_s:.0f} s)"
                        )
                    )
    rows.sort(key=lambda r: (list(config.memories).index(r["memory"]), r["T"]))
    return rows, notes


def _tokens(T: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if T >= size and T % size == 0:
            return f"{T // size}{unit} ({T:,})"
    return f"{T:,}"


def format_stream_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| memory | T tokens | calls | tok/s (after the first call) | first call s | RSS after "
        "imports MiB | RSS after first call MiB | max RSS after MiB | RSS at end MiB | growth "
        "first to end MiB | peak RSS MiB | carried state KiB | compiled | finite |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['memory']} | {_tokens(r['T'])} | error: {r['error']} |" + " |" * 11)
            continue
        tok_s = r.get("tok_s")
        lines.append(
            f"| {r['memory']} | {_tokens(r['T'])} | {r['calls']} | "
            f"{'n/a' if tok_s is None else f'{tok_s:,.0f}'} | {r['first_call_s']:.1f} | "
            f"{r['rss_imports_mib']:.0f} | {r['rss_first_mib']:.1f} | {r['rss_max_mib']:.1f} | "
            f"{r['rss_end_mib']:.1f} | {r['growth_mib']:+.1f} | {r['peak_rss_mib']:.1f} | "
            f"{r['state_kib']:.0f} | {r['compilations']} | {'yes' if r['finite'] else 'NO'} |"
        )
    return "\n".join(lines)


def flatness_summary(rows: Sequence[dict[str, Any]], head_dim: int) -> list[str]:
    """Per memory: the growth of RSS (after the first call to the end) and the peak at every
    T, and the growth per token at the longest T against the bytes per token that holding
    the stream's q, k, v (float32) would take: the evidence for or against "flat in T"."""
    lines = []
    held = 3 * head_dim * 4  # bytes per token of q, k, v in float32
    for name in dict.fromkeys(r["memory"] for r in rows):
        good = sorted(
            (r for r in rows if r["memory"] == name and "error" not in r), key=lambda r: r["T"]
        )
        if len(good) < 2:
            continue
        long = good[-1]
        per_token = long["growth_mib"] * 2**20 / long["T"]
        lines.append(
            f"- **{name}**: growth "
            + ", ".join(f"{r['growth_mib']:+.1f} MiB at {_tokens(r['T'])}" for r in good)
            + f" ({long['T'] // good[0]['T']}x the tokens); RSS at the end "
            f"{good[0]['rss_end_mib']:.1f} -> {long['rss_end_mib']:.1f} MiB, peak "
            f"{good[0]['peak_rss_mib']:.1f} -> {long['peak_rss_mib']:.1f} MiB. At "
            f"T = {long['T']:,} the growth is {per_token:.1f} bytes per token, against "
            f"{held} bytes per token ({held * long['T'] / 2**20:,.0f} MiB) to hold the "
            "stream's q, k, v."
        )
    return lines


def plot_stream(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> bool:
    """Tokens/s against T, and resident memory against tokens streamed (every row's trace),
    log x. Returns False if matplotlib is missing."""
    plt = pyplot_or_none()
    if plt is None:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(dict.fromkeys(r["memory"] for r in rows))
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    for name in names:
        good = [r for r in rows if r["memory"] == name and r.get("tok_s")]
        if good:
            left.plot(
                [r["T"] for r in good],
                [r["tok_s"] for r in good],
                marker="o",
                color=colours[name],
                label=name,
            )
        for r in rows:
            if r["memory"] == name and "error" not in r:
                tokens, rss = zip(*r["rss_trace"], strict=True)
                right.plot(tokens, rss, color=colours[name], alpha=0.8, marker=".", markersize=3)
                right.scatter([r["T"]], [r["peak_rss_mib"]], color=colours[name], marker="^", s=30)
        right.plot([], [], color=colours[name], label=name)
    right.scatter([], [], color="grey", marker="^", label="peak RSS of the run")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    left.set_yscale("log")
    left.set_xlabel("stream length T (tokens)")
    left.set_ylabel("tokens/s after the first call")
    left.set_title("memory-only streaming, one head, float32, 2 threads")
    right.set_xlabel("tokens streamed so far")
    right.set_ylim(bottom=0)
    right.set_ylabel("resident memory VmRSS (MiB), from 0")
    right.set_title("VmRSS after every call (one line per run)")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path)
    return True


def stream_markdown(
    rows: Sequence[dict[str, Any]],
    notes: Sequence[str],
    config: StreamBenchConfig,
    *,
    command: str,
    machine: str,
    versions: str,
    plotted: bool,
) -> str:
    exact = [r for r in rows if r["memory"] == EXACT and r.get("tok_s")]
    caption = (
        f"One head at head dimension {config.head_dim}, chunk {config.chunk}, calls of "
        f'{config.call_tokens} tokens (one compiled `omega_scan(method="chunked", '
        "state=state)` program carrying the `OmegaState`; 'compiled' counts the programs "
        "traced in the run), float32, random unit queries and keys, random values, the "
        "preset's initial gates held fixed; each row a fresh subprocess pinned to 2 CPUs. "
        "tok/s excludes the first call (compilation); RSS is `VmRSS` sampled after every "
        "call, peak RSS the subprocess's `VmHWM` (imports and compilation included); "
        "growth = RSS at the end minus RSS after the first call."
    )
    if any(r["memory"] == "atlas muon_per_chunk" for r in rows):
        caption += (
            " The rows 'atlas muon_per_chunk' use `muon_per_chunk=True`: Newton-Schulz once "
            "per chunk on the chunk-end momentum, the documented approximation (digest A-13 "
            "(i)), not the exact per-token Muon of the preset."
        )
    skipped = [
        T for T in config.lengths if not any(r["memory"] == EXACT and r["T"] == T for r in rows)
    ]
    if exact and skipped and EXACT in config.memories:
        best = max(r["tok_s"] for r in exact)
        longest = max(skipped)
        caption += (
            f" **Exact Muon streams {best:,.0f} tok/s here, so T = {longest:,} would take about "
            f"{longest / best / 60:.0f} min: the exact row is measured only where it fits "
            f"(T <= {max(r['T'] for r in exact):,}), and the long atlas rows are "
            "muon_per_chunk.**"
        )
    parts = [
        "# Streaming inference: a memory-only scan at long T (`atlas-eqx bench peers`, part `stream`)",
        f"```\n{command}\n```",
        f"Machine: {machine}. {versions}.",
        caption,
        format_stream_table(rows),
    ]
    if notes:
        parts.append("Left out:\n\n" + "\n".join(f"- {n}" for n in notes))
    summary = flatness_summary(rows, config.head_dim)
    if summary:
        parts.append("Memory against T, from the rows above:\n\n" + "\n".join(summary))
    setups = {r["memory"]: r["setup"] for r in rows if "setup" in r}
    if setups:
        parts.append(
            "What streams (the preset's `MemoryLayerConfig` at one head, built by "
            "`experiments.bench._stream_scan.stream_setup`):\n\n"
            + "\n".join(f"- **{name}**: {text}." for name, text in setups.items())
        )
    parts.append(
        "The carried state (fast weights, momentum, the last c - 1 tokens) has a size fixed by "
        "the configuration, the same at every T (column 'carried state')."
    )
    parts.append("![stream](stream.png)" if plotted else "(matplotlib missing: no plot)")
    return "\n\n".join(parts)


def write_stream_results(
    config: StreamBenchConfig,
    out_dir: str | pathlib.Path,
    *,
    command: str,
    machine: str,
    versions: str,
    run: Callable[[dict[str, Any], int, float], dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Run the `stream` part and write `stream.md`, `stream.png` and `stream.json` (the rows
    with their RSS traces) under `out_dir`."""
    print("streaming inference ...", flush=True)
    rows, notes = run_stream_benchmark(config, run=run)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(command=command, machine=machine, versions=versions, rows=rows, notes=notes)
    (out / "stream.json").write_text(json.dumps(record, indent=1) + "\n")
    plotted = plot_stream(rows, out / "stream.png")
    text = stream_markdown(
        rows, notes, config, command=command, machine=machine, versions=versions, plotted=plotted
    )
    (out / "stream.md").write_text(text + "\n")
    print(f"wrote {out / 'stream.md'}" + (f" and {out / 'stream.png'}" if plotted else ""))
    return rows, text
