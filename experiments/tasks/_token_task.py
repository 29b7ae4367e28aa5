"""What every sequence task returns, and the accuracy conventions used to score it.

Generators live in `_mqar.py`, `_mad.py`, `_niah.py`, `_babilong.py` (token sequences) and
`_capacity.py` (key/value streams for `atlas_eqx.omega_scan`); each module's docstring
states its task's specification.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Literal

import numpy as np
from jaxtyping import Int, Int32


IGNORE_INDEX = -100
Average = Literal["micro", "macro", "example"]


@dataclasses.dataclass(frozen=True)
class TokenTask:
    """A batch of examples of one task.

    - `inputs`: `(N, T)` int32 token ids in `[0, vocab_size)`.
    - `targets`: `(N, T)` int32; the token to predict at each position, or `IGNORE_INDEX`
      (-100) where nothing is scored. Each generator documents the alignment (for the
      next-token tasks `targets[:, t]` is scored from the prediction made at position `t`).
    - `vocab_size`: the number of token ids.
    - `metadata`: per-example numpy arrays (first axis `N`) named in the generator's docstring.
    """

    inputs: Int32[np.ndarray, "N T"]
    targets: Int32[np.ndarray, "N T"]
    vocab_size: int
    metadata: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.inputs.shape != self.targets.shape or self.inputs.ndim != 2:
            raise ValueError(
                f"inputs and targets must both be (N, T), got {self.inputs.shape} and "
                f"{self.targets.shape}"
            )

    @property
    def num_scored(self) -> Int[np.ndarray, " N"]:
        """How many positions of each example are scored."""
        return (self.targets != IGNORE_INDEX).sum(axis=1)


def masked_accuracy(
    predictions: Int[np.ndarray, "N T"],
    targets: Int[np.ndarray, "N T"],
    average: Average = "micro",
    num_classes: int | None = None,
) -> float:
    r"""Accuracy of `predictions` (e.g. `logits.argmax(-1)`) at the positions `targets != -100`.

    - `"micro"`: correct scored positions / scored positions.
    - `"example"`: the per-example fraction of correct scored positions, averaged over the
      examples that have at least one scored position (Zoology's MQAR metric, spec 2.1).
    - `"macro"`: class-averaged recall, torchmetrics `MulticlassAccuracy(average="macro",
      ignore_index=-100)` (MAD's metric, spec 2.2): for each class $c$ that occurs among the
      scored targets or predictions, $\mathrm{TP}_c / (\mathrm{TP}_c + \mathrm{FN}_c)$ (0 when
      the class only occurs as a prediction); then the mean over those classes. `num_classes`
      bounds the class ids (predictions outside `[0, num_classes)` raise).
    """
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions and targets must have the same shape, got {predictions.shape} and "
            f"{targets.shape}"
        )
    scored = targets != IGNORE_INDEX
    if not scored.any():
        raise ValueError("targets has no scored position (all are -100)")
    correct = (predictions == targets) & scored
    if average == "micro":
        return float(correct.sum() / scored.sum())
    if average == "example":
        counts = scored.sum(axis=-1).reshape(-1)
        hits = correct.sum(axis=-1).reshape(-1)
        keep = counts > 0
        return float(np.mean(hits[keep] / counts[keep]))
    if average == "macro":
        truth, guess = targets[scored], predictions[scored]
        if num_classes is not None and ((guess < 0) | (guess >= num_classes)).any():
            raise ValueError(f"predictions must lie in [0, {num_classes})")
        classes = np.union1d(truth, guess)
        recalls = [
            float(((guess == c) & (truth == c)).sum() / max((truth == c).sum(), 1)) for c in classes
        ]
        return float(np.mean(recalls))
    raise ValueError(f"average must be 'micro', 'macro' or 'example', got {average!r}")


def exact_match(predictions: Int[np.ndarray, "N T"], targets: Int[np.ndarray, "N T"]) -> float:
    """Fraction of examples whose every scored position is predicted correctly.

    The teacher-forced analogue of RULER's `string_match_all` and BABILong's substring check
    when the answer is the only scored span.
    """
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions and targets must have the same shape, got {predictions.shape} and "
            f"{targets.shape}"
        )
    scored = targets != IGNORE_INDEX
    wrong = (predictions != targets) & scored
    keep = scored.any(axis=-1)
    if not keep.any():
        raise ValueError("targets has no scored position (all are -100)")
    return float(np.mean(~wrong.any(axis=-1)[keep]))


def encode_text(text: str) -> Int32[np.ndarray, " n"]:
    """UTF-8 bytes of `text` as int32 token ids `0..255` (the library is byte-level)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode_tokens(tokens: Int[np.ndarray, " n"]) -> str:
    """Inverse of `encode_text` (invalid UTF-8 is replaced)."""
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?= )")
_ABBREVIATIONS = frozenset({"Mr.", "Mrs.", "Dr.", "St.", "Mme.", "Messrs."})


def split_sentences(text: str) -> list[str]:
    """Whitespace-collapse `text` and split it after `.`, `!` or `?` (and closing quotes).

    A small regex stand-in for NLTK Punkt (RULER and BABILong split with Punkt; the data note,
    section 2.3, allows a regex splitter), keeping common titles (`Mr.`, `Mrs.`, ...) inside
    their sentence. `" ".join(split_sentences(t)) == " ".join(t.split())` always holds.
    """
    flat = " ".join(text.split())
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(flat):
        word = flat[flat.rfind(" ", 0, match.start()) + 1 : match.end()]
        if word in _ABBREVIATIONS:
            continue
        sentences.append(flat[start : match.end()])
        start = match.end() + 1
    if start < len(flat):
        sentences.append(flat[start:])
    return sentences
