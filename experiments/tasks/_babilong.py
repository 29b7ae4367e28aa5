"""bAbI qa1-qa5 stories and BABILong-style long contexts, byte-level (spec 2.4 of the data note).

The bAbI data files are not obtainable offline, so the stories are simulated (after the
official Lua generator's `world_basic` and the released surface forms): a world of actors,
locations and objects in which only *valid* actions happen (an actor drops only what they hold,
picks up an object only where it lies, gives only to someone in the same place, never moves to
where they are). BABILong then hides a sample's facts, in order, at sentence boundaries of real
distractor text (PG19 there; the shipped public-domain excerpt or a corpus split here).
"""

import dataclasses
from typing import NamedTuple

import numpy as np

from ._corpus import load_excerpt
from ._token_task import check_positive, IGNORE_INDEX, split_sentences, TokenTask


TASKS = (1, 2, 3, 4, 5)
ACTORS = ("John", "Mary", "Sandra", "Daniel")
ACTORS_QA5 = ("Bill", "Fred", "Jeff", "Mary")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVE_VERBS = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
GET_VERBS = ("got", "took", "grabbed", "picked up")
DROP_VERBS = ("dropped", "put down", "discarded", "left")
GIVE_VERBS = ("gave", "handed", "passed")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
QUESTIONS_PER_STORY = 5
MAX_STORY_FACTS = 120


class BabiSample(NamedTuple):
    """One single-question bAbI sample (BABILong splits multi-question stories like this).

    `facts`: the story's non-question lines up to the question, in order (e.g.
    `"Mary went to the kitchen."`); `supporting_facts`: 0-based indices into `facts`.
    """

    task: int
    facts: tuple[str, ...]
    question: str
    answer: str
    supporting_facts: tuple[int, ...]


@dataclasses.dataclass
class _Entry:
    location: str
    supports: tuple[int, ...]
    holding: int


