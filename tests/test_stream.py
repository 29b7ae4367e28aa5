"""`atlas-eqx stream` (issue 9): the BABILong-style stream, the memory-only model's answers,
resident memory flat in length, and exact resume after an interruption."""

import dataclasses
import json

import equinox as eqx
import jax
import numpy as np
import pytest

from experiments.cli import main as cli
from experiments.tasks._babilong import ACTORS, LOCATIONS, MOVE_VERBS
from experiments.training._stream import stream_run
from experiments.training._stream_data import (
    _distractor_sentences,  # noqa: I001
    generate_stream,
    StreamConfig,
    Vocabulary,
    words,
)
from experiments.training._stream_sweep import stream_compare, stream_sweep


SMALL = StreamConfig(tokens=4096, call_tokens=512, facts=24, questions=96, checkpoint_every=2)
MOVES = {tuple(words(verb)) for verb in MOVE_VERBS}


def _facts_in(tokens: list[str], previous: list[str]) -> list[tuple[int, str, str]]:
    """Every "<actor> <move verb> the <location>" sentence in the stream, found by pattern,
    as (position of its last word, actor, location)."""
    actors = {a.lower() for a in ACTORS}
    found = []
    for start in range(len(tokens)):
        if tokens[start] not in actors or previous[start] != "<s>":
            continue
        for verb in MOVES:
            n = len(verb)
            words_after = tokens[start + 1 : start + n + 3]
            if (
                tuple(words_after[:n]) == verb
                and words_after[n : n + 1] == ["the"]
                and len(words_after) == n + 2
                and words_after[n + 1] in LOCATIONS
            ):
                found.append((start + n + 2, tokens[start], words_after[n + 1]))
    return found


def test_stream_hides_the_facts_and_questions_have_the_latest_answer():
    vocab = Vocabulary(_distractor_sentences("excerpt"))
    calls = list(generate_stream(SMALL, vocab))
    assert [c.start for c in calls] == list(range(0, SMALL.tokens, SMALL.call_tokens))
    assert all(len(c.tokens) == SMALL.call_tokens for c in calls)
    tokens = [vocab.words[i] for c in calls for i in c.tokens]
    subjects = [vocab.words[i] for c in calls for i in c.subjects]
    previous = [vocab.words[i] for c in calls for i in c.previous]
    # Sentences start where the previous word is "<s>"; inside one, every token's subject is
    # its first word and its previous word the token before it.
    starts = [t for t in range(len(tokens)) if previous[t] == "<s>"]
    assert starts[0] == 0 and len(starts) > 100
    for begin, end in zip(starts, starts[1:] + [len(tokens)], strict=True):
        assert set(subjects[begin:end]) == {tokens[begin]}
        assert previous[begin + 1 : end] == tokens[begin : end - 1]
    facts = _facts_in(tokens, previous)
    assert len(facts) == SMALL.facts  # all facts hidden, in the first 4096 tokens here
    questions = [q for c in calls for q in c.questions]
    positions = [q[0] for q in questions]
    assert len(set(positions)) == len(positions) >= SMALL.questions - 12
    for at, actor, truth, depth in questions:
        before = [f for f in facts if f[0] <= at and f[1] == actor]
        assert before, (at, actor)
        assert (truth, depth) == (before[-1][2], at - before[-1][0])
        call = calls[at // SMALL.call_tokens]
        assert vocab.words[call.question_actor[at - call.start]] == actor
    asked = sum(int((c.question_actor >= 0).sum()) for c in calls)
    assert asked == len(questions)
    # Deterministic: the same config gives the same stream.
    again = list(generate_stream(SMALL, vocab))
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(calls, again, strict=True))


def test_the_memory_recalls_recent_facts_far_above_chance():
    config = dataclasses.replace(SMALL, tokens=16384, call_tokens=2048, facts=256, questions=512)
    result = stream_run(config, progress=False)
    recent = result.accuracy_by_depth((0, 100))[0]
    assert recent[2] >= 50  # questions within 100 tokens of their fact
    assert recent[3] >= 0.8, recent
    assert result.accuracy > 1 / 6 + 0.15, result.accuracy


