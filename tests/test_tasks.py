"""Properties of the task generators (MQAR, MAD, S-NIAH, bAbI / BABILong, capacity probes).

Every check recomputes what a generator claims from its *outputs* (label positions from the
inputs, answers by replaying the story text, depths by re-splitting the context), so a wrong
generator fails here. numpy only.
"""

import itertools
import re
import uuid

import numpy as np
import pytest
from hypothesis import given, strategies as st

import experiments as ex
from experiments.tasks import _babilong, _mad, _mqar, _niah
from experiments.tasks._token_task import split_sentences


seeds = st.integers(0, 2**31 - 1)


def _same(a: ex.TokenTask, b: ex.TokenTask) -> bool:
    return (
        np.array_equal(a.inputs, b.inputs)
        and np.array_equal(a.targets, b.targets)
        and a.metadata.keys() == b.metadata.keys()
        and all(
            np.array_equal(a.metadata[k], b.metadata[k], equal_nan=a.metadata[k].dtype.kind == "f")
            for k in a.metadata
        )
    )


# ---------------------------------------------------------------------------------------------
# accuracy conventions


def _confusion_macro(predictions, targets, num_classes):
    """torchmetrics-style macro accuracy from a confusion matrix (independent of the code)."""
    keep = targets != -100
    matrix = np.zeros((num_classes, num_classes))
    np.add.at(matrix, (targets[keep], predictions[keep]), 1)
    tp = np.diag(matrix)
    fn = matrix.sum(1) - tp
    fp = matrix.sum(0) - tp
    present = (tp + fp + fn) > 0
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    return recall[present].mean()


def test_micro_macro_example_by_hand():
    targets = np.array([[0, 0, 0, 1, -100], [-100, -100, 2, -100, -100]])
    predictions = np.array([[0, 0, 0, 0, 5], [1, 1, 3, 1, 1]])
    assert ex.masked_accuracy(predictions, targets, "micro") == pytest.approx(3 / 5)
    # class 0: 3/3, class 1: 0/1, class 2: 0/1, class 3 (only predicted): 0 -> 1/4
    assert ex.masked_accuracy(predictions, targets, "macro") == pytest.approx(1 / 4)
    assert ex.masked_accuracy(predictions, targets, "example") == pytest.approx((3 / 4 + 0) / 2)
    assert ex.exact_match(predictions, targets) == 0.0
    assert ex.exact_match(targets.clip(0), targets) == 1.0


@given(seed=seeds, classes=st.sampled_from([2, 5]))
def test_macro_accuracy_matches_a_confusion_matrix(seed, classes):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, size=(6, 9))
    targets[rng.random((6, 9)) < 0.4] = -100
    targets[0, 0] = 0
    predictions = rng.integers(0, classes, size=(6, 9))
    got = ex.masked_accuracy(predictions, targets, "macro", num_classes=classes)
    assert got == pytest.approx(_confusion_macro(predictions, targets, classes))
    keep = targets != -100
    micro = ex.masked_accuracy(predictions, targets, "micro")
    assert micro == pytest.approx((predictions[keep] == targets[keep]).mean())


def test_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        ex.masked_accuracy(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="no scored position"):
        ex.masked_accuracy(np.zeros((1, 3)), np.full((1, 3), -100))
    with pytest.raises(ValueError, match="average"):
        ex.masked_accuracy(np.zeros((1, 3)), np.zeros((1, 3)), "weighted")  # pyright: ignore


# ---------------------------------------------------------------------------------------------
# MQAR (spec 2.1)


