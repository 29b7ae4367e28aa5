r"""The chunk-parallel scan (digest 6.2-6.4): frozen gradient anchors, C-matrix coefficients.

Within a chunk of `b` tokens every gradient is taken at the chunk-start weights $W_s$, so

$$S_t = B_tS_s + \sum_{n\le t}L_\theta[t,n]\,g_n,\qquad
W_t = A_tW_s - \sum_{m\le t}L_\alpha[t,m]\,\eta_m P(S_m),\qquad
g_n = \sum_{i\in E}\Gamma[n,i]\,\nabla\ell_i(W_s),$$

with $L_\alpha[t,m] = \prod_{j=m+1}^{t}\alpha_j$, $A_t = \prod_{j\le t}\alpha_j$ (chunk-local), and
$\Gamma$ the banded window-gate matrix over the extended token set $E$ (the chunk plus the $c-1$
tokens before it). The state-independent coefficients are batched over all chunks before the
loop (one recurrence over the b steps, `_row_recurrences`); the loop over chunks carries the
anchor, slices each chunk's window from the flat token sequence, and reads the chunk while
its anchor is at hand (stacking all anchors for a batched read afterwards was slower on CPU,
3x at T = 8192 for the MLP). Three forms compute this, each tested against `sequential_scan`:

- `_linear_dual_scan`: linear memory, GD or momentum. Never forms per-position weights:
  $Y = A\odot(QW_s^\top) - c_S\odot(QS_s^\top) - (C\odot Q\Phi_E^\top)R$ with $C = L_\alpha
  \mathrm{diag}(\eta)L_\theta\Gamma$.
- `_linear_dual_decay_first_scan`: the same with `decay_first=True` (Gated DeltaNet's order):
  each step's residuals are taken at the decayed anchor $A_mW_s$, so the dual form runs over
  the $cb$ (step, window offset) pairs.
- `_mlp_dual_scan`: `MLPMemory`, GD or momentum. Every per-token gradient of every layer is a
  rank-1 outer product $\delta_i h_i^\top$, so each layer's read is the same dual form.
- `_materialised_chunk`: anything else (Muon, gated MLP, `decay_first` on an MLP): per-position
  momentum and weights, batched preconditioning (Newton-Schulz over positions), per-position
  reads.
"""

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree, Scalar

import optimizers as iopt

from ._memory import layer_norm, LinearMemory, MLPMemory
from ._scan_inputs import ScanInputs, ScanRule
from ._state import OmegaState


def decay_matrix(alpha: Float[Array, " b"]) -> Float[Array, "b b"]:
    r"""$L[t, m] = \prod_{j=m+1}^{t}\alpha_j$ for $m \le t$, else 0.

    Built row by row, $L[t] = \alpha_t L[t-1] + e_t$ (a `lax.scan` of b steps, O(b^2) work),
    rather than from differences of cumulative log sums, so it is exact (no
    $-\infty + \infty$) when some $\alpha_j = 0$, and so are its gradients. (An associative
    scan over the b x b matrix computes the same products but its backward pass was about 3x
    slower on CPU.)
    """
    b = alpha.shape[0]

    def next_row(row, inputs):
        alpha_t, unit_t = inputs
        row = alpha_t * row + unit_t
        return row, row

    unit_rows = jnp.eye(b, dtype=alpha.dtype)
    _, rows = jax.lax.scan(next_row, jnp.zeros((b,), alpha.dtype), (alpha, unit_rows))
    return rows


def _scale_rows(w: Float[Array, " b"], tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: w.reshape((-1,) + (1,) * (x.ndim - 1)) * x, tree)


class _Chunk(eqx.Module):
    features_e: Float[Array, "*chunks n_e d_in"]
    values_e: Float[Array, "*chunks n_e d_out"]
    gates: Float[Array, "*chunks b n_e"]
    step_gates: Float[Array, "*chunks b c"]  # [m, o]: the gate of the token o steps behind step m
    features_q: Float[Array, "*chunks b d_in"]
    lr: Float[Array, "*chunks b"]
    decay: Float[Array, "*chunks b"]
    momentum: Float[Array, "*chunks b"]
    valid: Float[Array, "*chunks b"]


