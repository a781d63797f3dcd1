"""Corpus ingestion: text is recognised by content, everything else is skipped, counted, or refused."""

import gzip
import json
import os
import sys

import pytest

from hivefold.corpus import read_documents
from hivefold.errors import CorpusError

as_root = os.name == "posix" and os.geteuid() == 0  # root reads files whatever their mode


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


@pytest.fixture
def doc_tree(tmp_path):
    """A small /usr/share/doc-like tree: text with and without suffixes, compressed text, and junk."""
    root = tmp_path / "doc"
    write(root / "pkg" / "README", "readme text")
    write(root / "pkg" / "copyright", "copyright text")
    write(root / "pkg" / "changelog.Debian.gz", gzip.compress(b"debian changelog text"))
    write(root / "pkg" / "NEWS.markdown", "# news text")
    write(root / "pkg" / "notes.txt", "\ufeffnotes text".encode())  # UTF-8 with a BOM
    write(root / "other" / "changelog.Debian", "other changelog text")
    write(root / "other" / "logo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(root / "other" / "late-nul.bin", b"a" * 20_000 + b"\x00")  # NUL after the sniffed head
    write(root / "other" / "latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    write(root / "other" / "blank.txt", " \n\n")
    write(root / "other" / "archive.tar.gz", gzip.compress(b"tar\x00header"))
    write(root / "other" / "broken.gz", b"\x1f\x8b\x08\x00 not really gzip")
    write(root / ".git" / "config", "[core] git text")
    write(root / "pkg" / "__pycache__" / "x.txt", "cached text")
    return root


def test_text_is_recognised_by_content_and_the_rest_is_counted(doc_tree):
    docs, description, stats = read_documents(str(doc_tree))
    assert description == str(doc_tree.resolve())
    # Sorted by path: other/ before pkg/; the BOM is dropped; .git and __pycache__ are not entered.
    assert docs == ["other changelog text", "# news text", "readme text", "debian changelog text",
                    "copyright text", "notes text"]
    assert stats.read == {"text": 5, "gzip text": 1}
    assert stats.skipped == {"binary (NUL bytes)": 3, "not UTF-8": 1, "empty": 1, "corrupt gzip": 1}
    looked_at = [p for d in ("pkg", "other") for p in (doc_tree / d).iterdir() if p.is_file()]
    assert stats.files == len(looked_at) == 12 and stats.bytes == sum(p.stat().st_size for p in looked_at)
    assert str(stats) == (f"12 files, {stats.bytes:,} bytes on disk; read 5 text, 1 gzip text; skipped 6: "
                          "3 binary (NUL bytes), 1 corrupt gzip, 1 empty, 1 not UTF-8")


@pytest.mark.parametrize("content", [b"\x7fELF\x02\x01\x01\x00\x00\x00", None])
def test_a_binary_file_alone_is_refused(tmp_path, content):
    path = write(tmp_path / "prog", content) if content else sys.executable
    with pytest.raises(CorpusError, match=r"is not text: binary \(NUL bytes\); give a UTF-8 text file"):
        read_documents(str(path))


def test_a_latin1_file_alone_is_refused_with_a_fix(tmp_path):
    path = write(tmp_path / "old.txt", "na\xefve".encode("latin-1"))
    with pytest.raises(CorpusError, match="is not text: not UTF-8; convert it to UTF-8"):
        read_documents(str(path))


def test_a_text_file_without_a_suffix_alone_is_read(tmp_path):
    path = write(tmp_path / "copyright", "some license text\n")
    docs, _, stats = read_documents(str(path))
    assert docs == ["some license text\n"] and stats.read == {"text": 1} and not stats.skipped


def test_a_gzip_file_alone_is_read(tmp_path):
    path = write(tmp_path / "changelog.gz", gzip.compress("élan text".encode()))
    assert read_documents(str(path)).documents == ["élan text"]


def test_a_directory_without_text_is_refused(tmp_path):
    write(tmp_path / "d" / "a.bin", b"\x00\x01\x02")
    write(tmp_path / "d" / "b.txt", b"\x00 text-named binary")
    write(tmp_path / "d" / ".git" / "HEAD", "ref: refs/heads/main")  # text, but in a skipped directory
    with pytest.raises(CorpusError) as e:
        read_documents(str(tmp_path / "d"))
    message = str(e.value)
    assert "has no text files" in message and "skipped 2: 2 binary (NUL bytes)" in message
    assert "give a UTF-8 text file" in message


def test_links_unreadable_entries_and_fifos_are_skipped_not_fatal(tmp_path):
    root = tmp_path / "d"
    real = write(root / "a.txt", "alpha text")
    (root / "link.txt").symlink_to(real)  # the same file twice: read once
    (root / "dangling.txt").symlink_to(root / "missing.txt")
    (root / "loop").symlink_to(root)  # a directory symlink loop must not be followed
    os.mkfifo(root / "pipe")  # opening it would block
    docs, _, stats = read_documents(str(root))
    assert docs == ["alpha text"]
    assert stats.read == {"text": 1}
    assert stats.skipped == {"duplicate (same file linked twice)": 1, "unreadable (No such file or directory)": 1,
                             "not a regular file": 1}


def test_a_symlink_to_a_text_file_is_read(tmp_path):
    real = write(tmp_path / "real" / "notes", "linked text")
    write(tmp_path / "d" / "own.txt", "own text")
    (tmp_path / "d" / "z-link").symlink_to(real)
    assert read_documents(str(tmp_path / "d")).documents == ["own text", "linked text"]


@pytest.mark.skipif(as_root, reason="root can read a file of mode 000")
def test_permission_denied_is_skipped_in_a_directory_and_fatal_alone(tmp_path):
    write(tmp_path / "d" / "a.txt", "alpha text")
    secret = write(tmp_path / "d" / "secret.txt", "hidden text")
    secret.chmod(0)
    try:
        docs, _, stats = read_documents(str(tmp_path / "d"))
        assert docs == ["alpha text"] and stats.skipped == {"unreadable (Permission denied)": 1}
        with pytest.raises(CorpusError, match="cannot read corpus file .*secret.txt: Permission denied"):
            read_documents(str(secret))
    finally:
        secret.chmod(0o644)


def test_jsonl_alone_and_in_a_directory(tmp_path):
    lines = [json.dumps({"text": t}) for t in ("one", "  ", "two")]
    jsonl = write(tmp_path / "d" / "data.jsonl", "\n".join(lines) + "\n")
    write(tmp_path / "d" / "z.txt", "three")
    docs, _, stats = read_documents(str(jsonl))
    assert docs == ["one", "two"] and stats.read == {"JSONL": 1}
    docs, _, stats = read_documents(str(tmp_path / "d"))
    assert docs == ["one", "two", "three"] and stats.read == {"JSONL": 1, "text": 1}
    write(tmp_path / "d" / "bad.jsonl", '{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(CorpusError, match=r'bad.jsonl:2: each line must be a JSON object with a string "text"'):
        read_documents(str(tmp_path / "d"))


def test_max_chars_stops_reading_and_says_so(doc_tree):
    docs, _, stats = read_documents(str(doc_tree), max_chars=25)
    assert docs == ["other changelog text", "# new"]
    assert stats.capped_at == 25 and str(stats).endswith("stopped at the 25-character cap")
