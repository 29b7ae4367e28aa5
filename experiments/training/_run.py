"""`atlas-eqx train` and `atlas-eqx eval`: one preset, one task, a run directory.

A run directory holds `config.json` (the `TrainConfig`), `checkpoint.eqx` (model and optimizer
state, resumable), `metrics.jsonl` (one line per step and per evaluation) and `eval.json`.
"""

import dataclasses
import json
import pathlib
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh

import atlas_eqx as ae

from ..tasks._corpus import excerpt_documents, load_corpus
from ..tasks._mqar import multiquery_ar
from ._config import save_config
from ._distributed import barrier, initialize_processes, is_primary, parse_coordinator
from ._recall import layout_options, mqar_batches, mqar_eval_batches
from ._train import Batch, evaluate, load_checkpoint, make_optimizer, OptimConfig, train


TASKS = ("mqar", "lm")
CORPORA = ("excerpt", "full")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `atlas-eqx train` needs; every field is a flag (`--d-model 64`) or a key of
    the `--config` JSON file."""

    task: str = "mqar"
    preset: str = "atlas"
    preset_options: str = "{}"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    chunk_size: int = 4
    window: int = 4
    seq_len: int = 32
    num_kv_pairs: int = 4
    vocab_size: int = 64
    num_train: int = 8192
    num_test: int = 256
    corpus: str = "excerpt"
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-2
    warmup_steps: int = 20
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 100
    checkpoint_every: int = 100
    seed: int = 0
    out_dir: str = "runs/train"
    mesh: str = ""
    num_processes: int = 1
    process_id: int = 0
    coordinator: str = ""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}; got {self.task!r}")
        if self.corpus not in CORPORA:
            raise ValueError(f"`corpus` must be one of {CORPORA}; got {self.corpus!r}")
        names = ae.presets.__all__
        if self.preset not in names and not ae.is_import_path(self.preset):
            raise ValueError(
                f"unknown `preset` {self.preset!r}; choose from {sorted(names)} or name a "
                "mixer factory by import path, 'package.module:factory'"
            )
        at_least_one = ("d_model", "n_layers", "n_heads", "chunk_size", "window", "seq_len")
        at_least_one += ("num_kv_pairs", "vocab_size", "num_train", "num_test", "steps")
        at_least_one += ("batch_size",)
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0; got {getattr(self, name)}")
        for name in ("lr", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0; got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"impossible dims: `d_model`={self.d_model} is not divisible by "
                f"`n_heads`={self.n_heads}"
            )
        try:
            options = json.loads(self.preset_options)
        except json.JSONDecodeError as error:
            raise ValueError(f"`preset_options` is not JSON: {error}") from None
        if not isinstance(options, dict):
            raise ValueError("`preset_options` must be a JSON object of config fields")
        self._check_processes()
        if self.mesh:
            try:
                sizes = ae.parse_mesh(self.mesh)
            except ValueError as error:
                raise ValueError(f"`mesh` (--mesh): {error}") from None
            if self.batch_size % sizes["data"]:
                raise ValueError(
                    f"`mesh` (--mesh {self.mesh}): data={sizes['data']} does not divide "
                    f"`batch_size`={self.batch_size}"
                )
            if self.n_heads % sizes["heads"]:
                raise ValueError(
                    f"`mesh` (--mesh {self.mesh}): heads={sizes['heads']} does not divide "
                    f"`n_heads`={self.n_heads}"
                )
            if sizes["data"] % self.num_processes:
                raise ValueError(
                    f"`mesh` (--mesh {self.mesh}): the data axis spans the processes, so "
                    f"data={sizes['data']} must be a multiple of "
                    f"`num_processes`={self.num_processes}"
                )

    def _check_processes(self) -> None:
        if self.num_processes < 1:
            raise ValueError(f"`num_processes` must be >= 1; got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"`process_id` must lie in [0, num_processes) = [0, {self.num_processes}); "
                f"got {self.process_id}"
            )
        if self.num_processes == 1:
            if self.coordinator:
                raise ValueError(
                    f"`coordinator` ({self.coordinator!r}) is only used with `num_processes` "
                    "> 1; drop it or pass --num-processes"
                )
            return
        if not self.coordinator:
            raise ValueError(
                f"`num_processes`={self.num_processes} needs `coordinator` (--coordinator "
                "HOST:PORT, the address process 0 serves on; every process passes the same)"
            )
        try:
            parse_coordinator(self.coordinator)
        except ValueError as error:
            raise ValueError(f"`coordinator`: {error}") from None
        if self.batch_size % self.num_processes:
            raise ValueError(
                f"`batch_size`={self.batch_size} must be a multiple of "
                f"`num_processes`={self.num_processes} (each process feeds an equal slice)"
            )

    @property
    def model_vocab(self) -> int:
        return 256 if self.task == "lm" else self.vocab_size


def build_language_model(config: TrainConfig) -> Any:
    """The configured model. A preset takes `chunk_size` and `window` from the config; a
    mixer named by import path takes only `preset_options`. Strings in `preset_options` may
    name a researcher's own memory, feature map, objective or inner learner by import path
    (see `MemoryLayerConfig`)."""
    if ae.is_import_path(config.preset):
        layout = {}
    else:
        layout = layout_options(config.preset, config.chunk_size, config.window)
    options: dict[str, Any] = {**layout, **json.loads(config.preset_options)}
    return ae.LanguageModel(
        config.model_vocab,
        config.d_model,
        config.n_layers,
        config.n_heads,
        key=jax.random.key(config.seed),
        mixer=config.preset,
        mixer_options=options,
    )


def _byte_splits(config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    if config.corpus == "full":
        return load_corpus("train"), load_corpus("valid")
    documents = list(excerpt_documents().values())
    train_text = "\n".join(documents[:-1]).encode()
    valid_text = documents[-1].encode()
    return np.frombuffer(train_text, np.uint8), np.frombuffer(valid_text, np.uint8)


def _lm_windows(data: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> Batch:
    starts = rng.integers(0, len(data) - length - 1, size=batch)
    windows = np.stack([data[s : s + length + 1] for s in starts]).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def task_data(config: TrainConfig):
    """`(batch_fn(step), evaluation batches)` for the configured task."""
    if config.task == "mqar":
        train_task = multiquery_ar(
            config.num_train,
            config.seq_len,
            config.vocab_size,
            config.num_kv_pairs,
            seed=config.seed,
        )
        test_task = multiquery_ar(
            config.num_test,
            config.seq_len,
            config.vocab_size,
            config.num_kv_pairs,
            seed=config.seed + 10**6,
        )

        return (
            mqar_batches(train_task, config.batch_size, config.seed),
            mqar_eval_batches(test_task, config.batch_size),
        )
    train_bytes, valid_bytes = _byte_splits(config)

    def lm_batch_fn(step: int) -> Batch:
        return _lm_windows(
            train_bytes,
            config.batch_size,
            config.seq_len,
            np.random.default_rng((config.seed, step)),
        )

    rng = np.random.default_rng(config.seed + 10**6)
    eval_batches = [
        _lm_windows(valid_bytes, config.batch_size, config.seq_len, rng) for _ in range(8)
    ]
    return lm_batch_fn, eval_batches


def _optim(config: TrainConfig) -> OptimConfig:
    return OptimConfig(
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        clip_norm=config.clip_norm,
    )


def training_mesh(config: TrainConfig) -> Mesh | None:
    """The device mesh of `config.mesh`; when it is empty, `None` (one device) for one process
    and `data=<all devices of all processes>` for several. Raises `SystemExit` naming `--mesh`
    when the axis sizes do not multiply to `jax.device_count()`."""
    if not config.mesh:
        if config.num_processes == 1:
            return None
        return ae.make_mesh({"data": jax.device_count()})
    try:
        return ae.make_mesh(config.mesh)
    except ValueError as error:
        raise SystemExit(f"--mesh {config.mesh}: {error}") from None


# Fields a run may change when it resumes: where and how it runs, how often it reports, and
# `steps` (extending a run; the learning-rate schedule is then the one for the new total).
_RESUMABLE_CHANGES = ("mesh", "out_dir", "eval_every", "checkpoint_every", "steps")
_RESUMABLE_CHANGES += ("num_processes", "process_id", "coordinator")


def _check_same_run(out: pathlib.Path, saved_path: pathlib.Path, config: TrainConfig) -> None:
    """Refuse to resume a run directory under a config that computes something else, naming
    every differing field."""
    try:
        saved = json.loads(saved_path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(
            f"{saved_path} is not valid JSON ({error}); delete it to start the run afresh"
        ) from None
    current = dataclasses.asdict(config)
    differing = sorted(
        name
        for name in set(saved) | set(current)
        if name not in _RESUMABLE_CHANGES and saved.get(name) != current.get(name)
    )
    if differing:
        changes = ", ".join(f"{n}: {saved.get(n)!r} -> {current.get(n)!r}" for n in differing)
        raise SystemExit(
            f"{out} holds a run with another config ({changes}); use a new --out-dir, or "
            f"delete {out / 'checkpoint.eqx'} to start it again with this config"
        )


def run_training(
    config: TrainConfig, *, progress: bool = True, stop_after: int | None = None
) -> dict[str, float]:
    """Train (resuming from the run directory's checkpoint if there is one) and evaluate.
    `stop_after` stops after that many steps in total, as if interrupted (`train`).
    With `config.mesh` (e.g. `"data=4,heads=2"`) the batch is split over the data axis and
    the heads over the heads axis (`atlas_eqx.parameter_shardings`).

    With `config.num_processes` > 1 this process first joins the job (`jax.distributed`; so
    it must run before any other JAX computation here), the mesh spans every process's
    devices with the data axis across processes, and only process 0 writes the run
    directory; every process reads the checkpoint it resumes from."""
    initialize_processes(config.num_processes, config.process_id, config.coordinator)
    out = pathlib.Path(config.out_dir)
    mesh = training_mesh(config)
    saved = out / "config.json"
    checkpoint = out / "checkpoint.eqx"
    # A directory without a checkpoint holds no training to lose (a run that failed before
    # its first checkpoint): a new config replaces the old one.
    if saved.exists() and checkpoint.exists():
        _check_same_run(out, saved, config)
    # Everything the run needs is built before the directory is written.
    batch_fn, eval_batches = task_data(config)
    model = build_language_model(config)
    primary = is_primary()
    # Every process has read config.json before process 0 replaces it.
    barrier("atlas-eqx train: run directory checked")
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, saved)
    result = train(
        model,
        batch_fn,
        steps=config.steps,
        optim=_optim(config),
        eval_fn=lambda model: evaluate(model, eval_batches, mesh),
        eval_every=config.eval_every,
        log_path=out / "metrics.jsonl",
        checkpoint_path=checkpoint,
        checkpoint_every=config.checkpoint_every,
        progress=progress,
        description=f"{config.preset}/{config.task}",
        mesh=mesh,
        stop_after=stop_after,
    )
    final = dict(result.evaluations[-1]) if result.evaluations else {}
    final["train_tokens_per_second"] = result.tokens_per_second
    if primary:
        (out / "eval.json").write_text(json.dumps(final, indent=2) + "\n")
    return final


def run_evaluation(run_dir: pathlib.Path | str) -> dict[str, float]:
    """Rebuild the model of a run directory, load its checkpoint, evaluate it."""
    run_dir = pathlib.Path(run_dir)
    saved = run_dir / "config.json"
    if not saved.exists():
        raise SystemExit(f"{run_dir} is not a run directory: {saved} does not exist")
    if not (run_dir / "checkpoint.eqx").exists():
        raise SystemExit(f"{run_dir} holds no checkpoint yet (checkpoint.eqx); train it first")
    try:
        config = TrainConfig(**json.loads(saved.read_text()))
    except json.JSONDecodeError as error:
        raise SystemExit(f"{saved} is not valid JSON ({error})") from None
    except (TypeError, ValueError) as error:
        raise SystemExit(f"{saved} is not a valid TrainConfig: {error}") from None
    model = build_language_model(config)
    optimizer = make_optimizer(_optim(config), config.steps)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    model, _, step = load_checkpoint(run_dir / "checkpoint.eqx", model, opt_state)
    _, eval_batches = task_data(config)
    metrics = evaluate(model, eval_batches)
    metrics["step"] = step
    return metrics
