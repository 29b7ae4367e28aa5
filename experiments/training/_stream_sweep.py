"""`atlas-eqx stream --sweep` and `--compare`: one stream per length (accuracy by fact depth,
resident memory against T) and one stream per memory / inner-learner variant, each written
as a results page (`experiments/results/stream/`)."""

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from .._plot import pyplot_or_none, save_figure
from ._stream import stream_run, StreamResult
from ._stream_data import StreamConfig


DEPTH_EDGES = (0, 10**2, 10**3, 10**4, 10**5, 10**6, 10**7)


def _sweep_config(base: StreamConfig, length: int, seed: int) -> StreamConfig:
    call = min(base.call_tokens, -(-length // base.chunk_size) * base.chunk_size)
    return dataclasses.replace(base, tokens=length, call_tokens=call, seed=seed)


def stream_sweep(
    lengths: tuple[int, ...],
    base: StreamConfig = StreamConfig(),
    *,
    out_dir: str | pathlib.Path = "experiments/results/stream",
    min_questions: int = 1024,
    repeat_budget: int = 200_000,
    progress: bool = True,
    command: str = "",
) -> list[dict[str, Any]]:
    """`stream_run` at each length (seeds `base.seed`, `base.seed + 1`, ... until
    `min_questions` questions are answered or the streams of that length reach
    `repeat_budget` tokens, so that short streams get several and long ones one), then
    `results.md` (accuracy, accuracy by depth, tokens/s, resident memory) and `stream.png`."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    pooled: list[tuple[int, str, str, int, bool]] = []
    for length in lengths:
        results = []
        seed = base.seed
        while not results or (
            sum(len(r.questions) for r in results) < min_questions
            and len(results) * length < repeat_budget
        ):
            results.append(stream_run(_sweep_config(base, length, seed), progress=progress))
            seed += 1
        answered = [q for r in results for q in r.questions]
        pooled += answered
        rss_first = [r.rss_mb[0][1] for r in results]
        rss_max = [max(x for _, x in r.rss_mb) for r in results]
        rows.append(
            dict(
                tokens=length,
                streams=len(results),
                questions=len(answered),
                accuracy=float(np.mean([q[4] for q in answered])),
                median_depth=float(np.median([q[3] for q in answered])),
                tokens_per_second=float(
                    sum(r.tokens_timed for r in results) / sum(r.seconds for r in results)
                ),
                rss_first_mb=rss_first[-1],
                rss_max_mb=rss_max[-1],
                rss_growth_mb=rss_max[-1] - rss_first[-1],
                peak_mb=results[-1].peak_mb,
            )
        )
    by_depth = StreamResult(base, 0, pooled, 0.0, 0, [], 0.0, None, True).accuracy_by_depth(
        DEPTH_EDGES
    )
    (out / "results.json").write_text(
        json.dumps(dict(config=dataclasses.asdict(base), rows=rows, by_depth=by_depth), indent=2)
    )
    (out / "results.md").write_text(_results_markdown(base, rows, by_depth, command))
    _plot(rows, by_depth, out / "stream.png")
    return rows


def _results_markdown(base, rows, by_depth, command: str) -> str:
    lines = [
        "# Memory-only streaming over a BABILong-style stream",
        "",
        f"Memory: {base.memory}, inner optimizer {base.optimizer}, polynomial phi (degree 2, "
        f"no constant), dim {base.dim}, Omega window c = {base.window}, chunk b = "
        f"{base.chunk_size}, lr {base.lr}, retention {base.decay}; {base.facts} qa1 facts per "
        f"stream hidden in the {base.corpus} distractor text; questions at uniform positions; "
        "chance 1/6. See `experiments/training/_stream.py` for the keys, values and how it answers.",
        "",
        "```",
        command,
        "```",
        "",
        "| tokens | streams | questions | accuracy | median depth | tokens/s | RSS after 1st "
        "call MiB | max RSS MiB | growth MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']:,} | {r['streams']} | {r['questions']} | {r['accuracy']:.3f} | "
            f"{r['median_depth']:,.0f} | {r['tokens_per_second']:,.0f} | "
            f"{r['rss_first_mb']:.0f} | {r['rss_max_mb']:.0f} | {r['rss_growth_mb']:+.0f} |"
        )
    lines += [
        "",
        "Accuracy by depth (tokens between the supporting fact and the question), pooled over "
        "every stream above:",
        "",
        "| depth | questions | accuracy |",
        "|---|---|---|",
    ]
    for low, high, n, accuracy in by_depth:
        if n:
            lines.append(f"| [{low:,}, {high:,}) | {n} | {accuracy:.3f} |")
    lines.append("")
    return "\n".join(lines)


def _plot(rows, by_depth, path: pathlib.Path) -> None:
    plt = pyplot_or_none()
    if plt is None:
        return

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    tokens = [r["tokens"] for r in rows]
    axes[0].plot(tokens, [r["accuracy"] for r in rows], "o-")
    axes[0].axhline(1 / 6, color="grey", ls="--", label="chance")
    axes[0].set(xscale="log", xlabel="stream length (tokens)", ylabel="accuracy", ylim=(0, 1))
    axes[0].legend()
    axes[1].plot(tokens, [r["tokens_per_second"] for r in rows], "o-")
    axes[1].set(xscale="log", xlabel="stream length (tokens)", ylabel="tokens / s")
    axes[1].set_ylim(0, max(r["tokens_per_second"] for r in rows) * 1.2)
    twin = axes[1].twinx()
    twin.plot(tokens, [r["rss_max_mb"] for r in rows], "s--", color="C1")
    twin.set_ylabel("max RSS (MiB)", color="C1")
    twin.set_ylim(0, max(r["rss_max_mb"] for r in rows) * 1.2)
    centres = [np.sqrt(max(lo, 1) * hi) for lo, hi, n, _ in by_depth if n]
    axes[2].plot(centres, [a for *_, n, a in by_depth if n], "o-")
    axes[2].axhline(1 / 6, color="grey", ls="--")
    axes[2].set(xscale="log", xlabel="fact depth (tokens)", ylabel="accuracy", ylim=(0, 1))
    save_figure(fig, path)


VARIANTS: dict[str, dict[str, Any]] = {
    "linear + GD (default)": {},
    "linear + momentum": dict(optimizer="momentum", lr=0.05),
    "linear + Muon per chunk": dict(optimizer="muon_per_chunk", lr=0.05),
    "MLP + GD": dict(memory="mlp"),
    "MLP + Muon per chunk (ATLAS's memory)": dict(
        memory="mlp", optimizer="muon_per_chunk", lr=0.02
    ),
}
"""Memory and inner-optimizer variants compared by `stream_compare` (step sizes picked by a
few trial runs of 32K tokens each; larger ones diverged or fell to chance)."""


def stream_compare(
    length: int,
    base: StreamConfig = StreamConfig(),
    *,
    variants: dict[str, dict[str, Any]] | None = None,
    out_dir: str | pathlib.Path = "experiments/results/stream",
    progress: bool = True,
    command: str = "",
) -> list[dict[str, Any]]:
    """One stream of `length` tokens (the same stream and questions) per variant of
    `VARIANTS`; writes `variants.md` (accuracy, accuracy by depth, tokens/s, RSS)."""
    variants = VARIANTS if variants is None else variants
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in variants.items():
        config = dataclasses.replace(_sweep_config(base, length, base.seed), **overrides)
        result = stream_run(config, progress=progress)
        rows.append(dict(name=name, config=config, result=result))
    edges = (0, 10**2, 10**3, 10**4, 10**5)
    lines = [
        f"# Memory variants on one {length:,}-token stream",
        "",
        f"The same stream, facts ({base.facts}) and questions for every variant; polynomial "
        f"phi (degree 2), dim {base.dim}, c = {base.window}, b = {base.chunk_size}; chance "
        "1/6. tokens/s is end-to-end on a shared 2-core CPU.",
        "",
        "```",
        command,
        "```",
        "",
        "| variant | lr | questions | accuracy | "
        + " | ".join(
            f"depth [{lo:,}, {hi:,})" for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        )
        + " | tokens/s | max RSS MiB |",
        "|---|---|---|---|" + "---|" * (len(edges) - 1) + "---|---|",
    ]
    for row in rows:
        result, config = row["result"], row["config"]
        bins = result.accuracy_by_depth(edges)
        cells = " | ".join(f"{a:.2f} (n={n})" if n else "-" for *_, n, a in bins)
        lines.append(
            f"| {row['name']} | {config.lr} | {len(result.questions)} | {result.accuracy:.3f} "
            f"| {cells} | {result.tokens_per_second:,.0f} | "
            f"{max(mb for _, mb in result.rss_mb):.0f} |"
        )
    lines.append("")
    (out / "variants.md").write_text("\n".join(lines))
    return [dict(name=r["name"], **r["result"].summary()) for r in rows]
