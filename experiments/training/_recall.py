"""MQAR (Zoology's multi-query associative recall) training runs: one small language model per
preset, trained on the same data, scored on held-out examples.

This is the main job's engine (`atlas-eqx quickstart`) and the building block of the MQAR
results. The loss is next-token cross-entropy at the query positions only (Zoology's
protocol); accuracy is the per-example fraction of queries answered, averaged over examples.
"""

import dataclasses
import math
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np

import atlas_eqx as ae

from .._plot import pyplot_or_none, save_figure
from ..tasks._mqar import multiquery_ar
from ._train import Batch, evaluate, OptimConfig, train, TrainingDiverged


ELEMENTWISE_FEATURES = {"feature_map": "elementwise", "feature_include_constant": False}
STUDY_OPTIONS = {
    "atlas": {"muon_per_chunk": True, "chunk_size": 16, **ELEMENTWISE_FEATURES, "lr_max": 1 / 9},
    "omeganet": {**ELEMENTWISE_FEATURES, "lr_max": 0.02},
}
"""The per-preset options the results pages under `experiments/results/` (lm, mqar-state,
niah-*) were produced with, kept so those pages regenerate as written: Atlas with one
Newton-Schulz per chunk of 16, the element-wise map and the former eta_max 1/(c kappa), and
OmegaNet capped at eta_max 0.02. The presets' own defaults have since changed (issue 18)."""


@dataclasses.dataclass(frozen=True)
class RecallTaskConfig:
    """An MQAR miniature (Zoology's MQAR at a CI size: vocabulary 64, T 32, 4 pairs)."""

    seq_len: int = 32
    num_kv_pairs: int = 4
    vocab_size: int = 64
    num_train: int = 8192
    num_test: int = 256
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class RecallModelConfig:
    """The language model around each preset (Llama blocks, digest 7.1)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    chunk_size: int | None = None
    """`None`: each preset's own chunk size b (the main job uses the presets as shipped)."""
    window: int | None = None
    """`None`: each preset's own Omega window c."""


@dataclasses.dataclass(frozen=True)
class RecallRunConfig:
    """Which presets, how long, and where the outputs go."""

    presets: tuple[str, ...] = ("atlas", "omeganet", "titans", "gated_deltanet", "transformer")
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-2
    warmup_steps: int = 20
    eval_every: int = 100
    seed: int = 0
    out_dir: str = "experiments/results/quickstart"
    preset_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    """Extra config fields per preset, e.g. `{"atlas": {"muon_per_chunk": False}}`."""
    preset_lr: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """Outer learning rate per preset; `lr` for the presets not named."""


@dataclasses.dataclass
class RecallResult:
    preset: str
    accuracy: float
    test_loss: float
    parameters: int
    state_floats: int
    tokens_per_second: float
    seconds: float
    curve: list[tuple[int, float]]
    diverged_at: int | None = None


def build_model(
    preset: str,
    model: RecallModelConfig,
    vocab_size: int,
    *,
    key,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """A `LanguageModel` whose mixers are `atlas_eqx.presets.<preset>(..., **options)`."""
    options = {**layout_options(preset, model.chunk_size, model.window), **(options or {})}
    return ae.LanguageModel(
        vocab_size,
        model.d_model,
        model.n_layers,
        model.n_heads,
        key=key,
        mixer=preset,
        mixer_options=options,
    )


def layout_options(preset: str, chunk_size: int | None, window: int | None) -> dict[str, Any]:
    """The `chunk_size` and Omega `window` a preset takes (attention takes neither; the
    online presets, c = 1 by definition, keep their window); `None` keeps the preset's own."""
    if preset in ("transformer", "swa"):
        return {}
    options: dict[str, Any] = {} if chunk_size is None else dict(chunk_size=chunk_size)
    online = ("titans", "deltanet", "gated_deltanet", "linear_attention", "dla", "deep_transformer")
    if window is not None and preset not in online:
        options["window"] = window
    return options


def count_parameters(model: Any) -> int:
    """Number of trained scalars (inexact array leaves)."""
    return int(sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))))


def recurrent_state_floats(model: Any, max_length: int) -> int:
    """Floats in the streaming state after `max_length` tokens (a KV cache grows with T)."""
    state = eqx.filter_eval_shape(model.init_state, max_length)
    return int(
        sum(
            math.prod(x.shape)
            for x in jax.tree.leaves(state)
            if hasattr(x, "dtype") and np.issubdtype(x.dtype, np.floating)
        )
    )


