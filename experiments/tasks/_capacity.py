"""Memory-capacity probes: store N key/value pairs, then query every key (spec 2.5 of the data note).

No outer training: the arrays feed `atlas_eqx.omega_scan` directly (one head, one sequence), which
checks ATLAS's capacity statements (Props. 1-2, Thm. 1: a linear l2 memory stores at most
`d_k` independent pairs, a degree-`p` polynomial feature map O(`d_k^p`), a deep memory more).
"""

from typing import Literal, NamedTuple

import numpy as np
from jaxtyping import Bool, Float, Int

from ._token_task import check_positive


KeyKind = Literal["gaussian", "unit"]
ValueKind = Literal["gaussian", "one_hot"]


class CapacityProbe(NamedTuple):
    r"""A write-then-read stream of `T = passes * N + N` tokens.

    - `q`, `k`: `(T, d_k)`; `v`: `(T, d_v)`. Positions `[0, passes * N)` write pair
      `i = t mod N`; positions `passes * N + i` read key `i` (there `q = k = k_i`, `v = v_i`).
    - `write_mask`: `(T,)`, 1.0 where the memory should learn, 0.0 at the reads: use
      `lr = eta * write_mask` (and `decay = 1` at the reads, see `capacity_gates`) so that
      reading does not change the memory.
    - `read_positions`: `(N,)`, the positions of the reads (`y[read_positions]` are the
      recalled values, read after all writes).
    - `keys`: `(N, d_k)`, `values`: `(N, d_v)`: the stored pairs (for `interference_probe`,
      the latest value of each key).
    - `distractors`: `(M, d_v)`, values that must *not* be recalled (the overwritten values
      of `interference_probe`; empty for `capacity_probe`). They compete in `capacity_recall`.
    """

    q: Float[np.ndarray, "T d_k"]
    k: Float[np.ndarray, "T d_k"]
    v: Float[np.ndarray, "T d_v"]
    write_mask: Float[np.ndarray, " T"]
    read_positions: Int[np.ndarray, " N"]
    keys: Float[np.ndarray, "N d_k"]
    values: Float[np.ndarray, "N d_v"]
    distractors: Float[np.ndarray, "M d_v"]


def capacity_probe(
    num_pairs: int,
    key_dim: int,
    value_dim: int,
    *,
    seed: int,
    keys: KeyKind = "gaussian",
    values: ValueKind = "gaussian",
    passes: int = 1,
    dtype: type = np.float32,
) -> CapacityProbe:
    r"""`N` random key/value pairs, written `passes` times, then read back once each.

    - `keys="gaussian"`: $k_i \sim \mathcal N(0, I_{d_k}) / \sqrt{d_k}$ (so
      $\mathbb E\|k_i\|^2 = 1$); `"unit"`: the same, normalised to $\|k_i\| = 1$.
    - `values="gaussian"`: $v_i \sim \mathcal N(0, I_{d_v})$; `"one_hot"`: $v_i = e_{c_i}$
      with $c_i$ uniform in `[0, d_v)` (a codebook; pairs may share a value).

    Deterministic in `seed` (`numpy.random.default_rng`).
    """
    check_positive(num_pairs=num_pairs, key_dim=key_dim, value_dim=value_dim, passes=passes)
    if keys not in ("gaussian", "unit"):
        raise ValueError(f"keys must be 'gaussian' or 'unit', got {keys!r}")
    if values not in ("gaussian", "one_hot"):
        raise ValueError(f"values must be 'gaussian' or 'one_hot', got {values!r}")
    rng = np.random.default_rng(seed)
    key_array = rng.standard_normal((num_pairs, key_dim)) / np.sqrt(key_dim)
    if keys == "unit":
        key_array /= np.linalg.norm(key_array, axis=1, keepdims=True)
    if values == "gaussian":
        value_array = rng.standard_normal((num_pairs, value_dim))
    else:
        value_array = np.eye(value_dim)[rng.integers(0, value_dim, size=num_pairs)]
    key_array, value_array = key_array.astype(dtype), value_array.astype(dtype)
    return _write_then_read(key_array, value_array, passes, dtype)


def _write_then_read(
    key_array: np.ndarray, value_array: np.ndarray, passes: int, dtype: type
) -> CapacityProbe:
    num_pairs = key_array.shape[0]
    stream_k = np.concatenate([np.tile(key_array, (passes, 1)), key_array])
    stream_v = np.concatenate([np.tile(value_array, (passes, 1)), value_array])
    write_mask = np.concatenate([np.ones(passes * num_pairs), np.zeros(num_pairs)]).astype(dtype)
    return CapacityProbe(
        q=stream_k.copy(),
        k=stream_k,
        v=stream_v,
        write_mask=write_mask,
        read_positions=passes * num_pairs + np.arange(num_pairs),
        keys=key_array,
        values=value_array,
        distractors=np.zeros((0, value_array.shape[1]), dtype=dtype),
    )


