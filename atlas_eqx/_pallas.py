r"""The chunk loop of the chunk-parallel scan as Pallas kernels (digest 6.2-6.4; issue 6).

`pallas_scan` computes exactly what `chunked_scan` computes (same arguments, same results):

$$S_t = B_tS_s + \sum_{n\le t}L_\theta[t,n]\,g_n,\qquad
W_t = A_tW_s - \sum_{m\le t}L_\alpha[t,m]\,\eta_m P(S_m),\qquad
g_n = \sum_{i\in E}\Gamma[n,i]\,\nabla\ell_i(W_s).$$

**What runs where.** Everything that does not depend on the memory state is computed in XLA
before the kernel: the padded chunk layout (`make_chunks`: the extended token set $E$ of each
chunk, the banded gate matrix $\Gamma$) and the per-chunk coefficients (`_coefficients`:
$A$, $C = L_\alpha\mathrm{diag}(\eta)L_\theta\Gamma$, $c_S$, $B$, $C_S$). One kernel program
per sequence (`jax.vmap` over heads and batch adds grid axes) then runs the sequential loop
over chunks, a `fori_loop` carrying $W$ (and $S$), and computes per chunk:

- `_dual_kernel` (GD or momentum; `LinearMemory` is the one-layer case of `MLPMemory` of any
  depth; the dual form of digest 6.2): the per-token gradient factors at the anchor (layer
  inputs $h^{l-1}_i$ and output cotangents $\delta^l_i$; for a linear memory the residuals
  $R = \partial_p\ell(\Phi_EW_s^\top, V_E)$), the exact reads without per-position weights,
  layer by layer (linear: $Y = A\odot(QW_s^\top) - c_S\odot(QS_s^\top) -
  (C\odot Q\Phi_E^\top)R$), and the anchor update per layer
  $W \leftarrow A_bW_s - c_{S,b}S_s - \delta^\top\mathrm{diag}(C_b)h$,
  $S \leftarrow B_bS_s + \delta^\top\mathrm{diag}(C_S)h$.
- `_muon_kernel` (Muon, linear or MLP memory): per position $n$ of the chunk (an inner
  `fori_loop`), $g_n = \sum_i\Gamma[n,i]\,\delta_ih_i^\top$ as one matmul, $S_n = \theta_nS_{n-1} +
  g_n$, Newton-Schulz of $S_n$ inside the kernel, $W_n = \alpha_nW_{n-1} - \eta_n\mathrm{NS}(S_n)$
  and the read $\mathcal M(\phi(q_n); W_n)$ (digest 6.4: Muon needs per-position weights). Row
  $n$ of $\Gamma$, $\theta$, $\alpha$, $\eta$ is picked by a masked sum and the read is that of
  all $b$ queries with $W_n$, keeping row $n$: 2-D matmuls only, no dynamic slicing of values
  (which Triton cannot lower), at $b$ reads per position, small next to Newton-Schulz.

- `_exact_kernel` (linear memory, plain GD, `l2` or `dot`, any window, gates, `decay_first`
  and `chunk_size`: `exact_pallas_scan`, which `omega_scan(method="pallas")` runs for these
  models): the block loop of the exact chunk-parallel form (`atlas_eqx._exact_chunked`), with
  its state-independent block inputs, the triangular solve included, computed in XLA before
  the kernel; per block $H = \Phi_EW^\top$, the reads, and the end-of-block weights.

The backward pass (`jax.custom_vjp`) recomputes through the chunked XLA path: it is
`jax.vjp(chunked_scan)` at the same arguments, so `jax.grad` gives the chunked path's gradients
and every differentiable input (weights, momentum, window buffers, features, values, gates) gets
its cotangent. Forward mode (`jax.jvp`) is not available through `method="pallas"`.

**Backends** (chosen in one place, `resolve_backend`): `"interpret"` on CPU
(`interpret=True`), `"triton"` on GPU (`compiler_params=pltriton.CompilerParams(...)`: on
jax 0.10.2 a plain `pallas_call` lowers to Mosaic GPU, which cannot lower these kernels), and
`"mosaic_tpu"` on TPU. `pallas_scan(..., backend=...)` overrides the choice, which is how the
tests lower the kernels for `cuda` and `tpu` from a CPU machine.

**Block shapes.** Every kernel input is one block equal to the full array (no grid over time;
the chunk loop is inside the kernel, because Triton grid programs run unordered and Triton has no
scratch buffers to carry state across grid steps). That satisfies Mosaic TPU's rule (the last two
block dimensions divisible by (8, 128) *or equal to the full dimensions*). Triton needs every
in-kernel array to have a power-of-2 size, so the chunk size $b$, the extended token count
$n_E = b + c - 1$, and the feature, value and hidden dimensions are padded with zeros to powers
of two (at least 16 on Triton, the smallest `tl.dot` tile), for every backend, so that the CPU
tests run the layout the GPU runs. (The number of chunks is only a leading ref dimension, never
an in-kernel array, and needs no padding.) The padding is exact:

- padded steps write nothing ($\eta = 0$, $\Gamma = 0$, $\alpha = \theta = 1$) and their reads
  are dropped; padded tokens of $E$ have zero features, values and gates;
- padded feature and value coordinates stay zero because the supported objectives (`l2`, `dot`,
  `huber`, `lp`) are sums over coordinates whose gradient vanishes at prediction = target = 0;
- padded hidden units stay zero only if the activation maps 0 to 0 (GELU, ReLU, SiLU, tanh);
  otherwise a hidden width that needs padding is rejected.

Per-step window gates (`gamma` of shape `(T, c)`) need nothing from the kernel: they live in
$\Gamma$. Not supported (a `ValueError` says what to use instead): `GatedMLPMemory`,
`decay_first=True` (except in the exact form), `muon_per_chunk=True`, opaque (`from_optax`) learners, preconditioners
other than identity and Muon's Newton-Schulz, and other objectives. Every input is one VMEM
block on TPU, so very long sequences on TPU need a chunk grid with scratch carries (not done).
The kernels keep $W$ (and $S$) of every layer as loop values (registers on GPU, VMEM on TPU):
sized for head dimensions of up to a few hundred, not for wide deep memories.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu, triton as pltriton
from jax.tree_util import Partial
from jaxtyping import Array, Float, Scalar

import optimizers as iopt
from optimizers._inner import _newton_schulz_per_matrix

from ._chunked import _Chunk, _Coefficients, _coefficients, carry_window, chunked_scan, make_chunks
from ._exact_chunked import exact_block_inputs, exact_linear_scan
from ._memory import LinearMemory, MLPMemory
from ._objective import _huber, _lp, dot, l2
from ._scan_inputs import ScanInputs, ScanRule
from ._state import OmegaState


Backend = Literal["interpret", "triton", "mosaic_tpu"]
BACKENDS: tuple[Backend, ...] = ("interpret", "triton", "mosaic_tpu")
_TRITON_MIN_SIZE = 16


def resolve_backend(backend: Backend | None = None) -> Backend:
    """The Pallas backend for `backend`, or for `jax.default_backend()` when it is `None`.

    CPU runs the kernels in interpret mode, GPU through Triton, TPU through Mosaic. (At trace
    time `jax.default_backend()` is the machine's, even while lowering for another platform:
    pass `backend` explicitly to cross-lower.)
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"pallas: `backend` must be one of {BACKENDS}; got {backend!r}")
        return backend
    platform = jax.default_backend()
    if platform == "cpu":
        return "interpret"
    if platform in ("gpu", "cuda", "rocm"):
        return "triton"
    if platform == "tpu":
        return "mosaic_tpu"
    raise ValueError(f"pallas: no Pallas backend for the platform {platform!r}")


