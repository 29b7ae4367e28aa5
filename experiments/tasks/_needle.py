"""A token-level single needle in a haystack: one key-value pair among random tokens, the key
asked again at the end (the recall behind RULER's S-NIAH, without its byte-level prompt)."""

import numpy as np

from ._token_task import IGNORE_INDEX, TokenTask


def single_needle(num_examples: int, seq_len: int, vocab_size: int = 64, *, seed: int) -> TokenTask:
    r"""Examples of length `seq_len`: haystack tokens uniform in $[1, V/2)$, the needle
    `key value` at positions $(p, p + 1)$ with $p$ uniform in $[0, T - 3]$ (so its depth is
    uniform), and the key again at the last position $T - 1$, whose target is the value. Keys
    are drawn from $[V/2, 3V/4)$ and values from $[3V/4, V)$, so neither occurs in the haystack;
    every other target is -100. Deterministic in `seed`.

    **Returns** a `TokenTask` with `metadata`: `position` ($p$), `key`, `value`.
    """
    if seq_len < 3:
        raise ValueError(f"single_needle: `seq_len` must be >= 3; got {seq_len}")
    if vocab_size < 8 or vocab_size % 4:
        raise ValueError(
            f"single_needle: `vocab_size` must be a multiple of 4, >= 8; got {vocab_size}"
        )
    rng = np.random.default_rng(seed)
    quarter = vocab_size // 4
    inputs = rng.integers(1, 2 * quarter, (num_examples, seq_len))
    position = rng.integers(0, seq_len - 2, num_examples)
    key = rng.integers(2 * quarter, 3 * quarter, num_examples)
    value = rng.integers(3 * quarter, vocab_size, num_examples)
    rows = np.arange(num_examples)
    inputs[rows, position] = key
    inputs[rows, position + 1] = value
    inputs[:, -1] = key
    targets = np.full((num_examples, seq_len), IGNORE_INDEX)
    targets[:, -1] = value
    return TokenTask(
        inputs.astype(np.int32),
        targets.astype(np.int32),
        vocab_size,
        metadata=dict(position=position, key=key, value=value),
    )
