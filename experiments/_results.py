"""`atlas-eqx results NAME`: the registry of results commands.

Each entry maps a name to a function `(out_dir=None, *, quick=False, progress=True) -> str` that
runs the experiment, writes `results.md` (the markdown table with the command that regenerates
it) and a PNG plot under `out_dir` (default `experiments/results/NAME`), and returns the
markdown. `quick=True` runs a tiny configuration (for tests).
"""

from collections.abc import Callable

from ._results_train import run_lm, run_mqar_state, run_niah_extrapolate


RESULTS: dict[str, Callable[..., str]] = {
    "mqar-state": run_mqar_state,
    "lm": run_lm,
    "niah-extrapolate": run_niah_extrapolate,
}
