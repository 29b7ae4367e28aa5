from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from beartype import beartype
from jaxtyping import Array, Float, jaxtyped, Scalar

import feature_maps as fm
import optimizers as iopt

from ._chunked import chunked_scan
from ._exact_chunked import exact_linear_scan, has_exact_form
from ._memory import AbstractMemory
from ._objective import l2
from ._pallas import (
    check_supported as check_pallas_supported,
    exact_pallas_scan,
    pallas_scan,
    resolve_backend,
)
from ._scan_inputs import ScanInputs, ScanRule
from ._sequential import sequential_scan
from ._state import init_omega_state, OmegaState


Vector = Float[Array | np.ndarray, " T"]
Method = Literal["sequential", "chunked", "pallas"]
_METHODS = ("sequential", "chunked", "pallas")


@jaxtyped(typechecker=beartype)
def omega_scan(
    memory: AbstractMemory,
    q: Float[Array | np.ndarray, "T d_k"],
    k: Float[Array | np.ndarray, "T d_k"],
    v: Float[Array | np.ndarray, "T d_v"],
    lr: Vector,
    decay: Vector,
    momentum: Vector | None = None,
    gamma: Vector | Float[Array | np.ndarray, "T c"] | None = None,
    *,
    feature_map: fm.AbstractFeatureMap = fm.Identity(),
    objective: Callable[..., Scalar] = l2,
    optimizer: iopt.InnerOptimizer | optax.GradientTransformation = iopt.gd(),
    window: int = 1,
    chunk_size: int = 1,
    method: Method = "sequential",
    block_size: int | None = None,
    state: OmegaState | None = None,
    decay_first: bool = False,
    muon_per_chunk: bool = False,
    check_values: bool = True,
) -> tuple[Float[Array, "T d_v"], OmegaState]:
    r"""Stream one sequence through a test-time memory trained by the Omega rule (ATLAS Eqs 9-10, 32-33).

    For each token $t$, with the window $i = t-c+1, \dots, t$ and the gradient anchor $W_s$
    (the weights after the previous chunk of `chunk_size` tokens; $W_{t-1}$ when `chunk_size=1`):

    $$g_t = \nabla_W\sum_{i}\gamma_{t,i}\,\mathrm{objective}(\mathcal M(\phi(k_i); W), v_i)\Big|_{W_s}$$
    $$S_t = \theta_t S_{t-1} + g_t,\qquad W_t = \alpha_t W_{t-1} - \eta_t P(S_t),\qquad
    y_t = \mathcal M(\phi(q_t); W_t)\ \text{(read after write)}.$$

    **Arguments:**

    - `memory`: the memory $\mathcal M$; its weights are $W_0$ (ignored when `state` is given).
    - `q`, `k`: queries and keys, `(T, d_k)`; `v`: values, `(T, d_v)`. One head, one sequence:
      `jax.vmap` for batches and heads.
    - `lr`: $\eta_t \geq 0$, `(T,)`. `decay`: the retention $\alpha_t \in [0, 1]$, `(T,)`.
    - `momentum`: $\theta_t \in [0, 1]$, `(T,)`, for learners with momentum; `None` means 0.
    - `gamma`: window gates in $[0, 1]$: `(T,)` per written token ($\gamma_{t,i} = \gamma_i$,
      carried with the window), or `(T, c)` per step and offset ($\gamma_{t,t-j}$ =
      `gamma[t, j]`, digest A-8 (c)). `None` means 1.
    - `feature_map`: $\phi$, applied to keys and queries; `feature_map.out_dim(d_k)` must equal
      `memory.d_in`.
    - `objective`: the attentional bias, `objective(prediction, target) -> scalar`.
    - `optimizer`: the inner learner (`optimizers.gd()`, `momentum()`, `muon()`, ...). An
      optax transformation runs as the inner learner once wrapped by
      `optimizers.from_optax(...)`; passed bare it is an error that says so.
    - `window`: $c \geq 1$. `chunk_size`: $b \geq 1$; within a chunk every gradient is taken at
      the chunk-start weights, and window tokens from the previous chunk are re-evaluated there.
      `chunk_size` is part of the model (the paper's mini-batch $b$; 1 is the token-by-token
      rule), never a speed setting: every `method` and `block_size` computes the same function.
    - `method`: `"sequential"` (the oracle), `"chunked"` or `"pallas"` (the chunk loop as a
      Pallas kernel for `LinearMemory` and `MLPMemory` with GD, momentum or Muon, and the
      block loop of the exact form, `decay_first` included, for a linear memory under GD; interpret
      mode on CPU, Triton on GPU, Mosaic on TPU; gradients through the chunked path; see
      `atlas_eqx._pallas`).
    - `block_size`: how many steps the chunked and Pallas paths process together where an
      exact chunk-parallel form exists: a `LinearMemory` under plain GD with `l2` or `dot`, any
      `chunk_size`, window, gates and `decay_first` (the UT transform of the delta rule,
      `atlas_eqx._exact_chunked`; rounded up to a multiple of `chunk_size`; `None` is its
      measured default). A speed setting only. Other learners and memories (momentum, Muon,
      MLP memories, other objectives) have no such form: the chunked path processes one model
      chunk of `chunk_size` tokens at a time and ignores `block_size`.
    - `state`: an `OmegaState` returned by a previous call; splitting a sequence at a chunk
      boundary into two calls equals one call.
    - `decay_first`: take gradients at $(\prod_{j=s+1}^{t}\alpha_j)W_s$ instead of $W_s$
      (Gated DeltaNet's order; digest I-12).
    - `muon_per_chunk`: with `method="chunked"`, apply Newton-Schulz once per chunk to the
      chunk-end momentum and read inside a chunk from the decayed chunk-start weights (an
      approximation for speed, digest A-13 (i); see `atlas_eqx._chunked`). Its gradients are
      exact, but with large chunks and step sizes the recurrence it defines can be expanding,
      so outer gradients grow exponentially with T (`MemoryLayerConfig`, `muon_per_chunk`).
    - `check_values`: check at run time (with `eqx.error_if`, also under `jit`) that `q`, `k`,
      `v` are finite and every gate lies in its range. Shapes and static options are always
      checked. Models whose gates are in range by construction (sigmoids, as in
      `MemoryLayer`) pass `False`: the check's host callback keeps JAX's persistent
      compilation cache from storing the compiled program.

    **Returns:** `(y, state)` with `y` of shape `(T, d_v)`.
    """
    T, d_k = q.shape
    d_v = v.shape[1]
    if T == 0:
        raise ValueError("omega_scan: `q` is empty (T = 0); a sequence needs at least one token")
    if not isinstance(optimizer, iopt.InnerOptimizer):
        raise TypeError(
            "omega_scan: `optimizer` is an optax.GradientTransformation, not an inner learner; "
            "wrap it: optimizer=optimizers.from_optax(transformation). The per-token eta_t and "
            "alpha_t then scale and decay its updates (see optimizers.from_optax)"
        )
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"omega_scan: `window` (c) must be an integer >= 1; got {window!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(
            f"omega_scan: `chunk_size` (b) must be an integer >= 1; got {chunk_size!r}"
        )
    if method not in _METHODS:
        raise ValueError(f"omega_scan: `method` must be one of {_METHODS}; got {method!r}")
    if block_size is not None and (
        not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1
    ):
        raise ValueError(
            f"omega_scan: `block_size` must be an integer >= 1 or None; got {block_size!r}"
        )
    d_features = feature_map.out_dim(d_k)
    if d_features != memory.d_in:
        raise ValueError(
            f"omega_scan: `memory` takes inputs of dimension d_in={memory.d_in}, but "
            f"`feature_map` maps keys of dimension d_k={d_k} to {d_features} features; "
            f"build the memory with d_in=feature_map.out_dim(d_k)={d_features}"
        )
    if d_v != memory.d_out:
        raise ValueError(f"omega_scan: `v` has d_v={d_v} but `memory` outputs d_out={memory.d_out}")
    _check_parts(memory if state is None else state.memory, feature_map, q)
    if gamma is not None and gamma.ndim == 2 and gamma.shape[1] != window:
        raise ValueError(
            f"omega_scan: per-step `gamma` must have shape (T, window) = ({T}, {window}); "
            f"got {gamma.shape}"
        )
    if momentum is not None and not optimizer.uses_momentum:
        raise ValueError(
            "omega_scan: `momentum` was given but `optimizer` has no momentum buffer "
            "(use optimizers.momentum() or optimizers.muon(), or pass momentum=None)"
        )
    if muon_per_chunk and method != "chunked":
        raise ValueError("omega_scan: `muon_per_chunk=True` needs method='chunked'")
    if muon_per_chunk and (
        not optimizer.uses_momentum or optimizer.precondition is iopt.no_precondition
    ):
        raise ValueError(
            "omega_scan: `muon_per_chunk=True` needs a Muon learner (momentum and a "
            "Newton-Schulz preconditioner, e.g. optimizers.muon())"
        )
    if muon_per_chunk and decay_first:
        raise ValueError("omega_scan: `muon_per_chunk=True` does not support `decay_first=True`")
    step_factor, constant_momentum = 1.0, None
    if method != "sequential" and optimizer.precondition is None:
        equivalent = iopt.linear_equivalent(optimizer)
        if equivalent is None:
            raise ValueError(
                f"omega_scan: the inner learner {iopt.describe(optimizer)} has no chunked "
                f"form, so method={method!r} cannot run it. The fast paths carry one momentum "
                "buffer S_t and take steps along it; they run optax learners whose update is "
                "linear in the gradient with a constant momentum (optax.sgd with or without "
                "momentum or Nesterov, optax.trace). This one is not (adaptive, clipped, "
                "weight- or step-dependent). Pass method='sequential' to run it as it is."
            )
        optimizer, step_factor, theta = equivalent
        if optimizer.uses_momentum:
            constant_momentum = theta
        if state is not None and not _state_fits(state, optimizer):
            equivalent_name = "momentum()" if optimizer.uses_momentum else "gd()"
            raise ValueError(
                f"omega_scan: `state` holds another learner's state; method={method!r} runs "
                f"this optax learner as optimizers.{equivalent_name}, whose state "
                f"init_omega_state(memory, optimizers.{equivalent_name}) or a call with the "
                "same method returns (method='sequential' carries the optax state instead)"
            )
    elif state is not None and not _state_fits(state, optimizer):
        held = type(state.optimizer_state).__name__
        expected = type(_fresh_optimizer_state(state, optimizer)).__name__
        raise ValueError(
            f"omega_scan: `state` was made for another inner learner: its optimizer_state is "
            f"a {held}, `optimizer` ({iopt.describe(optimizer)}) keeps a {expected}. Start "
            "from init_omega_state(memory, optimizer, window), or pass the state a call with "
            "this optimizer returned"
        )
    exact = has_exact_form(memory if state is None else state.memory, optimizer, objective)
    if method == "pallas" and not exact:
        check_pallas_supported(
            memory if state is None else state.memory,
            optimizer,
            objective,
            decay_first=decay_first,
            backend=resolve_backend(),
        )
    if state is None:
        state = init_omega_state(memory, optimizer, window)
    elif state.window_features.shape != (window - 1, memory.d_in):
        raise ValueError(
            f"omega_scan: `state` carries {state.window_features.shape[0]} window tokens of "
            f"dimension {state.window_features.shape[1]}, but window={window} needs "
            f"{window - 1} of dimension {memory.d_in}"
        )

    dtype = jnp.result_type(*jax.tree.leaves(eqx.filter(state.memory, eqx.is_inexact_array)))
    q, k, v, lr, decay = (jnp.asarray(x, dtype) for x in (q, k, v, lr, decay))
    momentum = jnp.zeros((T,), dtype) if momentum is None else jnp.asarray(momentum, dtype)
    gamma = jnp.ones((T,), dtype) if gamma is None else jnp.asarray(gamma, dtype)
    if check_values:
        lr = _check_inputs(q, k, v, lr, decay, momentum, gamma)
    if step_factor != 1.0:
        lr = lr * step_factor
    if constant_momentum is not None:
        momentum = jnp.full((T,), constant_momentum, dtype)

    inputs = ScanInputs(feature_map(q), feature_map(k), v, lr, decay, momentum, gamma)
    rule = ScanRule(
        objective=objective,
        optimizer=optimizer,
        window=window,
        chunk_size=chunk_size,
        decay_first=decay_first,
        muon_per_chunk=muon_per_chunk,
        block_size=block_size,
    )
    if method == "sequential":
        return sequential_scan(state, inputs, rule)
    if exact:
        scan = _exact_pallas_scan_jit if method == "pallas" else _exact_linear_scan_jit
        return scan(state, inputs, rule)
    if method == "pallas":
        return _pallas_scan_jit(state, inputs, rule)
    return _chunked_scan_jit(state, inputs, rule)


