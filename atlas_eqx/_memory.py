import math
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class AbstractMemory(eqx.Module):
    """A memory $\\mathcal M(x; W)$: an Equinox module whose array leaves are the fast weights $W$.

    Subclasses define `d_in` (the dimension of $\\phi(k)$), `d_out` (the dimension of $v$) and
    `__call__` on a single feature vector; `jax.vmap` maps over tokens.
    """

    d_in: eqx.AbstractVar[int]
    d_out: eqx.AbstractVar[int]

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " d_out"]:
        raise NotImplementedError

    def curvature_bound(self) -> Float[Array, ""] | None:
        r"""An upper bound $\kappa_{\mathcal M}$ on the largest eigenvalue of the Gauss-Newton
        matrix $J^\top J$, $J = \partial\mathcal M(x; W)/\partial W$, over unit inputs
        $\|x\| = 1$, at the current weights; `None` when the memory gives none.

        One GD step of size $\eta$ on $\tfrac12\|\mathcal M(x) - v\|^2$ changes the output
        by at most $\eta\kappa_{\mathcal M}\|x\|^2$ times the residual (to first order), so
        $\eta\kappa_{\mathcal M}\|x\|^2 \le 1$ never overshoots. `MemoryLayer` divides its
        inner step by this bound (`lr_normalization="curvature"`).
        """
        return None

    @property
    def scale_invariant_output(self) -> bool:
        """Whether the output normalises away the scale of the weights that feed it (a branch
        under a layer norm, say). The curvature at $W_0$ then says nothing of later steps, so
        `MemoryLayer` does not divide its inner step by it. False unless a subclass says so."""
        return False


def _normal(key: PRNGKeyArray, shape: tuple[int, int], std: float) -> Float[Array, "m n"]:
    if std == 0.0:
        return jnp.zeros(shape)
    return std * jax.random.normal(key, shape)


def _resolve_residual(residual: bool | Literal["auto"], d_in: int, d_out: int, name: str) -> bool:
    if residual == "auto":
        return d_in == d_out
    if residual and d_in != d_out:
        raise ValueError(
            f"{name}: `residual=True` needs d_in == d_out (x + f(x) is ill-typed otherwise, "
            f"digest A-4); got d_in={d_in}, d_out={d_out}. Use residual='auto' or False."
        )
    return bool(residual)


class LinearMemory(AbstractMemory):
    r"""Matrix memory $\mathcal M(x; W) = Wx$ with one weight $W \in \mathbb R^{d_{out}\times d_{in}}$.

    No bias: a bias comes from a constant feature of $\phi$ (digest I-24). With the l2
    objective and GD this is the delta rule (ATLAS Eq 11, corrected in digest 2.2).
    """

    weight: Float[Array, "d_out d_in"]
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)

    def __init__(self, d_in: int, d_out: int, *, key: PRNGKeyArray, init_std: float | None = None):
        """**Arguments:**

        - `d_in`, `d_out`: input (feature) and output (value) dimensions.
        - `key`: a JAX PRNG key for $W_0$.
        - `init_std`: standard deviation of $W_0$'s entries; defaults to $1/\\sqrt{d_{in}}$.
          `0.0` gives $W_0 = 0$.
        """
        _check_dims(d_in, d_out, "LinearMemory")
        std = 1.0 / math.sqrt(d_in) if init_std is None else float(init_std)
        self.weight = _normal(key, (d_out, d_in), std)
        self.d_in = d_in
        self.d_out = d_out

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " d_out"]:
        return self.weight @ x

    def curvature_bound(self) -> Float[Array, ""]:
        """$J^\\top J = xx^\\top\\otimes I$, so the bound is exactly $\\|x\\|^2 = 1$."""
        return jnp.ones((), self.weight.dtype)