class _Tokens(eqx.Module):
    """The extended token sequence, not stacked per chunk: chunk k's extended set is rows
    `k b` to `k b + n_e` (the `c - 1` tokens before the chunk, then the chunk).

    The dual forms slice each chunk's window out of it inside the loop (a copy their matmuls
    make anyway) instead of gathering the overlapping windows into a stacked array first.
    """

    features: Float[Array, "n_tokens d_in"]
    values: Float[Array, "n_tokens d_out"]
    chunk_size: int = eqx.field(static=True)
    window: int = eqx.field(static=True)

    def chunk_window(self, k: Array) -> tuple[Array, Array]:
        """Features and values of chunk k's extended set, `(b + c - 1, ...)`."""
        start = k * self.chunk_size
        n_e = self.chunk_size + self.window - 1
        return (
            jax.lax.dynamic_slice_in_dim(self.features, start, n_e),
            jax.lax.dynamic_slice_in_dim(self.values, start, n_e),
        )


def _output_grad(objective, prediction, target):
    return jax.grad(objective)(prediction, target)


class _Coefficients(eqx.Module):
    """Step-major as built, `(b, n_chunks, ...)`; `chunk(k)` is one chunk's `(b, ...)`;
    `chunk_major()` is `(n_chunks, b, ...)` for the Pallas kernels."""

    A: Float[Array, "b ..."]  # prod_{j<=t} alpha_j
    B: Float[Array, "b ..."]  # prod_{j<=t} theta_j
    C: Float[Array, "b ... n"]  # per-token (or per-step) gradient -> W_t
    c_S: Float[Array, "b ..."]  # S_s -> W_t
    C_S: Float[Array, "... n"]  # per-token (or per-step) gradient -> S at the chunk end

    def chunk(self, k: Array) -> "_Coefficients":
        """Chunk k's coefficients, `(b, ...)` (a slice the loop body's fusions absorb)."""
        return _Coefficients(
            A=self.A[:, k], B=self.B[:, k], C=self.C[:, k], c_S=self.c_S[:, k], C_S=self.C_S[k]
        )

    def chunk_major(self) -> "_Coefficients":
        return _Coefficients(
            A=self.A.T,
            B=self.B.T,
            C=jnp.swapaxes(self.C, 0, 1),
            c_S=self.c_S.T,
            C_S=self.C_S,
        )


def _row_recurrences(
    chunks: _Chunk,
    row_at: Callable[[Array, Array], Array],
    uses_momentum: bool,
    nesterov: bool = False,
) -> _Coefficients:
    r"""$X = L_\alpha\mathrm{diag}(\eta)L_\theta R$ ($L_\alpha\mathrm{diag}(\eta)R$ without
    momentum) for every chunk, built row by row and never as a product with $L_\alpha$:

    $$D_t = \theta_tD_{t-1} + R_t,\quad X_t = \alpha_tX_{t-1} + \eta_tD_t,\quad
    A_t = \alpha_tA_{t-1},\quad B_t = \theta_tB_{t-1},\quad c_{S,t} = \alpha_tc_{S,t-1} + \eta_tB_t.$$

    With Nesterov's step $\theta_tS_t + g_t$ (`momentum(nesterov=True)`) the step's row is
    $\theta_tD_t + R_t$ and $c_{S,t} = \alpha_tc_{S,t-1} + \eta_t\theta_tB_t$.

    One `lax.scan` over the b steps, batched over chunks: exact when some $\alpha_j = 0$ (no
    division), and half the time of forming $L_\alpha$ and multiplying by it.
    `row_at(t, step_gates_t)` gives row $R_t$ of every chunk, `(n_chunks, n)`. Returns
    $X$ as `C` and the last $D$ (each input row's contribution to $S$ at the chunk end) as
    `C_S`, step-major.
    """
    n_chunks = chunks.lr.shape[0]
    dtype = chunks.lr.dtype
    row_shape = jax.eval_shape(row_at, jnp.zeros((), int), chunks.step_gates[:, 0]).shape

    def step(carry, inputs):
        A, B, X, D, c_S = carry
        t, alpha, theta, eta, gates = inputs
        row = row_at(t, gates)
        A = alpha * A
        if uses_momentum:
            B = theta * B
            D = theta[:, None] * D + row
            if nesterov:
                c_S = alpha * c_S + eta * theta * B
                step_row = theta[:, None] * D + row
            else:
                c_S = alpha * c_S + eta * B
                step_row = D
        else:
            D = step_row = row
        X = alpha[:, None] * X + eta[:, None] * step_row
        return (A, B, X, D, c_S), (A, B, X, c_S)

    vector = jnp.ones((n_chunks,), dtype)
    matrix = jnp.zeros(row_shape, dtype)
    init = (vector, vector, matrix, matrix, jnp.zeros_like(vector))
    b = chunks.lr.shape[1]
    steps = (
        jnp.arange(b),
        chunks.decay.T,
        chunks.momentum.T,
        chunks.lr.T,
        jnp.swapaxes(chunks.step_gates, 0, 1),
    )
    (_, _, _, D_end, _), (A, B, X, c_S) = jax.lax.scan(step, init, steps)
    if not uses_momentum:
        B, c_S, D_end = jnp.zeros_like(B), jnp.zeros_like(c_S), jnp.zeros_like(D_end)
    return _Coefficients(A=A, B=B, C=X, c_S=c_S, C_S=D_end)


