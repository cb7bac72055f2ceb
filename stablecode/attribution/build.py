"""Build an attribution index from a corpus in the starcoderdata layout, streaming, in parallel processes.

The corpus is read one parquet record batch at a time. Worker processes normalise each file,
fingerprint its sampled windows and compress its text; the main process appends texts and source
rows to their files and spills (fingerprint, ordinal) records into 256 partition files by the top
byte of the fingerprint. At the end each partition is sorted on its own and appended to the
sorted table, so memory stays bounded by one partition plus the batches in flight, whatever the
corpus size. Everything is written into a staging directory that replaces INDEX only when complete.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
import zlib
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from stablecode.attribution.fingerprint import (BLOOM_SEGMENT_BITS, bloom_positions, normalise, sampled_positions,
                                                window_hashes)
from stablecode.attribution.storage import FORMAT, MANIFEST, VERSION, describe_files, manifest_checksum
from stablecode.atomic import staged_directory
from stablecode.errors import StablecodeError

# Where each field of a source row may come from: starcoderdata's columns first, then the extra
# columns `stablecode data from-dir` writes, then the-stack's.
SOURCE_COLUMNS = {
    "repository": ("max_stars_repo_name",),
    "path": ("max_stars_repo_path", "path"),
    "license": ("license", "max_stars_repo_licenses"),
    "id": ("id",),
    "language": ("language",),
    "stars": ("max_stars_count",),
}
PARTITION_BITS = BLOOM_SEGMENT_BITS  # one sort partition per Bloom filter segment
RECORD = np.dtype([("hash", "<u8"), ("ordinal", "<u8")])
SPILL_RECORDS = 1 << 22  # 64 MiB of records buffered before they are spilled to the partitions
BATCH_ROWS = 256
CHECKPOINT_INTERVAL = 512  # normalised characters between two stored original offsets


def corpus_files(data: Path) -> list[tuple[str, Path]]:
    """(language, parquet file) pairs: DIR/<language>/*.parquet, or parquet files directly in DIR."""
    data = Path(data)
    if data.is_file():
        if data.suffix != ".parquet":
            raise StablecodeError(f"{data}: not a parquet file; give a corpus directory in the starcoderdata layout")
        return [(data.parent.name, data)]
    if not data.is_dir():
        raise StablecodeError(f"{data}: no such corpus directory")
    files = [(data.name, p) for p in sorted(data.glob("*.parquet"))]
    files += [(p.parent.name, p) for p in sorted(data.glob("*/*.parquet"))]
    if not files:
        raise StablecodeError(f"{data}: no parquet files (expected the starcoderdata layout: "
                              "DIR/<language>/*.parquet, e.g. from `stablecode data from-dir`)")
    return files


def read_exclude_list(path: str | os.PathLike) -> set[str]:
    """Keys of files to leave out, one per line, optionally after `language<TAB>` (the data
    pipeline's validation_files.tsv): the row's `id`, else `repository/path`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StablecodeError(f"{path}: cannot read the exclude list ({e})") from None
    return {line.split("\t")[-1] for line in lines if line.strip()}


def source_key(row: dict) -> str:
    """A file's identity, as the data pipeline's split uses it: `id`, else `repository/path`."""
    if row.get("id") is not None:
        return str(row["id"])
    return f"{row.get('repository')}/{row.get('path')}"


def iter_corpus(files: list[tuple[str, Path]], exclude: set[str]) -> Iterator[tuple[list[str], list[dict]]]:
    """(contents, source rows) a record batch at a time; rows without content or excluded are skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for language, path in files:
        try:
            parquet = pq.ParquetFile(path)
            names = set(parquet.schema_arrow.names)
            if "content" not in names:
                raise StablecodeError(f"{path}: no 'content' column (columns: {sorted(names)}); "
                                      "not a starcoderdata-layout file")
            chosen = {field: next((c for c in columns if c in names), None)
                      for field, columns in SOURCE_COLUMNS.items()}
            columns = ["content", *sorted({c for c in chosen.values() if c})]
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                content_type = batch.schema.field("content").type
                if not (pa.types.is_string(content_type) or pa.types.is_large_string(content_type)
                        or pa.types.is_null(content_type)):
                    raise StablecodeError(f"{path}: the 'content' column holds {content_type}, not text")
                values = {field: batch.column(c).to_pylist() if c else [None] * batch.num_rows
                          for field, c in chosen.items()}
                contents, rows = [], []
                for i, content in enumerate(batch.column("content").to_pylist()):
                    if content is None:
                        continue
                    row = {field: values[field][i] for field in SOURCE_COLUMNS}
                    if isinstance(row["license"], list):  # the-stack keeps a list of licences per file
                        row["license"] = ", ".join(map(str, row["license"])) or None
                    row["language"] = row["language"] or language
                    if exclude and source_key(row) in exclude:
                        continue
                    contents.append(content)
                    rows.append(row)
                yield contents, rows
        except (OSError, pa.ArrowException) as e:
            raise StablecodeError(f"{path}: not a readable parquet file ({e})") from None