class MLPMemory(AbstractMemory):
    r"""Deep memory (ATLAS Eq 42, Titans 3.1): $\mathcal M(x) = x + W_L\sigma(\cdots\sigma(W_1x))$.

    With `depth=2` this is $x + W_1\sigma(W_2x)$ in the paper's naming, where the paper's $W_2$
    is `weights[0]` (applied first) and its $W_1$ is `weights[1]`. The residual is only
    well-typed when $d_{in} = d_{out}$ (digest A-4); `residual="auto"` switches it on exactly
    then.

    With `layer_norm=True` the branch is normalised before the residual, Miras's reading of
    ATLAS App. E's "layer norm" (digest A-5): $\mathcal M(x) = x + \mathrm{LN}(W_L\sigma(\cdots))$,
    $\mathrm{LN}(u) = (u - \bar u)/\sqrt{\mathrm{var}(u) + \epsilon}$ without a gain (`layer_norm`).
    The read is then invariant to the scale of $W_L$ (and, for a positively homogeneous
    $\sigma$, of every $W_l$), so a GD step's gradient is orthogonal to that scale and shrinks
    as the weights grow: the inner loop cannot run away, which it does without the norm once
    its weights outgrow the step size (`atlas_eqx.diagnose_scan`).
    """

    weights: tuple[Float[Array, "_ _"], ...]
    activation: Callable[[Array], Array] = eqx.field(static=True)
    residual: bool = eqx.field(static=True)
    layer_norm: bool = eqx.field(static=True)
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        key: PRNGKeyArray,
        hidden: int | None = None,
        depth: int = 2,
        activation: Callable[[Array], Array] = jax.nn.gelu,
        residual: bool | Literal["auto"] = "auto",
        init_std: float | None = None,
        layer_norm: bool = False,
    ):
        """**Arguments:**

        - `d_in`, `d_out`: input (feature) and output (value) dimensions.
        - `key`: a JAX PRNG key for $W_0$.
        - `hidden`: hidden width; defaults to $4 d_{out}$ (digest A-6).
        - `depth`: number of weight matrices $L \\geq 1$.
        - `activation`: $\\sigma$, GELU by default (ATLAS App. E).
        - `residual`: `True`, `False` or `"auto"` (on iff `d_in == d_out`).
        - `init_std`: scale of $W_0$; defaults to $1/\\sqrt{\\text{fan-in}}$ per matrix.
        - `layer_norm`: normalise the branch, $x + \\mathrm{LN}(\\cdot)$ (A-5); off by default
          (Eq 42 as printed).
        """
        _check_dims(d_in, d_out, "MLPMemory")
        if depth < 1:
            raise ValueError(f"MLPMemory: `depth` must be >= 1; got {depth}")
        hidden = 4 * d_out if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"MLPMemory: `hidden` must be >= 1; got {hidden}")
        sizes = [d_in] + [hidden] * (depth - 1) + [d_out]
        keys = jax.random.split(key, depth)
        self.weights = tuple(
            _normal(k, (n_out, n_in), 1.0 / math.sqrt(n_in) if init_std is None else init_std)
            for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
        )
        self.activation = activation
        self.residual = _resolve_residual(residual, d_in, d_out, "MLPMemory")
        self.layer_norm = bool(layer_norm)
        self.d_in = d_in
        self.d_out = d_out

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " d_out"]:
        h = x
        for weight in self.weights[:-1]:
            h = self.activation(weight @ h)
        out = self.weights[-1] @ h
        if self.layer_norm:
            out = layer_norm(out)
        return x + out if self.residual else out

    @property
    def scale_invariant_output(self) -> bool:
        return self.layer_norm

    def curvature_bound(self) -> Float[Array, ""]:
        r"""$\kappa = \sum_l \big(\prod_{j<l}s_j^2\big)\big(\prod_{j>l}\lambda^2s_j^2\big)$,
        $s_j = \|W_j\|_2$, $\lambda = \sup|\sigma'|$.

        The gradient of layer $l$ is $\delta_l h_{l-1}^\top$ with $\|h_{l-1}\| \le
        \prod_{j<l}s_j\|x\|$ (it uses $|\sigma(z)| \le |z|$, true of GELU, SiLU, ReLU and
        tanh) and $\|\delta_l\| \le \prod_{j>l}\lambda s_j\|r\|$; the residual adds
        nothing. Spectral norms by power iteration, outside the outer gradient. With
        `layer_norm` there is no bound (the norm's Jacobian grows as its input shrinks): this
        raises, and `MemoryLayer` leaves such a memory's step undivided.
        """
        if self.layer_norm:
            raise ValueError(
                "MLPMemory.curvature_bound: a memory with `layer_norm=True` has no curvature "
                "bound; use lr_normalization='sampled_curvature' or 'none' (both leave its step "
                "undivided)"
            )
        s2 = [_spectral_norm_squared(w) for w in self.weights]
        slope2 = _activation_slope(self.activation) ** 2
        total = jnp.zeros((), s2[0].dtype)
        for layer in range(len(s2)):
            term = jnp.ones((), s2[0].dtype)
            for j, value in enumerate(s2):
                if j < layer:
                    term = term * value
                elif j > layer:
                    term = term * slope2 * value
            total = total + term
        return total