def _coefficients(chunks: _Chunk, uses_momentum: bool, nesterov: bool = False) -> _Coefficients:
    r"""Per extended token: $C = L_\alpha\mathrm{diag}(\eta)L_\theta\Gamma$ and
    $C_S = L_\theta[b]\Gamma$, from the row recurrences with the band's rows $\Gamma_t$ as inputs
    (row $t$ holds step $t$'s c window gates at columns $t, \dots, t + c - 1$)."""
    n_chunks, n_e = chunks.gates.shape[0], chunks.gates.shape[-1]
    zeros = jnp.zeros((n_chunks, n_e), chunks.gates.dtype)

    def band_row(t, gates):  # gates[:, o] sits at column t + c - 1 - o
        return jax.lax.dynamic_update_slice(zeros, gates[:, ::-1], (0, t))

    return _row_recurrences(chunks, band_row, uses_momentum, nesterov)


def _step_coefficients(
    chunks: _Chunk, uses_momentum: bool, nesterov: bool = False
) -> _Coefficients:
    r"""Per step: `C` is $M = L_\alpha\mathrm{diag}(\eta)L_\theta$ ($L_\alpha\mathrm{diag}(\eta)$
    without momentum) and `C_S` is $L_\theta[b]$ (the row recurrences with unit rows)."""
    n_chunks, b = chunks.lr.shape

    def unit_row(t, gates):
        del gates
        return jnp.broadcast_to(jax.nn.one_hot(t, b, dtype=chunks.lr.dtype), (n_chunks, b))

    return _row_recurrences(chunks, unit_row, uses_momentum, nesterov)


def _linear_dual_scan(
    W, S, chunks: _Chunk, tokens: _Tokens, objective, remat: bool, nesterov: bool = False
):
    r"""Linear memory, GD or momentum: the chunk loop carries $(W_s, S_s)$ and reads each chunk
    at its anchor, $Y = A\odot(QW_s^\top) - c_S\odot(QS_s^\top) - (C\odot Q\Phi_E^\top)R$ with
    $R = \nabla\mathrm{obj}(\Phi_EW_s^\top, V_E)$.

    Reading inside the loop, while $W_s$ is at hand, measured faster on CPU than stacking
    every anchor for one batched read afterwards (as for the MLP form).
    """
    coeffs = _coefficients(chunks, S is not None, nesterov)
    residual_of = jax.vmap(_output_grad, in_axes=(None, 0, 0))

    def body(carry, k):
        W, S = carry
        Phi, V = tokens.chunk_window(k)
        Q = chunks.features_q[k]
        c = coeffs.chunk(k)
        residual = residual_of(objective, Phi @ W.T, V)
        y = c.A[:, None] * (Q @ W.T) - (c.C * (Q @ Phi.T)) @ residual
        W_end = c.A[-1] * W - (c.C[-1][:, None] * residual).T @ Phi
        if S is None:
            return (W_end, None), y
        y = y - c.c_S[:, None] * (Q @ S.T)
        W_end = W_end - c.c_S[-1] * S
        S_end = c.B[-1] * S + (c.C_S[:, None] * residual).T @ Phi
        return (W_end, S_end), y

    (W, S), y = _scan_chunk_indices(body, (W, S), chunks.lr.shape[0], remat)
    return y, W, S


