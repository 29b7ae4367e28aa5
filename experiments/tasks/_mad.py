"""The six MAD synthetic tasks (Poli et al. 2024, `athms/mad-lab`; spec 2.2 of the data note).

Each generator draws every instance from one `numpy.random.default_rng(seed)` (MAD shares one
generator across the train and then the test instances; here train and test sets are two calls
with different seeds). The conventions of `mad/data/instances.py` are kept:

- recall tasks (in-context, noisy, fuzzy): the instance is a sequence `x` of length `T + 1`;
  `inputs = x[:-1]`; with `is_training=True` the targets are `x[1:]` (next-token LM on the
  whole sequence), otherwise `targets[1:]` with -100 except the value tokens of keys that were
  presented earlier (multi-query) and the final probe's value;
- selective copying and memorization are not shifted: the target sits at the position of the
  blank / insert token that should emit it;
- compression: the targets are the inputs (an autoencoder reconstructs every position).

**Accuracy.** MAD reports torchmetrics `MulticlassAccuracy(num_classes=V, ignore_index=-100)`,
whose default is *macro* (class-averaged) accuracy; `mad_accuracy` defaults to that
(`average="macro"`, over the whole evaluation set at once rather than per batch) and also gives
micro accuracy (`average="micro"`: fraction of scored positions correct). Results tables in this
project state which one they report.
"""

import itertools

import numpy as np
from jaxtyping import Int

from ._token_task import Average, check_positive, IGNORE_INDEX, masked_accuracy, TokenTask


def _stack(
    rows: list[tuple[list[int], list[int]]], vocab_size: int, **metadata: np.ndarray
) -> TokenTask:
    inputs = np.array([r[0] for r in rows], dtype=np.int32)
    targets = np.array([r[1] for r in rows], dtype=np.int32)
    return TokenTask(inputs, targets, vocab_size, metadata)


def _check_noise(frac_noise: float, noise_vocab_size: int) -> None:
    if not 0 <= frac_noise < 1:
        raise ValueError(f"frac_noise must be in [0, 1), got {frac_noise}")
    if frac_noise > 0 and noise_vocab_size < 1:
        raise ValueError("noise_vocab_size must be >= 1 when frac_noise > 0")
    if noise_vocab_size < 0:
        raise ValueError(f"noise_vocab_size must be >= 0, got {noise_vocab_size}")


