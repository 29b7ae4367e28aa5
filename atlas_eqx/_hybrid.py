r"""Hybrids of sliding-window attention and a memory layer (Titans §4.2-4.3, ATLAS §5.1).

- MAG, memory as a gate (Titans Eqs 26-28; gate of digest A-17):
  $o = W_o\big(\mathrm{norm}_1(\mathrm{SWA}^*(\tilde x))\odot\sigma(\mathrm{norm}_2(\mathcal M(\tilde x)))\big)$.
- MAL, memory as a layer (Titans Eqs 29-31): $o = \mathrm{SWA}^*(\mathcal M(\tilde x))$.

$\tilde x = [p_1..p_{N_p}]\,\|\,x$ prepends $N_p$ learned persistent tokens (Titans Eq 19). The
memory reads them as a prefix of every sequence (a first `stream` call, so its chunks start
again at $x_1$); the attention sees the persistent tokens (MAG) or the memory's outputs at
them (MAL) as keys visible from every position, whatever the window, without a position
(the "SW-Attn*" of Titans Eq 27).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._attention import AttentionLayer, AttentionState
from ._layer import _rms_norm, MemoryLayer, MemoryLayerState
from ._mixer import AbstractMixer


class HybridState(eqx.Module):
    """The streaming state of a `MAGLayer` / `MALLayer`.

    - `attention`: the attention's KV cache.
    - `memory`: the memory layer's state (after the persistent prefix).
    - `persistent_keys`: the tokens the attention sees at every position, `(N_p, d_model)`:
      the persistent tokens (MAG) or the memory's outputs at them (MAL); `None` if $N_p = 0$.
    """

    attention: AttentionState
    memory: MemoryLayerState
    persistent_keys: Float[Array, "n_persistent d_model"] | None


def _with_persistent(attention: AttentionLayer, tokens: Array | None) -> AttentionLayer:
    if tokens is None:
        return attention
    return eqx.tree_at(lambda a: a.persistent, attention, tokens, is_leaf=lambda x: x is None)


def _check_input(name: str, x: Array, d_model: int) -> None:
    if x.ndim != 2 or x.shape[1] != d_model:
        raise ValueError(
            f"{name}: `x` must have shape (T, d_model={d_model}) (one sequence; jax.vmap for a "
            f"batch); got {x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: `x` is empty (T = 0); a sequence needs at least one token")


def _check_parts(name: str, attention: AttentionLayer, memory: MemoryLayer, n_persistent: int):
    if not isinstance(attention, AttentionLayer) or not isinstance(memory, MemoryLayer):
        raise ValueError(f"{name}: needs an AttentionLayer and a MemoryLayer")
    if attention.d_model != memory.d_model:
        raise ValueError(
            f"{name}: the attention (d_model={attention.d_model}) and the memory "
            f"(d_model={memory.d_model}) must have the same width"
        )
    if attention.persistent is not None:
        raise ValueError(
            f"{name}: build the attention with n_persistent=0; the hybrid owns the persistent "
            f"tokens (n_persistent={n_persistent})"
        )
    if not isinstance(n_persistent, int) or n_persistent < 0:
        raise ValueError(f"{name}: `n_persistent` must be an integer >= 0; got {n_persistent!r}")


class MAGLayer(AbstractMixer):
    r"""Memory as a gate (Titans Eqs 26-28, ATLAS §5.1): two branches on the same input,

    $$o = W_o\Big(\mathrm{RMSNorm}_{g_1}(\mathrm{SWA}^*(\tilde x))\odot
    \sigma\big(\mathrm{RMSNorm}_{g_2}(\mathcal M(\tilde x))\big)\Big),$$

    with learnable vector scales $g_1, g_2$ (digest A-17: "normalize the outputs $y$ and
    $\mathcal M(\tilde x)$ using learnable vector-valued weights, followed by a non-linearity").
    Streaming equals `__call__` under the memory layer's chunking conditions.
    """

    attention: AttentionLayer
    memory: MemoryLayer
    persistent: Float[Array, "n_persistent d_model"] | None
    attention_scale: Float[Array, " d_model"]
    memory_scale: Float[Array, " d_model"]
    out_proj: Float[Array, "d_model d_model"]
    d_model: int = eqx.field(static=True)
    n_persistent: int = eqx.field(static=True)
    norm_eps: float = eqx.field(static=True)

    def __init__(
        self,
        attention: AttentionLayer,
        memory: MemoryLayer,
        *,
        key: PRNGKeyArray,
        n_persistent: int = 0,
        norm_eps: float = 1e-6,
    ):
        """**Arguments:**

        - `attention`: the sliding-window branch (an `AttentionLayer`, `n_persistent=0`).
        - `memory`: the memory branch (a `MemoryLayer` of the same `d_model`).
        - `key`: a JAX PRNG key for the persistent tokens and the output projection.
        - `n_persistent`: $N_p \\ge 0$ learned persistent tokens, $\\mathcal N(0, 1)$.
        - `norm_eps`: the $\\epsilon$ of both RMSNorms.
        """
        _check_parts("MAGLayer", attention, memory, n_persistent)
        d = attention.d_model
        kp, ko = jax.random.split(key)
        self.attention = attention
        self.memory = memory
        self.persistent = jax.random.normal(kp, (n_persistent, d)) if n_persistent else None
        self.attention_scale = jnp.ones((d,))
        self.memory_scale = jnp.ones((d,))
        bound = 1.0 / d**0.5
        self.out_proj = jax.random.uniform(ko, (d, d), minval=-bound, maxval=bound)
        self.d_model = d
        self.n_persistent = n_persistent
        self.norm_eps = norm_eps

    def _memory_state(self, max_length: int) -> MemoryLayerState:
        state = self.memory.init_state(max_length + self.n_persistent)
        if self.persistent is not None:
            _, state = self.memory.stream(self.persistent, state)
        return state

    def _combine(
        self, y: Float[Array, "T d_model"], m: Float[Array, "T d_model"]
    ) -> Float[Array, "T d_model"]:
        gate = jax.nn.sigmoid(_rms_norm(m, self.memory_scale.astype(m.dtype), self.norm_eps))
        o = _rms_norm(y, self.attention_scale.astype(y.dtype), self.norm_eps) * gate
        return o @ self.out_proj.T.astype(o.dtype)

    def __call__(self, x: Float[Array, "T d_model"]) -> Float[Array, "T d_model"]:
        """The whole sequence, `(T, d_model) -> (T, d_model)`."""
        _check_input("MAGLayer", x, self.d_model)
        y = _with_persistent(self.attention, self.persistent)(x)
        m, _ = self.memory.stream(x, self._memory_state(x.shape[0]))
        return self._combine(y, m)

    def init_state(self, max_length: int) -> HybridState:
        """Empty KV cache, and the memory after reading the persistent prefix."""
        return HybridState(
            attention=self.attention.init_state(max_length),
            memory=self._memory_state(max_length),
            persistent_keys=self.persistent,
        )

    def stream(
        self, x: Float[Array, "T d_model"], state: HybridState
    ) -> tuple[Float[Array, "T d_model"], HybridState]:
        """The next `x` of a stream."""
        _check_input("MAGLayer", x, self.d_model)
        attention = _with_persistent(self.attention, state.persistent_keys)
        y, attention_state = attention.stream(x, state.attention)
        m, memory_state = self.memory.stream(x, state.memory)
        new_state = HybridState(attention_state, memory_state, state.persistent_keys)
        return self._combine(y, m), new_state


class MALLayer(AbstractMixer):
    r"""Memory as a layer (Titans Eqs 29-31, ATLAS §5.1): $y = \mathcal M(\tilde x)$,
    $o = \mathrm{SWA}^*(y)$, an H3-like stack of the memory layer and sliding-window
    attention. The attention's always-visible keys are the memory's outputs at the persistent
    tokens. Streaming equals `__call__` under the memory layer's chunking conditions.
    """

    memory: MemoryLayer
    attention: AttentionLayer
    persistent: Float[Array, "n_persistent d_model"] | None
    d_model: int = eqx.field(static=True)
    n_persistent: int = eqx.field(static=True)

    def __init__(
        self,
        memory: MemoryLayer,
        attention: AttentionLayer,
        *,
        key: PRNGKeyArray,
        n_persistent: int = 0,
    ):
        """**Arguments:**

        - `memory`: the first layer (a `MemoryLayer`).
        - `attention`: the second (an `AttentionLayer` of the same `d_model`, `n_persistent=0`).
        - `key`: a JAX PRNG key for the persistent tokens.
        - `n_persistent`: $N_p \\ge 0$ learned persistent tokens, $\\mathcal N(0, 1)$.
        """
        _check_parts("MALLayer", attention, memory, n_persistent)
        self.memory = memory
        self.attention = attention
        d = memory.d_model
        self.persistent = jax.random.normal(key, (n_persistent, d)) if n_persistent else None
        self.d_model = d
        self.n_persistent = n_persistent

    def _memory_start(self, max_length: int) -> tuple[MemoryLayerState, Array | None]:
        state = self.memory.init_state(max_length + self.n_persistent)
        if self.persistent is None:
            return state, None
        outputs, state = self.memory.stream(self.persistent, state)
        return state, outputs

    def __call__(self, x: Float[Array, "T d_model"]) -> Float[Array, "T d_model"]:
        """The whole sequence, `(T, d_model) -> (T, d_model)`."""
        _check_input("MALLayer", x, self.d_model)
        memory_state, persistent_keys = self._memory_start(x.shape[0])
        y, _ = self.memory.stream(x, memory_state)
        return _with_persistent(self.attention, persistent_keys)(y)

    def init_state(self, max_length: int) -> HybridState:
        """Empty KV cache, and the memory after reading the persistent prefix."""
        memory_state, persistent_keys = self._memory_start(max_length)
        return HybridState(
            attention=self.attention.init_state(max_length),
            memory=memory_state,
            persistent_keys=persistent_keys,
        )

    def stream(
        self, x: Float[Array, "T d_model"], state: HybridState
    ) -> tuple[Float[Array, "T d_model"], HybridState]:
        """The next `x` of a stream."""
        _check_input("MALLayer", x, self.d_model)
        y, memory_state = self.memory.stream(x, state.memory)
        attention = _with_persistent(self.attention, state.persistent_keys)
        o, attention_state = attention.stream(y, state.attention)
        return o, HybridState(attention_state, memory_state, state.persistent_keys)