def _linear_dual_decay_first_scan(
    W, S, chunks: _Chunk, tokens: _Tokens, objective, remat: bool, nesterov: bool = False
):
    r"""Linear memory, GD or momentum, `decay_first=True`: step $m$'s gradients are taken at
    $A_mW_s$, so token $i$'s residual differs per step. Each (step $m$, offset $o$) pair is a
    virtual token with feature $\phi_{m-o}$ and residual
    $r_{m,o} = \nabla\mathrm{obj}(A_m W_s\phi_{m-o}, v_{m-o})$, and the read is the same dual form
    over the $cb$ virtual tokens: $Y = A\odot(QW_s^\top) - c_S\odot(QS_s^\top)
    - [M\odot G_o^\top\odot(Q\Phi_o^\top)]_o\,[r_{\cdot,o}]_o$ with $M = L_\alpha\mathrm{diag}(\eta)
    L_\theta$ and $G_o[m]$ the gate of token $m-o$ in step $m$'s window. Exact for any objective;
    no per-position weights.
    """
    b, window = tokens.chunk_size, tokens.window
    coeffs = _step_coefficients(chunks, S is not None, nesterov)
    token_rows = [slice(window - 1 - o, window - 1 - o + b) for o in range(window)]
    residual_of = jax.vmap(_output_grad, in_axes=(None, 0, 0))

    def body(carry, k):
        W, S = carry
        Phi, V = tokens.chunk_window(k)
        Q = chunks.features_q[k]
        gates = chunks.step_gates[k]
        c = coeffs.chunk(k)
        prediction = Phi @ W.T
        QPhi = Q @ Phi.T
        residuals = jnp.concatenate(
            [residual_of(objective, c.A[:, None] * prediction[r], V[r]) for r in token_rows]
        )
        features = jnp.concatenate([Phi[r] for r in token_rows])
        read_coeffs = jnp.concatenate(
            [c.C * gates[:, o][None, :] * QPhi[:, r] for o, r in enumerate(token_rows)],
            axis=1,
        )
        y = c.A[:, None] * (Q @ W.T) - read_coeffs @ residuals
        end_coeffs = (c.C[-1][:, None] * gates).T.reshape(-1)
        W_end = c.A[-1] * W - (end_coeffs[:, None] * residuals).T @ features
        if S is None:
            return (W_end, None), y
        y = y - c.c_S[:, None] * (Q @ S.T)
        W_end = W_end - c.c_S[-1] * S
        momentum_coeffs = (c.C_S[:, None] * gates).T.reshape(-1)
        S_end = c.B[-1] * S + (momentum_coeffs[:, None] * residuals).T @ features
        return (W_end, S_end), y

    (W, S), y = _scan_chunk_indices(body, (W, S), chunks.lr.shape[0], remat)
    return y, W, S


def _mlp_gradient_factors(memory: MLPMemory, X, V, objective):
    r"""Per-token inputs $h^{l-1}_i$ and output cotangents $\delta^l_i$ of every layer at $W_s$."""
    inputs, pre_activations = [X], []
    h = X
    for weight in memory.weights[:-1]:
        z = h @ weight.T
        pre_activations.append(z)
        h = memory.activation(z)
        inputs.append(h)
    out = h @ memory.weights[-1].T
    if memory.layer_norm:
        out, norm_vjp = jax.vjp(layer_norm, out)
    if memory.residual:
        out = out + X
    delta = jax.vmap(_output_grad, in_axes=(None, 0, 0))(objective, out, V)
    if memory.layer_norm:
        (delta,) = norm_vjp(delta)  # pyright: ignore[reportPossiblyUnboundVariable]
    deltas = [delta]
    for weight, z in zip(memory.weights[:0:-1], pre_activations[::-1], strict=True):
        _, activation_vjp = jax.vjp(memory.activation, z)
        (delta,) = activation_vjp(delta @ weight)
        deltas.append(delta)
    return tuple(inputs), tuple(deltas[::-1])