def test_resume_after_an_interruption_gives_the_same_final_state(tmp_path):
    whole = stream_run(SMALL, progress=False)
    first = stream_run(SMALL, out_dir=tmp_path, stop_after=SMALL.tokens // 2, progress=False)
    assert not first.finished and first.position == SMALL.tokens // 2
    resumed = stream_run(SMALL, out_dir=tmp_path, progress=False)
    assert resumed.finished and resumed.tokens_timed == SMALL.tokens // 2  # only the rest ran
    for a, b in zip(
        jax.tree.leaves(eqx.filter(whole.state, eqx.is_array)),
        jax.tree.leaves(eqx.filter(resumed.state, eqx.is_array)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit
    assert resumed.questions == whole.questions  # answers before and after the stop
    # A run directory refuses a stream with another config.
    with pytest.raises(SystemExit, match="another config"):
        stream_run(dataclasses.replace(SMALL, seed=1), out_dir=tmp_path, progress=False)


def test_ctrl_c_saves_the_last_complete_call_and_resumes_exactly(tmp_path, monkeypatch):
    whole = stream_run(SMALL, progress=False)
    import experiments.training._stream as module

    calls = []
    original = module.resident_mb

    def interrupt_on_the_fifth_call() -> float:  # runs after a call is committed
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original()

    monkeypatch.setattr(module, "resident_mb", interrupt_on_the_fifth_call)
    with pytest.raises(KeyboardInterrupt):
        stream_run(SMALL, out_dir=tmp_path, progress=False)
    monkeypatch.setattr(module, "resident_mb", original)
    resumed = stream_run(SMALL, out_dir=tmp_path, progress=False)
    assert resumed.tokens_timed == SMALL.tokens - 5 * SMALL.call_tokens  # calls 6.. ran
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.questions == whole.questions


@pytest.mark.slow
def test_resident_memory_is_flat_in_length():
    config = dataclasses.replace(SMALL, tokens=2**20, call_tokens=4096, questions=256)
    result = stream_run(config, progress=False)
    rss = np.array([mb for _, mb in result.rss_mb])
    assert len(rss) == 256
    # The allocator grows in steps of tens of MiB at times, but not with the length: over the
    # second half (512K tokens) RSS stays within 64 MiB of the first half's maximum. Keeping
    # the reads alone (32 float32 per token) would add 64 MiB over that half, the token ids 2.
    assert rss[128:].max() - rss[:128].max() < 64, rss.round().tolist()


def test_sweep_writes_the_table_and_plot(tmp_path):
    base = dataclasses.replace(SMALL, facts=8, questions=64)
    rows = stream_sweep((512, 2048), base, out_dir=tmp_path, min_questions=64, progress=False)
    assert [r["tokens"] for r in rows] == [512, 2048]
    assert rows[0]["streams"] >= 2  # short streams are repeated over seeds
    text = (tmp_path / "results.md").read_text()
    assert "| 512 |" in text and "| 2,048 |" in text
    assert (tmp_path / "stream.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"][1]["questions"] == rows[1]["questions"]
    variants = {"gd": {}, "momentum": dict(optimizer="momentum", lr=0.05)}
    summaries = stream_compare(1024, base, variants=variants, out_dir=tmp_path, progress=False)
    assert [s["name"] for s in summaries] == ["gd", "momentum"]
    assert summaries[0]["questions"] == summaries[1]["questions"]  # the same questions
    table = (tmp_path / "variants.md").read_text()
    assert "| gd | 0.1 |" in table and "| momentum | 0.05 |" in table


def test_stream_command_and_bad_config(tmp_path, capsys):
    flags = ["stream", "--tokens", "1024", "--call-tokens", "256", "--facts", "8"]
    flags += ["--questions", "32", "--no-progress", "--out-dir", str(tmp_path)]
    assert cli(flags) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 1024 and summary["finished"]
    with pytest.raises(SystemExit, match="multiple of `chunk_size`"):
        cli(["stream", "--call-tokens", "100", "--chunk-size", "8"])
    with pytest.raises(SystemExit, match="`optimizer` must be one of"):
        cli(["stream", "--optimizer", "adam"])
