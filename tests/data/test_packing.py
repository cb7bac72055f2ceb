"""`stablecode data pack` and `PackedTokens`: contents, split by file, parallelism, resumption, errors."""

import json
import pickle

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from stablecode.cli import main
from stablecode.data import DataError
from stablecode.data import packing
from stablecode.data.packing import PackedTokens, pack, token_dtype
from stablecode.data.starcoder import DataMix, is_validation, iter_documents

PYTHON = DataMix(("python",))


def reference_ids(tokenizer_path, texts):
    """Each text tokenized on its own (special-token strings as plain text), each followed by EOS."""
    tok = HFTokenizer.from_file(str(tokenizer_path))
    tok.encode_special_tokens = True
    eos = tok.token_to_id("<|endoftext|>")
    ids = []
    for text in texts:
        ids += tok.encode(text, add_special_tokens=False).ids + [eos]
    return ids


def stream_of(ds):
    """The token stream the sequences were cut from: the first sequence, then each next one minus its overlap."""
    parts = [ds[0]] + [ds[i][1:] for i in range(1, len(ds))]
    return np.concatenate(parts)


def documents(corpus, split=None, fraction=0.0, mix=PYTHON):
    return [d for batch in iter_documents(corpus, mix, split=split, validation_fraction=fraction) for d in batch]


def shard_bytes(pack_dir):
    return {p.relative_to(pack_dir).as_posix(): p.read_bytes() for p in sorted(pack_dir.glob("*/*.bin"))}


def test_sequences_concatenate_to_eos_joined_documents(python_corpus, corpus_tokenizer, tmp_path):
    out = tmp_path / "pack"
    index = pack(python_corpus, corpus_tokenizer, 16, out, validation_fraction=0.0, workers=1, mix=PYTHON,
                 unit_bytes=1)
    ds = PackedTokens(out, "train")
    docs = documents(python_corpus)
    expected = reference_ids(corpus_tokenizer, [d.content for d in docs])
    assert ds.seq_len == 16 and ds.vocab_size == 400 and ds.num_tokens == len(expected)
    assert len(ds) == (len(expected) - 1) // 16 == index["splits"]["train"]["num_sequences"]
    assert all(ds[i].shape == (17,) and ds[i].dtype == np.uint16 for i in range(len(ds)))
    assert all(ds[i][-1] == ds[i + 1][0] for i in range(len(ds) - 1))  # stride seq_len: one shared token
    stream = stream_of(ds)
    assert stream.tolist() == expected[:len(stream)]
    assert len(expected) - len(stream) < 16  # only the last partial window is unused
    # one EOS per document: the literal "<|endoftext|>" inside lib/special.py is text, not a boundary
    assert int((ds.tokens(0, ds.num_tokens) == 0).sum()) == len(docs) == index["splits"]["train"]["num_documents"]
    assert index["splits"]["validation"]["num_tokens"] == 0 and len(PackedTokens(out, "validation")) == 0
    assert len(index["splits"]["train"]["shards"]) > 5  # many units: the corpus has many row groups
    assert (out / "tokenizer.json").read_bytes() == corpus_tokenizer.read_bytes()


def test_validation_split_by_file_without_leakage(python_corpus, corpus_tokenizer, tmp_path):
    out = tmp_path / "pack"
    index = pack(python_corpus, corpus_tokenizer, 8, out, validation_fraction=0.3, workers=1, mix=PYTHON,
                 unit_bytes=1)
    tok = HFTokenizer.from_file(str(corpus_tokenizer))

    def texts(split):
        ds = PackedTokens(out, split)
        stream = ds.tokens(0, ds.num_tokens).tolist()
        pieces, start = [], 0
        for i, t in enumerate(stream):
            if t == 0:
                pieces.append(tok.decode(stream[start:i], skip_special_tokens=False))
                start = i + 1
        return pieces

    train, validation = texts("train"), texts("validation")
    all_docs = documents(python_corpus)
    held_out = [d for d in all_docs if is_validation(d.key, 0.3)]
    assert 3 <= len(held_out) <= 25
    assert sorted(validation) == sorted(d.content for d in held_out)
    assert sorted(train) == sorted(d.content for d in all_docs if not is_validation(d.key, 0.3))
    assert not set(train) & set(validation)
    listed = (out / "validation_files.tsv").read_text().splitlines()
    assert sorted(listed) == sorted(f"python\t{d.key}" for d in held_out)
    assert index["splits"]["validation"]["num_files"] == len(held_out)


def test_two_worker_processes_give_the_same_shards(python_corpus, corpus_tokenizer, tmp_path):
    pack(python_corpus, corpus_tokenizer, 16, tmp_path / "one", workers=1, mix=PYTHON, unit_bytes=1)
    pack(python_corpus, corpus_tokenizer, 16, tmp_path / "two", workers=2, mix=PYTHON, unit_bytes=1)
    one, two = shard_bytes(tmp_path / "one"), shard_bytes(tmp_path / "two")
    assert len(one) > 10 and one == two
    index_one = json.loads((tmp_path / "one" / "index.json").read_text())
    index_two = json.loads((tmp_path / "two" / "index.json").read_text())
    assert index_one["splits"] == index_two["splits"]


