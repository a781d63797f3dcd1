import hashlib
import json

import numpy as np
import pytest

from hivefold.corpus import read_documents, stdlib_files
from hivefold.errors import CorpusError, IntegrityError
from hivefold.shards import VAL_FILENAME, build_shards, decode_shard, encode_shard, shard_filename
from hivefold.tokenizer import ByteTokenizer


def test_codec_roundtrip_and_integrity():
    arr = np.arange(2 * 9, dtype=np.uint16).reshape(2, 9)
    data = encode_shard(arr)
    sha = hashlib.sha256(data).hexdigest()
    assert np.array_equal(decode_shard(data, sha256=sha, seq_len=8, vocab_size=257), arr)
    corrupted = bytearray(data)
    corrupted[-1] ^= 0xFF
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        decode_shard(bytes(corrupted), sha256=sha, seq_len=8, vocab_size=257)
    with pytest.raises(IntegrityError, match="shape"):
        decode_shard(data, sha256=sha, seq_len=4, vocab_size=257)
    with pytest.raises(IntegrityError, match="vocab size"):
        decode_shard(data, sha256=sha, seq_len=8, vocab_size=10)


def test_codec_refuses_pickles():
    import io
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    data = buf.getvalue()
    with pytest.raises(IntegrityError, match="not a valid .npy"):
        decode_shard(data, sha256=hashlib.sha256(data).hexdigest(), seq_len=8, vocab_size=257)


def test_build_shards_splits_by_document(tmp_path):
    docs = [f"document number {i} " * 20 for i in range(40)]
    shards, val = build_shards(docs, ByteTokenizer(), seq_len=16, shard_sequences=10, val_fraction=0.1,
                               max_val_sequences=1000, seed=3, out_dir=tmp_path)
    assert len(shards) > 3 and val.num_sequences > 0
    assert [s.shard_id for s in shards] == list(range(len(shards)))
    assert all(s.num_sequences == 10 for s in shards[:-1])
    for s in shards:
        data = (tmp_path / shard_filename(s.shard_id)).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s.sha256 and len(data) == s.byte_size
        decode_shard(data, sha256=s.sha256, seq_len=16, vocab_size=257)
    val_data = (tmp_path / VAL_FILENAME).read_bytes()
    val_text = ByteTokenizer().decode(decode_shard(val_data, sha256=val.sha256, seq_len=16, vocab_size=257).ravel())
    train_text = "".join(ByteTokenizer().decode(
        decode_shard((tmp_path / shard_filename(s.shard_id)).read_bytes(), sha256=s.sha256, seq_len=16,
                     vocab_size=257).ravel()) for s in shards)
    held_out = {n for n in range(40) if f"number {n} " in val_text}
    assert held_out and not any(f"number {n} " in train_text for n in held_out)
    again, _ = build_shards(docs, ByteTokenizer(), seq_len=16, shard_sequences=10, val_fraction=0.1,
                            max_val_sequences=1000, seed=3, out_dir=tmp_path / "again")
    assert [s.sha256 for s in again] == [s.sha256 for s in shards]  # deterministic by seed


def test_too_small_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="corpus too small"):
        build_shards(["hi"], ByteTokenizer(), seq_len=64, shard_sequences=4, val_fraction=0.1,
                     max_val_sequences=10, seed=0, out_dir=tmp_path)


def test_corpus_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta text")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    docs = read_documents(str(tmp_path)).documents
    assert docs == ["alpha text", "beta text"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert read_documents(str(jsonl))[0] == ["one", "two"]
    assert read_documents(str(tmp_path / "a.txt"))[0] == ["alpha text"]


@pytest.mark.parametrize("content,match", [
    ("", "is empty"),
    ("   \n", "is empty"),
])
def test_empty_corpus(tmp_path, content, match):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(CorpusError, match=match):
        read_documents(str(path))


def test_bad_corpus_inputs(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_documents(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no text files"):
        read_documents(str(tmp_path / "empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: not valid JSON"):
        read_documents(str(bad))
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match='string "text" field'):
        read_documents(str(bad))


def test_stdlib_corpus_is_present_and_capped():
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    docs, description, _ = read_documents("stdlib", max_chars=50_000)
    assert sum(len(d) for d in docs) == 50_000 and description.startswith("stdlib:")