def _mlp_dual_read(memory: MLPMemory, S, inputs, deltas, Q, c: _Coefficients):
    r"""Exact per-position reads $\mathcal M(q_t; W_t)$ without forming any $W_t$."""
    g = Q
    n_layers = len(memory.weights)
    for layer, (weight, h_in, delta) in enumerate(zip(memory.weights, inputs, deltas, strict=True)):
        pre = c.A[:, None] * (g @ weight.T) - (c.C * (g @ h_in.T)) @ delta
        if S is not None:
            pre = pre - c.c_S[:, None] * (g @ S[layer].T)
        g = memory.activation(pre) if layer < n_layers - 1 else pre
    if memory.layer_norm:
        g = layer_norm(g)
    return g + Q if memory.residual else g


def _mlp_dual_scan(
    memory: MLPMemory,
    S,
    chunks: _Chunk,
    tokens: _Tokens,
    objective,
    remat: bool,
    nesterov: bool = False,
):
    r"""`MLPMemory`: each layer's per-token gradients are rank-1, $\delta_i h_i^\top$.

    The reads happen inside the chunk loop, while the chunk's anchor is at hand: stacking every
    chunk's anchor weights and gradient factors for a batched read afterwards moves
    O(T / b * |W|) bytes through memory, which made long sequences 3x slower per token.
    """
    coeffs = _coefficients(chunks, S is not None, nesterov)
    params, static = eqx.partition(memory, eqx.is_inexact_array)

    def body(carry, k):
        params, S = carry
        X, V = tokens.chunk_window(k)
        Q = chunks.features_q[k]
        c = coeffs.chunk(k)
        memory = eqx.combine(params, static)
        inputs, deltas = _mlp_gradient_factors(memory, X, V, objective)
        y = _mlp_dual_read(memory, S, inputs, deltas, Q, c)
        weights = []
        momenta = []
        for layer, (weight, h_in, delta) in enumerate(
            zip(memory.weights, inputs, deltas, strict=True)
        ):
            W_end = c.A[-1] * weight - (c.C[-1][:, None] * delta).T @ h_in
            if S is not None:
                W_end = W_end - c.c_S[-1] * S[layer]
                momenta.append(c.B[-1] * S[layer] + (c.C_S[:, None] * delta).T @ h_in)
            weights.append(W_end)
        new_memory = eqx.tree_at(lambda m: m.weights, memory, tuple(weights))
        new_S = tuple(momenta) if S is not None else None
        return (eqx.filter(new_memory, eqx.is_inexact_array), new_S), y

    (params, S), y = _scan_chunk_indices(body, (params, S), chunks.lr.shape[0], remat)
    return y, eqx.combine(params, static), S


def _token_losses(static, objective, features, values, params) -> Float[Array, " n_e"]:
    memory = eqx.combine(params, static)
    return jax.vmap(lambda x, v: objective(memory(x), v))(features, values)


def _materialised_chunk(
    params: PyTree,
    static: PyTree,
    opt_state: PyTree,
    chunk: _Chunk,
    *,
    objective: Callable[..., Scalar],
    optimizer: iopt.InnerOptimizer,
    decay_first: bool,
):
    assert optimizer.precondition is not None
    A = jnp.cumprod(chunk.decay)
    L_alpha = decay_matrix(chunk.decay)

    token_losses = functools.partial(
        _token_losses, static, objective, chunk.features_e, chunk.values_e
    )

    if decay_first:

        def gradient_at(scale, gates):
            base = jax.tree.map(lambda w: scale * w, params)
            _, vjp = jax.vjp(token_losses, base)
            return vjp(gates)[0]

        grads = jax.vmap(gradient_at)(A, chunk.gates)
    else:
        _, vjp = jax.vjp(token_losses, params)
        grads = jax.vmap(vjp)(chunk.gates)[0]

    if optimizer.eta_inside_precondition:
        grads = _scale_rows(chunk.lr, grads)
    if optimizer.uses_momentum:
        L_theta = decay_matrix(chunk.momentum)
        B = jnp.cumprod(chunk.momentum)
        momenta = jax.tree.map(
            lambda g, s: jnp.tensordot(L_theta, g, axes=1) + B.reshape((-1,) + (1,) * s.ndim) * s,
            grads,
            opt_state.momentum,
        )
        new_state = iopt.MomentumState(jax.tree.map(lambda s: s[-1], momenta))
    else:
        momenta = grads
        new_state = opt_state
    directions = jax.vmap(optimizer.precondition)(momenta)
    if optimizer.nesterov:
        directions = jax.tree.map(
            lambda d, g: chunk.momentum.reshape((-1,) + (1,) * (d.ndim - 1)) * d + g,
            directions,
            grads,
        )
    # With eta inside P the step has no eta to zero it, so padding steps are masked explicitly.
    step_scale = chunk.valid if optimizer.eta_inside_precondition else chunk.lr
    steps = _scale_rows(step_scale, directions)
    weights = jax.tree.map(
        lambda w, s: A.reshape((-1,) + (1,) * w.ndim) * w[None] - jnp.tensordot(L_alpha, s, axes=1),
        params,
        steps,
    )
    y = jax.vmap(lambda p, x: eqx.combine(p, static)(x))(weights, chunk.features_q)
    return y, jax.tree.map(lambda w: w[-1], weights), new_state


