r"""Causal softmax attention with RoPE (the Transformer++ / Llama mixer), sliding windows,
persistent tokens (Titans Eq 19) and a KV-cache for streaming.

$$\mathrm{Attn}(Q, K, V)_t = \sum_{i\in\mathcal V(t)}
\frac{\exp(q_t^\top k_i/\sqrt{d_h})}{\sum_{j\in\mathcal V(t)}\exp(q_t^\top k_j/\sqrt{d_h})}\,v_i,
\qquad \mathcal V(t) = \{i : t - w < i \le t\}$$

(ATLAS Eq 17-18 for the window $w$; $w = \infty$ is causal attention).

Optionally (`conv_size` $= K > 0$) the projected q, k and v pass through the same causal
depthwise convolution as a memory layer's (`causal_depthwise_conv`, Titans §4.4), before RoPE.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jaxtyping import Array, Bool, Float, Int, jaxtyped, PRNGKeyArray

from ._layer import causal_depthwise_conv
from ._mixer import AbstractMixer


@jaxtyped(typechecker=beartype)
def rope(
    x: Float[Array, "T *heads d"],
    positions: Int[Array | np.ndarray, " T"],
    base: float = 10000.0,
) -> Float[Array, "T *heads d"]:
    r"""Rotary position embedding (RoFormer Eq 34), in the rotate-half (GPT-NeoX / Llama) layout.

    The feature pairs are $(x_j, x_{j+d/2})$, $j < d/2$, rotated by the angle
    $m\,\theta_j$ with $\theta_j = \mathrm{base}^{-2j/d}$ at position $m$:

    $$\mathrm{rope}(x, m) = x\odot\cos(m\theta) + \mathrm{rotate\_half}(x)\odot\sin(m\theta),\qquad
    \mathrm{rotate\_half}([x_1; x_2]) = [-x_2; x_1].$$

    So $\langle\mathrm{rope}(q, m), \mathrm{rope}(k, n)\rangle$ depends on $m - n$ only, and
    norms are preserved. `x` is `(T, *heads, d)` with `d` even; `positions` is `(T,)`.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rope: the last dimension of `x` (head_dim) must be even; got {d}")
    half = d // 2
    frequencies = base ** (-jnp.arange(half, dtype=x.dtype) * 2 / d)
    angles = jnp.asarray(positions, x.dtype)[:, None] * frequencies  # (T, d/2)
    angles = angles.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (half,))
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


@jaxtyped(typechecker=beartype)
def causal_attention(
    q: Float[Array | np.ndarray, "T heads d"],
    k: Float[Array | np.ndarray, "S heads d"],
    v: Float[Array | np.ndarray, "S heads d_v"],
    *,
    window: int | None = None,
    scale: float | None = None,
    query_positions: Int[Array | np.ndarray, " T"] | None = None,
    key_positions: Int[Array | np.ndarray, " S"] | None = None,
    key_valid: Bool[Array | np.ndarray, " S"] | None = None,
    persistent_keys: Float[Array | np.ndarray, "P heads d"] | None = None,
    persistent_values: Float[Array | np.ndarray, "P heads d_v"] | None = None,
    persistent_queries: Float[Array | np.ndarray, "T heads d"] | None = None,
) -> Float[Array, "T heads d_v"]:
    r"""Masked softmax attention, written with explicit masks (ATLAS Eqs 17-18, Titans Eq 19).

    $y_t = \sum_i p_{t,i}v_i$ with $p_t = \mathrm{softmax}$ over the logits
    $\sigma\,q_t^\top k_i$ of the visible keys: key $i$ is visible from query $t$ when
    `key_valid[i]`, $n_i \le m_t$ and $m_t - n_i < w$ (positions $m$, $n$; `window` $= w$,
    `None` for $\infty$). Persistent keys (if given) are visible from every query, with logits
    $\sigma\,\tilde q_t^\top p_j$ against `persistent_queries` $\tilde q$ (default `q`), and share
    the softmax normaliser.

    **Arguments:**

    - `q`: `(T, heads, d)`; `k`: `(S, heads, d)`; `v`: `(S, heads, d_v)` (one sequence;
      `jax.vmap` for a batch).
    - `window`: $w \ge 1$ or `None`. `scale`: $\sigma$, `None` means $1/\sqrt d$.
    - `query_positions`, `key_positions`: default `arange(T)` and `arange(S)`.
    - `key_valid`: which keys exist (e.g. filled KV-cache slots); default all.
    - `persistent_keys`, `persistent_values`: `(P, heads, d)` and `(P, heads, d_v)`, or `None`.
    - `persistent_queries`: the queries scored against the persistent keys, `(T, heads, d)`.

    Every query must see at least one key (its own, for self-attention).
    """
    T, S = q.shape[0], k.shape[0]
    if window is not None and (
        not isinstance(window, int) or isinstance(window, bool) or window < 1
    ):
        raise ValueError(
            f"causal_attention: `window` must be None or an integer >= 1; got {window!r}"
        )
    if (persistent_keys is None) != (persistent_values is None):
        raise ValueError(
            "causal_attention: give both `persistent_keys` and `persistent_values`, or neither"
        )
    sigma = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    m = jnp.arange(T) if query_positions is None else jnp.asarray(query_positions)
    n = jnp.arange(S) if key_positions is None else jnp.asarray(key_positions)
    distance = m[:, None] - n[None, :]
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance < window)
    if key_valid is not None:
        visible = visible & jnp.asarray(key_valid)[None, :]
    logits = sigma * jnp.einsum("thd,shd->hts", q, k)
    logits = jnp.where(visible[None], logits, -jnp.inf)
    values = v
    if persistent_keys is not None and persistent_values is not None:
        queries = q if persistent_queries is None else persistent_queries
        persistent_logits = sigma * jnp.einsum("thd,phd->htp", queries, persistent_keys)
        logits = jnp.concatenate([persistent_logits, logits], axis=-1)
        values = jnp.concatenate([persistent_values, v], axis=0)
    probabilities = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("hts,shd->thd", probabilities, values)