def _fresh_optimizer_state(state: OmegaState, optimizer: iopt.InnerOptimizer):
    """The structure `optimizer.init` gives for `state`'s weights, without allocating it."""
    return jax.eval_shape(optimizer.init, eqx.filter(state.memory, eqx.is_inexact_array))


def _state_fits(state: OmegaState, optimizer: iopt.InnerOptimizer) -> bool:
    expected = _fresh_optimizer_state(state, optimizer)
    return jax.tree.structure(state.optimizer_state) == jax.tree.structure(expected)


def _check_parts(
    memory: AbstractMemory, feature_map: fm.AbstractFeatureMap, q: Array | np.ndarray
) -> None:
    """What the feature map and the memory really return (shapes only, no computation)
    against what they declare (`out_dim`, `d_out`)."""
    declared = feature_map.out_dim(q.shape[1])
    features = jax.eval_shape(feature_map, jax.ShapeDtypeStruct(q.shape, q.dtype))
    if features.shape != (q.shape[0], declared):
        raise ValueError(
            f"omega_scan: `feature_map` ({type(feature_map).__name__}) declares "
            f"out_dim({q.shape[1]}) = {declared} but maps `q` of shape {q.shape} to "
            f"{features.shape}; make out_dim agree with __call__"
        )
    output = jax.eval_shape(memory, jax.ShapeDtypeStruct((memory.d_in,), q.dtype))
    if getattr(output, "shape", None) != (memory.d_out,):
        raise ValueError(
            f"omega_scan: `memory` ({type(memory).__name__}) declares d_out={memory.d_out} "
            f"but maps one input of dimension d_in={memory.d_in} to shape "
            f"{getattr(output, 'shape', type(output).__name__)}; make d_out agree with __call__"
        )


