"""Every citation of the design notes resolves inside `docs/`, and nothing points outside the repo.

The code and the Markdown pages cite the design notes by label:

- `A-n` (an ambiguity of the papers, with the library's default): a heading in
  `docs/ambiguities.md`; a cited option such as `A-13 (i)` must appear in that section;
- `I-n` (an equivalence or invariant): a heading in `docs/equivalences.md`;
- `digest x.y`, `digest §x.y`, `digest section x.y`, `digest 6.2-6.4` (a section of the
  derivations): a heading in `docs/derivations.md`, except section 9 and its groups (`9.B`),
  which are `docs/equivalences.md`, and section 10, which is `docs/ambiguities.md`.

A label resolves when a Markdown heading of the right file contains it as a whole token (so
`6` is not resolved by `6.2`, nor `I-1` by `I-12`). Pure text scanning: no import of the
library, so this runs in a fraction of a second.
"""

import ast
import os
import re
from collections import defaultdict
from pathlib import Path


THIS_FILE = Path(__file__).resolve()
ROOT = THIS_FILE.parent.parent
DOCS = ROOT / "docs"
AMBIGUITIES = DOCS / "ambiguities.md"
EQUIVALENCES = DOCS / "equivalences.md"
DERIVATIONS = DOCS / "derivations.md"

# Where citations live: the packages, the experiments, the tests and the top-level README.
CITING_DIRS = ("atlas_eqx", "optimizers", "feature_maps", "experiments", "tests")
CITING_FILES = ("README.md",)
CITING_SUFFIXES = (".py", ".md")

# Files checked for references to places outside the repository: every text file of the
# repository (docs/ included), outside git's folder, virtual environments, caches, run outputs
# (the folders .gitignore lists) and a `shared/` folder that a checkout may hold beside the code.
TEXT_SUFFIXES = (".py", ".md", ".txt", ".toml", ".sh", ".json", ".jsonl", ".cfg", ".ini", ".yaml")
TEXT_NAMES = ("run",)
SKIP_DIRS = {
    ".git",
    ".venv",
    "venv",
    ".hypothesis",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "__pycache__",
    "node_modules",
    "build",
    "dist",
    ".jax_cache",
    ".whl",
    "data_cache",
    "runs",
    "gpu_out",
    "shared",
}

# Names of the notes this library was written from, which live outside the repository.
OUTSIDE = (
    "../shared",
    "/work/shared",
    "shared/reference",
    "paper_digest.md",
    "tasks_and_data.md",
    "prior_art.md",
    "anchors_code.md",
    "jax_toolchain_notes.md",
)

AMBIGUITY = re.compile(r"(?<![\w-])A-(\d+)(?:\s*\(([ivx]+|[a-h])\))?(?![\w-])")
EQUIVALENCE = re.compile(r"(?<![\w-])I-(\d+)(?![\w-])")
EQUIVALENCE_RANGE = re.compile(r"(?<![\w-])I-(\d+)\s*(?:\.\.\.?|\bto\b|-|–)\s*I-(\d+)(?![\w-])")
_NUMBER = r"\d+(?:\.\d+)*(?:\.[A-G](?![A-Za-z]))?"
SECTION = re.compile(
    r"\bdigest(?:'s)?(?:\.md)?`?\s+"
    r"(?:(?:table|recommended default|recommendations)\s+\()?"
    r"(?:sections?\s+|§\s*)?"
    rf"(?P<numbers>{_NUMBER}(?:\s*(?:,|\band\b|\bto\b|\.\.|-|–)\s*(?:§\s*)?{_NUMBER})*)",
    re.IGNORECASE,
)
# "digest ... section 8" later on a line that cites the digest ("digest 3.4; section 8 ...").
LATER_SECTION = re.compile(rf"\bsections?\s+(?P<numbers>{_NUMBER})", re.IGNORECASE)
TEST_REFERENCE = re.compile(r"\b(test_\w+\.py)::(test_\w+)")
CONFIG_REFERENCE = re.compile(r"\bMemoryLayerConfig\.(\w+)")


def _walk(top: Path) -> list[Path]:
    """The files under `top`, without descending into `SKIP_DIRS`."""
    files = []
    for directory, subdirectories, names in os.walk(top):
        subdirectories[:] = sorted(
            d for d in subdirectories if d not in SKIP_DIRS and not d.endswith(".egg-info")
        )
        files += [Path(directory) / name for name in sorted(names)]
    return files


