r"""`atlas-eqx stream`: a memory-only Atlas-style memory over a BABILong-style stream of 1M
(or 10M) tokens, in constant memory, with accuracy against fact depth and exact resume.

**The stream.** Word tokens (lower-cased runs of letters) of distractor text, sentence by
sentence, cycled from a random start (the shipped public-domain excerpt, or the fetched
corpus' train split), as BABILong builds its haystacks (`experiments.tasks._babilong`). `facts`
bAbI qa1 facts (`babi_samples(1, ...)`: "Mary went to the kitchen.", valid moves of four
actors) are hidden, in order, at sentence boundaries after token positions drawn uniformly
over the stream and sorted (BABILong's construction). The stream is produced lazily, one
call's worth of tokens at a time; nothing of length `tokens` is ever held.

**The model.** No outer parameters are trained: keys and values are fixed random
embeddings of words. Every token $t$ writes one association: its key binds the subject of
its sentence (the first word) to the previous word, $k_t = (E_k[s_t]\odot E_p[w_{t-1}]) /
\|\cdot\|$, and its value is $v_t = E_v[w_t]$ (unit vectors, `dim` each). The memory is the
Omega rule of ATLAS on the polynomial feature map $\phi(k) = [k, k\otimes k]$ (exact degree-2
monomials, no constant feature: a constant would couple every key to every other), window
$c = 4$, the $\ell_2$ objective, retention $\alpha$ = `decay`, step $\eta_t = $ `lr`
$/\|\phi(k_t)\|^2$, and chunks of `chunk_size` tokens whose gradients are taken at the
chunk-start weights (`method="chunked"`).

The default is a **linear** memory with plain **GD** (`memory="linear"`, `optimizer="gd"`,
`chunk_size=8`): of the variants measured on this stream (`experiments/results/stream/`) it
recalls best and is fastest on a CPU. ATLAS's deep memory and Muon are flags:
`memory="mlp"` (2-layer MLP, hidden `4 * dim`) and `optimizer="muon_per_chunk"` (Muon with
Newton-Schulz once per chunk, the documented approximation, `omega_scan(...,
muon_per_chunk=True)`), `"muon"` (exact per-token Muon, ~25x slower on a CPU) or
`"momentum"`. Large chunks diverge here: the frozen-anchor step sums the gradients of every
token in the chunk (and of each token `c` times), so a key repeated in a chunk takes an
`lr * c * repeats` step; `chunk_size=8` keeps it below the stability bound.

**How it answers.** A question "Where is Mary?" at token position $t$ is a read with the
question's key, the actor bound to the word before a location in every fact ("... to
*the* kitchen"): the query of that token is $q_t = (E_k[\text{mary}]\odot E_p[\text{the}]) /
\|\cdot\|$ instead of its own key (the token's write is unchanged), and $y_t = \mathcal
M(\phi(q_t); W_t)$ (read after write). The answer is the location $l$ (of the six) whose value
embedding $E_v[l]$ has the largest cosine with $y_t$; chance is 1/6. This query encoding is
hand-made (a trained model would learn its projections); it is the same for every length.
Question positions are drawn uniformly over the stream (repeats merged); each asks about a random actor who
has moved by then; the truth is that actor's latest move. **Depth** = tokens between the
last word of that supporting fact and the question.

**Constant memory.** The stream is processed in calls of `call_tokens` tokens (one compiled
program), each `omega_scan(..., state=state)` with the carried `OmegaState`; resident memory
(`VmRSS` of `/proc/self/status`, and the peak `ru_maxrss`) is sampled after every call.

**Resume.** Every `checkpoint_every` calls (and on `stop_after`), the carried state, the
position and the answers so far are saved (`equinox.tree_serialise_leaves` plus a JSON
header, written atomically); a rerun with the same `out_dir` continues from there and
reaches the same final state, bit for bit, as an uninterrupted run (the stream is
regenerated deterministically up to the saved position).
"""

