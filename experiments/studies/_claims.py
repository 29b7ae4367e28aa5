"""`atlas-eqx results claims`: the paper's claims, each tested under one protocol, resumable.

Protocol (every claim):

- three disjoint MQAR splits from independent generator seeds: training, validation, test;
- an outer learning-rate sweep of `LRS` per model, run at seed 0, the rate chosen on the
  *validation* split; the other seeds then run at the chosen rate; the page reports *test*
  accuracy, mean and range over `SEEDS`;
- the outer optimizer keeps its peak rate in its state (`optax.inject_hyperparams`, see
  `experiments.training._train.make_optimizer`), so every rate of a sweep runs one compiled step;
- parameter counts matched within `PARAMETER_TOLERANCE` by the SwiGLU width of each arm
  (`matched_mlp_hidden`);
- an ablation that would change the inner step size $\\eta_{\\max}$ as a side effect (the
  presets derive it from $c$, $\\phi$ and the learner) is given its reference's value, and a
  paired ablation also runs at its reference's chosen outer rate with the same seeds;
- a difference is called real only when it exceeds twice the larger seed range of the two;
- where a claim names `longer`, one arm also trains several times as long (seed 0, its chosen
  rate), to show how far the claim's length is from a flat validation curve.

This module holds the protocol: the claims, their arms and tasks, which runs each needs and in
what order (`plan`), and which of them a verdict reads (`final_runs`). Runs go to `runs.jsonl`
in the output directory as they finish (`experiments.studies._claims_run`), keyed by their whole
configuration, so an interrupted command resumes where it stopped; runs shared by two claims
(the Atlas arm) run once. The page is written by `experiments.studies._claims_page`.
"""

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np


LRS = (3e-3, 1e-2, 2e-2)
SEEDS = (0, 1, 2)
PARAMETER_TOLERANCE = 0.05
VALIDATION_OFFSET, TEST_OFFSET = 2 * 10**6, 10**6


@dataclasses.dataclass(frozen=True)
class Task:
    """A task, its size and its training length: `"mqar"` (Zoology's multi-query associative
    recall, trained with `num_kv_pairs` pairs and tested with each of `test_pairs`, by default
    the same; the claim's score is the most pairs), `"needle"` (`experiments.tasks.single_needle`,
    trained at `seq_len` and tested at each of `test_lengths`; the claim's score is the longest)
    or `"lm"` (next-byte prediction on the fetched corpus: train, valid and test splits of whole
    documents, `experiments.tasks.load_corpus`; `vocab_size` 256, windows of `seq_len` bytes).
    Validation is always at the training length and number of pairs.

    A run's score is higher-is-better: accuracy, or minus the bits per byte for `"lm"`."""

    name: str = "mqar"
    seq_len: int = 32
    num_kv_pairs: int = 4
    vocab_size: int = 64
    steps: int = 800
    batch_size: int = 32
    num_train: int = 8192
    num_validation: int = 256
    num_test: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    test_lengths: tuple[int, ...] = ()
    test_pairs: tuple[int, ...] = ()

    @property
    def test_axis(self) -> tuple[str, tuple[int, ...]]:
        """What the test splits vary, `"length"` or `"pairs"`, and its values (the claim's
        score is at the last)."""
        if self.test_pairs:
            return "pairs", self.test_pairs
        return "length", self.test_lengths or (self.seq_len,)

    @property
    def metric(self) -> str:
        return "bits per byte" if self.name == "lm" else "accuracy"

    def shown(self, score: float) -> float:
        """A score as the page prints it (bits per byte are positive, lower is better)."""
        return -score if self.name == "lm" else score

    def describe(self) -> str:
        if self.name == "lm":
            what = (
                f"byte-level language modelling on the fetched corpus, windows of "
                f"{self.seq_len} bytes; validation: {self.num_validation} windows of the valid "
                f"split, test: {self.num_test} windows of the test split"
            )
        elif self.name == "needle":
            lengths = ", ".join(map(str, self.test_lengths))
            what = (
                f"single needle (one key-value pair in random tokens, asked at the end), trained "
                f"at T {self.seq_len}, tested at T {lengths}, vocabulary {self.vocab_size}"
            )
        elif self.test_pairs:
            counts = ", ".join(map(str, self.test_pairs))
            what = (
                f"MQAR T {self.seq_len}, trained with {self.num_kv_pairs} pairs, tested with "
                f"{counts} pairs, vocabulary {self.vocab_size}"
            )
        else:
            what = f"MQAR T {self.seq_len}, {self.num_kv_pairs} pairs, vocabulary {self.vocab_size}"
        return (
            f"{what}; "
            f"{self.steps} AdamW steps of {self.batch_size}; d_model {self.d_model}, "
            f"{self.n_layers} blocks, {self.n_heads} heads"
        )