_chunked_scan_jit = eqx.filter_jit(chunked_scan)
_exact_linear_scan_jit = eqx.filter_jit(exact_linear_scan)
_exact_pallas_scan_jit = eqx.filter_jit(exact_pallas_scan)
_pallas_scan_jit = eqx.filter_jit(pallas_scan)


def _check_inputs(q, k, v, lr, decay, momentum, gamma) -> Array:
    """`lr`, behind one run-time check of every input (`eqx.branched_error_if`).

    One check (one `lax.cond` and host callback) instead of one per array: the seven separate
    `eqx.error_if`s cost about 1 ms of an 8 ms chunked scan at T = 8192. The message is the
    first failing one's. The result is `lr`, the smallest input every form reads, so the check
    cannot be removed as dead code.
    """
    finite = [(q, "q"), (k, "k"), (v, "v")]
    ranges = [
        (lr, "lr", "eta_t", 0.0, None),
        (decay, "decay", "alpha_t", 0.0, 1.0),
        (momentum, "momentum", "theta_t", 0.0, 1.0),
        (gamma, "gamma", "gamma", 0.0, 1.0),
    ]
    # x * 0 is 0 where x is finite and NaN where it is not, so its sum cannot overflow; a float
    # reduction, which XLA:CPU runs about twice as fast as the boolean `all(isfinite(x))`.
    failed = [~jnp.isfinite(jnp.sum(x * 0)) for x, _ in finite]
    messages = [f"omega_scan: `{name}` contains NaN or inf" for _, name in finite]
    for x, name, symbol, low, high in ranges:
        inside = x >= low if high is None else (x >= low) & (x <= high)
        expected = f">= {low}" if high is None else f"in [{low}, {high}]"
        failed.append(~jnp.all(inside))
        messages.append(f"omega_scan: `{name}` ({symbol}) must be {expected} (and not NaN)")
    failures = jnp.stack(failed)
    return eqx.branched_error_if(lr, jnp.any(failures), jnp.argmax(failures), messages)