@given(
    seed=seeds,
    shape=st.sampled_from([(64, 4, 1), (64, 8, 1), (128, 8, 2), (96, 16, 1)]),
    random_non_queries=st.booleans(),
)
def test_mqar_labels_are_the_values_of_the_queried_keys(seed, shape, random_non_queries):
    seq_len, pairs, passes = shape
    vocab = 256
    task = ex.multiquery_ar(
        5,
        seq_len,
        vocab,
        pairs,
        seed=seed,
        num_passes=passes,
        random_non_queries=random_non_queries,
    )
    assert task.inputs.shape == task.targets.shape == (5, seq_len)
    assert task.inputs.dtype == task.targets.dtype == np.int32
    assert ((task.inputs >= 0) & (task.inputs < vocab)).all()
    context = 2 * pairs * passes
    for row in range(5):
        x, y = task.inputs[row], task.targets[row]
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        assert ((keys >= 1) & (keys < vocab // 2)).all() and len(set(keys)) == pairs
        assert ((values >= vocab // 2) & (values < vocab)).all() and len(set(values)) == pairs
        assert np.array_equal(x[:context], np.tile(x[: 2 * pairs], passes))
        np.testing.assert_array_equal(keys, task.metadata["keys"][row])
        np.testing.assert_array_equal(values, task.metadata["values"][row])
        scored = np.flatnonzero(y != -100)
        assert scored.shape == (pairs,) and (scored >= context).all()
        assert ((scored - context) % 2 == 0).all()
        np.testing.assert_array_equal(np.sort(task.metadata["query_positions"][row]), scored)
        lookup = dict(zip(keys.tolist(), values.tolist(), strict=True))
        assert sorted(x[scored].tolist()) == sorted(keys.tolist())  # every key queried once
        assert [lookup[k] for k in x[scored]] == y[scored].tolist()
        fillers = np.setdiff1d(np.arange(context, seq_len), scored)
        if not random_non_queries:
            assert (x[fillers] == 0).all()


def test_mqar_is_deterministic_in_the_seed():
    a = ex.multiquery_ar(8, 64, 128, 4, seed=3)
    assert _same(a, ex.multiquery_ar(8, 64, 128, 4, seed=3))
    assert not np.array_equal(a.inputs, ex.multiquery_ar(8, 64, 128, 4, seed=4).inputs)


def test_mqar_gap_sampler_has_the_law_of_successive_weighted_draws():
    """Gumbel top-2 sets = sets of numpy.random.choice(p=..., replace=False) in law (exact)."""
    weights = 0.01 * np.arange(1, 5, dtype=np.float64) ** (0.01 - 1)
    p = weights / weights.sum()
    rows = 40_000
    draws = _mqar._weighted_sample_without_replacement(np.random.default_rng(0), p, rows, 2)
    for i, j in itertools.combinations(range(4), 2):
        exact = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
        seen = np.mean([(a, b) == (i, j) for a, b in np.sort(draws, axis=1)])
        assert abs(seen - exact) < 4 * np.sqrt(exact * (1 - exact) / rows) + 1e-9


def test_mqar_queries_prefer_short_gaps():
    """p(i) ~ i^(a-1) with a = 0.01 puts far more queries right after the context than uniform."""
    task = ex.multiquery_ar(200, 256, 1024, 4, seed=0, random_non_queries=False)
    gaps = (task.metadata["query_positions"] - 8) // 2
    assert np.mean(gaps < 10) > 0.3  # uniform over 124 slots would give about 0.08


def test_mqar_rejects_impossible_configs():
    with pytest.raises(ValueError, match="even"):
        ex.multiquery_ar(1, 63, 128, 4, seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        ex.multiquery_ar(1, 64, 64, 4, seed=0)
    with pytest.raises(ValueError, match="num_passes"):
        ex.multiquery_ar(1, 64, 128, 11, seed=0, num_passes=2)
    ex.multiquery_ar(1, 64, 128, 16, seed=0)  # 2 * 16 * (1 + 1) = 64 just fits


# ---------------------------------------------------------------------------------------------
# MAD (spec 2.2)


def _replay_recall_targets(x, vocab_size, noise_vocab_size, multi_query):
    """Targets of an in-context recall test instance recomputed from its inputs only."""
    special = vocab_size - noise_vocab_size - (0 if multi_query else 1)
    y = np.full(x.shape[0], -100)
    seen: dict[int, int] = {}
    body = x if multi_query else x[:-2]
    for slot in range(0, body.shape[0] - 1, 2):
        key, value = int(body[slot]), int(body[slot + 1])
        if key >= special:  # noise pair
            assert special <= value < special + noise_vocab_size
            continue
        assert key < special // 2 <= value < special
        assert seen.setdefault(key, value) == value  # one value per key
        if multi_query and key in body[:slot:2]:  # presented in an earlier slot
            y[slot] = value
    probe = int(x[-1])
    y[-1] = seen[probe]  # the final probe's value (absent from the inputs) is recoverable
    return y


@given(
    seed=seeds,
    config=st.sampled_from([(16, 0, 0.0), (32, 16, 0.2), (24, 8, 0.5)]),
    seq_len=st.sampled_from([32, 64]),
    multi_query=st.booleans(),
)
def test_in_context_recall_targets_follow_from_the_inputs(seed, config, seq_len, multi_query):
    vocab, noise_vocab, frac_noise = config
    test, train = (
        ex.in_context_recall(
            6,
            seq_len,
            vocab,
            seed=seed,
            multi_query=multi_query,
            noise_vocab_size=noise_vocab,
            frac_noise=frac_noise,
            is_training=is_training,
        )
        for is_training in (False, True)
    )
    length = seq_len - 1 if multi_query else seq_len
    assert test.inputs.shape == (6, length)
    np.testing.assert_array_equal(train.inputs, test.inputs)  # same rng stream
    np.testing.assert_array_equal(train.targets[:, :-1], train.inputs[:, 1:])
    assert ((test.inputs >= 0) & (test.inputs < vocab)).all()
    for row in range(6):
        x = test.inputs[row]
        if not multi_query:
            assert x[-2] == vocab - 1  # copy prefix before the probe key
        np.testing.assert_array_equal(
            test.targets[row], _replay_recall_targets(x, vocab, noise_vocab, multi_query)
        )
        assert test.targets[row, -1] == train.targets[row, -1] == test.metadata["probe_values"][row]
    if frac_noise == 0:
        assert (test.inputs < vocab - noise_vocab).all()


def test_noisy_recall_has_the_requested_noise_fraction():
    task = ex.noisy_in_context_recall(200, 128, 32, seed=0, frac_noise=0.4)
    special = 32 - 16
    noise_pairs = (task.inputs[:, 0:-1:2] >= special).mean()
    assert abs(noise_pairs - 0.4) < 0.03


def _runs(tokens, boundary):
    """Split a token list into maximal runs of keys (< boundary) and values (>= boundary)."""
    return [list(g) for _, g in itertools.groupby(tokens, key=lambda t: t >= boundary)]


@given(seed=seeds, is_training=st.booleans(), seq_len=st.sampled_from([32, 64]))
def test_fuzzy_recall_motifs_and_targets(seed, is_training, seq_len):
    vocab = 16
    task = ex.fuzzy_in_context_recall(5, seq_len, vocab, seed=seed, is_training=is_training)
    pad = special = vocab - 1  # multi-query: keys [0, 7), values [7, 15), pad 15
    assert task.inputs.shape == (5, seq_len)
    for row in range(5):
        # the unshifted sequence: inputs plus the last target (the probe value's last token)
        x = np.append(task.inputs[row], task.targets[row, -1])
        n_pad = int(task.metadata["pad_lengths"][row])
        assert (x[:n_pad] == pad).all() and (x[n_pad:] < special).all()
        runs = _runs(x[n_pad:].tolist(), special // 2)
        assert x[n_pad] < special // 2 and len(runs) % 2 == 0  # key, value, ..., key, value
        pairs = [(tuple(k), tuple(v)) for k, v in zip(runs[0::2], runs[1::2], strict=True)]
        for key, value in pairs:
            assert 1 <= len(key) <= 3 and 1 <= len(value) <= 3
            assert len(set(key)) == len(key) and len(set(value)) == len(value)
            if not is_training:
                assert len(key) == 3  # test keys always have the full motif size
        mapping: dict[tuple, tuple] = {}
        for key, value in pairs:
            assert mapping.setdefault(key, value) == value  # one value per key
        probe_key, probe_value = pairs[-1]
        assert (probe_key, probe_value) in pairs[:-1]  # the probe was presented before
        assert len(probe_key) == task.metadata["probe_key_lengths"][row]
        assert len(probe_value) == task.metadata["probe_value_lengths"][row]
        if is_training:
            np.testing.assert_array_equal(task.targets[row], x[1:])
            continue
        expected = np.full(x.shape[0], -100)
        position = n_pad
        for index, (key, value) in enumerate(pairs):
            position += len(key)
            if key in [k for k, _ in pairs[:index]]:
                expected[position : position + len(value)] = value
            position += len(value)
        np.testing.assert_array_equal(task.targets[row], expected[1:])


@given(seed=seeds, shape=st.sampled_from([(64, 8, 16), (64, 16, 16), (40, 4, 10)]))
def test_selective_copying_targets_are_the_content_in_order(seed, shape):
    seq_len, n, vocab = shape
    task = ex.selective_copying(6, seq_len, vocab, n, seed=seed)
    blank, copy = vocab - 2, vocab - 1
    for row in range(6):
        x, y = task.inputs[row], task.targets[row]
        assert x[seq_len - n - 1] == copy and (x[seq_len - n :] == blank).all()
        content = x[: seq_len - n - 1][x[: seq_len - n - 1] != blank]
        assert content.shape == (n,) and (content < vocab - 2).all()
        assert (y[: seq_len - n] == -100).all()
        np.testing.assert_array_equal(y[seq_len - n :], content)
        np.testing.assert_array_equal(x[task.metadata["content_positions"][row]], content)
        assert (x[: seq_len - n - 1] == blank).sum() == seq_len - 2 * n - 1
    assert _same(task, ex.selective_copying(6, seq_len, vocab, n, seed=seed))


@given(seed=seeds, shape=st.sampled_from([(32, 16), (16, 64)]))
def test_compression_reconstructs_every_token(seed, shape):
    seq_len, vocab = shape
    task = ex.compression(4, seq_len, vocab, seed=seed)
    assert (task.inputs[:, -1] == vocab - 1).all()
    assert ((task.inputs[:, :-1] >= 0) & (task.inputs[:, :-1] < vocab - 1)).all()
    np.testing.assert_array_equal(task.targets, task.inputs)


@given(seed=seeds, vocab=st.sampled_from([16, 257]))
def test_memorization_map_is_a_fixed_bijection_never_in_context(seed, vocab):
    table = _mad.memorization_map(vocab)
    half = (vocab - 1) // 2
    assert sorted(table) == list(range(half))
    assert set(table.values()) <= set(range(half, vocab - 1)) and len(set(table.values())) == half
    task = ex.memorization(8, 32, vocab, seed=seed)
    other = ex.memorization(8, 32, vocab, seed=seed + 1)
    for t in (task, other):
        assert (t.inputs[:, 1::2] == vocab - 1).all() and (t.targets[:, 0::2] == -100).all()
        assert [table[k] for k in t.inputs[:, 0::2].ravel()] == t.targets[:, 1::2].ravel().tolist()
    assert not np.array_equal(task.inputs, other.inputs)
    assert _mad.memorization_map(vocab, seed=1) != table


def test_mad_accuracy_defaults_to_macro():
    task = ex.memorization(4, 8, 16, seed=0)
    perfect = np.where(task.targets == -100, 0, task.targets)
    assert ex.mad_accuracy(perfect, task) == 1.0
    wrong = perfect.copy()
    wrong[0, 1] = (wrong[0, 1] + 1 - 7) % 8 + 7
    assert ex.mad_accuracy(wrong, task, "micro") == pytest.approx(1 - 1 / task.num_scored.sum())
    macro = _confusion_macro(wrong, task.targets, 16)
    assert ex.mad_accuracy(wrong, task) == pytest.approx(macro)


# ---------------------------------------------------------------------------------------------
# S-NIAH (spec 2.3)


@given(
    seed=seeds,
    variant=st.sampled_from(["pk", "n", "w"]),
    depth=st.sampled_from([None, 0.0, 25.0, 50.0, 100.0]),
    seq_len=st.sampled_from([700, 1500]),
)
def test_s_niah_needle_once_at_the_requested_depth(seed, variant, depth, seq_len):
    task = ex.s_niah(3, seq_len, variant, seed=seed, depth=depth)
    meta = task.metadata
    assert task.inputs.shape == (3, seq_len) and task.vocab_size == 256
    for row in range(3):
        n = int(meta["lengths"][row])
        raw = bytes(task.inputs[row, :n].astype(np.uint8).tolist())
        assert (task.inputs[row, n:] == 0).all() and (task.targets[row, n:] == -100).all()
        text = raw.decode("utf-8")
        key, value = str(meta["keys"][row]), str(meta["values"][row])
        kind = "uuids" if variant == "w" else "numbers"
        needle = f"One of the special magic {kind} for {key} is: {value}."
        assert text.count(needle) == 1 and raw.count(value.encode()) == 1
        if variant == "w":
            assert uuid.UUID(value).version == 4
        else:
            assert re.fullmatch(r"[1-9]\d{6}", value)
        assert raw.find(needle.encode()) == meta["needle_offsets"][row]
        # the scored span is exactly the value, predicted byte after byte
        scored = np.flatnonzero(task.targets[row] != -100)
        start = int(meta["answer_starts"][row])
        np.testing.assert_array_equal(scored, np.arange(start, start + len(value)))
        full = raw + bytes([task.targets[row, n - 1]])
        assert full.endswith(f"mentioned in the provided text is {value}".encode())
        np.testing.assert_array_equal(
            task.targets[row, scored], np.frombuffer(full[-len(value) :], np.uint8)
        )
        assert full[start + 1 :] == value.encode()
        # depth: the number of haystack units before the needle
        c0, c1 = int(meta["context_starts"][row]), int(meta["context_ends"][row])
        context = raw[c0:c1].decode()
        before, after = context.split(needle)
        requested = float(meta["depths"][row])
        if variant == "pk":
            blocks = context.count(_niah.NOISE_BLOCK)
            index = blocks * requested / 100
            assert before.count("\n") == (int(index) if depth is not None else round(index))
            assert before.count("\n") == before.count("again.")
            assert set(context.replace(needle, "").split("\n")) <= {_niah.NOISE_BLOCK, ""}
            assert seq_len + 1 - len(full) < len(_niah.NOISE_BLOCK) + 1  # as many blocks as fit
        else:
            haystack = (before + after).replace("  ", " ").strip()
            sentences = split_sentences(haystack)
            assert len(split_sentences(before)) == int(len(sentences) * requested / 100)
            assert haystack.split() == ex.load_excerpt().split()[: len(haystack.split())]
            assert seq_len + 1 - len(full) <= max(len(w) for w in ex.load_excerpt().split()) + 1
        if depth is None and variant != "pk":
            assert requested in _niah.DEPTHS
        elif depth is not None:
            assert requested == depth


def test_s_niah_determinism_and_lengths():
    a = ex.s_niah(4, 900, "n", seed=1, random_start=True)
    assert _same(a, ex.s_niah(4, 900, "n", seed=1, random_start=True))
    b = ex.s_niah(4, 900, "n", seed=2, random_start=True)
    assert not np.array_equal(a.metadata["values"], b.metadata["values"])
    long = ex.s_niah(1, 60_000, "w", seed=0, depth=40)  # longer than the excerpt: cycles
    assert 60_000 - int(long.metadata["lengths"][0]) < 30
    with pytest.raises(ValueError, match="too short"):
        ex.s_niah(1, 200, "pk", seed=0)
    with pytest.raises(ValueError, match="depth"):
        ex.s_niah(1, 900, "n", seed=0, depth=101)


def test_niah_keys_are_adjective_noun_pairs():
    keys = _niah.niah_keys()
    assert len(keys) == len(set(keys)) > 10_000 and list(keys) == sorted(keys)
    assert all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)


def test_string_match_all():
    assert ex.string_match_all(["The number is 1234567.", "no"], ["1234567", "7654321"]) == 50.0
    assert ex.string_match_all(["A and b"], [["a", "B", "c"]]) == pytest.approx(200 / 3)


# ---------------------------------------------------------------------------------------------
# bAbI qa1-qa5 and BABILong (spec 2.4)

_MOVE = re.compile(
    r"^(\w+) (?:moved to|went to|journeyed to|travelled to|went back to) the (\w+)\.$"
)
_GET = re.compile(r"^(\w+) (?:got|took|grabbed|picked up) the (\w+)(?: there)?\.$")
_DROP = re.compile(r"^(\w+) (?:dropped|put down|discarded|left) the (\w+)(?: there)?\.$")
_GIVE = re.compile(r"^(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.$")
_RELATION = re.compile(r"^The (\w+) is (north|south|east|west) of the (\w+)\.$")


def _replay(sample: ex.BabiSample) -> tuple[str, set[int]]:
    """Answer a bAbI question from the story text alone; also checks every action is valid."""
    where: dict[str, tuple[str, int]] = {}  # actor -> (place, fact)
    holder: dict[str, tuple[str, int]] = {}  # object -> (actor, get/give fact)
    dropped: dict[str, tuple[str, set[int]]] = {}  # object -> (place, facts)
    trace: dict[str, list[tuple[str, set[int], int]]] = {}  # object -> [(place, facts, holding)]
    holdings: dict[str, int] = {}
    gives: list[tuple[int, str, str, str]] = []
    relations: list[tuple[str, str, str, int]] = []
    for i, fact in enumerate(sample.facts):
        if m := _MOVE.match(fact):
            actor, place = m.groups()
            assert where.get(actor, ("", 0))[0] != place, "moved to where they already were"
            where[actor] = (place, i)
            for obj, (h, got) in holder.items():
                if h == actor:
                    t = trace.setdefault(obj, [])
                    if not t or t[-1][0] != place:
                        t.append((place, {got, i}, holdings[obj]))
        elif m := _GET.match(fact):
            actor, obj = m.groups()
            assert obj not in holder, "picked up an object someone holds"
            if obj in dropped and actor in where:
                assert dropped[obj][0] == where[actor][0], "picked up where it is not"
            holder[obj] = (actor, i)
            dropped.pop(obj, None)
            holdings[obj] = holdings.get(obj, 0) + 1
            if actor in where:
                t = trace.setdefault(obj, [])
                if not t or t[-1][0] != where[actor][0]:
                    t.append((where[actor][0], {where[actor][1], i}, holdings[obj]))
        elif m := _DROP.match(fact):
            actor, obj = m.groups()
            assert holder.pop(obj)[0] == actor, "dropped what they do not hold"
            holdings[obj] += 1
            if actor in where:
                dropped[obj] = (where[actor][0], {where[actor][1], i})
        elif m := _GIVE.match(fact):
            giver, obj, receiver = m.groups()
            assert holder[obj][0] == giver and giver != receiver, "gave what they do not hold"
            if giver in where and receiver in where:
                assert where[giver][0] == where[receiver][0], "gave to someone elsewhere"
            holder[obj] = (receiver, i)
            holdings[obj] = holdings.get(obj, 0) + 1
            gives.append((i, giver, obj, receiver))
        elif m := _RELATION.match(fact):
            x, d, y = m.groups()
            relations.append((x, d, y, i))
        else:
            raise AssertionError(f"unknown fact {fact!r}")
    q = sample.question
    opposite = {"north": "south", "south": "north", "east": "west", "west": "east"}
    if m := re.fullmatch(r"Where is (\w+)\?", q):
        place, fact = where[m.group(1)]
        return place, {fact}
    if m := re.fullmatch(r"Where is the (\w+)\?", q):
        obj = m.group(1)
        if obj in holder:
            actor, got = holder[obj]
            return where[actor][0], {got, where[actor][1]}
        return dropped[obj][0], dropped[obj][1]
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", q):
        t = trace[m.group(1)]
        assert t[-1][0] == m.group(2) and [e[0] for e in t].count(m.group(2)) == 1
        assert t[-1][2] == t[-2][2]
        return t[-2][0], t[-2][1] | t[-1][1]
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", q):
        d, y = m.groups()
        hits = [(a, i) for a, dd, b, i in relations if dd == d and b == y]
        hits += [(b, i) for a, dd, b, i in relations if dd == opposite[d] and a == y]
        assert len(hits) == 1
        return hits[0][0], {hits[0][1]}
    if m := re.fullmatch(r"What is the (\w+) (\w+) of\?", q):
        x, d = m.groups()
        hits = [(b, i) for a, dd, b, i in relations if dd == d and a == x]
        hits += [(a, i) for a, dd, b, i in relations if dd == opposite[d] and b == x]
        assert len(hits) == 1
        return hits[0][0], {hits[0][1]}

    def latest(giver=None, obj=None, receiver=None):
        found = [
            g
            for g in gives
            if all(w in (None, v) for w, v in zip((giver, obj, receiver), g[1:], strict=True))
        ]
        return found[-1]

    if m := re.fullmatch(r"What did (\w+) give to (\w+)\?", q):
        g = latest(giver=m.group(1), receiver=m.group(2))
        return g[2], {g[0]}
    if m := re.fullmatch(r"Who gave the (\w+)\?", q):
        g = latest(obj=m.group(1))
        return g[1], {g[0]}
    if m := re.fullmatch(r"Who gave the (\w+) to (\w+)\?", q):
        g = latest(obj=m.group(1), receiver=m.group(2))
        return g[1], {g[0]}
    if m := re.fullmatch(r"Who did (\w+) give the (\w+) to\?", q):
        g = latest(giver=m.group(1), obj=m.group(2))
        return g[3], {g[0]}
    if m := re.fullmatch(r"Who received the (\w+)\?", q):
        g = latest(obj=m.group(1))
        return g[3], {g[0]}
    raise AssertionError(f"unknown question {q!r}")


@given(seed=seeds, task=st.sampled_from([1, 2, 3, 4, 5]))
def test_babi_answers_follow_from_replaying_the_story(seed, task):
    samples = ex.babi_samples(task, 6, seed=seed)
    assert len(samples) == 6
    for sample in samples:
        assert sample.task == task
        answer, supports = _replay(sample)
        assert answer == sample.answer
        assert set(sample.supporting_facts) == supports
        assert len(sample.supporting_facts) == {1: 1, 2: 2, 3: 3, 4: 1, 5: 1}[task]
        actors = _babilong.ACTORS_QA5 if task == 5 else _babilong.ACTORS
        names = set(re.findall(r"\b[A-Z][a-z]+\b", " ".join(sample.facts))) - {"The"}
        assert names <= set(actors)
        if task == 4:
            assert len(sample.facts) == 2
    assert ex.babi_samples(task, 6, seed=seed) == samples


def test_babi_stories_split_into_single_question_samples():
    samples = ex.babi_samples(1, 10, seed=0)
    assert [len(s.facts) for s in samples] == [2, 4, 6, 8, 10, 2, 4, 6, 8, 10]
    assert samples[1].facts[:2] == samples[0].facts  # one story, growing prefixes


@given(seed=seeds, task=st.sampled_from([1, 2, 3, 5]), seq_len=st.sampled_from([2048, 4096]))
def test_babilong_facts_in_order_at_sentence_boundaries(seed, task, seq_len):
    task_data = ex.babilong(task, 2, seq_len, seed=seed)
    meta = task_data.metadata
    excerpt_sentences = [s for s in split_sentences(ex.load_excerpt()) if len(s.encode()) >= 40]
    known = set(excerpt_sentences)
    for row in range(2):
        raw = bytes(task_data.inputs[row].astype(np.uint8).tolist())
        end = int(meta["context_ends"][row])
        context = raw[:end]
        question, answer = str(meta["questions"][row]), str(meta["answers"][row])
        tail = f"\nQuestion: {question}\nAnswer: {answer}".encode()
        assert (raw + bytes([task_data.targets[row, -1]]))[end:] == tail  # exact length
        scored = np.flatnonzero(task_data.targets[row] != -100)
        assert scored.tolist() == list(range(seq_len - len(answer), seq_len))
        offsets = meta["fact_offsets"][row][: meta["num_facts"][row]]
        assert (np.diff(offsets) > 0).all() and (
            meta["fact_offsets"][row][len(offsets) :] == -1
        ).all()
        np.testing.assert_allclose(meta["fact_depths"][row][: len(offsets)], offsets / end)
        facts = []
        for offset in offsets:
            match = re.match(rb"[^.?!]*[.?!]", context[offset:])
            assert match is not None
            fact = match.group().decode()
            facts.append(fact)
            assert offset == 0 or context[offset - 1 : offset] == b" "
            assert offset == 0 or context[: offset - 1].decode().endswith(
                (".", "!", "?", '"', "'", ")", "]")
            )
        # the facts form a valid bAbI sample answering the question
        supports = meta["supporting_facts"][row]
        sample = ex.BabiSample(
            task, tuple(facts), question, answer, tuple(supports[supports >= 0].tolist())
        )
        assert _replay(sample)[0] == answer
        np.testing.assert_allclose(
            meta["supporting_depths"][row][supports >= 0], offsets[supports[supports >= 0]] / end
        )
        # everything else is whole excerpt sentences (the last one possibly truncated)
        rest = context.decode()
        for offset, fact in sorted(zip(offsets, facts, strict=True), reverse=True):
            rest = rest[:offset] + rest[offset + len(fact) + 1 :]
        pieces = split_sentences(rest)
        assert all(p in known for p in pieces[:-1])
        assert any(s.startswith(pieces[-1]) for s in excerpt_sentences)
    assert _same(task_data, ex.babilong(task, 2, seq_len, seed=seed))
    assert not np.array_equal(task_data.inputs, ex.babilong(task, 2, seq_len, seed=seed + 1).inputs)


def test_babilong_uses_given_distractor_text_and_rejects_short_lengths():
    text = " ".join(
        f"Sentence number {i} is here and it is long enough to count." for i in range(50)
    )
    data = ex.babilong(4, 3, 1024, seed=0, distractor_text=text)
    decoded = bytes(data.inputs[0].astype(np.uint8).tolist()).decode()
    assert "Sentence number" in decoded
    assert len(re.findall(r"The \w+ is (?:north|south|east|west) of the \w+\.", decoded)) == 2
    with pytest.raises(ValueError, match="too short"):
        ex.babilong(3, 2, 64, seed=0)
    with pytest.raises(ValueError, match="task"):
        ex.babi_samples(6, 1, seed=0)


# ---------------------------------------------------------------------------------------------
# memory-capacity probes (spec 2.5)


@given(
    seed=seeds,
    n=st.sampled_from([4, 16]),
    dims=st.sampled_from([(8, 4), (16, 16)]),
    keys=st.sampled_from(["gaussian", "unit"]),
    values=st.sampled_from(["gaussian", "one_hot"]),
    passes=st.sampled_from([1, 2]),
)
def test_capacity_probe_layout(seed, n, dims, keys, values, passes):
    d_k, d_v = dims
    probe = ex.capacity_probe(n, d_k, d_v, seed=seed, keys=keys, values=values, passes=passes)
    t = passes * n + n
    assert probe.q.shape == probe.k.shape == (t, d_k) and probe.v.shape == (t, d_v)
    assert probe.q.dtype == np.float32
    np.testing.assert_array_equal(probe.k[: passes * n], np.tile(probe.keys, (passes, 1)))
    np.testing.assert_array_equal(probe.q[probe.read_positions], probe.keys)
    np.testing.assert_array_equal(probe.v[probe.read_positions], probe.values)
    assert probe.write_mask.tolist() == [1.0] * (passes * n) + [0.0] * n
    if keys == "unit":
        np.testing.assert_allclose(np.linalg.norm(probe.keys, axis=1), 1, rtol=1e-6)
    if values == "one_hot":
        assert (probe.values.sum(1) == 1).all() and set(np.unique(probe.values)) <= {0.0, 1.0}
    lr, decay = ex.capacity_gates(probe, lr=0.5, decay=0.9)
    assert lr.tolist() == [0.5] * (passes * n) + [0.0] * n
    np.testing.assert_allclose(decay, [0.9] * (passes * n) + [1.0] * n)
    perfect = ex.capacity_recall(probe.v, probe)
    assert perfect.accuracy == 1.0 and perfect.relative_mse == 0.0
    from_reads = ex.capacity_recall(probe.values, probe)
    assert from_reads.accuracy == 1.0 and from_reads.correct.all()


def test_gaussian_keys_have_unit_expected_norm():
    probe = ex.capacity_probe(4000, 16, 2, seed=0)
    assert abs(np.mean(np.sum(probe.keys.astype(np.float64) ** 2, axis=1)) - 1) < 0.02


def test_capacity_of_a_least_squares_linear_memory():
    """The best linear memory recalls N <= d_k pairs exactly; beyond, it keeps d_k / N of the
    value energy (relative MSE -> 1 - d_k / N) and recall falls (ATLAS Prop. 1 / digest 3.4)."""
    d_k, d_v = 16, 32
    for n in (8, 16):
        probe = ex.capacity_probe(n, d_k, d_v, seed=n)
        keys, values = probe.keys.astype(np.float64), probe.values.astype(np.float64)
        memory = np.linalg.lstsq(keys, values, rcond=None)[0]
        score = ex.capacity_recall(keys @ memory, probe)
        assert score.accuracy == 1.0 and score.relative_mse < 1e-10
    mses, accuracies = [], []
    for seed in range(8):
        probe = ex.capacity_probe(128, d_k, d_v, seed=seed)
        keys, values = probe.keys.astype(np.float64), probe.values.astype(np.float64)
        memory = np.linalg.lstsq(keys, values, rcond=None)[0]
        score = ex.capacity_recall(keys @ memory, probe)
        mses.append(score.relative_mse)
        accuracies.append(score.accuracy)
    assert abs(np.mean(mses) - (1 - d_k / 128)) < 0.02
    assert np.mean(accuracies) < 0.5


def test_capacity_recall_counts_the_nearest_value_by_cosine():
    probe = ex.capacity_probe(3, 4, 2, seed=0)
    stored = probe.values.astype(np.float64)
    swapped = stored[[1, 0, 2]] * np.array([[3.0], [0.1], [2.0]])  # scale does not matter
    score = ex.capacity_recall(swapped, probe)
    assert score.correct.tolist() == [False, False, True]
    assert score.accuracy == pytest.approx(1 / 3)
    expected = ((swapped - stored) ** 2).sum() / (stored**2).sum()
    assert score.relative_mse == pytest.approx(expected)
    with pytest.raises(ValueError, match="y must be"):
        ex.capacity_recall(np.zeros((5, 2)), probe)


@given(seed=seeds, shape=st.sampled_from([(4, 2), (16, 3)]))
def test_interference_probe_scores_only_the_latest_value(seed, shape):
    n, versions = shape
    probe = ex.interference_probe(n, versions, 8, 6, seed=seed)
    writes = versions * n
    assert probe.k.shape == (writes + n, 8) and probe.distractors.shape == ((versions - 1) * n, 6)
    assert probe.write_mask.tolist() == [1.0] * writes + [0.0] * n
    np.testing.assert_array_equal(probe.q[probe.read_positions], probe.keys)
    # replay the writes: each round writes every key once; the last write of a key is its value
    last: dict[bytes, np.ndarray] = {}
    history: dict[bytes, list[np.ndarray]] = {}
    for r in range(versions):
        block = slice(r * n, (r + 1) * n)
        assert {k.tobytes() for k in probe.k[block]} == {k.tobytes() for k in probe.keys}
        for key, value in zip(probe.k[block], probe.v[block], strict=True):
            last[key.tobytes()] = value
            history.setdefault(key.tobytes(), []).append(value)
    latest = np.stack([last[k.tobytes()] for k in probe.keys])
    np.testing.assert_array_equal(latest, probe.values)
    stale = np.concatenate([np.stack(history[k.tobytes()][:-1]) for k in probe.keys])
    assert sorted(map(bytes, stale)) == sorted(map(bytes, probe.distractors))
    assert ex.capacity_recall(latest, probe).accuracy == 1.0  # last write wins
    first = np.stack([history[k.tobytes()][0] for k in probe.keys])
    assert ex.capacity_recall(first, probe).accuracy == 0.0  # a stale value never counts


def test_averaging_memory_fails_the_interference_probe():
    probe = ex.interference_probe(64, 4, 16, 32, seed=0)
    by_key = {k.tobytes(): [] for k in probe.keys}
    for key, value in zip(probe.k[: 4 * 64], probe.v[: 4 * 64], strict=True):
        by_key[key.tobytes()].append(value)
    average = np.stack([np.mean(by_key[k.tobytes()], axis=0) for k in probe.keys])
    assert ex.capacity_recall(average, probe).accuracy < 0.5  # about 1 in 4 by symmetry