def _call_options(backend: Backend) -> dict[str, Any]:
    if backend == "interpret":
        return dict(interpret=True)
    if backend == "triton":
        return dict(compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1))
    return dict(compiler_params=pltpu.CompilerParams())


def _padded_size(n: int, backend: Backend) -> int:
    size = 1 << max(0, (n - 1).bit_length())
    return max(size, _TRITON_MIN_SIZE) if backend == "triton" else size


# --------------------------------------------------------------------------------------------
# What is supported
# --------------------------------------------------------------------------------------------


def _is_supported_objective(objective: Callable[..., Scalar]) -> bool:
    if objective is l2 or objective is dot:
        return True
    return isinstance(objective, Partial) and objective.func in (_huber, _lp)


def _newton_schulz_options(optimizer: iopt.InnerOptimizer) -> dict[str, Any] | None:
    """Newton-Schulz's `steps`, `coefficients`, `eps` for a Muon learner; None for identity."""
    precondition = optimizer.precondition
    if precondition is iopt.no_precondition:
        return None
    if isinstance(precondition, Partial) and precondition.func is _newton_schulz_per_matrix:
        return dict(precondition.keywords)
    raise ValueError(
        "omega_scan: method='pallas' supports the identity preconditioner (optimizers.gd(), "
        "optimizers.momentum()) and Muon's Newton-Schulz (optimizers.muon()); use "
        "method='chunked' for this optimizer"
    )


