"""`stablecode data pack`: tokenize a starcoderdata-layout folder into memory-mapped token shards.

Layout of a pack directory:

    index.json              seq_len, dtype, tokenizer, mix, and the shard files of each split
    plan.json               the settings and work units of the run (what makes it resumable)
    tokenizer.json          a copy of the tokenizer that produced the ids
    train/u00000.bin ...    flat token ids (little-endian uint16, or uint32 past 65,536 tokens)
    validation/u00000.bin
    units/u00000.json       per-unit counts; its presence marks the unit done
    validation_files.tsv    language <TAB> key of every held-out file

Work is split into units (a run of row groups of one parquet file); each unit is tokenized in a
worker process and its shards are written to a temporary file and renamed, the unit's json last.
A killed run, started again with the same arguments, redoes only the units without a json.

Every document is followed by EOS. With `fim_rate` > 0, training documents are rearranged for
fill-in-the-middle as StarCoder was trained, at the level of a context rather than a whole file: a
document is cut at line ends into pieces of at most `piece_chars` characters (a piece fits a training
window, so its sentinels, prefix, suffix and middle are seen together; a whole file of 10k tokens
rearranged once would put them thousands of tokens apart in a 512-token window). That fraction of the
pieces is split at two random character positions into prefix, middle and suffix and written
`<fim_prefix>prefix<fim_suffix>suffix<fim_middle>middle` (PSM) or, for `fim_spm_rate` of them,
`<fim_prefix><fim_suffix>suffix<fim_middle>prefix middle` (SPM, the variant in which prefix and middle
stay one contiguous text); runs of pieces left plain are tokenized as one text. The draws are a
function of the seed and the file's key, so a pack is reproducible and resumable. Validation files stay plain text,
so the validation loss is left-to-right loss. A split's shards, concatenated in unit order, form one token
stream; sequence i is the window [i·seq_len, i·seq_len + seq_len + 1) of that stream — seq_len + 1
tokens, so input = x[:-1] and target = x[1:] — and consecutive sequences share one token (stride
seq_len, as GPT-NeoX packs). The tail shorter than a window is not used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stablecode.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from stablecode.data import DataError
from stablecode.data.starcoder import (SPLITS, DataMix, _key_columns, is_validation, iter_file_documents,
                                       language_files, open_parquet)
from stablecode.tokenizer import Tokenizer

FORMAT = "stablecode-packed-tokens/1"
INDEX_FILE = "index.json"
PLAN_FILE = "plan.json"
VALIDATION_FILES = "validation_files.tsv"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the vocabulary (uint16 for ≤ 65,536 tokens)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


FIM_TOKENS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")


@dataclass(frozen=True)
class FimSettings:
    """Fill-in-the-middle rearrangement of training documents (see the module docstring)."""

    rate: float = 0.0
    spm_rate: float = 0.5
    seed: int = 0
    piece_chars: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0 or not 0.0 <= self.spm_rate <= 1.0:
            raise ValueError(f"FIM rates must be in [0, 1], got rate {self.rate} and SPM rate {self.spm_rate}")
        if self.piece_chars < 1:
            raise ValueError(f"FIM piece length must be at least 1 character, got {self.piece_chars}")

    def segments(self, key: str, text: str) -> list[str | tuple[str, str, str, bool]] | None:
        """The document as plain texts and (prefix, middle, suffix, spm) pieces, in order; None when no
        piece is rearranged (the document is then packed as plain text)."""
        if self.rate == 0.0:
            return None
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        segments: list[str | tuple[str, str, str, bool]] = []
        for piece in _pieces(text, self.piece_chars):
            if rng.random() >= self.rate:
                if segments and isinstance(segments[-1], str):
                    segments[-1] += piece
                else:
                    segments.append(piece)
                continue
            low, high = sorted(int(x) for x in rng.integers(0, len(piece) + 1, size=2))
            segments.append((piece[:low], piece[low:high], piece[high:], bool(rng.random() < self.spm_rate)))
        return None if all(isinstance(s, str) for s in segments) else segments


def _pieces(text: str, limit: int) -> list[str]:
    """`text` cut after line ends into pieces of at most `limit` characters (a longer line is cut inside)."""
    pieces, start = [], 0
    while len(text) - start > limit:
        cut = text.rfind("\n", start, start + limit) + 1
        if cut <= start:
            cut = start + limit
        pieces.append(text[start:cut])
        start = cut
    if start < len(text) or not pieces:
        pieces.append(text[start:])
    return pieces


def fim_token_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """Ids of <fim_prefix>, <fim_middle>, <fim_suffix>; a clear error when the tokenizer lacks them."""
    ids = [tokenizer.backend.token_to_id(t) for t in FIM_TOKENS[:3]]
    if None in ids:
        missing = [t for t, i in zip(FIM_TOKENS, ids) if i is None]
        raise DataError(f"the tokenizer has no {', '.join(missing)} token: FIM packing needs StarCoder's special tokens "
                        "(train one with `stablecode tokenizer train`)")
    return ids[0], ids[1], ids[2]


def encode_document(key: str, text: str, fim: FimSettings, sentinels: tuple[int, int, int] | None,
                    encode) -> list[int]:
    """Token ids of one training document (its pieces FIM-rearranged as their draws say), EOS not included."""
    segments = fim.segments(key, text) if sentinels is not None else None
    if segments is None:
        return encode([text])[0]
    fim_prefix, fim_middle, fim_suffix = sentinels
    ids: list[int] = []
    for segment in segments:
        if isinstance(segment, str):
            ids += encode([segment])[0]
            continue
        prefix, middle, suffix, spm = segment
        p, m, s = encode([prefix, middle, suffix])
        ids += [fim_prefix, fim_suffix, *s, fim_middle, *p, *m] if spm else [fim_prefix, *p, fim_suffix, *s, fim_middle, *m]
    return ids


@dataclass(frozen=True)
class Unit:
    """A run of row groups of one parquet file: the grain of parallelism and of resumption."""

    index: int
    language: str
    path: str
    row_groups: tuple[int, ...]
    text_bytes: int

    @property
    def name(self) -> str:
        return f"u{self.index:05d}"


def _footer_sha256(path: Path) -> str:
    """Fingerprint of a parquet file: the hash of its footer (schema, row groups, statistics)."""
    with open(path, "rb") as f:
        f.seek(-8, os.SEEK_END)
        length = int.from_bytes(f.read(4), "little")
        f.seek(-8 - length, os.SEEK_END)
        return hashlib.sha256(f.read(length)).hexdigest()


def plan_units(data_dir: Path, mix: DataMix, unit_bytes: int) -> tuple[list[Unit], list[dict]]:
    """Units over every parquet file of the mix (opening each: a bad file fails here, before any work)."""
    units, files = [], []
    for language, paths in language_files(data_dir, mix).items():
        for path in paths:
            parquet = open_parquet(path)
            _key_columns(path, parquet.schema_arrow)
            meta = parquet.metadata
            files.append({"file": path.relative_to(data_dir).as_posix(), "bytes": path.stat().st_size,
                          "rows": meta.num_rows, "footer_sha256": _footer_sha256(path)})
            group, size = [], 0
            for rg in range(meta.num_row_groups):
                group.append(rg)
                size += meta.row_group(rg).total_byte_size
                if size >= unit_bytes or rg == meta.num_row_groups - 1:
                    units.append(Unit(len(units), language, str(path), tuple(group), size))
                    group, size = [], 0
    return units, files


# ---- worker side -----------------------------------------------------------------------------

_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str, threads: int | None = None) -> None:
    global _tokenizer
    if threads is not None:  # read when the tokenizers library starts its thread pool, on first use
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    _tokenizer = Tokenizer.from_file(tokenizer_path)
    # Text such as "<|endoftext|>" inside a source file is text, not a document boundary.
    _tokenizer.backend.encode_special_tokens = True


def _encode_batch(texts: list[str]):
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use: ~40% less CPU.
    backend = _tokenizer.backend
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return encode(texts, add_special_tokens=False)


def _write_atomically(path: Path, chunks) -> int:
    """Write arrays one after another to a temporary file, fsync, rename; returns the element count."""
    count = 0
    with atomic_open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk.tobytes())
            count += chunk.size
    return count


def _encode_ids(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in _encode_batch(texts)]


def pack_unit(unit: Unit, out: str, dtype: str, validation_fraction: float, mix: DataMix,
              batch_size: int, fim: FimSettings = FimSettings()) -> dict:
    """Tokenize one unit into `train/<unit>.bin` and `validation/<unit>.bin`; writes and returns its summary."""
    out, dtype = Path(out), np.dtype(dtype)
    eos = _tokenizer.eos_id
    sentinels = fim_token_ids(_tokenizer) if fim.rate > 0 else None
    chunks = {split: [] for split in SPLITS}
    documents = {split: 0 for split in SPLITS}
    held_out, text_bytes = [], 0
    for docs in iter_file_documents(Path(unit.path), unit.language, list(unit.row_groups), batch_size):
        validation = [is_validation(d.key, validation_fraction) for d in docs]
        rearranged = [not v and sentinels is not None and fim.segments(d.key, d.content) is not None
                      for d, v in zip(docs, validation)]
        encoded = iter(_encode_ids([d.content for d, r in zip(docs, rearranged) if not r]))  # one batch, in order
        for doc, held, fim_doc in zip(docs, validation, rearranged):
            text_bytes += len(doc.content.encode("utf-8"))
            if not fim_doc:
                ids = next(encoded)
            else:
                ids = encode_document(doc.key, doc.content, fim, sentinels, _encode_ids)
            tokens = np.array(ids + [eos], dtype=dtype)
            if held:
                held_out.append(doc.key)
                chunks["validation"].append(tokens)
                documents["validation"] += 1
            else:
                for _ in range(mix.copies(unit.language, doc.key)):
                    chunks["train"].append(tokens)
                    documents["train"] += 1
    summary = {"unit": unit.name, "language": unit.language, "file": unit.path, "row_groups": list(unit.row_groups),
               "text_bytes": text_bytes, "validation_files": held_out, "splits": {}}
    for split in SPLITS:
        relative = f"{split}/{unit.name}.bin"
        tokens = _write_atomically(out / relative, chunks[split])
        summary["splits"][split] = {"file": relative, "tokens": tokens, "documents": documents[split]}
    atomic_write_text(out / "units" / f"{unit.name}.json", json.dumps(summary) + "\n")
    return summary


def _pack_unit_job(job: tuple) -> dict:
    return pack_unit(*job)


# ---- driver ----------------------------------------------------------------------------------

def _unit_done(out: Path, unit: Unit, itemsize: int) -> dict | None:
    """The unit's summary when its json and both shards are complete, else None."""
    try:
        summary = json.loads((out / "units" / f"{unit.name}.json").read_text())
        for split in SPLITS:
            info = summary["splits"][split]
            if (out / info["file"]).stat().st_size != info["tokens"] * itemsize:
                return None
        return summary
    except (OSError, ValueError, KeyError):
        return None


