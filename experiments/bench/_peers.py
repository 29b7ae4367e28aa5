r"""`atlas-eqx bench peers`: our memory layers against titans-pytorch, side by side in one run.

Five parts (issue 8, items 1 to 5; item 4, streaming inference, is `experiments.bench._stream`
and writes its own `stream.md`):

1. **Matched layers.** Our `titans` preset (and `atlas` beside it) against titans-pytorch's
   `NeuralMemory` at the same width, heads, chunk, length, batch 2 and float32: forward and
   forward+backward tokens/s and peak memory. titans-pytorch runs twice: with its default
   `batch_size=None` (every surprise gradient of the sequence is taken at the sequence-start
   weights) and with `batch_size=chunk` (gradients at the weights after the previous chunk,
   the paper's semantics and ours). Every row also has its FLOPs per token (ours counted on
   the jaxpr, `experiments.bench._flops`; titans-pytorch's by torch's `FlopCounterMode`;
   compared on matrix products, all torch counts) and its rate against a float32 GEMM timed
   at the start of each round; our titans and per-chunk atlas rows split their
   forward+backward time by kind of XLA operation (`experiments.bench._op_profile`).
2. **Numerical cross-check** where the definitions coincide (`cross_check`): titans-pytorch
   reduced to `chunk_size=1` (its gates, reads and batches then work per token) is our
   `omega_scan` with `chunk_size` equal to its `batch_size`, for a linear memory with
   $W_0 = 0$ and no momentum (DeltaNet) and for the deep memory with momentum and retention
   when $\eta$ is constant; fla's own `delta_rule_recurrence` is our `deltanet` at
   `chunk_size=1`. Where they differ by definition (a per-token $\eta$ with momentum, I-15;
   our frozen-anchor chunks against fla's exact chunkwise delta rule) the difference is
   printed as such.
3. **Language-model training step** of our `transformer` preset against recurrent presets at
   T in {512, 2048, 8192}.
4. **Streaming inference** (part `stream`, `experiments.bench._stream`): tokens/s and resident
   memory of a memory-only atlas scan (and titans) streamed at 16K, 128K and 1M tokens (10M
   with `--ten-million`), one subprocess per length: `stream.md` and `stream.png`.
5. **Output**: `results.md` (tables, ratios ours/peer) and `throughput.png`.

**How it is measured.** Every (implementation, configuration) runs in a fresh Python
subprocess pinned to two CPUs (`os.sched_setaffinity` before jax or torch is imported,
`torch.set_num_threads(2)`, `OMP_NUM_THREADS=2`; XLA sizes its pool from the affinity mask): it builds the layer, runs one warm-up call (its time is the
"first call", compilation for JAX), then `repeats` timed calls, and keeps the median; first
the forward, then the forward+backward (gradient of `mean(y**2)` with respect to every
parameter; torch forward under `torch.no_grad()`). **Peak memory** is the subprocess's
`VmHWM` (the high-water mark of resident memory over the whole child: imports, build,
compilation, forward and forward+backward), reported beside the resident memory right after
the imports, so both frameworks are measured by the same rule; `tracemalloc` would not see
XLA's or torch's allocators. Not `ru_maxrss`: Linux carries the parent's high-water mark
into a child started by `subprocess` (fork or vfork, then exec), so a child's `ru_maxrss` is
at least the parent's peak at the time of the spawn (measured: a 600 MiB parent gives a bare
Python child `ru_maxrss` 614 MiB and `VmHWM` 13 MiB); before this was noticed (the stream
part) the peak RSS of `results.md` was `ru_maxrss`, so a row's peak there may be the
parent's. For JAX the compiled forward+backward's own buffer assignment (`memory_analysis`:
arguments + outputs + temporaries) is given too.
"""

import pathlib

from ._cross_check import cross_check_numpy, cross_check_peers, format_cross_check
from ._peer_packages import require_peers
from ._peers_report import (
    _machine_line,
    _versions,
    DIFFERENCES,
    format_flop_table,
    format_forward_ratios,
    format_layer_table,
    format_lm_table,
    format_profile_table,
    format_targets,
    format_time_by_kind,
    plot_results,
)
from ._peers_runs import PeersBenchConfig, run_layer_benchmark, run_lm_benchmark
from ._stream import DEFAULT_STREAM_CONFIG, StreamBenchConfig, write_stream_results