@dataclasses.dataclass(frozen=True)
class Arm:
    """One model of a claim: a preset and the options that differ from it."""

    name: str
    preset: str
    options: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Claim:
    """A paper claim. `kind="ranking"`: every arm gets its own rate sweep and the paper's order
    is `arms` from best to worst. `kind="paired"`: the first arm is the reference (own sweep),
    the others are its ablations at its rate and seeds, and `expected` gives the paper's
    direction of each ablation against the reference ("worse" / "better")."""

    key: str
    title: str
    paper: str
    kind: str
    task: Task
    arms: tuple[Arm, ...]
    expected: tuple[tuple[str, str], ...] = ()
    not_tested: str | None = None
    """Why this claim is not run here (the page says so instead of a verdict)."""
    longer: tuple[str, tuple[int, ...]] | None = None
    """`(arm, factors)`: that arm trained `factor` times as many steps (the same schedule
    stretched), at its chosen rate and seed 0, once per factor; the page shows how far the
    claim's own length is from a flat validation curve. These runs rank nothing."""


MAIN_TASK = Task()
LM_TASK = Task(name="lm", seq_len=64, vocab_size=256, steps=2000, batch_size=16,
               num_validation=512, num_test=512, d_model=32, n_heads=2)  # fmt: skip
NEEDLE_TASK = Task(name="needle", seq_len=128, test_lengths=(128, 512, 2048))
CAPACITY_TASK = Task(n_heads=8, test_pairs=(4, 6, 8))
ATLAS = Arm("atlas", "atlas")
MUON_LR_MAX = (("lr_max", 0.1),)

CLAIMS: tuple[Claim, ...] = (
    Claim(
        key="ranking",
        title="Atlas > OmegaNet > Titans > Gated DeltaNet on MQAR",
        paper="Tables 2-4 and Fig. 5: Atlas ahead of OmegaNet, Titans and Gated DeltaNet "
        "on recall-heavy tasks",
        kind="ranking",
        task=MAIN_TASK,
        arms=(
            ATLAS,
            Arm("omeganet", "omeganet"),
            Arm("titans", "titans"),
            Arm("gated_deltanet", "gated_deltanet"),
        ),  # fmt: skip
    ),
    Claim(
        key="table6",
        title="Table 6 in miniature: w/o Muon, c = 1, identity phi against Atlas",
        paper="Table 6 (perplexity, lower is better): w/o Muon 19.65 and accuracy 52.56 against "
        "Atlas 19.97 / 52.77 (better perplexity, lower accuracy); c = 1 and linear memory worse",
        kind="paired",
        task=MAIN_TASK,
        arms=(
            ATLAS,
            Arm(
                "w/o Muon",
                "atlas",
                (("optimizer", "momentum"), ("muon_per_chunk", False), *MUON_LR_MAX),
            ),  # fmt: skip
            Arm("c = 1", "atlas", (("window", 1), *MUON_LR_MAX)),
            Arm("identity phi", "atlas", (("feature_map", "identity"), *MUON_LR_MAX)),
        ),
        expected=(("w/o Muon", "worse"), ("c = 1", "worse"), ("identity phi", "worse")),
    ),
    Claim(
        key="capacity",
        title="Polynomial features raise the capacity of a trained memory",
        paper="Section 3.2, Proposition 1: a degree-p polynomial map lets a matrix memory "
        "store O(d^p) pairs instead of O(d)",
        kind="paired",
        task=CAPACITY_TASK,
        arms=(
            Arm("exact polynomial", "omeganet", (("feature_map", "polynomial"),)),
            Arm("element-wise", "omeganet", (("feature_map", "elementwise"),)),
            Arm("identity", "omeganet", (("feature_map", "identity"),)),
        ),
        expected=(("element-wise", "worse"), ("identity", "worse")),
    ),
    Claim(
        key="niah",
        title="Single-needle recall trained at T 128, tested at 512 and 2048",
        paper="Table 3 (S-NIAH, trained at 4K, tested to 16K): Atlas 99.2 -> 97.0 (PK), "
        "ahead of Titans 98.4 -> 96.2 and DeltaNet 98.8 -> 71.4",
        kind="ranking",
        task=NEEDLE_TASK,
        arms=(ATLAS, Arm("titans", "titans"), Arm("gated_deltanet", "gated_deltanet")),
    ),
    Claim(
        key="lm",
        title="Language modelling: Atlas > OmegaNet > Titans > Gated DeltaNet > Transformer",
        paper="Table 2, 760M / 30B tokens, Wiki perplexity: Atlas 18.92, OmegaNet 19.16, "
        "Titans 20.04, Gated DeltaNet 21.18, Transformer++ 25.21",
        kind="ranking",
        task=LM_TASK,
        arms=(
            ATLAS,
            Arm("omeganet", "omeganet"),
            Arm("titans", "titans"),
            Arm("gated_deltanet", "gated_deltanet"),
            Arm("transformer", "transformer"),
        ),  # fmt: skip
        longer=("transformer", (4, 8)),
    ),
    Claim(
        key="babilong",
        title="BABILong at 10M tokens",
        paper="Fig. 6: Atlas keeps accuracy on BABILong up to 10M tokens",
        kind="ranking",
        task=MAIN_TASK,
        arms=(),
        not_tested="BABILong's data and a 10M-token context are out of reach on 2 CPU cores "
        "within the command's 2.5 hours; the stream page measures streaming cost, not this",
    ),
)