def test_interrupted_pack_resumes_to_identical_shards(python_corpus, corpus_tokenizer, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    pack(python_corpus, corpus_tokenizer, 16, reference, workers=1, mix=PYTHON, unit_bytes=1)

    out = tmp_path / "pack"
    real_pack_unit = packing.pack_unit
    calls = []

    def dies_on_the_fourth_unit(*args):
        calls.append(args[0].name)
        if len(calls) == 4:
            # killed mid-unit: a half-written temporary file is all it leaves
            (out / "train" / f".{args[0].name}.bin.999.tmp").write_bytes(b"\x01\x02\x03")
            raise KeyboardInterrupt
        return real_pack_unit(*args)

    monkeypatch.setattr(packing, "pack_unit", dies_on_the_fourth_unit)
    with pytest.raises(KeyboardInterrupt):
        pack(python_corpus, corpus_tokenizer, 16, out, workers=1, mix=PYTHON, unit_bytes=1)
    assert len(list((out / "units").glob("*.json"))) == 3
    with pytest.raises(DataError, match="not a finished pack"):
        PackedTokens(out)

    monkeypatch.setattr(packing, "pack_unit", real_pack_unit)
    redone = []
    monkeypatch.setattr(packing, "pack_unit", lambda *args: redone.append(args[0].name) or real_pack_unit(*args))
    pack(python_corpus, corpus_tokenizer, 16, out, workers=1, mix=PYTHON, unit_bytes=1)
    assert calls[3] == redone[0] and not set(calls[:3]) & set(redone)  # only the unfinished units ran again
    assert shard_bytes(out) == shard_bytes(reference)
    assert not list(out.glob("*/.*.tmp"))
    a, b = PackedTokens(out), PackedTokens(reference)
    assert len(a) == len(b) and all((a[i] == b[i]).all() for i in range(len(a)))


def test_other_settings_refused_and_new_seq_len_reuses_shards(python_corpus, corpus_tokenizer, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "pack"
    pack(python_corpus, corpus_tokenizer, 16, out, workers=1, mix=PYTHON)
    with pytest.raises(DataError, match="other settings.*validation_fraction"):
        pack(python_corpus, corpus_tokenizer, 16, out, validation_fraction=0.5, workers=1, mix=PYTHON)

    def must_not_run(*args):
        raise AssertionError("a finished unit was tokenized again")

    monkeypatch.setattr(packing, "pack_unit", must_not_run)
    pack(python_corpus, corpus_tokenizer, 32, out, workers=1, mix=PYTHON)
    ds = PackedTokens(out)
    assert ds.seq_len == 32 and ds[0].shape == (33,)

    not_a_pack = tmp_path / "other"
    not_a_pack.mkdir()
    (not_a_pack / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a pack directory"):
        pack(python_corpus, corpus_tokenizer, 16, not_a_pack, workers=1, mix=PYTHON)


def test_weights_repeat_documents_in_training_only(python_corpus, corpus_tokenizer, tmp_path):
    once = pack(python_corpus, corpus_tokenizer, 16, tmp_path / "once", validation_fraction=0.2, workers=1,
                mix=PYTHON)
    twice = pack(python_corpus, corpus_tokenizer, 16, tmp_path / "twice", validation_fraction=0.2, workers=1,
                 mix=DataMix(("python",), {"python": 2}))
    assert twice["splits"]["train"]["num_tokens"] == 2 * once["splits"]["train"]["num_tokens"]
    assert twice["splits"]["validation"]["num_tokens"] == once["splits"]["validation"]["num_tokens"] > 0


def test_errors(python_corpus, corpus_tokenizer, tmp_path):
    with pytest.raises(DataError, match="corpus too small"):
        pack(python_corpus, corpus_tokenizer, 10_000_000, tmp_path / "big", workers=1, mix=PYTHON)
    with pytest.raises(DataError, match="empty corpus"):
        pack(python_corpus, corpus_tokenizer, 16, tmp_path / "java", workers=1, mix=DataMix(("java",)))
    with pytest.raises(ValueError, match="seq_len"):
        pack(python_corpus, corpus_tokenizer, 0, tmp_path / "zero", workers=1)

    out = tmp_path / "pack"
    pack(python_corpus, corpus_tokenizer, 16, out, workers=1, mix=PYTHON)
    with pytest.raises(DataError, match="no split 'test'"):
        PackedTokens(out, "test")
    shard = out / "train" / "u00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"u00000\.bin: .*bytes, index\.json says"):
        PackedTokens(out)

    bad = python_corpus / "python" / "train-00001-of-00002.parquet"
    bad.write_bytes(b"PAR1 but not really")
    with pytest.raises(DataError, match="train-00001-of-00002.parquet: not a readable parquet file"):
        pack(python_corpus, corpus_tokenizer, 16, tmp_path / "badfile", workers=1, mix=PYTHON)
    assert not (tmp_path / "badfile").exists()  # refused before writing anything


def test_packed_tokens_indexing_and_pickling(python_corpus, corpus_tokenizer, tmp_path):
    out = tmp_path / "pack"
    pack(python_corpus, corpus_tokenizer, 16, out, workers=1, mix=PYTHON, unit_bytes=1)
    ds = PackedTokens(out)
    assert (ds[-1] == ds[len(ds) - 1]).all()
    with pytest.raises(IndexError):
        ds[len(ds)]
    ds[0]  # maps the shards
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._maps is None  # each DataLoader worker maps its own
    assert all((copy[i] == ds[i]).all() for i in range(len(ds)))
    assert ds[3].flags.writeable  # a copy: torch.from_numpy accepts it


def test_token_dtype():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(100_000) == np.uint32


def test_cli_pack(python_corpus, corpus_tokenizer, tmp_path, capsys):
    out = tmp_path / "pack"
    assert main(["data", "pack", "--data", str(python_corpus), "--tokenizer", str(corpus_tokenizer), "--seq-len", "64",
                 "--out", str(out), "--validation-fraction", "0.1", "--workers", "1", "--languages", "python"]) == 0
    assert PackedTokens(out, "validation").seq_len == 64
    assert main(["data", "pack", "--data", str(python_corpus), "--tokenizer", str(tmp_path / "none.json"),
                 "--seq-len", "64", "--out", str(tmp_path / "x")]) == 2
    assert "tokenizer.json not found" in capsys.readouterr().err
