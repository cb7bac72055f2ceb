"""Find the parts of a text that occur in the indexed training files, and say where.

Every window of the normalised text is fingerprinted; the Bloom filter drops most windows that are
not in the index, the sorted table gives the (source, offset) of those that are, and each candidate
is then confirmed against the source's own text and extended character by character to the longest
match. Only confirmed matches are reported, so a Bloom-filter or hash collision never shows up.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from stablecode.attribution.fingerprint import SPACE, bloom_positions, normalise, window_hashes
from stablecode.attribution.storage import (INDEX_DIR_NAME, MANIFEST, AttributionIndexError, open_index,
                                            require_pyarrow)

# A window found in more places than this is followed to the first ones only (in corpus order):
# boilerplate such as a licence header would otherwise cost one source decompression per copy.
MAX_HITS_PER_WINDOW = 64


@dataclass(frozen=True)
class Source:
    """A training file: where it came from and under which licence (None where unknown)."""
    index: int
    repository: str | None
    path: str | None
    license: str | None
    id: str | None
    language: str | None
    stars: int | None

    def __str__(self) -> str:
        where = "/".join(p for p in (self.repository, self.path) if p) or f"source #{self.index}"
        return f"{where} ({self.license or 'licence unknown'})"


@dataclass(frozen=True)
class SourceMatch:
    """Characters start:end of the document equal source characters source_start:source_end
    (up to whitespace runs); source_lines are the 1-based first and last lines in the source."""
    source: Source
    start: int
    end: int
    source_start: int
    source_end: int
    source_lines: tuple[int, int]


@dataclass(frozen=True)
class Span:
    """A maximal range of the document found in training files, with the matches that cover it
    (longest first, at most one per source file)."""
    start: int
    end: int
    text: str
    matches: tuple[SourceMatch, ...]


def resolve_index_dir(index: str | os.PathLike | None) -> Path:
    """An index directory, a model directory (or embedded model name) holding one, or None for the
    embedded default model's index."""
    from stablecode.registry import DEFAULT_MODEL, EMBEDDED_MODELS_DIR

    if index is None:
        # The extra first: without it no index helps, and installing it is the first thing to do.
        require_pyarrow()
        directory = EMBEDDED_MODELS_DIR / DEFAULT_MODEL / INDEX_DIR_NAME
        if not (directory / MANIFEST).is_file():
            raise AttributionIndexError(
                f"the embedded model's attribution index is not installed at {directory}; build it with "
                "scripts/nano/build_index.sh, or pass an index built with `stablecode index build`")
        return directory
    path = Path(index)
    for candidate in (path, path / INDEX_DIR_NAME, EMBEDDED_MODELS_DIR / str(index) / INDEX_DIR_NAME):
        if (candidate / MANIFEST).is_file():
            return candidate
    if path.is_dir():
        raise AttributionIndexError(f"{path}: not an attribution index (no {MANIFEST}, "
                                    f"nor {INDEX_DIR_NAME}/{MANIFEST}); "
                                    "build one with `stablecode index build --data DIR --out INDEX`")
    raise AttributionIndexError(f"{index}: no such attribution index directory (nor an embedded model with one)")


