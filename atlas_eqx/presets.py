r"""Presets: one function per model of the ATLAS tables, all with the same signature.

```python
layer = ae.presets.NAME(d_model, n_heads, *, key, chunk_size=..., window=..., **overrides)
y = layer(x)  # (T, d_model) -> (T, d_model); jax.vmap for a batch
```

`overrides` are fields of the layer's config (`MemoryLayerConfig` for the memory layers); an
unknown name is a `ValueError` that lists the valid ones. Defaults follow the digest's
recommendations (sections 7 and 10); each preset's docstring states what it fixes.

**Feature maps** (digest §3.2, A-2). `atlas`, `atlas_pp` and `omeganet` use the
dimension-preserving element-wise polynomial $\phi(k) = a_1k + a_2k^{\odot2}$ ($a_i$
learnable, starting at $1/i!$; option (ii) of A-2) at every head size. The exact degree-2
monomial map has $\binom{d+2}{2}$ features (153 at $d_k = 16$, 2145 at $d_k = 64$) and makes
the MLP memory and its Newton-Schulz that much wider: at the main job's size Atlas trained at
280 tokens/s with it against 2,300 with the element-wise map (2 CPU cores). Pass
`feature_map="polynomial"` for the exact map. `dla` keeps the exact map up to head dimension
32 and the element-wise map above.

**Chunk size** (A-11) is part of the model: within a chunk of $b$ tokens every gradient is
taken at the chunk-start weights. `deltanet`, `gated_deltanet`, `linear_attention` and `swla`
default to $b = 1$, the exact recurrence of their papers; the fast path runs them
chunk-parallel in execution blocks (`block_size`, a speed setting only, in UT-transform form:
`atlas_eqx._exact_chunked`). Learners with no such closed form (momentum, Muon, MLP memories)
define their model with $b$, as Titans and ATLAS do: `atlas`, `atlas_pp` ($b = 4$),
`omeganet`, `titans`, `dla` ($b = 16$). The kernel memories (`deep_transformer`, `swdt`,
`dot`) and attention are exact at any $b$.

**Inner step size** (A-7), $\eta_t = \eta_{\max}\sigma(\cdot)$, then
`MemoryLayer.inner_step_size`:

- GD and momentum learners ($\ell_2$ presets): $\eta_{\max} = 1/(c\,\kappa_\phi)$, where
  $\kappa_\phi$ bounds $\|\phi(\hat k)\|^2$ for unit keys ($1$ for the identity, $\sum_i a_i$
  for the exact polynomial, $(\sum_i a_i)^2$ for the element-wise one), so that
  $\eta_t\sum_i\gamma_{t,i}\|\phi_i\|^2 \le 1$ and a GD step on a linear memory never
  overshoots; with $c = 1$ and the identity this is DeltaNet's $\beta_t\in(0,1)$. The layer
  divides $\eta_t$ by the memory's Gauss-Newton curvature sampled over 16 unit inputs
  (`lr_normalization="sampled_curvature"`; 1 for linear memories, about 3.4 for the MLP memory
  at initialisation), so deep memories write about as strongly as the rule intends and stay
  finite at the gates' extremes at head dimension 16 (see `MemoryLayerConfig`); and, for momentum,
  multiplies it by $1-\theta_t$ (`lr_momentum_scaling`), since the buffer repeats a gradient
  about $1/(1-\theta)$ times.
- Muon (`atlas`, `atlas_pp`): its step $\mathrm{NS}(S)$ has singular values near 1 whatever
  the gradient's size, so the GD bound says nothing about it, and $\eta_t$ alone sets how much
  of the memory one step rewrites (the MLP memory's $W_0$ has spectral norms 1.5-3 at the main
  job's size; a chunk of $b = 4$ steps writes about $4\eta_t$). $\eta_{\max}$ =
  `MUON_LR_MAX` = 0.1, chosen by training: Atlas on the main job's MQAR, 400 steps at outer lr
  1e-2, seed 0, validation accuracy at $\eta_{\max}$ = 0.05 / 0.1 / 0.2 / 0.5 / 2: 0.21 /
  0.90 / 0.66 / 0.11 / 0.05 (0.1: 0.22 and 0.81 at seeds 1 and 2). The write-strength probe
  (`atlas-eqx probe`) favours larger steps (8% of a value written after 8 writes at 0.11, 43%
  at 0.5), but a memory that rewrites itself that fast leaves the outer model little to learn
  from; a smaller step trains.
- Hebbian presets: $\eta_{\max} = 1$.

**Deep memories** (`atlas`, `atlas_pp`, `omeganet`, `titans`, `dla`) normalise the MLP's
branch, $\mathcal M(x) = x + \mathrm{LN}(W_1\sigma(W_2x))$ (`memory_layer_norm=True`; Miras's
reading of App. E's "layer norm", digest A-5; titans-pytorch's default too). Without it the
step-size rules above hold only at $W_0$: in the claims study (`experiments/results/claims/`)
`titans` went NaN at every outer rate on single-needle recall at T 128, and `omeganet` with the
exact polynomial map at every rate on MQAR with 8 heads, each time because one head's fast
weights outgrew the step (`atlas_eqx.diagnose_scan`: growth x10^5 to x10^17 within 128
tokens). With the norm a read does not change with the scale of the last matrix, so the
gradient is orthogonal to it and shrinks as the weights grow. Their $\eta_t$ is therefore not
divided by $W_0$'s curvature (the curvature rule above applies to un-normed deep memories; with
the norm it stopped `titans` and `omeganet` learning). `memory_layer_norm=False` gives Eq 42 as
printed.
"""

