"""`atlas-eqx plot`: curves from `metrics.jsonl` files written by the training loop."""

import json
import pathlib
from collections.abc import Sequence
from typing import Any


def pyplot_or_none() -> Any:
    """`matplotlib.pyplot` on the non-interactive Agg backend, or `None` without matplotlib
    (the optional extra `plot`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(figure: Any, path: str | pathlib.Path, **layout: Any) -> None:
    """`tight_layout(**layout)`, write `path` at 120 dpi, close `figure`."""
    import matplotlib.pyplot as plt

    figure.tight_layout(**layout)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_metrics(
    paths: Sequence[str | pathlib.Path], out: str | pathlib.Path, *, key: str = "loss"
):
    """One line per file: `key` of the per-step records, and of the evaluations if present."""
    plt = pyplot_or_none()
    if plt is None:
        raise SystemExit("atlas-eqx plot needs matplotlib: pip install 'atlas-eqx[plot]'")
    figure, axis = plt.subplots(figsize=(6, 4))
    plotted = 0
    for path in paths:
        path = pathlib.Path(path)
        if not path.is_file():
            raise SystemExit(f"atlas-eqx plot: {path}: no such file")
        try:
            records = [json.loads(line) for line in path.read_text().splitlines() if line]
        except json.JSONDecodeError as error:
            raise SystemExit(f"atlas-eqx plot: {path} is not JSON lines ({error})") from None
        steps = [r["step"] for r in records if key in r]
        plotted += len(steps) + sum(key in r.get("eval", {}) for r in records)
        if steps:
            axis.plot(steps, [r[key] for r in records if key in r], label=f"{path} (train)")
        evals = [(r["step"], r["eval"][key]) for r in records if key in r.get("eval", {})]
        if evals:
            axis.plot(*zip(*evals, strict=True), marker="o", label=f"{path} (eval)")
    if not plotted:
        plt.close(figure)
        raise SystemExit(
            f"atlas-eqx plot: no record with {key!r} in {', '.join(map(str, paths))}; "
            "nothing to plot"
        )
    axis.set_xlabel("step")
    axis.set_ylabel(key)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    save_figure(figure, out)