def run_peers_benchmark(
    config: PeersBenchConfig = PeersBenchConfig(),
    *,
    command: str = "atlas-eqx bench peers",
    layers: bool = True,
    lm: bool = True,
    stream: StreamBenchConfig | None = DEFAULT_STREAM_CONFIG,
) -> str:
    """Items 1 to 5: run everything, write `results.md` and `throughput.png` under
    `config.out_dir`, and return the markdown. `stream` (item 4, `None` skips it) writes its
    own `stream.md` and `stream.png` there (`experiments.bench._stream`). With `layers` and
    `lm` both off, `results.md` is left as it is (only the cross-check and the stream part
    run), so that rerunning the stream part alone does not blank the layer tables."""
    require_peers()
    machine = _machine_line()
    versions = _versions()
    print(f"{command}\n{machine}\n{versions}", flush=True)
    rows = run_layer_benchmark(config) if layers else []
    profile = run_layer_benchmark(config, config.profile) if layers and config.profile else []
    print("numerical cross-check ...", flush=True)
    checks = cross_check_numpy() + cross_check_peers()
    print(format_cross_check(checks), flush=True)
    lm_rows = run_lm_benchmark(config) if lm else []
    out = pathlib.Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stream_text = None
    if stream is not None:
        _, stream_text = write_stream_results(
            stream, out, command=command, machine=machine, versions=versions
        )
    if not (layers or lm):
        print(f"{out / 'results.md'} not rewritten: the layers and lm parts were skipped")
        return stream_text or ""
    plotted = plot_results(rows, lm_rows, out / "throughput.png")
    text = "\n\n".join(
        [
            "# Benchmarks against the peers (`atlas-eqx bench peers`)",
            f"```\n{command}\n```",
            f"Machine: {machine}. {_versions()}. float32, batch {config.batch}, "
            f"{config.threads} threads per framework, median of up to {config.repeats} timed "
            f"calls after one warm-up call (LM: {config.lm_repeats}; fewer once "
            f"{config.budget_s:.0f} s of timed calls are spent: the column 'timed calls' gives "
            "the count). Measured by the rules "
            "in the docstring of `experiments/bench/_peers.py`: one fresh subprocess per "
            "row; peak RSS is that process's `VmHWM` (imports, build, compilation, "
            "forward and forward+backward together), beside its resident memory after the "
            "imports; XLA f+b buffers is the compiled forward+backward's buffer assignment.",
            "## 1. Matched memory layers: ours against titans-pytorch `NeuralMemory`",
            format_layer_table(rows) if rows else "(not run)",
            "Forward ratios:",
            format_forward_ratios(rows) if rows else "(not run)",
            "FLOPs per token, counted on each program without running it: ours on the jaxpr "
            "(`experiments.bench._flops.count_flops`, every loop at its trip count), "
            "titans-pytorch by `torch.utils.flop_counter.FlopCounterMode` on one call. torch "
            "counts only matrix products, so the ratio and the rates use the matrix-product "
            "FLOPs of both (ours in brackets; the first figure also counts element-wise work). "
            f"The GEMM is a float32 {config.gemm_size}^3 matmul timed in its own subprocess at "
            "the start of each round. The last column is the ceiling that FLOP count sets: "
            "titans-pytorch's measured tokens/s against ours had ours reached the GEMM's rate.",
            format_flop_table(rows) if rows else "(not run)",
            DIFFERENCES,
            "### Where our layers' time goes",
            "The memory scan alone (`run_memory` on precomputed q, k, v and gates; its "
            "backward reaches them and $W_0$) and atlas with `ns_steps=0` (Muon's "
            "normalisation without the five Newton-Schulz iterations), as a share of the "
            "full layer's median time in the table above (separate subprocesses, so shares "
            "carry the run-to-run noise of a shared machine).",
            format_profile_table(rows, profile) if profile else "(not run)",
            "The forward+backward's operation time by kind of XLA operation (exclusive "
            "times from one `jax.profiler` trace of three calls after the timed ones; kinds "
            "as defined in `experiments/bench/_op_profile.py`):",
            format_time_by_kind(rows) if rows else "(not run)",
            "## 2. Numerical cross-check where the definitions coincide",
            "titans-pytorch reduced to `chunk_size=1` (one head, no RMSNorms, no "
            "`ResidualNorm`; its `batch_size` = our `chunk_size`), float64, against our "
            '`omega_scan(method="chunked")` in float32 with the same projections, gates and '
            "initial memory; fla's `delta_rule_recurrence` (float32) against our `deltanet` "
            "rule (linear memory, $W_0 = 0$, GD, $\\alpha = 1$, c = 1). Rows marked "
            "'differ' differ by definition: Titans' momentum form with a per-token $\\eta$ "
            "(I-15), and our frozen-anchor chunks (b = 8) against fla's exact delta rule. "
            "No configuration makes titans-pytorch's own chunking (`chunk_size > 1`) equal "
            "ours: it reads at chunk granularity and shares momentum and decay per chunk.",
            format_cross_check(checks),
            "## 3. Language-model training step: recurrent presets against attention",
            f"`LanguageModel`, vocabulary {config.lm_vocab}, d_model {config.lm_d_model}, "
            f"{config.lm_layers} blocks, {config.lm_heads} heads, chunk {config.lm_chunk}, "
            f"batch {config.batch}; one jitted step = forward, backward and AdamW.",
            format_lm_table(lm_rows) if lm_rows else "(not run)",
            "## 4. Streaming inference (part `stream`)",
            "Tokens/s and resident memory of a memory-only atlas (and titans) scan streamed "
            "in fixed-size calls with the carried state, at T up to 1M tokens: "
            "[stream.md](stream.md), [stream.png](stream.png)"
            + ("" if stream is not None else " (not rerun in this run: `--skip stream`)")
            + ".",
            "## Targets",
            format_targets(rows, lm_rows),
            "![throughput](throughput.png)" if plotted else "(matplotlib missing: no plot)",
        ]
    )
    (out / "results.md").write_text(text + "\n")
    print(f"wrote {out / 'results.md'}" + (f" and {out / 'throughput.png'}" if plotted else ""))
    return text
