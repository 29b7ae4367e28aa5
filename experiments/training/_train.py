"""The outer training loop: AdamW with warmup + cosine decay, gradient clipping, a jit-compiled
step, periodic evaluation, a progress bar, JSONL metrics and checkpoints that resume exactly.

Data is a pure function of the step number (`batch_fn(step) -> (inputs, targets)`), so a run
resumed from a checkpoint at step `s` sees the same batches as an uninterrupted one, and its
parameters match bit for bit.
"""

import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PyTree, Scalar
from tqdm.auto import tqdm

import atlas_eqx as ae

from ._distributed import check_same_everywhere, is_primary, to_host


IGNORE_INDEX = -100

Batch = tuple[Int[np.ndarray | Array, "B T"], Int[np.ndarray | Array, "B T"]]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay to `final_lr_fraction * lr`, and global-norm
    clipping (the recipe of ATLAS App. E: AdamW, cosine annealing, weight decay 0.1)."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"OptimConfig: `lr` must be > 0; got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"OptimConfig: `weight_decay` must be >= 0; got {self.weight_decay!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig: `warmup_steps` must be >= 0; got {self.warmup_steps!r}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(
                "OptimConfig: `final_lr_fraction` must lie in [0, 1]; got "
                f"{self.final_lr_fraction!r}"
            )
        if not self.clip_norm > 0:
            raise ValueError(f"OptimConfig: `clip_norm` must be > 0; got {self.clip_norm!r}")


NO_DECAY_FIELDS = ("norm_scale", "feature_map")
"""Fields whose leaves AdamW never decays although they are 2-D: the memory layers' per-head
output-norm scales `(H, d_head)` and feature-map coefficients $a_i$ `(H, p + 1)`."""


def weight_decay_mask(params: PyTree) -> PyTree:
    """`True` for the leaves AdamW decays: arrays of two or more dimensions outside the fields
    of `NO_DECAY_FIELDS` (so every norm's scale, bias and other vector is excluded, and
    projections, embeddings, memories' $W_0$, gate matrices and convolutions are decayed)."""

    def decays(path: tuple, leaf: Any) -> bool:
        names = {getattr(entry, "name", None) for entry in path}
        return getattr(leaf, "ndim", 0) >= 2 and not names & set(NO_DECAY_FIELDS)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """`clip_by_global_norm` then AdamW on `warmup_cosine_decay_schedule`; weight decay on
    matrices only (`weight_decay_mask`): not on norms' scales, feature-map coefficients or
    other vectors.

    The peak rate `config.lr` lives in the optimizer state (`optax.inject_hyperparams`; the
    schedule is `peak_lr` times its shape), so runs that differ only in the rate share one
    compiled training step (`make_train_step`)."""
    if total_steps < 1:
        raise ValueError(f"make_optimizer: `total_steps` must be >= 1; got {total_steps}")
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    shape = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=1.0,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=config.final_lr_fraction,
    )

    def adamw_at(peak_lr):
        return optax.chain(
            optax.clip_by_global_norm(config.clip_norm),
            optax.adamw(
                lambda count: peak_lr * shape(count),
                b1=config.b1,
                b2=config.b2,
                weight_decay=config.weight_decay,
                mask=weight_decay_mask,
            ),
        )

    return optax.inject_hyperparams(adamw_at)(peak_lr=config.lr)


def masked_cross_entropy(
    logits: Float[Array, "*batch T V"], targets: Int[Array, "*batch T"]
) -> tuple[Scalar, Scalar, Scalar]:
    """Sum of next-token cross-entropies, number of scored positions and number of correct
    argmax predictions, over positions whose target is not `IGNORE_INDEX` (-100)."""
    scored = targets != IGNORE_INDEX
    safe_targets = jnp.where(scored, targets, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_targets)
    correct = (jnp.argmax(logits, axis=-1) == targets) & scored
    return (
        jnp.sum(jnp.where(scored, losses, 0.0)),
        jnp.sum(scored),
        jnp.sum(correct),
    )


