"""The on-disk layout of an attribution index, and reading it back with its integrity checked.

An index is one directory:

    manifest.json    format, window, stride, Bloom parameters, counts, and the size and SHA-256 of
                     every other file; its own `checksum` field is the SHA-256 of the rest of it
    hashes.npy       uint64 fingerprints of the sampled windows, sorted
    ordinals.npy     for each fingerprint, its window's number in build order (uint32 or uint64):
                     source = the last source whose `first_fingerprint` <= ordinal, and the window
                     starts at (ordinal - first_fingerprint) * stride in that source's normalised text
    bloom.npy        uint8 bit array: the membership filter consulted before the sorted table
    checkpoints.npy  uint32: for each source, the original offset of every `checkpoint_interval`-th
                     normalised character, so a match is checked by normalising only the part
                     of the source around it, not the whole file
    texts.bin        each source file's original text, zlib-compressed, back to back
    sources.parquet  one row per source: repository, path, license, id, language, stars,
                     text_offset, text_size (into texts.bin), chars, first_fingerprint,
                     first_checkpoint
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stablecode.errors import StablecodeError
from stablecode.extras import missing_extra_message

FORMAT = "stablecode-attribution-index"
VERSION = 1
MANIFEST = "manifest.json"
DATA_FILES = ("hashes.npy", "ordinals.npy", "bloom.npy", "checkpoints.npy", "texts.bin", "sources.parquet")
INDEX_DIR_NAME = "attribution-index"  # where a model directory keeps the index of its training corpus


class AttributionIndexError(StablecodeError):
    """A missing, corrupted, truncated or incompatible attribution index."""


def manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(directory: Path) -> dict:
    return {name: {"size": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
            for name in DATA_FILES}


@dataclass
class IndexData:
    """The arrays of an index, memory-mapped read-only."""
    directory: Path
    manifest: dict
    hashes: np.ndarray
    ordinals: np.ndarray
    bloom: np.ndarray
    texts: bytes | mmap.mmap
    sources: "pyarrow.Table"  # noqa: F821
    checkpoints: np.ndarray
    first_fingerprint: np.ndarray
    first_checkpoint: np.ndarray
    text_offset: np.ndarray
    text_size: np.ndarray

    @property
    def window(self) -> int:
        return self.manifest["window"]

    @property
    def stride(self) -> int:
        return self.manifest["stride"]

    @property
    def checkpoint_interval(self) -> int:
        return self.manifest["checkpoint_interval"]


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise AttributionIndexError(f"{directory}: not an attribution index (no {MANIFEST}); "
                                    "build one with `stablecode index build --data DIR --out INDEX`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AttributionIndexError(f"{path}: unreadable or corrupted index manifest ({e}); "
                                    "rebuild the index") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AttributionIndexError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise AttributionIndexError(f"{path}: the manifest fails its checksum (corrupted); rebuild the index")
    if manifest.get("version") != VERSION:
        raise AttributionIndexError(f"{path}: index format version {manifest.get('version')} is not supported "
                                    f"(this stablecode reads version {VERSION}); rebuild the index")
    return manifest


def require_pyarrow():
    """(pyarrow, pyarrow.parquet); an AttributionIndexError naming the extra where pyarrow is absent."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise AttributionIndexError(missing_extra_message(e, "attribution", "reading an attribution index")
                                    or str(e)) from None
    return pa, pq


def open_index(directory: str | os.PathLike, verify: bool = True, in_memory: bool = False) -> IndexData:
    """Open an index, checking every file's size and (with `verify`) its SHA-256 against the manifest.

    Files are memory-mapped, or with `in_memory` read whole: a long-running server must not touch
    mapped pages of a file someone rewrites in place (SIGBUS)."""
    pa, pq = require_pyarrow()

    directory = Path(directory)
    manifest = read_manifest(directory)
    for name in DATA_FILES:
        path = directory / name
        expected = manifest["files"][name]
        if not path.is_file():
            raise AttributionIndexError(f"{path}: missing from the index; rebuild the index")
        size = path.stat().st_size
        if size != expected["size"]:
            raise AttributionIndexError(f"{path}: {size} bytes where the manifest says {expected['size']} "
                                        "(truncated or replaced); rebuild the index")
        if verify and file_sha256(path) != expected["sha256"]:
            raise AttributionIndexError(f"{path}: contents fail the manifest's SHA-256 (corrupted); rebuild the index")

    def array(name: str, dtype, length: int) -> np.ndarray:
        try:
            values = np.load(directory / name, mmap_mode=None if in_memory else "r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise AttributionIndexError(f"{directory / name}: not a readable array ({e}); rebuild the index") from None
        if values.dtype != dtype or values.shape != (length,):
            raise AttributionIndexError(f"{directory / name}: {values.dtype}{list(values.shape)} where "
                                        f"{np.dtype(dtype)}[{length}] was expected; rebuild the index")
        return np.asarray(values)  # a plain view of the mapping: np.memmap's indexing costs more per call

    counts = manifest["counts"]
    hashes = array("hashes.npy", np.uint64, counts["fingerprints"])
    ordinals = array("ordinals.npy", np.dtype(manifest["ordinal_dtype"]), counts["fingerprints"])
    bloom = array("bloom.npy", np.uint8, manifest["bloom"]["bits"] // 8)
    checkpoints = array("checkpoints.npy", np.uint32, counts["checkpoints"])
    try:
        sources = pq.read_table(directory / "sources.parquet")
    except (pa.ArrowException, OSError) as e:
        raise AttributionIndexError(f"{directory / 'sources.parquet'}: unreadable ({e}); rebuild the index") from None
    if sources.num_rows != counts["sources"]:
        raise AttributionIndexError(f"{directory / 'sources.parquet'}: {sources.num_rows} rows where the manifest "
                                    f"says {counts['sources']}; rebuild the index")
    texts_path = directory / "texts.bin"
    if texts_path.stat().st_size == 0:
        texts = b""
    elif in_memory:
        texts = texts_path.read_bytes()
    else:
        with open(texts_path, "rb") as f:
            texts = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return IndexData(directory=directory, manifest=manifest, hashes=hashes, ordinals=ordinals, bloom=bloom,
                     texts=texts, sources=sources, checkpoints=checkpoints,
                     first_fingerprint=sources.column("first_fingerprint").to_numpy().astype(np.int64),
                     first_checkpoint=sources.column("first_checkpoint").to_numpy().astype(np.int64),
                     text_offset=sources.column("text_offset").to_numpy().astype(np.int64),
                     text_size=sources.column("text_size").to_numpy().astype(np.int64))