def _check_not_empty(x: Array) -> None:
    if x.shape[0] == 0:
        raise ValueError(
            "AttentionLayer: `x` is empty (T = 0); a sequence needs at least one token"
        )


class AttentionState(eqx.Module):
    r"""The KV cache of an `AttentionLayer` stream.

    - `keys` (RoPE already applied), `values`: `(slots, heads, head_dim)`.
    - `positions`: the absolute position of each slot's token, `-1` for an empty slot.
    - `count`: tokens streamed so far (the next token's position).
    - `conv`: the last `conv_size - 1` projected (pre-convolution) q, k, v rows, oldest first,
      `(conv_size - 1, 3 * heads * head_dim)` (no rows without a convolution).

    Without a window there is one slot per position (`max_length` slots). With a window $w$ it
    is a ring buffer of $\min(w, \text{max\_length})$ slots (position $n$ in slot
    $n \bmod \text{slots}$), so memory is constant in the stream length.
    """

    keys: Float[Array, "slots heads head_dim"]
    values: Float[Array, "slots heads head_dim"]
    positions: Int[Array, " slots"]
    count: Int[Array, ""]
    conv: Float[Array, "history channels"]


class AttentionLayer(AbstractMixer):
    r"""Multi-head causal softmax attention with RoPE: the Transformer++ (Llama) token mixer.

    $$q_t = R_{m_t}W_Qx_t,\quad k_t = R_{m_t}W_Kx_t,\quad v_t = W_Vx_t\ \text{(per head)},\qquad
    y = W_O\,\mathrm{concat}_h\,\mathrm{Attn}(q, k, v)$$

    with no biases, RoPE $R_m$ in the rotate-half layout (`rope`), logits scaled by
    $1/\sqrt{d_h}$, the causal mask, and optionally a sliding window (token $t$ sees
    $t-w+1..t$; SWA, ATLAS Eq 18).

    Persistent tokens (Titans Eq 19, `n_persistent` $= N_p$): learned vectors
    $p_1..p_{N_p}\in\mathbb R^{d_{model}}$ whose keys $W_Kp_j$ and values $W_Vp_j$ are visible
    to every position, whatever the window. They carry **no position**: RoPE is applied to
    neither side of their logits ($q^\top W_Kp_j$ with the unrotated query, equivalently both
    rotated by the query's own position), so they act the same at every position.

    Short convolution (`conv_size` $= K$): with $K > 0$, $q, k, v$ above are replaced by
    $\mathrm{conv}_K(xW_Q), \mathrm{conv}_K(xW_K), \mathrm{conv}_K(xW_V)$, the causal depthwise
    convolution every memory layer applies after its projections (no SiLU), and RoPE is applied
    after it. $K = 0$ (the default) is the Llama layer.
    """

    wq: eqx.nn.Linear
    wk: eqx.nn.Linear
    wv: eqx.nn.Linear
    wo: eqx.nn.Linear
    persistent: Float[Array, "n_persistent d_model"] | None
    conv_weight: Float[Array, "channels K"] | None
    d_model: int = eqx.field(static=True)
    n_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    window: int | None = eqx.field(static=True)
    n_persistent: int = eqx.field(static=True)
    rope_base: float = eqx.field(static=True)
    conv_size: int = eqx.field(static=True)

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        key: PRNGKeyArray,
        head_dim: int | None = None,
        window: int | None = None,
        n_persistent: int = 0,
        rope_base: float = 10000.0,
        conv_size: int = 0,
        dtype: jnp.dtype | type | None = None,
    ):
        r"""**Arguments:**

        - `d_model`: model width. `n_heads`: number of heads.
        - `key`: a JAX PRNG key for the projections and persistent tokens.
        - `head_dim`: per-head width $d_h$ (even); default `d_model // n_heads`.
        - `window`: the sliding window $w \ge 1$, or `None` for full causal attention.
        - `n_persistent`: $N_p \ge 0$ learned persistent tokens, initialised $\mathcal N(0, 1)$.
        - `rope_base`: the RoPE base (10000 in Llama).
        - `conv_size`: kernel $K \ge 0$ of the causal depthwise convolution on the projected
          q, k, v (0: none, the Llama layer); weights initialised $U(\pm 1/\sqrt K)$ as a
          memory layer's.
        - `dtype`: parameter dtype (default JAX's default float).
        """
        for name, n in (("d_model", d_model), ("n_heads", n_heads)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"AttentionLayer: `{name}` must be an integer >= 1; got {n!r}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(
                    f"AttentionLayer: `d_model` ({d_model}) must be divisible by `n_heads` "
                    f"({n_heads}), or give `head_dim`"
                )
            head_dim = d_model // n_heads
        if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(
                f"AttentionLayer: `head_dim` must be an even integer >= 2 (RoPE); got {head_dim!r}"
            )
        if window is not None and (
            not isinstance(window, int) or isinstance(window, bool) or window < 1
        ):
            raise ValueError(
                f"AttentionLayer: `window` must be None or an integer >= 1; got {window!r}"
            )
        if not isinstance(n_persistent, int) or n_persistent < 0:
            raise ValueError(
                f"AttentionLayer: `n_persistent` must be an integer >= 0; got {n_persistent!r}"
            )
        if not (math.isfinite(rope_base) and rope_base > 1):
            raise ValueError(
                f"AttentionLayer: `rope_base` must be a finite number > 1; got {rope_base!r}"
            )
        if not isinstance(conv_size, int) or isinstance(conv_size, bool) or conv_size < 0:
            raise ValueError(
                f"AttentionLayer: `conv_size` must be an integer >= 0; got {conv_size!r}"
            )
        kq, kk, kv, ko, kp = jax.random.split(key, 5)
        width = n_heads * head_dim
        self.wq = eqx.nn.Linear(d_model, width, use_bias=False, key=kq, dtype=dtype)
        self.wk = eqx.nn.Linear(d_model, width, use_bias=False, key=kk, dtype=dtype)
        self.wv = eqx.nn.Linear(d_model, width, use_bias=False, key=kv, dtype=dtype)
        self.wo = eqx.nn.Linear(width, d_model, use_bias=False, key=ko, dtype=dtype)
        self.persistent = (
            jax.random.normal(kp, (n_persistent, d_model), dtype) if n_persistent else None
        )
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.window = window
        self.n_persistent = n_persistent
        self.rope_base = float(rope_base)
        self.conv_size = conv_size
        if conv_size:
            bound = 1.0 / math.sqrt(conv_size)
            self.conv_weight = jax.random.uniform(
                jax.random.fold_in(key, 1),
                (3 * width, conv_size),
                dtype or float,
                minval=-bound,
                maxval=bound,
            )
        else:
            self.conv_weight = None

    def _project(
        self, linear: eqx.nn.Linear, x: Float[Array, "T d_model"]
    ) -> Float[Array, "T heads head_dim"]:
        return jax.vmap(linear)(x).reshape(x.shape[0], self.n_heads, self.head_dim)

    def _empty_conv(self, dtype) -> Float[Array, "history channels"]:
        return jnp.zeros((max(self.conv_size - 1, 0), 3 * self.n_heads * self.head_dim), dtype)

    def _qkv(
        self,
        x: Float[Array, "T d_model"],
        positions: Int[Array, " T"],
        conv_history: Float[Array, "history channels"],
    ):
        T = x.shape[0]
        qkv = jnp.concatenate([jax.vmap(w)(x) for w in (self.wq, self.wk, self.wv)], axis=-1)
        if self.conv_weight is not None:
            qkv, conv_history = causal_depthwise_conv(qkv, self.conv_weight, conv_history)
        q, k, v = (a.reshape(T, self.n_heads, self.head_dim) for a in jnp.split(qkv, 3, axis=-1))
        q_rot, k_rot = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
        return q, q_rot, k_rot, v, conv_history

    def _attend(
        self,
        q: Float[Array, "T heads head_dim"],
        q_rot: Float[Array, "T heads head_dim"],
        k_rot: Float[Array, "S heads head_dim"],
        v: Float[Array, "S heads head_dim"],
        query_positions: Int[Array, " T"] | None = None,
        key_positions: Int[Array, " S"] | None = None,
    ) -> Float[Array, "T d_model"]:
        persistent_keys = persistent_values = None
        if self.persistent is not None:
            persistent_keys = self._project(self.wk, self.persistent)
            persistent_values = self._project(self.wv, self.persistent)
        y = causal_attention(
            q_rot,
            k_rot,
            v,
            window=self.window,
            query_positions=query_positions,
            key_positions=key_positions,
            key_valid=None if key_positions is None else key_positions >= 0,
            persistent_keys=persistent_keys,
            persistent_values=persistent_values,
            persistent_queries=q,
        )
        return jax.vmap(self.wo)(y.reshape(q.shape[0], -1))

    @jaxtyped(typechecker=beartype)
    def __call__(self, x: Float[Array, "T d_model"]) -> Float[Array, "T d_model"]:
        """The whole sequence at positions `0..T-1`: `(T, d_model) -> (T, d_model)`."""
        _check_not_empty(x)
        positions = jnp.arange(x.shape[0])
        q, q_rot, k_rot, v, _ = self._qkv(x, positions, self._empty_conv(x.dtype))
        return self._attend(q, q_rot, k_rot, v)

    def init_state(self, max_length: int) -> AttentionState:
        """An empty KV cache: `max_length` slots, or with a window a ring buffer of
        `min(window, max_length)` slots (a ring of `window` slots holds streams of any length)."""
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(
                f"AttentionLayer.init_state: `max_length` must be an integer >= 1; got {max_length!r}"
            )
        slots = max_length if self.window is None else min(self.window, max_length)
        dtype = self.wq.weight.dtype
        shape = (slots, self.n_heads, self.head_dim)
        return AttentionState(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            positions=jnp.full((slots,), -1, jnp.int32),
            count=jnp.zeros((), jnp.int32),
            conv=self._empty_conv(dtype),
        )

    @jaxtyped(typechecker=beartype)
    def stream(
        self, x: Float[Array, "T d_model"], state: AttentionState
    ) -> tuple[Float[Array, "T d_model"], AttentionState]:
        """The next `T` tokens (positions continue from `state.count`): attend to the cache and
        to themselves, then write their keys and values into the cache."""
        _check_not_empty(x)
        T = x.shape[0]
        slots = state.keys.shape[0]
        count = state.count
        if self.window is None or slots < self.window:
            # Not a ring buffer: every token must fit (a ring of >= w slots evicts only tokens
            # that are outside the window).
            count = eqx.error_if(
                count,
                count + T > slots,
                "AttentionLayer.stream: the KV cache is full (init_state max_length)",
            )
        positions = count + jnp.arange(T, dtype=jnp.int32)
        q, q_rot, k_rot, v, conv = self._qkv(x, positions, state.conv)
        keys = jnp.concatenate([state.keys, k_rot], axis=0)
        values = jnp.concatenate([state.values, v], axis=0)
        key_positions = jnp.concatenate([state.positions, positions])
        y = self._attend(
            q,
            q_rot,
            keys,
            values,
            query_positions=positions,
            key_positions=key_positions,
        )
        kept = min(T, slots)
        slot = positions[T - kept :] % slots
        new_state = AttentionState(
            keys=state.keys.at[slot].set(k_rot[T - kept :]),
            values=state.values.at[slot].set(v[T - kept :]),
            positions=state.positions.at[slot].set(positions[T - kept :]),
            count=count + T,
            conv=conv,
        )
        return y, new_state
