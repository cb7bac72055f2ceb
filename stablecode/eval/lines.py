"""Line completion on held-out source files, scored as CodeXGLUE's line-level code completion.

For a sampled line of a file the model sees the file up to the end of the previous non-blank line
and writes greedily until it has finished a line with content; that line is the prediction. (The
prompt stops before the newline, not after it: byte-level BPE merges a newline with the
indentation after it into one token, so a prompt cut after the newline would ask the model to
continue from a token boundary it never saw in training.)

Metrics, as CodeXGLUE's evaluator computes them on stripped lines: exact match (the same tokens
when split on whitespace) and edit similarity (fuzzywuzzy's `fuzz.ratio`: 100 · (1 − indel
distance / total length), rounded, 0 when either side is empty), averaged over lines. A trivial
baseline — repeat the previous non-blank line — is scored on the same lines.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from stablecode.errors import StablecodeError
from stablecode.inference.request import Request

DEFAULT_EXTENSIONS = (".py",)


class LinesError(StablecodeError):
    """Line-completion input that cannot be used (no files, an unreadable pack, ...)."""


@dataclass
class LineExample:
    source: str  # file name or key
    line_number: int  # 1-based
    prompt: str  # the file up to the end of the previous non-blank line (no newline)
    target: str  # the line to predict
    previous: str  # the previous non-blank line (the baseline's prediction)


# ---- metrics -------------------------------------------------------------------------------------

def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyrö): O(len(b)) big-int steps."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, char in enumerate(a):
        masks[char] = masks.get(char, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for char in b:
        u = v & masks.get(char, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def edit_similarity(prediction: str, target: str) -> int:
    """fuzzywuzzy's fuzz.ratio: round(100 · (1 − indel distance / (len a + len b))); 0 if either is empty."""
    if not prediction or not target:
        return 0
    total = len(prediction) + len(target)
    return int(round(100 * 2 * lcs_length(prediction, target) / total))


def exact_match(prediction: str, target: str) -> bool:
    return prediction.split() == target.split()


def score(predictions: list[str], targets: list[str]) -> dict:
    """CodeXGLUE line-level metrics on stripped lines, in percent."""
    pairs = [(p.strip(), t.strip()) for p, t in zip(predictions, targets, strict=True)]
    count = max(len(pairs), 1)
    return {"exact_match": 100 * sum(exact_match(p, t) for p, t in pairs) / count,
            "edit_similarity": sum(edit_similarity(p, t) for p, t in pairs) / count}


# ---- data ----------------------------------------------------------------------------------------

def _pack_sources(pack_dir: Path, languages: tuple[str, ...]) -> list[tuple[str, str]]:
    """The held-out (validation) files of a pack directory made by `stablecode data pack`."""
    from stablecode.data.starcoder import DataMix, iter_documents

    try:
        index = json.loads((pack_dir / "index.json").read_text())
        data_dir, fraction = index["data_dir"], index["validation_fraction"]
        packed_languages = index["mix"]["languages"]
    except (OSError, ValueError, KeyError) as e:
        raise LinesError(f"{pack_dir / 'index.json'}: not a pack index ({e})") from None
    chosen = tuple(lang for lang in packed_languages if lang in languages)
    if not chosen:
        raise LinesError(f"{pack_dir}: holds {packed_languages}, none of the languages asked for ({list(languages)})")
    sources = []
    for docs in iter_documents(data_dir, DataMix(chosen), split="validation", validation_fraction=fraction):
        sources.extend((f"{d.language}/{d.key}", d.content) for d in docs)
    return sources


def collect_sources(paths: list[str | os.PathLike], languages: tuple[str, ...] = ("python",),
                    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS) -> list[tuple[str, str]]:
    """(name, text) of the files to sample lines from: a pack directory's validation split, the files
    with `extensions` under a directory, or files named one by one."""
    sources = []
    for path in map(Path, paths):
        if (path / "index.json").is_file():
            sources.extend(_pack_sources(path, languages))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in extensions)
            sources.extend((str(p), p.read_text(encoding="utf-8", errors="replace")) for p in files)
        elif path.is_file():
            sources.append((str(path), path.read_text(encoding="utf-8", errors="replace")))
        else:
            raise LinesError(f"{path}: no such file or directory")
    if not sources:
        raise LinesError(f"no source files found in {', '.join(map(str, paths))} "
                         f"(extensions {', '.join(extensions)})")
    return sources


def _candidates(text: str, source: str) -> list[LineExample]:
    lines = text.split("\n")
    offset = 0
    examples = []
    previous_end, previous = None, None  # end offset and text of the last non-blank line
    for number, line in enumerate(lines, 1):
        if line.strip():
            if previous_end is not None:
                examples.append(LineExample(source, number, text[:previous_end], line, previous))
            previous_end, previous = offset + len(line), line
        offset += len(line) + 1
    return examples