def mqar_batches(task, batch_size: int, seed: int):
    """`batch_fn(step)`: `batch_size` distinct training sequences drawn from `(seed, step)`."""
    n = task.inputs.shape[0]

    def batch_fn(step: int):
        rng = np.random.default_rng((seed, step))
        index = rng.choice(n, size=batch_size, replace=False)
        return task.inputs[index], task.targets[index]

    return batch_fn


def mqar_eval_batches(task, batch_size: int) -> list[Batch]:
    """The test sequences in order, in whole batches."""
    n = task.inputs.shape[0]
    return [
        (task.inputs[i : i + batch_size], task.targets[i : i + batch_size])
        for i in range(0, n - batch_size + 1, batch_size)
    ]


def run_recall(
    task: RecallTaskConfig = RecallTaskConfig(),
    model: RecallModelConfig = RecallModelConfig(),
    run: RecallRunConfig = RecallRunConfig(),
    *,
    progress: bool = True,
) -> list[RecallResult]:
    """Train one model per preset on the same MQAR data and score it on the test split."""
    train_task = multiquery_ar(
        task.num_train, task.seq_len, task.vocab_size, task.num_kv_pairs, seed=task.seed
    )
    test_task = multiquery_ar(
        task.num_test, task.seq_len, task.vocab_size, task.num_kv_pairs, seed=task.seed + 10**6
    )
    test_batches = mqar_eval_batches(test_task, run.batch_size)
    out = pathlib.Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for preset in run.presets:
        log_path = out / f"{preset}.jsonl"
        log_path.unlink(missing_ok=True)  # a fresh run, not appended to an earlier one
        lm = build_model(
            preset,
            model,
            task.vocab_size,
            key=jax.random.key(run.seed),
            options=run.preset_options.get(preset),
        )
        start = time.perf_counter()
        try:
            outcome = train(
                lm,
                mqar_batches(train_task, run.batch_size, run.seed),
                steps=run.steps,
                optim=OptimConfig(
                    lr=run.preset_lr.get(preset, run.lr), warmup_steps=run.warmup_steps
                ),
                eval_fn=lambda m: evaluate(m, test_batches),
                eval_every=run.eval_every,
                log_path=log_path,
                progress=progress,
                description=preset,
                resume=False,
            )
        except TrainingDiverged as diverged:
            # Reported in the table as a result (it is one), not hidden by a crash.
            results.append(
                RecallResult(
                    preset=preset,
                    accuracy=float("nan"),
                    test_loss=float("nan"),
                    parameters=count_parameters(lm),
                    state_floats=recurrent_state_floats(lm, task.seq_len),
                    tokens_per_second=float("nan"),
                    seconds=time.perf_counter() - start,
                    curve=[(int(e["step"]), e["accuracy"]) for e in diverged.evaluations],
                    diverged_at=diverged.step,
                )
            )
            continue
        seconds = time.perf_counter() - start
        final = outcome.evaluations[-1]
        results.append(
            RecallResult(
                preset=preset,
                accuracy=final["accuracy"],
                test_loss=final["loss"],
                parameters=count_parameters(outcome.model),
                state_floats=recurrent_state_floats(outcome.model, task.seq_len),
                tokens_per_second=outcome.tokens_per_second,
                seconds=seconds,
                curve=[(int(e["step"]), e["accuracy"]) for e in outcome.evaluations],
            )
        )
    return results


def format_recall_table(results: Sequence[RecallResult]) -> str:
    """A markdown table of the results."""
    lines = [
        "| preset | MQAR accuracy | test loss | parameters | state floats (T tokens) "
        "| train tok/s | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.diverged_at is not None:
            lines.append(
                f"| {r.preset} | diverged (NaN loss at step {r.diverged_at}) | - "
                f"| {r.parameters:,} | {r.state_floats:,} | - | {r.seconds:.0f} |"
            )
            continue
        lines.append(
            f"| {r.preset} | {r.accuracy:.3f} | {r.test_loss:.3f} | {r.parameters:,} "
            f"| {r.state_floats:,} | {r.tokens_per_second:,.0f} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def plot_recall_curves(results: Sequence[RecallResult], path: pathlib.Path | str) -> bool:
    """Test accuracy against training step, one line per preset; `False` without matplotlib."""
    plt = pyplot_or_none()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(6, 4))
    for r in results:
        if not r.curve:
            continue
        steps, accuracies = zip(*r.curve, strict=True)
        axis.plot(steps, accuracies, marker="o", label=r.preset)
    axis.set_xlabel("training step")
    axis.set_ylabel("MQAR test accuracy")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend()
    save_figure(figure, path)
    return True
