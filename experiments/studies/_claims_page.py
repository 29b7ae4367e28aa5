"""The page of `atlas-eqx results claims`: one verdict per claim, the evidence under it, plots
with seed bands, and the claims table of `experiments/results/README.md`.

Verdicts. A difference between two arms counts only when it exceeds twice the larger of their
seed ranges (test accuracy, or test bits per byte for language modelling). A ranking claim is *reproduced* when every adjacent pair of the
paper's order is resolved in the paper's direction, *refuted* when any pair is resolved the
other way, and *not resolved* otherwise; a paired claim reads each ablation against its
reference the same way. A claim whose runs have not all finished says how many have.
"""

import dataclasses
import itertools
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from .._plot import pyplot_or_none, save_figure
from ._claims import (
    Claim,
    claim_widths,
    CLAIMS,
    final_runs,
    longer_runs,
    LRS,
    SEEDS,
    spread,
    sweep_runs,
    swept_arms,
    used_runs,
)
from ._claims_run import load_runs, run_claims


COMMAND = "atlas-eqx results claims"
BUDGET_S = 2.5 * 3600
README_START, README_END = "<!-- claims:start -->", "<!-- claims:end -->"


@dataclasses.dataclass
class ArmSummary:
    name: str
    lr: float | None
    tests: list[float]
    validations: list[float]
    parameters: int | None
    mlp_hidden: int | None
    diverged: int
    curves: list[list[tuple[int, float]]]

    @property
    def mean(self) -> float:
        return float(np.mean(self.tests)) if self.tests else float("nan")

    def cell(self, task) -> str:
        return _mean_range([task.shown(t) for t in self.tests])


