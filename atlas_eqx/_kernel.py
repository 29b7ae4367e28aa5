r"""Kernel (non-parametric) memories: a linear memory on the infinite feature map $\phi^*$.

With $W_0 = 0$ every write is a sum of outer products $\beta\,\phi(k_j)^\top$, so the memory is
$W_t = \sum_{j\le t}\beta_{t,j}\,\phi(k_j)^\top$ and its read is
$y_t = W_t\phi(q_t) = \sum_{j\le t}\beta_{t,j}\,\kappa(k_j, q_t)$ (the kernel trick, digest 5.1-5.5).
The state is a KV cache: the keys and one coefficient vector $\beta_{t,j}\in\mathbb R^{d_v}$ per
stored token. Training cost is $\mathcal O(T^2)$, like attention (`kernel_memory_scan`); decoding
is one token at a time against a fixed-capacity cache (`kernel_memory_stream`), exact against it.

- `rule="hebbian"` (DeepTransformer, SWDT; ATLAS Eqs 25-26, digest 5.2):
  $W_t = \alpha_tW_{t-1} + \eta_t\sum_{i=t-c+1}^{t} v_i\phi(k_i)^\top$, a closed quadratic form.
- `rule="delta"` (Dot; ATLAS Eq 27 in the corrected form of digest 5.5):
  $W_t = \alpha_tW_{t-1} + \eta_t\sum_{i=t-c+1}^{t}(v_i - W_{t-1}\phi(k_i))\,\phi(k_i)^\top$, the
  triangular residual recursion (digest I-31), solved at once as a unit lower-triangular system
  over the $Tc$ (step, window token) pairs, $\mathcal O((Tc)^2)$ memory.
"""

import math
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jaxtyping import Array, Bool, Float, Int, jaxtyped

from ._chunked import decay_matrix


KernelFn = Callable[[Array], Array]
Kernel = Literal["exp"] | KernelFn
Rule = Literal["hebbian", "delta"]
_RULES = ("hebbian", "delta")


class KernelMemoryState(eqx.Module):
    r"""The streaming state of a kernel memory: a fixed-capacity cache of the tokens written so far.

    Token $n$ of the stream lives in slot $n \bmod \text{capacity}$; the memory is
    $W = \sum_{\text{slots}}$ `coefficients` $\phi^*(\text{keys})^\top$ over the filled slots.
    Without a window every token is kept (capacity `max_length`); with a sliding window $w$ it
    is a ring buffer of $\min(w, \text{max\_length})$ slots, constant memory in the stream
    length (a token older than $w$ is never read again).

    - `keys`: $k_j$, `(capacity, d_k)`.
    - `values`: $v_j$ (augmented with a trailing 1 when `normalize=True`), `(capacity, d_v')`;
      needed by the window terms of later steps.
    - `coefficients`: $\beta_j$, `(capacity, d_v')`; retention $\alpha_t$ is applied to them in
      place, so no per-token decay products are stored.
    - `positions`: the stream position of each slot's token, `-1` for an empty slot.
    - `count`: the number of tokens written so far (an integer scalar).
    """

    keys: Float[Array, "capacity d_k"]
    values: Float[Array, "capacity d_v_aug"]
    coefficients: Float[Array, "capacity d_v_aug"]
    positions: Int[Array, " capacity"]
    count: Int[Array, ""]