def _common_run(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of a and b, compared in doubling chunks: the cost follows the
    run's length, not the arrays' (a document and a long source file could be megabytes)."""
    n, done, step = min(len(a), len(b)), 0, 64
    while done < n:
        end = min(n, done + step)
        same = a[done:end] == b[done:end]
        if not same.all():
            return done + int(np.argmin(same))
        done, step = end, step * 2
    return n


def _extend(query: np.ndarray, source: np.ndarray, q: int, s: int, window: int) -> tuple[int, int, int] | None:
    """The longest common run of query and source through query[q:q+window] == source[s:s+window],
    as (query_start, query_end, source_start); None when those windows differ (a hash collision)."""
    if min(len(query) - q, len(source) - s) < window or s < 0:
        return None
    right = _common_run(query[q:], source[s:])
    if right < window:
        return None
    left = _common_run(query[:q][::-1], source[:s][::-1])
    return q - left, q + right, s - left


class Attributor:
    """Look texts up in an attribution index (default: the embedded model's own training corpus)."""

    def __init__(self, index: str | os.PathLike | None = None, *, verify: bool = True, cached_sources: int = 64,
                 in_memory: bool = False):
        """`verify` checks every index file's SHA-256 on opening (sizes are always checked); `in_memory`
        reads the files instead of mapping them (the server: files rewritten in place cannot crash it)."""
        self.directory = resolve_index_dir(index)
        self.index = open_index(self.directory, verify=verify, in_memory=in_memory)
        self.window = self.index.window
        self.stride = self.index.stride
        self._bloom_bits = self.index.manifest["bloom"]["bits"]
        self._bloom_hashes = self.index.manifest["bloom"]["hashes"]
        self._read_source = lru_cache(maxsize=cached_sources)(self._decode_source)
        self._source_columns = {name: self.index.sources.column(name).combine_chunks()
                                for name in ("repository", "path", "license", "id", "language", "stars")}

    @property
    def num_sources(self) -> int:
        return self.index.manifest["counts"]["sources"]

    def __repr__(self) -> str:
        return (f"Attributor({str(self.directory)!r}: {self.num_sources:,} sources, window {self.window}, "
                f"stride {self.stride})")

    def source(self, i: int) -> Source:
        return Source(index=int(i), **{name: column[int(i)].as_py() for name, column in self._source_columns.items()})

    def source_text(self, i: int) -> str:
        """The original text of source file `i`."""
        return self._read_source(int(i))

    def _decode_source(self, i: int) -> str:
        offset, size = int(self.index.text_offset[i]), int(self.index.text_size[i])
        try:
            return zlib.decompress(self.index.texts[offset:offset + size]).decode("utf-8", "surrogatepass")
        except (zlib.error, UnicodeDecodeError) as e:
            raise AttributionIndexError(f"{self.directory}/texts.bin: the text of source {i} is corrupted ({e}); "
                                        "rebuild the index") from None

    def _source_region(self, i: int, text: str, begin: int, end: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(codes, original offsets, first index) of normalised characters [begin, end) of source `i`,
        widened to checkpoints: only this part of the source is normalised, not the whole file."""
        interval, checkpoints = self.index.checkpoint_interval, self.index.checkpoints
        first = self.index.first_checkpoint[i]
        count = (self.index.first_checkpoint[i + 1] if i + 1 < self.num_sources else len(checkpoints)) - first
        low = min(max(begin, 0) // interval, count)
        high = -(-end // interval)
        text_start = int(checkpoints[first + low]) if low < count else len(text)
        text_end = int(checkpoints[first + high]) if high < count else len(text)
        codes, starts = normalise(text[text_start:text_end])
        return codes, starts + text_start, low * interval

    def _candidates(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query position, fingerprint ordinal) for each window whose fingerprint is in the table."""
        bits = bloom_positions(hashes, self._bloom_bits, self._bloom_hashes)
        words = self.index.bloom[(bits >> np.uint64(3)).astype(np.intp)]
        maybe = np.flatnonzero(((words >> (bits & np.uint64(7))) & 1).all(axis=1))
        lo = np.searchsorted(self.index.hashes, hashes[maybe], side="left")
        hi = np.searchsorted(self.index.hashes, hashes[maybe], side="right")
        found = hi > lo
        positions, lo, counts = maybe[found], lo[found], np.minimum(hi - lo, MAX_HITS_PER_WINDOW)[found]
        entry = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        return np.repeat(positions, counts), self.index.ordinals[entry].astype(np.int64)

    def find(self, text: str, *, min_length: int | None = None, max_sources: int = 5) -> list[Span]:
        """Maximal spans of `text` that occur in training files, each with up to `max_sources` sources.

        A match counts from `min_length` normalised characters (default and minimum: the index's
        window), not counting whitespace at either end; any shared stretch of window + stride - 1
        normalised characters is always found.
        """
        window = self.window
        min_length = max(window, min_length or window)
        if max_sources < 1:
            raise ValueError(f"max_sources must be at least 1, got {max_sources}")
        codes, starts = normalise(text)
        if len(codes) < min_length:
            return []
        positions, ordinals = self._candidates(window_hashes(codes, window))
        if not len(positions):
            return []
        first_fingerprint = self.index.first_fingerprint
        files = np.searchsorted(first_fingerprint, ordinals, side="right") - 1
        diagonals = (ordinals - first_fingerprint[files]) * self.stride - positions
        order = np.lexsort((positions, diagonals, files))
        files, diagonals, positions = files[order], diagonals[order], positions[order]
        # A group is one source file and one alignment of it against the text: one match, or a few
        # separated by differences. Groups with more window hits are tried first.
        bounds = np.concatenate([[0], np.flatnonzero((np.diff(files) != 0) | (np.diff(diagonals) != 0)) + 1,
                                 [len(files)]])
        group_starts, group_ends = bounds[:-1], bounds[1:]

        group_first = positions[group_starts].tolist()
        group_last = (positions[group_ends - 1] + window).tolist()
        coverage = np.zeros(len(codes), dtype=np.int32)
        saturated = np.zeros(len(codes), dtype=bool)  # covered by max_sources matches already
        # Source characters read around a group's hits; a match reaching past them is redone over the
        # group's whole alignment. Bounding the region keeps the cost linear in the document.
        margin = 4 * window + self.stride
        matches = []  # (query_start, query_end, file, source_start, source_end): normalised, then original
        for g in np.lexsort((files[group_starts], group_starts - group_ends)).tolist():
            first, last = group_first[g], group_last[g]
            if saturated[first:last].all():
                continue  # enough sources already cover everything this group could add
            file, diagonal = int(files[group_starts[g]]), int(diagonals[group_starts[g]])
            group_positions = positions[group_starts[g]:group_ends[g]]
            source_text = self._read_source(file)
            # Query character q faces source character q + diagonal: no match reaches beyond these.
            region = self._source_region(file, source_text, diagonal + first - margin, diagonal + last + margin)
            whole_alignment = False
            reached = -1
            for q in group_positions.tolist():
                if q < reached:
                    continue
                source_codes, source_starts, region_start = region
                extended = _extend(codes, source_codes, q, q + diagonal - region_start, window)
                if extended is not None and not whole_alignment and (
                        (extended[2] == 0 and region_start > 0 and extended[0] > 0)
                        or (extended[2] + extended[1] - extended[0] == len(source_codes) and extended[1] < len(codes))):
                    whole_alignment = True
                    region = self._source_region(file, source_text, diagonal, diagonal + len(codes))
                    source_codes, source_starts, region_start = region
                    extended = _extend(codes, source_codes, q, q + diagonal - region_start, window)
                if extended is None:
                    continue
                query_start, query_end, source_start = extended
                reached = query_end
                # Whitespace at either end is not part of a match: it stands for a run of any length.
                left, right = int(codes[query_start] == SPACE), int(codes[query_end - 1] == SPACE)
                query_start, query_end, source_start = query_start + left, query_end - right, source_start + left
                if query_end - query_start >= min_length:
                    source_last = source_start + query_end - query_start - 1
                    matches.append((query_start, query_end, file, int(source_starts[source_start]),
                                    int(source_starts[source_last]) + 1))
                    coverage[query_start:query_end] += 1
                    saturated[query_start:query_end] = coverage[query_start:query_end] >= max_sources
        return self._spans(text, starts, matches, max_sources)

    def _spans(self, text: str, starts: np.ndarray, matches: list, max_sources: int) -> list[Span]:
        matches.sort()
        merged: list[list] = []
        for match in matches:
            if merged and match[0] <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], match[1])
                merged[-1][2].append(match)
            else:
                merged.append([match[0], match[1], [match]])
        spans = []
        for query_start, query_end, group in merged:
            longest: dict[int, tuple] = {}
            for match in group:
                best = longest.get(match[2])
                if best is None or match[1] - match[0] > best[1] - best[0]:
                    longest[match[2]] = match
            chosen = sorted(longest.values(), key=lambda m: (m[0] - m[1], m[2], m[0]))[:max_sources]
            start, end = int(starts[query_start]), int(starts[query_end - 1]) + 1
            spans.append(Span(start=start, end=end, text=text[start:end],
                              matches=tuple(self._source_match(m, starts) for m in chosen)))
        return spans

    def _source_match(self, match: tuple, starts: np.ndarray) -> SourceMatch:
        query_start, query_end, file, source_start, source_end = match
        source_text = self._read_source(file)
        lines = (source_text.count("\n", 0, source_start) + 1, source_text.count("\n", 0, source_end - 1) + 1)
        return SourceMatch(source=self.source(file), start=int(starts[query_start]),
                           end=int(starts[query_end - 1]) + 1, source_start=source_start, source_end=source_end,
                           source_lines=lines)

    def overlap(self, text: str, *, min_length: int | None = None, max_sources: int = 5,
                offset_unit: str = "codepoint") -> dict:
        """`find` as JSON: {"spans": [[start, end], ...], "sources": [{"span": i, ...}, ...]}."""
        return attribution_json(text, self.find(text, min_length=min_length, max_sources=max_sources), offset_unit)


def attribution_json(text: str, spans: list[Span], offset_unit: str = "codepoint") -> dict:
    """The JSON form of `spans` found in `text`. Document offsets count Unicode code points
    (Python's str indices) or, with offset_unit="utf-16", UTF-16 code units (JavaScript's string
    indices, which editors use); they differ only after characters beyond U+FFFF. Source offsets
    are code points of the source file."""
    if offset_unit == "codepoint":
        def unit(i: int) -> int:
            return i
    elif offset_unit == "utf-16":
        astral = np.concatenate([[0], np.cumsum([ord(c) > 0xFFFF for c in text])]) if not text.isascii() else None

        def unit(i: int) -> int:
            return i if astral is None else i + int(astral[i])
    else:
        raise ValueError(f"offset_unit must be 'codepoint' or 'utf-16', got {offset_unit!r}")
    sources = []
    for i, span in enumerate(spans):
        for m in span.matches:
            sources.append({"span": i, "repository": m.source.repository, "path": m.source.path,
                            "license": m.source.license, "id": m.source.id, "language": m.source.language,
                            "start": unit(m.start), "end": unit(m.end), "source_start": m.source_start,
                            "source_end": m.source_end, "source_lines": list(m.source_lines)})
    return {"spans": [[unit(s.start), unit(s.end)] for s in spans], "sources": sources}