def inner_step_options(arm: Arm, task: Task, reference: Arm | None) -> dict[str, Any]:
    """The arm's options, with the reference's eta_max where the arm does not set its own
    (the presets derive eta_max from c, phi and the learner)."""
    options = dict(arm.options)
    if reference is not None and reference != arm and "lr_max" not in options:
        options["lr_max"] = _preset_layer(reference, task).config.lr_max
    return options


def _preset_layer(arm: Arm, task: Task, options: dict[str, Any] | None = None):
    import jax

    import atlas_eqx as ae

    preset = getattr(ae.presets, arm.preset)
    head_dim_options = dict(arm.options) if options is None else options
    return preset(task.d_model, task.n_heads, key=jax.random.key(0), **head_dim_options)


def build(arm: Arm, options: dict[str, Any], task: Task, mlp_hidden: int | None, key) -> Any:
    import atlas_eqx as ae

    return ae.LanguageModel(
        task.vocab_size,
        task.d_model,
        task.n_layers,
        task.n_heads,
        key=key,
        mixer=arm.preset,
        mixer_options=options,
        mlp_hidden=mlp_hidden,
    )


def parameter_count(arm: Arm, options: dict[str, Any], task: Task, mlp_hidden: int | None) -> int:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    model = eqx.filter_eval_shape(build, arm, options, task, mlp_hidden, jax.random.key(0))
    shapes = [x for x in jax.tree.leaves(model) if isinstance(x, jax.ShapeDtypeStruct)]
    return int(sum(x.size for x in shapes if jnp.issubdtype(x.dtype, jnp.inexact)))


def matched_mlp_hidden(claim: Claim) -> dict[str, int | None]:
    """Per arm, the SwiGLU width that brings its parameter count to the first arm's (at the
    default width), or None to keep the default. Counts are affine in the width."""
    from atlas_eqx._model import default_mlp_hidden

    default = default_mlp_hidden(claim.task.d_model)
    reference = claim.arms[0]
    target = parameter_count(reference, _options(claim, reference), claim.task, None)
    widths: dict[str, int | None] = {reference.name: None}
    for arm in claim.arms[1:]:
        options = _options(claim, arm)
        at_default = parameter_count(arm, options, claim.task, default)
        per_unit = parameter_count(arm, options, claim.task, default + 1) - at_default
        width = default + round((target - at_default) / per_unit)
        if width < 8:
            raise ValueError(f"claim {claim.key}: arm {arm.name} is too large to match")
        widths[arm.name] = None if width == default else width
    return widths


def _options(claim: Claim, arm: Arm) -> dict[str, Any]:
    reference = claim.arms[0] if claim.kind == "paired" else None
    return inner_step_options(arm, claim.task, reference)


def run_key(
    task: Task, arm: Arm, options: dict, mlp_hidden: int | None, lr: float, seed: int
) -> str:
    """A run's identity: everything that sets what it computes (not the arm's label)."""
    identity = dataclasses.asdict(task)
    # Keys written before these fields existed hold none of them.
    for field in ("name", "test_lengths", "test_pairs"):
        if identity[field] == getattr(MAIN_TASK, field):
            del identity[field]
    return json.dumps(
        dict(
            task=identity,
            preset=arm.preset,
            options=sorted(options.items()),
            mlp_hidden=mlp_hidden,
            lr=lr,
            seed=seed,
        ),
        sort_keys=True,
        default=str,
    )


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    task: Task
    arm: Arm
    options: dict
    mlp_hidden: int | None
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return run_key(self.task, self.arm, self.options, self.mlp_hidden, self.lr, self.seed)


def chosen_lr(runs: dict[str, dict], planned: Sequence[PlannedRun]) -> float | None:
    """The rate with the best seed-0 validation score among `planned` (one per rate) that did
    not diverge (the smallest rate when all did), or None while any of them has not run."""
    if any(p.key not in runs for p in planned):
        return None
    trained = [p for p in planned if runs[p.key]["diverged_at"] is None]
    if not trained:
        return min(p.lr for p in planned)
    return max(trained, key=lambda p: runs[p.key]["validation"]).lr