def fingerprint_documents(contents: list[str], window: int, stride: int, level: int):
    """Per document: compressed UTF-8 text, sizes, its checkpoints and the fingerprints of its
    sampled windows. Runs in the worker processes; returns (blobs, byte_sizes, chars,
    checkpoint_counts, checkpoints, fingerprint_counts, fingerprints, seconds spent)."""
    started = time.perf_counter()
    blobs, sizes, chars, checkpoint_counts, checkpoints, counts, hashes = [], [], [], [], [], [], []
    for text in contents:
        data = text.encode("utf-8", "surrogatepass")
        blobs.append(zlib.compress(data, level))
        sizes.append(len(data))
        chars.append(len(text))
        codes, starts = normalise(text)
        checkpoints.append(starts[::CHECKPOINT_INTERVAL].astype(np.uint32))
        checkpoint_counts.append(len(checkpoints[-1]))
        doc_hashes = window_hashes(codes, window, sampled_positions(len(codes), window, stride))
        counts.append(len(doc_hashes))
        hashes.append(doc_hashes)
    return (blobs, sizes, chars, np.array(checkpoint_counts, dtype=np.int64),
            np.concatenate(checkpoints) if checkpoints else np.zeros(0, np.uint32),
            np.array(counts, dtype=np.int64), np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
            time.perf_counter() - started)


def _results_in_order(batches: Iterable[tuple[list[str], list[dict]]], workers: int, args: tuple):
    """(rows, worker result) per batch, in corpus order, with at most 2·workers batches in flight."""
    if workers <= 1:
        for contents, rows in batches:
            yield rows, fingerprint_documents(contents, *args)
        return
    # fork where the platform has it: a spawned worker would re-import stablecode, and with it torch
    # (seconds each). The workers only run numpy and zlib, none of the parent's thread pools.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pending = deque()
        for contents, rows in batches:
            pending.append((rows, pool.apply_async(fingerprint_documents, (contents, *args))))
            if len(pending) > 2 * workers:
                rows_done, result = pending.popleft()
                yield rows_done, result.get()
        while pending:
            rows_done, result = pending.popleft()
            yield rows_done, result.get()