def interference_probe(
    num_keys: int,
    num_versions: int,
    key_dim: int,
    value_dim: int,
    *,
    seed: int,
    keys: KeyKind = "unit",
    dtype: type = np.float32,
) -> CapacityProbe:
    r"""Overwrite test (spec 2.5, "interference / recency"): every key is written
    `num_versions` times, each time with a fresh Gaussian value, in a new random key order per
    round; then every key is read once. Recall counts only the *latest* value: the overwritten
    ones are `distractors`, so a memory that averages versions (Hebbian) scores low while a
    delta-rule memory can overwrite.

    `T = num_versions * N + N`; the layout is that of `CapacityProbe` with `passes = 1` and
    the writes of round `r` at positions `[r N, (r + 1) N)`.
    """
    check_positive(
        num_keys=num_keys, num_versions=num_versions, key_dim=key_dim, value_dim=value_dim
    )
    if keys not in ("gaussian", "unit"):
        raise ValueError(f"keys must be 'gaussian' or 'unit', got {keys!r}")
    rng = np.random.default_rng(seed)
    key_array = rng.standard_normal((num_keys, key_dim)) / np.sqrt(key_dim)
    if keys == "unit":
        key_array /= np.linalg.norm(key_array, axis=1, keepdims=True)
    versions = rng.standard_normal((num_versions, num_keys, value_dim))
    orders = np.stack([rng.permutation(num_keys) for _ in range(num_versions)])
    write_k = np.concatenate([key_array[order] for order in orders])
    write_v = np.concatenate([versions[r, order] for r, order in enumerate(orders)])
    latest = versions[-1]
    stream_k = np.concatenate([write_k, key_array]).astype(dtype)
    stream_v = np.concatenate([write_v, latest]).astype(dtype)
    writes = num_versions * num_keys
    return CapacityProbe(
        q=stream_k.copy(),
        k=stream_k,
        v=stream_v,
        write_mask=np.concatenate([np.ones(writes), np.zeros(num_keys)]).astype(dtype),
        read_positions=writes + np.arange(num_keys),
        keys=key_array.astype(dtype),
        values=latest.astype(dtype),
        distractors=versions[:-1].reshape(-1, value_dim).astype(dtype),
    )


def capacity_gates(
    probe: CapacityProbe, lr: float, decay: float = 1.0
) -> tuple[Float[np.ndarray, " T"], Float[np.ndarray, " T"]]:
    """`(lr, decay)` vectors for `omega_scan`: `lr` and `decay` at writes, `(0, 1)` at reads."""
    mask = probe.write_mask
    return (lr * mask).astype(mask.dtype), np.where(mask > 0, decay, 1.0).astype(mask.dtype)


class CapacityScore(NamedTuple):
    """`accuracy`: fraction of pairs recalled; `relative_mse`; `correct`: `(N,)` per pair."""

    accuracy: float
    relative_mse: float
    correct: Bool[np.ndarray, " N"]


def capacity_recall(
    y: Float[np.ndarray, "T d_v"] | Float[np.ndarray, "N d_v"], probe: CapacityProbe
) -> CapacityScore:
    r"""Score the memory outputs `y` of a probe (all `T` outputs, or the `N` reads).

    Pair `i` is recalled when the stored value nearest to $\hat v_i$ by cosine similarity,
    among all `N` stored values and the probe's `distractors`, equals $v_i$ (compared as
    vectors, so shared one-hot values count as recalled).
    Relative MSE $= \sum_i \|\hat v_i - v_i\|^2 / \sum_i \|v_i\|^2$.
    """
    y = np.asarray(y, dtype=np.float64)
    stored = probe.values.astype(np.float64)
    n = stored.shape[0]
    if y.ndim != 2 or y.shape[1] != stored.shape[1] or y.shape[0] not in (n, probe.k.shape[0]):
        raise ValueError(
            f"y must be (T, d_v) = {(probe.k.shape[0], stored.shape[1])} or (N, d_v) = "
            f"{stored.shape}, got {y.shape}"
        )
    recalled = y if y.shape[0] == n else y[probe.read_positions]
    candidates = np.concatenate([stored, probe.distractors.astype(np.float64)])
    norms = np.linalg.norm(recalled, axis=1, keepdims=True) * np.linalg.norm(candidates, axis=1)
    cosine = (recalled @ candidates.T) / np.maximum(norms, 1e-30)
    nearest = candidates[np.argmax(cosine, axis=1)]
    correct = np.all(np.isclose(nearest, stored), axis=1)
    relative_mse = float(((recalled - stored) ** 2).sum() / (stored**2).sum())
    return CapacityScore(float(correct.mean()), relative_mse, correct)