def swept_arms(claim: Claim) -> tuple[Arm, ...]:
    """The arms with their own rate sweep: every arm of a ranking, the reference of a paired
    claim (its ablations inherit the reference's rate)."""
    return claim.arms if claim.kind == "ranking" else claim.arms[:1]


def plan(claim: Claim, runs: dict[str, dict], widths: dict[str, int | None]) -> list[PlannedRun]:
    """The runs of `claim` that can run now: each swept arm's seed-0 rates, then (once its
    rate is chosen) its other seeds; a paired ablation at its reference's rate and seeds; last
    the `longer` runs."""
    todo: list[PlannedRun] = []

    def planned(arm: Arm, lr: float, seed: int) -> PlannedRun:
        return PlannedRun(claim.task, arm, _options(claim, arm), widths[arm.name], lr, seed)

    rates: dict[str, float | None] = {}
    for arm in swept_arms(claim):
        sweep = [planned(arm, lr, SEEDS[0]) for lr in LRS]
        todo += [p for p in sweep if p.key not in runs]
        rates[arm.name] = chosen_lr(runs, sweep)
    for arm in claim.arms:
        rate = rates.get(arm.name, rates.get(claim.arms[0].name))
        if rate is None:
            continue
        todo += [p for seed in SEEDS if (p := planned(arm, rate, seed)).key not in runs]
    return todo + [p for p in longer_runs(claim, runs, widths) if p.key not in runs]


def final_runs(
    claim: Claim, runs: dict[str, dict], widths: dict[str, int | None]
) -> dict[str, tuple[float | None, list[dict]]]:
    """Per arm: its chosen (or inherited) rate and the finished runs at that rate."""
    out: dict[str, tuple[float | None, list[dict]]] = {}
    reference_rate = None
    for index, arm in enumerate(claim.arms):
        options = _options(claim, arm)
        if claim.kind == "ranking" or index == 0:
            sweep = [
                PlannedRun(claim.task, arm, options, widths[arm.name], lr, SEEDS[0]) for lr in LRS
            ]
            rate = chosen_lr(runs, sweep)
            if index == 0:
                reference_rate = rate
        else:
            rate = reference_rate
        done = []
        if rate is not None:
            for seed in SEEDS:
                p = PlannedRun(claim.task, arm, options, widths[arm.name], rate, seed)
                if p.key in runs:
                    done.append(runs[p.key])
        out[arm.name] = (rate, done)
    return out


def longer_runs(
    claim: Claim, runs: dict[str, dict], widths: dict[str, int | None]
) -> list[PlannedRun]:
    """The runs of `claim.longer`, one per factor, once their arm's rate is chosen."""
    if claim.longer is None:
        return []
    name, factors = claim.longer
    (arm,) = [a for a in claim.arms if a.name == name]
    rate, _ = final_runs(claim, runs, widths)[name]
    if rate is None:
        return []
    options = _options(claim, arm)
    return [
        PlannedRun(
            dataclasses.replace(claim.task, steps=claim.task.steps * factor),
            arm,
            options,
            widths[name],
            rate,
            SEEDS[0],
        )
        for factor in factors
    ]


def sweep_runs(
    claim: Claim, arm: Arm, runs: dict[str, dict], widths: dict[str, int | None]
) -> list[dict]:
    """The seed-0 runs of the arm's rate sweep that have finished."""
    options = _options(claim, arm)
    keys = [PlannedRun(claim.task, arm, options, widths[arm.name], lr, SEEDS[0]).key for lr in LRS]
    return [runs[k] for k in keys if k in runs]


def used_runs(
    claims: Sequence[Claim], runs: dict[str, dict], widths: dict[str, dict[str, int | None]]
) -> dict[str, dict]:
    """The finished runs the protocol reads: every swept arm's seed-0 sweep, every arm's seeds
    at its chosen (or inherited) rate, and the `longer` runs. A run left in `runs.jsonl` from
    an earlier choice of rate is not among them, and a fresh run of the command would not
    repeat it."""
    used: dict[str, dict] = {}
    for claim in claims:
        if claim.not_tested is not None:
            continue
        claim_width = widths[claim.key]
        for arm in swept_arms(claim):
            used |= {r["key"]: r for r in sweep_runs(claim, arm, runs, claim_width)}
        for _, done in final_runs(claim, runs, claim_width).values():
            used |= {r["key"]: r for r in done}
        used |= {p.key: runs[p.key] for p in longer_runs(claim, runs, claim_width) if p.key in runs}
    return used


def claim_widths(claims: Sequence[Claim] = CLAIMS) -> dict[str, dict[str, int | None]]:
    return {c.key: matched_mlp_hidden(c) for c in claims if c.not_tested is None}


def spread(values: Sequence[float]) -> float:
    return float(np.max(values) - np.min(values)) if len(values) else float("nan")
