"""The main job's task with seeds and an outer learning-rate sweep (`atlas-eqx quickstart
--sweep`): the evidence behind the README's table and the learning rates the main job uses.

Protocol. Every preset is trained as shipped (no per-preset overrides) on the main job's MQAR
miniature, for each outer learning rate of `lrs` and each seed of `seeds` (the seed sets the
initialisation and the batch order; the data splits are fixed). Three disjoint splits are
drawn from independent generator seeds: training, validation and test. The learning rate of
each preset is the one with the best mean *validation* accuracy over the seeds; the table
reports the *test* accuracy at that learning rate, mean and range over the seeds. A run whose
loss becomes non-finite counts as accuracy 0 and is reported as diverged.

Runs are independent processes' work: `jobs` workers, each pinned to its own CPU cores, and
each finished run is appended to `runs.jsonl`, so an interrupted sweep resumes where it
stopped.
"""

import dataclasses
import itertools
import json
import os
import pathlib
import time
from collections.abc import Sequence
from concurrent.futures import as_completed, ProcessPoolExecutor
from typing import Any

import numpy as np


SWEEP_PRESETS = ("atlas", "omeganet", "titans", "gated_deltanet", "transformer")
SWEEP_LRS = (3e-3, 1e-2, 2e-2)
SWEEP_SEEDS = (0, 1, 2)
VALIDATION_SEED_OFFSET = 2 * 10**6
"""The validation split's generator seed is the task seed plus this (the test split's is plus
10**6, see `experiments/training/_recall.py`)."""


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    presets: tuple[str, ...] = SWEEP_PRESETS
    lrs: tuple[float, ...] = SWEEP_LRS
    seeds: tuple[int, ...] = SWEEP_SEEDS
    steps: int = 800
    num_validation: int = 256
    jobs: int = 1
    out_dir: str = "experiments/results/mqar-sweep"


def _pin_worker(queue: Any) -> None:
    cores = queue.get()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)