def batch_loss(model: Callable, inputs: Int[Array, "B T"], targets: Int[Array, "B T"]):
    """Mean cross-entropy over the scored positions of a batch, and (count, correct)."""
    logits = jax.vmap(model)(inputs)
    total, count, correct = masked_cross_entropy(logits, targets)
    return total / jnp.maximum(count, 1), (count, correct)


def make_train_step(optim: OptimConfig, total_steps: int, mesh: Mesh | None = None):
    """One jit-compiled step for `make_optimizer(optim, total_steps)`: gradients of
    `batch_loss`, the optax update, and metrics. Cached, so that runs with the same
    optimizer (a resumed run, a sweep over seeds or over `optim.lr`, which the step reads
    from the optimizer state) reuse the compiled step.

    With a `mesh` (`atlas_eqx.make_mesh`), the step expects its arguments placed by
    `shard_training_state` and `shard_batch`, and pins the updated parameters and optimizer
    state to the shardings of `atlas_eqx.parameter_shardings` (data and head parallelism)."""
    return _train_step(dataclasses.replace(optim, lr=1.0), total_steps, mesh)


@functools.lru_cache(maxsize=16)
def _train_step(optim: OptimConfig, total_steps: int, mesh: Mesh | None):
    optimizer = make_optimizer(optim, total_steps)

    @eqx.filter_jit
    def step(model, opt_state, inputs, targets):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss_of(params):
            return batch_loss(eqx.combine(params, static), inputs, targets)

        (loss, (count, correct)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if mesh is not None:
            param_shardings = ae.parameter_shardings(params, mesh)
            params = ae.constrain(params, param_shardings)
            opt_state = ae.constrain(
                opt_state, ae.optimizer_state_shardings(optimizer, opt_state, param_shardings)
            )
        metrics = dict(
            loss=loss,
            accuracy=correct / jnp.maximum(count, 1),
            grad_norm=optax.tree.norm(grads),
        )
        return eqx.combine(params, static), opt_state, metrics

    return step


def shard_training_state(
    model: PyTree, opt_state: PyTree, optimizer: optax.GradientTransformation, mesh: Mesh
) -> tuple[PyTree, PyTree]:
    """Place the model and the optimizer state on `mesh` as `atlas_eqx.parameter_shardings`
    declares (per-head leaves over `"heads"`, the rest replicated; Adam's moments like their
    parameters)."""
    model = ae.shard(model, ae.parameter_shardings(model, mesh))
    param_shardings = ae.parameter_shardings(eqx.filter(model, eqx.is_inexact_array), mesh)
    opt_state = ae.shard(
        opt_state, ae.optimizer_state_shardings(optimizer, opt_state, param_shardings)
    )
    return model, opt_state


def shard_batch(batch: Batch, mesh: Mesh) -> tuple[Array, Array]:
    """Split `(inputs, targets)` over the mesh's `"data"` axis (first dimension). Every
    process passes the whole batch and transfers only its own devices' rows."""
    inputs, targets = batch
    sharding = ae.batch_sharding(mesh, np.ndim(inputs))
    return ae.shard(np.asarray(inputs), sharding), ae.shard(np.asarray(targets), sharding)


@eqx.filter_jit
def _eval_batch(model, inputs, targets):
    logits = jax.vmap(model)(inputs)
    return masked_cross_entropy(logits, targets)


def evaluate(
    model: Callable, batches: Iterable[Batch], mesh: Mesh | None = None
) -> dict[str, float]:
    """Mean cross-entropy (nats per scored token), bits per scored token and accuracy. With a
    `mesh`, each batch is split over its `"data"` axis (`shard_batch`)."""
    total = count = correct = 0.0
    for batch in batches:
        if mesh is None:
            inputs, targets = jnp.asarray(batch[0]), jnp.asarray(batch[1])
        else:
            inputs, targets = shard_batch(batch, mesh)
        t, n, c = _eval_batch(model, inputs, targets)
        total, count, correct = total + float(t), count + float(n), correct + float(c)
    if count == 0:
        raise ValueError("evaluate: the batches contain no scored position (all targets -100)")
    return dict(
        loss=total / count, bits_per_token=total / count / np.log(2), accuracy=correct / count
    )


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back: the message names the file and how to
    recover."""


def save_checkpoint(path: pathlib.Path | str, model: PyTree, opt_state: PyTree, step: int) -> None:
    """Write the model and optimizer state (equinox serialisation) and the step, atomically:
    a temporary file in the same directory, flushed to disk (`fsync`), then renamed over
    `path`. The header line holds the step and the SHA-256 of the payload."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = io.BytesIO()
    eqx.tree_serialise_leaves(payload, (model, opt_state))
    data = payload.getvalue()
    header = {"step": step, "sha256": hashlib.sha256(data).hexdigest()}
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "wb") as file:
        file.write(json.dumps(header).encode() + b"\n")
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(
    path: pathlib.Path | str, model_like: PyTree, opt_state_like: PyTree
) -> tuple[PyTree, PyTree, int]:
    """Read a checkpoint written by `save_checkpoint` into the structure of the `*_like` trees.
    A file that is empty, truncated, altered or of another model is a `CheckpointError`
    naming it."""
    path = pathlib.Path(path)
    recover = (
        f"delete {path} to restart the run from step 0, or restore it from a copy (a run "
        "directory is resumed from its checkpoint)"
    )
    raw = path.read_bytes()
    header_line, _, data = raw.partition(b"\n")
    try:
        header = json.loads(header_line)
        step = int(header["step"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(
            f"{path} is not a checkpoint (empty, truncated or another file: no header line "
            f"with the step); {recover}"
        ) from None
    if "sha256" in header and hashlib.sha256(data).hexdigest() != header["sha256"]:
        raise CheckpointError(
            f"{path} is corrupt: its content does not match its SHA-256 (truncated or altered "
            f"after it was written); {recover}"
        )
    try:
        model, opt_state = eqx.tree_deserialise_leaves(
            io.BytesIO(data), (model_like, opt_state_like)
        )
    except Exception as error:
        raise CheckpointError(
            f"{path} does not hold this model ({type(error).__name__}: {error}); it was "
            f"written for another configuration or is damaged; {recover}"
        ) from None
    return model, opt_state, step


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; `step` is the first step (1-based) where it was."""

    def __init__(self, message: str, step: int, evaluations: list[dict[str, float]]):
        super().__init__(message)
        self.step = step
        self.evaluations = evaluations

    def record(self, metric: str, seconds: float) -> dict[str, Any]:
        """What a results file keeps of the run: the step it diverged at, its validation curve
        (`metric` at each evaluation) up to there, and validation and test scores of 0.0,
        placeholders that the studies never read as a result (`diverged_at` rules them out)."""
        return dict(
            diverged_at=self.step,
            validation=0.0,
            test=0.0,
            curve=[(int(e["step"]), e[metric]) for e in self.evaluations],
            seconds=seconds,
        )


@dataclasses.dataclass
class TrainResult:
    model: Any
    opt_state: Any
    history: list[dict[str, float]]
    evaluations: list[dict[str, float]]
    tokens_per_second: float


def train(
    model: PyTree,
    batch_fn: Callable[[int], Batch],
    *,
    steps: int,
    optim: OptimConfig = OptimConfig(),
    eval_fn: Callable[[PyTree], dict[str, float]] | None = None,
    eval_every: int = 0,
    log_path: pathlib.Path | str | None = None,
    checkpoint_path: pathlib.Path | str | None = None,
    checkpoint_every: int = 0,
    resume: bool = True,
    progress: bool = True,
    description: str = "train",
    stop_after: int | None = None,
    mesh: Mesh | None = None,
) -> TrainResult:
    """Train `model` for `steps` optimizer steps on `batch_fn(step)`.

    - `eval_fn(model) -> metrics` runs every `eval_every` steps (0: only at the end) and at the
      end; its metrics go to the log with the key `"eval"`.
    - `log_path`: one JSON object per line, per step (loss, accuracy, grad norm, lr step,
      tokens/s) and per evaluation.
    - `checkpoint_path`: written every `checkpoint_every` steps and at the end; with
      `resume=True` an existing checkpoint is loaded and training continues from its step.
    - `stop_after`: stop (after checkpointing) once this many steps are done in total, as if
      interrupted; used to test that resuming gives the same result.
    - `mesh`: an `atlas_eqx.make_mesh` mesh; batches are split over its `"data"` axis and
      the memory / attention heads over its `"heads"` axis (`atlas_eqx.parameter_shardings`).
      The computed function is the same as without a mesh, up to floating-point summation
      order. A checkpoint written with one mesh resumes on any other (it stores host arrays).
    - Several processes (`jax.distributed`, a `mesh` over all their devices): every process
      calls `train` with the same arguments; only process 0 writes the log and checkpoints,
      every process reads the checkpoint it resumes from (they must agree on its step).
    """
    if steps < 1:
        raise ValueError(f"train: `steps` must be >= 1; got {steps}")
    optimizer = make_optimizer(optim, steps)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    start = 0
    if checkpoint_path is not None and resume and pathlib.Path(checkpoint_path).exists():
        model, opt_state, start = load_checkpoint(checkpoint_path, model, opt_state)
        if start > steps:
            raise ValueError(
                f"train: {checkpoint_path} is at step {start}, beyond `steps`={steps}; pass "
                f"steps >= {start} to resume or extend it"
            )
    check_same_everywhere(start, f"the step to resume from ({checkpoint_path})")
    primary = is_primary()
    if mesh is not None:
        model, opt_state = shard_training_state(model, opt_state, optimizer, mesh)
    step_fn = make_train_step(optim, steps, mesh)
    log = open(log_path, "a") if log_path is not None and primary else None
    history: list[dict[str, float]] = []
    evaluations: list[dict[str, float]] = []
    end = steps if stop_after is None else min(steps, stop_after)
    tokens = 0
    elapsed = 0.0

    def write(record: dict[str, Any]) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def checkpoint(done: int) -> None:
        host_model, host_opt_state = to_host((model, opt_state))  # every process gathers
        if checkpoint_path is not None and primary:
            save_checkpoint(checkpoint_path, host_model, host_opt_state, done)

    def run_eval(step: int) -> None:
        if eval_fn is None:
            return
        metrics = eval_fn(model)
        evaluations.append(dict(step=step, **metrics))
        write(dict(step=step, eval=metrics))

    # Updated by hand: tqdm's iterator writes its counter back only when it redraws, so a
    # postfix refreshed every step showed a stale count (10/30 while the loss moved on).
    bar = tqdm(
        total=steps,
        initial=start,
        desc=description,
        disable=not progress or not primary,
        leave=False,
        dynamic_ncols=True,
    )
    try:
        for step in range(start, end):
            inputs, targets = batch_fn(step)
            if mesh is None:
                inputs, targets = jnp.asarray(inputs), jnp.asarray(targets)
            else:
                ae.check_batch(np.shape(inputs)[0], mesh)
                inputs, targets = shard_batch((inputs, targets), mesh)
            begin = time.perf_counter()
            model, opt_state, metrics = step_fn(model, opt_state, inputs, targets)
            metrics = {name: float(value) for name, value in metrics.items()}
            if not np.isfinite(metrics["loss"]):
                raise TrainingDiverged(
                    f"train: the loss is {metrics['loss']} at step {step + 1} (lower `lr`, "
                    "check the inputs: token ids must lie in [0, vocab_size))",
                    step + 1,
                    evaluations,
                )
            seconds = time.perf_counter() - begin
            if step > start:  # the first step of a run includes compilation
                tokens += inputs.size
                elapsed += seconds
            record = dict(step=step + 1, **metrics, tokens_per_s=inputs.size / seconds)
            history.append(record)
            write(record)
            bar.set_postfix(
                loss=f"{metrics['loss']:.3f}",
                tok_s=f"{tokens / max(elapsed, 1e-9):.0f}",
                refresh=False,
            )
            bar.update(1)
            done = step + 1
            if checkpoint_path is not None and checkpoint_every and done % checkpoint_every == 0:
                checkpoint(done)
            if eval_every and done % eval_every == 0 and done < steps:
                run_eval(done)
        if checkpoint_path is not None and end > start:
            checkpoint(end)
        if end == steps:
            run_eval(steps)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return TrainResult(
        model=model,
        opt_state=opt_state,
        history=history,
        evaluations=evaluations,
        tokens_per_second=tokens / elapsed if elapsed > 0 else float("nan"),
    )