def in_context_recall(
    num_examples: int,
    seq_len: int = 128,
    vocab_size: int = 16,
    *,
    seed: int,
    multi_query: bool = True,
    noise_vocab_size: int = 0,
    frac_noise: float = 0.0,
    is_training: bool = False,
) -> TokenTask:
    """MAD in-context recall: key-value pairs with a per-sequence map; recall a presented key.

    Vocabulary (`n_s = V - n_z` if multi-query else `V - 1 - n_z`): keys `[0, n_s/2)`, values
    `[n_s/2, n_s)`, noise `[n_s, n_s + n_z)`, copy prefix `V - 1` (single-query only). For
    each of the `T/2 - 1` pair slots: with probability `frac_noise` (never in one slot chosen
    up front, so a key is always presented) two noise tokens, else a key drawn uniformly (with
    replacement) and its value (drawn on first use, then fixed). A final probe `k*` (a presented
    key, preceded by the copy prefix if single-query) and its value end the sequence; then the
    MAD shift. Inputs have length `T - 1` (multi-query) or `T` (single-query).

    Deviation: the guaranteed non-noise slot is drawn among the `T/2 - 1` emitted slots (MAD
    draws among `T/2`, which can leave no presented key when every slot is noise).

    **Returns** a `TokenTask` with `metadata`: `probe_keys`, `probe_values` (`(N,)`).
    """
    check_positive(num_examples=num_examples, seq_len=seq_len, vocab_size=vocab_size)
    _check_noise(frac_noise, noise_vocab_size)
    if seq_len % 2 or seq_len < 4:
        raise ValueError(f"seq_len must be even and >= 4, got {seq_len}")
    special = vocab_size - noise_vocab_size - (0 if multi_query else 1)
    if special < 2:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for keys and values")
    key_vocab = np.arange(special // 2)
    value_vocab = np.arange(special // 2, special)
    noise_vocab = np.arange(special, special + noise_vocab_size)
    rng = np.random.default_rng(seed)
    rows, probe_keys, probe_values = [], [], []
    slots = seq_len // 2 - 1
    for _ in range(num_examples):
        kv_map: dict[int, int] = {}
        presented: set[int] = set()
        x: list[int] = []
        y: list[int] = []
        keep = int(rng.integers(slots))
        noisy = (rng.random(slots) < frac_noise).tolist()
        noisy[keep] = False
        keys = rng.integers(0, key_vocab.shape[0], size=slots).tolist()
        values = (rng.integers(0, value_vocab.shape[0], size=slots) + value_vocab[0]).tolist()
        noise = (rng.integers(0, max(noise_vocab.shape[0], 1), size=(slots, 2)) + special).tolist()
        for slot in range(slots):
            if noisy[slot]:
                x += noise[slot]
                y += [IGNORE_INDEX, IGNORE_INDEX]
                continue
            key = keys[slot]
            value = kv_map.setdefault(key, values[slot])
            x += [key, value]
            y += [IGNORE_INDEX, value if (multi_query and key in presented) else IGNORE_INDEX]
            presented.add(key)
        probe = sorted(presented)[int(rng.integers(len(presented)))]
        if not multi_query:
            x.append(vocab_size - 1)
            y.append(IGNORE_INDEX)
        x += [probe, kv_map[probe]]
        y += [IGNORE_INDEX, kv_map[probe]]
        rows.append((x[:-1], x[1:] if is_training else y[1:]))
        probe_keys.append(probe)
        probe_values.append(kv_map[probe])
    return _stack(
        rows,
        vocab_size,
        probe_keys=np.array(probe_keys, dtype=np.int32),
        probe_values=np.array(probe_values, dtype=np.int32),
    )


def noisy_in_context_recall(
    num_examples: int,
    seq_len: int = 128,
    vocab_size: int = 32,
    *,
    seed: int,
    noise_vocab_size: int = 16,
    frac_noise: float = 0.2,
    multi_query: bool = True,
    is_training: bool = False,
) -> TokenTask:
    """MAD noisy in-context recall: `in_context_recall` with 16 noise ids and 20% noise slots."""
    return in_context_recall(
        num_examples,
        seq_len,
        vocab_size,
        seed=seed,
        multi_query=multi_query,
        noise_vocab_size=noise_vocab_size,
        frac_noise=frac_noise,
        is_training=is_training,
    )


def _motifs(vocab: np.ndarray, sizes: range, rng: np.random.Generator) -> dict[int, list[tuple]]:
    out = {}
    for size in sizes:
        motifs = list(itertools.permutations(vocab.tolist(), size))
        rng.shuffle(motifs)  # pyright: ignore[reportArgumentType]
        out[size] = motifs
    return out


def fuzzy_in_context_recall(
    num_examples: int,
    seq_len: int = 128,
    vocab_size: int = 16,
    *,
    seed: int,
    k_motif_size: int = 3,
    v_motif_size: int = 3,
    multi_query: bool = True,
    noise_vocab_size: int = 0,
    frac_noise: float = 0.0,
    is_training: bool = False,
) -> TokenTask:
    """MAD fuzzy in-context recall: keys and values are runs of 1-3 distinct tokens.

    Vocabulary (`n_s = V - 1 - n_z` if multi-query else `V - 2 - n_z`): keys `[0, n_s/2)`,
    values `[n_s/2, n_s)`, noise after them, pad `V - 1` (`V - 2` single-query), copy prefix
    `V - 1` (single-query). Motifs are ordered tuples of distinct tokens (all permutations of
    each length, shuffled). Training keys have length uniform in `1..k_motif_size`, test keys
    always `k_motif_size`; values `1..v_motif_size`. A probe pair is drawn, inserted once at
    the first pair boundary at or after a random position `probe_idx` (or earlier if its key is
    drawn), pairs (or noise) are appended while `len < T - |probe| - k_motif - v_motif`, the
    probe pair is repeated at the end (its value scored), the sequence is left-padded with `pad`
    to `T + 1` and shifted. A key maps to one value per sequence (the probe key to the probe
    value); value tokens of a key presented before are scored when multi-query.

    Deviation: MAD can draw `probe_idx` past the start of the last pair slot, so that the probe
    is never presented and the final recall is impossible (a few percent of sequences at
    `T = 128`); here `probe_idx` is clamped to the last slot that is always reached.

    **Returns** a `TokenTask` (`(N, T)`) with `metadata`: `probe_key_lengths`,
    `probe_value_lengths` (`(N,)`) and `pad_lengths` (`(N,)`, left padding).
    """
    check_positive(
        num_examples=num_examples,
        seq_len=seq_len,
        vocab_size=vocab_size,
        k_motif_size=k_motif_size,
        v_motif_size=v_motif_size,
    )
    _check_noise(frac_noise, noise_vocab_size)
    special = vocab_size - noise_vocab_size - (1 if multi_query else 2)
    if special // 2 < max(k_motif_size, v_motif_size):
        raise ValueError(
            f"vocab_size {vocab_size} is too small for motifs of {k_motif_size}/{v_motif_size}"
        )
    if seq_len <= 2 * (k_motif_size + v_motif_size):
        raise ValueError(f"seq_len must exceed 2 * (k_motif_size + v_motif_size), got {seq_len}")
    pad = vocab_size - 1 if multi_query else vocab_size - 2
    key_vocab = np.arange(special // 2)
    value_vocab = np.arange(special // 2, special)
    noise_vocab = np.arange(special, special + noise_vocab_size)
    rng = np.random.default_rng(seed)
    rows = []
    meta: dict[str, list[int]] = {"probe_key_lengths": [], "probe_value_lengths": [], "pad": []}
    for _ in range(num_examples):
        key_sizes = (
            range(1, k_motif_size + 1) if is_training else range(k_motif_size, k_motif_size + 1)
        )
        keys = _motifs(key_vocab, key_sizes, rng)
        values = _motifs(value_vocab, range(1, v_motif_size + 1), rng)
        key_size_choices, value_size_choices = list(keys), list(values)
        probe_k_size = int(rng.choice(key_size_choices))
        probe_v_size = int(rng.choice(value_size_choices))
        probe_key = keys[probe_k_size][int(rng.integers(len(keys[probe_k_size])))]
        probe_value = values[probe_v_size][int(rng.integers(len(values[probe_v_size])))]
        probe_len = probe_k_size + probe_v_size
        bound = seq_len - probe_len - (k_motif_size + v_motif_size)
        probe_idx = int(rng.integers(seq_len - 2 * probe_len))
        probe_idx = min(probe_idx, max(bound - (k_motif_size + v_motif_size), 0))
        probe_added = False
        kv_map: dict[tuple, tuple] = {probe_key: probe_value}
        presented: set[tuple] = set()
        x: list[int] = []
        y: list[int] = []
        while len(x) < bound:
            k_size = int(rng.choice(key_size_choices))
            v_size = int(rng.choice(value_size_choices))
            if len(x) >= probe_idx and not probe_added:
                x += [*probe_key, *probe_value]
                y += [IGNORE_INDEX] * probe_len
                presented.add(probe_key)
                probe_added = True
                continue
            if frac_noise > 0 and rng.random() < frac_noise:
                x += [int(t) for t in rng.choice(noise_vocab, size=k_size + v_size)]
                y += [IGNORE_INDEX] * (k_size + v_size)
                continue
            key = keys[k_size][int(rng.integers(len(keys[k_size])))]
            if key == probe_key:
                probe_added = True
            elif key not in kv_map:
                kv_map[key] = values[v_size][int(rng.integers(len(values[v_size])))]
            value = kv_map[key]
            x += [*key, *value]
            y += [IGNORE_INDEX] * len(key)
            y += list(value) if (multi_query and key in presented) else [IGNORE_INDEX] * len(value)
            presented.add(key)
        if not multi_query:
            x.append(vocab_size - 1)
            y.append(IGNORE_INDEX)
        x += [*probe_key, *probe_value]
        y += [IGNORE_INDEX] * probe_k_size + list(probe_value)
        n_pad = seq_len + 1 - len(x)
        x = [pad] * n_pad + x
        y = [IGNORE_INDEX] * n_pad + y
        rows.append((x[:-1], x[1:] if is_training else y[1:]))
        meta["probe_key_lengths"].append(probe_k_size)
        meta["probe_value_lengths"].append(probe_v_size)
        meta["pad"].append(n_pad)
    return _stack(
        rows,
        vocab_size,
        probe_key_lengths=np.array(meta["probe_key_lengths"], dtype=np.int32),
        probe_value_lengths=np.array(meta["probe_value_lengths"], dtype=np.int32),
        pad_lengths=np.array(meta["pad"], dtype=np.int32),
    )


def selective_copying(
    num_examples: int,
    seq_len: int = 256,
    vocab_size: int = 16,
    num_tokens_to_copy: int = 16,
    *,
    seed: int,
) -> TokenTask:
    """MAD selective copying: copy the `n` content tokens scattered among blanks, in order.

    Content ids `[0, V-2)`, blank `V-2`, copy token `V-1`. The `n` tokens (with replacement)
    get `T - 2n - 1` blanks inserted before uniformly drawn content positions (`numpy.insert`
    at indices in `[0, n)`, so the last content token directly precedes the copy token), then
    the copy token and `n` blanks. Targets: -100 for the first `T - n` positions, then the
    content tokens in order (unshifted: the blank at position `T - n + i` emits token `i`).
    Deviation: MAD draws the insert positions from numpy's global RNG; here the seeded one.

    **Returns** a `TokenTask` with `metadata`: `content` (`(N, n)`), `content_positions`
    (`(N, n)`, input positions of the content tokens).
    """
    check_positive(
        num_examples=num_examples,
        seq_len=seq_len,
        vocab_size=vocab_size,
        num_tokens_to_copy=num_tokens_to_copy,
    )
    if seq_len <= 2 * num_tokens_to_copy + 1:
        raise ValueError(
            f"seq_len must be > 2 * num_tokens_to_copy + 1, got {seq_len} <= "
            f"{2 * num_tokens_to_copy + 1}"
        )
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3, got {vocab_size}")
    n = num_tokens_to_copy
    blank, copy = vocab_size - 2, vocab_size - 1
    num_blank = seq_len - 2 * n - 1
    rng = np.random.default_rng(seed)
    rows, contents, positions = [], [], []
    for _ in range(num_examples):
        content = rng.integers(0, vocab_size - 2, size=n)
        where = rng.integers(0, n, size=num_blank)
        body = np.insert(content, where, blank)
        is_content = np.insert(np.ones(n, dtype=bool), where, False)
        x = [*body.tolist(), copy, *([blank] * n)]
        y = [IGNORE_INDEX] * (n + num_blank + 1) + content.tolist()
        rows.append((x, y))
        contents.append(content)
        positions.append(np.flatnonzero(is_content))
    return _stack(
        rows,
        vocab_size,
        content=np.array(contents, dtype=np.int32),
        content_positions=np.array(positions, dtype=np.int32),
    )


def compression(
    num_examples: int, seq_len: int = 32, vocab_size: int = 16, *, seed: int
) -> TokenTask:
    """MAD compression: `T - 1` uniform ids from `[0, V-1)` then the compression token `V-1`.

    Targets equal the inputs: the MAD AutoEncoder encodes the sequence, keeps only the last
    position's state and must reconstruct every token (score every position).
    """
    check_positive(num_examples=num_examples, seq_len=seq_len, vocab_size=vocab_size)
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    rng = np.random.default_rng(seed)
    body = rng.integers(0, vocab_size - 1, size=(num_examples, seq_len - 1))
    inputs = np.concatenate([body, np.full((num_examples, 1), vocab_size - 1)], axis=1)
    inputs = inputs.astype(np.int32)
    return TokenTask(inputs, inputs.copy(), vocab_size, {})


def memorization_map(vocab_size: int, seed: int = 12345) -> dict[int, int]:
    """MAD's fixed key -> value bijection for memorization, from `default_rng(seed)`.

    Keys `[0, (V-1)//2)` and values `[(V-1)//2, V-1)` are each shuffled (keys first) and
    zipped; `V - 1` is the insert token. Independent of the instances' seed, so train and test
    share it (spec 2.2).
    """
    check_positive(vocab_size=vocab_size)
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3, got {vocab_size}")
    rng = np.random.default_rng(seed)
    half = (vocab_size - 1) // 2
    keys = list(range(half))
    values = list(range(half, vocab_size - 1))
    rng.shuffle(keys)  # pyright: ignore[reportArgumentType]
    rng.shuffle(values)  # pyright: ignore[reportArgumentType]
    return dict(zip(keys, values, strict=False))


def memorization(
    num_examples: int,
    seq_len: int = 32,
    vocab_size: int = 256,
    *,
    seed: int,
    map_seed: int = 12345,
) -> TokenTask:
    """MAD memorization: `T/2` pairs `k, INSERT` with `k` uniform; the insert emits `map[k]`.

    The map (`memorization_map(V, map_seed)`) never appears in context: it can only be stored
    in the weights. Unshifted targets: -100 at keys, `map[k]` at the insert token `V - 1`.
    """
    check_positive(num_examples=num_examples, seq_len=seq_len, vocab_size=vocab_size)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    table = memorization_map(vocab_size, map_seed)
    keys = np.array(list(table), dtype=np.int32)
    lookup = np.full(vocab_size, IGNORE_INDEX, dtype=np.int32)
    lookup[keys] = [table[int(k)] for k in keys]
    rng = np.random.default_rng(seed)
    drawn = keys[rng.integers(0, keys.shape[0], size=(num_examples, seq_len // 2))]
    inputs = np.empty((num_examples, seq_len), dtype=np.int32)
    targets = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int32)
    inputs[:, 0::2], inputs[:, 1::2] = drawn, vocab_size - 1
    targets[:, 1::2] = lookup[drawn]
    return TokenTask(inputs, targets, vocab_size, {})


def mad_accuracy(
    predictions: Int[np.ndarray, "N T"],
    task: TokenTask,
    average: Average = "macro",
) -> float:
    """MAD's accuracy of `predictions` on `task`: macro (class-averaged, the MAD default) or
    micro; see `masked_accuracy`."""
    return masked_accuracy(predictions, task.targets, average, num_classes=task.vocab_size)