import dataclasses
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

import feature_maps as fm

from ._attention import AttentionLayer
from ._hybrid import MAGLayer, MALLayer
from ._layer import MemoryLayer, MemoryLayerConfig


__all__ = [
    "atlas",
    "atlas_pp",
    "deep_transformer",
    "deltanet",
    "dla",
    "dot",
    "gated_deltanet",
    "linear_attention",
    "mag",
    "mal",
    "omeganet",
    "swa",
    "swdt",
    "swla",
    "titans",
    "transformer",
]


_EXACT_FEATURES_MAX_HEAD_DIM = 32
MUON_LR_MAX = 0.1
_POSITIONAL = ("d_model", "n_heads", "window", "chunk_size")


def _config_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(MemoryLayerConfig))


def _check_overrides(preset: str, overrides: dict[str, Any], valid: tuple[str, ...]) -> None:
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"presets.{preset}: unknown override(s) {unknown}; valid overrides are the config "
            f"fields {sorted(set(valid) - set(_POSITIONAL))}"
        )


def _head_dim(d_model: int, n_heads: int, overrides: dict[str, Any]) -> int:
    head_dim = overrides.get("head_dim")
    if head_dim is not None:
        return head_dim
    if not isinstance(n_heads, int) or n_heads < 1:
        return 0  # MemoryLayerConfig reports the error
    return d_model // n_heads


_ATLAS_FEATURES = dict(feature_map="elementwise", feature_degree=2, feature_include_constant=False)


def _polynomial_features(head_dim: int) -> dict[str, Any]:
    if head_dim <= _EXACT_FEATURES_MAX_HEAD_DIM:
        return dict(feature_map="polynomial", feature_degree=2, feature_include_constant=True)
    return dict(feature_map="elementwise", feature_degree=2, feature_include_constant=False)


def _feature_norm_bound(config: MemoryLayerConfig) -> float:
    r"""$\kappa \ge \|\phi(k)\|^2$ for $\|k\| = 1$ at the initial coefficients $a_i = 1/i!$.

    Closed forms for the library's feature maps; for a researcher's own map, the largest
    $\|\phi(k)\|^2$ over the $2d_k$ signed unit axes and 256 random unit keys (a sampled
    estimate, not a bound: pass `lr_max` to set the step size yourself)."""
    head_dim = config.d_head
    if config.memory == "kernel":
        scale = config.kernel_scale or 1.0 / math.sqrt(head_dim)
        return math.exp(scale)  # kappa(k, k) = exp(scale) for a unit key
    feature_map = config.make_feature_map()
    if isinstance(feature_map, fm.Identity):
        return 1.0
    if isinstance(feature_map, fm.TaylorExp):
        return sum(1.0 / math.factorial(i) for i in range(feature_map.order + 1))
    if isinstance(feature_map, fm.Polynomial | fm.Elementwise):
        start = 0 if feature_map.include_constant else 1
        total = sum(1.0 / math.factorial(i) for i in range(start, feature_map.degree + 1))
        if isinstance(feature_map, fm.Elementwise):
            # |phi_j| <= (sum_i a_i)|k_j| without the constant, <= sum_i a_i with it.
            return total**2 * (head_dim if feature_map.include_constant else 1)
        return total
    axes = jnp.concatenate([jnp.eye(head_dim), -jnp.eye(head_dim)])
    random = jax.random.normal(jax.random.key(0), (256, head_dim))
    keys = jnp.concatenate([axes, random / jnp.linalg.norm(random, axis=-1, keepdims=True)])
    return float(jnp.max(jnp.sum(feature_map(keys) ** 2, axis=-1)))


