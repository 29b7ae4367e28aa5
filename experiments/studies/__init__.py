"""The studies that write the results pages under `experiments/results/`: the main job
(`atlas-eqx quickstart`) and its sweep, the write-strength probe, and `atlas-eqx results NAME`.

Builds on `experiments.tasks` and `experiments.training`; only the CLI imports it.
"""

from ._probe import (
    ALL_PRESETS as ALL_PRESETS,
    format_table as format_table,
    probe_presets as probe_presets,
    write_table as write_table,
)
from ._quickstart import QuickstartConfig as QuickstartConfig, run_quickstart as run_quickstart
from ._registry import (
    default_out_dir as default_out_dir,
    RESULTS as RESULTS,
    run_result as run_result,
)
from ._sweep import format_sweep as format_sweep, run_sweep as run_sweep, SweepConfig as SweepConfig
