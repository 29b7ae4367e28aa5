"""The results of issue 7 item 6 that need outer training, one command each:

- `atlas-eqx results mqar-state`: MQAR accuracy against the floats a stream holds (state size),
  varying `d_model` at a fixed head dimension, for seven presets (ATLAS Fig. 7).
- `atlas-eqx results lm`: byte-level language modelling, validation bits per byte after the
  same token budget, for atlas, omeganet, titans, transformer and a Table-6-style ablation of
  atlas (ATLAS Tables 2 and 6).
- `atlas-eqx results niah-extrapolate`: small models trained on S-NIAH at length L, evaluated
  at L, 2L and 4L (ATLAS Table 3, trained at 4K and tested to 16K).

Every run reuses the training loop (`_train.train`), the model builder and MQAR runs of
`_recall` and the byte-level data of `_run`. As in the main job (`_quickstart`), atlas applies
Newton-Schulz once per chunk (`muon_per_chunk=True`) and atlas / omeganet use the element-wise
polynomial feature map: exact per-token Muon costs ~25 s per training step at d_model 64 on
two CPU cores. Each results.md says so above its table.

This module holds what they share: the metrics, one training run, and writing a page; each
result is its own module (`_mqar_state.py`, `_lm.py`, `_niah_extrapolate.py`).
"""

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..training._recall import (
    count_parameters,
    recurrent_state_floats,
)
from ..training._train import Batch, IGNORE_INDEX, OptimConfig, train, TrainingDiverged


RESULTS_DIR = pathlib.Path("experiments/results")
APPROXIMATIONS = (
    "Approximations, as in the main job (experiments/studies/_quickstart.py): atlas applies Muon's "
    "Newton-Schulz once per chunk (`muon_per_chunk=True`, digest A-13) instead of per token, "
    "and atlas and omeganet use the element-wise polynomial map k + k^2/2 (digest A-2 (ii), "
    "which does not raise capacity) instead of the exact degree-2 monomials; omeganet's "
    "eta_max is 0.02 (its MLP memory diverged at the preset's bound). Exact per-token Muon "
    "costs ~25 s per training step at d_model 64 on two CPU cores."
)

GRAD_NORM_NOTE = (
    "Median outer grad norm: the global norm of the gradient of the training loss with respect "
    "to all parameters, before clipping at 1, median over the training steps. A norm orders "
    "of magnitude above the others' says the loss is far more sensitive to some parameters. "
    "For atlas at T = 512 it is measured in niah-extrapolate/gradient_norm.md: the gradient "
    "is correct (finite differences), and per-chunk Muon makes the inner recurrence expanding "
    "(~1.3x per chunk of 16), so the gradient grows exponentially with T."
)

# ----------------------------------------------------------------------------------------------
# Metrics


def bits_per_byte(total_nats: float, num_bytes: int) -> float:
    """Bits per byte of a byte-level model: the summed next-byte negative log-likelihood
    (natural log) divided by the number of predicted bytes and by ln 2."""
    if num_bytes < 1:
        raise ValueError(f"bits_per_byte: `num_bytes` must be >= 1; got {num_bytes}")
    return float(total_nats) / num_bytes / math.log(2.0)


def answer_exact_match(
    logits: Float[Array, "B T V"], targets: Int[Array, "B T"]
) -> Bool[Array, " B"]:
    """Per example: is the argmax right at every scored position (target != -100)?

    Under teacher forcing this is exactly whether greedy decoding from the answer prefix
    reproduces the whole answer (each greedy step then sees the true prefix), i.e. RULER's
    `string_match_all` of a greedy continuation of the answer's length. An example with no
    scored position counts as a match (an empty answer)."""
    scored = targets != IGNORE_INDEX
    right = jnp.argmax(logits, axis=-1) == targets
    return jnp.all(right | ~scored, axis=-1)


@eqx.filter_jit
def _exact_match_batch(model, inputs, targets):
    return answer_exact_match(jax.vmap(model)(inputs), targets)


def exact_match_rate(model: Callable, batches: Sequence[Batch]) -> float:
    """Fraction of examples whose whole answer `answer_exact_match` gets right."""
    matches = [
        np.asarray(_exact_match_batch(model, jnp.asarray(x), jnp.asarray(y))) for x, y in batches
    ]
    return float(np.mean(np.concatenate(matches)))


# ----------------------------------------------------------------------------------------------
# Shared pieces


def _command(name: str, out_dir: pathlib.Path, quick: bool) -> str:
    command = f"atlas-eqx results {name}"
    if out_dir != RESULTS_DIR / name:
        command += f" --out {out_dir}"
    return command + (" --quick" if quick else "")


def _write(out: pathlib.Path, title: str, command: str, body: str) -> str:
    text = f"# {title}\n\nRegenerate everything on this page with:\n\n```\n{command}\n```\n\n{body}"
    (out / "results.md").write_text(text)
    return text


def _machine_note(seconds: float) -> str:
    return (
        f"Backend {jax.default_backend()}, {jax.device_count()} device(s); the whole command "
        f"took {seconds:.0f} s on a 2-core machine shared with other jobs (tokens/s are "
        "indicative only)."
    )


@dataclasses.dataclass
class _Run:
    name: str
    parameters: int
    state_floats: int
    evaluations: list[dict[str, float]]
    tokens_per_second: float
    seconds: float
    model: Any = None
    diverged_at: int | None = None
    grad_norm_median: float = math.nan
    """Median over the training steps of the outer gradient's global norm (before clipping)."""


def _train_one(
    name: str,
    lm: Any,
    batch_fn: Callable[[int], Batch],
    *,
    steps: int,
    lr: float,
    eval_fn: Callable[[Any], dict[str, float]],
    eval_every: int,
    log_path: pathlib.Path,
    state_length: int,
    progress: bool,
) -> _Run:
    """`_train.train` for one model; a NaN loss is a result (`diverged_at`), not a crash."""
    log_path.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        outcome = train(
            lm,
            batch_fn,
            steps=steps,
            optim=OptimConfig(lr=lr),
            eval_fn=eval_fn,
            eval_every=eval_every,
            log_path=log_path,
            progress=progress,
            description=name,
            resume=False,
        )
    except TrainingDiverged as diverged:
        return _Run(
            name,
            count_parameters(lm),
            recurrent_state_floats(lm, state_length),
            diverged.evaluations,
            float("nan"),
            time.perf_counter() - start,
            diverged_at=diverged.step,
        )
    return _Run(
        name,
        count_parameters(outcome.model),
        recurrent_state_floats(outcome.model, state_length),
        outcome.evaluations,
        outcome.tokens_per_second,
        time.perf_counter() - start,
        model=outcome.model,
        grad_norm_median=float(np.median([h["grad_norm"] for h in outcome.history])),
    )


def _param_range(runs: Sequence[_Run]) -> str:
    counts = [r.parameters for r in runs]
    return f"{min(counts):,}-{max(counts):,}"
