"""Read a training corpus into documents.

Accepted inputs: ``stdlib`` (the Python standard library's ``.py`` files of the running interpreter:
present on every machine, no download), a text file, a directory, or a JSONL file (``.jsonl``: one
JSON object with a string ``text`` field per line).

Files are judged by content, not name: a file is text if it holds no NUL bytes and decodes as UTF-8
(a BOM is allowed); gzip-compressed files are decompressed and judged the same way. Each text file
is one document. In a directory, which is searched recursively in sorted order, other files are
skipped and counted by reason (binary, not UTF-8, empty, unreadable, ...); hidden directories,
``_SKIP_DIRS`` and symlinked directories are not entered, and a file linked twice is read once. A
single file that is not text is refused, and so is a directory without any text.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import sysconfig
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

from hivefold.errors import CorpusError

STDLIB = "stdlib"
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git", "test", "tests", "idle_test"})
_SNIFF_BYTES = 8192  # a NUL byte this early marks a binary, which is then not read any further
_GZIP_MAGIC = b"\x1f\x8b"  # never the start of UTF-8 text, so testing for it cannot misread a text file
_GIVE = f"give a UTF-8 text file, a directory holding some, a .jsonl file, or '{STDLIB}'"

# Kinds of file read, and reasons for skipping one (the words the summary uses).
TEXT, GZIP, JSONL = "text", "gzip text", "JSONL"
BINARY, NOT_UTF8, EMPTY, BAD_GZIP = "binary (NUL bytes)", "not UTF-8", "empty", "corrupt gzip"
NOT_REGULAR, DUPLICATE = "not a regular file", "duplicate (same file linked twice)"


@dataclass
class CorpusStats:
    """What reading a corpus found; ``str()`` is a one-line summary for the log."""

    files: int = 0  # files looked at (read + skipped)
    bytes: int = 0  # their size on disk
    read: Counter[str] = field(default_factory=Counter)  # kind -> files read
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> files skipped
    capped_at: int | None = None  # max_chars, when reading stopped there

    def __str__(self) -> str:
        size = f"{self.bytes / 1e6:,.1f} MB" if self.bytes >= 100_000 else f"{self.bytes:,} bytes"
        parts = [f"{self.files:,} files, {size} on disk"]  # gzip files hold more text than that
        if self.read:
            parts.append(f"read {_counts(self.read)}")
        if self.skipped:
            parts.append(f"skipped {self.skipped.total():,}: {_counts(self.skipped)}")
        if self.capped_at is not None:
            parts.append(f"stopped at the {self.capped_at:,}-character cap")
        return "; ".join(parts)


def _counts(counter: Counter[str]) -> str:
    # Most frequent first, ties by name: the same corpus always gives the same line.
    return ", ".join(f"{n:,} {name}" for name, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


class Corpus(NamedTuple):
    """What ``read_documents`` returns; unpacks as ``docs, description, stats``."""

    documents: list[str]
    description: str  # where the text came from
    stats: CorpusStats


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, without installed packages and test suites, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def _walk(root: Path, stats: CorpusStats) -> list[Path]:
    """Files under ``root``, sorted. Symlinked directories are not entered: no loops, no text read twice."""
    skip = _SKIP_DIRS - {"test", "tests"}  # a user's own tests/ directory may well be wanted text

    def unreadable(e: OSError) -> None:
        stats.files += 1
        stats.skipped[f"unreadable directory ({e.strerror})"] += 1

    files = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip]
        files.extend(Path(dirpath, name) for name in filenames)
    return sorted(files)


def _load(path: Path) -> tuple[str, str | None]:
    """``(kind, text)`` for a text file, or ``(reason, None)`` for one to skip. Raises OSError."""
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
        if head.startswith(_GZIP_MAGIC):
            kind = GZIP
            try:
                data = gzip.decompress(head + f.read())
            except (OSError, EOFError, zlib.error):
                return BAD_GZIP, None
        elif b"\0" in head:
            return BINARY, None
        else:
            kind, data = TEXT, head + f.read()
    if b"\0" in data:
        return BINARY, None
    try:
        text = data.decode("utf-8-sig")  # strict; a leading BOM is dropped
    except UnicodeDecodeError:
        return NOT_UTF8, None
    return (kind, text) if text.strip() else (EMPTY, None)


def _jsonl_documents(path: Path, f: IO[bytes]) -> Iterator[str]:
    with f:
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


def read_documents(corpus: str, *, max_chars: int | None = None) -> Corpus:
    """Return ``(documents, description, stats)`` for a corpus argument; raise CorpusError with a fix if unusable.

    ``max_chars`` caps the total characters read (documents are taken in sorted order until it is reached).
    """
    stats = CorpusStats()
    single = False
    if corpus == STDLIB:
        files, description = stdlib_files(), f"stdlib:{sysconfig.get_paths()['stdlib']}"
    else:
        path = Path(corpus).expanduser()
        if not path.exists():
            raise CorpusError(f"corpus {corpus!r} does not exist; {_GIVE}")
        description = str(path.resolve())
        single = not path.is_dir()
        files = [path] if single else _walk(path, stats)
    docs: list[str] = []
    total = 0
    seen: set[tuple[int, int]] = set()  # (device, inode): a file reached by two links is read once
    for f in files:
        stats.files += 1
        try:
            st = f.stat()
            stats.bytes += st.st_size
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
                kind, texts = NOT_REGULAR, None
            elif (st.st_dev, st.st_ino) in seen:
                kind, texts = DUPLICATE, None
            elif f.suffix.lower() == ".jsonl":
                kind, texts = JSONL, _jsonl_documents(f, f.open("rb"))
            else:
                kind, text = _load(f)
                texts = None if text is None else [text]
        except OSError as e:
            if single:
                raise CorpusError(f"cannot read corpus file {f}: {e.strerror}") from e
            kind, texts = f"unreadable ({e.strerror})", None
        if texts is None:
            if single and kind != EMPTY:
                hint = "; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)" if kind == NOT_UTF8 else ""
                raise CorpusError(f"corpus file {f} is not text: {kind}{hint}; {_GIVE}")
            stats.skipped[kind] += 1
            continue
        seen.add((st.st_dev, st.st_ino))
        stats.read[kind] += 1
        for text in texts:
            if not text.strip():
                continue
            if max_chars is not None and total + len(text) > max_chars:
                text = text[: max(0, max_chars - total)]
            docs.append(text)
            total += len(text)
            if max_chars is not None and total >= max_chars:
                stats.capped_at = max_chars
                return Corpus(docs, description, stats)
    if not stats.read and not single:
        raise CorpusError(f"corpus directory {description} has no text files ({stats}); {_GIVE}")
    if not docs:
        raise CorpusError(f"corpus {corpus!r} is empty: it holds no non-blank text")
    return Corpus(docs, description, stats)
