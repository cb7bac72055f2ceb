"""Tokenizer conformance (StarCoder vocabulary vectors), special tokens, streaming detokenization."""

import pytest

from stablecode import load_tokenizer
from stablecode.errors import TokenizerError
from stablecode.tokenizer import IncrementalDecoder, Tokenizer

SEPARATOR = "\n__ggml_vocab_test__\n"


def read_vectors(directory):
    """llama.cpp's format: strings joined by SEPARATOR (the file ends with one, so the last string is
    empty), and line N of vectors.out holds the space-separated ids of string N."""
    strings = (directory / "vectors.inp").read_text(encoding="utf-8").split(SEPARATOR)
    ids = [[int(i) for i in line.split()] for line in (directory / "vectors.out").read_text().split("\n")]
    assert len(strings) == len(ids)
    return list(zip(strings, ids))


def test_starcoder_vectors_encode_exactly(starcoder_tokenizer_dir):
    tokenizer = load_tokenizer(starcoder_tokenizer_dir / "tokenizer.json")
    vectors = read_vectors(starcoder_tokenizer_dir)
    assert len(vectors) == 47
    assert sum(bool(text) for text, _ in vectors) >= 45  # real strings, not an artefact of the split
    failures = [(text, tokenizer.encode(text), expected) for text, expected in vectors
                if tokenizer.encode(text) != expected]
    assert not failures
    # And every one decodes back to its text.
    assert all(tokenizer.decode(expected) == text for text, expected in vectors)


def test_starcoder_special_tokens(starcoder_tokenizer_dir):
    tokenizer = load_tokenizer(starcoder_tokenizer_dir)  # a directory works too
    assert tokenizer.eos_id == 0 and len(tokenizer) == 49152
    assert {0, 1, 2, 3, 4} <= tokenizer.special_ids
    ids = tokenizer.encode("<fim_prefix>def f():<fim_suffix>\n<fim_middle>")
    assert ids[0] == 1 and 0 not in ids
    assert tokenizer.decode(ids + [0]) == "def f():\n"  # specials never printed
    assert tokenizer.token_text(0) == "<|endoftext|>"


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids]
    return pieces + [decoder.flush()]


MULTIBYTE = "def grüße():\n    return '日本語 ✓ 🦙🚀 ключ ឆ្ងាយ'  # naïve\n"


def test_streaming_never_breaks_a_character_starcoder(starcoder_tokenizer_dir):
    tokenizer = load_tokenizer(starcoder_tokenizer_dir)
    ids = tokenizer.encode(MULTIBYTE)
    # The test means something only if some tokens hold part of a character.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)


def byte_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (byte-level BPE's base alphabet): every multi-byte character split."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet(), key=lambda c: ord(c))
    byte_to_char = {}
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    n = 0
    for b in range(256):  # GPT-2's bytes_to_unicode
        byte_to_char[b] = chr(b) if b in printable else chr(256 + n)
        n += b not in printable
    assert set(byte_to_char.values()) == set(alphabet)
    return [tokenizer.backend.token_to_id(byte_to_char[b]) for b in text.encode("utf-8")]


def test_streaming_bytes_one_at_a_time(byte_tokenizer_file):
    tokenizer = load_tokenizer(byte_tokenizer_file)
    text = "ü 日本語 ✓ 🦙x"
    ids = byte_ids(tokenizer, text)
    assert len(ids) == len(text.encode("utf-8")) and None not in ids
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # Pieces come out as soon as a character completes: 🦙 (4 bytes) appears on its 4th byte.
    llama_end = len("ü 日本語 ✓ 🦙".encode("utf-8"))
    assert pieces[llama_end - 1].endswith("🦙") and all(p == "" for p in pieces[llama_end - 4:llama_end - 1])


def test_invalid_bytes_are_shown_not_dropped(byte_tokenizer_file):
    tokenizer = load_tokenizer(byte_tokenizer_file)
    lone = byte_ids(tokenizer, "日")[:1]  # a lead byte that never completes
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.add(lone[0]) == ""
    assert decoder.add(tokenizer.encode("a")[0]) == "\ufffda"
    decoder = IncrementalDecoder(tokenizer)
    decoder.add(lone[0])
    assert decoder.flush() == "\ufffd"  # the end of generation shows what is left


def test_round_trip_code(byte_tokenizer_file):
    tokenizer = load_tokenizer(byte_tokenizer_file)
    code = "class Foo:\n    def __init__(self):\n        self.x = 10  # héllo\n\t\n"
    assert tokenizer.decode(tokenizer.encode(code)) == code
    assert tokenizer.encode_batch([code, "x"]) == [tokenizer.encode(code), tokenizer.encode("x")]
    assert "".join(stream(tokenizer, tokenizer.encode(code))) == code


def test_missing_or_invalid_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
