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
import resource
import time
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

from ..tasks._babilong import LOCATIONS
from ._stream_data import (
    _distractor_sentences,
    generate_stream,
    QUESTION_CUE,
    StreamConfig,
    Vocabulary,
)


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