class GatedMLPMemory(AbstractMemory):
    r"""Atlas++'s gated memory (ATLAS Eq 43): $\mathcal M(x) = x + W_1(\sigma(W_2x) \odot W_3x)$.

    $W_3$ has the shape of $W_2$ and $\sigma$ is GELU by default (digest A-32). `layer_norm`
    normalises the branch as in `MLPMemory` (A-5).
    """

    W1: Float[Array, "d_out hidden"]
    W2: Float[Array, "hidden d_in"]
    W3: Float[Array, "hidden d_in"]
    activation: Callable[[Array], Array] = eqx.field(static=True)
    residual: bool = eqx.field(static=True)
    layer_norm: bool = eqx.field(static=True)
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        key: PRNGKeyArray,
        hidden: int | None = None,
        activation: Callable[[Array], Array] = jax.nn.gelu,
        residual: bool | Literal["auto"] = "auto",
        init_std: float | None = None,
        layer_norm: bool = False,
    ):
        _check_dims(d_in, d_out, "GatedMLPMemory")
        hidden = 4 * d_out if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"GatedMLPMemory: `hidden` must be >= 1; got {hidden}")
        k1, k2, k3 = jax.random.split(key, 3)
        std_in = 1.0 / math.sqrt(d_in) if init_std is None else init_std
        std_hidden = 1.0 / math.sqrt(hidden) if init_std is None else init_std
        self.W1 = _normal(k1, (d_out, hidden), std_hidden)
        self.W2 = _normal(k2, (hidden, d_in), std_in)
        self.W3 = _normal(k3, (hidden, d_in), std_in)
        self.activation = activation
        self.residual = _resolve_residual(residual, d_in, d_out, "GatedMLPMemory")
        self.layer_norm = bool(layer_norm)
        self.d_in = d_in
        self.d_out = d_out

    def __call__(self, x: Float[Array, " d_in"]) -> Float[Array, " d_out"]:
        out = self.W1 @ (self.activation(self.W2 @ x) * (self.W3 @ x))
        if self.layer_norm:
            out = layer_norm(out)
        return x + out if self.residual else out

    @property
    def scale_invariant_output(self) -> bool:
        return self.layer_norm

    def curvature_bound(self) -> Float[Array, ""]:
        r"""$\kappa = s_2^2s_3^2 + \lambda^2s_1^2s_3^2 + s_1^2s_2^2$ at $\|x\| = 1$,
        $s_j = \|W_j\|_2$ (the layer is bilinear in $x$, so the bound grows as $\|x\|^4$).
        None exists with `layer_norm`: this raises, as `MLPMemory.curvature_bound` does."""
        if self.layer_norm:
            raise ValueError(
                "GatedMLPMemory.curvature_bound: a memory with `layer_norm=True` has no "
                "curvature bound; use lr_normalization='sampled_curvature' or 'none' (both leave "
                "its step undivided)"
            )
        s1, s2, s3 = (_spectral_norm_squared(w) for w in (self.W1, self.W2, self.W3))
        slope2 = _activation_slope(self.activation) ** 2
        return s2 * s3 + slope2 * s1 * s3 + s1 * s2


LAYER_NORM_EPS = 1e-5


def layer_norm(
    u: Float[Array, "*batch d"], eps: float = LAYER_NORM_EPS
) -> Float[Array, "*batch d"]:
    r"""$\mathrm{LN}(u) = (u - \bar u)/\sqrt{\mathrm{var}(u) + \epsilon}$ over the last axis,
    without a gain or bias: the norm of a deep memory's branch (digest A-5)."""
    centred = u - jnp.mean(u, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)


