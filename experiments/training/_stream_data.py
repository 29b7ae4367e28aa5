"""The token stream of `atlas-eqx stream` (what streams and how it is scored: `_stream.py`):
`StreamConfig`, the word vocabulary, and `generate_stream`, which interleaves bAbI-style facts
with distractor sentences from the corpus and asks where an actor is, in fixed-size calls."""

import dataclasses
import re
from collections.abc import Iterator

import numpy as np

from ..tasks._babilong import ACTORS, babi_samples, LOCATIONS
from ..tasks._corpus import load_corpus, load_excerpt
from ..tasks._token_task import split_sentences


OPTIMIZERS = ("gd", "momentum", "muon_per_chunk", "muon")
MEMORIES = ("linear", "mlp")
CORPORA = ("excerpt", "full")
_WORD = re.compile(r"[a-z]+")
START = "<s>"  # the "previous word" of a sentence's first word
QUESTION_CUE = "the"  # facts read "<actor> <verb> to the <location>"


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """One memory-only stream: its length, the memory, the inner learner and the questions."""

    tokens: int = 1_000_000
    call_tokens: int = 8192
    dim: int = 32
    memory: str = "linear"
    optimizer: str = "gd"
    window: int = 4
    chunk_size: int = 8
    lr: float = 0.1
    decay: float = 1.0
    momentum: float = 0.5
    facts: int = 64
    questions: int = 256
    corpus: str = "excerpt"
    seed: int = 0
    checkpoint_every: int = 64

    def __post_init__(self):
        for name in ("tokens", "call_tokens", "dim", "window", "chunk_size", "facts"):
            if getattr(self, name) < 1:
                raise ValueError(f"StreamConfig: `{name}` must be >= 1; got {getattr(self, name)}")
        if self.questions < 0 or self.checkpoint_every < 0:
            raise ValueError("StreamConfig: `questions` and `checkpoint_every` must be >= 0")
        if self.call_tokens % self.chunk_size:
            raise ValueError(
                f"StreamConfig: `call_tokens`={self.call_tokens} must be a multiple of "
                f"`chunk_size`={self.chunk_size} (every call starts a chunk)"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"StreamConfig: `optimizer` must be one of {OPTIMIZERS}")
        if self.memory not in MEMORIES:
            raise ValueError(f"StreamConfig: `memory` must be one of {MEMORIES}")
        if self.corpus not in CORPORA:
            raise ValueError(f"StreamConfig: `corpus` must be one of {CORPORA}")
        if not self.lr > 0 or not 0 < self.decay <= 1 or not 0 <= self.momentum < 1:
            raise ValueError(
                "StreamConfig: need lr > 0, decay in (0, 1] and momentum in [0, 1); got "
                f"{self.lr}, {self.decay}, {self.momentum}"
            )

    @property
    def calls(self) -> int:
        return -(-self.tokens // self.call_tokens)


def words(text: str) -> list[str]:
    """The word tokens of `text`: lower-cased runs of ASCII letters."""
    return _WORD.findall(text.lower())


def _distractor_sentences(corpus: str) -> list[list[str]]:
    if corpus == "full":
        text = load_corpus("train").tobytes().decode("utf-8", errors="ignore")
    else:
        text = load_excerpt()
    sentences = [words(s) for s in split_sentences(text)]
    return [s for s in sentences if len(s) >= 3]


class Vocabulary:
    """Word ids over the distractor text and every word the facts and questions can use."""

    def __init__(self, sentences: list[list[str]]):
        extra = [w.lower() for w in ACTORS + LOCATIONS] + words(
            "moved went journeyed travelled back to the"
        )
        self.words: list[str] = []
        self.index: dict[str, int] = {}
        for word in [START] + [w for s in sentences for w in s] + extra:
            self._add(word)

    def _add(self, word: str) -> None:
        if word not in self.index:
            self.index[word] = len(self.words)
            self.words.append(word)

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, tokens: list[str]) -> list[int]:
        return [self.index[w] for w in tokens]


@dataclasses.dataclass
class StreamCall:
    """One call's worth of the stream: `tokens` (word ids), `subjects` (the id of each token's
    sentence's first word), `question_actor` (actor word id at question positions, else -1)
    and, per question, `(position, actor, answer location, depth)`."""

    start: int
    tokens: np.ndarray
    subjects: np.ndarray
    previous: np.ndarray
    question_actor: np.ndarray
    questions: list[tuple[int, str, str, int]]


