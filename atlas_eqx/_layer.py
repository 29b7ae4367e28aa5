r"""The memory layer: one block's token mixer built around `omega_scan` (ATLAS §5.1, App. E).

For one sequence $x \in \mathbb R^{T\times d}$ and each head $h$ (digest §7.1):

$$q, k, v = \mathrm{SiLU}(\mathrm{conv}_4(xW_{q,k,v})),\quad
\hat q = q/\|q\|,\ \hat k = k/\|k\|,$$
$$\eta_t = \eta_{\max}\sigma(w_\eta^\top x_t + b_\eta),\ \alpha_t = \sigma(\cdot),\
\theta_t = \sigma(\cdot),\ \gamma = \sigma(\cdot),$$
$$y^{(h)} = \texttt{omega\_scan}(\mathcal M^{(h)}_0, \hat q, \hat k, v, \eta, \alpha, \theta,
\gamma; \phi),\qquad o = \big[\mathrm{RMSNorm}(y^{(h)})\big]_h \odot \mathrm{SiLU}(xW_g),
\qquad \mathrm{out} = oW_o.$$
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

import feature_maps as fm
import optimizers as iopt

from ._diagnostics import diagnose_scan, DivergenceReport
from ._import_path import is_import_path, resolve_import_path
from ._kernel import init_kernel_memory_state, kernel_memory_scan, kernel_memory_stream
from ._memory import AbstractMemory, GatedMLPMemory, LinearMemory, MLPMemory, sampled_curvature
from ._mixer import AbstractMixer
from ._objective import dot, huber, l2, lp
from ._scan import omega_scan
from ._state import init_omega_state


_MEMORIES = ("linear", "mlp", "gated_mlp", "kernel")
_ACTIVATIONS = {"gelu": jax.nn.gelu, "silu": jax.nn.silu, "relu": jax.nn.relu, "tanh": jnp.tanh}
_FEATURE_MAPS = ("identity", "polynomial", "elementwise", "taylor")
_FEATURE_FORMS = ("monomial", "tensor")
_OBJECTIVES = {"l2": l2, "dot": dot, "huber": huber(), "lp": lp()}
_OPTIMIZERS = ("gd", "momentum", "muon")
_METHODS = ("sequential", "chunked")
_GAMMA_MODES = ("none", "token", "offset")
_OUTPUT_GATES = ("silu", "sigmoid", "none")
_LR_NORMALIZATIONS = ("sampled_curvature", "curvature", "none")

MemoryFactory = Callable[..., AbstractMemory]
"""A researcher's memory: `factory(d_in, d_out, *, key) -> AbstractMemory` (a subclass whose
`__init__` has this signature is one)."""
Objective = Callable[[Array, Array], Scalar]
"""An attentional bias: `objective(prediction, target) -> scalar`."""


@dataclasses.dataclass(frozen=True)
class MemoryLayerConfig:
    r"""Every switch of a `MemoryLayer`, with the digest's recommended default (section 10).

    Frozen and hashable: it is a static field of the layer, so two layers with equal configs
    share compiled code.

    **A researcher's own parts.** `memory`, `feature_map`, `objective` and `optimizer` take a
    built-in name, an object, or an import path `"package.module:attribute"` naming the object
    (how config files and the command line name them; the config stays JSON-serialisable).
    An object equal to a built-in default computes exactly what the name does. Objects are
    compared and hashed by value where they are pytrees of arrays (a feature map's
    coefficients) and by identity where they are functions.

    **Shape**

    - `d_model`: the layer's input and output width.
    - `n_heads`: number of heads; one memory per head (A-10).
    - `head_dim`: $d_k = d_v$ per head; `None` means `d_model // n_heads` (A-10).

    **Memory** (A-4, A-6, A-22, A-32)

    - `memory`: `"linear"` ($Wx$), `"mlp"` (ATLAS Eq 42), `"gated_mlp"` (Atlas++, Eq 43),
      `"kernel"` (the non-parametric exp-kernel memory of DeepTransformers / Dot, §5.3), or a
      factory `(d_in, d_out, *, key) -> AbstractMemory` (`MemoryFactory`; an `AbstractMemory`
      subclass with that `__init__` is one). `memory_depth`, `memory_expansion`,
      `memory_residual`, `memory_activation`, `memory_init_std` and `memory_layer_norm`
      configure the built-in memories only.
    - `memory_depth`: number of weight matrices of the `"mlp"` memory (Eq 42: 2).
    - `memory_expansion`: hidden width $= $ `memory_expansion` $\cdot d_v$ (A-6: $4d_v$).
    - `memory_residual`: `"auto"` (on iff $\dim\phi = d_v$), `True` or `False` (A-4). The
      "degree-1 block of $\phi$ as the residual" option of A-4 is not offered.
    - `memory_activation`: $\sigma$ of the MLP memories, `"gelu"` (App. E, A-32), `"silu"`,
      `"relu"`, `"tanh"`.
    - `memory_init_std`: scale of $W_0$; `None` is $1/\sqrt{\text{fan-in}}$, `0.0` is $W_0 = 0$
      (linear memory only; the MLPs would have zero gradients).
    - `memory_layer_norm`: the MLP memories normalise their branch, $x + \mathrm{LN}(\cdot)$
      (A-5, `MLPMemory(layer_norm=True)`); `False` is Eq 42 as printed. The presets with a deep
      memory switch it on: without it their inner loops ran away in training once the fast
      weights outgrew the step size (`experiments/results/claims/`). Their $\eta_t$ is then
      not divided by a curvature (`lr_normalization`).
    - `learn_initial_memory`: $W_0$ is an outer parameter, one per head, reset for every
      sequence (A-22); `False` freezes it (`jax.lax.stop_gradient`).

    **Feature map** $\phi$ on $\hat k$ and $\hat q$ (A-2, A-3; `memory="kernel"` uses none)

    - `feature_map`: `"identity"`, `"polynomial"` (exact, `feature_maps.Polynomial`),
      `"elementwise"` (`feature_maps.Elementwise`, keeps $d_k$), `"taylor"`
      (`feature_maps.TaylorExp`, fixed $1/i!$), or an `AbstractFeatureMap` instance (its
      array fields become one learnable copy per head; `feature_degree`, `feature_form`,
      `feature_include_constant` and `learn_feature_coefficients` configure the built-in
      maps only). An import path may also name a callable that returns an instance.
    - `feature_degree`: $p$ (A-2: 2). `feature_form`: `"monomial"` or `"tensor"`.
    - `feature_include_constant`: include $a_0$ (A-3: yes).
    - `learn_feature_coefficients`: the $a_i$ are learnable, one set per head (A-3).

    **Inner loop** (A-1, A-11, A-12, A-13, A-19, A-30)

    - `objective`: `"l2"` ($\tfrac12\|\cdot\|^2$, A-20), `"dot"` (Hebbian $-\langle\cdot\rangle$),
      `"huber"` (`huber()`, Yaad), `"lp"` (`lp()`, Moneta), or any callable
      `(prediction, target) -> scalar` (`Objective`), e.g. `huber(0.5)`. For
      `memory="kernel"` it picks the rule: `"dot"` is Hebbian, `"l2"` the delta rule.
    - `optimizer`: `"gd"`, `"momentum"` ($S_t = \theta_tS_{t-1} + g_t$), `"muon"`, or an
      `optimizers.InnerOptimizer` (for example `optimizers.from_optax(optax.adam(1e-2))`; a
      bare optax transformation is an error that says to wrap it). An import path may also
      name a callable that returns one. An object learner reads $\theta_t$ when its
      `uses_momentum` is set; its $\eta_t$ is divided by the curvature
      (`lr_normalization`) and scaled by $1-\theta_t$ (`lr_momentum_scaling`) only when its
      step is proportional to the momentum (`precondition` is `optimizers.no_precondition`),
      as for the built-in GD and momentum.
    - `ns_steps`: Newton-Schulz steps of Muon (5). `eta_inside_ns`: App. D.4 placement (A-1).
    - `muon_per_chunk`: NS once per chunk, an approximation for speed (A-13 (i)). The whole
      chunk's step $\sum_m\eta_m$ then rides on one NS, whose Jacobian is ~$a^5/\|S\|_F$ along
      the momentum's small singular directions: with b = 16 at atlas's $\eta_{\max}$ the inner
      recurrence is expanding and the outer gradient grows exponentially with T (~5,000 at
      T = 512 against ~20 for exact Muon; experiments/results/niah-extrapolate/gradient_norm.md).
    - `window`: $c$, the Omega window (A-30: 4). For `memory="kernel"` it is the number of
      gradient terms each step writes (`omega_window` of `kernel_memory_scan`: SWDT, Dot).
    - `chunk_size`: $b$ (A-11: configurable; 16 as in Miras). Gradients inside a chunk are
      taken at the chunk-start weights; `chunk_size=1` is the token-by-token rule. Part of the
      model, never a speed setting.
    - `method`: `"chunked"` (the fast path) or `"sequential"` (the oracle); equal results.
      A learner with no chunked form (an optax transformation other than `sgd` / `trace`,
      see `optimizers.from_optax`) runs sequentially under either: the same function, at the
      sequential path's speed (`scan_method` says which runs).
    - `block_size`: how many steps the exact chunk-parallel form processes together (linear
      memory, GD, `l2` or `dot`: `atlas_eqx._exact_chunked`); `None` is its measured default.
      A speed setting only: every value computes the same function.
    - `decay_first`: take gradients at the decayed state (Gated DeltaNet's order, I-12).

    **Gates**, per token and per head, $\sigma(w^\top x_t + b)$ of the layer input (A-7, A-29)

    - `lr_gate`: $\eta_t = \eta_{\max}\sigma(\cdot)$; `False` makes $\eta_t \equiv \eta_{\max}$.
    - `lr_max`: $\eta_{\max}$ (A-7: configurable). `lr_init`: $\eta$ at initialisation
      (bias $\mathrm{logit}(\eta_{init}/\eta_{\max})$; the digest gives no value).
    - `lr_normalization`: what $\eta_t$ of a GD or momentum learner is divided by, per
      head, from the learned initial memory $W_0$ (never below 1; Muon's step is a
      unit-spectral-norm direction and is never normalised). `"sampled_curvature"` (default):
      $\hat\kappa_{\mathcal M}(W_0)$, the largest Gauss-Newton eigenvalue over 16 fixed
      random unit inputs (`atlas_eqx.sampled_curvature`): 1 for a linear memory, about 3.4 for
      the default MLP memory at head dimension 16. A step then writes about as strongly as
      the linear memory's rule $\eta_{\max} = 1/(c\,\kappa_\phi)$ intends, for any memory,
      custom ones included, and it follows $W_0$ as the outer loop changes it. It is an
      estimate over typical directions, not a bound: at the gates' extremes (10k unit tokens,
      $\alpha = 1$, $\theta = 0.99$) `titans` without `memory_layer_norm` stays finite at head
      dimension 16 and diverges at head dimension 8 (with it, the preset's default, both stay
      finite). A layer-normalised branch (`memory_layer_norm`) is not normalised (1): its read
      ignores the scale of the last matrix, so $W_0$'s curvature, about 200 at head dimension
      16 (set by the branch's small variance at initialisation), says nothing of the steps that
      follow, and dividing by it stopped `titans` and `omeganet` learning (MQAR validation
      0.17 and 0.22 against 0.99 and 0.98 undivided, 800 steps, seed 0). `"curvature"`: the
      worst case over unit inputs, `AbstractMemory.curvature_bound` (about 12 for the default
      MLP memory), a guarantee against overshooting that makes deep memories write ~4x more
      weakly. `"mean_curvature"` is not offered: the mean (about 2) let `titans` diverge at the
      extremes at head dimension 16. `"none"`: $\eta_t$ as it is. Measurements: the README's step-size section.
    - `lr_momentum_scaling`: with `optimizer="momentum"`, the step is $\eta_t(1-\theta_t)$: the
      buffer sums about $1/(1-\theta)$ past gradients, so this keeps the step of a repeated
      direction at most $\eta_t$ for every $\theta_t$, including gates near 1.
    - `decay_gate`: $\alpha_t = \sigma(\cdot)$, one scalar per head for all memory matrices
      (A-29); `False` makes $\alpha_t \equiv 1$. `decay_init`: $\alpha$ at initialisation,
      a number (every head, A-7: 0.99) or a pair `(low, high)`: head $h$ starts at
      $\alpha_h$ with $1-\alpha_h$ spaced geometrically from $1-$`low` to $1-$`high`, so the
      heads start with time-scales $1/(1-\alpha)$ from 10 to 1000 tokens at the default
      `(0.9, 0.999)` (as fla's Gated DeltaNet spreads its decay over heads).
    - `momentum_gate`: $\theta_t = \sigma(\cdot)$ for `"momentum"` / `"muon"`; `False` makes
      $\theta_t \equiv$ `momentum_init`. `momentum_init`: 0.9 (A-7).
    - `gamma_mode`: the window gates $\gamma_{t,i}$ (A-8): `"none"` ((a): $\gamma_{t,i} =
      \eta_t$, i.e. `gamma=None`), `"token"` ((b), the default: $\eta_t\sigma(w^\top x_i + b)$,
      separable), `"offset"` ((c): a $c$-vector $\sigma(W x_t + b)$ per step, relative
      positions). `gamma_init`: $\gamma$ at initialisation (no digest value; 0.9).

    **Layout** (A-27, A-28; Titans §4.4)

    - `conv_size`: kernel of the causal depthwise convolution after each of the q, k, v
      projections (4; 0 switches it off).
    - `silu`: SiLU after the convolution (A-28). `qk_l2_norm`: $\ell_2$-normalise q and k per
      head before $\phi$ (A-27). `norm_eps`: the $\epsilon$ of both norms.
    - `output_norm`: per-head RMSNorm with a learnable scale on the memory output.
    - `output_gate`: $o \odot \mathrm{SiLU}(xW_g)$ (`"silu"`, as in fla's gated RMSNorm),
      $\sigma(xW_g)$ (`"sigmoid"`) or `"none"` (Titans §4.4: "normalization and gating with a
      linear layer before the final output projection").

    **Kernel memory** (`memory="kernel"`, A-15, A-16)

    - `kernel_normalize`: value augmentation $v' = [v; 1]$ and division, so that the Hebbian
      linear case is softmax attention (A-16: on).
    - `kernel_scale`: the kernel is $\exp(s\,q^\top k)$; `None` is $s = 1/\sqrt{d_k}$.
    - `kernel_window`: `None`, or $w$: only the last $w$ tokens stay in the non-parametric
      memory (sliding-window attention, I-29; Hebbian only).
    """

    d_model: int
    n_heads: int
    head_dim: int | None = None
    memory: str | MemoryFactory = "mlp"
    memory_depth: int = 2
    memory_expansion: int = 4
    memory_residual: bool | str = "auto"
    memory_activation: str = "gelu"
    memory_init_std: float | None = None
    memory_layer_norm: bool = False
    learn_initial_memory: bool = True
    feature_map: str | fm.AbstractFeatureMap = "polynomial"
    feature_degree: int = 2
    feature_form: str = "monomial"
    feature_include_constant: bool = True
    learn_feature_coefficients: bool = True
    objective: str | Objective = "l2"
    optimizer: str | iopt.InnerOptimizer | optax.GradientTransformation = "muon"
    ns_steps: int = 5
    eta_inside_ns: bool = False
    muon_per_chunk: bool = False
    window: int = 4
    chunk_size: int = 16
    method: str = "chunked"
    block_size: int | None = None
    decay_first: bool = False
    lr_gate: bool = True
    lr_max: float = 1.0
    lr_init: float = 0.5
    lr_normalization: str = "sampled_curvature"
    lr_momentum_scaling: bool = True
    decay_gate: bool = True
    decay_init: float | tuple[float, float] = (0.9, 0.999)
    momentum_gate: bool = True
    momentum_init: float = 0.9
    gamma_mode: str = "token"
    gamma_init: float = 0.9
    conv_size: int = 4
    silu: bool = True
    qk_l2_norm: bool = True
    norm_eps: float = 1e-6
    output_norm: bool = True
    output_gate: str = "silu"
    kernel_normalize: bool = True
    kernel_scale: float | None = None
    kernel_window: int | None = None

    def __post_init__(self):
        _check_int("d_model", self.d_model, 1)
        _check_int("n_heads", self.n_heads, 1)
        if self.head_dim is None:
            if self.d_model % self.n_heads != 0:
                raise ValueError(
                    f"MemoryLayerConfig: `d_model`={self.d_model} is not divisible by "
                    f"`n_heads`={self.n_heads}; pass `head_dim` explicitly or pick n_heads "
                    f"dividing d_model"
                )
        else:
            _check_int("head_dim", self.head_dim, 1)
        object.__setattr__(self, "_parts", _resolve_parts(self))
        _check_int("memory_depth", self.memory_depth, 1)
        _check_int("memory_expansion", self.memory_expansion, 1)
        if self.memory_residual not in (True, False, "auto"):
            raise ValueError(
                "MemoryLayerConfig: `memory_residual` must be True, False or 'auto'; got "
                f"{self.memory_residual!r}"
            )
        _check_choice("memory_activation", self.memory_activation, tuple(_ACTIVATIONS))
        if self.memory_init_std is not None and not self.memory_init_std >= 0:
            raise ValueError(
                f"MemoryLayerConfig: `memory_init_std` must be >= 0 or None; got "
                f"{self.memory_init_std!r}"
            )
        if self.memory_init_std == 0.0 and _named(self.memory) in ("mlp", "gated_mlp"):
            raise ValueError(
                "MemoryLayerConfig: `memory_init_std=0.0` (W_0 = 0) is only allowed for "
                "memory='linear'; an MLP memory at zero has zero gradients and never learns"
            )
        if not isinstance(self.memory_layer_norm, bool):
            raise ValueError(
                f"MemoryLayerConfig: `memory_layer_norm` must be True or False; got "
                f"{self.memory_layer_norm!r}"
            )
        _check_int("feature_degree", self.feature_degree, 1)
        _check_choice("feature_form", self.feature_form, _FEATURE_FORMS)
        _check_int("ns_steps", self.ns_steps, 0)
        _check_int("window", self.window, 1)
        _check_int("chunk_size", self.chunk_size, 1)
        _check_choice("method", self.method, _METHODS)
        if self.block_size is not None:
            _check_int("block_size", self.block_size, 1)
        for name in ("lr_max",):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"MemoryLayerConfig: `{name}` must be > 0; got {value!r}")
        if not 0 < self.lr_init < self.lr_max:
            raise ValueError(
                f"MemoryLayerConfig: `lr_init` must lie in (0, lr_max={self.lr_max}); got "
                f"{self.lr_init!r}"
            )
        decay_values = self.decay_init if isinstance(self.decay_init, tuple) else (self.decay_init,)
        if len(decay_values) not in (1, 2) or not all(
            isinstance(a, (int, float)) and 0 < a < 1 for a in decay_values
        ):
            raise ValueError(
                "MemoryLayerConfig: `decay_init` must be a number in (0, 1) or a pair (low, high) "
                f"of them; got {self.decay_init!r}"
            )
        for name in ("momentum_init", "gamma_init"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"MemoryLayerConfig: `{name}` must lie in (0, 1); got {value!r}")
        _check_choice("lr_normalization", self.lr_normalization, _LR_NORMALIZATIONS)
        if (
            self.lr_normalization == "curvature"
            and self.memory_layer_norm
            and _named(self.memory) in ("mlp", "gated_mlp")
        ):
            raise ValueError(
                "MemoryLayerConfig: lr_normalization='curvature' needs a curvature bound, and a "
                "memory with `memory_layer_norm=True` has none; use 'sampled_curvature' or 'none' "
                "(both leave its step undivided)"
            )
        _check_choice("gamma_mode", self.gamma_mode, _GAMMA_MODES)
        _check_int("conv_size", self.conv_size, 0)
        if not self.norm_eps > 0:
            raise ValueError(f"MemoryLayerConfig: `norm_eps` must be > 0; got {self.norm_eps!r}")
        _check_choice("output_gate", self.output_gate, _OUTPUT_GATES)
        if self.kernel_scale is not None and not self.kernel_scale > 0:
            raise ValueError(
                f"MemoryLayerConfig: `kernel_scale` must be > 0 or None; got {self.kernel_scale!r}"
            )
        if self.muon_per_chunk and (not self.preconditioned or self.method != "chunked"):
            raise ValueError(
                "MemoryLayerConfig: `muon_per_chunk=True` needs a preconditioned momentum "
                "learner (optimizer='muon') and method='chunked'"
            )
        if self.muon_per_chunk and self.decay_first:
            raise ValueError(
                "MemoryLayerConfig: `muon_per_chunk=True` does not support `decay_first=True`"
            )
        if self.eta_inside_ns and self.optimizer != "muon":
            raise ValueError("MemoryLayerConfig: `eta_inside_ns=True` needs optimizer='muon'")
        if self.memory == "kernel":
            if not (isinstance(self.objective, str) and self.objective in ("dot", "l2")):
                raise ValueError(
                    "MemoryLayerConfig: memory='kernel' has two rules, objective='dot' "
                    f"(Hebbian) and objective='l2' (delta); got {self.objective!r}"
                )
            if self.feature_map != "identity":
                raise ValueError(
                    "MemoryLayerConfig: memory='kernel' computes the exponential feature map "
                    "by the kernel trick; set feature_map='identity' (got "
                    f"{self.feature_map!r})"
                )
            if _named(self.optimizer) != "gd":
                raise ValueError(
                    "MemoryLayerConfig: memory='kernel' is written by plain GD (DeepTransformer, "
                    f"Dot); set optimizer='gd' (got {self.optimizer!r})"
                )
            if self.gamma_mode != "none":
                raise ValueError(
                    "MemoryLayerConfig: memory='kernel' takes no window gates gamma; set "
                    f"gamma_mode='none' (got {self.gamma_mode!r})"
                )
            if self.kernel_window is not None and self.objective != "dot":
                raise ValueError(
                    "MemoryLayerConfig: `kernel_window` (a sliding window of the kernel memory) "
                    "is only defined for the Hebbian rule, objective='dot'"
                )
        if self.kernel_window is not None:
            _check_int("kernel_window", self.kernel_window, 1)
            if self.memory != "kernel":
                raise ValueError("MemoryLayerConfig: `kernel_window` needs memory='kernel'")

    @property
    def d_head(self) -> int:
        """The per-head key / value dimension $d_k = d_v$."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def d_inner(self) -> int:
        """`n_heads * d_head`: the width of the q, k, v projections."""
        return self.n_heads * self.d_head

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemoryLayerConfig):
            return NotImplemented
        return self._value_key() == other._value_key()

    def __hash__(self) -> int:
        return hash(self._value_key())

    def _value_key(self) -> tuple:
        key = self.__dict__.get("_key")
        if key is None:
            key = tuple(
                (field.name, _value_key(getattr(self, field.name)))
                for field in dataclasses.fields(self)
            )
            object.__setattr__(self, "_key", key)
        return key

    @property
    def uses_momentum(self) -> bool:
        """Whether the inner learner reads $\\theta_t$."""
        return self.inner_optimizer().uses_momentum

    @property
    def preconditioned(self) -> bool:
        """Whether the learner's step is a preconditioned direction (Muon) rather than
        proportional to the momentum: then $\\eta_t$ is never curvature-normalised."""
        precondition = self.inner_optimizer().precondition
        return precondition is not None and precondition is not iopt.no_precondition

    @property
    def step_follows_gradient(self) -> bool:
        """Whether the step is $\\eta_tS_t$ (built-in GD and momentum, or any learner whose
        `precondition` is `optimizers.no_precondition`): the learners `lr_normalization` and
        `lr_momentum_scaling` apply to."""
        return self.inner_optimizer().precondition is iopt.no_precondition

    @property
    def scan_method(self) -> str:
        """The `omega_scan` method the layer runs: `method`, or `"sequential"` for a learner
        that has no chunked form."""
        optimizer = self.inner_optimizer()
        opaque = optimizer.precondition is None and iopt.linear_equivalent(optimizer) is None
        return "sequential" if opaque else self.method

    def rule_options(self) -> dict[str, Any]:
        """The `omega_scan` keywords that define each head's model (speed settings aside):
        objective, inner learner, window, chunk size and retention order."""
        return dict(
            objective=self.objective_function(),
            optimizer=self.inner_optimizer(),
            window=self.window,
            chunk_size=self.chunk_size,
            decay_first=self.decay_first,
        )

    def objective_function(self) -> Objective:
        """The attentional bias named by `objective`."""
        return self.__dict__["_parts"]["objective"]

    def decay_inits(self) -> tuple[float, ...]:
        """$\\alpha$ at initialisation for each head (see `decay_init`)."""
        if not isinstance(self.decay_init, tuple):
            return (float(self.decay_init),) * self.n_heads
        low, high = (math.log1p(-a) for a in self.decay_init)
        if self.n_heads == 1:
            return (-math.expm1(0.5 * (low + high)),)
        return tuple(
            -math.expm1(low + (high - low) * h / (self.n_heads - 1)) for h in range(self.n_heads)
        )

    def inner_optimizer(self) -> iopt.InnerOptimizer:
        """The inner learner named by `optimizer`."""
        if self.optimizer == "gd":
            return iopt.gd()
        if self.optimizer == "momentum":
            return iopt.momentum()
        if self.optimizer == "muon":
            return iopt.muon(ns_steps=self.ns_steps, eta_inside_ns=self.eta_inside_ns)
        return self.__dict__["_parts"]["optimizer"]

    def make_feature_map(self) -> fm.AbstractFeatureMap:
        """One head's $\\phi$ at its initial coefficients."""
        feature_map = self.__dict__["_parts"]["feature_map"]
        if feature_map is not None:
            return feature_map
        if self.feature_map == "identity":
            return fm.Identity()
        if self.feature_map == "polynomial":
            return fm.Polynomial(
                self.feature_degree,
                form=self.feature_form,
                learnable=self.learn_feature_coefficients,
                include_constant=self.feature_include_constant,
            )
        if self.feature_map == "elementwise":
            return fm.Elementwise(
                self.feature_degree,
                learnable=self.learn_feature_coefficients,
                include_constant=self.feature_include_constant,
            )
        return fm.TaylorExp(self.feature_degree)

    def make_memory(self, *, key: PRNGKeyArray) -> AbstractMemory:
        """One head's memory $\\mathcal M_0$ (its weights are the learned $W_0$)."""
        d_in = self.make_feature_map().out_dim(self.d_head)
        d_v = self.d_head
        hidden = self.memory_expansion * d_v
        activation = _ACTIVATIONS[self.memory_activation]
        factory = self.__dict__["_parts"]["memory"]
        if factory is not None:
            memory = factory(d_in, d_v, key=key)
            if not isinstance(memory, AbstractMemory):
                raise TypeError(
                    f"MemoryLayerConfig: the `memory` factory {_describe(self.memory)} must "
                    f"return an AbstractMemory; got {type(memory).__name__}"
                )
            if (memory.d_in, memory.d_out) != (d_in, d_v):
                raise ValueError(
                    f"MemoryLayerConfig: the `memory` factory {_describe(self.memory)} was "
                    f"called with (d_in={d_in}, d_out={d_v}) and returned a memory with "
                    f"d_in={memory.d_in}, d_out={memory.d_out}"
                )
            return memory
        if self.memory == "linear":
            return LinearMemory(d_in, d_v, key=key, init_std=self.memory_init_std)
        if self.memory == "mlp":
            return MLPMemory(
                d_in,
                d_v,
                key=key,
                hidden=hidden,
                depth=self.memory_depth,
                activation=activation,
                residual=self.memory_residual,  # pyright: ignore[reportArgumentType]
                init_std=self.memory_init_std,
                layer_norm=self.memory_layer_norm,
            )
        if self.memory == "gated_mlp":
            return GatedMLPMemory(
                d_in,
                d_v,
                key=key,
                hidden=hidden,
                activation=activation,
                residual=self.memory_residual,  # pyright: ignore[reportArgumentType]
                init_std=self.memory_init_std,
                layer_norm=self.memory_layer_norm,
            )
        raise ValueError("MemoryLayerConfig.make_memory: memory='kernel' has no weights")


def _named(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    return getattr(value, "__qualname__", None) or type(value).__name__


def _load(name: str, value: Any) -> Any:
    if isinstance(value, str) and is_import_path(value):
        return resolve_import_path(value, f"MemoryLayerConfig.{name}")
    return value


def _name_or_callable(name: str, value: Any, choices: tuple[str, ...], expected: str) -> Any:
    """The built-in name in `choices`, or the callable `value` names or is."""
    loaded = _load(name, value)
    if isinstance(loaded, str):
        _check_choice(name, loaded, choices)
        return loaded
    if not callable(loaded):
        raise ValueError(
            f"MemoryLayerConfig: `{name}` must be one of {choices}, an import path, or "
            f"{expected}; got {value!r}"
        )
    return loaded


def _resolve_parts(config: "MemoryLayerConfig") -> dict[str, Any]:
    """The objects behind `memory`, `feature_map`, `objective` and `optimizer` (`None` for a
    built-in name built on demand), resolving import paths and checking every kind."""
    memory = _name_or_callable(
        "memory", config.memory, _MEMORIES, "a factory (d_in, d_out, *, key) -> AbstractMemory"
    )
    if isinstance(memory, str):
        memory = None  # built on demand by `make_memory`

    feature_map = _load("feature_map", config.feature_map)
    if isinstance(feature_map, str):
        _check_choice("feature_map", feature_map, _FEATURE_MAPS)
        feature_map = None
    elif not isinstance(feature_map, fm.AbstractFeatureMap):
        if isinstance(config.feature_map, str) and callable(feature_map):
            feature_map = feature_map()
        if not isinstance(feature_map, fm.AbstractFeatureMap):
            raise ValueError(
                f"MemoryLayerConfig: `feature_map` must be one of {_FEATURE_MAPS}, an "
                f"import path, or a feature_maps.AbstractFeatureMap instance; got "
                f"{config.feature_map!r}"
            )

    objective = _name_or_callable(
        "objective",
        config.objective,
        tuple(_OBJECTIVES),
        "a callable (prediction, target) -> scalar",
    )
    if isinstance(objective, str):
        objective = _OBJECTIVES[objective]

    optimizer = _load("optimizer", config.optimizer)
    if isinstance(optimizer, str):
        _check_choice("optimizer", optimizer, _OPTIMIZERS)
        optimizer = None
    else:
        if isinstance(config.optimizer, str) and callable(optimizer):
            optimizer = optimizer()
        if isinstance(optimizer, optax.GradientTransformation):
            raise ValueError(
                "MemoryLayerConfig: `optimizer` is an optax.GradientTransformation; wrap it "
                "as the inner learner with `optimizers.from_optax(...)`"
            )
        if not isinstance(optimizer, iopt.InnerOptimizer):
            raise ValueError(
                f"MemoryLayerConfig: `optimizer` must be one of {_OPTIMIZERS}, an import "
                f"path, or an optimizers.InnerOptimizer; got {config.optimizer!r}"
            )
    return dict(memory=memory, feature_map=feature_map, objective=objective, optimizer=optimizer)


def _value_key(value: Any) -> Any:
    """A hashable stand-in for a config value: itself when hashable, else its tree structure
    with every array leaf replaced by its shape, dtype and bytes."""
    try:
        hash(value)
        return value
    except TypeError:
        pass
    leaves, treedef = jax.tree.flatten(value)
    keys = []
    for leaf in leaves:
        if isinstance(leaf, (jax.Array, np.ndarray)):
            try:
                array = np.asarray(leaf)
            except jax.errors.TracerArrayConversionError:
                keys.append(("traced", id(leaf)))
                continue
            keys.append(("array", array.shape, str(array.dtype), array.tobytes()))
        else:
            keys.append(leaf)
    return (treedef, tuple(keys))


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"MemoryLayerConfig: `{name}` must be an integer >= {low}; got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"MemoryLayerConfig: `{name}` must be one of {choices}; got {value!r}")


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class MemoryInputs(eqx.Module):
    """The per-head inputs of the memories, each with a leading head axis `H`.

    `q`, `k`: $\\hat q, \\hat k$ before $\\phi$ `(H, T, d_k)`; `v`: `(H, T, d_v)`; `lr` ($\\eta$),
    `decay` ($\\alpha$): `(H, T)`; `momentum` ($\\theta$): `(H, T)` or `None` (GD); `gamma`:
    `(H, T)` (`gamma_mode="token"`), `(H, T, c)` (`"offset"`) or `None` (`"none"`).
    """

    q: Float[Array, "H T d_k"]
    k: Float[Array, "H T d_k"]
    v: Float[Array, "H T d_v"]
    lr: Float[Array, "H T"]
    decay: Float[Array, "H T"]
    momentum: Float[Array, "H T"] | None
    gamma: Float[Array, "H T"] | Float[Array, "H T c"] | None


class MemoryLayerState(eqx.Module):
    """The streaming state of a `MemoryLayer`.

    - `conv`: the last `conv_size - 1` projected (pre-convolution) q, k, v rows, oldest first,
      `(conv_size - 1, 3 * n_heads * head_dim)`.
    - `memory`: the per-head memory state, stacked over heads: an `OmegaState` (parametric
      memories) or the kernel memory's state (`memory="kernel"`).
    """

    conv: Float[Array, "history channels"]
    memory: Any


def causal_depthwise_conv(
    x: Float[Array, "T channels"],
    weight: Float[Array, "channels K"],
    history: Float[Array, "history channels"],
) -> tuple[Float[Array, "T channels"], Float[Array, "history channels"]]:
    r"""Causal depthwise convolution, $y_t = \sum_{j=0}^{K-1} w_{:,j}\odot x_{t-K+1+j}$.

    `history` holds $x_{-K+1..-1}$ (zeros at the start of a sequence, which is zero padding),
    `(K - 1, channels)`. Returns $y$ and the new history (the last $K-1$ rows).
    """
    K = weight.shape[1]
    T = x.shape[0]
    padded = jnp.concatenate([history.astype(x.dtype), x], axis=0)
    weight = weight.astype(x.dtype)
    # A sum of K shifted, scaled copies. (Stacking the taps for an einsum over K lowers to a
    # batched dot of length-K rows: the titans layer's forward+backward at T = 2048, d_model
    # 128 took 553 ms with it against 454 ms with this, same process, interleaved.)
    y = padded[:T] * weight[:, 0]
    for j in range(1, K):
        y = y + padded[j : j + T] * weight[:, j]
    return y, padded[T:]


def _rms_norm(x: Array, scale: Array, eps: float) -> Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _l2_normalise(x: Array, eps: float) -> Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _stack(module: Any, n: int) -> Any:
    """`module` with every array leaf repeated along a new leading axis of size `n`."""
    arrays, static = eqx.partition(module, eqx.is_array)
    arrays = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), arrays)
    return eqx.combine(arrays, static)


class _Gate(eqx.Module):
    weight: Float[Array, "out d_model"]
    bias: Float[Array, " out"]

    def __init__(self, d_model: int, out: int, bias: float | Array, *, key: PRNGKeyArray):
        bound = 1.0 / math.sqrt(d_model)
        self.weight = jax.random.uniform(key, (out, d_model), minval=-bound, maxval=bound)
        self.bias = jnp.broadcast_to(jnp.asarray(bias, dtype=float), (out,))

    def __call__(self, x: Float[Array, "T d_model"]) -> Float[Array, "T out"]:
        return jax.nn.sigmoid(x @ self.weight.T.astype(x.dtype) + self.bias.astype(x.dtype))


def _dense(key: PRNGKeyArray, d_out: int, d_in: int) -> Float[Array, "d_out d_in"]:
    bound = 1.0 / math.sqrt(d_in)
    return jax.random.uniform(key, (d_out, d_in), minval=-bound, maxval=bound)


class MemoryLayer(AbstractMixer):
    r"""A test-time-memory token mixer: ATLAS / OmegaNet / Titans / DeltaNet / ... (ATLAS §5.1).

    For one sequence $x\in\mathbb R^{T\times d}$ (digest §7.1, A-27, A-28):

    1. $q, k, v = \mathrm{SiLU}(\mathrm{conv}_4(xW_q)), \dots$ (projection, causal depthwise
       convolution, SiLU), split into heads; $\hat q, \hat k$ are $\ell_2$-normalised per head.
    2. Gates from $x$, per token and head: $\eta_t = \eta_{\max}\sigma(w_\eta^\top x_t +
       b_\eta)$, $\alpha_t = \sigma(\cdot)$, $\theta_t = \sigma(\cdot)$, $\gamma$ per
       `gamma_mode` (A-7, A-8).
    3. Per head, the Omega rule with the inner optimiser (ATLAS Eqs 9-10, 32-33):
       $g_t = \nabla\sum_{i=t-c+1}^{t}\gamma_{t,i}\,\ell(\mathcal M(\phi(\hat k_i)), v_i)$,
       $S_t = \theta_tS_{t-1} + g_t$, $W_t = \alpha_tW_{t-1} - \eta_tP(S_t)$,
       $y_t = \mathcal M(\phi(\hat q_t); W_t)$, starting every sequence at the learned $W_0$
       (A-22); `memory="kernel"` uses `kernel_memory_scan` instead: $W_0 = 0$ and the exp
       kernel by the kernel trick (ATLAS Eqs 25-29).
    4. $o = \mathrm{RMSNorm}_h(y)\odot\mathrm{SiLU}(xW_g)$, $\mathrm{out} = oW_o$ (Titans §4.4).

    Streaming (`init_state` / `stream`) equals `__call__` over the concatenation when
    `chunk_size=1`, or when every piece but the last has a length that is a multiple of
    `chunk_size` (every `stream` call starts a new chunk). Decoding one token at a time after
    a prefill is therefore `chunk_size=1` from the prefill's end on: the model it computes is
    the frozen-anchor rule whose chunk boundaries are the prefill's chunks followed by one
    chunk per decoded token (digest I-40).
    """

    config: MemoryLayerConfig = eqx.field(static=True)
    d_model: int = eqx.field(static=True)
    q_proj: Float[Array, "d_inner d_model"]
    k_proj: Float[Array, "d_inner d_model"]
    v_proj: Float[Array, "d_inner d_model"]
    conv_weight: Float[Array, "channels K"] | None
    lr_gate: _Gate | None
    decay_gate: _Gate | None
    momentum_gate: _Gate | None
    gamma_gate: _Gate | None
    memory: AbstractMemory | None
    feature_map: fm.AbstractFeatureMap
    norm_scale: Float[Array, "H d_head"] | None
    gate_proj: Float[Array, "d_inner d_model"] | None
    out_proj: Float[Array, "d_model d_inner"]

    def __init__(self, config: MemoryLayerConfig, *, key: PRNGKeyArray):
        """**Arguments:**

        - `config`: a `MemoryLayerConfig`.
        - `key`: a JAX PRNG key for every parameter.
        """
        if not isinstance(config, MemoryLayerConfig):
            raise ValueError(
                f"MemoryLayer: `config` must be a MemoryLayerConfig; got {type(config).__name__}"
            )
        c = config
        H, dh, d, inner = c.n_heads, c.d_head, c.d_model, c.d_inner
        keys = iter(jax.random.split(key, 12))
        self.config = c
        self.d_model = d
        self.q_proj = _dense(next(keys), inner, d)
        self.k_proj = _dense(next(keys), inner, d)
        self.v_proj = _dense(next(keys), inner, d)
        if c.conv_size > 0:
            bound = 1.0 / math.sqrt(c.conv_size)
            self.conv_weight = jax.random.uniform(
                next(keys), (3 * inner, c.conv_size), minval=-bound, maxval=bound
            )
        else:
            self.conv_weight = None
            next(keys)
        self.lr_gate = _Gate(d, H, _logit(c.lr_init / c.lr_max), key=next(keys))
        self.decay_gate = _Gate(
            d, H, jnp.array([_logit(a) for a in c.decay_inits()]), key=next(keys)
        )
        self.momentum_gate = _Gate(d, H, _logit(c.momentum_init), key=next(keys))
        n_gamma = H * c.window if c.gamma_mode == "offset" else H
        self.gamma_gate = _Gate(d, n_gamma, _logit(c.gamma_init), key=next(keys))
        if not c.lr_gate:
            self.lr_gate = None
        if not c.decay_gate:
            self.decay_gate = None
        if not (c.momentum_gate and c.uses_momentum):
            self.momentum_gate = None
        if c.gamma_mode == "none":
            self.gamma_gate = None
        memory_key = next(keys)
        if c.memory == "kernel":
            self.memory = None
        else:
            self.memory = eqx.filter_vmap(lambda k: c.make_memory(key=k))(
                jax.random.split(memory_key, H)
            )
        self.feature_map = _stack(c.make_feature_map(), H)
        self.norm_scale = jnp.ones((H, dh)) if c.output_norm else None
        self.gate_proj = _dense(next(keys), inner, d) if c.output_gate != "none" else None
        self.out_proj = _dense(next(keys), d, inner)

    # ----------------------------------------------------------------------------------------
    # The three stages, exposed so that tests can check each one.

    def _inputs(
        self, x: Float[Array, "T d_model"], conv_history: Float[Array, "history channels"]
    ) -> tuple[MemoryInputs, Float[Array, "history channels"]]:
        c = self.config
        H, dh = c.n_heads, c.d_head
        T = x.shape[0]
        # q, k and v each go through their own channels of the depthwise convolution; working
        # on them apart (rather than on one concatenated [q k v]) spares the backward the
        # large transposed copies that XLA:CPU makes when it splits the concatenation.
        inner = H * dh
        channels = [slice(i * inner, (i + 1) * inner) for i in range(3)]
        projected, histories = [], []
        for w, part in zip((self.q_proj, self.k_proj, self.v_proj), channels, strict=True):
            a = x @ w.T.astype(x.dtype)
            if self.conv_weight is not None:
                a, history = causal_depthwise_conv(a, self.conv_weight[part], conv_history[:, part])
                histories.append(history)
            if c.silu:
                a = jax.nn.silu(a)
            projected.append(a.reshape(T, H, dh).transpose(1, 0, 2))
        if histories:
            conv_history = jnp.concatenate(histories, axis=-1)
        q, k, v = projected
        if c.qk_l2_norm:
            q, k = _l2_normalise(q, c.norm_eps), _l2_normalise(k, c.norm_eps)

        def per_head(gate: _Gate | None, constant: float) -> Array:
            if gate is None:
                return jnp.full((H, T), constant, x.dtype)
            return gate(x).T

        decay = per_head(self.decay_gate, 1.0)
        momentum = per_head(self.momentum_gate, c.momentum_init) if c.uses_momentum else None
        lr = self.inner_step_size(per_head(self.lr_gate, 1.0), momentum)
        if self.gamma_gate is None:
            gamma = None
        elif c.gamma_mode == "offset":
            gamma = self.gamma_gate(x).reshape(T, H, -1).transpose(1, 0, 2)
        else:
            gamma = self.gamma_gate(x).T
        return MemoryInputs(q, k, v, lr, decay, momentum, gamma), conv_history

    def inner_step_size(
        self, lr_gate: Float[Array, "H T"], momentum: Float[Array, "H T"] | None
    ) -> Float[Array, "H T"]:
        r"""$\eta_t$ from the step gate's value $\sigma_t \in [0, 1]$ (1 without a gate):
        $\eta_{\max}\sigma_t$, divided by `curvature_normalizer()` per head, and times
        $1-\theta_t$ under `lr_momentum_scaling` with `optimizer="momentum"`. With
        $\sigma_t = 1$ it is the largest step the layer can take."""
        c = self.config
        lr = c.lr_max * lr_gate / self.curvature_normalizer().astype(lr_gate.dtype)[:, None]
        if c.uses_momentum and c.step_follows_gradient and c.lr_momentum_scaling:
            if momentum is None:
                raise ValueError("MemoryLayer.inner_step_size: momentum learners need `momentum`")
            lr = lr * (1 - momentum)
        return lr

    def curvature_normalizer(self) -> Float[Array, " H"]:
        r"""Per head, what $\eta_t$ is divided by (`lr_normalization`), never below 1:
        `sampled_curvature` or `curvature_bound` of the learned initial memory $W_0$ for GD and
        momentum learners on parametric memories, else 1 (also for a memory whose
        `scale_invariant_output` is true, such as a layer-normalised branch,
        `memory_layer_norm`)."""
        c = self.config
        ones = jnp.ones((c.n_heads,), self.q_proj.dtype)
        if c.lr_normalization == "none" or not c.step_follows_gradient or self.memory is None:
            return ones
        if isinstance(self.memory, LinearMemory):
            return ones  # both curvatures are exactly ||x||^2 = 1
        if self.memory.scale_invariant_output:
            return ones  # W_0's curvature says nothing of later steps
        if c.lr_normalization == "sampled_curvature":
            curvature = eqx.filter_vmap(sampled_curvature)(self._initial_memory())
        elif type(self.memory).curvature_bound is AbstractMemory.curvature_bound:
            return ones
        else:
            curvature = eqx.filter_vmap(lambda m: m.curvature_bound())(self._initial_memory())
        return jnp.maximum(curvature, 1.0)

    def memory_inputs(self, x: Float[Array, "T d_model"]) -> MemoryInputs:
        """The per-head memory inputs $(\\hat q, \\hat k, v, \\eta, \\alpha, \\theta, \\gamma)$ of
        a sequence that starts here (zero convolution history)."""
        inputs, _ = self._inputs(x, self._empty_conv(x.dtype))
        return inputs

    def initial_memory_state(self, max_length: int | None = None) -> Any:
        """The per-head memory state at the start of a sequence, stacked over heads: an
        `OmegaState` ($W_0$, $S_0 = 0$, an empty window), or for `memory="kernel"` an empty
        `KernelMemoryState` holding up to `max_length` tokens (required there)."""
        c = self.config
        if c.memory == "kernel":
            if not isinstance(max_length, int) or max_length < 1:
                raise ValueError(
                    "MemoryLayer: memory='kernel' stores every token; its state needs "
                    f"`max_length` (an integer >= 1); got {max_length!r}"
                )
            state = init_kernel_memory_state(
                max_length,
                c.d_head,
                c.d_head,
                normalize=c.kernel_normalize,
                dtype=self.q_proj.dtype,
            )
            return _stack(state, c.n_heads)
        memory = self._initial_memory()
        optimizer = c.inner_optimizer()
        equivalent = iopt.linear_equivalent(optimizer) if optimizer.precondition is None else None
        if equivalent is not None and c.scan_method != "sequential":
            optimizer = equivalent[0]  # the fast paths run an optax learner as gd / momentum
        return eqx.filter_vmap(lambda m: init_omega_state(m, optimizer, c.window))(memory)

    def run_memory(
        self, inputs: MemoryInputs, state: Any = None
    ) -> tuple[Float[Array, "H T d_v"], Any]:
        r"""Run every head's memory on `inputs`, one scan per head (vmapped over heads).

        Parametric memories: `omega_scan`; `state` is a per-head state from
        `initial_memory_state` or a previous call, `None` starts from $W_0$. Kernel memory:
        `kernel_memory_scan` (the quadratic form) when `state` is `None`, and then the returned
        state is `None`; `kernel_memory_stream` otherwise. Returns the reads $y$ `(H, T, d_v)`
        and the new state.

        The scans run with `check_values=False`: every gate here is a sigmoid (times a
        positive constant), in range by construction, and leaving out the runtime checks'
        host callbacks lets JAX's persistent compilation cache store compiled models.
        """
        c = self.config
        i = inputs
        if c.memory == "kernel":
            options: dict[str, Any] = dict(
                kernel="exp",
                rule="hebbian" if c.objective == "dot" else "delta",
                window=c.kernel_window,
                omega_window=c.window,
                normalize=c.kernel_normalize,
                scale=c.kernel_scale,
                check_values=False,
            )
            if state is None:
                scan = lambda q, k, v, lr, decay: kernel_memory_scan(q, k, v, lr, decay, **options)
                return jax.vmap(scan)(i.q, i.k, i.v, i.lr, i.decay), None
            stream = lambda q, k, v, lr, decay, s: kernel_memory_stream(
                q, k, v, lr, decay, s, **options
            )
            return jax.vmap(stream)(i.q, i.k, i.v, i.lr, i.decay, state)
        if state is None:
            state = self.initial_memory_state()
        rule = c.rule_options()

        def head(feature_map, q, k, v, lr, decay, momentum, gamma, head_state):
            return omega_scan(
                head_state.memory,
                q,
                k,
                v,
                lr,
                decay,
                momentum,
                gamma,
                feature_map=feature_map,
                **rule,
                method=c.scan_method,  # pyright: ignore[reportArgumentType]
                block_size=c.block_size,
                state=head_state,
                muon_per_chunk=c.muon_per_chunk,
                check_values=False,
            )

        return eqx.filter_vmap(head)(
            self.feature_map, i.q, i.k, i.v, i.lr, i.decay, i.momentum, i.gamma, state
        )

    def combine_heads(
        self, x: Float[Array, "T d_model"], y: Float[Array, "H T d_v"]
    ) -> Float[Array, "T d_model"]:
        """Output norm per head, output gate from `x`, output projection."""
        c = self.config
        if self.norm_scale is not None:
            y = _rms_norm(y, self.norm_scale[:, None, :].astype(y.dtype), c.norm_eps)
        o = y.transpose(1, 0, 2).reshape(x.shape[0], c.d_inner)
        if self.gate_proj is not None:
            g = x @ self.gate_proj.T.astype(x.dtype)
            o = o * (jax.nn.silu(g) if c.output_gate == "silu" else jax.nn.sigmoid(g))
        return o @ self.out_proj.T.astype(o.dtype)

    # ----------------------------------------------------------------------------------------

    def _empty_conv(self, dtype: Any) -> Float[Array, "history channels"]:
        c = self.config
        return jnp.zeros((max(c.conv_size - 1, 0), 3 * c.d_inner), dtype)

    def _initial_memory(self) -> AbstractMemory:
        assert self.memory is not None
        if self.config.learn_initial_memory:
            return self.memory
        return jax.lax.stop_gradient(self.memory)

    def init_state(self, max_length: int) -> MemoryLayerState:
        """The streaming state at the start of a sequence. The parametric memories have a
        fixed-size state and ignore `max_length`; for `memory="kernel"` it is the number of
        tokens the stream may hold."""
        dtype = self.q_proj.dtype
        return MemoryLayerState(
            conv=self._empty_conv(dtype), memory=self.initial_memory_state(max_length)
        )

    def stream(
        self, x: Float[Array, "T d_model"], state: MemoryLayerState
    ) -> tuple[Float[Array, "T d_model"], MemoryLayerState]:
        """Continue a stream with the next `x`; see the class docstring for when pieces compose
        exactly."""
        self._check_input(x)
        inputs, conv = self._inputs(x, state.conv)
        y, memory_state = self.run_memory(inputs, state.memory)
        return self.combine_heads(x, y), MemoryLayerState(conv=conv, memory=memory_state)

    def __call__(self, x: Float[Array, "T d_model"]) -> Float[Array, "T d_model"]:
        """The layer over one whole sequence, `(T, d_model) -> (T, d_model)`."""
        self._check_input(x)
        inputs, _ = self._inputs(x, self._empty_conv(x.dtype))
        y, _ = self.run_memory(inputs)
        return self.combine_heads(x, y)

    def diagnose(self, x: Float[Array, "T d_model"]) -> DivergenceReport:
        """The divergence diagnostic (`atlas_eqx.diagnose_scan`) of every head's memory on the
        sequence `x`, stacked over heads: the first non-finite step and the growth of the
        fast weights. Opt-in and slower than `__call__`; parametric memories only."""
        c = self.config
        if self.memory is None:
            raise ValueError("MemoryLayer.diagnose: memory='kernel' has no fast weights")
        self._check_input(x)
        i = self.memory_inputs(x)
        rule = c.rule_options()

        def head(memory, feature_map, q, k, v, lr, decay, momentum, gamma):
            return diagnose_scan(
                memory, q, k, v, lr, decay, momentum, gamma, feature_map=feature_map, **rule
            )

        return eqx.filter_vmap(head)(
            self._initial_memory(),
            self.feature_map,
            i.q,
            i.k,
            i.v,
            i.lr,
            i.decay,
            i.momentum,
            i.gamma,
        )

    def _check_input(self, x: Array) -> None:
        if x.ndim != 2 or x.shape[1] != self.d_model:
            raise ValueError(
                f"MemoryLayer: `x` must have shape (T, d_model={self.d_model}) (one sequence; "
                f"jax.vmap for a batch); got {x.shape}"
            )
        if x.shape[0] == 0:
            raise ValueError(
                "MemoryLayer: `x` is empty (T = 0); a sequence needs at least one token"
            )