def pack(data_dir: str | Path, tokenizer: str | Path, seq_len: int, out: str | Path,
         validation_fraction: float = 0.02, workers: int = 2, mix: DataMix | None = None, batch_size: int = 256,
         unit_bytes: int = 4 << 20, fim: FimSettings | None = None, progress: bool = False, log=None) -> dict:
    """Tokenize and pack `data_dir` into `out` (see the module docstring); returns the index.

    Runs again with the same arguments resume a killed run: finished units are kept. `seq_len` only
    shapes the index, so re-running with another seq_len re-tokenizes nothing.
    """
    data_dir, out, tokenizer = Path(data_dir), Path(out), Path(tokenizer)
    mix = mix or DataMix()
    fim = fim or FimSettings()
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if tokenizer.is_dir():
        tokenizer = tokenizer / "tokenizer.json"
    tok = Tokenizer.from_file(tokenizer)
    if fim.rate > 0:
        fim_token_ids(tok)
    dtype = token_dtype(tok.vocab_size)
    tokenizer_bytes = tokenizer.read_bytes()
    started = time.monotonic()

    units, files = plan_units(data_dir, mix, unit_bytes)
    plan = {"format": FORMAT, "data_dir": str(data_dir.resolve()), "files": files,
            "tokenizer_sha256": hashlib.sha256(tokenizer_bytes).hexdigest(), "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "dtype": dtype.str, "validation_fraction": validation_fraction,
            "mix": mix.to_json(), "fim": dataclasses.asdict(fim), "units": [[u.language, u.path, list(u.row_groups)] for u in units]}
    plan_path = out / PLAN_FILE
    if plan_path.exists():
        try:
            previous = json.loads(plan_path.read_text())
        except ValueError:
            previous = None
        if previous != plan:
            different = sorted(k for k in plan if previous is None or previous.get(k) != plan[k])
            raise DataError(f"{out} holds a pack made with other settings ({', '.join(different)} differ); "
                            "use another --out, or delete it to start over")
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists, is not empty and is not a pack directory; choose another --out")
    else:
        atomic_write_text(plan_path, json.dumps(plan, indent=1) + "\n")
    for directory in (*SPLITS, "units"):
        (out / directory).mkdir(parents=True, exist_ok=True)
        for stale in (out / directory).glob(".*.tmp"):  # left by a killed run
            stale.unlink()
    atomic_write_bytes(out / "tokenizer.json", tokenizer_bytes)

    summaries = {}
    pending = []
    for unit in units:
        done = _unit_done(out, unit, dtype.itemsize)
        if done is None:
            pending.append(unit)
        else:
            summaries[unit.name] = done
    if log and summaries:
        log(f"resuming: {len(summaries)} of {len(units)} units already packed")

    text_bytes = {u.name: u.text_bytes for u in pending}
    jobs = [(unit, str(out), dtype.str, validation_fraction, mix, batch_size, fim) for unit in pending]
    from tqdm import tqdm

    bar = tqdm(total=sum(u.text_bytes for u in pending), unit="B", unit_scale=True, desc="packing",
               disable=not progress)
    try:
        if workers == 1 or len(jobs) <= 1:
            _init_worker(str(tokenizer))
            results = map(_pack_unit_job, jobs)
            pool = None
        else:
            # spawn: fresh interpreters, so no fork of a process whose threads (torch, tokenizers) are running
            processes = min(workers, len(jobs))
            threads = max(1, (os.cpu_count() or 1) // processes)  # no more threads than cores in all
            pool = multiprocessing.get_context("spawn").Pool(processes, initializer=_init_worker,
                                                            initargs=(str(tokenizer), threads))
            results = pool.imap_unordered(_pack_unit_job, jobs)
        try:
            for summary in results:
                summaries[summary["unit"]] = summary
                bar.update(text_bytes[summary["unit"]])
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    finally:
        bar.close()

    index = _write_index(out, units, summaries, plan, seq_len, tokenizer)
    if log:
        seconds = time.monotonic() - started
        train, val = index["splits"]["train"], index["splits"]["validation"]
        log(f"packed {train['num_tokens']:,} train tokens ({train['num_sequences']:,} sequences of {seq_len}+1) and "
            f"{val['num_tokens']:,} validation tokens ({val['num_sequences']:,} sequences, {val['num_files']} files) "
            f"in {seconds:.1f}s")
    return index


def _write_index(out: Path, units: list[Unit], summaries: dict, plan: dict, seq_len: int, tokenizer: Path) -> dict:
    ordered = [summaries[u.name] for u in units]
    splits = {}
    for split in SPLITS:
        shards = [{"file": s["splits"][split]["file"], "tokens": s["splits"][split]["tokens"],
                   "documents": s["splits"][split]["documents"]} for s in ordered]
        num_tokens = sum(s["tokens"] for s in shards)
        splits[split] = {"num_tokens": num_tokens, "num_documents": sum(s["documents"] for s in shards),
                         "num_sequences": max(0, (num_tokens - 1) // seq_len), "shards": shards}
    held_out = [(s["language"], key) for s in ordered for key in s["validation_files"]]
    splits["validation"]["num_files"] = len(held_out)
    splits["validation"]["files_list"] = VALIDATION_FILES
    if splits["train"]["num_sequences"] == 0:
        raise DataError(f"{plan['data_dir']}: corpus too small: {splits['train']['num_tokens']} training tokens do not "
                        f"fill one sequence of {seq_len} + 1 tokens")
    languages = {}
    for s in ordered:
        entry = languages.setdefault(s["language"], {"text_bytes": 0, "train_tokens": 0, "validation_tokens": 0})
        entry["text_bytes"] += s["text_bytes"]
        entry["train_tokens"] += s["splits"]["train"]["tokens"]
        entry["validation_tokens"] += s["splits"]["validation"]["tokens"]
    index = {
        "format": FORMAT,
        "seq_len": seq_len,
        "window": "sequence i = tokens [i*seq_len, i*seq_len + seq_len + 1) of the split's stream (stride seq_len)",
        "dtype": plan["dtype"],
        "vocab_size": plan["vocab_size"],
        "eos_id": plan["eos_id"],
        "tokenizer": {"file": "tokenizer.json", "source": str(tokenizer.resolve()), "sha256": plan["tokenizer_sha256"]},
        "data_dir": plan["data_dir"],
        "mix": plan["mix"],
        "fim": plan["fim"],
        "missing_languages": [lang for lang in plan["mix"]["languages"] if lang not in languages],
        "validation_fraction": plan["validation_fraction"],
        "languages": languages,
        "splits": splits,
    }
    atomic_write_text(out / VALIDATION_FILES, "".join(f"{lang}\t{key}\n" for lang, key in held_out))
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1) + "\n")
    return index


# ---- reading ---------------------------------------------------------------------------------

class PackedTokens:
    """The sequences of one split of a pack directory: `ds[i]` is a numpy array of seq_len + 1 ids.

    Shards are memory-mapped on first access (and again after unpickling, so DataLoader workers
    each map their own instead of receiving copies).
    """

    def __init__(self, pack_dir: str | Path, split: str = "train"):
        self.pack_dir = Path(pack_dir)
        index_path = self.pack_dir / INDEX_FILE
        try:
            index = json.loads(index_path.read_text())
        except FileNotFoundError:
            raise DataError(f"{index_path} not found: not a finished pack (run `stablecode data pack`)") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{index_path}: unreadable ({e})") from None
        if index.get("format") != FORMAT:
            raise DataError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}")
        if split not in index["splits"]:
            raise DataError(f"{index_path}: no split {split!r} (has {sorted(index['splits'])})")
        self.index = index
        self.split = split
        self.seq_len = int(index["seq_len"])
        self.vocab_size = int(index["vocab_size"])
        self.eos_id = int(index["eos_id"])
        self.dtype = np.dtype(index["dtype"])
        self.shards = []
        for shard in index["splits"][split]["shards"]:
            if shard["tokens"] == 0:
                continue
            path = self.pack_dir / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            size = path.stat().st_size if path.exists() else None
            if size != expected:
                raise DataError(f"{path}: {'missing' if size is None else f'{size} bytes'}, index.json says "
                                f"{expected} bytes; the pack is damaged, run `stablecode data pack` again")
            self.shards.append((path, int(shard["tokens"])))
        self.starts = np.cumsum([0] + [n for _, n in self.shards])
        self.num_tokens = int(self.starts[-1])
        self._maps = None

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """A copy of tokens [start, stop) of the split's stream."""
        if self._maps is None:
            self._maps = [np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)) for path, n in self.shards]
        pieces = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            offset = start - self.starts[k]
            take = min(stop - start, self.shards[k][1] - offset)
            pieces.append(self._maps[k][offset:offset + take])
            start += take
            k += 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        start = i * self.seq_len
        return self.tokens(start, start + self.seq_len + 1)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = None
        return state
