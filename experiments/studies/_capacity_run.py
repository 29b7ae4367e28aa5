r"""`atlas-eqx results capacity`, the measurement: store `N` random key/value pairs in a matrix
memory on $\phi(k)$ for $\phi$ = identity and the exact degree-2 and degree-3 polynomial maps,
and count the pairs recalled, against the bounds $d_k$ and $\binom{d_k+p}{p}$ of ATLAS Props 1-2
(digest 3.4). The library's own memories and update rules (`atlas_eqx.omega_scan` with
`LinearMemory`, the `l2` or `dot` objective and GD); nothing is trained by an outer loop.
The page: `_capacity_page.py`.
"""

import dataclasses
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float

import atlas_eqx as ae
import feature_maps as fm
import optimizers as iopt

from ..tasks._capacity import capacity_probe, capacity_recall


def feature_dim(key_dim: int, degree: int) -> int:
    r"""The capacity bound of a matrix memory on $\phi_p(k)$, $k \in \mathbb R^{d_k}$.

    Degree 1 is the identity map (a linear memory, ATLAS Prop 1): $d_k$. Degree $p \ge 2$ is
    the exact monomial map with the constant (Prop 2, digest 3.1 P1): $\binom{d_k+p}{p}$,
    the number of monomials of degree $\le p$. Both equal `feature_map.out_dim(key_dim)` of
    `capacity_feature_map(degree)`.
    """
    if key_dim < 1 or degree < 1:
        raise ValueError(f"key_dim and degree must be >= 1, got {key_dim} and {degree}")
    return key_dim if degree == 1 else math.comb(key_dim + degree, degree)


def sphere_feature_dim(key_dim: int, degree: int) -> int:
    r"""The rank that $\phi_p$ features of *unit* keys can reach: the dimension of the
    polynomials of degree $\le p$ restricted to the sphere $\|k\| = 1$,
    $\binom{d_k+p-1}{p} + \binom{d_k+p-2}{p-1}$ for $p \ge 2$ (on the sphere
    $1 = \sum_j k_j^2$, so the constant is a combination of the squares and every monomial of
    degree $p - 2 + 2j$ repeats one of degree $p$); $d_k$ for the identity map.

    Below `feature_dim` for $p \ge 2$ (152 and 952 instead of 153 and 969 at $d_k = 16$):
    with $\ell_2$-normalised keys, as the paper recommends before $\phi$, Prop 2's bound
    cannot be reached.
    """
    if key_dim < 1 or degree < 1:
        raise ValueError(f"key_dim and degree must be >= 1, got {key_dim} and {degree}")
    if degree == 1:
        return key_dim
    return math.comb(key_dim + degree - 1, degree) + math.comb(key_dim + degree - 2, degree - 1)


def capacity_feature_map(degree: int) -> fm.AbstractFeatureMap:
    r"""`Identity()` for degree 1, else `Polynomial(degree)` (monomial form, constant term,
    $a_i = 1/i!$: the paper's initialisation)."""
    return fm.Identity() if degree == 1 else fm.Polynomial(degree)