import dataclasses
import json
import pathlib
import re
import resource
import time
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

import atlas_eqx as ae
import feature_maps as fm
import optimizers as iopt

from .._plot import pyplot_or_none, save_figure
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


class _Memory(eqx.Module):
    """The fixed parts of the memory-only model: embeddings, feature map, initial memory."""

    key_table: Float[Array, "V d"]
    previous_table: Float[Array, "V d"]
    value_table: Float[Array, "V d"]
    feature_map: fm.AbstractFeatureMap
    memory: ae.AbstractMemory
    locations: Int[Array, " 6"]
    cue: Int[Array, ""]

    def keys(self, subjects: Int[Array, " T"], previous: Int[Array, " T"]) -> Float[Array, "T d"]:
        r"""$k = (E_k[s] \odot E_p[p]) / \|\cdot\|$: the subject bound to the previous word."""
        return _unit(self.key_table[subjects] * self.previous_table[previous])


def _unit(x: Array) -> Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def build_model(config: StreamConfig, vocab: Vocabulary) -> _Memory:
    """Embeddings $E_k$, $E_v$ (random unit vectors), $\\phi$ and $\\mathcal M_0$ from the seed."""
    keys = jax.random.split(jax.random.key(config.seed), 4)
    d = config.dim
    phi = fm.Polynomial(2, learnable=False, include_constant=False)
    d_in = phi.out_dim(d)
    if config.memory == "linear":
        memory: ae.AbstractMemory = ae.LinearMemory(d_in, d, key=keys[2], init_std=0.0)
    else:
        memory = ae.MLPMemory(d_in, d, key=keys[2], hidden=4 * d)
    return _Memory(
        key_table=_unit(jax.random.normal(keys[0], (len(vocab), d), jnp.float32)),
        value_table=_unit(jax.random.normal(keys[1], (len(vocab), d), jnp.float32)),
        previous_table=jax.random.normal(keys[3], (len(vocab), d), jnp.float32),
        cue=jnp.asarray(vocab.index[QUESTION_CUE], jnp.int32),
        feature_map=phi,
        memory=jax.tree.map(
            lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, memory
        ),
        locations=jnp.asarray(vocab.ids(list(LOCATIONS)), jnp.int32),
    )


def _optimizer(config: StreamConfig) -> iopt.InnerOptimizer:
    if config.optimizer == "gd":
        return iopt.gd()
    if config.optimizer == "momentum":
        return iopt.momentum()
    return iopt.muon(ns_steps=5)


def initial_state(config: StreamConfig, model: _Memory) -> ae.OmegaState:
    """$W_0$, $S_0 = 0$ and an empty window."""
    return ae.init_omega_state(model.memory, _optimizer(config), config.window)


def make_step(config: StreamConfig):
    """The jitted call: `(model, state, tokens, subjects, question_actor) -> (answers, state)`
    where `answers` is the index (0-5) of the location nearest to each token's read."""
    optimizer = _optimizer(config)

    @eqx.filter_jit
    def step(model: _Memory, state: ae.OmegaState, tokens, subjects, previous, question_actor):
        k = model.keys(subjects, previous)
        v = model.value_table[tokens]
        asked = model.keys(question_actor, jnp.full_like(question_actor, model.cue))
        q = jnp.where((question_actor >= 0)[:, None], asked, k)
        features = jax.vmap(model.feature_map)(k)
        lr = config.lr / jnp.sum(features * features, axis=-1)
        n = tokens.shape[0]
        decay = jnp.full(n, config.decay, jnp.float32)
        momentum = None if config.optimizer == "gd" else jnp.full(n, config.momentum, jnp.float32)
        y, state = ae.omega_scan(
            state.memory,
            q,
            k,
            v,
            lr,
            decay,
            momentum,
            feature_map=model.feature_map,
            optimizer=optimizer,
            window=config.window,
            chunk_size=config.chunk_size,
            method="chunked",
            state=state,
            muon_per_chunk=config.optimizer == "muon_per_chunk",
            check_values=False,
        )
        scores = _unit(y) @ model.value_table[model.locations].T
        return jnp.argmax(scores, axis=-1), state

    return step


