"""`atlas-eqx results NAME`: the registry of result generators under `experiments/results/`.

Each entry maps a name to a function `(out_dir, *, quick=False, progress=True) -> markdown`
that runs the experiment, writes `results.md` (a table with the command that regenerates it
written above) and a PNG plot into `out_dir`, and returns the markdown. `quick=True` runs
tiny sizes (for tests); the files then say so. `progress=False` turns off progress bars
(generators without any ignore it).
"""

import pathlib
from collections.abc import Callable

from ._capacity_page import capacity_result
from ._claims_page import claims_result
from ._lm import run_lm
from ._mqar_state import run_mqar_state
from ._niah_extrapolate import run_niah_extrapolate
from ._niah_probe_page import niah_probe_result


ResultFunction = Callable[..., str]

RESULTS: dict[str, ResultFunction] = {
    "capacity": capacity_result,
    "claims": claims_result,
    "niah-probe": niah_probe_result,
    "mqar-state": run_mqar_state,
    "lm": run_lm,
    "niah-extrapolate": run_niah_extrapolate,
}


def default_out_dir(name: str) -> pathlib.Path:
    """`experiments/results/<name>` of this checkout."""
    return pathlib.Path(__file__).parents[1] / "results" / name


def run_result(
    name: str,
    out_dir: str | pathlib.Path | None = None,
    *,
    quick: bool = False,
    progress: bool = True,
) -> str:
    """Run the result generator `name` (a key of `RESULTS`) into `out_dir`."""
    if name not in RESULTS:
        raise SystemExit(
            f"atlas-eqx results: unknown result {name!r}; choose from: {', '.join(sorted(RESULTS))}"
        )
    out = default_out_dir(name) if out_dir is None else pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return RESULTS[name](out, quick=quick, progress=progress)
