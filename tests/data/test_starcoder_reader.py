"""Streaming reader of the starcoderdata layout, the language mix, and the split by file."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stablecode.data import DataError
from stablecode.data.starcoder import (STAGE1_LANGUAGES, DataMix, is_validation, iter_documents, iter_file_documents,
                                       language_files)


def write_starcoderdata(root, language, rows, name="train-00000-of-00001.parquet", row_group_size=3):
    """A parquet file with exactly starcoderdata's five columns."""
    table = pa.table({
        "max_stars_repo_path": [f"src/f{r}.x" for r in rows],
        "max_stars_repo_name": ["org/repo"] * len(rows),
        "max_stars_count": [10] * len(rows),
        "id": [str(r) for r in rows],
        "content": [f"content of file {r}\n" for r in rows],
    })
    (root / language).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / language / name, row_group_size=row_group_size)


def test_reads_starcoderdata_columns_in_bounded_batches(tmp_path):
    write_starcoderdata(tmp_path, "python", range(10))
    write_starcoderdata(tmp_path, "java", range(100, 105))
    write_starcoderdata(tmp_path, "haskell", range(200, 203))  # not in the default mix
    batches = list(iter_documents(tmp_path, DataMix(), batch_size=4))
    assert all(len(b) <= 4 for b in batches)
    docs = [d for b in batches for d in b]
    # languages in the mix's order (java before python), files and rows in order
    assert [(d.language, d.key) for d in docs] == [("java", str(r)) for r in range(100, 105)] + \
                                                  [("python", str(r)) for r in range(10)]
    assert docs[0].content == "content of file 100\n"
    assert set(language_files(tmp_path, DataMix()).keys()) == {"java", "python"}
    haskell = [d for b in iter_documents(tmp_path, DataMix(("haskell",))) for d in b]
    assert len(haskell) == 3


def test_only_some_row_groups(tmp_path):
    write_starcoderdata(tmp_path, "go", range(9), row_group_size=3)
    path = tmp_path / "go" / "train-00000-of-00001.parquet"
    docs = [d for b in iter_file_documents(path, "go", row_groups=[1]) for d in b]
    assert [d.key for d in docs] == ["3", "4", "5"]


def test_key_without_id_column(tmp_path):
    (tmp_path / "rust").mkdir()
    pq.write_table(pa.table({"content": ["fn main() {}\n"], "max_stars_repo_name": ["a/b"],
                             "max_stars_repo_path": ["src/main.rs"]}), tmp_path / "rust" / "x.parquet")
    docs = [d for b in iter_documents(tmp_path, DataMix(("rust",))) for d in b]
    assert docs[0].key == "a/b/src/main.rs"


def test_unreadable_parquet_names_the_file(tmp_path):
    write_starcoderdata(tmp_path, "python", range(4))
    bad = tmp_path / "python" / "train-00001-of-00002.parquet"
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"train-00001-of-00002\.parquet: not a readable parquet file"):
        for _ in iter_documents(tmp_path, DataMix(("python",))):
            pass


def test_truncated_parquet_names_the_file(tmp_path):
    write_starcoderdata(tmp_path, "c", range(30))
    path = tmp_path / "c" / "train-00000-of-00001.parquet"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=str(path)):
        list(iter_documents(tmp_path, DataMix(("c",))))


def test_parquet_without_content_column(tmp_path):
    (tmp_path / "sql").mkdir()
    pq.write_table(pa.table({"text": ["select 1"]}), tmp_path / "sql" / "a.parquet")
    with pytest.raises(DataError, match="no 'content' column"):
        list(iter_documents(tmp_path, DataMix(("sql",))))


def test_empty_or_missing_corpus(tmp_path):
    with pytest.raises(DataError, match="no such data directory"):
        list(iter_documents(tmp_path / "nope"))
    write_starcoderdata(tmp_path, "haskell", range(3))
    with pytest.raises(DataError, match=r"empty corpus.*language folders present: \['haskell'\]"):
        list(iter_documents(tmp_path))


def test_data_mix_defaults_parsing_and_validation():
    assert DataMix().languages == STAGE1_LANGUAGES
    assert "cpp" in STAGE1_LANGUAGES and len(STAGE1_LANGUAGES) == 12
    mix = DataMix.parse(["python", "c++=0.5", "Markdown=2"])
    assert mix.languages == ("python", "cpp", "markdown")
    assert (mix.weight("python"), mix.weight("cpp"), mix.weight("markdown")) == (1.0, 0.5, 2.0)
    assert DataMix.parse(["python,java=0"]).weight("java") == 0.0
    assert DataMix.parse(None) == DataMix()
    with pytest.raises(ValueError, match="must be a number"):
        DataMix.parse(["python=lots"])
    with pytest.raises(ValueError, match="finite number >= 0"):
        DataMix(("python",), {"python": -1})
    with pytest.raises(ValueError, match="not among"):
        DataMix(("python",), {"java": 1})


def test_weights_repeat_or_subsample_training_files(tmp_path):
    mix = DataMix(("python", "java", "go"), {"python": 2, "java": 0.25, "go": 0})
    keys = [str(i) for i in range(2000)]
    assert all(mix.copies("python", k) == 2 for k in keys)
    assert all(mix.copies("go", k) == 0 for k in keys)
    kept = sum(mix.copies("java", k) for k in keys)
    assert 400 < kept < 600  # a quarter, chosen by hash
    assert kept == sum(mix.copies("java", k) for k in keys)  # deterministic

    write_starcoderdata(tmp_path, "python", range(20))
    write_starcoderdata(tmp_path, "go", range(20))
    train = [d for b in iter_documents(tmp_path, mix, split="train", validation_fraction=0.2) for d in b]
    held = [d for b in iter_documents(tmp_path, mix, split="validation", validation_fraction=0.2) for d in b]
    assert not [d for d in train if d.language == "go"]
    held_python = {d.key for d in held if d.language == "python"}
    assert len([d for d in train if d.language == "python"]) == 2 * (20 - len(held_python))
    assert len([d for d in held if d.language == "go"]) == len({d.key for d in held if d.language == "go"})


def test_split_is_by_file_deterministic_and_nested():
    keys = [f"repo/file_{i}.py" for i in range(5000)]
    small = {k for k in keys if is_validation(k, 0.02)}
    large = {k for k in keys if is_validation(k, 0.10)}
    assert 50 < len(small) < 150 and 400 < len(large) < 600
    assert small <= large
    assert not any(is_validation(k, 0.0) for k in keys)


def test_corrupt_data_pages_name_the_file(tmp_path):
    """The footer is intact, so the file opens; the error comes while reading, and still names it."""
    (tmp_path / "php").mkdir()
    path = tmp_path / "php" / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"content": [f"<?php echo {i}; " * 20 for i in range(300)],
                             "id": [str(i) for i in range(300)]}), path, compression="zstd")
    data = bytearray(path.read_bytes())
    data[100:400] = b"\xab" * 300
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{path}: not a readable parquet file"):
        list(iter_documents(tmp_path, DataMix(("php",))))