def check_supported(
    memory: Any,
    optimizer: iopt.InnerOptimizer,
    objective: Callable[..., Scalar],
    *,
    decay_first: bool,
    backend: Backend,
) -> None:
    """Raise a `ValueError` naming the alternative for anything the kernels do not compute."""
    if not isinstance(memory, LinearMemory | MLPMemory):
        raise ValueError(
            f"omega_scan: method='pallas' supports LinearMemory and MLPMemory, not "
            f"{type(memory).__name__}; use method='chunked'"
        )
    if isinstance(memory, MLPMemory) and memory.layer_norm:
        raise ValueError(
            "omega_scan: method='pallas' does not support MLPMemory(layer_norm=True); use "
            "method='chunked'"
        )
    if optimizer.precondition is None:
        raise ValueError(
            "omega_scan: this `optimizer` (from_optax) is opaque to the fast paths; use "
            "method='sequential'"
        )
    _newton_schulz_options(optimizer)
    if decay_first:
        raise ValueError(
            "omega_scan: method='pallas' does not support `decay_first=True`; use method='chunked'"
        )
    if not _is_supported_objective(objective):
        raise ValueError(
            "omega_scan: method='pallas' supports the objectives ae.l2, ae.dot, ae.huber(...) "
            f"and ae.lp(...); got {objective!r}; use method='chunked'"
        )
    if isinstance(objective, Partial) and objective.func is _lp:
        p, eps = objective.keywords["p"], objective.keywords["eps"]
        if eps == 0.0 and p < 2.0:
            raise ValueError(
                f"omega_scan: method='pallas' pads value coordinates with zero residuals, where "
                f"the gradient of ae.lp(p={p}, eps=0.0) is NaN; use eps > 0 or method='chunked'"
            )
    if isinstance(memory, MLPMemory) and len(memory.weights) > 1:
        hidden = memory.weights[0].shape[0]
        if _padded_size(hidden, backend) != hidden:
            with jax.ensure_compile_time_eval():
                at_zero = float(memory.activation(jnp.zeros((), memory.weights[0].dtype)))
            if at_zero != 0.0:
                raise ValueError(
                    f"omega_scan: method='pallas' pads the hidden width {hidden} to "
                    f"{_padded_size(hidden, backend)} with zero units, which is exact only if "
                    f"activation(0) == 0, but it is {at_zero}; use a power-of-2 hidden width "
                    f"or method='chunked'"
                )


# --------------------------------------------------------------------------------------------
# Padding (exact, see the module docstring)
# --------------------------------------------------------------------------------------------


def _pad_to(x: Array, shape: Sequence[int], value: float = 0.0) -> Array:
    widths = [(0, n - m) for m, n in zip(x.shape, shape, strict=True)]
    return jnp.pad(x, widths, constant_values=value)


def _pad_chunks(chunks: _Chunk, n_chunks: int, b: int, n_e: int, d_in: int, d_out: int) -> _Chunk:
    def steps(x, value):
        return _pad_to(x, (n_chunks, b), value)

    return _Chunk(
        features_e=_pad_to(chunks.features_e, (n_chunks, n_e, d_in)),
        values_e=_pad_to(chunks.values_e, (n_chunks, n_e, d_out)),
        gates=_pad_to(chunks.gates, (n_chunks, b, n_e)),
        step_gates=_pad_to(chunks.step_gates, (n_chunks, b, chunks.step_gates.shape[-1])),
        features_q=_pad_to(chunks.features_q, (n_chunks, b, d_in)),
        lr=steps(chunks.lr, 0.0),
        decay=steps(chunks.decay, 1.0),
        momentum=steps(chunks.momentum, 1.0),
        valid=steps(chunks.valid, 0.0),
    )