def _citing_files() -> list[Path]:
    files = [ROOT / name for name in CITING_FILES if (ROOT / name).is_file()]
    for directory in CITING_DIRS:
        files += [path for path in _walk(ROOT / directory) if path.suffix in CITING_SUFFIXES]
    return [path for path in files if path != THIS_FILE]


def _text_files() -> list[Path]:
    return [
        path
        for path in _walk(ROOT)
        if path != THIS_FILE and (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES)
    ]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def _where(path: Path, line_number: int) -> str:
    return f"{path.relative_to(ROOT)}:{line_number}"


def _expand_numbers(text: str) -> list[str]:
    """`5.1-5.5` -> 5.1, 5.2, 5.3, 5.4, 5.5; `8.1, 8.6` -> both; `7 and 10` -> both."""
    numbers = re.findall(_NUMBER, text)
    out = list(numbers)
    for first, last in re.findall(rf"({_NUMBER})\s*(?:-|–|\.\.|\bto\b)\s*§?\s*({_NUMBER})", text):
        a, b = first.split("."), last.split(".")
        if len(a) == len(b) and a[:-1] == b[:-1] and a[-1].isdigit() and b[-1].isdigit():
            prefix = ".".join(a[:-1])
            for n in range(int(a[-1]), int(b[-1]) + 1):
                out.append(f"{prefix}.{n}" if prefix else str(n))
    return out


def _section_file(number: str) -> Path:
    major = number.split(".")[0]
    return {"9": EQUIVALENCES, "10": AMBIGUITIES}.get(major, DERIVATIONS)


def _citations() -> dict[tuple[Path, str], list[str]]:
    """(docs file, label) -> the places that cite it."""
    cited = defaultdict(list)
    for path in _citing_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        # Section numbers may follow "digest" on the next line: match on the whole text.
        for match in SECTION.finditer(text):
            where = _where(path, text.count("\n", 0, match.start()) + 1)
            for label in _expand_numbers(match["numbers"]):
                cited[(_section_file(label), label)].append(where)
        for number, line in enumerate(text.splitlines(), 1):
            where = _where(path, number)
            for match in AMBIGUITY.finditer(line):
                cited[(AMBIGUITIES, f"A-{match[1]}")].append(where)
                if match[2]:
                    cited[(AMBIGUITIES, f"A-{match[1]} ({match[2]})")].append(where)
            for match in EQUIVALENCE.finditer(line):
                cited[(EQUIVALENCES, f"I-{match[1]}")].append(where)
            for match in EQUIVALENCE_RANGE.finditer(line):
                for n in range(int(match[1]), int(match[2]) + 1):
                    cited[(EQUIVALENCES, f"I-{n}")].append(where)
            if re.search(r"\bdigest\b", line, re.IGNORECASE):
                for match in LATER_SECTION.finditer(line):
                    for label in _expand_numbers(match["numbers"]):
                        cited[(_section_file(label), label)].append(where)
    return {key: sorted(set(places), key=_place_key) for key, places in cited.items()}


def _place_key(place: str):
    path, _, line = place.rpartition(":")
    return (path, int(line))


def _headings(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.lstrip("#").strip() for line in _lines(path) if re.match(r"#{1,6}\s", line)]


def _section_body(path: Path, label: str) -> str:
    """The text under the first heading that contains `label`, up to the next heading."""
    body, inside = [], False
    for line in _lines(path) if path.is_file() else []:
        if re.match(r"#{1,6}\s", line):
            if inside:
                break
            inside = _has_token(line, label)
        elif inside:
            body.append(line)
    return "\n".join(body)


def _has_token(text: str, label: str) -> bool:
    return re.search(rf"(?<![\w.-]){re.escape(label)}(?![\w-]|\.\w)", text) is not None


def _resolves(path: Path, label: str) -> bool:
    option = re.fullmatch(r"(A-\d+) \((\w+)\)", label)
    if option:
        return f"({option[2]})" in _section_body(path, option[1])
    return any(_has_token(heading, label) for heading in _headings(path))