def _memory_preset(
    name: str,
    base: dict[str, Any],
    d_model: int,
    n_heads: int,
    key: PRNGKeyArray,
    chunk_size: int,
    window: int | None,
    overrides: dict[str, Any],
    *,
    lr_from_window: bool,
) -> MemoryLayer:
    _check_overrides(name, overrides, _config_fields())
    fields: dict[str, Any] = {**base, **overrides}
    fields.update(d_model=d_model, n_heads=n_heads, chunk_size=chunk_size, window=window)
    if lr_from_window and "lr_max" not in overrides:
        # Built with a placeholder step size: its checks and parts decide the real one.
        config = MemoryLayerConfig(**{**fields, "lr_max": 1.0, "lr_init": 0.5})
        if config.preconditioned:
            fields["lr_max"] = MUON_LR_MAX
        else:
            fields["lr_max"] = 1.0 / (config.window * _feature_norm_bound(config))
    if "lr_init" not in overrides:
        fields["lr_init"] = 0.5 * fields.get("lr_max", 1.0)
    return MemoryLayer(MemoryLayerConfig(**fields), key=key)


def atlas(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 4,
    window: int = 4,
    **overrides: Any,
) -> MemoryLayer:
    r"""ATLAS (ATLAS §5, Eqs 32-33, App. E): deep memory, polynomial $\phi$, window $c$, Muon.

    Memory $\mathcal M(x) = x + \mathrm{LN}(W_1\sigma(W_2x))$ (Eq 42 with A-5's norm; 2 layers, hidden $4d_v$ (A-6), GELU,
    residual when $\dim\phi = d_v$ (A-4)), learned $W_0$ per head (A-22). $\phi$: element-wise
    degree 2 (module docstring). Omega window $c = 4$ (A-30), $\ell_2$ objective, Muon with 5
    NS steps, $S_t = \theta_tS_{t-1} + g_t$. Gates $\eta, \alpha, \theta$ per token and head,
    separable $\gamma$ (A-8 (b)), decay time-scales spread over heads.

    Defaults that trade exactness for speed, each one override away: chunk $b = 4$ (A-11) and
    Muon once per chunk (`muon_per_chunk=True`, A-13 (i)): the momentum is exact per token,
    the chunk's weights move by $W_{s+b} = A_bW_s - (\sum_m L_\alpha[b,m]\eta_m)
    \mathrm{NS}_5(S_{s+b})$, and reads inside a chunk see the decayed chunk-start weights.
    Exact per-token Muon (`muon_per_chunk=False`) trained at 480 tokens/s against 2,300 at the
    main job's size on 2 CPU cores (measured before Newton-Schulz's tangent rule, which made NS's own
    forward+backward about 2x faster); at $b = 16$ the per-chunk form reaches 5,300 tokens/s, but
    reads inside a chunk then miss up to 15 fresh tokens, and its step $\sum_m\eta_m$ over 16
    tokens makes the recurrence expanding (digest A-13).
    """
    base = dict(
        memory="mlp",
        memory_layer_norm=True,
        objective="l2",
        optimizer="muon",
        muon_per_chunk=True,
        **_ATLAS_FEATURES,
    )
    return _memory_preset(
        "atlas", base, d_model, n_heads, key, chunk_size, window, overrides, lr_from_window=True
    )


def atlas_pp(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 4,
    window: int = 4,
    **overrides: Any,
) -> MemoryLayer:
    r"""Atlas++ (ATLAS Eq 43): `atlas` with the gated memory
    $\mathcal M(x) = x + W_1(\sigma(W_2x)\odot W_3x)$, GELU, $W_3$ shaped like $W_2$ (A-32)."""
    base = dict(
        memory="gated_mlp",
        memory_layer_norm=True,
        objective="l2",
        optimizer="muon",
        muon_per_chunk=True,
        **_ATLAS_FEATURES,
    )
    return _memory_preset(
        "atlas_pp", base, d_model, n_heads, key, chunk_size, window, overrides, lr_from_window=True
    )