def init_kernel_memory_state(
    max_length: int,
    d_k: int,
    d_v: int,
    *,
    normalize: bool = False,
    window: int | None = None,
    dtype: jnp.dtype | type | None = None,
) -> KernelMemoryState:
    r"""The empty state ($W_0 = 0$) of a kernel memory stream.

    **Arguments:**

    - `max_length`: the total number of tokens a stream may write.
    - `d_k`, `d_v`: key and value dimensions.
    - `normalize`: must match the `normalize` of `kernel_memory_stream` (it adds a value column).
    - `window`: the sliding window $w$ of `kernel_memory_stream`, or `None`. With a window the
      state is a ring buffer of $\min(w, \text{max\_length})$ slots; when that is $w$,
      streams of any length fit.
    - `dtype`: the floating dtype; defaults to JAX's default float.
    """
    for name, n in (("max_length", max_length), ("d_k", d_k), ("d_v", d_v), ("window", window)):
        if (n is not None or name != "window") and (
            not isinstance(n, int) or isinstance(n, bool) or n < 1
        ):
            raise ValueError(
                f"init_kernel_memory_state: `{name}` must be an integer >= 1; got {n!r}"
            )
    dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)
    d_aug = d_v + 1 if normalize else d_v
    capacity = max_length if window is None else min(window, max_length)
    return KernelMemoryState(
        keys=jnp.zeros((capacity, d_k), dtype),
        values=jnp.zeros((capacity, d_aug), dtype),
        coefficients=jnp.zeros((capacity, d_aug), dtype),
        positions=jnp.full((capacity,), -1, jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def _check_options(
    name: str, kernel: Kernel, rule: str, window: int | None, omega_window: int, scale: float | None
) -> None:
    if not (kernel == "exp" or callable(kernel)):
        raise ValueError(f"{name}: `kernel` must be 'exp' or a callable; got {kernel!r}")
    if rule not in _RULES:
        raise ValueError(f"{name}: `rule` must be one of {_RULES}; got {rule!r}")
    if window is not None and (
        not isinstance(window, int) or isinstance(window, bool) or window < 1
    ):
        raise ValueError(f"{name}: `window` must be None or an integer >= 1; got {window!r}")
    if not isinstance(omega_window, int) or isinstance(omega_window, bool) or omega_window < 1:
        raise ValueError(
            f"{name}: `omega_window` (c) must be an integer >= 1; got {omega_window!r}"
        )
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}: `scale` must be None or a finite number > 0; got {scale!r}")
    if rule == "delta" and window is not None:
        raise ValueError(
            f"{name}: `window` (the non-parametric sliding window) is only defined for "
            "rule='hebbian': delta-rule residuals depend on evicted tokens. Use window=None "
            "with rule='delta' (`omega_window` is the Omega window of Dot)"
        )


def _gates(
    name: str,
    x: Float[Array | np.ndarray, " T"] | None,
    T: int,
    dtype,
    arg: str,
    check_values: bool,
) -> Float[Array, " T"]:
    if x is None:
        return jnp.ones((T,), dtype)
    x = jnp.asarray(x, dtype)
    if x.shape != (T,):
        raise ValueError(f"{name}: `{arg}` must have shape (T,) = ({T},); got {x.shape}")
    if not check_values:
        return x
    if arg == "lr":
        bad = ~jnp.all(x >= 0)
        message = f"{name}: `lr` (eta_t) must be >= 0 (and not NaN)"
    else:
        bad = ~jnp.all((x >= 0) & (x <= 1))
        message = f"{name}: `decay` (alpha_t) must be in [0, 1] (and not NaN)"
    return eqx.error_if(x, bad, message)


def _masked_kernel(
    kernel: Kernel, s: Float[Array, "*shape"], mask: Bool[Array, "*shape"]
) -> Float[Array, "*shape"]:
    r"""$\kappa$ where `mask`, else exactly 0; masked scores never reach the kernel, so an
    overflow there can leak neither into values nor (as 0 * inf) into gradients."""
    s = jnp.where(mask, s, 0.0)
    return jnp.where(mask, jnp.exp(s) if kernel == "exp" else kernel(s), 0.0)


def _augment(v: Float[Array, "T d_v"], normalize: bool) -> Float[Array, "T d_v_aug"]:
    return jnp.concatenate([v, jnp.ones_like(v[:, :1])], axis=1) if normalize else v


def _divide(y: Float[Array, "T d_v_aug"], normalize: bool) -> Float[Array, "T d_v"]:
    return y[:, :-1] / y[:, -1:] if normalize else y


def _finite(name: str, x: Float[Array, "*shape"], arg: str) -> Float[Array, "*shape"]:
    return eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), f"{name}: `{arg}` contains NaN or inf")


