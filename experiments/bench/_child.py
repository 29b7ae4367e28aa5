"""The entry point of one measurement subprocess of `bench peers` (`run_child` starts it)."""

import json
import os
import sys

from ._peers_measure import (
    _measure_jax_layer,
    _measure_lm_step,
    _measure_torch_layer,
    measure_gemm,
)
from ._subprocess import _peak_rss_mib


def _child_main() -> None:
    """Entry point of one measurement subprocess: the spec is JSON in argv[1]; the result is
    printed as one JSON line prefixed by `RESULT `."""
    spec = json.loads(sys.argv[1])
    os.sched_setaffinity(0, spec["cpus"])  # before jax or torch start their thread pools
    if spec["kind"] == "stream":
        from ._stream_scan import measure_stream

        result = measure_stream(spec)
    elif spec["kind"] == "gemm":
        result = measure_gemm(spec)
    elif spec["framework"] == "torch":
        result = _measure_torch_layer(spec, spec["threads"])
    elif spec["kind"] == "lm":
        result = _measure_lm_step(spec)
    else:
        result = _measure_jax_layer(spec)
    result["peak_rss_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)
