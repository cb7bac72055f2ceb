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


def test_split_is_a_deterministic_partition_of_the_text():
    fim = FimSettings(rate=1.0, spm_rate=0.5, seed=3)
    text = "def f(x):\n    return x * 2\n" * 5
    parts = fim.split("repo/a.py", text)
    assert parts == fim.split("repo/a.py", text)  # same key, same draw
    prefix, middle, suffix, _ = parts
    assert prefix + middle + suffix == text
    assert FimSettings(rate=0.0).split("repo/a.py", text) is None
    draws = [FimSettings(rate=0.5, seed=1).split(f"k{i}", text) for i in range(2000)]
    rearranged = [d for d in draws if d is not None]
    assert 0.45 < len(rearranged) / len(draws) < 0.55
    spm = sum(d[3] for d in rearranged) / len(rearranged)
    assert 0.43 < spm < 0.57


def test_psm_and_spm_token_layout(corpus_tokenizer):
    tok = Tokenizer.from_file(corpus_tokenizer)
    backend = tok.backend
    ids = {name: backend.token_to_id(name) for name in ("<fim_prefix>", "<fim_middle>", "<fim_suffix>")}
    assert ids == {"<fim_prefix>": 1, "<fim_middle>": 2, "<fim_suffix>": 3}  # StarCoder's ids

    def encode(texts):
        return [backend.encode(t, add_special_tokens=False).ids for t in texts]

    text = "import os\n\ndef size(path):\n    return os.stat(path).st_size\n"
    for seed in range(40):
        fim = FimSettings(rate=1.0, spm_rate=0.5, seed=seed)
        prefix, middle, suffix, spm = fim.split("k", text)
        got = encode_document("k", text, fim, (1, 2, 3), encode)
        p, m, s = encode([prefix, middle, suffix])
        if spm:
            assert got == [1, 3, *s, 2, *p, *m]
        else:
            assert got == [1, *p, 3, *s, 2, *m]
        # what the model learns to produce after <fim_middle> is the middle, then EOS follows in the pack
        assert backend.decode(got[got.index(2) + 1:]) == (prefix + middle if spm else middle)


def test_pack_rearranges_about_half_the_training_files_and_no_validation_file(python_corpus, corpus_tokenizer,
                                                                              tmp_path):
    out = tmp_path / "pack"
    index = pack(python_corpus, corpus_tokenizer, 16, out, validation_fraction=0.25, workers=1, mix=PYTHON,
                 fim=FimSettings(rate=0.5, seed=0))
    assert index["fim"] == {"rate": 0.5, "spm_rate": 0.5, "seed": 0}
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