def _fact_chain(count: int, seed: int) -> list[tuple[str, str, list[str]]]:
    """`count` qa1 move facts, in story order: (actor, location, words)."""
    facts: list[tuple[str, str, list[str]]] = []
    offset = 0
    while len(facts) < count:
        samples = babi_samples(1, 5 * (count // 10 + 1), seed=seed + offset)
        offset += 1
        for sample in samples:
            if len(sample.facts) != 10:  # the last question of a story holds all 10 facts
                continue
            for fact in sample.facts:
                tokens = words(fact)
                actor, location = tokens[0], tokens[-1]
                assert actor in {a.lower() for a in ACTORS} and location in LOCATIONS, fact
                facts.append((actor, location, tokens))
    return facts[:count]


def generate_stream(config: StreamConfig, vocab: Vocabulary | None = None) -> Iterator[StreamCall]:
    """The stream of `config`, one `StreamCall` of `call_tokens` tokens at a time (the last
    one padded with distractor text to the call size; only `tokens` tokens are scored)."""
    sentences = _distractor_sentences(config.corpus)
    vocab = vocab if vocab is not None else Vocabulary(sentences)
    ids = [np.asarray(vocab.ids(s), np.int32) for s in sentences]
    rng = np.random.default_rng(config.seed)
    fact_positions = np.sort(rng.integers(0, config.tokens, size=config.facts))
    facts = _fact_chain(config.facts, int(rng.integers(2**31)))
    fact_ids = [np.asarray(vocab.ids(f[2]), np.int32) for f in facts]
    question_positions = np.unique(rng.integers(0, config.tokens, size=config.questions))
    question_rng = np.random.default_rng((config.seed, 1))
    sentence = int(rng.integers(len(ids)))
    next_fact = next_question = 0
    latest: dict[str, tuple[str, int]] = {}  # actor -> (location, fact position)
    buffer_tokens: list[np.ndarray] = []
    buffer_subjects: list[np.ndarray] = []
    buffer_previous: list[np.ndarray] = []
    start_id = vocab.index[START]
    pending_facts: list[tuple[int, str, str]] = []  # (last position, actor, location)
    position = 0  # tokens emitted into buffers so far
    call_start = 0
    total = config.calls * config.call_tokens

    def flush() -> StreamCall:
        nonlocal buffer_tokens, buffer_subjects, buffer_previous, call_start, next_question
        tokens = np.concatenate(buffer_tokens)
        subjects = np.concatenate(buffer_subjects)
        previous = np.concatenate(buffer_previous)
        n = config.call_tokens
        rest = tokens[n:], subjects[n:], previous[n:]
        tokens, subjects, previous = tokens[:n], subjects[:n], previous[:n]
        end = call_start + n
        question_actor = np.full(n, -1, np.int32)
        questions = []
        # A fact is known to a question once its last word is written (read after write).
        events = sorted(e for e in pending_facts if e[0] < end)
        pending_facts[:] = [e for e in pending_facts if e[0] >= end]
        e = 0
        while next_question < len(question_positions) and question_positions[next_question] < end:
            at = int(question_positions[next_question])
            next_question += 1
            while e < len(events) and events[e][0] <= at:
                latest[events[e][1]] = (events[e][2], events[e][0])
                e += 1
            known = sorted(latest)
            if not known:
                continue
            actor = known[int(question_rng.integers(len(known)))]
            location, fact_end = latest[actor]
            question_actor[at - call_start] = vocab.index[actor]
            questions.append((at, actor, location, at - fact_end))
        for fact_end, actor, location in events[e:]:
            latest[actor] = (location, fact_end)
        call = StreamCall(call_start, tokens, subjects, previous, question_actor, questions)
        buffer_tokens, buffer_subjects, buffer_previous = ([r] for r in rest)
        call_start = end
        return call

    while call_start < total:
        if next_fact < len(facts) and fact_positions[next_fact] <= position:
            piece = fact_ids[next_fact]
            actor, location, _ = facts[next_fact]
            pending_facts.append((position + len(piece) - 1, actor, location))
            next_fact += 1
        else:
            piece = ids[sentence % len(ids)]
            sentence += 1
        buffer_tokens.append(piece)
        buffer_subjects.append(np.full(len(piece), piece[0], np.int32))
        buffer_previous.append(np.concatenate([[start_id], piece[:-1]]).astype(np.int32))
        position += len(piece)
        while position - call_start >= config.call_tokens and call_start < total:
            yield flush()