_ACTIVATION_SLOPES = {jax.nn.gelu: 1.129, jax.nn.silu: 1.0998, jax.nn.relu: 1.0, jnp.tanh: 1.0}


def _activation_slope(activation: Callable[[Array], Array]) -> float:
    """$\\sup_z|\\sigma'(z)|$ of the activations the layers offer; 2 for any other."""
    return _ACTIVATION_SLOPES.get(activation, 2.0)


def _spectral_norm_squared(w: Float[Array, "m n"], iterations: int = 12) -> Float[Array, ""]:
    r"""$\|W\|_2^2$ by power iteration on the smaller Gram matrix from a fixed start, held out of
    the outer gradient (it sets a step size, it is not a parameter). Power iteration approaches
    the largest eigenvalue from below; 12 iterations on the small Gram matrices of a memory
    head come within a few percent of it."""
    w = jax.lax.stop_gradient(w)
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    u = jnp.ones(gram.shape[0], w.dtype) / math.sqrt(gram.shape[0])

    def step(u, _):
        u = gram @ u
        return u / (jnp.linalg.norm(u) + jnp.finfo(w.dtype).tiny), None

    u, _ = jax.lax.scan(step, u, None, length=iterations)
    return jnp.maximum(u @ gram @ u, jnp.trace(gram) / gram.shape[0])


def _check_dims(d_in: int, d_out: int, name: str) -> None:
    if d_in < 1 or d_out < 1:
        raise ValueError(f"{name}: `d_in` and `d_out` must be >= 1; got {d_in}, {d_out}")


def gauss_newton_curvature(
    memory: AbstractMemory, x: Float[Array, " d_in"], iterations: int = 10
) -> Float[Array, ""]:
    r"""The largest eigenvalue of $JJ^\top$, $J = \partial\mathcal M(x; W)/\partial W$ (all
    weights), by power iteration with one `jvp` and one `vjp` per step: how much one GD step
    of size $\eta$ on $\tfrac12\|\mathcal M(x) - v\|^2$ moves the read of $x$, at most
    $\eta\lambda$ times the residual. For a linear memory it is $\|x\|^2$."""
    params, static = eqx.partition(memory, eqx.is_inexact_array)

    def read(p):
        return eqx.combine(p, static)(x)

    _, pullback = jax.vjp(read, params)
    # A fixed random start: the all-ones vector lies in the null space of a layer norm's
    # Jacobian (it removes the mean), where power iteration would stay at zero.
    u = jax.random.normal(jax.random.key(0), (memory.d_out,), x.dtype)
    u = u / jnp.linalg.norm(u)

    def step(u, _):
        (g,) = pullback(u)
        _, Ju = jax.jvp(read, (params,), (g,))
        return Ju / (jnp.linalg.norm(Ju) + jnp.finfo(x.dtype).tiny), None

    u, _ = jax.lax.scan(step, u, None, length=iterations)
    (g,) = pullback(u)
    return jnp.sum(jnp.stack([jnp.sum(a * a) for a in jax.tree.leaves(g)]))


@eqx.filter_jit
def sampled_curvature(memory: AbstractMemory, n_probes: int = 16) -> Float[Array, ""]:
    r"""$\hat\kappa_{\mathcal M}$: the largest `gauss_newton_curvature` over `n_probes` fixed
    random unit inputs (drawn from `jax.random.key(0)`, the same for every call), outside the
    outer gradient: how strongly one GD step writes, relative to a linear memory's (1 there),
    in the stiffest of a set of typical directions. For the default residual MLP memory at
    initialisation it is about 3.4 (mean over inputs 2.0), well below the worst case over all
    unit inputs, `AbstractMemory.curvature_bound` (about 12).

    Compiled as one program (`eqx.filter_jit`): called outside `jit` (as the probe and a
    streaming layer do) it would otherwise run as dozens of small eagerly compiled programs."""
    memory = jax.lax.stop_gradient(memory)
    dtype = jax.tree.leaves(eqx.filter(memory, eqx.is_inexact_array))[0].dtype
    probes = jax.random.normal(jax.random.key(0), (n_probes, memory.d_in), dtype)
    probes = probes / jnp.linalg.norm(probes, axis=1, keepdims=True)
    return jnp.max(jax.vmap(lambda x: gauss_newton_curvature(memory, x))(probes))
