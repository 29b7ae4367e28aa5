"""Shared pieces of the `omega_scan` tests: input generators and an independent naive reference.

The reference (`naive_omega`) is written from DESIGN.md's rule, not from `_sequential.py`: a
plain Python loop over tokens, one `jax.grad` per *window token* (the oracle sums a vmapped
window loss instead), explicit per-token gate lookup, NumPy arithmetic for momentum, retention
and the step, `optimizers.newton_schulz` per 2-D weight for Muon, and read after write. Chunk
boundaries are an explicit set of token indices, so the same loop also describes a prefill
followed by single-token decode steps (digest I-40).
"""

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import atlas_eqx as ae
import feature_maps as fm
import optimizers as iopt


OPTIMIZERS: dict[str, iopt.InnerOptimizer] = {
    "gd": iopt.gd(),
    "momentum": iopt.momentum(),
    "muon": iopt.muon(),
    "muon_eta_inside": iopt.muon(eta_inside_ns=True),
}
MEMORY_KINDS = ("linear", "mlp", "gated")


def make_memory(kind: str, d_in: int, d_out: int, seed: int, **kwargs: Any) -> ae.AbstractMemory:
    """A small memory of the given kind (hidden width 4 for the MLPs so compiles stay cheap)."""
    key = jax.random.PRNGKey(seed)
    if kind == "linear":
        return ae.LinearMemory(d_in, d_out, key=key, **kwargs)
    if kind == "mlp":
        return ae.MLPMemory(d_in, d_out, key=key, **{"hidden": 4, **kwargs})
    if kind == "gated":
        return ae.GatedMLPMemory(d_in, d_out, key=key, **{"hidden": 4, **kwargs})
    raise ValueError(kind)


@dataclass
class Inputs:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    lr: np.ndarray
    decay: np.ndarray
    momentum: np.ndarray | None
    gamma: np.ndarray | None

    @property
    def T(self) -> int:
        return self.q.shape[0]

    def arrays(self) -> tuple[Any, ...]:
        return (self.q, self.k, self.v, self.lr, self.decay, self.momentum, self.gamma)

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> "Inputs":
        """Apply `fn` to every array (the optional gates stay None)."""
        return self.merge(self, lambda a, _: fn(a))

    def merge(
        self, other: "Inputs", fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
    ) -> "Inputs":
        """Combine two inputs of the same layout field by field."""

        def both(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            if a is None or b is None:
                assert a is None and b is None
                return None
            return fn(a, b)

        return Inputs(
            fn(self.q, other.q),
            fn(self.k, other.k),
            fn(self.v, other.v),
            fn(self.lr, other.lr),
            fn(self.decay, other.decay),
            both(self.momentum, other.momentum),
            both(self.gamma, other.gamma),
        )


def make_inputs(
    seed: int,
    T: int,
    d_k: int,
    d_v: int,
    *,
    window: int = 1,
    gate_kind: str = "token",
    with_momentum: bool = False,
    edges: bool = False,
    lr_max: float = 0.5,
) -> Inputs:
    """Random float64 inputs with gates in range; `edges=True` sets some gates to exactly 0 or 1.

    `gate_kind` is "none" (gamma=None), "token" (shape (T,)) or "step" (shape (T, window)).
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, d_k)) / np.sqrt(d_k)
    k = rng.standard_normal((T, d_k)) / np.sqrt(d_k)
    v = rng.standard_normal((T, d_v))
    lr = rng.uniform(0.0, lr_max, T)
    decay = rng.uniform(0.6, 1.0, T)
    momentum = rng.uniform(0.0, 0.9, T) if with_momentum else None
    if gate_kind == "none":
        gamma = None
    elif gate_kind == "token":
        gamma = rng.uniform(0.0, 1.0, T)
    elif gate_kind == "step":
        gamma = rng.uniform(0.0, 1.0, (T, window))
    else:
        raise ValueError(gate_kind)
    if edges:
        snap_gates_to_edges(rng, lr, (decay, momentum, gamma), one_above=0.8)
    return Inputs(q, k, v, lr, decay, momentum, gamma)


def snap_gates_to_edges(
    rng: np.random.Generator,
    lr: np.ndarray,
    unit_gates: tuple[np.ndarray | None, ...],
    *,
    one_above: float,
) -> None:
    """In place: about 20% of every gate to exactly 0, and of the [0, 1] gates some to exactly 1."""
    for gate in (lr, *unit_gates):
        if gate is None:
            continue
        pick = rng.uniform(size=gate.shape)
        gate[pick < 0.2] = 0.0
        if gate is not lr:
            gate[pick > one_above] = 1.0


def split_params(memory: ae.AbstractMemory) -> tuple[list[np.ndarray], Callable]:
    """The memory's fast weights as a list of NumPy arrays, and the inverse map."""
    params, static = eqx.partition(memory, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)

    def rebuild(new_leaves: list[np.ndarray]) -> ae.AbstractMemory:
        tree = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in new_leaves])
        return eqx.combine(tree, static)

    return [np.asarray(x, np.float64) for x in leaves], rebuild


