"""Streaming reader of starcoderdata-layout folders, the language mix, and the split by file.

The layout (bigcode/starcoderdata): one folder per language, each holding parquet files
(`python/train-00000-of-00059.parquet`, ...) with at least the columns `content`,
`max_stars_repo_name`, `max_stars_repo_path`, `max_stars_count` and `id`. Files are read one
record batch at a time with `pyarrow.parquet.ParquetFile.iter_batches`, so memory stays bounded
by the batch size whatever the size of the dataset.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from stablecode.data import DataError

# StableCode-Completion-Alpha-3B's first training stage (starcoderdata folder names).
STAGE1_LANGUAGES = ("java", "javascript", "python", "typescript", "php", "sql", "rust", "c", "markdown", "go",
                    "cpp", "shell")
# Other spellings users type, mapped to starcoderdata's folder names.
LANGUAGE_ALIASES = {"c++": "cpp", "c#": "c-sharp", "csharp": "c-sharp", "js": "javascript", "ts": "typescript",
                    "py": "python", "bash": "shell", "sh": "shell", "md": "markdown", "rs": "rust"}
SPLITS = ("train", "validation")


def canonical_language(name: str) -> str:
    """starcoderdata's folder name for a language (`c++` → `cpp`), lower-cased."""
    name = name.strip().lower()
    return LANGUAGE_ALIASES.get(name, name)


def unit_interval_hash(key: str, salt: str) -> float:
    """A deterministic number in [0, 1) for `key`: the same on every machine, run and Python version."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def is_validation(key: str, validation_fraction: float) -> bool:
    """Whether the file with this key is held out. Nested: a file held out at fraction f stays held
    out at any larger fraction, so a tokenizer trained at 0.02 never saw the files packed as
    validation at 0.02 (or more)."""
    return unit_interval_hash(key, "validation") < validation_fraction


@dataclass(frozen=True)
class DataMix:
    """Which language folders to read and how much of each.

    A language's weight is how many times each of its training files is used per pass: 1 takes every
    file once, 0.25 a fixed quarter of the files (chosen by a hash of the file key), 2 every file
    twice. Held-out (validation) files are always used exactly once.
    """

    languages: tuple[str, ...] = STAGE1_LANGUAGES
    weights: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        languages = tuple(dict.fromkeys(canonical_language(name) for name in self.languages))
        if not languages:
            raise ValueError("the data mix names no language")
        weights = {canonical_language(name): float(w) for name, w in dict(self.weights).items()}
        for name, w in weights.items():
            if name not in languages:
                raise ValueError(f"weight given for {name!r}, which is not among the mix's languages {list(languages)}")
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {w}")
        object.__setattr__(self, "languages", languages)
        object.__setattr__(self, "weights", weights)

    @classmethod
    def parse(cls, specs: list[str] | None) -> "DataMix":
        """From command-line entries `LANG` or `LANG=WEIGHT` (None or [] → StableCode's stage-1 mix)."""
        if not specs:
            return cls()
        languages, weights = [], {}
        for spec in specs:
            for item in spec.split(","):
                if not item.strip():
                    continue
                name, _, weight = item.partition("=")
                languages.append(name)
                if weight:
                    try:
                        weights[name] = float(weight)
                    except ValueError:
                        raise ValueError(f"--languages {item!r}: the weight after '=' must be a number") from None
        return cls(tuple(languages), weights)

    def weight(self, language: str) -> float:
        return self.weights.get(language, 1.0)

    def copies(self, language: str, key: str) -> int:
        """How many times the training file `key` of `language` is used (see the class docstring)."""
        w = self.weight(language)
        whole = math.floor(w)
        return whole + (1 if unit_interval_hash(key, "mix") < w - whole else 0)

    def to_json(self) -> dict:
        return {"languages": list(self.languages), "weights": {name: self.weight(name) for name in self.languages}}


class Document(NamedTuple):
    language: str
    key: str  # the file's identity for the split: the `id` column, else repo name + path
    content: str


def open_parquet(path: Path) -> pq.ParquetFile:
    """Open a parquet file, or raise DataError naming it."""
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def language_files(data_dir: str | Path, mix: DataMix) -> dict[str, list[Path]]:
    """The parquet files of each language of the mix that `data_dir` holds, sorted by name.

    Languages of the mix without a folder are left out of the result (the caller reports them); a
    directory holding none of them is an error.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data directory")
    found = {}
    for language in mix.languages:
        files = sorted((data_dir / language).glob("*.parquet"))
        if files:
            found[language] = files
    if not found:
        present = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
        raise DataError(f"{data_dir}: empty corpus: no parquet files for any of {list(mix.languages)} "
                        f"(language folders present: {present or 'none'}); build one with `stablecode data from-dir`")
    return found


def _key_columns(path: Path, schema: pa.Schema) -> list[str]:
    names = set(schema.names)
    if "content" not in names:
        raise DataError(f"{path}: no 'content' column (columns: {schema.names}); not a starcoderdata-layout file")
    if "id" in names:
        return ["id"]
    if {"max_stars_repo_name", "max_stars_repo_path"} <= names:
        return ["max_stars_repo_name", "max_stars_repo_path"]
    raise DataError(f"{path}: neither an 'id' column nor 'max_stars_repo_name' + 'max_stars_repo_path' "
                    "to identify files by")


def iter_file_documents(path: Path, language: str, row_groups: list[int] | None = None,
                        batch_size: int = 256) -> Iterator[list[Document]]:
    """Documents of one parquet file (optionally only some row groups), a record batch at a time."""
    parquet = open_parquet(path)
    key_columns = _key_columns(path, parquet.schema_arrow)
    try:
        for batch in parquet.iter_batches(batch_size=batch_size, row_groups=row_groups,
                                          columns=["content", *key_columns]):
            contents = batch.column("content").to_pylist()
            keys = [batch.column(c).to_pylist() for c in key_columns]
            docs = []
            for i, content in enumerate(contents):
                if content is None:
                    continue
                key = "/".join(str(k[i]) for k in keys)
                docs.append(Document(language, key, content))
            yield docs
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def iter_documents(data_dir: str | Path, mix: DataMix | None = None, split: str | None = None,
                   validation_fraction: float = 0.0, batch_size: int = 256) -> Iterator[list[Document]]:
    """Stream the documents of a starcoderdata-layout folder in batches, language by language.

    `split=None` yields every file once; "validation" the held-out files (once each); "train" the
    others, each as many times as the mix's weight says.
    """
    mix = mix or DataMix()
    if split not in (None, *SPLITS):
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    for language, files in language_files(data_dir, mix).items():
        for path in files:
            for docs in iter_file_documents(path, language, batch_size=batch_size):
                if split is None:
                    yield docs
                elif split == "validation":
                    yield [d for d in docs if is_validation(d.key, validation_fraction)]
                else:
                    yield [d for d in docs if not is_validation(d.key, validation_fraction)
                           for _ in range(mix.copies(language, d.key))]
