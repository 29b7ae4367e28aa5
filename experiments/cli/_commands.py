"""What each `atlas-eqx` subcommand runs: one handler per subcommand (`args.run`), each
importing the subpackage it drives when it runs, and the help texts of the options that come
from a configuration class. The parser: `_main.py`."""

import argparse
import dataclasses
import json
import shlex
import sys


def _quickstart(args: argparse.Namespace) -> int:
    from ..studies import QuickstartConfig, run_quickstart

    if args.sweep:
        from ..studies import format_sweep, run_sweep, SweepConfig

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
    "over heads; sizes multiply to the device count of all processes (empty: one device, or "
    "data=<all devices> with several processes)",
    "num_processes": "processes of a multi-process job (jax.distributed; one per host); "
    "`atlas-eqx launch -n N train ...` starts N on this machine",
    "process_id": "this process's index in [0, num_processes); process 0 writes the run directory",
    "coordinator": "HOST:PORT that process 0 serves the job on (same in every process; "
    "needed when num_processes > 1)",
}


def _train(args: argparse.Namespace) -> int:
    from ..training import config_from_args, run_training, TrainConfig

    config = config_from_args(TrainConfig, args)
    if args.stop_after is not None and args.stop_after < 1:
        raise SystemExit(f"--stop-after must be >= 1; got {args.stop_after}")
    metrics = run_training(config, progress=not args.no_progress, stop_after=args.stop_after)
    if config.process_id == 0:
        print(json.dumps(metrics, indent=2))
    return 0


def _launch(args: argparse.Namespace) -> int:
    from ._launch import launch_local

    return launch_local(args.num_processes, args.child, debug=args.debug)


def _eval(args: argparse.Namespace) -> int:
    from ..training import run_evaluation

    print(json.dumps(run_evaluation(args.run_dir), indent=2))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .._plot import plot_metrics

    plot_metrics(args.metrics, args.out, key=args.key)
    print(f"wrote {args.out}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from ..tasks import fetch_corpus

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

    from ..bench import (
        PeersBenchConfig,
        PeersMissing,
        QUICK_CONFIG,
        QUICK_STREAM_CONFIG,
        run_peers_benchmark,
        StreamBenchConfig,
        TEN_MILLION,
    )

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


def _bench_flops(args: argparse.Namespace) -> int:
    from ..bench import FlopsBenchConfig, run_flops_benchmark

    heads = args.n_heads * len(args.d_model) if len(args.n_heads) == 1 else args.n_heads
    if len(heads) != len(args.d_model):
        raise SystemExit("atlas-eqx bench flops: give one --n-heads, or one per --d-model")
    config = FlopsBenchConfig(
        sizes=tuple(zip(args.d_model, heads, strict=True)),
        seq_len=args.seq_len,
        batch=args.batch,
        gemm_size=args.gemm_size,
        repeats=5 if args.repeats is None else args.repeats,
        out_dir=args.out_dir or "experiments/results/bench-flops",
    )
    if args.presets is not None:
        config = dataclasses.replace(config, presets=tuple(args.presets))
    run_flops_benchmark(config, command="atlas-eqx " + shlex.join(args.argv))
    return 0


def _bench_newton_schulz(args: argparse.Namespace) -> int:
    from ..bench import NewtonSchulzBenchConfig, run_newton_schulz_benchmark

    config = NewtonSchulzBenchConfig(
        gemm_size=args.gemm_size,
        out_dir=args.out_dir or "experiments/results/bench-newton-schulz",
    )
    if args.repeats is not None:
        config = dataclasses.replace(config, repeats=args.repeats)
    if args.shapes is not None:
        try:
            shapes = tuple(tuple(int(n) for n in shape.split("x")) for shape in args.shapes)
        except ValueError:
            shapes = ()
        if not shapes or any(len(shape) != 3 or min(shape) < 1 for shape in shapes):
            raise SystemExit(
                "atlas-eqx bench newton-schulz: --shapes takes BATCHxMxN with positive "
                f"integers, such as 128x16x64; got {args.shapes}"
            )
        config = dataclasses.replace(config, shapes=shapes)
    run_newton_schulz_benchmark(config, command="atlas-eqx " + shlex.join(args.argv))
    return 0


def _bench_matmul_bound(args: argparse.Namespace) -> int:
    from ..bench import MatmulBoundConfig, run_matmul_bound_benchmark

    config = MatmulBoundConfig(
        cases=tuple(args.cases or ()),
        gemm_size=args.gemm_size,
        out_dir=args.out_dir or "experiments/results/bench-matmul-bound",
    )
    if args.repeats is not None:
        config = dataclasses.replace(config, repeats=args.repeats)
    run_matmul_bound_benchmark(config, command="atlas-eqx " + shlex.join(args.argv))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ..bench import run_scan_benchmark, ScanBenchConfig

    if args.what == "peers":
        return _bench_peers(args)
    if args.what == "exact":
        from ..bench import ExactBenchConfig, run_exact_benchmark

        run_exact_benchmark(
            ExactBenchConfig(
                length=max(args.lengths),
                block_sizes=tuple(args.block_sizes),
                repeats=5 if args.repeats is None else args.repeats,
                out_dir=args.out_dir or "experiments/results/exact-chunked",
            )
        )
        return 0
    if args.what == "flops":
        return _bench_flops(args)
    if args.what == "newton-schulz":
        return _bench_newton_schulz(args)
    if args.what == "matmul-bound":
        return _bench_matmul_bound(args)
    if args.what != "scan":
        raise SystemExit(
            f"atlas-eqx bench: unknown benchmark {args.what!r}; choose from: scan, peers, "
            "exact, flops, newton-schulz, matmul-bound"
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

    from ..training import config_from_args, stream_compare, stream_run, stream_sweep, StreamConfig

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
    from ..studies import run_result

    print(run_result(args.name, args.out, quick=args.quick, progress=not args.no_progress))
    return 0


def _probe(args: argparse.Namespace) -> int:
    import time

    from ..studies import format_table, probe_presets, write_table

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
