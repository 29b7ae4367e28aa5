"""The language model around the token mixers: Llama / Transformer++ macro architecture (digest 7.1).

Embedding, `n_layers` pre-norm blocks (`x + mixer(RMSNorm(x))`, then `x + SwiGLU(RMSNorm(x))`),
a final RMSNorm and a head tied to the embedding or separate. No biases anywhere (digest 7.1,
7.3: RMSNorm, SwiGLU, the recurrent layer in place of attention).
"""

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.core import Tracer
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Real

from ._import_path import is_import_path, resolve_import_path
from ._mixer import AbstractMixer


MixerFactory = Callable[..., AbstractMixer]
"""Builds one block's mixer: `factory(d_model, n_heads, *, key, **options) -> AbstractMixer`.

Every preset of `atlas_eqx.presets` has this signature."""


def _normal(key: PRNGKeyArray, shape: tuple[int, ...], std: float) -> Float[Array, "..."]:
    return std * jax.random.normal(key, shape)


class RMSNorm(eqx.Module):
    r"""Root-mean-square normalisation with a learned scale (Zhang and Sennrich 2019; digest 7.1).

    $$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\tfrac1d\sum_{j=1}^d x_j^2 + \epsilon}} \odot g$$

    over the last axis, with $g$ initialised to ones and no bias.
    """

    weight: Float[Array, " d"]
    eps: float = eqx.field(static=True)

    def __init__(self, d: int, *, eps: float = 1e-6):
        """**Arguments:**

        - `d`: the normalised (last) dimension.
        - `eps`: $\\epsilon$, added to the mean square.
        """
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"RMSNorm: `d` must be an integer >= 1; got {d!r}")
        if not eps >= 0.0:
            raise ValueError(f"RMSNorm: `eps` must be >= 0; got {eps!r}")
        self.weight = jnp.ones((d,))
        self.eps = float(eps)

    def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(mean_square + self.eps) * self.weight


