"""`atlas-eqx results niah-probe`, the page: the table, the comparison with ATLAS Table 3, the
plot, and `niah_probe_result` (the measurement: `_niah_probe_run.py`)."""

import json
import pathlib
import time

import jax
import numpy as np

from .._plot import pyplot_or_none, save_figure
from ._niah_probe_run import (
    distinct_contexts,
    NiahProbeConfig,
    probe_memories,
    QUICK_NIAH,
    run_niah_probe,
)


def _one_success_interval(n: int) -> tuple[float, float]:
    """Clopper-Pearson 95% interval of a binomial proportion after 1 success in `n` trials."""
    lower = 1.0 - 0.975 ** (1.0 / n)  # P(X >= 1) = 0.025
    low, high = 1.0 / n, 1.0
    for _ in range(60):  # P(X <= 1) = 0.025, decreasing in p
        mid = 0.5 * (low + high)
        tail = (1 - mid) ** n + n * mid * (1 - mid) ** (n - 1)
        low, high = (mid, high) if tail > 0.025 else (low, mid)
    return lower, 0.5 * (low + high)


def _fmt_length(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _format_niah(config: NiahProbeConfig, records: list[dict], command: str, quick: bool) -> str:
    memories = {m.name: m for m in probe_memories()}
    lengths = config.lengths
    by = {(r["haystack"], r["memory"], r["length"]): r for r in records}
    names = list(dict.fromkeys(r["memory"] for r in records))
    hays = list(dict.fromkeys(r["haystack"] for r in records))
    lines = [
        "# S-NIAH, memory only: one needle in up to 1M haystack tokens (no outer training)",
        "",
        ("**Quick run (tiny sizes, for tests): not a result.**\n" if quick else ""),
        f"Regenerate with `{command}`.",
        "",
        f"Setup: d_k = {config.key_dim}, d_v = {config.value_dim}, one head, float32. Haystack "
        f"token t has key and value fixed random projections of its last {config.context} bytes "
        "(`probe_tables`: a random byte embedding through a causal convolution of width "
        f"{config.context}, unit-normalised), the bytes of RULER's noise block "
        f"(S-NIAH-PK; {distinct_contexts('noise', config.context):,} distinct contexts) or of "
        "the shipped public-domain excerpt (S-NIAH-N's essay haystack; "
        f"{distinct_contexts('essay', config.context):,} distinct contexts), cycled from a "
        "random offset. The needle replaces the token at a uniform random depth: a random unit key "
        f"and one of {config.codebook} random unit codebook values (chance "
        f"{100 / config.codebook:.2f}%). All T tokens are written with "
        f"`ae.omega_scan(..., state=state)` in pieces of {config.piece} tokens (memory flat in "
        "T), then the needle key is read with eta = 0; correct iff the nearest codebook value by "
        f"cosine is the needle's. {config.examples} examples per length, vmapped; the "
        "haystack, depths and needles are drawn from `numpy.random.default_rng((seed, T))`. "
        "Every memory is a `LinearMemory` from W_0 = 0 with GD, alpha = 1 and "
        "eta_t = 1/(c ||phi(k_t)||^2) for the delta rule:",
        "",
        *(f"- `{n}`: {memories[n].description}" for n in names if n in memories),
        "",
        "## Accuracy (%) against length T",
        "",
        "rho = the mean fraction of $\\|\\phi(k_{needle})\\|^2$ outside the span of the "
        "haystack's features (`needle_outside_span`; measured on the longest run's needles): "
        "only that part of the needle's write is safe from haystack writes of the delta "
        "rule.",
        "",
        f"Each entry is k/{config.examples} examples: one example is "
        f"{100 / config.examples:.1f} points, so single-example differences are noise (the "
        f"Clopper-Pearson 95% interval for 1/{config.examples} is "
        + "{:.1f}% to {:.1f}%).".format(*(100 * x for x in _one_success_interval(config.examples))),
        "",
        "| haystack | memory | state floats | rho | "
        + " | ".join(_fmt_length(t) for t in lengths)
        + " |",
        "|---|---|---|---|" + "---|" * len(lengths),
    ]
    for h in hays:
        for n in names:
            row = [by[(h, n, t)] for t in lengths]
            lines.append(
                f"| {h} | {n} | {row[0]['state_floats']:,} | {row[-1]['outside_span']:.3f} | "
                + " | ".join(f"{100 * r['accuracy']:.1f}" for r in row)
                + " |"
            )
    lines += [
        "",
        "## Speed and resident memory",
        "",
        f"tokens/s = {config.examples} streams x T / wall seconds (compilation excluded; the "
        "machine is shared, so absolute numbers vary). Peak RSS = the process's high-water "
        "mark (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) after each length, in MiB; it is "
        "monotone over the whole command, so flat means no length needed more memory than "
        "the ones before it. A memory's programs are compiled before its first length (and "
        "for the piece size at 4K), which is where most of the increases happen; the rho "
        "diagnostic runs after all streams.",
        "",
        "| haystack | memory | "
        + " | ".join(f"tok/s {_fmt_length(t)}" for t in lengths)
        + " | "
        + " | ".join(f"peak RSS {_fmt_length(t)}" for t in lengths)
        + " |",
        "|---|---|" + "---|" * (2 * len(lengths)),
    ]
    for h in hays:
        for n in names:
            row = [by[(h, n, t)] for t in lengths]
            lines.append(
                f"| {h} | {n} | "
                + " | ".join(f"{r['tokens_per_s']:,.0f}" for r in row)
                + " | "
                + " | ".join(f"{r['peak_rss_mib']:.0f}" for r in row)
                + " |"
            )
    lines += ["", "![accuracy against length](niah_probe.png)", ""]
    lines += _niah_against_paper(config, records, by, names, hays)
    return "\n".join(lines) + "\n"


def _niah_against_paper(config, records, by, names, hays) -> list[str]:
    lengths = config.lengths
    first, last = lengths[0], lengths[-1]
    lines = [
        "## Against the paper",
        "",
        "The paper's S-NIAH numbers (digest 8.2, ATLAS Table 3; Titans Table 2) are for trained "
        "models (trained at 4K, read through a learned query, LM decoding); this probe has no "
        "outer training, no learned gates and random keys, so it measures only what the "
        "update rule and the feature map keep. Side by side, at the nearest lengths:",
        "",
        "| model (paper) | PK 2K | PK 4K | PK 16K | N 2K | N 4K | N 16K | probe memory | "
        "noise 1K | noise 4K | noise 16K | essay 1K | essay 4K | essay 16K |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    paper = {
        "linear_attention": ("(no linear-attention row)", "- | - | - | - | - | -"),
        "deltanet": ("DeltaNet", "96.8 | 98.8 | 71.4 | 47.2 | 15.4 | 5.4"),
    }
    atlas_row = "100 | 99.2 | 97.0 | 100.0 | 100.0 | 84.0"
    no_probe = "none (a trained deep memory with Muon; every probe memory is linear)"

    def acc(h, n, t):
        r = by.get((h, n, t))
        return "n/a" if r is None else f"{100 * r['accuracy']:.1f}"

    for n in names:
        model, numbers = paper.get(n, ("(no paper row)", "- | - | - | - | - | -"))
        cells = " | ".join(acc(h, n, t) for h in ("noise", "essay") for t in (1024, 4096, 16384))
        lines.append(f"| {model} | {numbers} | {n} | {cells} |")
    lines.append(f"| Atlas | {atlas_row} | {no_probe} | " + " | ".join(["-"] * 6) + " |")
    lines += [
        "",
        "The paper also claims (Fig. 4, BABILong, fine-tuned) that Atlas keeps more than 80% "
        "accuracy at 10M tokens; this probe stops at "
        f"{_fmt_length(last)} and has no trained model.",
        "",
        "Observations (computed from the tables above):",
        "",
    ]
    for h in hays:
        for n in names:
            a0, a1 = by[(h, n, first)]["accuracy"], by[(h, n, last)]["accuracy"]
            lines.append(
                f"- {h}, {n}: {100 * a0:.1f}% at {_fmt_length(first)}, {100 * a1:.1f}% at "
                f"{_fmt_length(last)}."
            )
    peaks = [r["peak_rss_mib"] for r in records]
    long = [r for r in records if r["length"] == last]
    lines += [
        f"- Resident memory: the process's high-water mark went from {peaks[0]:.0f} MiB after "
        f"the first run to {max(peaks):.0f} MiB over the whole command; the state of a stream "
        "is a fixed number of floats (table), independent of T.",
        f"- Speed at {_fmt_length(last)}: "
        + ", ".join(f"{r['haystack']}/{r['memory']} {r['tokens_per_s']:,.0f} tok/s" for r in long)
        + ".",
        "",
        "Reading: a delta-rule write of a haystack token changes $W$ only along its own "
        "$\\phi(k_t)$, so the needle survives a long haystack only through the part of "
        "$\\phi(k_{needle})$ outside the span of the haystack's features (rho above). With "
        f"the identity map (d_k = {config.key_dim}) the haystack spans every direction (rho = "
        "0). The Taylor-initialised polynomial map puts 2 of the 2.5 units of "
        "$\\|\\phi(k)\\|^2$ of a unit key on the constant and linear terms, which the "
        "haystack spans as well, so it gains little over the identity; the variant whose norm "
        "sits on the degree-2 block keeps a larger rho on the noise haystack. The essay "
        "haystack has more distinct contexts than any of these feature dimensions (rho = 0 "
        "for all). Hebbian linear attention never subtracts: every haystack write adds "
        "$v_t\\phi(k_t)^\\top$ on top of the needle. Unlike the paper's models, nothing here "
        "learns to gate out haystack writes or to shape keys, which is how trained DeltaNet "
        "and Atlas reach their S-NIAH-PK scores.",
        "",
    ]
    return lines


def _plot_niah(config: NiahProbeConfig, records: list[dict], path: pathlib.Path) -> bool:
    plt = pyplot_or_none()
    if plt is None:
        return False
    hays = list(dict.fromkeys(r["haystack"] for r in records))
    names = list(dict.fromkeys(r["memory"] for r in records))
    figure, axes = plt.subplots(1, len(hays), figsize=(6 * len(hays), 4.2), sharey=True)
    axes = np.atleast_1d(axes)
    for axis, h in zip(axes, hays, strict=True):
        for n in names:
            rows = [r for r in records if r["haystack"] == h and r["memory"] == n]
            axis.plot(
                [r["length"] for r in rows],
                [100 * r["accuracy"] for r in rows],
                marker="o",
                label=n,
            )
        axis.axhline(100 / config.codebook, color="grey", lw=0.8, ls=":", label="chance")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("haystack length T (tokens)")
        axis.set_title(f"{h} haystack", fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"needle recalled (%), {config.examples} examples per point")
    axes[0].legend(fontsize=7)
    figure.suptitle(
        f"Memory-only S-NIAH probe (d_k = {config.key_dim}, d_v = {config.value_dim}, "
        "no outer training)",
        fontsize=10,
    )
    save_figure(figure, path)
    return True


def niah_probe_result(out_dir: pathlib.Path, *, quick: bool = False, progress: bool = True) -> str:
    """`atlas-eqx results niah-probe`: writes `results.md` and `niah_probe.png`."""
    config = QUICK_NIAH if quick else NiahProbeConfig()
    command = "atlas-eqx results niah-probe" + (" --quick" if quick else "")
    start = time.perf_counter()
    memories = probe_memories()
    if config.memories is not None:
        memories = tuple(m for m in memories if m.name in config.memories)
    records = run_niah_probe(config, memories, config.haystacks, progress=progress and not quick)
    markdown = _format_niah(config, records, command, quick)
    markdown += (
        f"\nWall time of this run: {time.perf_counter() - start:.0f} s ({jax.default_backend()}).\n"
    )
    out_dir = pathlib.Path(out_dir)
    (out_dir / "results.md").write_text(markdown)
    (out_dir / "records.json").write_text(json.dumps(records, indent=1) + "\n")
    _plot_niah(config, records, out_dir / "niah_probe.png")
    return markdown