def resident_mb() -> float:
    """Resident set size now (`VmRSS`), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")  # pragma: no cover


def peak_mb() -> float:
    """Peak resident set size of the process so far (`ru_maxrss`), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclasses.dataclass
class StreamResult:
    config: StreamConfig
    position: int
    questions: list[tuple[int, str, str, int, bool]]
    seconds: float
    tokens_timed: int
    rss_mb: list[tuple[int, float]]
    peak_mb: float
    state: Any
    finished: bool

    @property
    def accuracy(self) -> float:
        if not self.questions:
            return float("nan")
        return float(np.mean([q[4] for q in self.questions]))

    @property
    def tokens_per_second(self) -> float:
        if self.tokens_timed == 0 or self.seconds <= 0:
            return float("nan")
        return self.tokens_timed / self.seconds

    def accuracy_by_depth(self, edges: tuple[int, ...]) -> list[tuple[int, int, int, float]]:
        """`(low, high, questions, accuracy)` for depth bins `[edges[i], edges[i+1])`."""
        rows = []
        depths = np.array([q[3] for q in self.questions])
        correct = np.array([q[4] for q in self.questions], bool)
        for low, high in zip(edges[:-1], edges[1:], strict=True):
            inside = (depths >= low) & (depths < high)
            n = int(inside.sum())
            rows.append((low, high, n, float(correct[inside].mean()) if n else float("nan")))
        return rows

    def summary(self) -> dict[str, Any]:
        rss = [r for _, r in self.rss_mb]
        return dict(
            tokens=self.position,
            questions=len(self.questions),
            accuracy=self.accuracy,
            tokens_per_second=self.tokens_per_second,
            rss_first_mb=rss[0] if rss else float("nan"),
            rss_max_mb=max(rss) if rss else float("nan"),
            rss_last_mb=rss[-1] if rss else float("nan"),
            peak_mb=self.peak_mb,
            finished=self.finished,
        )


def _save(path: pathlib.Path, state: Any, header: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "wb") as file:
        file.write(json.dumps(header).encode() + b"\n")
        eqx.tree_serialise_leaves(file, state)
    temporary.replace(path)


def _load(path: pathlib.Path, state_like: Any) -> tuple[Any, dict[str, Any]]:
    with open(path, "rb") as file:
        header = json.loads(file.readline())
        state = eqx.tree_deserialise_leaves(file, state_like)
    return state, header