class SwiGLU(eqx.Module):
    r"""The gated MLP of Llama (Shazeer 2020; digest 7.1), applied to each token, no biases.

    $$\mathrm{SwiGLU}(x) = W_\mathrm{down}\big(\mathrm{SiLU}(W_\mathrm{gate}x)\odot W_\mathrm{up}x\big),
    \qquad W_\mathrm{gate}, W_\mathrm{up} \in \mathbb R^{h\times d},\ W_\mathrm{down}\in\mathbb R^{d\times h}.$$
    """

    gate_weight: Float[Array, "hidden d"]
    up_weight: Float[Array, "hidden d"]
    down_weight: Float[Array, "d hidden"]

    def __init__(self, d: int, hidden: int, *, key: PRNGKeyArray):
        """**Arguments:**

        - `d`: the model dimension; `hidden`: the inner width $h$.
        - `key`: a JAX PRNG key. Entries are normal with standard deviation
          $1/\\sqrt{\\text{fan-in}}$.
        """
        for name, value in (("d", d), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SwiGLU: `{name}` must be an integer >= 1; got {value!r}")
        gate_key, up_key, down_key = jax.random.split(key, 3)
        self.gate_weight = _normal(gate_key, (hidden, d), 1.0 / math.sqrt(d))
        self.up_weight = _normal(up_key, (hidden, d), 1.0 / math.sqrt(d))
        self.down_weight = _normal(down_key, (d, hidden), 1.0 / math.sqrt(hidden))

    def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
        hidden = jax.nn.silu(x @ self.gate_weight.T) * (x @ self.up_weight.T)
        return hidden @ self.down_weight.T


def default_mlp_hidden(d_model: int, multiple_of: int = 8) -> int:
    r"""The SwiGLU width that matches a 4x GELU MLP in parameters: $\lceil \tfrac83 d / m\rceil m$.

    `multiple_of` is $m$; Llama and the fla baselines round to 256 (pass `mlp_multiple_of=256`
    to `LanguageModel` for those sizes), the default 8 keeps small models small.
    """
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"default_mlp_hidden: `multiple_of` must be >= 1; got {multiple_of!r}")
    return multiple_of * -(-(8 * d_model) // (3 * multiple_of))


class Block(eqx.Module):
    r"""One pre-norm residual block (digest 7.1; Titans: residual connections in all blocks).

    $$h = x + \mathrm{mixer}(\mathrm{RMSNorm}_1(x)),\qquad y = h + \mathrm{SwiGLU}(\mathrm{RMSNorm}_2(h)).$$
    """

    mixer_norm: RMSNorm
    mixer: AbstractMixer
    mlp_norm: RMSNorm
    mlp: SwiGLU

    def __call__(self, x: Float[Array, "T d_model"]) -> Float[Array, "T d_model"]:
        h = x + self.mixer(self.mixer_norm(x))
        return h + self.mlp(self.mlp_norm(h))

    def stream(
        self, x: Float[Array, "T d_model"], state: PyTree
    ) -> tuple[Float[Array, "T d_model"], PyTree]:
        """`__call__` on the next piece of a stream; only the mixer carries state."""
        mixed, state = self.mixer.stream(self.mixer_norm(x), state)
        h = x + mixed
        return h + self.mlp(self.mlp_norm(h)), state


def preset_names() -> tuple[str, ...]:
    """The names `LanguageModel(mixer=...)` accepts: the public functions of `atlas_eqx.presets`."""
    try:
        from . import presets
    except ImportError:
        return ()
    names = getattr(presets, "__all__", None)
    if names is None:
        names = [
            name
            for name, value in vars(presets).items()
            if not name.startswith("_")
            and inspect.isfunction(value)
            and value.__module__ == presets.__name__
        ]
    return tuple(sorted(names))


def _resolve_mixer(mixer: str | MixerFactory) -> MixerFactory:
    if callable(mixer):
        return mixer
    if is_import_path(mixer):
        factory = resolve_import_path(mixer, "LanguageModel.mixer")
        if not callable(factory):
            raise ValueError(
                f"LanguageModel: `mixer`={mixer!r} names a {type(factory).__name__}, not a "
                "factory (d_model, n_heads, *, key, **options) -> AbstractMixer"
            )
        return cast(MixerFactory, factory)
    names = preset_names()
    if not isinstance(mixer, str) or mixer not in names:
        raise ValueError(
            f"LanguageModel: unknown `mixer` {mixer!r}; expected a callable "
            f"(d_model, n_heads, *, key, **options) -> AbstractMixer, an import path "
            f"'package.module:factory', or one of the presets: "
            f"{', '.join(names) if names else '(atlas_eqx.presets is not available)'}"
        )
    from . import presets

    return getattr(presets, mixer)


class LanguageModel(eqx.Module):
    r"""A causal language model: embedding, pre-norm blocks, final norm, head (digest 7.1, 7.3).

    For tokens $x_1..x_T$, with $E\in\mathbb R^{V\times d}$:

    $$h^{(0)}_t = E_{x_t},\qquad h^{(l)} = \mathrm{Block}_l(h^{(l-1)}),\qquad
    \mathrm{logits}_t = H\,\mathrm{RMSNorm}(h^{(L)}_t),$$

    where each block is `x + mixer(RMSNorm(x))` then `x + SwiGLU(RMSNorm(x))` and the head is
    $H = E$ when `tie_embeddings` (else a separate $V\times d$ matrix). No biases.

    **Streaming.** `init_state(max_length)` and `stream(tokens, state)` process a sequence in
    consecutive pieces (a prompt, then one token at a time); `generate` is prefill + decode in
    one `lax.scan`. Streaming equals the full call exactly when the mixers' chunking allows it
    (digest I-40): always for attention and for memory layers with `chunk_size=1`; for
    `chunk_size=b` when every piece but the last starts and ends on a chunk boundary, i.e. a
    prefill whose length is a multiple of `b`. Single-token decode steps after such a prefill
    are then each a chunk of their own: they equal the full call of a model whose chunk
    boundaries are those of the prefill followed by one boundary per token, not the full call
    of the `chunk_size=b` model (prefill chunking is part of the model).
    """

    embedding: Float[Array, "vocab d_model"]
    blocks: tuple[Block, ...]
    final_norm: RMSNorm
    head: Float[Array, "vocab d_model"] | None
    vocab_size: int = eqx.field(static=True)
    d_model: int = eqx.field(static=True)

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        *,
        key: PRNGKeyArray,
        mixer: str | MixerFactory = "atlas",
        mixer_options: Mapping[str, Any] | None = None,
        mlp_hidden: int | None = None,
        mlp_multiple_of: int = 8,
        tie_embeddings: bool = True,
        norm_eps: float = 1e-6,
    ):
        """**Arguments:**

        - `vocab_size`: $V$. `d_model`: $d$. `n_layers`: the number of blocks $L$.
        - `n_heads`: passed to the mixer factory.
        - `key`: a JAX PRNG key.
        - `mixer`: a preset name of `atlas_eqx.presets` (its `__all__` lists them), any
          factory `(d_model, n_heads, *, key, **options) -> AbstractMixer`, or an import path
          `"package.module:factory"` naming one. Every block gets a mixer built by it with its
          own key.
        - `mixer_options`: keyword arguments for the factory (e.g. `chunk_size`, `window`;
          for the memory presets any `MemoryLayerConfig` field, including a researcher's own
          `memory`, `feature_map`, `objective` and `optimizer`, as objects or import paths).
        - `mlp_hidden`: the SwiGLU width; `None` means `default_mlp_hidden(d_model,
          mlp_multiple_of)`, i.e. $8d/3$ rounded up to a multiple of `mlp_multiple_of`.
        - `tie_embeddings`: share the embedding matrix with the output head.
        - `norm_eps`: $\\epsilon$ of every RMSNorm.

        The embedding (and an untied head) is normal with standard deviation $1/\\sqrt d$, so
        that the logits of the normalised final state have unit variance at initialisation.
        """
        for name, value in (
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LanguageModel: `{name}` must be an integer >= 1; got {value!r}")
        factory = _resolve_mixer(mixer)
        hidden = default_mlp_hidden(d_model, mlp_multiple_of) if mlp_hidden is None else mlp_hidden
        options = dict(mixer_options or {})
        embedding_key, head_key, *block_keys = jax.random.split(key, n_layers + 2)
        blocks = []
        for index, block_key in enumerate(block_keys):
            mixer_key, mlp_key = jax.random.split(block_key)
            block_mixer = factory(d_model, n_heads, key=mixer_key, **options)
            if not isinstance(block_mixer, AbstractMixer):
                raise TypeError(
                    f"LanguageModel: the mixer factory must return an AbstractMixer; "
                    f"got {type(block_mixer).__name__} for block {index}"
                )
            if block_mixer.d_model != d_model:
                raise ValueError(
                    f"LanguageModel: the mixer of block {index} has d_model="
                    f"{block_mixer.d_model}, expected {d_model}"
                )
            blocks.append(
                Block(
                    mixer_norm=RMSNorm(d_model, eps=norm_eps),
                    mixer=block_mixer,
                    mlp_norm=RMSNorm(d_model, eps=norm_eps),
                    mlp=SwiGLU(d_model, hidden, key=mlp_key),
                )
            )
        std = 1.0 / math.sqrt(d_model)
        self.embedding = _normal(embedding_key, (vocab_size, d_model), std)
        self.blocks = tuple(blocks)
        self.final_norm = RMSNorm(d_model, eps=norm_eps)
        self.head = None if tie_embeddings else _normal(head_key, (vocab_size, d_model), std)
        self.vocab_size = vocab_size
        self.d_model = d_model

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def _embed(self, tokens: Int[Array, " T"], caller: str) -> Float[Array, "T d_model"]:
        if tokens.ndim != 1:
            raise ValueError(
                f"LanguageModel.{caller}: `tokens` must be one sequence of shape (T,); got shape "
                f"{tokens.shape} (use jax.vmap for a batch)"
            )
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"LanguageModel.{caller}: `tokens` must be integer token ids; got {tokens.dtype}"
            )
        if tokens.shape[0] == 0:
            raise ValueError(
                f"LanguageModel.{caller}: `tokens` is empty (T = 0); a sequence needs at least one token"
            )
        message = f"LanguageModel.{caller}: `tokens` must lie in [0, vocab_size={self.vocab_size})"
        outside = (tokens < 0) | (tokens >= self.vocab_size)
        if isinstance(tokens, Tracer):  # under jit: a run-time check (eqx.error_if)
            tokens = eqx.error_if(tokens, jnp.any(outside), message)
        elif bool(jnp.any(outside)):
            raise ValueError(f"{message}; got {tokens[outside][:5].tolist()}")
        return jnp.take(self.embedding, tokens, axis=0)

    def _logits(self, h: Float[Array, "T d_model"]) -> Float[Array, "T vocab"]:
        head = self.embedding if self.head is None else self.head
        return self.final_norm(h) @ head.T

    def __call__(self, tokens: Int[Array, " T"]) -> Float[Array, "T vocab"]:
        """The next-token logits of one sequence (`jax.vmap` for a batch): `logits[t]` scores
        token `t + 1` given `tokens[: t + 1]`."""
        h = self._embed(tokens, "__call__")
        for block in self.blocks:
            h = block(h)
        return self._logits(h)

    def init_state(self, max_length: int) -> tuple[PyTree, ...]:
        """The streaming state at the start of a sequence: one mixer state per block.

        `max_length` bounds the tokens the stream will hold (attention allocates its KV cache
        with it; fixed-size memory states ignore it).
        """
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(
                f"LanguageModel.init_state: `max_length` must be an integer >= 1; got "
                f"{max_length!r}"
            )
        return tuple(block.mixer.init_state(max_length) for block in self.blocks)

    def stream(
        self, tokens: Int[Array, " T"], state: tuple[PyTree, ...]
    ) -> tuple[Float[Array, "T vocab"], tuple[PyTree, ...]]:
        """The logits of the next piece of a stream (a prompt, or one token) and the new state.

        Over consecutive pieces this equals `__call__` over their concatenation where the
        mixers' chunking makes that exact (see the class docstring; digest I-40).
        """
        if not isinstance(state, tuple) or len(state) != len(self.blocks):
            raise ValueError(
                f"LanguageModel.stream: `state` must be the tuple of {len(self.blocks)} block "
                f"states from `init_state` or a previous `stream`"
            )
        h = self._embed(tokens, "stream")
        new_state = []
        for block, block_state in zip(self.blocks, state, strict=True):
            h, block_state = block.stream(h, block_state)
            new_state.append(block_state)
        return self._logits(h), tuple(new_state)

    def generate(
        self,
        prompt: Int[Array, " P"],
        n_new: int,
        *,
        key: PRNGKeyArray | None = None,
        temperature: float | Real[Array, ""] = 0.0,
    ) -> Int[Array, " n_new"]:
        r"""Continue `prompt` by `n_new` tokens: one prefill `stream`, then a `lax.scan` of decodes.

        Token $x_{t+1}$ is $\arg\max$ of the logits when `temperature` is 0 (greedy), else a draw
        from $\mathrm{softmax}(\mathrm{logits}_t/\tau)$ with the $j$-th of
        `jax.random.split(key, n_new)` for the $j$-th new token. Jit with `n_new` static, e.g.
        `eqx.filter_jit(lambda m, p, k: m.generate(p, 8, key=k, temperature=0.7))`.

        **Returns:** the `n_new` new tokens (int32), without the prompt.
        """
        if not isinstance(n_new, int) or isinstance(n_new, bool) or n_new < 0:
            raise ValueError(
                f"LanguageModel.generate: `n_new` must be an integer >= 0; got {n_new!r}"
            )
        if prompt.ndim != 1 or prompt.shape[0] < 1:
            raise ValueError(
                f"LanguageModel.generate: `prompt` must have shape (P,) with P >= 1; got "
                f"{prompt.shape}"
            )
        greedy = isinstance(temperature, int | float) and temperature == 0
        if isinstance(temperature, int | float) and temperature < 0:
            raise ValueError(
                f"LanguageModel.generate: `temperature` must be >= 0; got {temperature}"
            )
        if not greedy and key is None:
            raise ValueError("LanguageModel.generate: sampling (temperature > 0) needs `key`")
        if n_new == 0:
            return jnp.zeros((0,), jnp.int32)
        keys = None if greedy else jax.random.split(key, n_new)  # pyright: ignore[reportArgumentType]

        def choose(logits: Float[Array, " vocab"], step_key: PRNGKeyArray | None) -> Int[Array, ""]:
            best = jnp.argmax(logits).astype(jnp.int32)
            if greedy:
                return best
            assert step_key is not None
            tau = jnp.asarray(temperature, logits.dtype)
            drawn = jax.random.categorical(step_key, logits / jnp.where(tau > 0, tau, 1))
            return jnp.where(tau > 0, drawn.astype(jnp.int32), best)

        logits, state = self.stream(prompt, self.init_state(prompt.shape[0] + n_new))
        first = choose(logits[-1], None if keys is None else keys[0])

        def decode(
            carry: tuple[Int[Array, ""], tuple[PyTree, ...]], step_key: PRNGKeyArray | None
        ) -> tuple[tuple[Int[Array, ""], tuple[PyTree, ...]], Int[Array, ""]]:
            token, state = carry
            logits, state = self.stream(token[None], state)
            following = choose(logits[0], step_key)
            return (following, state), following

        _, rest = jax.lax.scan(
            decode, (first, state), None if keys is None else keys[1:], length=n_new - 1
        )
        return jnp.concatenate([first[None], rest])