def _sort_key(item):
    (path, label), _ = item
    parts = [part for part in re.split(r"[-.() ]+", label) if part]
    return (path.name, [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts])


def test_the_scanner_finds_the_citation_forms():
    """The regular expressions catch each form the code uses (guards the test itself)."""
    line = (
        "digest A-13 (i), A-8 (b); I-12, I-28..I-32; digest §5.2, digest section 9.B, 9.D; "
        "digest 6.2-6.4; digest's recommendations (sections 7 and 10); digest 3.4; section 8"
    )
    ambiguities = {(m[1], m[2]) for m in AMBIGUITY.finditer(line)}
    assert ambiguities == {("13", "i"), ("8", "b")}
    assert {m[1] for m in EQUIVALENCE.finditer(line)} == {"12", "28", "32"}
    assert [(m[1], m[2]) for m in EQUIVALENCE_RANGE.finditer(line)] == [("28", "32")]
    sections = [n for m in SECTION.finditer(line) for n in _expand_numbers(m["numbers"])]
    sections += [m["numbers"] for m in LATER_SECTION.finditer(line)]
    for number in ("5.2", "9.B", "9.D", "6.2", "6.3", "6.4", "7", "10", "3.4", "8"):
        assert number in sections
    assert not AMBIGUITY.search("SHA-256, RWKV-7, DATA-1") and not EQUIVALENCE.search("MI-300")
    assert _has_token("## 6.2 The dual form", "6.2") and not _has_token("## 6.2 The dual", "6")
    assert not _has_token("### I-12: retention order", "I-1")


def test_every_cited_label_has_a_section_in_docs():
    cited = _citations()
    assert len(cited) > 50, "the scanner found almost no citations: is the regex broken?"
    unresolved = [
        f"{label} (expected a heading in {path.relative_to(ROOT)}), cited at "
        + ", ".join(places[:5])
        + (f" and {len(places) - 5} more" if len(places) > 5 else "")
        for (path, label), places in sorted(cited.items(), key=_sort_key)
        if not _resolves(path, label)
    ]
    assert not unresolved, "unresolved citations:\n" + "\n".join(unresolved)


def test_docs_cover_every_equivalence_and_ambiguity():
    """docs/ lists all 40 equivalences and all 32 ambiguities, whether or not the code cites them."""
    missing = [f"I-{n}" for n in range(1, 41) if not _resolves(EQUIVALENCES, f"I-{n}")]
    missing += [f"A-{n}" for n in range(1, 33) if not _resolves(AMBIGUITIES, f"A-{n}")]
    assert not missing, f"no section in docs/ for {missing}"


def test_tests_named_in_docs_exist():
    """Every `test_file.py::test_name` that docs/ names is a test function of tests/."""
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined |= {
            (path.name, node.name)
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
    missing = [
        f"{_where(path, number)}: {match[1]}::{match[2]}"
        for path in sorted(DOCS.glob("*.md"))
        for number, line in enumerate(_lines(path), 1)
        for match in TEST_REFERENCE.finditer(line)
        if (match[1], match[2]) not in defined
    ]
    assert not missing, "docs/ names tests that do not exist:\n" + "\n".join(missing)


def test_config_fields_named_in_docs_exist():
    """Every `MemoryLayerConfig.field` that docs/ names is a field of the dataclass."""
    tree = ast.parse((ROOT / "atlas_eqx" / "_layer.py").read_text(encoding="utf-8"))
    config = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name == "MemoryLayerConfig"
    )
    fields = {
        node.target.id
        for node in config.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    missing = [
        f"{_where(path, number)}: MemoryLayerConfig.{match[1]}"
        for path in sorted(DOCS.glob("*.md"))
        for number, line in enumerate(_lines(path), 1)
        for match in CONFIG_REFERENCE.finditer(line)
        if match[1] not in fields
    ]
    assert not missing, "docs/ names config fields that do not exist:\n" + "\n".join(missing)


def test_no_file_points_outside_the_repository():
    """No text file of the repository (docs/ included) names a note outside it."""
    found = []
    for path in _text_files():
        for number, line in enumerate(_lines(path), 1):
            names = [name for name in OUTSIDE if name in line]
            if names:
                found.append(f"{_where(path, number)}: {', '.join(names)}")
    assert not found, "references to files outside the repository:\n" + "\n".join(found)