class _World:
    """The true world state and, per fact, what a reader of the story can know."""

    def __init__(self, rng: np.random.Generator, actors: tuple[str, ...]):
        self.rng = rng
        self.actors = actors
        self.location = {a: self._pick(LOCATIONS) for a in actors}
        self.last_move: dict[str, int | None] = {a: None for a in actors}
        self.holder: dict[str, str | None] = {o: None for o in OBJECTS}
        self.object_location = {o: self._pick(LOCATIONS) for o in OBJECTS}
        self.object_fact: dict[str, tuple[int, ...] | None] = {o: None for o in OBJECTS}
        self.trace: dict[str, list[_Entry]] = {o: [] for o in OBJECTS}
        self.holding = {o: 0 for o in OBJECTS}
        self.gives: list[tuple[int, str, str, str]] = []  # (fact, giver, object, receiver)
        self.facts: list[str] = []

    def _pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def actions(self, kinds: tuple[str, ...]) -> dict[str, list[tuple]]:
        valid: dict[str, list[tuple]] = {}
        if "move" in kinds:
            valid["move"] = [
                (a, place) for a in self.actors for place in LOCATIONS if place != self.location[a]
            ]
        if "get" in kinds:
            valid["get"] = [
                (a, o)
                for a in self.actors
                for o in OBJECTS
                if self.holder[o] is None and self.object_location[o] == self.location[a]
            ]
        if "drop" in kinds:
            valid["drop"] = [(self.holder[o], o) for o in OBJECTS if self.holder[o] is not None]
        if "give" in kinds:
            held = [(h, o) for o in OBJECTS if (h := self.holder[o]) is not None]
            valid["give"] = [
                (h, o, b)
                for h, o in held
                for b in self.actors
                if b != h and self.location[b] == self.location[h]
            ]
        return {kind: options for kind, options in valid.items() if options}

    def random_action(self, kinds: tuple[str, ...]) -> None:
        """A uniform action type among those with a valid instance, then a uniform instance."""
        valid = self.actions(kinds)
        kind = self._pick(sorted(valid))
        getattr(self, kind)(*self._pick(valid[kind]))

    def move(self, actor: str, place: str) -> None:
        index = len(self.facts)
        self.facts.append(f"{actor} {self._pick(MOVE_VERBS)} the {place}.")
        self.location[actor], self.last_move[actor] = place, index
        for o in OBJECTS:
            if self.holder[o] == actor:
                self.object_location[o] = place
                get = self.object_fact[o]
                assert get is not None
                self._record(o, place, (get[0], index))

    def get(self, actor: str, obj: str) -> None:
        index = len(self.facts)
        there = " there" if self.rng.random() < 0.5 else ""
        self.facts.append(f"{actor} {self._pick(GET_VERBS)} the {obj}{there}.")
        self.holder[obj] = actor
        self.object_fact[obj] = (index,)
        self.holding[obj] += 1
        move = self.last_move[actor]
        if move is not None:
            self._record(obj, self.location[actor], (move, index))

    def drop(self, actor: str, obj: str) -> None:
        index = len(self.facts)
        there = " there" if self.rng.random() < 0.5 else ""
        self.facts.append(f"{actor} {self._pick(DROP_VERBS)} the {obj}{there}.")
        self.holder[obj] = None
        self.object_location[obj] = self.location[actor]
        move = self.last_move[actor]
        self.object_fact[obj] = (index,) if move is None else (index, move)
        self.holding[obj] += 1

    def give(self, giver: str, obj: str, receiver: str) -> None:
        index = len(self.facts)
        self.facts.append(f"{giver} {self._pick(GIVE_VERBS)} the {obj} to {receiver}.")
        self.holder[obj] = receiver
        self.object_fact[obj] = (index,)
        self.holding[obj] += 1
        self.gives.append((index, giver, obj, receiver))

    def _record(self, obj: str, place: str, supports: tuple[int, ...]) -> None:
        trace = self.trace[obj]
        if not trace or trace[-1].location != place:
            trace.append(_Entry(place, supports, self.holding[obj]))

    # questions: (question, answer, supporting facts) or None when not answerable

    def where_is_object(self, obj: str) -> tuple[str, str, tuple[int, ...]] | None:
        holder, fact = self.holder[obj], self.object_fact[obj]
        if fact is None:
            return None
        if holder is not None:
            move = self.last_move[holder]
            if move is None:
                return None
            return f"Where is the {obj}?", self.location[holder], tuple(sorted((fact[0], move)))
        if len(fact) < 2:  # dropped where the reader cannot know
            return None
        return f"Where is the {obj}?", self.object_location[obj], tuple(sorted(fact))

    def where_was_object(self, obj: str) -> tuple[str, str, tuple[int, ...]] | None:
        trace = self.trace[obj]
        if len(trace) < 2 or trace[-1].holding != trace[-2].holding:
            return None
        if [e.location for e in trace].count(trace[-1].location) != 1:
            return None
        if self.holder[obj] is None and self.object_location[obj] != trace[-1].location:
            return None  # pragma: no cover - a drop keeps the last traced place
        supports = tuple(sorted(set(trace[-2].supports) | set(trace[-1].supports)))
        question = f"Where was the {obj} before the {trace[-1].location}?"
        return question, trace[-2].location, supports


def _qa1(world: _World, questions: list) -> None:
    for _ in range(QUESTIONS_PER_STORY):
        for _ in range(2):
            world.random_action(("move",))
        known = [a for a in world.actors if world.last_move[a] is not None]
        actor = world._pick(known)
        move = world.last_move[actor]
        assert move is not None
        questions.append((len(world.facts), f"Where is {actor}?", world.location[actor], (move,)))


