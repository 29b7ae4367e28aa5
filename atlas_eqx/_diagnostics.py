r"""An opt-in divergence diagnostic: where an inner loop first goes non-finite, and how its fast
weights grow on the way.

`diagnose_scan` runs the sequential oracle chunk by chunk (a split at chunk boundaries computes
the same function as one call, I-7) and records, after every chunk of `chunk_size` tokens,
$\|W\|_F$ over all the memory's weights. It is a debugging tool, slower than `omega_scan`; it
never changes what a model computes.
"""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Scalar

import feature_maps as fm
import optimizers as iopt

from ._memory import AbstractMemory
from ._objective import l2
from ._scan import omega_scan
from ._state import init_omega_state


class DivergenceReport(eqx.Module):
    """What `diagnose_scan` found for one sequence.

    - `outputs`: the reads $y_t$, `(T, d_v)` (those of `omega_scan(method="sequential")`).
    - `weight_norms`: $\\|W\\|_F$ after each chunk, `(n_chunks,)`; `chunk_ends` the step
      (1-based) each one follows.
    - `initial_norm`: $\\|W_0\\|_F$.
    - `first_nonfinite_step`: the first step (1-based) whose read or weights are NaN or
      infinite, or 0 when every step stays finite.
    - `growth`: the largest $\\|W\\|_F / \\|W_0\\|_F$ over the finite chunks.
    """

    outputs: Float[Array, "T d_v"]
    weight_norms: Float[Array, " n_chunks"]
    chunk_ends: Array
    initial_norm: Float[Array, ""]
    first_nonfinite_step: Array
    growth: Float[Array, ""]


def _frobenius(memory: AbstractMemory) -> Float[Array, ""]:
    leaves = jax.tree.leaves(eqx.filter(memory, eqx.is_inexact_array))
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in leaves))


@eqx.filter_jit
def _scan_chunks(memory: AbstractMemory, pieces: tuple, options: dict):
    """The sequential scan over chunk-shaped pieces, carrying the state; the reads and
    ||W||_F after each piece."""

    def body(state, piece):
        y, state = omega_scan(memory, *piece, **options, state=state, method="sequential")
        return state, (y, _frobenius(state.memory))

    initial = init_omega_state(memory, options["optimizer"], options["window"])
    _, (ys, norms) = jax.lax.scan(body, initial, pieces)
    return ys, norms


def diagnose_scan(
    memory: AbstractMemory,
    q: Float[Array | np.ndarray, "T d_k"],
    k: Float[Array | np.ndarray, "T d_k"],
    v: Float[Array | np.ndarray, "T d_v"],
    lr: Float[Array | np.ndarray, " T"],
    decay: Float[Array | np.ndarray, " T"],
    momentum: Float[Array | np.ndarray, " T"] | None = None,
    gamma: Float[Array | np.ndarray, " T"] | Float[Array | np.ndarray, "T c"] | None = None,
    *,
    feature_map: fm.AbstractFeatureMap = fm.Identity(),
    objective: Callable[..., Scalar] = l2,
    optimizer: iopt.InnerOptimizer = iopt.gd(),
    window: int = 1,
    chunk_size: int = 1,
    decay_first: bool = False,
) -> DivergenceReport:
    """Run `omega_scan(method="sequential")` on these arguments (no carried state) and report
    the first non-finite step and the growth of the fast weights; see `DivergenceReport`."""
    T = q.shape[0]
    if T == 0:
        raise ValueError("diagnose_scan: `q` is empty (T = 0); a sequence needs at least one token")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"diagnose_scan: `chunk_size` must be an integer >= 1; got {chunk_size!r}")
    n_chunks = math.ceil(T / chunk_size)
    padded = n_chunks * chunk_size

    def pad(x, value):
        x = jnp.asarray(x)
        widths = [(0, padded - T)] + [(0, 0)] * (x.ndim - 1)
        return jnp.pad(x, widths, constant_values=value).reshape(
            (n_chunks, chunk_size) + x.shape[1:]
        )

    # Padding steps write nothing (eta = 0, gates 0) and keep the weights (alpha = 1).
    pieces: list[Array | None] = [pad(x, 0.0) for x in (q, k, v, lr)]
    pieces.append(pad(decay, 1.0))
    pieces.append(None if momentum is None else pad(momentum, 0.0))
    pieces.append(None if gamma is None else pad(gamma, 0.0))
    options = dict(
        feature_map=feature_map,
        objective=objective,
        optimizer=optimizer,
        window=window,
        chunk_size=chunk_size,
        decay_first=decay_first,
    )

    ys, norms = _scan_chunks(memory, tuple(pieces), options)
    outputs = ys.reshape((padded, -1))[:T]
    chunk_ends = jnp.minimum((jnp.arange(n_chunks) + 1) * chunk_size, T)
    initial_norm = _frobenius(memory)
    bad_read = ~jnp.all(jnp.isfinite(outputs), axis=-1)
    bad_chunk = ~jnp.isfinite(norms)
    first = jnp.where(
        jnp.any(bad_read),
        jnp.argmax(bad_read) + 1,
        jnp.where(jnp.any(bad_chunk), chunk_ends[jnp.argmax(bad_chunk)], 0),
    )
    finite_norms = jnp.where(jnp.isfinite(norms), norms, 0.0)
    growth = jnp.max(finite_norms) / initial_norm
    return DivergenceReport(outputs, norms, chunk_ends, initial_norm, first, growth)
