"""Read a training corpus into documents.

Accepted inputs: ``stdlib`` (the Python standard library's source of the running interpreter:
present on every machine, no download), a text file, a directory of text files (searched
recursively for ``TEXT_SUFFIXES``), or a JSONL file whose lines are objects with a ``text`` field.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from hivefold.errors import CorpusError

STDLIB = "stdlib"
TEXT_SUFFIXES = frozenset({".txt", ".md", ".py", ".rst", ".text", ".c", ".h", ".json", ".toml", ".cfg", ".ini",
                           ".html", ".tex", ".csv", ".yaml", ".yml", ".sh", ".js", ".ts", ".rs", ".go", ".java"})
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git", "test", "tests", "idle_test"})


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, without installed packages and test suites, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {path}: {e.strerror}") from e


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an object "
                                  'like {"text": "..."}') from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CorpusError(f'{path}:{lineno}: each line must be a JSON object with a string "text" field')
            yield obj["text"]


def read_documents(corpus: str, *, max_chars: int | None = None) -> tuple[list[str], str]:
    """Return ``(documents, description)`` for a corpus argument; raise CorpusError with a fix if unusable.

    ``max_chars`` caps the total characters read (documents are taken in sorted order until it is reached).
    """
    if corpus == STDLIB:
        files, description = stdlib_files(), f"stdlib:{sysconfig.get_paths()['stdlib']}"
    else:
        path = Path(corpus).expanduser()
        if not path.exists():
            raise CorpusError(f"corpus {corpus!r} does not exist; give a text file, a directory, a .jsonl file, "
                              f"or '{STDLIB}'")
        description = str(path.resolve())
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                           and not _SKIP_DIRS.intersection(p.relative_to(path).parts[:-1]) - {"test", "tests"})
            if not files:
                raise CorpusError(f"corpus directory {path} has no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        else:
            files = [path]
    docs: list[str] = []
    total = 0
    for f in files:
        texts = _jsonl_documents(f) if f.suffix.lower() == ".jsonl" else iter([_read_text(f)])
        for text in texts:
            if not text.strip():
                continue
            if max_chars is not None and total + len(text) > max_chars:
                text = text[: max(0, max_chars - total)]
            docs.append(text)
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return docs, description
    if not docs:
        raise CorpusError(f"corpus {corpus!r} is empty: it holds no non-blank text")
    return docs, description
