import numpy as np
import pytest

from hivefold.errors import ConfigError
from hivefold.tokenizer import ByteTokenizer, get_tokenizer


def test_byte_tokenizer_roundtrips_unicode():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and ids.max() < 256
    assert len(ids) == len(text.encode())
    assert tok.decode(ids) == text


def test_decode_drops_end_of_text():
    tok = ByteTokenizer()
    assert tok.decode([104, 105, tok.eot_id, 33]) == "hi!"
    assert tok.vocab_size == tok.eot_id + 1


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown tokenizer 'bpe9'.*bytes"):
        get_tokenizer("bpe9")