def _pad_matrix(w: Array, backend: Backend) -> Array:
    return _pad_to(w, [_padded_size(n, backend) for n in w.shape])


# --------------------------------------------------------------------------------------------
# In-kernel pieces (2-D values only: every op must lower on Triton and Mosaic TPU)
# --------------------------------------------------------------------------------------------


def _matmul(a: Array, b: Array) -> Array:
    """a @ b."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())))


def _matmul_nt(a: Array, b: Array) -> Array:
    """a @ b.T."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())))


def _matmul_tn(a: Array, b: Array) -> Array:
    """a.T @ b."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())))


def _output_gradient(objective, prediction: Array, target: Array) -> Array:
    return jax.vmap(jax.grad(objective))(prediction, target)


def _newton_schulz(G: Array, *, steps: int, coefficients: Sequence[float], eps: float) -> Array:
    r"""`optimizers.newton_schulz` on one (zero-padded) matrix, without transposes.

    For a tall matrix the iteration uses $X(bA + cA^2)$ with $A = X^\top X$, which equals
    $(bA' + cA'^2)X$ with $A' = XX^\top$; zero padding rows or columns stays zero.
    """
    a, b, c = coefficients
    squared = jnp.sum(jnp.sum(G * G, axis=1, keepdims=True), axis=0, keepdims=True)
    is_zero = squared == 0
    norm = jnp.where(is_zero, 0.0, jnp.sqrt(jnp.where(is_zero, 1.0, squared)))
    X = G / (norm + eps)
    tall = G.shape[0] > G.shape[1]
    for _ in range(steps):
        if tall:
            A = _matmul_tn(X, X)
            X = a * X + _matmul(X, b * A + c * _matmul(A, A))
        else:
            A = _matmul_nt(X, X)
            X = a * X + _matmul(b * A + c * _matmul(A, A), X)
    return X


def _forward_factors(weights, activation, residual: bool, X: Array, V: Array, objective):
    r"""Layer inputs $h^{l-1}_i$ and output cotangents $\delta^l_i$ at the anchor (a linear
    memory is the one-layer case)."""
    inputs, pre_activations = [X], []
    h = X
    for weight in weights[:-1]:
        z = _matmul_nt(h, weight)
        pre_activations.append(z)
        h = activation(z)
        inputs.append(h)
    out = _matmul_nt(h, weights[-1])
    if residual:
        out = out + X
    delta = _output_gradient(objective, out, V)
    deltas = [delta]
    for weight, z in zip(weights[:0:-1], pre_activations[::-1], strict=True):
        _, activation_vjp = jax.vjp(activation, z)
        (delta,) = activation_vjp(_matmul(delta, weight))
        deltas.append(delta)
    return inputs, deltas[::-1]


def _read(weights, activation, residual: bool, Q: Array) -> Array:
    g = Q
    for layer, weight in enumerate(weights):
        g = _matmul_nt(g, weight)
        if layer < len(weights) - 1:
            g = activation(g)
    return g + Q if residual else g


def _dual_kernel(
    *refs,
    n_layers: int,
    n_chunks: int,
    uses_momentum: bool,
    activation: Callable[[Array], Array],
    residual: bool,
    objective,
):
    """GD / momentum, linear or MLP memory: the dual form, one chunk per loop step."""
    refs = list(refs)
    weights_in = [refs.pop(0) for _ in range(n_layers)]
    momenta_in = [refs.pop(0) for _ in range(n_layers)] if uses_momentum else []
    phi_ref, v_ref, q_ref, A_ref, C_ref, A_end_ref, C_end_ref = (refs.pop(0) for _ in range(7))
    momentum_refs: list[Any] = [refs.pop(0) for _ in range(4)] if uses_momentum else [None] * 4
    c_S_ref, c_S_end_ref, B_end_ref, C_S_ref = momentum_refs
    y_ref = refs.pop(0)
    weights_out = [refs.pop(0) for _ in range(n_layers)]
    momenta_out = [refs.pop(0) for _ in range(n_layers)] if uses_momentum else []
    assert not refs

    def chunk(c, carry):
        weights, momenta = carry
        X, V, Q = phi_ref[c], v_ref[c], q_ref[c]
        A, C, A_end, C_end = A_ref[c], C_ref[c], A_end_ref[c], C_end_ref[c]
        inputs, deltas = _forward_factors(weights, activation, residual, X, V, objective)
        g = Q
        for layer, (weight, h_in, delta) in enumerate(zip(weights, inputs, deltas, strict=True)):
            pre = A * _matmul_nt(g, weight) - _matmul(C * _matmul_nt(g, h_in), delta)
            if uses_momentum:
                pre = pre - c_S_ref[c] * _matmul_nt(g, momenta[layer])
            g = activation(pre) if layer < n_layers - 1 else pre
        y_ref[c] = (g + Q if residual else g).astype(y_ref.dtype)
        new_weights, new_momenta = [], []
        for layer, (weight, h_in, delta) in enumerate(zip(weights, inputs, deltas, strict=True)):
            W_end = A_end * weight - _matmul_tn(C_end * delta, h_in)
            if uses_momentum:
                S = momenta[layer]
                W_end = W_end - c_S_end_ref[c] * S
                new_momenta.append(B_end_ref[c] * S + _matmul_tn(C_S_ref[c] * delta, h_in))
            new_weights.append(W_end)
        return new_weights, new_momenta

    init = ([w[...] for w in weights_in], [s[...] for s in momenta_in])
    weights, momenta = jax.lax.fori_loop(jnp.int32(0), jnp.int32(n_chunks), chunk, init)
    for ref, w in zip(weights_out + momenta_out, weights + momenta, strict=True):
        ref[...] = w.astype(ref.dtype)


def _muon_kernel(
    *refs,
    n_layers: int,
    n_chunks: int,
    b: int,
    activation: Callable[[Array], Array],
    residual: bool,
    objective,
    ns_options: dict[str, Any],
):
    """Muon, linear or MLP memory: per-position momentum, Newton-Schulz and weights."""
    refs = list(refs)
    weights_in = [refs.pop(0) for _ in range(n_layers)]
    momenta_in = [refs.pop(0) for _ in range(n_layers)]
    phi_ref, v_ref, q_ref, gates_t_ref, theta_ref, alpha_ref, step_ref = (
        refs.pop(0) for _ in range(7)
    )
    y_ref = refs.pop(0)
    weights_out = [refs.pop(0) for _ in range(n_layers)]
    momenta_out = [refs.pop(0) for _ in range(n_layers)]
    assert not refs

    def chunk(c, carry):
        X, V, Q = phi_ref[c], v_ref[c], q_ref[c]
        gates_t, theta, alpha, step = gates_t_ref[c], theta_ref[c], alpha_ref[c], step_ref[c]
        anchor = carry[0]
        inputs, deltas = _forward_factors(anchor, activation, residual, X, V, objective)
        column = jax.lax.broadcasted_iota(jnp.int32, gates_t.shape, 1)
        row_of_theta = jax.lax.broadcasted_iota(jnp.int32, theta.shape, 1)
        row_of_y = jax.lax.broadcasted_iota(jnp.int32, (b, y_ref.shape[-1]), 0)

        def pick(row, n):  # row[0, n] as a (1, 1) value, without dynamic slicing
            return jnp.sum(jnp.where(row_of_theta == n, row, 0.0), axis=1, keepdims=True)

        def position(n, carry):
            weights, momenta, y = carry
            gate = jnp.sum(jnp.where(column == n, gates_t, 0.0), axis=1, keepdims=True)
            theta_n, alpha_n, step_n = pick(theta, n), pick(alpha, n), pick(step, n)
            new_weights, new_momenta = [], []
            for weight, S, h_in, delta in zip(weights, momenta, inputs, deltas, strict=True):
                S = theta_n * S + _matmul_tn(gate * delta, h_in)
                direction = _newton_schulz(S, **ns_options)
                new_weights.append(alpha_n * weight - step_n * direction)
                new_momenta.append(S)
            read = _read(new_weights, activation, residual, Q)
            y = jnp.where(row_of_y == n, read, y)
            return new_weights, new_momenta, y

        y0 = jnp.zeros((b, y_ref.shape[-1]), y_ref.dtype)
        weights, momenta, y = jax.lax.fori_loop(
            jnp.int32(0), jnp.int32(b), position, (carry[0], carry[1], y0)
        )
        y_ref[c] = y.astype(y_ref.dtype)
        return weights, momenta

    init = ([w[...] for w in weights_in], [s[...] for s in momenta_in])
    weights, momenta = jax.lax.fori_loop(jnp.int32(0), jnp.int32(n_chunks), chunk, init)
    for ref, w in zip(weights_out + momenta_out, weights + momenta, strict=True):
        ref[...] = w.astype(ref.dtype)


# --------------------------------------------------------------------------------------------
# The forward pass: layout and coefficients in XLA, the chunk loop in the kernel
# --------------------------------------------------------------------------------------------


def _identity(z: Array) -> Array:
    return z


def _memory_layers(memory: LinearMemory | MLPMemory, optimizer_state: Any, uses_momentum: bool):
    """The weight matrices in the order they are applied, their momenta, sigma, residual."""
    if isinstance(memory, LinearMemory):
        momenta = (optimizer_state.momentum.weight,) if uses_momentum else None
        return (memory.weight,), momenta, _identity, False
    momenta = tuple(optimizer_state.momentum.weights) if uses_momentum else None
    return tuple(memory.weights), momenta, memory.activation, memory.residual


def _with_layers(memory: LinearMemory | MLPMemory, layers: Sequence[Array]):
    if isinstance(memory, LinearMemory):
        return eqx.tree_at(lambda m: m.weight, memory, layers[0])
    return eqx.tree_at(lambda m: m.weights, memory, tuple(layers))


def _forward(
    state: OmegaState, inputs: ScanInputs, *, rule: ScanRule, backend: Backend
) -> tuple[Float[Array, "T d_out"], OmegaState]:
    objective, optimizer, window = rule.objective, rule.optimizer, rule.window
    T, d_out = inputs.v.shape
    memory = state.memory
    assert isinstance(memory, LinearMemory | MLPMemory)
    uses_momentum = optimizer.uses_momentum
    ns_options = _newton_schulz_options(optimizer)
    weights, momenta, activation, residual = _memory_layers(
        memory, state.optimizer_state, uses_momentum
    )
    chunks, _ = make_chunks(state, inputs, window=window, chunk_size=rule.chunk_size)
    n_chunks, b = chunks.lr.shape
    size = functools.partial(_padded_size, backend=backend)
    b_p, n_e_p = size(b), size(b + window - 1)
    d_in_p, d_out_p = size(memory.d_in), size(d_out)
    chunks = _pad_chunks(chunks, n_chunks, b_p, n_e_p, d_in_p, d_out_p)
    weights_p = [_pad_matrix(w, backend) for w in weights]
    momenta_p = [] if momenta is None else [_pad_matrix(s, backend) for s in momenta]
    dtype = weights_p[0].dtype
    n_layers = len(weights)

    def column(x):  # (..., n) -> (..., n, 1)
        return x[..., None]

    data = [chunks.features_e, chunks.values_e, chunks.features_q]
    if ns_options is None:
        coeffs: _Coefficients = _coefficients(chunks, uses_momentum, optimizer.nesterov)
        coeffs = coeffs.chunk_major()
        data += [column(coeffs.A), coeffs.C, column(coeffs.A[:, -1:]), column(coeffs.C[:, -1])]
        if uses_momentum:
            data += [
                column(coeffs.c_S),
                column(coeffs.c_S[:, -1:]),
                column(coeffs.B[:, -1:]),
                column(coeffs.C_S),
            ]
        kernel = functools.partial(
            _dual_kernel, n_layers=n_layers, n_chunks=n_chunks, uses_momentum=uses_momentum
        )
        carried = weights_p + momenta_p
    else:
        eta_inside = optimizer.eta_inside_precondition
        gates = chunks.lr[..., None] * chunks.gates if eta_inside else chunks.gates
        step = chunks.valid if eta_inside else chunks.lr
        data += [
            jnp.swapaxes(gates, 1, 2),
            chunks.momentum[:, None, :],
            chunks.decay[:, None, :],
            step[:, None, :],
        ]
        kernel = functools.partial(
            _muon_kernel, n_layers=n_layers, n_chunks=n_chunks, b=b_p, ns_options=ns_options
        )
        carried = weights_p + momenta_p
    kernel = functools.partial(
        kernel, activation=activation, residual=residual, objective=objective
    )
    out_shape = [jax.ShapeDtypeStruct((n_chunks, b_p, d_out_p), dtype)] + [
        jax.ShapeDtypeStruct(w.shape, dtype) for w in carried
    ]
    form = "dual" if ns_options is None else "muon"
    name = f"omega_{form}_{'linear' if isinstance(memory, LinearMemory) else 'mlp'}"
    call = pl.pallas_call(kernel, out_shape=out_shape, name=name, **_call_options(backend))
    y, *carried_out = call(*carried, *[x.astype(dtype) for x in data])
    y = y[:, :b, :d_out].reshape(n_chunks * b, d_out)[:T]
    new_weights = [
        w[: s.shape[0], : s.shape[1]] for w, s in zip(carried_out[:n_layers], weights, strict=True)
    ]
    new_memory = _with_layers(memory, new_weights)
    if uses_momentum:
        assert momenta is not None
        new_momenta = [
            s[: m.shape[0], : m.shape[1]]
            for s, m in zip(carried_out[n_layers:], momenta, strict=True)
        ]
        new_opt = iopt.MomentumState(_with_layers(state.optimizer_state.momentum, new_momenta))
    else:
        new_opt = state.optimizer_state
    new_state = carry_window(
        state, inputs, window=window, memory=new_memory, optimizer_state=new_opt
    )
    return y, new_state


def pallas_scan(
    state: OmegaState, inputs: ScanInputs, rule: ScanRule, *, backend: Backend | None = None
) -> tuple[Float[Array, "T d_out"], OmegaState]:
    r"""`chunked_scan` with the chunk loop in a Pallas kernel (same arguments, same results).

    Computes, per chunk with anchor $W_s$, $W_t = A_tW_s - \sum_{i\in E}C[t,i]\,u_i$ (digest
    6.2) for GD and momentum, and the per-position Muon step $W_t = \alpha_tW_{t-1} -
    \eta_t\mathrm{NS}_k(S_t)$ (ATLAS Eqs 40-41, digest 6.4); reads after writes. The gradient
    is `jax.vjp(chunked_scan)` at the same arguments (a `jax.custom_vjp`).

    Arguments are validated by `omega_scan` (the public entry, `method="pallas"`), except what
    only the kernels cannot do (`check_supported`). `backend` is `"interpret"`, `"triton"` or
    `"mosaic_tpu"`; `None` picks the one for `jax.default_backend()` (`resolve_backend`).
    """
    backend = resolve_backend(backend)
    check_supported(
        state.memory, rule.optimizer, rule.objective, decay_first=rule.decay_first, backend=backend
    )
    forward = functools.partial(_forward, rule=rule, backend=backend)
    reference = functools.partial(chunked_scan, rule=rule)
    return _with_reference_gradient(forward, reference, state, inputs)


def _with_reference_gradient(forward, reference, state: OmegaState, inputs: ScanInputs):
    """`forward(state, inputs)` (a Pallas kernel) whose gradient is that of `reference`, the XLA
    form of the same function, through a `jax.custom_vjp`."""

    @jax.custom_vjp
    def scan(state, inputs):
        return forward(state, inputs)

    def scan_fwd(state, inputs):
        return forward(state, inputs), (state, inputs)

    def scan_bwd(arguments, cotangents):
        _, vjp = jax.vjp(reference, *arguments)
        return vjp(cotangents)

    scan.defvjp(scan_fwd, scan_bwd)
    return scan(state, inputs)


# --------------------------------------------------------------------------------------------
# The exact chunk-parallel form (linear memory, GD, l2 / dot: `atlas_eqx._exact_chunked`)
# --------------------------------------------------------------------------------------------


def _exact_kernel(
    W_ref,
    features_ref,
    queries_ref,
    values_ref,
    read_tokens_ref,
    read_value_tokens_ref,
    end_tokens_ref,
    end_value_tokens_ref,
    end_decay_ref,
    y_ref,
    W_out_ref,
    *,
    n_blocks: int,
):
    r"""The block loop of `exact_linear_scan`: per block, with $H = \Phi_EW^\top$,
    $Y = (D\odot Q)W^\top - (PZ)H + (PZ_v)V_E$ and
    $W \leftarrow D_LW - (E_ZH - E_{Z_v}V_E)^\top\Phi_E$ (the mixing matrix of the XLA loop in
    its four parts: Triton lowers no slices or concatenations inside a kernel)."""

    def block(k, W):
        Phi, V = features_ref[k], values_ref[k]
        H = _matmul_nt(Phi, W)
        y = _matmul_nt(queries_ref[k], W) + _matmul(read_tokens_ref[k], H)
        y_ref[k] = (y + _matmul(read_value_tokens_ref[k], V)).astype(y_ref.dtype)
        correction = _matmul(end_tokens_ref[k], H) + _matmul(end_value_tokens_ref[k], V)
        return end_decay_ref[k] * W + _matmul_tn(correction, Phi)

    W = jax.lax.fori_loop(jnp.int32(0), jnp.int32(n_blocks), block, W_ref[...])
    W_out_ref[...] = W.astype(W_out_ref.dtype)


def _exact_forward(
    state: OmegaState, inputs: ScanInputs, *, rule: ScanRule, backend: Backend
) -> tuple[Float[Array, "T d_out"], OmegaState]:
    T, d_out = inputs.v.shape
    memory = state.memory
    assert isinstance(memory, LinearMemory)
    blocks = exact_block_inputs(state, inputs, rule)
    n_blocks, n_e = blocks.values.shape[:2]
    L = blocks.rows.shape[1] - n_e
    size = functools.partial(_padded_size, backend=backend)
    L_p, n_e_p, d_in_p, d_out_p = size(L), size(n_e), size(memory.d_in), size(d_out)
    dtype = memory.weight.dtype
    mixing = blocks.mixing
    if mixing.shape[-1] == n_e:  # the form for H - V_E: [M | -M] for [H; V_E]
        mixing = jnp.concatenate([mixing, -mixing], axis=-1)
    read, end = mixing[:, :L], mixing[:, L:]  # signs as in the XLA loop
    data = [
        _pad_to(blocks.rows[:, :n_e], (n_blocks, n_e_p, d_in_p)),
        _pad_to(blocks.rows[:, n_e:], (n_blocks, L_p, d_in_p)),
        _pad_to(blocks.values, (n_blocks, n_e_p, d_out_p)),
        _pad_to(read[..., :n_e], (n_blocks, L_p, n_e_p)),
        _pad_to(read[..., n_e:], (n_blocks, L_p, n_e_p)),
        _pad_to(end[..., :n_e], (n_blocks, n_e_p, n_e_p)),
        _pad_to(end[..., n_e:], (n_blocks, n_e_p, n_e_p)),
        blocks.end_decay[:, None, None],
    ]
    W_p = _pad_matrix(memory.weight, backend)
    out_shape = [
        jax.ShapeDtypeStruct((n_blocks, L_p, d_out_p), dtype),
        jax.ShapeDtypeStruct(W_p.shape, dtype),
    ]
    call = pl.pallas_call(
        functools.partial(_exact_kernel, n_blocks=n_blocks),
        out_shape=out_shape,
        name="omega_exact_linear",
        **_call_options(backend),
    )
    y, W = call(W_p, *[x.astype(dtype) for x in data])
    y = y[:, :L, :d_out].reshape(n_blocks * L, d_out)[:T]
    new_memory = eqx.tree_at(lambda m: m.weight, memory, W[: memory.d_out, : memory.d_in])
    new_state = carry_window(
        state,
        inputs,
        window=rule.window,
        memory=new_memory,
        optimizer_state=state.optimizer_state,
    )
    return y, new_state


def exact_pallas_scan(
    state: OmegaState, inputs: ScanInputs, rule: ScanRule, *, backend: Backend | None = None
) -> tuple[Float[Array, "T d_out"], OmegaState]:
    r"""`exact_linear_scan` with its block loop in a Pallas kernel (same arguments, same
    results): a linear memory under GD with `l2` or `dot`, any window, gates, `decay_first`
    and `chunk_size`. The state-independent block inputs (the triangular solve included) are
    computed in XLA before the kernel; the kernel carries $W$ through the blocks. The
    gradient is `jax.vjp(exact_linear_scan)` at the same arguments (a `jax.custom_vjp`).
    """
    backend = resolve_backend(backend)
    forward = functools.partial(_exact_forward, rule=rule, backend=backend)
    reference = functools.partial(exact_linear_scan, rule=rule)
    return _with_reference_gradient(forward, reference, state, inputs)