def omeganet(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 16,
    window: int = 4,
    **overrides: Any,
) -> MemoryLayer:
    r"""OmegaNet (ATLAS Eq 10, App. D.3): `atlas` without Muon and without momentum.

    $W_t = \alpha_tW_{t-1} - \eta_t\nabla\sum_{i=t-c+1}^{t}\gamma_i\tfrac12
    \|\mathcal M(\phi(k_i)) - v_i\|^2$ (plain GD with retention; "Atlas w/o Muon" is OmegaNet,
    digest §2.2).
    """
    base = dict(
        memory="mlp",
        memory_layer_norm=True,
        objective="l2",
        optimizer="gd",
        **_ATLAS_FEATURES,
    )
    return _memory_preset(
        "omeganet", base, d_model, n_heads, key, chunk_size, window, overrides, lr_from_window=True
    )


def titans(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 16,
    window: int = 1,
    **overrides: Any,
) -> MemoryLayer:
    r"""The Titans neural long-term memory, LMM (Titans Eqs 13-14; ATLAS Eqs 12-13).

    $c = 1$, GD with momentum in ATLAS's form $S_t = \theta_tS_{t-1} + g_t$,
    $W_t = \alpha_tW_{t-1} - \eta_tS_t$ (equal to Titans' form for constant $\eta$, I-15),
    deep memory (Eq 42, 2 layers, GELU, residual), identity $\phi$, gates $\eta, \alpha,
    \theta$ per token and head.
    """
    base = dict(
        memory="mlp",
        memory_layer_norm=True,
        objective="l2",
        optimizer="momentum",
        feature_map="identity",
        gamma_mode="none",
    )
    return _memory_preset(
        "titans", base, d_model, n_heads, key, chunk_size, window, overrides, lr_from_window=True
    )


def deltanet(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 1,
    window: int = 1,
    **overrides: Any,
) -> MemoryLayer:
    r"""DeltaNet (Titans Eq 34; digest I-11): $W_t = W_{t-1}(I - \beta_tk_tk_t^\top) +
    \beta_tv_tk_t^\top$.

    Linear memory, $c = 1$, GD on $\tfrac12\|Wk - v\|^2$, no retention ($\alpha \equiv 1$),
    identity $\phi$, $\beta_t = \eta_t = \sigma(\cdot)\in(0, 1)$, $W_0 = 0$ (fixed, as in
    DeltaNet).

    Its defaults compute this recurrence exactly (`chunk_size=1`), chunk-parallel: the fast
    path runs it in execution blocks of `block_size` tokens in UT-transform form
    (`atlas_eqx._exact_chunked`, as fla's chunkwise kernels do), and the block changes the
    speed only. With $b > 1$ the gradients of a chunk are taken at its start (the
    frozen-anchor rule of Titans and ATLAS), a different model: $W_{s+b} = W_s(I -
    \sum_m\beta_mk_mk_m^\top) + \dots$, which expands once $\sum_m\beta_mk_mk_m^\top$ has
    eigenvalues above 2 (b > d_k at $\beta$ near 1).
    """
    base = dict(
        memory="linear",
        objective="l2",
        optimizer="gd",
        feature_map="identity",
        decay_gate=False,
        gamma_mode="none",
        memory_init_std=0.0,
        learn_initial_memory=False,
    )
    return _memory_preset(
        "deltanet", base, d_model, n_heads, key, chunk_size, window, overrides, lr_from_window=True
    )


def gated_deltanet(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 1,
    window: int = 1,
    **overrides: Any,
) -> MemoryLayer:
    r"""Gated DeltaNet (ATLAS Table 1; digest I-12): $W_t = \alpha_tW_{t-1}(I -
    \beta_tk_tk_t^\top) + \beta_tv_tk_t^\top$.

    `deltanet` with the retention gate $\alpha_t$ and `decay_first=True` (the gradient is taken
    at the decayed state $\alpha_tW_{t-1}$).

    Its defaults compute this recurrence exactly (`chunk_size=1`), chunk-parallel: the fast
    path runs it in execution blocks of `block_size` tokens in UT-transform form
    (`atlas_eqx._exact_chunked`, as fla's chunkwise kernels do), and the block changes the
    speed only. With $b > 1$ the gradients of a chunk are taken at its start (the
    frozen-anchor rule of Titans and ATLAS), a different model: $W_{s+b} = W_s(I -
    \sum_m\beta_mk_mk_m^\top) + \dots$, which expands once $\sum_m\beta_mk_mk_m^\top$ has
    eigenvalues above 2 (b > d_k at $\beta$ near 1).
    """
    base = dict(
        memory="linear",
        objective="l2",
        optimizer="gd",
        feature_map="identity",
        decay_gate=True,
        decay_first=True,
        gamma_mode="none",
        memory_init_std=0.0,
        learn_initial_memory=False,
    )
    return _memory_preset(
        "gated_deltanet",
        base,
        d_model,
        n_heads,
        key,
        chunk_size,
        window,
        overrides,
        lr_from_window=True,
    )


