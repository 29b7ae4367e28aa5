import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PyTree

import optimizers as iopt

from ._memory import AbstractMemory


class OmegaState(eqx.Module):
    """What `omega_scan` carries from one call to the next (digest I-7).

    - `memory`: the memory with the current fast weights $W_t$.
    - `optimizer_state`: the inner learner's state (the momentum $S_t$).
    - `window_features`, `window_values`, `window_gates`: $\\phi(k_i)$, $v_i$ and $\\gamma_i$ of
      the last $c - 1$ tokens, oldest first, whose gradients enter the next steps' windows.
    - `window_mask`: which of those slots hold a real token (the first $c-1$ steps of a
      sequence have fewer predecessors).

    Per-token gates (`gamma` of shape `(T,)`) travel with their tokens in `window_gates`. A call
    with per-step gates (`(T, c)`) stores ones there, since its gates belong to steps, not
    tokens; resume such a state with per-step gates again.
    """

    memory: AbstractMemory
    optimizer_state: PyTree
    window_features: Float[Array, "c_minus_1 d_in"]
    window_values: Float[Array, "c_minus_1 d_out"]
    window_gates: Float[Array, " c_minus_1"]
    window_mask: Bool[Array, " c_minus_1"]


def init_omega_state(
    memory: AbstractMemory, optimizer: iopt.InnerOptimizer, window: int = 1
) -> OmegaState:
    """The state at the start of a sequence: $W_0$ from `memory`, $S_0 = 0$, an empty window."""
    if window < 1:
        raise ValueError(f"init_omega_state: `window` must be >= 1; got {window}")
    params = eqx.filter(memory, eqx.is_inexact_array)
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("init_omega_state: the memory has no floating-point weights to learn")
    dtype = jnp.result_type(*leaves)
    return OmegaState(
        memory=memory,
        optimizer_state=optimizer.init(params),
        window_features=jnp.zeros((window - 1, memory.d_in), dtype),
        window_values=jnp.zeros((window - 1, memory.d_out), dtype),
        window_gates=jnp.zeros((window - 1,), dtype),
        window_mask=jnp.zeros((window - 1,), bool),
    )