class _Partitions:
    """Spills (hash, ordinal) records into files by the hash's top byte; then yields each sorted."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir()
        self.buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.total = 0

    def add(self, hashes: np.ndarray, ordinals: np.ndarray) -> None:
        self.buffer.append((hashes, ordinals))
        self.buffered += len(hashes)
        self.total += len(hashes)
        if self.buffered >= SPILL_RECORDS:
            self.spill()

    def _path(self, part: int) -> Path:
        return self.directory / f"{part:03d}.bin"

    def spill(self) -> None:
        if not self.buffered:
            return
        records = np.empty(self.buffered, dtype=RECORD)
        records["hash"] = np.concatenate([h for h, _ in self.buffer])
        records["ordinal"] = np.concatenate([o for _, o in self.buffer])
        self.buffer, self.buffered = [], 0
        part = (records["hash"] >> np.uint64(64 - PARTITION_BITS)).astype(np.int64)
        order = np.argsort(part, kind="stable")  # stable: ordinals stay ascending within a partition
        records, part = records[order], part[order]
        bounds = np.searchsorted(part, np.arange((1 << PARTITION_BITS) + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            with open(self._path(p), "ab") as f:
                records[bounds[p]:bounds[p + 1]].tofile(f)

    def sorted_parts(self) -> Iterator[tuple[int, np.ndarray]]:
        self.spill()
        for p in range(1 << PARTITION_BITS):
            path = self._path(p)
            if path.exists():
                records = np.fromfile(path, dtype=RECORD)
                path.unlink()
                # Equal fingerprints stay in ordinal (corpus) order.
                yield p, records[np.argsort(records["hash"], kind="stable")]


def _bloom_size(count: int, bits_per_fingerprint: float) -> tuple[int, int]:
    bits = max(1 << 14, 1 << math.ceil(math.log2(max(1.0, count * bits_per_fingerprint))))
    hashes = int(min(10, max(1, round(bits / max(count, 1) * math.log(2)))))
    return bits, hashes


def build_index(data: str | os.PathLike, out: str | os.PathLike, *, window: int = 50, stride: int = 32,
                workers: int = 2, default_license: str | None = None, exclude: set[str] | None = None,
                bloom_bits_per_fingerprint: float = 10.0, compression_level: int = 6, progress: bool = False,
                log: Callable[[str], None] | None = None) -> dict:
    """Index the corpus at `data` (starcoderdata layout) into the directory `out`; returns the manifest.

    Windows of `window` normalised characters are fingerprinted at every `stride`-th position, so any
    stretch of at least window + stride - 1 normalised characters shared with a corpus file is found.
    `default_license` is recorded for rows that carry no licence; `exclude` holds keys (`id`, else
    `repository/path`) of files to leave out, e.g. the held-out validation files.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if window < 8:
        raise ValueError(f"window must be at least 8 characters, got {window}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not 1 <= bloom_bits_per_fingerprint <= 64:
        raise ValueError(f"bloom_bits_per_fingerprint must be in [1, 64], got {bloom_bits_per_fingerprint}")
    out = Path(out)
    files = corpus_files(Path(data))
    total_rows = None
    if progress:
        try:
            total_rows = sum(pq.ParquetFile(p).metadata.num_rows for _, p in files)
        except (OSError, pa.ArrowException):
            pass  # reported, naming the file, when it is read
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_directory(out, tag="building") as staging:
        partitions = _Partitions(staging / "partitions")
        schema = pa.schema([("repository", pa.string()), ("path", pa.string()), ("license", pa.string()),
                            ("id", pa.string()), ("language", pa.string()), ("stars", pa.int64()),
                            ("text_offset", pa.uint64()), ("text_size", pa.uint64()), ("chars", pa.uint64()),
                            ("first_fingerprint", pa.uint64()), ("first_checkpoint", pa.uint64())])
        num_sources = source_bytes = source_chars = text_offset = num_checkpoints = worker_seconds = 0
        languages: dict[str, int] = {}
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total_rows, unit="file", desc="indexing", dynamic_ncols=True)
        with open(staging / "texts.bin", "wb") as texts, open(staging / "checkpoints.bin", "wb") as checkpoints, \
                pq.ParquetWriter(staging / "sources.parquet", schema) as sources:
            args = (window, stride, compression_level)
            for rows, (blobs, sizes, chars, checkpoint_counts, doc_checkpoints, counts, hashes, seconds) in \
                    _results_in_order(iter_corpus(files, exclude or set()), workers, args):
                worker_seconds += seconds
                if not rows:
                    continue
                if any(c >= 1 << 32 for c in chars):
                    raise StablecodeError(f"{data}: a file of 2**32 characters or more cannot be indexed")
                first = partitions.total + np.concatenate([[0], np.cumsum(counts)[:-1]])
                first_checkpoint = num_checkpoints + np.concatenate([[0], np.cumsum(checkpoint_counts)[:-1]])
                doc_checkpoints.tofile(checkpoints)
                num_checkpoints += len(doc_checkpoints)
                offsets = text_offset + np.concatenate([[0], np.cumsum([len(b) for b in blobs])[:-1]])
                for blob in blobs:
                    texts.write(blob)
                text_offset += sum(len(b) for b in blobs)
                columns = {field: [row[field] for row in rows] for field in ("repository", "path", "id", "language")}
                columns["license"] = [row["license"] or default_license for row in rows]
                columns["stars"] = [int(row["stars"]) if isinstance(row["stars"], (int, float))
                                    and row["stars"] == row["stars"] else None for row in rows]  # NaN → None
                for field in ("repository", "path", "id", "language", "license"):
                    columns[field] = [None if v is None else str(v) for v in columns[field]]
                columns.update(text_offset=offsets.tolist(), text_size=[len(b) for b in blobs], chars=chars,
                               first_fingerprint=first.tolist(), first_checkpoint=first_checkpoint.tolist())
                sources.write_batch(pa.record_batch([pa.array(columns[f.name], f.type) for f in schema],
                                                    schema=schema))
                partitions.add(hashes, np.arange(partitions.total, partitions.total + len(hashes), dtype=np.uint64))
                for row in rows:
                    languages[row["language"]] = languages.get(row["language"], 0) + 1
                num_sources += len(rows)
                source_bytes += sum(sizes)
                source_chars += sum(chars)
                if bar is not None:
                    bar.update(len(rows))
        if bar is not None:
            bar.close()
        if num_sources == 0:
            raise StablecodeError(f"{data}: empty corpus: no rows with content to index")

        count = partitions.total
        bloom_bits, bloom_hashes = _bloom_size(count, bloom_bits_per_fingerprint)
        ordinal_dtype = np.dtype(np.uint32 if count < (1 << 32) else np.uint64)
        hashes_out = np.lib.format.open_memmap(staging / "hashes.npy", "w+", np.uint64, (count,))
        ordinals_out = np.lib.format.open_memmap(staging / "ordinals.npy", "w+", ordinal_dtype, (count,))
        bloom = np.zeros(bloom_bits // 8, dtype=np.uint8)
        segment_bits = bloom_bits >> BLOOM_SEGMENT_BITS
        filled = 0
        for part, records in partitions.sorted_parts():
            n = len(records)
            hashes_out[filled:filled + n] = records["hash"]
            ordinals_out[filled:filled + n] = records["ordinal"]
            filled += n
            # Partition `part` holds exactly the fingerprints whose bits lie in Bloom segment `part`.
            segment = np.zeros(segment_bits, dtype=bool)
            for chunk in range(0, n, 1 << 20):
                bits = bloom_positions(records["hash"][chunk:chunk + (1 << 20)], bloom_bits, bloom_hashes)
                segment[(bits - np.uint64(part * segment_bits)).ravel().astype(np.intp)] = True
            first_byte = part * segment_bits // 8
            bloom[first_byte:first_byte + segment_bits // 8] = np.packbits(segment, bitorder="little")
        assert filled == count, (filled, count)
        for array in (hashes_out, ordinals_out):
            array.flush()
        del hashes_out, ordinals_out
        np.save(staging / "bloom.npy", bloom)
        checkpoints_out = np.lib.format.open_memmap(staging / "checkpoints.npy", "w+", np.uint32, (num_checkpoints,))
        for start in range(0, num_checkpoints, 1 << 24):
            checkpoints_out[start:start + (1 << 24)] = np.fromfile(
                staging / "checkpoints.bin", dtype=np.uint32, count=min(1 << 24, num_checkpoints - start),
                offset=4 * start)
        checkpoints_out.flush()
        del checkpoints_out
        (staging / "checkpoints.bin").unlink()
        shutil.rmtree(staging / "partitions")

        seconds = time.perf_counter() - started
        manifest = {
            "format": FORMAT, "version": VERSION,
            "window": window, "stride": stride,
            "normalisation": "every run of str.isspace() characters becomes one space",
            "hash": "polynomial over code points, base 0x9E3779B97F4A7C15 mod 2**64, then splitmix64's finaliser",
            "guaranteed_match_chars": window + stride - 1,
            "ordinal_dtype": ordinal_dtype.name,
            "checkpoint_interval": CHECKPOINT_INTERVAL,
            "bloom": {"bits": bloom_bits, "hashes": bloom_hashes},
            "counts": {"sources": num_sources, "fingerprints": count, "checkpoints": num_checkpoints,
                       "source_bytes": source_bytes,
                       "source_chars": source_chars},
            "languages": dict(sorted(languages.items())),
            # worker_seconds: time spent normalising, hashing and compressing (in the workers); the rest
            # of `seconds` is the main process reading, writing and sorting, which workers do not speed up.
            "build": {"data": str(data), "seconds": round(seconds, 3), "workers": workers,
                      "worker_seconds": round(worker_seconds, 3),
                      "compression_level": compression_level, "excluded_keys": len(exclude or ())},
            "files": describe_files(staging),
        }
        manifest["checksum"] = manifest_checksum(manifest)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if log:
        log(f"indexed {num_sources:,} files ({source_bytes / 1e6:,.1f} MB) into {out} "
            f"({index_size(out) / 1e6:,.1f} MB) in {seconds:,.1f} s")
    return manifest


def index_size(directory: str | os.PathLike) -> int:
    """Bytes on disk of an index directory's files."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