def linear_attention(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 1,
    window: int = 1,
    **overrides: Any,
) -> MemoryLayer:
    r"""Linear attention (ATLAS Table 1): $W_t = W_{t-1} + v_tk_t^\top$, $y_t = W_tq_t$.

    Linear memory, Hebbian objective $-\langle Wk, v\rangle$ (`ae.dot`), one GD step with
    $\eta \equiv 1$, no retention, $W_0 = 0$ (fixed), identity $\phi$ on $\ell_2$-normalised
    q, k. Equals the masked quadratic form $Y = \mathrm{tril}(QK^\top)V$ (digest I-4).

    The Hebbian gradient does not depend on $W$, so every `chunk_size` computes this same
    recurrence; the default `chunk_size=1` says so, and the fast path runs it in execution
    blocks of `block_size` tokens (`atlas_eqx._exact_chunked`).
    """
    base = dict(
        memory="linear",
        objective="dot",
        optimizer="gd",
        feature_map="identity",
        lr_gate=False,
        lr_max=1.0,
        decay_gate=False,
        gamma_mode="none",
        memory_init_std=0.0,
        learn_initial_memory=False,
    )
    return _memory_preset(
        "linear_attention",
        base,
        d_model,
        n_heads,
        key,
        chunk_size,
        window,
        overrides,
        lr_from_window=False,
    )


def dla(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 16,
    window: int = 1,
    **overrides: Any,
) -> MemoryLayer:
    r"""Deep (gated) linear attention, DLA (ATLAS Eq 19, D.1 Eqs 49-51).

    $W_t = \alpha_tW_{t-1} - \eta_t\nabla(-\langle\mathcal M(\phi(k_t); W_{t-1}), v_t\rangle)$:
    Hebbian objective, deep memory (Eq 42), polynomial $\phi$ (module docstring), gates
    $\eta$ ($\eta_{\max} = 1$) and $\alpha$, $c = 1$, GD.
    """
    base = dict(
        memory="mlp",
        memory_layer_norm=True,
        objective="dot",
        optimizer="gd",
        gamma_mode="none",
        lr_max=1.0,
        **_polynomial_features(_head_dim(d_model, n_heads, overrides)),
    )
    return _memory_preset(
        "dla", base, d_model, n_heads, key, chunk_size, window, overrides, lr_from_window=False
    )


def swla(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 1,
    window: int = 4,
    **overrides: Any,
) -> MemoryLayer:
    r"""Sliding-window linear attention, SWLA (ATLAS Eq 20, D.2 Eqs 53-55, sign fixed).

    $W_t = \alpha_tW_{t-1} + \eta_t\sum_{i=t-c+1}^{t}\gamma_i\,v_ik_i^\top$: Hebbian objective
    over a window $c = 4$, linear memory, $W_0 = 0$ (fixed), identity $\phi$, gates $\eta$
    ($\eta_{\max} = 1$), $\alpha$ (Eq 54) and separable $\gamma$. SWLA is not SWA: with
    $\alpha = \gamma = 1$ the coefficient of $v_ik_i^\top$ in $W_t$ is $\min(c, t-i+1)$ (I-30).
    Its defaults compute this recurrence exactly (`chunk_size=1`; the Hebbian gradient does
    not depend on $W$, so any $b$ would too), chunk-parallel in execution blocks of
    `block_size` tokens (`atlas_eqx._exact_chunked`).
    """
    base = dict(
        memory="linear",
        objective="dot",
        optimizer="gd",
        feature_map="identity",
        lr_max=1.0,
        memory_init_std=0.0,
        learn_initial_memory=False,
    )
    return _memory_preset(
        "swla", base, d_model, n_heads, key, chunk_size, window, overrides, lr_from_window=False
    )