@eqx.filter_jit
def token_grad(memory, x, v, objective):
    """d/dW objective(M(x; W), v), one token: the leaves of `memory`'s fast weights."""
    grads = eqx.filter_grad(lambda m: objective(m(x), v))(memory)
    return jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))


_newton_schulz = jax.jit(iopt.newton_schulz, static_argnames=("steps", "coefficients", "eps"))


@eqx.filter_jit
def read_memory(memory, x):
    return memory(x)


def weight_leaves(memory: ae.AbstractMemory) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(memory, eqx.is_inexact_array))]


def linear_weight(memory: ae.AbstractMemory) -> np.ndarray:
    assert isinstance(memory, ae.LinearMemory)
    return np.asarray(memory.weight)


def chunk_starts(T: int, chunk_size: int) -> set[int]:
    return {t for t in range(T) if t % chunk_size == 0}


def naive_omega(
    memory: ae.AbstractMemory,
    x: Inputs,
    *,
    feature_map: fm.AbstractFeatureMap = fm.Identity(),
    objective: Callable = ae.l2,
    optimizer: str = "gd",
    window: int = 1,
    starts: Collection[int] = frozenset({0}),
    decay_first: bool = False,
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """DESIGN.md's rule, token by token, gradients at a frozen anchor per chunk.

    A token `t` in `starts` opens a chunk: the anchor becomes the weights after token `t - 1`.
    Returns `(y, final weight leaves, final momentum leaves)`.
    """
    W, rebuild = split_params(memory)
    S = [np.zeros_like(w) for w in W]
    phi_q = np.asarray(feature_map(jnp.asarray(x.q)))
    phi_k = np.asarray(feature_map(jnp.asarray(x.k)))
    T = x.q.shape[0]
    theta = np.zeros(T) if x.momentum is None else x.momentum
    anchor, anchor_decay = W, 1.0
    ys = []
    for t in range(T):
        if t in starts:
            anchor, anchor_decay = [w.copy() for w in W], 1.0
        anchor_decay *= x.decay[t]
        base = [anchor_decay * a for a in anchor] if decay_first else anchor
        base_memory = rebuild(base)
        g = [np.zeros_like(w) for w in W]
        for j in range(min(window, t + 1)):  # token i = t - j, j = 0 is the newest
            i = t - j
            if x.gamma is None:
                gate = 1.0
            elif x.gamma.ndim == 1:
                gate = x.gamma[i]  # per written token
            else:
                gate = x.gamma[t, j]  # per step and offset
            grads = token_grad(base_memory, jnp.asarray(phi_k[i]), jnp.asarray(x.v[i]), objective)
            g = [gi + gate * np.asarray(dg) for gi, dg in zip(g, grads, strict=True)]
        eta, alpha = x.lr[t], x.decay[t]
        if optimizer == "gd":
            step = g
        elif optimizer == "momentum":
            S = [theta[t] * s + gi for s, gi in zip(S, g, strict=True)]
            step = S
        elif optimizer in ("muon", "muon_eta_inside"):
            if optimizer == "muon_eta_inside":
                S = [theta[t] * s + eta * gi for s, gi in zip(S, g, strict=True)]
                eta = 1.0
            else:
                S = [theta[t] * s + gi for s, gi in zip(S, g, strict=True)]
            step = [np.asarray(_newton_schulz(jnp.asarray(s), steps=5)) for s in S]
        else:
            raise ValueError(optimizer)
        W = [alpha * w - eta * p for w, p in zip(W, step, strict=True)]
        ys.append(np.asarray(read_memory(rebuild(W), jnp.asarray(phi_q[t]))))
    return np.stack(ys), W, S


def assert_close(actual: Any, desired: Any, *, rtol: float = 1e-10, atol: float = 1e-10) -> None:
    """Leafwise `np.testing.assert_allclose` over two pytrees with the same structure."""
    a_leaves, a_def = jax.tree.flatten(actual)
    d_leaves, d_def = jax.tree.flatten(desired)
    assert a_def == d_def, (a_def, d_def)
    for a, d in zip(a_leaves, d_leaves, strict=True):
        a, d = np.asarray(a), np.asarray(d)
        if a.dtype == bool or d.dtype == bool:
            np.testing.assert_array_equal(a, d)
        else:
            np.testing.assert_allclose(a, d, rtol=rtol, atol=atol)


def momentum_leaves(state: ae.OmegaState) -> list[np.ndarray]:
    """The momentum buffer S of a `momentum()` / `muon()` state, as NumPy leaves."""
    return [np.asarray(x) for x in jax.tree.leaves(state.optimizer_state)]
