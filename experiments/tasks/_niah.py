"""RULER single-needle-in-a-haystack, byte-level (`niah_single_1/2/3`; spec 2.3 of the data note).

Titans/ATLAS name the three variants S-NIAH-PK (noise haystack, 7-digit number), S-NIAH-N
(essay haystack, number) and S-NIAH-W (essay haystack, UUID). RULER's essay haystack is Paul
Graham's essays, which may not be redistributed: the default haystack here is the shipped
public-domain excerpt (`experiments.tasks._corpus.load_excerpt`), and any text (e.g. a corpus split)
can be passed instead. Keys are `"adjective-noun"` from the word lists in `experiments/tasks/data/`
(RULER draws them from the `wonderwords` lists, which this project does not depend on).
"""

import functools
import pathlib
import uuid
from typing import Literal

import numpy as np

from ._corpus import load_excerpt
from ._token_task import check_positive, IGNORE_INDEX, split_sentences, TokenTask


Variant = Literal["pk", "n", "w"]
VARIANTS: tuple[Variant, ...] = ("pk", "n", "w")
NOISE_BLOCK = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
# RULER's 40 evenly spaced depths (percent) for the essay haystack.
DEPTHS = np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(np.int64)
PAD = 0  # the NUL byte never occurs in the texts


@functools.cache
def niah_keys() -> tuple[str, ...]:
    """The sorted `"adjective-noun"` keys (shipped word lists; RULER uses wonderwords')."""
    data = pathlib.Path(__file__).parent / "data"
    adjectives = (data / "adjectives.txt").read_text().split()
    nouns = (data / "nouns.txt").read_text().split()
    return tuple(sorted(f"{a}-{n}" for a in adjectives for n in nouns))


def _value(variant: Variant, rng: np.random.Generator) -> str:
    if variant == "w":
        high, low = (int(x) for x in rng.integers(0, 2**64, size=2, dtype=np.uint64))
        return str(uuid.UUID(int=(high << 64) | low, version=4))
    return str(int(rng.integers(10**6, 10**7)))


def _templates(variant: Variant, key: str) -> tuple[str, str, str]:
    """(prefix before the context, question + answer prefix after it, needle format)."""
    kind = "uuid" if variant == "w" else "number"
    prefix = (
        f"A special magic {kind} is hidden within the following text. Make sure to memorize "
        f"it. I will quiz you about the {kind} afterwards.\n"
    )
    suffix = (
        f"\nWhat is the special magic {kind} for {key} mentioned in the provided text?"
        f" The special magic {kind} for {key} mentioned in the provided text is "
    )
    return prefix, suffix, f"One of the special magic {kind}s for {key} is: {{value}}."