def _qa23(world: _World, questions: list, task: int) -> None:
    since = 0
    while len(questions) < QUESTIONS_PER_STORY and len(world.facts) < MAX_STORY_FACTS:
        world.random_action(("move", "get", "drop"))
        since += 1
        if since < 3 or world.rng.random() < 0.5:
            continue
        ask = world.where_is_object if task == 2 else world.where_was_object
        asked = {(q[1], q[2]) for q in questions}
        answerable = [
            qa for qa in (ask(o) for o in OBJECTS) if qa is not None and qa[:2] not in asked
        ]
        if answerable:
            question, answer, supports = world._pick(answerable)
            questions.append((len(world.facts), question, answer, supports))
            since = 0


def _qa4(world: _World, questions: list) -> None:
    rng = world.rng
    axis = ("north", "south") if rng.random() < 0.5 else ("east", "west")
    direction = world._pick(axis)
    a, b, c = (LOCATIONS[i] for i in rng.permutation(len(LOCATIONS))[:3])
    relations = [(a, direction, b), (b, direction, c)]
    if rng.random() < 0.5:
        relations.reverse()
    for x, d, y in relations:
        world.facts.append(f"The {x} is {d} of the {y}.")
    support = int(rng.integers(2))
    x, d, y = relations[support]
    form = int(rng.integers(4))
    question, answer = [
        (f"What is {d} of the {y}?", x),
        (f"What is the {x} {d} of?", y),
        (f"What is {OPPOSITE[d]} of the {x}?", y),
        (f"What is the {y} {OPPOSITE[d]} of?", x),
    ][form]
    questions.append((2, question, answer, (support,)))


def _latest_give(world: _World, giver=None, obj=None, receiver=None):
    for give in reversed(world.gives):
        if all(
            want is None or want == got
            for want, got in zip((giver, obj, receiver), give[1:], strict=True)
        ):
            return give
    raise AssertionError("no matching give")  # pragma: no cover


def _qa5(world: _World, questions: list) -> None:
    rng = world.rng
    while len(questions) < QUESTIONS_PER_STORY and len(world.facts) < MAX_STORY_FACTS:
        gives = len(world.gives)
        world.random_action(("move", "get", "give"))
        if len(world.gives) == gives or len(world.facts) < 2:
            continue
        _, giver, obj, receiver = world.gives[-1]
        for _ in range(int(rng.integers(6))):
            world.random_action(("move", "get", "give"))
        form = int(rng.integers(5))
        if form == 0:
            fact = _latest_give(world, giver=giver, receiver=receiver)
            question, answer = f"What did {giver} give to {receiver}?", fact[2]
        elif form == 1:
            fact = _latest_give(world, obj=obj)
            question, answer = f"Who gave the {obj}?", fact[1]
        elif form == 2:
            fact = _latest_give(world, obj=obj, receiver=receiver)
            question, answer = f"Who gave the {obj} to {receiver}?", fact[1]
        elif form == 3:
            fact = _latest_give(world, giver=giver, obj=obj)
            question, answer = f"Who did {giver} give the {obj} to?", fact[3]
        else:
            fact = _latest_give(world, obj=obj)
            question, answer = f"Who received the {obj}?", fact[3]
        questions.append((len(world.facts), question, answer, (fact[0],)))


