"""Multi-query associative recall (Zoology's `multiquery_ar`; spec 2.1 of the data note)."""

import numpy as np

from ._token_task import check_positive, IGNORE_INDEX, TokenTask


def _weighted_sample_without_replacement(
    rng: np.random.Generator, probabilities: np.ndarray, rows: int, size: int
) -> np.ndarray:
    """Per row, the set of `size` distinct indices drawn successively with `probabilities`.

    Successive weighted sampling without replacement (what `numpy.random.choice(p=...,
    replace=False)` does) has the same law as the top-`size` indices of `log p + Gumbel`
    (Gumbel top-k). The order within a row is arbitrary: MQAR only uses the set of gaps (the
    keys assigned to them are already in uniformly random order).
    """
    scores = np.log(probabilities)[None, :] + rng.gumbel(size=(rows, probabilities.shape[0]))
    if size == probabilities.shape[0]:
        return np.argsort(-scores, axis=1)
    return np.argpartition(-scores, size - 1, axis=1)[:, :size]  # the set is what matters


def _distinct_rows(rng: np.random.Generator, high: int, rows: int, size: int) -> np.ndarray:
    """Per row, `size` distinct integers uniform in `[0, high)` (law of `choice(replace=False)`).

    Whole rows with a repeat are redrawn (uniform over distinct tuples); when repeats would be
    common, a random permutation per row is cut instead.
    """
    if size * size > high:
        return np.argsort(rng.random((rows, high)), axis=1)[:, :size]
    out = rng.integers(0, high, size=(rows, size))
    while True:
        ordered = np.sort(out, axis=1)
        bad = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
        if bad.size == 0:
            return out
        out[bad] = rng.integers(0, high, size=(bad.size, size))


def multiquery_ar(
    num_examples: int,
    seq_len: int,
    vocab_size: int = 8192,
    num_kv_pairs: int = 8,
    *,
    seed: int,
    power_a: float = 0.01,
    num_passes: int = 1,
    random_non_queries: bool = True,
) -> TokenTask:
    r"""MQAR examples: `D` key-value pairs, then the `D` keys queried again at random gaps.

    Following Zoology (`zoology/data/multiquery_ar.py`, spec 2.1), with `C = 2 D num_passes`:

    1. keys are `D` distinct ids from `[1, V/2)` and values `D` distinct ids from `[V/2, V)`,
       drawn independently per example; the context is `k_1 v_1 ... k_D v_D`, tiled
       `num_passes` times (0 is the filler id);
    2. the query region has `(T - C) / 2` slots; `D` distinct slots `g_j` are drawn with
       $p(i) \propto a\, i^{a-1}$, $i = 1 \dots (T-C)/2$ (`a = power_a`), and key `k_j` is
       placed at query position `2 g_j`;
    3. the target of the query key's own input position `C + 2 g_j` is `v_j` (next-token
       prediction of the value); all other targets are -100;
    4. with `random_non_queries`, every filler 0 of the inputs is replaced by a uniform id in
       `[0, V)` (intended noise: it may collide with keys and values).

    Deterministic in `seed` (`numpy.random.default_rng`; Zoology seeds the legacy global RNG,
    so the draws differ but the distribution is the same). Requires `T` even, `V > T` and
    `C + 2 D <= T`.

    **Returns** a `TokenTask` with `metadata`: `keys`, `values` (`(N, D)`, pair order in the
    context), `query_positions` (`(N, D)`, the input position where key `j` is queried; its
    target is `values[:, j]`). Score with `masked_accuracy(..., average="example")`.
    """
    check_positive(
        num_examples=num_examples,
        seq_len=seq_len,
        vocab_size=vocab_size,
        num_kv_pairs=num_kv_pairs,
        num_passes=num_passes,
    )
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size must exceed seq_len, got {vocab_size} <= {seq_len}")
    context = 2 * num_kv_pairs * num_passes
    if context + 2 * num_kv_pairs > seq_len:
        raise ValueError(
            f"2 * num_kv_pairs * (num_passes + 1) must be <= seq_len, got "
            f"{context + 2 * num_kv_pairs} > {seq_len}"
        )
    half = vocab_size // 2
    if num_kv_pairs > half - 1:
        raise ValueError(f"num_kv_pairs must be <= vocab_size // 2 - 1 = {half - 1}")
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")
    rng = np.random.default_rng(seed)
    keys = _distinct_rows(rng, half - 1, num_examples, num_kv_pairs) + 1
    values = _distinct_rows(rng, vocab_size - half, num_examples, num_kv_pairs) + half
    pairs = np.empty((num_examples, 2 * num_kv_pairs), dtype=np.int64)
    pairs[:, 0::2], pairs[:, 1::2] = keys, values
    space = (seq_len - context) // 2
    gap_weights = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    gaps = _weighted_sample_without_replacement(
        rng, gap_weights / gap_weights.sum(), num_examples, num_kv_pairs
    )
    queries = np.zeros((num_examples, seq_len - context + 1), dtype=np.int64)
    np.put_along_axis(queries, 2 * gaps, keys, axis=1)
    sequence = np.concatenate([np.tile(pairs, (1, num_passes)), queries], axis=1)
    labels = np.full((num_examples, seq_len + 1), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, context + 2 * gaps + 1, values, axis=1)
    inputs, targets = sequence[:, :-1], labels[:, 1:]
    if random_non_queries:
        noise = rng.integers(0, vocab_size, size=inputs.shape)
        inputs = np.where(inputs == 0, noise, inputs)
    return TokenTask(
        inputs=inputs.astype(np.int32),
        targets=targets.astype(np.int32),
        vocab_size=vocab_size,
        metadata={
            "keys": keys.astype(np.int32),
            "values": values.astype(np.int32),
            "query_positions": (context + 2 * gaps).astype(np.int32),
        },
    )
