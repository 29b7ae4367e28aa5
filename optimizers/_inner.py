import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial
from jaxtyping import PyTree, ScalarLike

from ._newton_schulz import JORDAN_COEFFICIENTS, newton_schulz


class InnerOptimizer(NamedTuple):
    r"""An inner-loop learner in the style of `optax.GradientTransformation`.

    - `init(params) -> state`
    - `update(grads, state, params, *, lr, decay, momentum) -> (updates, state)`, where `lr`
      ($\eta_t$), `decay` ($\alpha_t$) and `momentum` ($\theta_t$) are the *per-token* scalars
      of the current step. Apply with `optax.apply_updates(params, updates)`.
    - `precondition`: the map $P$ applied to the momentum before the step (identity for GD and
      momentum, Newton-Schulz per 2-D weight for Muon), or `None` for an opaque learner that
      only the sequential path can run.
    - `uses_momentum`: whether $\theta_t$ is read.
    - `eta_inside_precondition`: Muon's App. D.4 placement of $\eta_t$ (`muon(eta_inside_ns=...)`).
    - `nesterov`: the step is $\theta_tP(S_t) + g_t$ instead of $P(S_t)$ (`momentum(nesterov=True)`).
    - `linear_form`: for an optax learner (`from_optax`) whose update is linear in the
      gradient with one constant momentum, its `LinearForm`; the fast paths then run it as
      the equivalent built-in learner. `None` otherwise.

    Every built-in learner computes the canonical ATLAS step (digest 4.1)

    $$S_t = \theta_t S_{t-1} + g_t,\qquad W_t = \alpha_t W_{t-1} - \eta_t P(S_t).$$

    The fields are module-level functions or `jax.tree_util.Partial`s, so two calls of a
    factory with the same arguments compare equal and reuse compiled code.
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]
    precondition: Callable[[PyTree], PyTree] | None
    uses_momentum: bool
    eta_inside_precondition: bool = False
    linear_form: "LinearForm | None" = None
    nesterov: bool = False


class LinearForm(NamedTuple):
    r"""An optax update that is linear in the gradient with one constant momentum $\beta$:

    $$S_t = \beta S_{t-1} + g_t,\qquad u_t = \kappa S_t + \delta g_t.$$

    `optax.sgd(lr)` is $(\beta, \kappa, \delta) = (0, 0, -lr)$, `optax.sgd(lr, momentum=b)`
    is $(b, -lr, 0)$, `optax.trace(b)` is $(b, 1, 0)$ and Nesterov momentum is
    $(b, -lr\,b, -lr)$.
    """

    momentum: float
    momentum_weight: float
    gradient_weight: float


class EmptyState(NamedTuple):
    """State of a learner without memory (plain GD)."""


class MomentumState(NamedTuple):
    """The momentum buffer $S$, one leaf per parameter."""

    momentum: PyTree


class _Partial(Partial):
    """A `jax.tree_util.Partial` that compares and hashes by value.

    `Partial` inherits identity equality from `functools.partial`, so `muon() == muon()` would be
    `False` and an `InnerOptimizer` held as a static field (or a `jax.jit` static argument) would
    retrace for every factory call. Flattening is the same as `Partial`'s.
    """

    def __eq__(self, other):
        if not isinstance(other, _Partial):
            return NotImplemented
        return (self.func, self.args, self.keywords) == (other.func, other.args, other.keywords)

    def __hash__(self):
        return hash((self.func, self.args, tuple(sorted(self.keywords.items()))))


jax.tree_util.register_pytree_node(
    _Partial,
    lambda partial: ((partial.args, partial.keywords), partial.func),
    lambda func, children: _Partial(func, *children[0], **children[1]),
)


def no_precondition(tree: PyTree) -> PyTree:
    """The identity preconditioner $P(S) = S$ of GD and momentum."""
    return tree


def _retain_and_step(params: PyTree, direction: PyTree, lr: ScalarLike, decay: ScalarLike):
    # W_t = alpha W - eta D, written as an additive update for optax.apply_updates.
    return jax.tree.map(lambda w, d: (decay - 1.0) * w - lr * d, params, direction)


def _gd_init(params: PyTree) -> EmptyState:
    del params
    return EmptyState()


def _gd_update(grads, state, params, *, lr, decay, momentum=None):
    del momentum
    return _retain_and_step(params, grads, lr, decay), state


def gd() -> InnerOptimizer:
    r"""Gradient descent with retention (OmegaNet, DeltaNet, Titans- ; ATLAS Eq 10, 56).

    $$W_t = \alpha_t W_{t-1} - \eta_t g_t.$$
    """
    return InnerOptimizer(_gd_init, _gd_update, no_precondition, uses_momentum=False)


def _momentum_init(params: PyTree) -> MomentumState:
    return MomentumState(jax.tree.map(jnp.zeros_like, params))


def _momentum_update(
    grads,
    state,
    params,
    *,
    lr,
    decay,
    momentum,
    precondition,
    eta_inside_precondition=False,
    nesterov=False,
):
    if eta_inside_precondition:
        grads = jax.tree.map(lambda g: lr * g, grads)
        lr = 1.0
    # The buffer keeps its dtype: float64 per-token scalars (x64) or a float32 gate with bf16
    # weights must not promote the state, or a `lax.scan` carry changes type.
    buffer = jax.tree.map(lambda s, g: (momentum * s + g).astype(s.dtype), state.momentum, grads)
    direction = precondition(buffer)
    if nesterov:
        direction = jax.tree.map(lambda d, g: (momentum * d + g).astype(d.dtype), direction, grads)
    return _retain_and_step(params, direction, lr, decay), MomentumState(buffer)


def momentum(nesterov: bool = False) -> InnerOptimizer:
    r"""Gradient descent with momentum and retention (Titans Eqs 13-14 in ATLAS's form, Eq 12-13).

    $$S_t = \theta_t S_{t-1} + g_t,\qquad W_t = \alpha_t W_{t-1} - \eta_t S_t.$$

    This equals Titans' form $S_t = \theta_t S_{t-1} - \eta_t g_t$, $W_t = \alpha_t W_{t-1} + S_t$
    exactly when $\eta$ is constant (digest I-15).

    `nesterov=True` steps along $\theta_tS_t + g_t$ instead (Sutskever's form of Nesterov
    momentum, as `optax.sgd(..., nesterov=True)`): $W_t = \alpha_tW_{t-1} - \eta_t(\theta_tS_t
    + g_t)$. It is not in the paper; it is how `from_optax` runs optax's Nesterov on the fast
    paths.
    """
    update = _Partial(_momentum_update, precondition=no_precondition, nesterov=nesterov)
    return InnerOptimizer(
        _momentum_init, update, no_precondition, uses_momentum=True, nesterov=nesterov
    )


def _newton_schulz_per_matrix(tree: PyTree, *, steps, coefficients, eps) -> PyTree:
    def leaf(x):
        if x.ndim != 2:
            return x
        return newton_schulz(x, steps=steps, coefficients=coefficients, eps=eps)

    return jax.tree.map(leaf, tree)


def muon(
    ns_steps: int = 5,
    coefficients: Sequence[float] = JORDAN_COEFFICIENTS,
    eps: float = 1e-7,
    *,
    eta_inside_ns: bool = False,
) -> InnerOptimizer:
    r"""ATLAS's inner Muon (ATLAS Eqs 32-33, with the sign fixed as in digest 4.1).

    $$S_t = \theta_t S_{t-1} + g_t,\qquad W_t = \alpha_t W_{t-1} - \eta_t\,\mathrm{NS}_k(S_t),$$

    with `newton_schulz` applied to each 2-D weight separately; other leaves take the plain
    momentum step. This is not `optax.contrib.muon`: no EMA, no Nesterov, no shape factor.

    `eta_inside_ns=True` reproduces ATLAS App. D.4 (Eqs 57-58) and lucidrains' titans-pytorch:
    $S_t = \theta_t S_{t-1} + \eta_t g_t$, $W_t = \alpha_t W_{t-1} - \mathrm{NS}_k(S_t)$. Since NS
    is scale invariant, $\eta_t$ then only reweights tokens against the decayed history.
    """
    if ns_steps < 0:
        raise ValueError(f"muon: `ns_steps` must be >= 0; got {ns_steps}")
    coefficients = tuple(float(c) for c in coefficients)
    if len(coefficients) != 3:
        raise ValueError(f"muon: `coefficients` must be (a, b, c); got {coefficients}")
    precondition = _Partial(
        _newton_schulz_per_matrix, steps=ns_steps, coefficients=coefficients, eps=eps
    )
    update = _Partial(
        _momentum_update, precondition=precondition, eta_inside_precondition=eta_inside_ns
    )
    return InnerOptimizer(
        _momentum_init,
        update,
        precondition,
        uses_momentum=True,
        eta_inside_precondition=eta_inside_ns,
    )


def _optax_update(grads, state, params, *, lr, decay, momentum=None, transformation):
    del momentum
    direction, state = transformation.update(grads, state, params)
    step = jax.tree.map(lambda w, u: (decay - 1.0) * w + lr * u, params, direction)
    return step, state


def from_optax(transformation: optax.GradientTransformation) -> InnerOptimizer:
    r"""Run any `optax.GradientTransformation` as the inner learner.

    With $u_t$ the transformation's output for the window gradient $g_t$:

    $$W_t = \alpha_t W_{t-1} + \eta_t u_t.$$

    The transformation supplies the direction *with its sign*, so `from_optax(optax.sgd(1.0))`
    equals `gd()`, and `from_optax(optax.sgd(1.0, momentum=0.9))` equals `momentum()` with
    $\theta_t \equiv 0.9$. The per-token $\eta_t$ and $\alpha_t$ stay outside the transformation.

    `method="sequential"` runs the transformation itself, any transformation. The fast paths
    run those whose update is linear in the gradient with one constant momentum and no
    dependence on the weights or the step count (`optax.sgd` with or without momentum or
    Nesterov momentum, `optax.trace`): `from_optax` identifies that `LinearForm` by probing
    the transformation with impulses and checks it on a random gradient sequence, and the
    fast paths then run the equivalent `gd()`, `momentum()` or `momentum(nesterov=True)` (a
    carried `state` then holds that learner's buffer, not the optax state). Everything else
    (adaptive, clipped, weight- or step-dependent transformations) is sequential only, and
    the fast paths say so.
    """
    update = _Partial(_optax_update, transformation=transformation)
    return InnerOptimizer(
        transformation.init,
        update,
        None,
        uses_momentum=False,
        linear_form=_identify_linear_form(transformation),
    )


def _run_transformation(transformation, gradients, params):
    state = transformation.init(params)
    outputs = []
    for gradient in gradients:
        output, state = transformation.update(gradient, state, params)
        outputs.append(output)
    return jnp.stack(outputs)


def _identify_linear_form(transformation: optax.GradientTransformation) -> LinearForm | None:
    """`transformation`'s `LinearForm`, or `None` when it has none (nonlinear, weight- or
    step-dependent, or coupled across coordinates)."""
    with jax.ensure_compile_time_eval():
        dtype = jnp.zeros(()).dtype
        params = jnp.zeros((3,), dtype)
        impulse = [jnp.array([1.0, 0.0, 0.0], dtype)] + [jnp.zeros((3,), dtype)] * 3
        try:
            response = _run_transformation(transformation, impulse, params)[:, 0]
        except Exception:  # a transformation that cannot run on a plain vector: opaque
            return None
        tolerance = 1e-5 if dtype == jnp.float32 else 1e-10
        h0, h1, h2 = (float(x) for x in response[:3])
        scale = max(abs(h0), abs(h1), abs(h2))
        if abs(h1) <= tolerance * scale or abs(h2) <= tolerance * scale:
            form = LinearForm(0.0, 0.0, h0)
        else:
            beta = h2 / h1
            kappa = h1 / beta
            delta = h0 - kappa
            if abs(delta) <= tolerance * scale:
                delta = 0.0
            form = LinearForm(beta, kappa, delta)
        if not all(math.isfinite(x) for x in form):
            return None
        # Check the form on gradients of very different sizes (clipping, normalisation), at
        # other weights (weight decay), over more steps (schedules) and across coordinates.
        rng = np.random.default_rng(0)
        scales = np.array([1e-3, 1.0, 1e3])
        gradients = [jnp.asarray(rng.standard_normal(3) * scales, dtype) for _ in range(8)]
        other_params = jnp.asarray(rng.standard_normal(3), dtype)
        expected, buffer = [], np.zeros(3)
        for gradient in gradients:
            buffer = form.momentum * buffer + np.asarray(gradient)
            expected.append(
                form.momentum_weight * buffer + form.gradient_weight * np.asarray(gradient)
            )
        for weights in (params, other_params):
            try:
                outputs = np.asarray(_run_transformation(transformation, gradients, weights))
            except Exception:
                return None
            if not np.allclose(outputs, np.stack(expected), rtol=tolerance, atol=tolerance * 1e-3):
                return None
    return form


def linear_equivalent(optimizer: InnerOptimizer) -> tuple[InnerOptimizer, float, float] | None:
    r"""For a `from_optax` learner with a `LinearForm`, the built-in learner that runs it:
    `(learner, step_factor, momentum)` such that running `learner` with $\eta_t$ times
    `step_factor` and $\theta_t \equiv$ `momentum` computes the same updates (`gd()` when
    there is no momentum, `momentum(nesterov=True)` when $\kappa = \beta\delta$, else
    `momentum()`). `None` when there is no such learner."""
    form = optimizer.linear_form
    if form is None:
        return None
    beta, kappa, delta = form
    if beta == 0.0 or kappa == 0.0:
        return gd(), -(kappa + delta), 0.0
    if delta == 0.0:
        return momentum(), -kappa, beta
    if math.isclose(kappa, delta * beta, rel_tol=1e-6):  # u = delta (beta S + g): Nesterov
        return momentum(nesterov=True), -delta, beta
    return None


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """`optax.apply_updates`, re-exported so the inner learner reads like an optax one."""
    return optax.apply_updates(params, updates)


def describe(optimizer: InnerOptimizer) -> str:
    """A short name for error messages: the optax transformation behind a `from_optax`
    learner (its update function and the types in its state), else the update function."""
    update = optimizer.update
    transformation = getattr(update, "keywords", {}).get("transformation")
    if transformation is None:
        function = getattr(update, "func", update)
        if function is _gd_update:
            return "optimizers.gd()"
        if function is _momentum_update:
            if optimizer.precondition is no_precondition:
                return f"optimizers.momentum(nesterov={optimizer.nesterov})"
            return "optimizers.muon()"
        return getattr(function, "__qualname__", type(function).__name__)
    name = getattr(transformation.update, "__qualname__", "transformation").split(".<locals>")[0]
    try:
        state = transformation.init(jnp.zeros((1,)))
        parts = jax.tree.flatten(
            state, is_leaf=lambda x: isinstance(x, tuple) and hasattr(x, "_fields")
        )[0]
        kinds = [type(part).__name__ for part in parts if hasattr(part, "_fields")]
    except Exception:
        kinds = []
    return f"optax {name}({', '.join(kinds)})" if kinds else f"optax {name}"