def _prepare(name: str, q, k, v, lr, decay, scale: float | None, check_values: bool):
    T, d_k = q.shape
    if T == 0:
        raise ValueError(f"{name}: `q` is empty (T = 0); a sequence needs at least one token")
    if k.shape != (T, d_k):
        raise ValueError(
            f"{name}: `k` must have the shape of `q`, (T, d_k) = {q.shape}; got {k.shape}"
        )
    if v.ndim != 2 or v.shape[0] != T:
        raise ValueError(f"{name}: `v` must have shape (T, d_v) with T={T}; got {v.shape}")
    dtype = jnp.result_type(q, k, v)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.zeros(()).dtype
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    if check_values:
        q, k, v = (_finite(name, x, arg) for x, arg in ((q, "q"), (k, "k"), (v, "v")))
    lr = _gates(name, lr, T, dtype, "lr", check_values)
    decay = _gates(name, decay, T, dtype, "decay", check_values)
    scale = 1.0 / math.sqrt(d_k) if scale is None else float(scale)
    return q, k, v, lr, decay, scale


@jaxtyped(typechecker=beartype)
def kernel_memory_scan(
    q: Float[Array | np.ndarray, "T d_k"],
    k: Float[Array | np.ndarray, "T d_k"],
    v: Float[Array | np.ndarray, "T d_v"],
    lr: Float[Array | np.ndarray, " T"] | None = None,
    decay: Float[Array | np.ndarray, " T"] | None = None,
    *,
    kernel: Kernel = "exp",
    rule: Rule = "hebbian",
    window: int | None = None,
    omega_window: int = 1,
    normalize: bool = False,
    scale: float | None = None,
    check_values: bool = True,
) -> Float[Array, "T d_v"]:
    r"""One sequence through a linear memory on $\phi^*$ with $W_0 = 0$, by the kernel trick.

    With $\kappa(a, b) = \exp(\sigma\,a^\top b) = \phi^*(a)^\top\phi^*(b)$ (ATLAS Eqs 22-24,
    $\sigma$ = `scale`), the window $i = t-c+1..t$ ($c$ = `omega_window`) and
    $W_t = \sum_j\beta_{t,j}\phi^*(k_j)^\top$:

    - Hebbian ($\ell = -\langle W\phi(k), v\rangle$; DeepTransformer Eq 26, SWDT):
      $W_t = \alpha_tW_{t-1} + \eta_t\sum_i v_i\phi^*(k_i)^\top$, so
      $y_t = \sum_{i\le t}C_{t,i}\,\kappa(k_i, q_t)\,v_i$ with
      $C = L_\alpha\,\mathrm{diag}(\eta)\,B_c$, $L_\alpha[t,s] = \prod_{j=s+1}^t\alpha_j$ and
      the band $B_c[s,i] = [0\le s-i<c]$.
    - Delta ($\ell = \tfrac12\|W\phi(k) - v\|^2$; Dot Eq 27, corrected in digest 5.5):
      $W_t = \alpha_tW_{t-1} + \eta_t\sum_i(v_i - W_{t-1}\phi^*(k_i))\,\phi^*(k_i)^\top$; for
      $c = 1$, $\alpha = 1$: $r_i = v_i - \sum_{j<i}\eta_jr_j\kappa(k_j, k_i)$ and
      $y_t = \sum_{i\le t}\eta_ir_i\kappa(k_i, q_t)$ (digest I-31).
    - Read after write: $y_t = W_t\phi^*(q_t)$.

    With `rule="hebbian"`, `normalize=True`, no gates and the default scale this is causal softmax
    attention exactly (digest I-28); with `window=w` it is sliding-window softmax attention
    (I-29, Eq 18).

    **Arguments:**

    - `q`, `k`: `(T, d_k)`; `v`: `(T, d_v)`. One head, one sequence (`jax.vmap` for more).
    - `lr`: $\eta_t \ge 0$, `(T,)`; `decay`: $\alpha_t\in[0, 1]$, `(T,)`. `None` means 1.
    - `kernel`: `"exp"` for $\kappa = \exp(s)$, or a callable applied elementwise to the scaled
      dot products $s = \sigma\,a^\top b$ (any shape), e.g. a truncated Taylor series.
    - `rule`: `"hebbian"` or `"delta"`.
    - `window`: `None` (infinite) or $w$: only the last $w$ tokens are in memory (token $i$
      enters $y_t$ only if $t - i < w$). Equivalently, $W_t$ is the memory rebuilt from $W = 0$
      over tokens $t-w+1..t$. Only for `rule="hebbian"` (a `ValueError` otherwise: delta
      residuals depend on the evicted tokens).
    - `omega_window`: $c \ge 1$, the Omega window of gradient terms, each evaluated at
      $W_{t-1}$; Hebbian with $c > 1$ is SWDT, delta with $c > 1$ is Dot with window $c$.
    - `normalize`: value augmentation $v' = [v; 1]$, output $y'_{1:d_v}/y'_{d_v+1}$ (digest
      5.2, A-16). Exact for positive kernels and nonnegative coefficients (Hebbian).
    - `scale`: $\sigma > 0$; `None` means $1/\sqrt{d_k}$.
    - `check_values`: check at run time (`eqx.error_if`) that `q`, `k`, `v` are finite and
      the gates in range; `False` inside models whose gates are in range by construction
      (the check's host callback keeps JAX's persistent compilation cache from storing the
      program), as for `omega_scan`.

    **Returns:** `y`, `(T, d_v)`.
    """
    name = "kernel_memory_scan"
    _check_options(name, kernel, rule, window, omega_window, scale)
    q, k, v, lr, decay, sigma = _prepare(name, q, k, v, lr, decay, scale, check_values)
    T = q.shape[0]
    values = _augment(v, normalize)
    scores = sigma * (q @ k.T)  # [t, i] = sigma q_t . k_i
    if rule == "hebbian":
        idx = jnp.arange(T)
        offset = idx[:, None] - idx[None, :]
        # C[t, i] = sum_{j<c} L[t, i+j] eta_{i+j}: c shifted copies, O(c T^2) (L[t, s] = 0, s > t).
        written = jnp.pad(decay_matrix(decay) * lr[None, :], ((0, 0), (0, omega_window - 1)))
        coefficients = sum(written[:, j : j + T] for j in range(omega_window))
        visible = offset >= 0 if window is None else (offset >= 0) & (offset < window)
        coefficients = jnp.where(visible, coefficients, 0.0)
        if kernel == "exp" and normalize:
            # exp(s - m_t) rescales row t, which the normalisation cancels exactly.
            row_max = jnp.max(jnp.where(visible, scores, -jnp.inf), axis=1, keepdims=True)
            scores = scores - jax.lax.stop_gradient(row_max)
        y = (coefficients * _masked_kernel(kernel, scores, visible)) @ values
        return _divide(y, normalize)
    return _divide(
        _delta_residual_solve(k, values, lr, decay, scores, kernel, sigma, omega_window), normalize
    )