def _per_chunk_muon_chunk(
    params: PyTree,
    static: PyTree,
    opt_state: PyTree,
    chunk: _Chunk,
    *,
    objective: Callable[..., Scalar],
    optimizer: iopt.InnerOptimizer,
):
    r"""`muon_per_chunk=True`: one Newton-Schulz per chunk (digest A-13 (i)).

    The momentum is exact per token, but the chunk's weight change uses a single direction
    $O = \mathrm{NS}(S_{s+b})$ of the chunk-end momentum:
    $W_{s+b} = A_bW_s - (\sum_m L_\alpha[b,m]\eta_m)\,O$. Reads inside the chunk see the decayed
    chunk-start weights $A_tW_s$ (they cannot see $O$, which depends on the whole chunk).
    """
    assert optimizer.precondition is not None
    A = jnp.cumprod(chunk.decay)
    L_alpha = decay_matrix(chunk.decay)

    token_losses = functools.partial(
        _token_losses, static, objective, chunk.features_e, chunk.values_e
    )

    _, vjp = jax.vjp(token_losses, params)
    weighted_gates = chunk.gates
    if optimizer.eta_inside_precondition:
        weighted_gates = chunk.lr[:, None] * weighted_gates
    L_theta = decay_matrix(chunk.momentum)
    B = jnp.cumprod(chunk.momentum)
    (chunk_gradient,) = vjp(L_theta[-1] @ weighted_gates)
    momentum_end = jax.tree.map(lambda s, g: B[-1] * s + g, opt_state.momentum, chunk_gradient)
    direction = optimizer.precondition(momentum_end)
    step_scale = chunk.valid if optimizer.eta_inside_precondition else chunk.lr
    scale = L_alpha[-1] @ step_scale
    new_params = jax.tree.map(lambda w, o: A[-1] * w - scale * o, params, direction)
    y = _decayed_reads(eqx.combine(params, static), A, chunk.features_q)
    return y, new_params, iopt.MomentumState(momentum_end)


def _decayed_reads(memory, A: Float[Array, " b"], X: Float[Array, "b d_in"]) -> Array:
    r"""$y_t = \mathcal M(x_t; A_tW)$ for every row: the scalar $A_t$ is moved through each matmul
    ($(A_tW)h = A_t(Wh)$), so no per-position weights are formed."""
    if isinstance(memory, LinearMemory):
        return A[:, None] * (X @ memory.weight.T)
    if isinstance(memory, MLPMemory):
        h = X
        for weight in memory.weights[:-1]:
            h = jax.vmap(memory.activation)(A[:, None] * (h @ weight.T))
        out = A[:, None] * (h @ memory.weights[-1].T)
        if memory.layer_norm:
            out = layer_norm(out)
        return X + out if memory.residual else out
    params, static = eqx.partition(memory, eqx.is_inexact_array)
    return jax.vmap(lambda a, x: eqx.combine(jax.tree.map(lambda w: a * w, params), static)(x))(
        A, X
    )


