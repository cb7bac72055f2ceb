"""Fill-in-the-middle packing: StarCoder's PSM/SPM layout at the character level, about half the files."""

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from stablecode.data import DataError
from stablecode.data.packing import FimSettings, PackedTokens, encode_document, pack
from stablecode.data.starcoder import DataMix, iter_documents
from stablecode.tokenizer import Tokenizer

PYTHON = DataMix(("python",))


def test_segments_are_a_deterministic_partition_of_the_text():
    fim = FimSettings(rate=1.0, spm_rate=0.5, seed=3)
    text = "def f(x):\n    return x * 2\n" * 5
    segments = fim.segments("repo/a.py", text)
    assert segments == fim.segments("repo/a.py", text)  # same key, same draw
    [(prefix, middle, suffix, _)] = segments  # a short file is one piece
    assert prefix + middle + suffix == text
    assert FimSettings(rate=0.0).segments("repo/a.py", text) is None
    draws = [FimSettings(rate=0.5, seed=1).segments(f"k{i}", text) for i in range(2000)]
    rearranged = [d[0] for d in draws if d is not None]
    assert 0.45 < len(rearranged) / len(draws) < 0.55
    spm = sum(d[3] for d in rearranged) / len(rearranged)
    assert 0.43 < spm < 0.57


def test_a_long_file_is_rearranged_piece_by_piece_so_each_piece_fits_a_window():
    lines = [f"def f{i}(x):\n    return x + {i}\n\n" for i in range(400)]
    text = "".join(lines)
    fim = FimSettings(rate=0.5, seed=7, piece_chars=300)
    segments = fim.segments("repo/long.py", text)
    rebuilt, pieces = "", 0
    for segment in segments:
        if isinstance(segment, str):
            rebuilt += segment
            continue
        prefix, middle, suffix, _ = segment
        piece = prefix + middle + suffix
        assert len(piece) <= 300 and (piece.endswith("\n") or rebuilt + piece == text)
        rebuilt += piece
        pieces += 1
    assert rebuilt == text
    total = -(-len(text) // 300)  # at least this many pieces
    assert 0.3 * total < pieces < 0.8 * total
    assert not any(isinstance(a, str) and isinstance(b, str) for a, b in zip(segments, segments[1:]))  # plain runs merged


def test_a_line_longer_than_a_piece_is_cut_inside():
    fim = FimSettings(rate=1.0, piece_chars=10)
    segments = fim.segments("k", "x" * 25)
    assert ["".join(s[:3]) for s in segments] == ["x" * 10, "x" * 10, "x" * 5]


def test_pack_rearranges_about_half_the_training_files_and_no_validation_file(python_corpus, corpus_tokenizer,
                                                                              tmp_path):
    out = tmp_path / "pack"
    index = pack(python_corpus, corpus_tokenizer, 16, out, validation_fraction=0.25, workers=1, mix=PYTHON,
                 fim=FimSettings(rate=0.5, seed=0))
    assert index["fim"] == {"rate": 0.5, "spm_rate": 0.5, "seed": 0, "piece_chars": 1024}
    train, validation = PackedTokens(out, "train"), PackedTokens(out, "validation")
    train_stream = train.tokens(0, train.num_tokens)
    documents_in_train = int((train_stream == 0).sum())
    rearranged = int((train_stream == 1).sum())  # one <fim_prefix> per rearranged document
    assert int((train_stream == 2).sum()) == int((train_stream == 3).sum()) == rearranged
    assert 0.2 < rearranged / documents_in_train < 0.8
    assert not np.isin(validation.tokens(0, validation.num_tokens), [1, 2, 3]).any()
    # and the decoded text of the training split holds every training file's characters
    hf = HFTokenizer.from_file(str(corpus_tokenizer))
    decoded = hf.decode(train_stream.tolist(), skip_special_tokens=True)
    docs = [d for b in iter_documents(python_corpus, PYTHON, split="train", validation_fraction=0.25) for d in b]
    assert len(decoded) == sum(len(d.content) for d in docs)


def test_fim_needs_the_sentinel_tokens(python_corpus, tmp_path):
    plain = HFTokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]"))
    path = tmp_path / "plain.json"
    plain.save(str(path))
    with pytest.raises(DataError, match="<fim_prefix>"):
        pack(python_corpus, path, 16, tmp_path / "pack", workers=1, mix=PYTHON, fim=FimSettings(rate=0.5))


def test_bad_rates():
    with pytest.raises(ValueError):
        FimSettings(rate=1.5)
    with pytest.raises(ValueError):
        FimSettings(rate=0.5, piece_chars=0)