def babi_samples(task: int, num_samples: int, *, seed: int) -> list[BabiSample]:
    """`num_samples` single-question bAbI samples of task `qa{task}` (1-5), from simulated stories.

    - qa1 (single supporting fact): stories of 5 x (2 moves + `Where is X?`) about an actor
      who has moved; support = the actor's last move.
    - qa2 (two supporting facts): moves, gets and drops; after >= 3 new facts, with
      probability 1/2, `Where is the O?` about an object whose place the reader can know;
      support = the latest get/drop of the object and the relevant actor's latest move.
    - qa3 (three supporting facts): the same world; `Where was the O before the L?` where `L`
      is the object's current (first-time) place and the answer its previous place, both
      reached while one actor held it; supports = the get and the two moves (or the move
      before the get, the get and the move).
    - qa4 (two-argument relations): `The A is d of the B.`, `The B is d of the C.` (random
      order) on one N-S or E-W line; `What is d of the Y?`, `What is the X d of?` or the
      opposite-direction forms; one support.
    - qa5 (three-argument relations, actors Bill, Fred, Jeff, Mary): moves, gets and gives;
      after a give, 0-5 more actions, then one of `What did X give to Y?`, `Who gave the O?`,
      `Who gave the O to Y?`, `Who did X give the O to?`, `Who received the O?` (answered by
      the latest matching give; support = that give).

    Action choice: a uniform action type among those with a valid instance, then a uniform
    valid instance (the data note says "uniformly among valid ones"; drawing the type first
    keeps gets and drops frequent, as in the released files). Stories have 5 questions
    (qa4: 1) and stop at `MAX_STORY_FACTS` facts; each question becomes one sample whose
    facts are the story's lines before it.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_positive(num_samples=num_samples)
    rng = np.random.default_rng(seed)
    samples: list[BabiSample] = []
    while len(samples) < num_samples:
        world = _World(rng, ACTORS_QA5 if task == 5 else ACTORS)
        questions: list[tuple[int, str, str, tuple[int, ...]]] = []
        if task == 1:
            _qa1(world, questions)
        elif task in (2, 3):
            _qa23(world, questions, task)
        elif task == 4:
            _qa4(world, questions)
        else:
            _qa5(world, questions)
        for count, question, answer, supports in questions:
            facts = tuple(world.facts[:count])
            samples.append(BabiSample(task, facts, question, answer, tuple(supports)))
    return samples[:num_samples]


def babilong(
    task: int,
    num_examples: int,
    seq_len: int,
    *,
    seed: int,
    distractor_text: str | None = None,
    min_sentence_bytes: int = 40,
    max_fact_fraction: float = 0.5,
) -> TokenTask:
    """BABILong-style examples: a bAbI sample's facts hidden in distractor text, as bytes.

    Construction (BABILong's `babilong_utils.py`, byte-level): the distractor text is
    sentence-split (`split_sentences`), sentences shorter than `min_sentence_bytes` are
    skipped (BABILong: 10 GPT-2 tokens), and sentences are taken cyclically from a random
    start until the context reaches its byte budget, the last one truncated so that the
    sequence has exactly `seq_len + 1` bytes. The facts are inserted **in order** at sentence
    boundaries: gap indices drawn uniformly with replacement from the complete sentences
    (before sentence `g`), sorted, so several facts may share a gap. Pieces are joined by single
    spaces; then `"\\nQuestion: {question}\\nAnswer: {answer}"` follows. Samples whose facts
    take more than `max_fact_fraction` of the context budget are skipped (BABILong keeps
    samples with at most `L / 8` facts).

    `inputs = bytes[:-1]`; `targets[t] = bytes[t + 1]` at the answer's bytes, else -100.

    **Returns** a `TokenTask` (`vocab_size` 256) with `metadata`: `questions`, `answers`
    (str), `num_facts`, `fact_offsets` (`(N, F)` input position of each fact's first byte, -1
    padded), `fact_depths` (offset within the context / context bytes, NaN padded),
    `supporting_depths` (`(N, 3)`, NaN padded), `supporting_facts` (`(N, 3)`, -1 padded),
    `context_ends`, `answer_starts` (first scored position).
    """
    check_positive(
        num_examples=num_examples, seq_len=seq_len, min_sentence_bytes=min_sentence_bytes
    )
    if not 0 < max_fact_fraction <= 1:
        raise ValueError(f"max_fact_fraction must be in (0, 1], got {max_fact_fraction}")
    text = distractor_text if distractor_text is not None else load_excerpt()
    sentences = [s for s in split_sentences(text) if len(s.encode()) >= min_sentence_bytes]
    if not sentences:
        raise ValueError(f"distractor_text has no sentence of >= {min_sentence_bytes} bytes")
    sentence_bytes = [s.encode() for s in sentences]
    rng = np.random.default_rng(seed)
    story_seed = int(rng.integers(2**63))
    pool = babi_samples(task, 4 * num_examples, seed=story_seed)
    inputs = np.zeros((num_examples, seq_len), dtype=np.int32)
    targets = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int32)
    rows: list[dict] = []
    cursor = 0
    while len(rows) < num_examples:
        if cursor == len(pool):
            story_seed += 1
            pool += babi_samples(task, 4 * num_examples, seed=story_seed)
        sample = pool[cursor]
        cursor += 1
        tail = f"\nQuestion: {sample.question}\nAnswer: {sample.answer}".encode()
        facts = [f.encode() for f in sample.facts]
        budget = seq_len + 1 - len(tail)  # context bytes
        fact_total = sum(len(f) + 1 for f in facts)
        if fact_total > max_fact_fraction * budget:
            if cursor > 50 * num_examples + len(rows):
                raise ValueError(f"seq_len {seq_len} is too short for qa{task} samples")
            continue
        background: list[bytes] = []
        room = budget - fact_total + 1  # bytes for the sentences and their separators
        start = int(rng.integers(len(sentences)))
        complete = 0
        while room > 0:  # a last empty piece leaves a trailing space
            piece = sentence_bytes[(start + len(background)) % len(sentences)]
            if len(piece) + 1 <= room:
                complete += 1
            else:  # truncate the last sentence, at a character boundary
                piece = piece[: room - 1].decode("utf-8", errors="ignore").encode()
            background.append(piece)
            room -= len(piece) + 1
        gaps = np.sort(rng.integers(0, max(complete, 1), size=len(facts)))
        pieces: list[bytes] = []
        offsets: list[int] = []
        for g, sentence in enumerate(background):
            for f in np.flatnonzero(gaps == g):
                offsets.append(sum(len(p) + 1 for p in pieces))
                pieces.append(facts[f])
            pieces.append(sentence)
        context = b" ".join(pieces)
        sequence = context + tail
        n = len(sequence) - 1
        assert n <= seq_len
        answer_start = n - len(sample.answer.encode())
        inputs[len(rows), :n] = np.frombuffer(sequence[:-1], dtype=np.uint8)
        targets[len(rows), answer_start:n] = np.frombuffer(
            sequence[answer_start + 1 :], dtype=np.uint8
        )
        rows.append(
            {
                "sample": sample,
                "offsets": offsets,
                "context_end": len(context),
                "answer_start": answer_start,
            }
        )
    width = max(len(r["offsets"]) for r in rows)
    fact_offsets = np.full((num_examples, width), -1, dtype=np.int64)
    fact_depths = np.full((num_examples, width), np.nan)
    supporting = np.full((num_examples, 3), -1, dtype=np.int64)
    supporting_depths = np.full((num_examples, 3), np.nan)
    for i, r in enumerate(rows):
        starts = np.array(r["offsets"], dtype=np.int64)
        fact_offsets[i, : starts.shape[0]] = starts
        fact_depths[i, : starts.shape[0]] = starts / r["context_end"]
        support = np.array(r["sample"].supporting_facts, dtype=np.int64)
        supporting[i, : support.shape[0]] = support
        supporting_depths[i, : support.shape[0]] = starts[support] / r["context_end"]
    metadata = {
        "questions": np.array([r["sample"].question for r in rows]),
        "answers": np.array([r["sample"].answer for r in rows]),
        "num_facts": np.array([len(r["offsets"]) for r in rows], dtype=np.int64),
        "fact_offsets": fact_offsets,
        "fact_depths": fact_depths,
        "supporting_facts": supporting,
        "supporting_depths": supporting_depths,
        "context_ends": np.array([r["context_end"] for r in rows], dtype=np.int64),
        "answer_starts": np.array([r["answer_start"] for r in rows], dtype=np.int64),
    }
    return TokenTask(inputs, targets, 256, metadata)