def _mean_range(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def summarise(claim: Claim, runs: dict[str, dict], widths: dict[str, int | None]):
    summaries = []
    for arm in claim.arms:
        rate, done = final_runs(claim, runs, widths)[arm.name]
        summaries.append(
            ArmSummary(
                name=arm.name,
                lr=rate,
                tests=[r["test"] for r in done if r["diverged_at"] is None],
                validations=[r["validation"] for r in done if r["diverged_at"] is None],
                parameters=done[0]["parameters"] if done else None,
                mlp_hidden=widths[arm.name],
                diverged=sum(r["diverged_at"] is not None for r in done),
                curves=[r["curve"] for r in done],
            )
        )
    return summaries


def compare(better: ArmSummary, worse: ArmSummary) -> tuple[float, float, str]:
    """Gap of `better` over `worse` (the paper's direction), twice the larger seed range, and
    "as the paper" / "the other way" / "not resolved" (always, when a run of either diverged:
    its seed has no score, and a model that did not train says nothing of the claim)."""
    diverged = [f"{s.name} diverged in {s.diverged} of {len(SEEDS)} seeds"
                for s in (better, worse) if s.diverged]  # fmt: skip
    if diverged:
        gap = better.mean - worse.mean if better.tests and worse.tests else float("nan")
        return gap, float("nan"), "not resolved (" + "; ".join(diverged) + ")"
    gap = better.mean - worse.mean
    threshold = 2 * max(spread(better.tests), spread(worse.tests))
    if gap > threshold:
        return gap, threshold, "as the paper"
    if -gap > threshold:
        return gap, threshold, "the other way"
    return gap, threshold, "not resolved"


def verdict(claim: Claim, summaries: Sequence[ArmSummary]) -> tuple[str, list[str]]:
    """The claim's verdict and one line per comparison behind it."""
    if claim.not_tested is not None:
        return "not tested here", [claim.not_tested]
    finished = sum(len(s.tests) + s.diverged for s in summaries)
    expected_runs = len(SEEDS) * len(summaries)
    if finished < expected_runs:
        return f"running ({finished} of {expected_runs} final runs)", []
    by_name = {s.name: s for s in summaries}
    if claim.kind == "ranking":
        pairs = list(itertools.pairwise(summaries))
    else:
        reference = summaries[0]
        pairs = [
            (reference, by_name[name]) if direction == "worse" else (by_name[name], reference)
            for name, direction in claim.expected
        ]
    lines, readings = [], []
    for better, worse in pairs:
        gap, threshold, reading = compare(better, worse)
        readings.append(reading)
        if np.isnan(threshold):
            lines.append(f"{better.name} ahead of {worse.name} (the paper's order): {reading}.")
            continue
        lines.append(
            f"{better.name} ahead of {worse.name} (the paper's order) by {gap:+.3f} "
            f"{claim.task.metric} against twice the seed range {threshold:.3f}: {reading}."
        )
    if all(r == "as the paper" for r in readings):
        return "reproduced", lines
    if any(r == "the other way" for r in readings):
        return "refuted", lines
    return "not resolved", lines


def plot_claim(claim: Claim, summaries: Sequence[ArmSummary], path: pathlib.Path) -> bool:
    """Validation accuracy against step: the mean over seeds and the min-max band."""
    plt = pyplot_or_none()
    if plt is None or not any(s.curves for s in summaries):
        return False
    figure, axis = plt.subplots(figsize=(6, 4))
    for s in summaries:
        curves = [c for c in s.curves if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        steps = [step for step, _ in curves[0][:length]]
        values = np.array([[claim.task.shown(v) for _, v in c[:length]] for c in curves])
        (line,) = axis.plot(steps, values.mean(0), label=f"{s.name} (lr {s.lr:g})")
        axis.fill_between(steps, values.min(0), values.max(0), alpha=0.2, color=line.get_color())
    axis.set_xlabel("training step")
    axis.set_ylabel(f"validation {claim.task.metric}")
    axis.set_title(claim.title, fontsize=9)
    axis.legend(fontsize=7)
    save_figure(figure, path)
    return True


_TEST_AXES = {
    "length": ("length", "the longest", "T {}"),
    "pairs": ("number of pairs", "the most pairs", "{} pairs"),
}
"""For each `Task.test_axis`: the page's words for it, for its scored value, and its column."""


def claim_section(
    claim: Claim, runs: dict[str, dict], widths: dict[str, int | None], out_dir: pathlib.Path
) -> tuple[str, list[str]]:
    """The verdict and the markdown section of one claim (and its plot, when runs exist)."""
    if claim.not_tested is not None:
        return "not tested here", [f"## {claim.title}", "", f"Paper: {claim.paper}.", "",
                                   f"Not tested here: {claim.not_tested}.", ""]  # fmt: skip
    summaries = summarise(claim, runs, widths)
    result, comparisons = verdict(claim, summaries)
    plot_name = f"claims-{claim.key}.png"
    plotted = plot_claim(claim, summaries, out_dir / plot_name)
    rule = (
        "each arm's outer rate chosen on validation at seed 0"
        if claim.kind == "ranking"
        else f"{claim.arms[0].name}'s outer rate chosen on validation at seed 0; the others "
        "are paired with it (same rate, same seeds, same inner step size eta_max)"
    )
    lines = [
        f"## {claim.title}",
        "",
        f"Paper: {claim.paper}. Verdict: **{result}**.",
        "",
        f"{claim.task.describe()}; {rule}; test {claim.task.metric}, mean [min, max] over seeds "
        f"{', '.join(map(str, SEEDS))}.",
        "",
        f"| arm | options | outer lr | test {claim.task.metric} | validation mean | parameters | SwiGLU "
        "width | diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in zip(claim.arms, summaries, strict=True):
        options = ", ".join(f"{k}={v!r}" for k, v in _shown_options(claim, arm)) or "as shipped"
        lines.append(
            f"| {s.name} | {options} | {'-' if s.lr is None else f'{s.lr:g}'} | {s.cell(claim.task)} | "
            f"{_mean_range([claim.task.shown(v) for v in s.validations]).split(' [')[0]} | "
            f"{'-' if s.parameters is None else f'{s.parameters:,}'} | "
            f"{s.mlp_hidden or 'default'} | {s.diverged} |"
        )
    axis, values = claim.task.test_axis
    if len(values) > 1:
        by, scored_at, header = _TEST_AXES[axis]
        lines += ["", f"Test accuracy by {by} (the claim is scored at {scored_at}):", ""]
        headers = [header.format(n) for n in values]
        lines += ["| arm | " + " | ".join(headers) + " |", "|---|" + "---|" * len(values)]
        field = f"test_by_{axis}"
        for arm in claim.arms:
            _, done = final_runs(claim, runs, widths)[arm.name]
            cells = [_mean_range([r[field][str(n)] for r in done if field in r]) for n in values]
            lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    swept = swept_arms(claim)
    lines += ["", f"Rate sweep at seed 0 (validation {claim.task.metric}):", ""]
    lines += ["| arm | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " |"]
    lines += ["|---|" + "---|" * len(LRS)]
    for arm in swept:
        done = {r["lr"]: r for r in sweep_runs(claim, arm, runs, widths)}
        cells = [
            "-"
            if lr not in done
            else (
                "diverged"
                if done[lr]["diverged_at"] is not None
                else f"{claim.task.shown(done[lr]['validation']):.3f}"
            )
            for lr in LRS
        ]
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    if comparisons:
        lines += ["", "Reading:", ""] + [f"- {c}" for c in comparisons]
    edge = [s.name for s in summaries[: len(swept)] if s.lr in (min(LRS), max(LRS))]
    if edge:
        lines += ["", "Chosen rates at the edge of the grid (the best may lie beyond it): "
                  + ", ".join(edge) + "."]  # fmt: skip
    late = [(s.name, change) for s in summaries if (change := _late_change(s)) is not None]
    if late:
        lines += [
            "",
            f"Change of the mean validation {claim.task.metric} over the last quarter of "
            "training (near 0: the curve has flattened): "
            + ", ".join(f"{name} {claim.task.shown(change):+.3f}" for name, change in late)
            + ".",
        ]
    lines += _longer_lines(claim, runs, widths)
    counts = [s.parameters for s in summaries if s.parameters is not None]
    if counts:
        lines += [
            "",
            f"Parameter counts {min(counts):,} to {max(counts):,} "
            f"({max(counts) / min(counts) - 1:.1%} apart).",
        ]
    if plotted:
        lines += ["", f"![{claim.title}]({plot_name})"]
    return result, lines + [""]


def _late_change(summary: ArmSummary) -> float | None:
    """Mean over seeds of `_curve_late_change`, in scores."""
    changes = [c for curve in summary.curves if (c := _curve_late_change(curve)) is not None]
    return float(np.mean(changes)) if changes else None


def _curve_late_change(curve: Sequence[Sequence[float]]) -> float | None:
    """The last evaluation less the one three quarters in (None for under four points)."""
    if len(curve) < 4:
        return None
    final_step = curve[-1][0]
    earlier = min(curve, key=lambda point: abs(point[0] - 0.75 * final_step))
    return curve[-1][1] - earlier[1]


def _longer_lines(claim: Claim, runs: dict[str, dict], widths: dict[str, int | None]) -> list[str]:
    """The table of `claim.longer`: its arm at seed 0 at the claim's length and longer."""
    planned = longer_runs(claim, runs, widths)
    if claim.longer is None or not planned:
        return []
    name, _ = claim.longer
    rate, done = final_runs(claim, runs, widths)[name]
    task = claim.task
    rows = [(task.steps, r) for r in done if r["seed"] == SEEDS[0]]
    rows += [(p.task.steps, runs.get(p.key)) for p in planned]
    lines = [
        "",
        f"Trained longer: {name} at its chosen rate {rate:g}, seed 0, the same schedule "
        "stretched over more steps (one seed each; these runs show how far the length above is "
        "from a flat curve and rank nothing):",
        "",
        f"| steps | validation {task.metric} | change over the last quarter | "
        f"test {task.metric} | seconds |",
        "|---|---|---|---|---|",
    ]
    for steps, record in rows:
        if record is None:
            lines.append(f"| {steps} | - | - | - | - |")
        elif record["diverged_at"] is not None:
            lines.append(f"| {steps} | diverged | - | - | {record['seconds']:.0f} |")
        else:
            change = _curve_late_change(record["curve"])
            late = "-" if change is None else f"{task.shown(change):+.3f}"
            lines.append(
                f"| {steps} | {task.shown(record['validation']):.3f} | {late} | "
                f"{task.shown(record['test']):.3f} | {record['seconds']:.0f} |"
            )
    return lines


def _shown_options(claim: Claim, arm) -> list[tuple[str, object]]:
    from ._claims import _options

    return sorted(_options(claim, arm).items())


def format_page(
    claims: Sequence[Claim], runs: dict[str, dict], out_dir: pathlib.Path
) -> tuple[str, list[tuple[Claim, str]]]:
    widths = claim_widths(claims)
    rows, sections = [], []
    for claim in claims:
        result, section = claim_section(claim, runs, widths.get(claim.key, {}), out_dir)
        rows.append((claim, result))
        sections += section
    used = used_runs(claims, runs, widths)
    seconds = sum(r.get("seconds", 0.0) for r in used.values())
    unused = len(runs) - len(used)
    lines = [
        "# The paper's claims, tested",
        "",
        f"Regenerate (resumes from `runs.jsonl`): `{COMMAND}`. Protocol: "
        "`experiments/studies/_claims.py` (running it: `_claims_run.py`); verdict rule: `experiments/studies/_claims_page.py`. "
        f"{len(used)} runs so far, {seconds / 3600:.1f} core-hours of training"
        + (
            f" ({unused} more in `runs.jsonl` belong to an earlier choice of rate and are "
            "neither read nor counted)."
            if unused
            else "."
        ),
        "",
        claims_table(rows, link_prefix=""),
        "",
        *sections,
    ]
    return "\n".join(lines), rows


def claims_table(rows: Sequence[tuple[Claim, str]], link_prefix: str) -> str:
    lines = ["| claim | paper | verdict |", "|---|---|---|"]
    for claim, result in rows:
        anchor = re.sub(r"[^a-z0-9 _-]", "", claim.title.lower()).replace(" ", "-")
        lines.append(
            f"| [{claim.title}]({link_prefix}README.md#{anchor}) | {claim.paper} | {result} |"
        )
    return "\n".join(lines)


def update_results_index(index: pathlib.Path, rows: Sequence[tuple[Claim, str]]) -> None:
    """Replace the claims table between the markers of `experiments/results/README.md`."""
    if not index.exists():
        return
    text = index.read_text()
    table = (
        f"{README_START}\n{claims_table(rows, link_prefix='claims/')}\n\nFrom `{COMMAND}` "
        f"(`claims/README.md`: protocol, every run, plots with seed bands).\n{README_END}"
    )
    if README_START in text and README_END in text:
        before, rest = text.split(README_START, 1)
        _, after = rest.split(README_END, 1)
        text = before + table + after
    else:
        text = text.rstrip("\n") + "\n\n## The paper's claims\n\n" + table + "\n"
    index.write_text(text)


def write_page(claims: Sequence[Claim], runs: dict[str, dict], out_dir: pathlib.Path) -> str:
    text, rows = format_page(claims, runs, out_dir)
    (out_dir / "README.md").write_text(text + "\n")
    if out_dir.resolve() == (pathlib.Path(__file__).parents[1] / "results" / "claims").resolve():
        update_results_index(out_dir.parent / "README.md", rows)
    return text


def claims_result(
    out_dir: pathlib.Path,
    *,
    quick: bool = False,
    progress: bool = True,
    claims: Sequence[Claim] = CLAIMS,
) -> str:
    """`atlas-eqx results claims`: run what is missing (stopping new runs after
    `ATLAS_EQX_CLAIMS_BUDGET_S` seconds, default 2.5 hours), rewriting the page after each."""
    if quick:
        claims = [
            dataclasses.replace(
                c,
                task=dataclasses.replace(
                    c.task, steps=2, num_train=64, num_validation=16, num_test=16, batch_size=8
                ),  # fmt: skip
            )
            for c in claims
        ]
    budget = float(os.environ.get("ATLAS_EQX_CLAIMS_BUDGET_S", BUDGET_S))

    def on_run(record: dict) -> None:
        write_page(claims, load_runs(out_dir / "runs.jsonl"), out_dir)
        if progress:
            print(
                f"{record['preset']} {record['options']} lr {record['lr']:g} seed "
                f"{record['seed']}: validation {record['validation']:.3f} test "
                f"{record['test']:.3f} ({record['seconds']:.0f} s)",
                flush=True,
            )

    runs = run_claims(out_dir, claims, budget_s=budget, on_run=on_run)
    return write_page(claims, runs, out_dir)