def s_niah(
    num_examples: int,
    seq_len: int,
    variant: Variant = "pk",
    *,
    seed: int,
    depth: float | None = None,
    haystack: str | None = None,
    random_start: bool = False,
) -> TokenTask:
    """RULER S-NIAH prompts as bytes, the answer scored under teacher forcing.

    Each example is the UTF-8 bytes of
    `prefix + context + question + answer prefix + value`, where the context holds the needle
    `"One of the special magic {numbers|uuids} for {key} is: {value}."` and the prompt is RULER's
    (`niah.py` templates; the answer prefix ends with a space so the scored span is the value
    itself). `inputs = bytes[:-1]`, `targets[t] = bytes[t + 1]` at the value's bytes and -100
    elsewhere; the sequence is right-padded with byte 0 (`targets` -100) to `seq_len`.

    - `variant`: `"pk"`: the noise haystack (`NOISE_BLOCK` lines joined by newlines; the needle
      is one more line at block index `int(n * depth / 100)`, or uniform in `[0, n)` as in
      RULER when `depth` is None) with a 7-digit number; `"n"`: the essay haystack
      (whitespace-collapsed `haystack` words, cycled if too short, sentence-split; the needle
      goes before sentence `int(#sentences * depth / 100)`, `depth` drawn from RULER's 40
      `DEPTHS` when None) with a number; `"w"`: the essay haystack with a UUID-4.
    - `seq_len`: the length in bytes (= tokens) of `inputs`: the haystack is filled with the
      largest number of blocks / words that fits (RULER binary-searches under its tokenizer;
      with bytes the length is additive).
    - `depth`: needle depth in percent of the haystack, `[0, 100]`.
    - `haystack`: essay text; default the shipped excerpt. `random_start`: begin the essay at a
      random word instead of the first (RULER always starts at the first).

    **Returns** a `TokenTask` (`vocab_size` 256) with `metadata`: `keys`, `values` (str),
    `depths` (requested percent), `needle_offsets` (input position of the needle's first
    byte), `needle_depths` (needle offset within the context as a fraction of its bytes),
    `context_starts`, `context_ends` (byte range of the context in the inputs),
    `answer_starts` (first scored input position; the value spans
    `answer_starts .. answer_starts + len(value) - 1`), `lengths` (unpadded input lengths).
    """
    check_positive(num_examples=num_examples, seq_len=seq_len)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if depth is not None and not 0 <= depth <= 100:
        raise ValueError(f"depth must be in [0, 100] (percent), got {depth}")
    rng = np.random.default_rng(seed)
    keys = niah_keys()
    words = (haystack if haystack is not None else load_excerpt()).split()
    if variant != "pk" and not words:
        raise ValueError("haystack must contain at least one word")
    word_bytes = np.array([len(w.encode("utf-8")) for w in words], dtype=np.int64)
    inputs = np.full((num_examples, seq_len), PAD, dtype=np.int32)
    targets = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int32)
    meta: dict[str, list] = {
        name: []
        for name in (
            "keys",
            "values",
            "depths",
            "needle_offsets",
            "needle_depths",
            "context_starts",
            "context_ends",
            "answer_starts",
            "lengths",
        )
    }
    for row in range(num_examples):
        key = keys[int(rng.integers(len(keys)))]
        value = _value(variant, rng)
        prefix, suffix, needle_format = _templates(variant, key)
        needle = needle_format.format(value=value)
        fixed = len((prefix + suffix + value).encode()) + len(needle.encode())
        budget = seq_len + 1 - fixed  # haystack bytes, separators included
        if variant == "pk":
            blocks = (budget - 0) // (len(NOISE_BLOCK) + 1)
            if blocks < 1:
                raise ValueError(f"seq_len {seq_len} is too short for a noise haystack")
            index = int(rng.integers(blocks)) if depth is None else int(blocks * depth / 100)
            row_depth = 100.0 * index / blocks if depth is None else float(depth)
            lines = [NOISE_BLOCK] * blocks
            lines.insert(index, needle)
            context = "\n".join(lines)
        else:
            start = int(rng.integers(len(words))) if random_start else 0
            count = int(budget // 2) + 1
            order = (start + np.arange(count)) % len(words)
            lengths = np.cumsum(word_bytes[order] + 1) - 1  # " ".join of the first m words
            fits = int(np.searchsorted(lengths, budget - 1, side="right"))  # + " " + needle
            if fits < 1:
                raise ValueError(f"seq_len {seq_len} is too short for an essay haystack")
            sentences = split_sentences(" ".join(words[i] for i in order[:fits]))
            row_depth = float(DEPTHS[int(rng.integers(len(DEPTHS)))] if depth is None else depth)
            index = int(len(sentences) * row_depth / 100)
            sentences.insert(index, needle)
            context = " ".join(sentences)
        head = (prefix + context.split(needle)[0]).encode()
        sequence = (prefix + context + suffix + value).encode()
        if len(sequence) > seq_len + 1:
            raise AssertionError("length control overflowed")  # pragma: no cover
        n = len(sequence) - 1
        inputs[row, :n] = np.frombuffer(sequence[:-1], dtype=np.uint8)
        answer_start = len(sequence) - len(value.encode()) - 1
        targets[row, answer_start:n] = np.frombuffer(sequence[answer_start + 1 :], dtype=np.uint8)
        context_start = len(prefix.encode())
        context_end = context_start + len(context.encode())
        meta["keys"].append(key)
        meta["values"].append(value)
        meta["depths"].append(row_depth)
        meta["needle_offsets"].append(len(head))
        meta["needle_depths"].append((len(head) - context_start) / (context_end - context_start))
        meta["context_starts"].append(context_start)
        meta["context_ends"].append(context_end)
        meta["answer_starts"].append(answer_start)
        meta["lengths"].append(n)
    metadata = {
        "keys": np.array(meta["keys"]),
        "values": np.array(meta["values"]),
        "depths": np.array(meta["depths"], dtype=np.float64),
        "needle_depths": np.array(meta["needle_depths"], dtype=np.float64),
    }
    for name in ("needle_offsets", "context_starts", "context_ends", "answer_starts", "lengths"):
        metadata[name] = np.array(meta[name], dtype=np.int64)
    return TokenTask(inputs, targets, 256, metadata)


def string_match_all(predictions: list[str], references: list[list[str]] | list[str]) -> float:
    """RULER's `string_match_all`, in percent: per sample the fraction of reference strings
    contained (case-insensitively) in the prediction, averaged over samples."""
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} "
            f"and {len(references)}"
        )
    if not predictions:
        raise ValueError("predictions is empty")
    scores = []
    for prediction, refs in zip(predictions, references, strict=True):
        refs = [refs] if isinstance(refs, str) else refs
        scores.append(sum(r.lower() in prediction.lower() for r in refs) / len(refs))
    return 100.0 * float(np.mean(scores))
