"""The `atlas-eqx` command line."""

import argparse
from collections.abc import Sequence


def _quickstart(args: argparse.Namespace) -> int:
    from ._quickstart import RecallConfig, run_quickstart

    run_quickstart(RecallConfig(seed=args.seed))
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
    quickstart.set_defaults(run=_quickstart)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