def sample_lines(sources: list[tuple[str, str]], count: int, seed: int = 0) -> list[LineExample]:
    """`count` lines with content (each after at least one non-blank line), spread over the files:
    files in a seeded random order, one random line from each per round."""
    rng = random.Random(seed)
    pools = [c for name, text in sources if (c := _candidates(text, name))]
    rng.shuffle(pools)
    for pool in pools:
        rng.shuffle(pool)
    return take_round_robin(pools, count)


def take_round_robin(pools: list[list], count: int) -> list:
    """Up to `count` items, one from the end of each pool per round, so no one file dominates."""
    chosen = []
    while len(chosen) < count and any(pools):
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(pool.pop())
    return chosen


# ---- completion ----------------------------------------------------------------------------------

class NextLineRequest(Request):
    """Stops once the text holds a finished line with content after the prompt's own (last) line."""

    def append(self, token_id: int) -> str:
        piece = super().append(token_id)
        if not self.finished and predicted_line(self.text, finished=False) is not None:
            self.finish_reason = "stop"
        return piece


def predicted_line(generated: str, finished: bool = True) -> str | None:
    """The first line with content after the prompt's last line; at the end of generation an unfinished
    one counts. None while there is none yet."""
    lines = generated.split("\n")[1:]  # [0] continues the prompt's last line
    for i, line in enumerate(lines):
        if line.strip() and (finished or i < len(lines) - 1):
            return line
    return None


def complete_lines(model, tokenizer, examples: list[LineExample], max_new_tokens: int = 64,
                   batch_size: int = 8, progress: bool = False, token_healing: bool = True) -> list[str]:
    """Greedy next-line predictions for `examples`, batched (with token healing, as the server does)."""
    from tqdm import tqdm

    from stablecode.inference.engine import Engine, Failed, Finished

    context = model.config.max_position_embeddings
    # Only the end of a long file fits the context; cut by characters before tokenizing (a token holds
    # at least one character, so this keeps every token that can fit).
    keep_chars = context * 8
    requests = [NextLineRequest(tokenizer.encode(e.prompt[-keep_chars:]), tokenizer, context,
                                max_new_tokens=max_new_tokens, device=model.device, token_healing=token_healing)
                for e in examples]
    bar = tqdm(total=len(examples), unit="line", desc="completing lines", disable=not progress, dynamic_ncols=True)
    for index, event in Engine(model, max_batch=batch_size).run(requests):
        if isinstance(event, Failed):
            raise LinesError(f"completing line {index} failed: {event.message}")
        if isinstance(event, Finished):
            bar.update(1)
    bar.close()
    return [predicted_line(r.text) or "" for r in requests]


def evaluate_lines(model, tokenizer, sources: list[tuple[str, str]], num_lines: int = 1000, seed: int = 0,
                   max_new_tokens: int = 64, batch_size: int = 8, progress: bool = False,
                   out_dir: str | os.PathLike | None = None, model_name: str = "", token_healing: bool = True) -> dict:
    """Sample lines, complete them, score model and baseline; write `lines_report.json` and
    `lines_results.jsonl` to `out_dir` when given. Returns the report."""
    from stablecode.atomic import atomic_write_text

    if num_lines < 1:
        raise ValueError(f"the number of lines must be >= 1, got {num_lines}")
    examples = sample_lines(sources, num_lines, seed)
    if not examples:
        raise LinesError("the source files hold no line with content after another")
    started = time.monotonic()
    predictions = complete_lines(model, tokenizer, examples, max_new_tokens, batch_size, progress, token_healing)
    seconds = time.monotonic() - started
    targets = [e.target for e in examples]
    report = {
        "lines": len(examples),
        "files": len({e.source for e in examples}),
        "model": score(predictions, targets),
        "baseline_previous_line": score([e.previous for e in examples], targets),
        "settings": {"model": model_name or model.config.name, "num_lines": num_lines, "seed": seed,
                     "max_new_tokens": max_new_tokens, "greedy": True, "token_healing": token_healing,
                     "context_tokens": model.config.max_position_embeddings},
        "wall_time_s": round(seconds, 1),
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        rows = [{"source": e.source, "line": e.line_number, "target": e.target, "prediction": p,
                 "baseline": e.previous, "exact_match": exact_match(p.strip(), e.target.strip()),
                 "edit_similarity": edit_similarity(p.strip(), e.target.strip())}
                for e, p in zip(examples, predictions)]
        atomic_write_text(out_dir / "lines_results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(out_dir / "lines_report.json", json.dumps(report, indent=1) + "\n")
        report["report_file"] = str(out_dir / "lines_report.json")
    return report


def format_lines_report(report: dict) -> str:
    m, b = report["model"], report["baseline_previous_line"]
    return "\n".join([
        f"{report['lines']} lines from {report['files']} files",
        f"{'':<26}{'exact match %':>14}{'edit similarity':>17}",
        f"{'model (greedy)':<26}{m['exact_match']:>14.2f}{m['edit_similarity']:>17.2f}",
        f"{'baseline: previous line':<26}{b['exact_match']:>14.2f}{b['edit_similarity']:>17.2f}",
        f"({report['wall_time_s']} s)",
    ])