def _delta_residual_solve(
    k: Float[Array, "T d_k"],
    values: Float[Array, "T d_v_aug"],
    lr: Float[Array, " T"],
    decay: Float[Array, " T"],
    scores: Float[Array, "T T"],
    kernel: Kernel,
    sigma: float,
    c: int,
) -> Float[Array, "T d_v_aug"]:
    r"""The delta rule's residuals by one unit lower-triangular solve (digest 5.5, I-31).

    Step $s$ writes $\eta_s r_{s,i}\phi(k_i)^\top$ for each window token $i = s - j$,
    $j < c$, with $r_{s,i} = v_i - W_{s-1}\phi(k_i)$ and
    $W_{s-1} = \sum_{s'<s}L_\alpha[s-1,s']\,\eta_{s'}\sum_{i'}r_{s',i'}\phi(k_{i'})^\top$. On
    the $Tc$ pairs $n = (s, j)$ this is $(I + M)R = V$ with the strictly block-lower
    $M[n, n'] = L_\alpha[s-1, s']\,\eta_{s'}\,\kappa(k_{i'}, k_i)$, and then
    $y_t = \sum_n L_\alpha[t, s]\,\eta_s\,\kappa(k_i, q_t)\,r_n$. Memory is
    $\mathcal O((Tc)^2)$ (no per-step state is stored for the backward pass).
    """
    T = k.shape[0]
    idx = jnp.arange(T)
    offset = idx[:, None] - idx[None, :]
    # gram[j, i] = kappa(k_j, k_i) is needed only for j <= s' < s <= i + c - 1.
    gram = _masked_kernel(kernel, sigma * (k @ k.T), offset < c - 1)
    read = _masked_kernel(kernel, scores, offset >= 0)
    steps = jnp.repeat(idx, c)  # s(n) for n = s * c + j
    tokens = steps - jnp.tile(jnp.arange(c), T)  # i(n) = s - j
    valid = tokens >= 0
    tokens = jnp.maximum(tokens, 0)
    decays = decay_matrix(decay)  # L[t, s]
    previous = jnp.concatenate([jnp.zeros((1, T), decays.dtype), decays[:-1]])  # L[s-1, s'], s' < s
    written = jnp.where(valid, lr[steps], 0.0)  # eta_s for a real pair, else 0
    coupling = previous[steps][:, steps] * written[None, :] * gram[tokens][:, tokens].T
    coupling = jnp.where(valid[:, None], coupling, 0.0)
    rhs = jnp.where(valid[:, None], values[tokens], 0.0)
    residuals = jax.scipy.linalg.solve_triangular(coupling, rhs, lower=True, unit_diagonal=True)
    weights = decays[:, steps] * written[None, :] * read[:, tokens]  # [t, n], 0 for s(n) > t
    # A product 0 * inf would let a later overflow poison earlier outputs; a non-finite
    # residual reaches exactly the outputs with a nonzero weight on it instead.
    finite = jnp.isfinite(residuals)
    y = weights @ jnp.where(finite, residuals, 0.0)
    poisoned = (weights != 0).astype(y.dtype) @ (~finite).astype(y.dtype) > 0
    return jnp.where(poisoned, jnp.nan, y)