def run_one(preset: str, lr: float, seed: int, steps: int, num_validation: int) -> dict[str, Any]:
    """Train one preset at one outer learning rate and seed; validation and test metrics."""
    import jax

    from ..tasks._mqar import multiquery_ar
    from ..training._recall import (
        build_model,
        count_parameters,
        mqar_batches,
        mqar_eval_batches,
        RecallModelConfig,
        RecallRunConfig,
        RecallTaskConfig,
    )
    from ..training._train import evaluate, OptimConfig, train, TrainingDiverged

    task, model, run = RecallTaskConfig(), RecallModelConfig(), RecallRunConfig()

    def split(n: int, seed_offset: int):
        return multiquery_ar(
            n,
            task.seq_len,
            task.vocab_size,
            task.num_kv_pairs,
            seed=task.seed + seed_offset,
        )

    train_task = split(task.num_train, 0)
    validation = mqar_eval_batches(split(num_validation, VALIDATION_SEED_OFFSET), run.batch_size)
    test = mqar_eval_batches(split(task.num_test, 10**6), run.batch_size)
    lm = build_model(preset, model, task.vocab_size, key=jax.random.key(seed))
    record: dict[str, Any] = dict(
        preset=preset, lr=lr, seed=seed, steps=steps, parameters=count_parameters(lm)
    )
    start = time.perf_counter()
    try:
        outcome = train(
            lm,
            mqar_batches(train_task, run.batch_size, seed),
            steps=steps,
            optim=OptimConfig(lr=lr, warmup_steps=run.warmup_steps),
            eval_fn=lambda m: evaluate(m, validation),
            eval_every=max(steps // 6, 1),
            progress=False,
            resume=False,
        )
    except TrainingDiverged as diverged:
        return record | diverged.record("accuracy", time.perf_counter() - start)
    return record | dict(
        diverged_at=None,
        validation=outcome.evaluations[-1]["accuracy"],
        test=evaluate(outcome.model, test)["accuracy"],
        curve=[(int(e["step"]), e["accuracy"]) for e in outcome.evaluations],
        tokens_per_second=outcome.tokens_per_second,
        seconds=time.perf_counter() - start,
    )


def run_sweep(config: SweepConfig = SweepConfig(), *, progress: bool = True) -> list[dict]:
    """Every (preset, lr, seed) run not yet in `out_dir/runs.jsonl`; returns all records."""
    out = pathlib.Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    records = load_runs(log)
    done = {(r["preset"], r["lr"], r["seed"], r["steps"]) for r in records}
    todo = [
        (preset, lr, seed)
        for preset in config.presets
        for lr in config.lrs
        for seed in config.seeds
        if (preset, lr, seed, config.steps) not in done
    ]
    if not todo:
        return records
    jobs = max(1, min(config.jobs, len(todo)))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    per_worker = max(1, len(cores) // jobs) if cores else 0
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Manager().Queue()
    for worker in range(jobs):
        queue.put(set(cores[worker * per_worker : (worker + 1) * per_worker]) or set(cores))
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_pin_worker, initargs=(queue,)
    ) as pool:
        futures = [
            pool.submit(run_one, preset, lr, seed, config.steps, config.num_validation)
            for preset, lr, seed in todo
        ]
        for future in as_completed(futures):
            record = future.result()
            records.append(record)
            with open(log, "a") as file:
                file.write(json.dumps(record) + "\n")
            if progress:
                print(
                    f"{record['preset']} lr {record['lr']:g} seed {record['seed']}: "
                    f"validation {record['validation']:.3f} test {record['test']:.3f} "
                    f"({record['seconds']:.0f} s)",
                    flush=True,
                )
    return records


def load_runs(path: pathlib.Path | str) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclasses.dataclass(frozen=True)
class SweepSummary:
    preset: str
    lr: float
    test_mean: float
    test_min: float
    test_max: float
    validation_mean: float
    parameters: int
    diverged: int


def summarise(
    records: Sequence[dict], presets: Sequence[str], steps: int
) -> tuple[list[SweepSummary], dict[tuple[str, float], list[dict]]]:
    """Per preset, the learning rate with the best mean validation accuracy and the test
    accuracy there (mean, min, max over seeds); also every (preset, lr) group."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for record in records:
        if record["steps"] == steps:
            groups.setdefault((record["preset"], record["lr"]), []).append(record)
    summaries = []
    for preset in presets:
        candidates = {lr: runs for (name, lr), runs in groups.items() if name == preset}
        if not candidates:
            continue
        lr = max(candidates, key=lambda lr: np.mean([r["validation"] for r in candidates[lr]]))
        runs = candidates[lr]
        tests = [r["test"] for r in runs]
        summaries.append(
            SweepSummary(
                preset=preset,
                lr=lr,
                test_mean=float(np.mean(tests)),
                test_min=float(np.min(tests)),
                test_max=float(np.max(tests)),
                validation_mean=float(np.mean([r["validation"] for r in runs])),
                parameters=runs[0]["parameters"],
                diverged=sum(r["diverged_at"] is not None for r in runs),
            )
        )
    return summaries, groups


def format_sweep(records: Sequence[dict], config: SweepConfig) -> str:
    """The chosen-learning-rate table and the full grid, as markdown."""
    summaries, groups = summarise(records, config.presets, config.steps)
    seeds = len(config.seeds)
    lines = [
        f"MQAR miniature (T 32, 4 pairs, vocabulary 64), {config.steps} AdamW steps of 32 "
        f"sequences, {seeds} seeds, outer learning rate chosen per preset on a validation "
        f"split; test accuracy at that rate, mean [min, max] over seeds.",
        "",
        "| preset | chosen lr | test accuracy, mean [range] | validation mean | parameters |",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.preset} | {s.lr:g} | {s.test_mean:.3f} [{s.test_min:.3f}, {s.test_max:.3f}] "
            f"| {s.validation_mean:.3f} | {s.parameters:,} |"
        )
    lines += [
        "",
        "Every run (validation / test accuracy per seed; `div@N`: the loss became non-finite at "
        "step N, counted as 0):",
        "",
        "| preset | lr | " + " | ".join(f"seed {seed}" for seed in config.seeds) + " |",
        "|---|---|" + "---|" * seeds,
    ]
    for (preset, lr), runs in sorted(groups.items()):
        if preset not in config.presets:
            continue
        by_seed = {r["seed"]: r for r in runs}
        cells = []
        for seed in config.seeds:
            r = by_seed.get(seed)
            if r is None:
                cells.append("-")
            elif r["diverged_at"] is not None:
                cells.append(f"div@{r['diverged_at']}")
            else:
                cells.append(f"{r['validation']:.3f} / {r['test']:.3f}")
        lines.append(f"| {preset} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + _reading(summaries, groups, config))


def _reading(
    summaries: Sequence[SweepSummary],
    groups: dict[tuple[str, float], list[dict]],
    config: SweepConfig,
) -> list[str]:
    """What the table can and cannot say: which adjacent differences exceed twice the seed
    range, and the confounds (parameter counts, rates at the grid's edge, divergences)."""
    ranked = sorted(summaries, key=lambda s: -s.test_mean)
    lines = [
        "Reading (a difference counts as resolved only when it exceeds twice the larger of the "
        "two seed ranges):",
        "",
    ]
    for better, worse in itertools.pairwise(ranked):
        gap = better.test_mean - worse.test_mean
        spread = 2 * max(better.test_max - better.test_min, worse.test_max - worse.test_min)
        verdict = "resolved" if gap > spread else "not resolved"
        lines.append(
            f"- {better.preset} - {worse.preset}: {gap:+.3f} against twice the seed range "
            f"{spread:.3f}: {verdict}."
        )
    counts = [s.parameters for s in summaries]
    edge = [s.preset for s in summaries if s.lr in (min(config.lrs), max(config.lrs))]
    diverged = sum(
        r["diverged_at"] is not None for (preset, _), runs in groups.items() for r in runs
    )
    lines += [
        "",
        "Confounds:",
        "",
        f"- Parameter counts are not equal: {min(counts):,} to {max(counts):,} "
        f"({max(counts) / min(counts) - 1:.0%} apart); every preset is at its defaults at "
        "d_model 64.",
        "- Chosen rates at the edge of the grid (the best may lie beyond it): "
        + (", ".join(edge) if edge else "none")
        + ".",
        f"- Runs whose loss became non-finite: {diverged}.",
    ]
    return lines


def chosen_learning_rates(records: Sequence[dict], config: SweepConfig) -> dict[str, float]:
    summaries, _ = summarise(records, config.presets, config.steps)
    return {s.preset: s.lr for s in summaries}