def exact_recall(
    recalled: Float[np.ndarray, "N d_v"], values: Float[np.ndarray, "N d_v"], tol: float = 0.1
) -> Bool[np.ndarray, " N"]:
    r"""Pair $i$ is *stored* when $\|\hat v_i - v_i\| \le$ `tol` $\cdot \|v_i\|$.

    This is the reading of the capacity bounds: exact interpolation of arbitrary values is
    possible for at most $\dim\phi$ pairs, so past the bound some pair must fail it.
    """
    recalled = np.asarray(recalled, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if recalled.shape != values.shape:
        raise ValueError(f"recalled {recalled.shape} and values {values.shape} differ")
    error = np.linalg.norm(recalled - values, axis=1)
    return error <= tol * np.linalg.norm(values, axis=1)


def least_squares_reads(
    features: Float[np.ndarray, "N D"], values: Float[np.ndarray, "N d_v"]
) -> Float[np.ndarray, "N d_v"]:
    r"""The reads $\Phi W^\top$ of the best matrix memory, $W = V^\top(\Phi^\top)^+$: the
    minimum-norm least-squares solution of $\Phi W^\top = V$ (float64), which interpolates
    exactly iff $\Phi$ has full row rank $N$ (digest 3.4, Prop 1 corrected)."""
    features = np.asarray(features, dtype=np.float64)
    solution, *_ = np.linalg.lstsq(features, np.asarray(values, dtype=np.float64), rcond=None)
    return features @ solution


CAPACITY_RULES = ("least_squares_gaussian", "least_squares", "delta_1", "delta_E", "hebbian")


@dataclasses.dataclass(frozen=True)
class CapacityConfig:
    """Sizes of `atlas-eqx results capacity` (`quick` uses `QUICK_CAPACITY`)."""

    key_dim: int = 16
    value_dim: int = 32
    num_pairs: tuple[int, ...] = (
        8,
        16,
        17,
        32,
        64,
        128,
        152,
        153,
        154,
        256,
        512,
        952,
        953,
        969,
        970,
        2048,
    )
    degrees: tuple[int, ...] = (1, 2, 3)
    seeds: int = 5
    passes: int = 10
    tolerance: float = 0.1
    piece: int = 512


QUICK_CAPACITY = CapacityConfig(
    key_dim=3, value_dim=8, num_pairs=(3, 4, 9, 10, 11), degrees=(1, 2), seeds=1, passes=2, piece=16
)


def _capacity_stream_fn(memory: ae.LinearMemory, feature_map, rule: str) -> Callable:
    objective = ae.dot if rule == "hebbian" else ae.l2

    def piece(state, k, v, mask):
        if rule == "hebbian":
            lr = mask
        else:  # normalised delta rule: each write is exact for its own key
            norm = jnp.sum(feature_map(k) ** 2, axis=-1)
            lr = jnp.where(mask > 0, mask / jnp.maximum(norm, 1e-30), 0.0)
        y, state = ae.omega_scan(
            memory,
            k,
            k,
            v,
            lr,
            jnp.ones_like(mask),
            feature_map=feature_map,
            objective=objective,
            state=state,
            check_values=False,
        )
        return y, state

    return jax.jit(jax.vmap(piece))


def _online_reads(fn, memory, probes, piece: int) -> np.ndarray:
    """Stream the probes (one per seed, vmapped) through `fn` in pieces; `(S, N, d_v)` reads."""
    k = np.stack([p.k for p in probes])
    v = np.stack([p.v for p in probes])
    mask = np.stack([p.write_mask for p in probes])
    total = k.shape[1]
    padded = -(-total // piece) * piece
    pad = [(0, 0), (0, padded - total), (0, 0)]
    k, v = np.pad(k, pad), np.pad(v, pad)
    mask = np.pad(mask, [(0, 0), (0, padded - total)])
    state = jax.vmap(lambda _: ae.init_omega_state(memory, iopt.gd(), 1))(jnp.arange(len(probes)))
    outputs = []
    for start in range(0, padded, piece):
        window = slice(start, start + piece)
        y, state = fn(state, k[:, window], v[:, window], mask[:, window])
        outputs.append(np.asarray(y))
    y = np.concatenate(outputs, axis=1)
    return y[:, probes[0].read_positions]


def _features64(feature_map, keys: np.ndarray) -> np.ndarray:
    """phi(keys) in float64 (in numpy for the polynomial maps, so that it does not depend on
    whether JAX runs with 64-bit floats)."""
    keys = np.asarray(keys, dtype=np.float64)
    if isinstance(feature_map, fm.Identity):
        return keys
    degree = feature_map.degree
    blocks = [np.ones((keys.shape[0], 1))]
    for i in range(1, degree + 1):
        for combo in itertools.combinations_with_replacement(range(keys.shape[1]), i):
            counts = np.bincount(combo, minlength=keys.shape[1])
            multinomial = math.factorial(i) / np.prod([math.factorial(c) for c in counts])
            coefficient = 1.0 / math.factorial(i)  # a_i = 1/i!
            monomial = np.prod(keys[:, list(combo)], axis=1, keepdims=True)
            blocks.append(np.sqrt(coefficient * multinomial) * monomial)
    return np.concatenate(blocks, axis=1)


def run_capacity(config: CapacityConfig = CapacityConfig()) -> dict:
    """Measure the pairs stored and recalled; returns nested lists of per-seed counts.

    `result[(degree, rule)][N] = {"exact": [...], "nearest": [...], "relative_mse": [...]}`
    with one entry per seed.
    """
    results: dict = {}
    for degree in config.degrees:
        feature_map = capacity_feature_map(degree)
        dim = feature_map.out_dim(config.key_dim)
        memory = ae.LinearMemory(dim, config.value_dim, key=jax.random.key(0), init_std=0.0)
        fns = {
            rule: _capacity_stream_fn(memory, feature_map, rule)
            for rule in ("delta_1", "delta_E", "hebbian")
        }
        for rule in CAPACITY_RULES:
            results[(degree, rule)] = {}
        for n in config.num_pairs:
            seeds = range(config.seeds)
            one = [
                capacity_probe(n, config.key_dim, config.value_dim, seed=s, keys="unit")
                for s in seeds
            ]
            many = [
                capacity_probe(
                    n, config.key_dim, config.value_dim, seed=s, keys="unit", passes=config.passes
                )
                for s in seeds
            ]
            # Least squares in float64 (the same pairs: the generator draws in float64): with
            # float32 unit keys the sphere relation holds only to 1e-7 and lstsq would exploit
            # the rounding to "interpolate" beyond the rank.
            gaussian = [
                capacity_probe(
                    n, config.key_dim, config.value_dim, seed=s, keys="gaussian", dtype=np.float64
                )
                for s in seeds
            ]
            one64 = [
                capacity_probe(
                    n, config.key_dim, config.value_dim, seed=s, keys="unit", dtype=np.float64
                )
                for s in seeds
            ]
            gaussian_reads = [
                least_squares_reads(_features64(feature_map, p.keys), p.values) for p in gaussian
            ]
            for probe, y in zip(gaussian, gaussian_reads, strict=True):
                score = capacity_recall(y, probe)
                cell = results[(degree, "least_squares_gaussian")].setdefault(
                    n, {"exact": [], "nearest": [], "relative_mse": []}
                )
                cell["exact"].append(int(exact_recall(y, probe.values, config.tolerance).sum()))
                cell["nearest"].append(int(score.correct.sum()))
                cell["relative_mse"].append(score.relative_mse)
            reads = {
                "least_squares": np.stack(
                    [least_squares_reads(_features64(feature_map, p.keys), p.values) for p in one64]
                ),
                "delta_1": _online_reads(fns["delta_1"], memory, one, config.piece),
                "delta_E": _online_reads(fns["delta_E"], memory, many, config.piece),
                "hebbian": _online_reads(fns["hebbian"], memory, one, config.piece),
            }
            for rule, read in reads.items():
                cell = {"exact": [], "nearest": [], "relative_mse": []}
                for probe, y in zip(one, read, strict=True):
                    score = capacity_recall(y, probe)
                    cell["exact"].append(int(exact_recall(y, probe.values, config.tolerance).sum()))
                    cell["nearest"].append(int(score.correct.sum()))
                    cell["relative_mse"].append(score.relative_mse)
                results[(degree, rule)][n] = cell
    return results