@jaxtyped(typechecker=beartype)
def kernel_memory_stream(
    q: Float[Array | np.ndarray, "T d_k"],
    k: Float[Array | np.ndarray, "T d_k"],
    v: Float[Array | np.ndarray, "T d_v"],
    lr: Float[Array | np.ndarray, " T"] | None,
    decay: Float[Array | np.ndarray, " T"] | None,
    state: KernelMemoryState,
    *,
    kernel: Kernel = "exp",
    rule: Rule = "hebbian",
    window: int | None = None,
    omega_window: int = 1,
    normalize: bool = False,
    scale: float | None = None,
    check_values: bool = True,
) -> tuple[Float[Array, "T d_v"], KernelMemoryState]:
    r"""The next `T` tokens of a stream through a kernel memory (see `kernel_memory_scan`).

    Processes the tokens one at a time against the cache in `state` (keys and coefficients
    $\beta_j$ of $W = \sum_j\beta_j\phi^*(k_j)^\top$):
    $\beta \leftarrow \alpha_t\beta + \eta_t\sum_{i=t-c+1}^{t}e_i\,r_i^\top$ with
    $r_i = v_i$ (Hebbian) or $r_i = v_i - \sum_j\beta_j\kappa(k_j, k_i)$ (delta), then
    $y_t = \sum_j\beta_j\kappa(k_j, q_t)$. Streaming consecutive pieces from
    `init_kernel_memory_state` equals one `kernel_memory_scan` call over their concatenation,
    with the same options. Each token costs $\mathcal O(\text{capacity}\cdot(d_k + c\,d_v))$.

    **Arguments:** as `kernel_memory_scan`, plus `state` (a `KernelMemoryState`, from
    `init_kernel_memory_state` with the same `normalize` and `window`, or from a previous
    call). A state with at least `window` slots is a ring buffer and the stream may run on
    indefinitely; otherwise writing past its capacity is an error.

    **Returns:** `(y, state)` with `y` of shape `(T, d_v)`.
    """
    name = "kernel_memory_stream"
    _check_options(name, kernel, rule, window, omega_window, scale)
    q, k, v, lr, decay, sigma = _prepare(name, q, k, v, lr, decay, scale, check_values)
    T, d_k = q.shape
    capacity, d_aug = state.coefficients.shape
    expected_aug = v.shape[1] + 1 if normalize else v.shape[1]
    if state.keys.shape[1] != d_k or d_aug != expected_aug:
        raise ValueError(
            f"{name}: `state` holds keys of dimension {state.keys.shape[1]} and "
            f"{d_aug} value columns, but d_k={d_k}, d_v={v.shape[1]}, normalize={normalize} "
            f"need {d_k} and {expected_aug} (init_kernel_memory_state(..., normalize={normalize}))"
        )
    dtype = state.coefficients.dtype
    q, k, v, lr, decay = (x.astype(dtype) for x in (q, k, v, lr, decay))
    if window is None or capacity < window:
        # Not a ring buffer: every token must fit (a ring of >= w slots evicts only tokens
        # that are outside the window).
        count = eqx.error_if(
            state.count,
            state.count + T > capacity,
            f"{name}: writing past the state's capacity (init_kernel_memory_state max_length; "
            "with a window, init_kernel_memory_state(..., window=w) gives a ring buffer)",
        )
    else:
        count = state.count
    values = _augment(v, normalize)
    offsets = jnp.arange(omega_window)

    def step(carry, inputs):
        keys, stored_values, beta, positions = carry
        t, q_t, k_t, v_t, eta, alpha = inputs
        slot = t % capacity  # the evicted token (if any) is older than the window
        keys = keys.at[slot].set(k_t)
        stored_values = stored_values.at[slot].set(v_t)
        beta = beta.at[slot].set(0.0)
        positions = positions.at[slot].set(t)
        window_idx = t - offsets
        window_slots = window_idx % capacity
        in_window = (window_idx >= 0) & (positions[window_slots] == window_idx)
        if rule == "hebbian":
            residual = stored_values[window_slots]
        else:
            earlier = (positions >= 0) & (positions < t)
            earlier = jnp.broadcast_to(earlier[:, None], (capacity, omega_window))
            gram = _masked_kernel(kernel, sigma * (keys @ keys[window_slots].T), earlier)
            residual = stored_values[window_slots] - gram.T @ beta
        residual = jnp.where(in_window[:, None], residual, 0.0)
        beta = alpha * beta + eta * jnp.zeros_like(beta).at[window_slots].add(residual)
        visible = positions >= 0
        if window is not None:
            visible = visible & (t - positions < window)
        scores = sigma * (keys @ q_t)
        if kernel == "exp" and normalize and rule == "hebbian":
            scores = scores - jax.lax.stop_gradient(jnp.max(jnp.where(visible, scores, -jnp.inf)))
        weights = _masked_kernel(kernel, scores, visible)
        return (keys, stored_values, beta, positions), weights @ beta

    steps = count + jnp.arange(T, dtype=jnp.int32)
    carry = (state.keys, state.values, state.coefficients, state.positions)
    (keys, stored_values, beta, positions), y = jax.lax.scan(
        step, carry, (steps, q, k, values, lr, decay)
    )
    new_state = KernelMemoryState(keys, stored_values, beta, positions, count + T)
    return _divide(y, normalize), new_state