def deep_transformer(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 16,
    window: int = 1,
    **overrides: Any,
) -> MemoryLayer:
    r"""DeepTransformer (ATLAS Eqs 25-26, digest §5.2) with a linear memory on $\phi^*$.

    The exponential feature map by the kernel trick (`kernel_memory_scan`, A-15), Hebbian rule
    $W_t = \alpha_tW_{t-1} + \eta_tv_t\phi^*(k_t)^\top$ with the gates of Table 1 ($\eta$,
    $\eta_{\max} = 1$, and $\alpha$), $W_0 = 0$, kernel $\exp(q^\top k/\sqrt{d_k})$ and value
    augmentation (A-16), so that with `lr_gate=False, decay_gate=False` it is causal softmax
    attention exactly (I-28). `chunk_size` has no effect (the kernel form is exact).
    """
    base = dict(
        memory="kernel",
        objective="dot",
        optimizer="gd",
        feature_map="identity",
        gamma_mode="none",
        lr_max=1.0,
        kernel_normalize=True,
    )
    return _memory_preset(
        "deep_transformer",
        base,
        d_model,
        n_heads,
        key,
        chunk_size,
        window,
        overrides,
        lr_from_window=False,
    )


def swdt(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 16,
    window: int = 4,
    **overrides: Any,
) -> MemoryLayer:
    r"""Sliding-window DeepTransformer, SWDT (ATLAS Table 1, digest §5.4).

    `deep_transformer` whose step writes the last $c = 4$ tokens:
    $W_t = \alpha_tW_{t-1} + \eta_t\sum_{i=t-c+1}^{t}v_i\phi^*(k_i)^\top$ (re-weighted, not
    windowed, attention; digest §5.6). A non-parametric sliding window is `kernel_window=w`.
    """
    base = dict(
        memory="kernel",
        objective="dot",
        optimizer="gd",
        feature_map="identity",
        gamma_mode="none",
        lr_max=1.0,
        kernel_normalize=True,
    )
    return _memory_preset(
        "swdt", base, d_model, n_heads, key, chunk_size, window, overrides, lr_from_window=False
    )


def dot(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 16,
    window: int = 4,
    **overrides: Any,
) -> MemoryLayer:
    r"""Dot, the Deep Omega Transformer (ATLAS Eq 27, corrected form of digest §5.5).

    $W_t = \alpha_tW_{t-1} + \eta_t\sum_{i=t-c+1}^{t}(v_i - W_{t-1}\phi^*(k_i))\phi^*(k_i)^\top$
    on $\phi^*$ by the kernel trick (delta-rule attention), $c = 4$, gates $\eta$, $\alpha$,
    $W_0 = 0$. No value augmentation ("Without Normalization", Table 1; a delta-rule
    denominator need not stay positive): the layer's output RMSNorm normalises instead.
    $\eta_{\max} = 1/(c\,e^{1/\sqrt{d_k}})$ bounds $\eta_t\sum_i\kappa(k_i, k_i)$ by 1.
    """
    base = dict(
        memory="kernel",
        objective="l2",
        optimizer="gd",
        feature_map="identity",
        gamma_mode="none",
        kernel_normalize=False,
    )
    return _memory_preset(
        "dot", base, d_model, n_heads, key, chunk_size, window, overrides, lr_from_window=True
    )


_ATTENTION_OPTIONS = tuple(
    name
    for name in inspect.signature(AttentionLayer.__init__).parameters
    if name not in ("self", "d_model", "n_heads", "key", "window")
)


def _attention(
    name: str,
    d_model: int,
    n_heads: int,
    key: PRNGKeyArray,
    window: int | None,
    overrides: dict[str, Any],
) -> AttentionLayer:
    unknown = sorted(set(overrides) - set(_ATTENTION_OPTIONS))
    if unknown:
        raise ValueError(
            f"presets.{name}: unknown override(s) {unknown}; valid overrides are the "
            f"AttentionLayer options {sorted(_ATTENTION_OPTIONS)}"
        )
    return AttentionLayer(d_model, n_heads, key=key, window=window, **overrides)