def _band(step_gates: Float[Array, "n_chunks b c"]) -> Float[Array, "n_chunks b n_e"]:
    """Gamma[chunk, t, i]: the gate of extended token i in the window of chunk step t."""
    n_chunks, b, window = step_gates.shape
    t = jnp.arange(b)[:, None]
    i = jnp.arange(b + window - 1)[None, :]
    offset = t + window - 1 - i  # how many steps token i lies behind step t
    in_window = (offset >= 0) & (offset < window)
    index = jnp.broadcast_to(jnp.clip(offset, 0, window - 1), (n_chunks, *offset.shape))
    return jnp.where(in_window, jnp.take_along_axis(step_gates, index, axis=2), 0.0)


def _extended_tokens(state: OmegaState, features_k, v, chunk_size: int) -> _Tokens:
    """The `window - 1` carried tokens, then the sequence padded with zeros to a multiple of
    `chunk_size`."""
    T = v.shape[0]
    pad = [(0, -(-T // chunk_size) * chunk_size - T), (0, 0)]
    return _Tokens(
        features=jnp.concatenate([state.window_features, jnp.pad(features_k, pad)]),
        values=jnp.concatenate([state.window_values, jnp.pad(v, pad)]),
        chunk_size=chunk_size,
        window=state.window_features.shape[0] + 1,
    )


def make_chunks(
    state: OmegaState, inputs: ScanInputs, *, window: int, chunk_size: int
) -> tuple[_Chunk, _Tokens]:
    """The chunk layout every chunk-parallel form reads (the XLA forms here, the Pallas
    kernels), and the flat extended token sequence the chunks are cut from.

    T is padded to a multiple of `chunk_size` with steps that cannot write (eta = 0, gates 0,
    alpha = theta = 1, `valid` = 0); each chunk carries its extended token set (the chunk plus
    the `window - 1` tokens before it, taken from `state` for the first chunk), the gates of
    each step's window, and the banded gate matrix Gamma over the extended set.
    """
    features_q, features_k, v = inputs.features_q, inputs.features_k, inputs.v
    lr, decay, momentum, gamma = inputs.lr, inputs.decay, inputs.momentum, inputs.gamma
    T = v.shape[0]
    b, c = chunk_size, window
    n_chunks = -(-T // b)
    n_steps = n_chunks * b
    dtype = v.dtype

    def pad_steps(x, value):
        widths = [(0, n_steps - T)] + [(0, 0)] * (x.ndim - 1)
        return jnp.pad(x, widths, constant_values=value)

    step_valid = pad_steps(jnp.ones((T,), dtype), 0.0)
    tokens = _extended_tokens(state, features_k, v, b)
    ext_mask = jnp.concatenate([state.window_mask.astype(dtype), step_valid])
    if gamma.ndim == 1:
        ext_gates = jnp.concatenate([state.window_gates, pad_steps(gamma, 0.0)]) * ext_mask
        behind = [ext_gates[c - 1 - o : c - 1 - o + n_steps] for o in range(c)]
    else:
        gamma_p = pad_steps(gamma, 0.0)
        behind = [gamma_p[:, o] * ext_mask[c - 1 - o : c - 1 - o + n_steps] for o in range(c)]
    step_gates = (jnp.stack(behind, -1) * step_valid[:, None]).reshape(n_chunks, b, c)

    n_e = b + c - 1
    token_index = (jnp.arange(n_chunks) * b)[:, None] + jnp.arange(n_e)[None, :]
    chunks = _Chunk(
        features_e=tokens.features[token_index],
        values_e=tokens.values[token_index],
        gates=_band(step_gates),
        step_gates=step_gates,
        features_q=pad_steps(features_q, 0.0).reshape(n_chunks, b, -1),
        lr=pad_steps(lr, 0.0).reshape(n_chunks, b),
        decay=pad_steps(decay, 1.0).reshape(n_chunks, b),
        momentum=pad_steps(momentum, 1.0).reshape(n_chunks, b),
        valid=step_valid.reshape(n_chunks, b),
    )
    return chunks, tokens


def chunked_scan(
    state: OmegaState,
    inputs: ScanInputs,
    rule: ScanRule,
    *,
    remat: bool = True,
    force_materialised: bool = False,
) -> tuple[Float[Array, "T d_out"], OmegaState]:
    """The chunk-parallel form of `sequential_scan` (same arguments, same results).

    Arguments are validated by `omega_scan`; this is the unchecked implementation.
    """
    objective, optimizer, window = rule.objective, rule.optimizer, rule.window
    decay_first, muon_per_chunk = rule.decay_first, rule.muon_per_chunk
    T = inputs.v.shape[0]
    chunks, tokens = make_chunks(state, inputs, window=window, chunk_size=rule.chunk_size)
    n_chunks, b = chunks.lr.shape
    memory = state.memory
    params, static = eqx.partition(memory, eqx.is_inexact_array)
    identity_precondition = optimizer.precondition is iopt.no_precondition
    dual = identity_precondition and not force_materialised
    uses_momentum = optimizer.uses_momentum

    if dual and isinstance(memory, LinearMemory):
        S0 = state.optimizer_state.momentum.weight if uses_momentum else None
        linear_scan = _linear_dual_decay_first_scan if decay_first else _linear_dual_scan
        y, W, S = linear_scan(
            memory.weight, S0, chunks, tokens, objective, remat, optimizer.nesterov
        )
        new_memory = eqx.tree_at(lambda m: m.weight, memory, W)
        new_opt = (
            iopt.MomentumState(eqx.tree_at(lambda m: m.weight, state.optimizer_state.momentum, S))
            if uses_momentum
            else state.optimizer_state
        )
    elif dual and not decay_first and isinstance(memory, MLPMemory):
        S0 = state.optimizer_state.momentum.weights if uses_momentum else None
        y, new_memory, S = _mlp_dual_scan(
            memory, S0, chunks, tokens, objective, remat, optimizer.nesterov
        )
        new_opt = (
            iopt.MomentumState(eqx.tree_at(lambda m: m.weights, state.optimizer_state.momentum, S))
            if uses_momentum
            else state.optimizer_state
        )
    else:
        if muon_per_chunk:
            chunk_step = functools.partial(
                _per_chunk_muon_chunk, objective=objective, optimizer=optimizer
            )
        else:
            chunk_step = functools.partial(
                _materialised_chunk,
                objective=objective,
                optimizer=optimizer,
                decay_first=decay_first,
            )

        def body(carry, chunk):
            p, opt_state = carry
            y, p, opt_state = chunk_step(p, static, opt_state, chunk)
            return (p, opt_state), y

        (params, new_opt), y = _scan_chunks(body, (params, state.optimizer_state), chunks, remat)
        new_memory = eqx.combine(params, static)

    y = y.reshape(n_chunks * b, -1)[:T]
    new_state = carry_window(
        state, inputs, window=window, memory=new_memory, optimizer_state=new_opt
    )
    return y, new_state


def carry_window(
    state: OmegaState,
    inputs: ScanInputs,
    *,
    window: int,
    memory: PyTree,
    optimizer_state: PyTree,
) -> OmegaState:
    """The state after a call: the new weights and momentum, and the last `window - 1` tokens."""
    features_k, v, gamma = inputs.features_k, inputs.v, inputs.gamma
    T = v.shape[0]
    dtype = v.dtype
    keep = window - 1
    all_features = jnp.concatenate([state.window_features, features_k])
    all_values = jnp.concatenate([state.window_values, v])
    all_gates = jnp.concatenate(
        [state.window_gates, gamma if gamma.ndim == 1 else jnp.ones((T,), dtype)]
    )
    all_mask = jnp.concatenate([state.window_mask, jnp.ones((T,), bool)])
    return OmegaState(
        memory=memory,
        optimizer_state=optimizer_state,
        window_features=all_features[all_features.shape[0] - keep :],
        window_values=all_values[all_values.shape[0] - keep :],
        window_gates=(
            all_gates[all_gates.shape[0] - keep :] if gamma.ndim == 1 else jnp.ones((keep,), dtype)
        ),
        window_mask=all_mask[all_mask.shape[0] - keep :],
    )


def _scan_chunks(body, carry, chunks: PyTree, remat: bool) -> tuple[Any, Any]:
    if remat:
        body = jax.checkpoint(body)
    return jax.lax.scan(body, carry, chunks)


def _scan_chunk_indices(body, carry, n_chunks: int, remat: bool) -> tuple[Any, Any]:
    """The chunk loop of the dual forms: `body(carry, k)` slices chunk k's inputs itself."""
    return _scan_chunks(body, carry, jnp.arange(n_chunks), remat)
