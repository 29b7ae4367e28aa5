"""What the untrained-memory studies (`_capacity_*.py`, `_niah_probe_*.py`) share: resident
memory, the floats a state holds, unit vectors."""

import pathlib
import resource

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

import atlas_eqx as ae


def _rss_mib() -> float:
    """The process's peak resident set size so far (`ru_maxrss`, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib() -> float | None:
    """The current resident set size from `/proc/self/statm` (None where that is missing)."""
    try:
        pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):  # pragma: no cover - non-Linux
        return None
    return pages * resource.getpagesize() / 2**20


def _unit(x: Array) -> Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _state_floats(state: ae.OmegaState) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(eqx.filter(state, eqx.is_array)))
