"""`stablecode tokenizer train`: StarCoder-style construction, special ids, round trip, training split only."""

import json

import pytest

from stablecode.cli import main
from stablecode.data import DataError
from stablecode.data.sources import from_dir
from stablecode.data.starcoder import DataMix, is_validation
from stablecode.data.tokenizer_train import STARCODER_SPECIAL_TOKENS, train_tokenizer
from stablecode.tokenizer import load_tokenizer

SAMPLES = [
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "\tindented_with_tab = {'key': [1, 2, 3]}\r\nwindows_line = True\r\n",
    "# héllo wörld — ünïcode ✓ 日本語 😀 \u200b zero-width\nprint('emoji 🐍', 3.14159)\n",
    "x = 1234567890\n   \n\n\n    trailing spaces   \n",
    "fn main() { println!(\"{}\", 42); }  // rust\n<?php echo 'php'; ?>\n",
    "",
    " leading space and \\backslash \"quotes\" `ticks` ~^%$#@!\n",
]


def test_construction_special_ids_and_round_trip(python_corpus, corpus_tokenizer):
    tok = load_tokenizer(corpus_tokenizer)
    assert tok.vocab_size == 400 and tok.eos_id == 0
    assert [tok.backend.token_to_id(t) for t in STARCODER_SPECIAL_TOKENS] == list(range(19))
    assert tok.special_ids == frozenset(range(19))
    assert tok.backend.token_to_id("<fim_prefix>") == 1 and tok.backend.token_to_id("<reponame>") == 18
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    # individual digits, byte-level with no prefix space
    assert [tok.token_text(i) for i in tok.encode("12345")] == ["1", "2", "3", "4", "5"]
    assert tok.token_text(tok.encode("def")[0]).startswith("d")
    config = json.loads(corpus_tokenizer.read_text())
    assert config["normalizer"] is None
    assert [p["type"] for p in config["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert config["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] is False
    assert config["decoder"]["type"] == "ByteLevel"
    # learnt from the corpus: its frequent identifiers are few tokens
    assert len(tok.encode("    def describe(self):\n")) <= len("    def describe(self):\n") / 2


def test_trained_on_the_training_split_only(tmp_path, write_tree, python_module):
    # A file of one rare word repeated: BPE learns it as a single token only if it reads the file.
    marker = "zqxjvwkp"
    names = [f"m{i}.py" for i in range(200)]
    held_out_name = next(n for n in names if is_validation(n, 0.5))
    files = {f"m{i}.py": python_module(i) for i in range(8)}
    files[held_out_name] = f"{marker} = '{marker}'\n" * 300
    tree = write_tree(tmp_path / "tree", files)
    from_dir(tree, tmp_path / "corpus", languages=["python"])

    train_tokenizer(tmp_path / "corpus", tmp_path / "seen.json", vocab_size=350, validation_fraction=0.0)
    train_tokenizer(tmp_path / "corpus", tmp_path / "held.json", vocab_size=350, validation_fraction=0.5)
    seen, held = load_tokenizer(tmp_path / "seen.json"), load_tokenizer(tmp_path / "held.json")
    assert len(seen.encode(marker)) == 1
    assert len(held.encode(marker)) >= 4


def test_errors(tmp_path, python_corpus):
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer(python_corpus, tmp_path / "t.json", vocab_size=400, mix=DataMix(("java",)))
    with pytest.raises(DataError, match="no such data directory"):
        train_tokenizer(tmp_path / "missing", tmp_path / "t.json")
    with pytest.raises(ValueError, match="at least 275"):
        train_tokenizer(python_corpus, tmp_path / "t.json", vocab_size=100)
    bad = python_corpus / "python" / "train-00000-of-00001.parquet"
    data = bytearray(bad.read_bytes())
    data[60:200] = b"\xab" * 140  # data pages, footer intact: fails while the trainer reads it
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-00000-of-00001.parquet: not a readable parquet file"):
        train_tokenizer(python_corpus, tmp_path / "t.json", vocab_size=400)
    assert not (tmp_path / "t.json").exists()


def test_cli_tokenizer_train(python_corpus, tmp_path, capsys):
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", str(python_corpus), "--vocab-size", "300", "--out", str(out),
                 "--languages", "python"]) == 0
    assert load_tokenizer(out).vocab_size == 300
    assert main(["tokenizer", "train", "--data", str(python_corpus), "--vocab-size", "10", "--out", str(out)]) == 2
    assert "vocab size must be at least" in capsys.readouterr().err
