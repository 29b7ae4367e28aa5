"""The measurement subprocesses of `bench peers` (all parts): a fresh interpreter pinned to a
few CPUs, its resident memory and its own peak (`VmHWM`, not `ru_maxrss`: see `_peers.py`)."""

import json
import os
import pathlib
import resource
import subprocess
import sys
from typing import Any


def _rss_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    """This process's peak resident memory, `VmHWM` of `/proc/self/status`, in MiB (see the
    docstring of `_peers.py` for why not `ru_maxrss`); `ru_maxrss` where there is no `/proc`."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child_environment(threads: int) -> dict[str, str]:
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _pinned_cpus(threads: int) -> list[int]:
    return sorted(os.sched_getaffinity(0))[:threads]


def run_child(spec: dict[str, Any], threads: int, timeout_s: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter pinned to `threads` CPUs."""
    cpus = _pinned_cpus(threads)
    code = "from experiments.bench._child import _child_main; _child_main()"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, json.dumps({**spec, "threads": threads, "cpus": cpus})],
            env=_child_environment(threads),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout_s:.0f} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return dict(error=f"exit {done.returncode}: " + " | ".join(tail))
