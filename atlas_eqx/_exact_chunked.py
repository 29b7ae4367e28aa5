r"""The exact chunk-parallel form of the Omega rule for a linear memory under GD: execution
blocks that change the speed, never the model (the UT / WY transform of the delta rule,
generalised to windows, window gates, retention in either order, and frozen-anchor chunks).

With a linear memory, plain GD and an objective whose output gradient is affine in the
prediction (`l2`: $r = p - v$; `dot`: $r = -v$), step $m$ writes

$$W_{m+1} = \alpha_mW_m - \eta_m\sum_{o<c}\gamma_{m,o}\,r_{m,o}\,\phi_{m-o}^\top,\qquad
r_{m,o} = \nabla\mathrm{obj}\big(\beta_mW_{a(m)}\phi_{m-o},\ v_{m-o}\big),$$

where $a(m)$ is the step's gradient anchor (the first step of its model chunk of `chunk_size`
$b$ tokens; $a(m) = m$ for the exact recurrence $b = 1$) and $\beta_m = \prod_{j=a(m)}^{m}
\alpha_j$ with `decay_first` (Gated DeltaNet's order), else 1. Index the weights by positions
$p = 0, \dots, L$ of an execution block of $L$ steps ($W$ at position $p$ is the state after
$p$ of its steps) and let $D[p, q] = \prod_{j=q}^{p-1}\alpha_j$. Every residual is then an affine
function of the block-start weights $W_0$ and of the residuals of earlier model chunks:

$$r_{i,o} + \sum_{m + 1 \le a(i)}D[e_i, m+1]\,\eta_m\sum_{o'}\gamma_{m,o'}\,
(\phi_{m-o'}^\top\phi_{i-o})\,r_{m,o'} = D[e_i, 0]\,W_0\phi_{i-o} - v_{i-o},$$

with $e_i = i + 1$ under `decay_first`, else $a(i)$. Over the $Lc$ (step, window offset)
pairs, ordered by step, this is $(I + T)R = \mathrm{diag}(D[e, 0])XW_0^\top - V_X$ with $T$
strictly lower triangular ($X$, $V_X$: the features and values of the pairs). Its solution
$R = \tilde XW_0^\top - U$, with $\tilde X = (I+T)^{-1}\mathrm{diag}(D[e,0])X$ and
$U = (I+T)^{-1}V_X$, needs no state, so it is computed for every block at once before the
loop; the loop over blocks only carries $W_0$:

$$R = \tilde XW_0^\top - U,\qquad Y = D[\cdot + 1, 0]\odot(QW_0^\top) - PR,\qquad
W_L = D[L, 0]\,W_0 - (c\odot R)^\top X,$$

with $P[i, (m, o)] = [m \le i]\,D[i+1, m+1]\,\eta_m\gamma_{m,o}\,(q_i^\top\phi_{m-o})$ and
$c[(m, o)] = D[L, m+1]\,\eta_m\gamma_{m,o}$. The pairs read only the $L + c - 1$ tokens
$\Phi_E$, $V_E$ of the block's extended set ($X = S\Phi_E$, $V_X = SV_E$ with a 0/1 selection
$S$), so $\tilde X = Z\Phi_E$ and $U = Z_vV_E$ with $Z = (I+T)^{-1}\mathrm{diag}(D[e, 0])S$
and $Z_v = (I+T)^{-1}S$. With $H = \Phi_EW_0^\top$ the loop's work does not grow with $c$,
and everything it multiplies by the state is $(L + c - 1)$ wide:
$Y = D[\cdot+1, 0]\odot(QW_0^\top) - (PZ)H + (PZ_v)V_E$ and
$W_L = D[L, 0]W_0 - (S^\top\mathrm{diag}(c)(ZH - Z_vV_E))^\top\Phi_E$. Per block the loop makes
three products: $[\Phi_E; D\odot Q]W_0^\top$, the precomputed mixing
$\begin{pmatrix}-PZ & PZ_v\\ -E_Z & E_{Z_v}\end{pmatrix}$ ($E = S^\top\mathrm{diag}(c)$) times
$[H; V_E]$, and the write into $W$. When the block has one anchor ($b \ge L$) the pairs'
system is the identity ($T = 0$): then $PZ$ and $E_Z$ are sums over the block's tokens with
the band of window gates, $E_Z$ is diagonal, and without `decay_first` $Z = Z_v$, so the
mixing has $L + c - 1$ columns and multiplies $H - V_E$ (the frozen-anchor dual form).

For $b = 1$ and $c = 1$ this is fla's chunkwise delta rule (the UT transform); for `dot`,
$T = 0$ and it is chunked linear attention. The block
length $L$ is a speed setting only: it is rounded up to a multiple of $b$ so that model chunks
never straddle blocks, and every $L$ computes the same function (tested against
`sequential_scan` in float64).

`omega_scan(method="chunked")` sends linear memories under GD with `l2` or `dot` here
(`has_exact_form`); momentum, Muon, MLP memories and other objectives have no such closed
form and keep the frozen-anchor chunk loop of `atlas_eqx._chunked`, where the chunk size is
part of the model (as in Titans and ATLAS).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

import optimizers as iopt

from ._chunked import _scan_chunk_indices, carry_window, decay_matrix, make_chunks
from ._memory import LinearMemory
from ._objective import dot, l2
from ._scan_inputs import ScanInputs, ScanRule
from ._state import OmegaState


DEFAULT_BLOCK_SIZE = 16
"""Steps per execution block when `block_size=None` (`atlas-eqx bench exact`, see
`experiments/results/exact-chunked/results.md`)."""


def has_exact_form(memory, optimizer: iopt.InnerOptimizer, objective) -> bool:
    """Whether `exact_linear_scan` computes this model: a `LinearMemory`, plain GD (no momentum,
    no preconditioner) and the `l2` or `dot` objective."""
    return (
        isinstance(memory, LinearMemory)
        and not optimizer.uses_momentum
        and optimizer.precondition is iopt.no_precondition
        and (objective is l2 or objective is dot)
    )


def execution_block(chunk_size: int, block_size: int | None) -> int:
    """The block length actually run: `block_size` (default `DEFAULT_BLOCK_SIZE`) rounded up
    to a multiple of the model's `chunk_size`, so that model chunks never straddle blocks."""
    block = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    return -(-block // chunk_size) * chunk_size


class _BlockInputs(eqx.Module):
    """Everything of one block (stacked over blocks) that does not depend on the state."""

    rows: Float[Array, "*blocks n_rows d_in"]  # [Phi_E; diag(D[i + 1, 0]) Q]
    values: Float[Array, "*blocks n_e d_out"]  # V_E
    mixing: Float[Array, "*blocks n_rows n_mix"]  # [[-P Z, P Z_v], [-E Z, E Z_v]], or
    # [-P Z_v; -E Z_v] (n_e columns, for H - V_E) where Z = Z_v
    end_decay: Float[Array, "*blocks"]  # D[L, 0]


def _pair_selection(L: int, c: int, dtype) -> Array:
    """The 0/1 matrix $S$ `(L c, L + c - 1)` taking the block's extended tokens to its (step m,
    offset o) pairs: pair (m, o) reads the token o steps behind step m, extended token
    m + c - 1 - o. A constant, so the gathers below are matrix products (and so are their
    gradients)."""
    pair = np.arange(L * c)
    token = pair // c + c - 1 - pair % c
    return jnp.asarray(token[:, None] == np.arange(L + c - 1)[None, :], dtype)


@jax.custom_jvp
def unit_lower_inverse(strict_lower: Float[Array, "n n"]) -> Float[Array, "n n"]:
    r"""$(I + N)^{-1}$ for a strictly lower triangular $N$, by halving:
    $$\begin{pmatrix}A & 0\\ C & B\end{pmatrix}^{-1} = \begin{pmatrix}A^{-1} & 0\\
    -B^{-1}CA^{-1} & B^{-1}\end{pmatrix},$$
    so $\lceil\log_2 n\rceil$ levels of matrix products (block forward substitution, as stable
    as a triangular solve). Not `solve_triangular`: XLA:CPU hands a batched one to the thread
    pool it runs on, and two at once on a pool of two threads deadlocked (jaxlib 0.10.2).

    Its derivative is the inverse's, $\dot M = -M\,\mathrm{tril}_{-1}(\dot N)\,M$ with
    $M = (I + N)^{-1}$ (so the gradient is $-\mathrm{tril}_{-1}(M^\top\bar MM^\top)$): two matrix
    products instead of differentiating the recursion."""
    return _halving_inverse(strict_lower)


def _halving_inverse(strict_lower: Array) -> Array:
    n = strict_lower.shape[-1]
    if n == 1:
        return jnp.ones_like(strict_lower)
    h = n // 2
    upper_inverse = _halving_inverse(strict_lower[:h, :h])
    lower_inverse = _halving_inverse(strict_lower[h:, h:])
    corner = -lower_inverse @ strict_lower[h:, :h] @ upper_inverse
    top = jnp.concatenate([upper_inverse, jnp.zeros((h, n - h), strict_lower.dtype)], axis=1)
    return jnp.concatenate([top, jnp.concatenate([corner, lower_inverse], axis=1)], axis=0)


@unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
    (strict_lower,), (tangent,) = primals, tangents
    inverse = _halving_inverse(strict_lower)
    return inverse, -inverse @ jnp.tril(tangent, -1) @ inverse


def _block_inputs(
    features_e: Float[Array, "n_e d_in"],
    values_e: Float[Array, "n_e d_out"],
    step_gates: Float[Array, "L c"],
    queries: Float[Array, "L d_in"],
    lr: Float[Array, " L"],
    decay: Float[Array, " L"],
    *,
    chunk_size: int,
    decay_first: bool,
    affine_in_prediction: bool,
) -> _BlockInputs:
    L, c = step_gates.shape
    dtype = lr.dtype

    def per_pair(x):  # (L, ...) per step m -> (L c, ...) per pair (m, o)
        return jnp.broadcast_to(x[:, None], (L, c, *x.shape[1:])).reshape(L * c, *x.shape[1:])

    D = decay_matrix(jnp.concatenate([jnp.ones((1,), dtype), decay]))  # (L + 1, L + 1)
    step = jnp.arange(L)
    writes = (lr[:, None] * step_gates).reshape(-1)  # eta_m gamma_{m,o}

    read_weights = jnp.where(step[:, None] >= step[None, :], D[1:, 1:], 0.0)  # [i, m]
    S = _pair_selection(L, c, dtype)
    n_e = features_e.shape[0]
    anchor = (step // chunk_size) * chunk_size  # a(i), a position
    evaluated_at = step + 1 if decay_first else anchor  # e_i
    step_decay = D[evaluated_at, 0]  # D[e_m, 0]: the right-hand side's scale of step m's pairs
    gram_q = queries @ features_e.T  # q_i . phi_j

    if affine_in_prediction and chunk_size < L:
        writes = (lr[:, None] * step_gates).reshape(-1)  # eta_m gamma_{m,o}
        read_pairs = per_pair(read_weights.T).T * writes[None, :] * (gram_q @ S.T)  # P
        end_pairs = per_pair(D[L, 1:]) * writes  # c
        # X~ = Z Phi_E and U = Z_v V_E (X = S Phi_E, V_X = S V_E): sums over the tokens.
        right_hand_sides = jnp.concatenate([per_pair(step_decay)[:, None] * S, S], axis=1)
        earlier = step[None, :] + 1 <= anchor[:, None]  # [i, m]: m's write is in W_{a(i)}
        coupling = jnp.where(earlier, D[evaluated_at][:, 1:], 0.0)
        coupling = per_pair(per_pair(coupling.T).T) * writes[None, :]
        coupling = coupling * (S @ (features_e @ features_e.T) @ S.T)
        right_hand_sides = unit_lower_inverse(coupling) @ right_hand_sides
        read = read_pairs @ right_hand_sides  # [P Z | P Z_v]
        end = (S.T * end_pairs[None, :]) @ right_hand_sides  # S^T diag(c) [Z | Z_v]
    else:
        # One anchor for the whole block (T = 0): Z = diag(D[e, 0]) S and Z_v = S, so every
        # product with the pairs is a sum over tokens with the band of window gates
        # Gamma[m, j] (the gate of token j in step m's window).
        gates = jnp.einsum("mo,moj->mj", step_gates, S.reshape(L, c, n_e))
        step_reads = read_weights * lr[None, :]
        end_writes = D[L, 1:] * lr
        if affine_in_prediction and not decay_first:  # D[e, 0] = D[0, 0] = 1: Z = Z_v
            # the loop then multiplies by H - V_E (n_e columns, not 2 n_e)
            read_v, end_v = (step_reads @ gates) * gram_q, end_writes @ gates
            return _BlockInputs(
                rows=jnp.concatenate([features_e, D[1:, 0][:, None] * queries]),
                values=values_e,
                mixing=-jnp.concatenate([read_v, jnp.diag(end_v)]),
                end_decay=D[L, 0],
            )
        # dot: r = -v whatever the weights, so Z = 0
        token_decay = step_decay if affine_in_prediction else jnp.zeros_like(step_decay)
        read = jnp.concatenate(
            [
                ((step_reads * token_decay[None, :]) @ gates) * gram_q,
                (step_reads @ gates) * gram_q,
            ],
            axis=1,
        )
        end = jnp.concatenate(
            [jnp.diag((end_writes * token_decay) @ gates), jnp.diag(end_writes @ gates)], axis=1
        )

    signs = jnp.concatenate([-jnp.ones(n_e, dtype), jnp.ones(n_e, dtype)])
    return _BlockInputs(
        rows=jnp.concatenate([features_e, D[1:, 0][:, None] * queries]),
        values=values_e,
        mixing=jnp.concatenate([read, end]) * signs,
        end_decay=D[L, 0],
    )


def exact_block_inputs(state: OmegaState, inputs: ScanInputs, rule: ScanRule) -> _BlockInputs:
    """Everything of every execution block that does not depend on the state, stacked over
    blocks (the part the XLA loop and the Pallas kernel share). `inputs.momentum` is unused."""
    L = execution_block(rule.chunk_size, rule.block_size)
    blocks, _ = make_chunks(state, inputs, window=rule.window, chunk_size=L)
    return jax.vmap(
        lambda *arrays: _block_inputs(
            *arrays,
            chunk_size=rule.chunk_size,
            decay_first=rule.decay_first,
            affine_in_prediction=rule.objective is l2,
        )
    )(
        blocks.features_e,
        blocks.values_e,
        blocks.step_gates,
        blocks.features_q,
        blocks.lr,
        blocks.decay,
    )


def exact_linear_scan(
    state: OmegaState, inputs: ScanInputs, rule: ScanRule, *, remat: bool = True
) -> tuple[Float[Array, "T d_out"], OmegaState]:
    """`sequential_scan` for a linear memory under GD with `l2` or `dot` (same results), in
    execution blocks of `execution_block(chunk_size, block_size)` steps (module docstring).

    Arguments are validated by `omega_scan`; this is the unchecked implementation.
    """
    T, d_out = inputs.v.shape
    memory = state.memory
    assert isinstance(memory, LinearMemory)
    blocks = exact_block_inputs(state, inputs, rule)

    n_e = blocks.values.shape[1]

    def body(W, k):
        block = jax.tree.map(lambda x: x[k], blocks)
        projected = block.rows @ W.T  # [H; D Q W_0^T]
        H, y = projected[:n_e], projected[n_e:]
        if block.mixing.shape[-1] == n_e:
            mixed = block.mixing @ (H - block.values)
        else:
            mixed = block.mixing @ jnp.concatenate([H, block.values])
        y = y + mixed[: y.shape[0]]
        W = block.end_decay * W + mixed[y.shape[0] :].T @ block.rows[:n_e]
        return W, y

    W, y = _scan_chunk_indices(body, memory.weight, blocks.end_decay.shape[0], remat)
    y = y.reshape(-1, d_out)[:T]
    new_memory = eqx.tree_at(lambda m: m.weight, memory, W)
    new_state = carry_window(
        state,
        inputs,
        window=rule.window,
        memory=new_memory,
        optimizer_state=state.optimizer_state,
    )
    return y, new_state
