"""The sequential reference scan: the oracle every fast path is tested against.

One `lax.scan` over tokens with `jax.grad` inside. Nothing here is clever on purpose.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

import optimizers as iopt

from ._scan_inputs import ScanInputs, ScanRule
from ._state import OmegaState


def _window_loss(
    params, static, features, values, weights, objective: Callable[..., Scalar]
) -> Scalar:
    memory = eqx.combine(params, static)
    losses = jax.vmap(lambda x, v: objective(memory(x), v))(features, values)
    return jnp.sum(weights * losses)


@eqx.filter_jit
def sequential_scan(
    state: OmegaState, inputs: ScanInputs, rule: ScanRule
) -> tuple[Float[Array, "T d_out"], OmegaState]:
    r"""Token-by-token Omega rule with a frozen gradient anchor per chunk.

    For token $t$ in the chunk whose anchor is $W_s$ (the weights after the previous chunk):

    $$g_t = \nabla_W \sum_{i=t-c+1}^{t}\gamma_{t,i}\,\mathrm{obj}(\mathcal M(\phi(k_i); W), v_i)
    \Big|_{W = W_s},\quad S_t = \theta_tS_{t-1} + g_t,\quad W_t = \alpha_tW_{t-1} - \eta_tP(S_t),
    \quad y_t = \mathcal M(\phi(q_t); W_t).$$

    `chunk_size=1` makes $W_s = W_{t-1}$: the paper's rule (ATLAS Eqs 10, 32-33, 56-58).
    With `decay_first=True` the gradient is taken at $(\prod_{j=s+1}^{t}\alpha_j) W_s$, which
    for `chunk_size=1` is $\alpha_tW_{t-1}$: Gated DeltaNet's order (digest I-12).
    A gate `gamma` of shape `(T,)` is per written token ($\gamma_{t,i} = \gamma_i$); of shape
    `(T, c)` it is per step and offset ($\gamma_{t,t-j}$ = `gamma[t, j]`).
    """
    objective, optimizer = rule.objective, rule.optimizer
    chunk_size, decay_first = rule.chunk_size, rule.decay_first
    params, static = eqx.partition(state.memory, eqx.is_inexact_array)
    per_step_gates = inputs.gamma.ndim == 2

    def step(carry, token):
        params, opt_state, anchor, anchor_decay, feats, vals, gates, mask = carry
        t, phi_q, phi_k, v_t, lr_t, decay_t, theta_t, gamma_t = token

        chunk_start = (t % chunk_size) == 0
        anchor = jax.tree.map(lambda w, a: jnp.where(chunk_start, w, a), params, anchor)
        anchor_decay = jnp.where(chunk_start, 1.0, anchor_decay) * decay_t

        window_feats = jnp.concatenate([feats, phi_k[None]])
        window_vals = jnp.concatenate([vals, v_t[None]])
        window_mask = jnp.concatenate([mask, jnp.ones((1,), bool)])
        if per_step_gates:
            window_gates = gamma_t[::-1]
        else:
            window_gates = jnp.concatenate([gates, gamma_t[None]])
        weights = jnp.where(window_mask, window_gates, 0.0)

        base = anchor
        if decay_first:
            base = jax.tree.map(lambda a: anchor_decay * a, anchor)
        grads = jax.grad(_window_loss)(base, static, window_feats, window_vals, weights, objective)
        updates, opt_state = optimizer.update(
            grads, opt_state, params, lr=lr_t, decay=decay_t, momentum=theta_t
        )
        params = iopt.apply_updates(params, updates)
        y_t = eqx.combine(params, static)(phi_q)

        if per_step_gates:
            stored_gates = jnp.ones_like(gates)
        else:
            stored_gates = window_gates[1:]
        carry = (
            params,
            opt_state,
            anchor,
            anchor_decay,
            window_feats[1:],
            window_vals[1:],
            stored_gates,
            window_mask[1:],
        )
        return carry, y_t

    T = inputs.v.shape[0]
    carry = (
        params,
        state.optimizer_state,
        params,
        jnp.ones((), inputs.lr.dtype),
        state.window_features,
        state.window_values,
        state.window_gates,
        state.window_mask,
    )
    i = inputs
    per_token = (jnp.arange(T), i.features_q, i.features_k, i.v, i.lr, i.decay, i.momentum, i.gamma)
    carry, y = jax.lax.scan(step, carry, per_token)
    params, opt_state, _, _, feats, vals, gates, mask = carry
    new_state = OmegaState(
        memory=eqx.combine(params, static),
        optimizer_state=opt_state,
        window_features=feats,
        window_values=vals,
        window_gates=gates,
        window_mask=mask,
    )
    return y, new_state