def transformer(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 16,
    window: int | None = None,
    **overrides: Any,
) -> AttentionLayer:
    r"""Transformer++ attention (Llama; ATLAS baselines): causal softmax attention with RoPE,
    $y = W_O\,\mathrm{softmax}(QK^\top/\sqrt{d_h} + \text{causal mask})V$ per head, with the
    memory presets' short convolution on the projected q, k, v.

    Default `conv_size=4`: $q, k, v = \mathrm{conv}_4(xW_{Q,K,V})$, the causal depthwise
    convolution every memory preset applies (Titans §4.4), so a comparison with them differs in
    the mixer only. Without it (`conv_size=0`, the Llama layer exactly) a two-block model must
    first learn a previous-token head before it can recall, and on the main job's MQAR it stayed
    on the copy-a-value plateau (0.26) for 400 steps at every outer learning rate, against 0.99
    with it (`experiments/results/quickstart`).

    `window=w` makes it sliding-window attention; `chunk_size` has no effect. Overrides are
    `AttentionLayer` options (`head_dim`, `n_persistent`, `rope_base`, `conv_size`, `dtype`).
    """
    del chunk_size
    overrides = {"conv_size": 4, **overrides}
    return _attention("transformer", d_model, n_heads, key, window, overrides)


def swa(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int = 16,
    window: int = 2048,
    **overrides: Any,
) -> AttentionLayer:
    r"""Sliding-window attention (ATLAS Eq 18): token $t$ attends to $t-w+1..t$, $w = 2048$
    ("2K for SWA", digest A-17). RoPE and the short convolution (`conv_size=4`) as
    `transformer`; `chunk_size` has no effect."""
    del chunk_size
    overrides = {"conv_size": 4, **overrides}
    return _attention("swa", d_model, n_heads, key, window, overrides)


def _hybrid_parts(
    name: str,
    d_model: int,
    n_heads: int,
    key: PRNGKeyArray,
    chunk_size: int | None,
    window: int,
    attention_window: int,
    memory_preset: str,
    overrides: dict[str, Any],
):
    _check_overrides(name, overrides, _config_fields())
    memory_presets = ("atlas", "atlas_pp", "omeganet", "titans", "deltanet", "gated_deltanet")
    memory_presets += ("linear_attention", "dla", "swla", "deep_transformer", "swdt", "dot")
    if memory_preset not in memory_presets:
        raise ValueError(
            f"presets.{name}: `memory_preset` must be one of {memory_presets}; got "
            f"{memory_preset!r}"
        )
    k_attention, k_memory, k_hybrid = jax.random.split(key, 3)
    if chunk_size is not None:
        overrides = {**overrides, "chunk_size": chunk_size}
    memory = globals()[memory_preset](d_model, n_heads, key=k_memory, window=window, **overrides)
    attention = AttentionLayer(d_model, n_heads, key=k_attention, window=attention_window)
    return attention, memory, k_hybrid


def mag(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int | None = None,
    window: int = 4,
    attention_window: int = 2048,
    n_persistent: int = 0,
    memory_preset: str = "atlas",
    **overrides: Any,
) -> MAGLayer:
    r"""Memory as a gate (Titans Eqs 26-28; "Atlas (MAG)" of ATLAS Table 2; digest A-17):
    $o = W_o(\mathrm{norm}_1(\mathrm{SWA}^*(\tilde x))\odot\sigma(\mathrm{norm}_2(
    \mathcal M(\tilde x))))$.

    SWA with window `attention_window` (2048, A-17) and RoPE; the memory branch is the preset
    `memory_preset` (`"atlas"`) with `chunk_size` (`None`: the memory preset's own), `window` and the `overrides` (its config
    fields); `n_persistent` learned persistent tokens (0).
    """
    attention, memory, k = _hybrid_parts(
        "mag", d_model, n_heads, key, chunk_size, window, attention_window, memory_preset, overrides
    )
    return MAGLayer(attention, memory, key=k, n_persistent=n_persistent)


def mal(
    d_model: int,
    n_heads: int,
    *,
    key: PRNGKeyArray,
    chunk_size: int | None = None,
    window: int = 4,
    attention_window: int = 2048,
    n_persistent: int = 0,
    memory_preset: str = "atlas",
    **overrides: Any,
) -> MALLayer:
    r"""Memory as a layer (Titans Eqs 29-31; "Atlas (MAL)" of ATLAS Table 2):
    $o = \mathrm{SWA}^*(\mathcal M(\tilde x))$, the memory layer then sliding-window attention.

    Same options as `mag`.
    """
    attention, memory, k = _hybrid_parts(
        "mal", d_model, n_heads, key, chunk_size, window, attention_window, memory_preset, overrides
    )
    return MALLayer(memory, attention, key=k, n_persistent=n_persistent)