def stream_run(
    config: StreamConfig,
    *,
    out_dir: str | pathlib.Path | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
) -> StreamResult:
    """Stream `config.tokens` tokens through the memory and answer the questions on the way.

    - `out_dir`: where `state.eqx` (the resumable checkpoint: carried `OmegaState`, position,
      answers so far) and `config.json` go; with `resume=True` an existing checkpoint of the
      same config is continued.
    - `stop_after`: stop (and checkpoint) after the call that reaches this many tokens, as if
      interrupted. A real interruption (Ctrl-C, `KeyboardInterrupt`) saves the last complete
      call before it propagates.

    Returns the answers `(position, actor, truth, depth, correct)`, end-to-end tokens/s
    (stream generation, transfer and scan; compilation is done before the clock starts),
    resident memory after every call and the final state.
    """
    sentences = _distractor_sentences(config.corpus)
    vocab = Vocabulary(sentences)
    model = build_model(config, vocab)
    state = initial_state(config, model)
    step = make_step(config)
    questions: list[tuple[int, str, str, int, bool]] = []
    rss: list[tuple[int, float]] = []
    start = 0
    path = pathlib.Path(out_dir) / "state.eqx" if out_dir is not None else None
    if path is not None:
        saved = path.parent / "config.json"
        if saved.exists() and json.loads(saved.read_text()) != dataclasses.asdict(config):
            raise SystemExit(
                f"{path.parent} holds a stream with another config; use a new --out-dir"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        if resume and path.exists():
            state, header = _load(path, state)
            start = int(header["position"])
            questions = [tuple(q) for q in header["questions"]]  # type: ignore[misc]
            rss = [tuple(r) for r in header["rss_mb"]]  # type: ignore[misc]
    location_names = list(LOCATIONS)
    timed = 0
    position = start
    bar = tqdm(
        total=config.tokens,
        initial=min(start, config.tokens),
        desc=f"stream {config.optimizer}",
        unit="tok",
        unit_scale=True,
        disable=not progress,
        dynamic_ncols=True,
    )
    end = config.tokens if stop_after is None else min(config.tokens, stop_after)
    calls_done = 0
    # Compile before timing: one call on zeros, whose result is discarded.
    zeros = jnp.zeros(config.call_tokens, jnp.int32)
    jax.block_until_ready(step(model, state, zeros, zeros, zeros, zeros - 1))
    committed = (state, start, len(questions))
    clock = time.perf_counter()
    try:
        for call in generate_stream(config, vocab):
            if call.start < start:
                continue
            if position >= end:
                break
            answers, new_state = step(
                model,
                state,
                jnp.asarray(call.tokens),
                jnp.asarray(call.subjects),
                jnp.asarray(call.previous),
                jnp.asarray(call.question_actor),
            )
            answers = np.asarray(answers)
            calls_done += 1
            questions.extend(
                (at, actor, truth, depth, location_names[int(answers[at - call.start])] == truth)
                for at, actor, truth, depth in call.questions
            )
            # One assignment commits the call: an interrupt before it loses only this call.
            committed = (new_state, call.start + len(call.tokens), len(questions))
            state, position = committed[0], committed[1]
            timed += min(position, config.tokens) - call.start
            rss.append((min(position, config.tokens), resident_mb()))
            bar.update(min(position, config.tokens) - bar.n)
            bar.set_postfix(
                acc=f"{np.mean([q[4] for q in questions]) if questions else 0:.2f}",
                rss=f"{rss[-1][1]:.0f}M",
            )
            checkpoint = config.checkpoint_every and calls_done % config.checkpoint_every == 0
            if path is not None and (checkpoint or position >= end):
                _save(path, state, dict(position=position, questions=questions, rss_mb=rss))
    except KeyboardInterrupt:
        if path is not None and committed[1] > start:  # save the last complete call, then stop
            state, position, count = committed
            kept_rss = [r for r in rss if r[0] <= position]
            _save(
                path, state, dict(position=position, questions=questions[:count], rss_mb=kept_rss)
            )
        raise
    finally:
        seconds = time.perf_counter() - clock
        bar.close()
    return StreamResult(
        config=config,
        position=min(position, config.tokens),
        questions=questions,
        seconds=seconds,
        tokens_timed=timed,
        rss_mb=rss,
        peak_mb=peak_mb(),
        state=state,
        finished=position >= config.tokens,
    )


DEPTH_EDGES = (0, 10**2, 10**3, 10**4, 10**5, 10**6, 10**7)


def _sweep_config(base: StreamConfig, length: int, seed: int) -> StreamConfig:
    call = min(base.call_tokens, -(-length // base.chunk_size) * base.chunk_size)
    return dataclasses.replace(base, tokens=length, call_tokens=call, seed=seed)


def stream_sweep(
    lengths: tuple[int, ...],
    base: StreamConfig = StreamConfig(),
    *,
    out_dir: str | pathlib.Path = "experiments/results/stream",
    min_questions: int = 1024,
    repeat_budget: int = 200_000,
    progress: bool = True,
    command: str = "",
) -> list[dict[str, Any]]:
    """`stream_run` at each length (seeds `base.seed`, `base.seed + 1`, ... until
    `min_questions` questions are answered or the streams of that length reach
    `repeat_budget` tokens, so that short streams get several and long ones one), then
    `results.md` (accuracy, accuracy by depth, tokens/s, resident memory) and `stream.png`."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    pooled: list[tuple[int, str, str, int, bool]] = []
    for length in lengths:
        results = []
        seed = base.seed
        while not results or (
            sum(len(r.questions) for r in results) < min_questions
            and len(results) * length < repeat_budget
        ):
            results.append(stream_run(_sweep_config(base, length, seed), progress=progress))
            seed += 1
        answered = [q for r in results for q in r.questions]
        pooled += answered
        rss_first = [r.rss_mb[0][1] for r in results]
        rss_max = [max(x for _, x in r.rss_mb) for r in results]
        rows.append(
            dict(
                tokens=length,
                streams=len(results),
                questions=len(answered),
                accuracy=float(np.mean([q[4] for q in answered])),
                median_depth=float(np.median([q[3] for q in answered])),
                tokens_per_second=float(
                    sum(r.tokens_timed for r in results) / sum(r.seconds for r in results)
                ),
                rss_first_mb=rss_first[-1],
                rss_max_mb=rss_max[-1],
                rss_growth_mb=rss_max[-1] - rss_first[-1],
                peak_mb=results[-1].peak_mb,
            )
        )
    by_depth = StreamResult(base, 0, pooled, 0.0, 0, [], 0.0, None, True).accuracy_by_depth(
        DEPTH_EDGES
    )
    (out / "results.json").write_text(
        json.dumps(dict(config=dataclasses.asdict(base), rows=rows, by_depth=by_depth), indent=2)
    )
    (out / "results.md").write_text(_results_markdown(base, rows, by_depth, command))
    _plot(rows, by_depth, out / "stream.png")
    return rows


def _results_markdown(base, rows, by_depth, command: str) -> str:
    lines = [
        "# Memory-only streaming over a BABILong-style stream",
        "",
        f"Memory: {base.memory}, inner optimizer {base.optimizer}, polynomial phi (degree 2, "
        f"no constant), dim {base.dim}, Omega window c = {base.window}, chunk b = "
        f"{base.chunk_size}, lr {base.lr}, retention {base.decay}; {base.facts} qa1 facts per "
        f"stream hidden in the {base.corpus} distractor text; questions at uniform positions; "
        "chance 1/6. See `experiments/training/_stream.py` for the keys, values and how it answers.",
        "",
        "```",
        command,
        "```",
        "",
        "| tokens | streams | questions | accuracy | median depth | tokens/s | RSS after 1st "
        "call MiB | max RSS MiB | growth MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']:,} | {r['streams']} | {r['questions']} | {r['accuracy']:.3f} | "
            f"{r['median_depth']:,.0f} | {r['tokens_per_second']:,.0f} | "
            f"{r['rss_first_mb']:.0f} | {r['rss_max_mb']:.0f} | {r['rss_growth_mb']:+.0f} |"
        )
    lines += [
        "",
        "Accuracy by depth (tokens between the supporting fact and the question), pooled over "
        "every stream above:",
        "",
        "| depth | questions | accuracy |",
        "|---|---|---|",
    ]
    for low, high, n, accuracy in by_depth:
        if n:
            lines.append(f"| [{low:,}, {high:,}) | {n} | {accuracy:.3f} |")
    lines.append("")
    return "\n".join(lines)


def _plot(rows, by_depth, path: pathlib.Path) -> None:
    plt = pyplot_or_none()
    if plt is None:
        return

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    tokens = [r["tokens"] for r in rows]
    axes[0].plot(tokens, [r["accuracy"] for r in rows], "o-")
    axes[0].axhline(1 / 6, color="grey", ls="--", label="chance")
    axes[0].set(xscale="log", xlabel="stream length (tokens)", ylabel="accuracy", ylim=(0, 1))
    axes[0].legend()
    axes[1].plot(tokens, [r["tokens_per_second"] for r in rows], "o-")
    axes[1].set(xscale="log", xlabel="stream length (tokens)", ylabel="tokens / s")
    axes[1].set_ylim(0, max(r["tokens_per_second"] for r in rows) * 1.2)
    twin = axes[1].twinx()
    twin.plot(tokens, [r["rss_max_mb"] for r in rows], "s--", color="C1")
    twin.set_ylabel("max RSS (MiB)", color="C1")
    twin.set_ylim(0, max(r["rss_max_mb"] for r in rows) * 1.2)
    centres = [np.sqrt(max(lo, 1) * hi) for lo, hi, n, _ in by_depth if n]
    axes[2].plot(centres, [a for *_, n, a in by_depth if n], "o-")
    axes[2].axhline(1 / 6, color="grey", ls="--")
    axes[2].set(xscale="log", xlabel="fact depth (tokens)", ylabel="accuracy", ylim=(0, 1))
    save_figure(fig, path)


VARIANTS: dict[str, dict[str, Any]] = {
    "linear + GD (default)": {},
    "linear + momentum": dict(optimizer="momentum", lr=0.05),
    "linear + Muon per chunk": dict(optimizer="muon_per_chunk", lr=0.05),
    "MLP + GD": dict(memory="mlp"),
    "MLP + Muon per chunk (ATLAS's memory)": dict(
        memory="mlp", optimizer="muon_per_chunk", lr=0.02
    ),
}
"""Memory and inner-optimizer variants compared by `stream_compare` (step sizes picked by a
few trial runs of 32K tokens each; larger ones diverged or fell to chance)."""


def stream_compare(
    length: int,
    base: StreamConfig = StreamConfig(),
    *,
    variants: dict[str, dict[str, Any]] | None = None,
    out_dir: str | pathlib.Path = "experiments/results/stream",
    progress: bool = True,
    command: str = "",
) -> list[dict[str, Any]]:
    """One stream of `length` tokens (the same stream and questions) per variant of
    `VARIANTS`; writes `variants.md` (accuracy, accuracy by depth, tokens/s, RSS)."""
    variants = VARIANTS if variants is None else variants
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in variants.items():
        config = dataclasses.replace(_sweep_config(base, length, base.seed), **overrides)
        result = stream_run(config, progress=progress)
        rows.append(dict(name=name, config=config, result=result))
    edges = (0, 10**2, 10**3, 10**4, 10**5)
    lines = [
        f"# Memory variants on one {length:,}-token stream",
        "",
        f"The same stream, facts ({base.facts}) and questions for every variant; polynomial "
        f"phi (degree 2), dim {base.dim}, c = {base.window}, b = {base.chunk_size}; chance "
        "1/6. tokens/s is end-to-end on a shared 2-core CPU.",
        "",
        "```",
        command,
        "```",
        "",
        "| variant | lr | questions | accuracy | "
        + " | ".join(
            f"depth [{lo:,}, {hi:,})" for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        )
        + " | tokens/s | max RSS MiB |",
        "|---|---|---|---|" + "---|" * (len(edges) - 1) + "---|---|",
    ]
    for row in rows:
        result, config = row["result"], row["config"]
        bins = result.accuracy_by_depth(edges)
        cells = " | ".join(f"{a:.2f} (n={n})" if n else "-" for *_, n, a in bins)
        lines.append(
            f"| {row['name']} | {config.lr} | {len(result.questions)} | {result.accuracy:.3f} "
            f"| {cells} | {result.tokens_per_second:,.0f} | "
            f"{max(mb for _, mb in result.rss_mb):.0f} |"
        )
    lines.append("")
    (out / "variants.md").write_text("\n".join(lines))
    return [dict(name=r["name"], **r["result"].summary()) for r in rows]
