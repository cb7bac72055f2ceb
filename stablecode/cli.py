"""`stablecode` command line: thin calls into the Python API.

Commands are registered lazily: the table below names each command's module, and only the command
being run is imported, so `stablecode --help` and `stablecode --version` never import torch. Each
subsystem declares its own commands in its own `cli.py`; options that several commands share (the
model options, --stop) are declared once in `stablecode.options`. Errors the user can fix
(StablecodeError, bad values) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from stablecode import __version__
from stablecode.errors import StablecodeError, StablecodeWarning
from stablecode.extras import missing_extra_message
from stablecode.options import (DTYPE_CHOICES, QUANTIZE_CHOICES, add_kv_cache_option, add_model_options, add_stop_option,
                                apply_threads)


# ---- init ------------------------------------------------------------------------------------

def add_init_command(subparsers) -> None:
    p = subparsers.add_parser("init", help="write a randomly initialised checkpoint (tests, benchmarks, smoke runs)")
    p.add_argument("--preset", required=True, help="named preset, e.g. stablecode-completion-alpha-3b-4k, tiny")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json to place next to the weights")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES)
    p.add_argument("--max-shard-size", type=int, default=None, help="shard the safetensors above this many bytes")
    p.set_defaults(func=run_init)


def run_init(args) -> None:
    import torch

    from stablecode.checkpoint import parse_dtype, save_checkpoint
    from stablecode.config import ModelConfig
    from stablecode.model import GPTNeoX, init_weights

    config = ModelConfig.from_preset(args.preset)
    if args.tokenizer is not None and not args.tokenizer.is_file():
        raise StablecodeError(f"{args.tokenizer}: tokenizer file not found")
    dtype = parse_dtype(args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    # Built directly in the target dtype so the 3B never needs its fp32 size in memory.
    with torch.device("cpu"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = GPTNeoX(config)
        finally:
            torch.set_default_dtype(previous)
    model.reset_rotary_tables()
    init_weights(model, generator)
    try:
        save_checkpoint(model, args.out, max_shard_size=args.max_shard_size, tokenizer_file=args.tokenizer)
    except OSError as e:
        raise StablecodeError(f"{args.out}: cannot write the checkpoint ({e.strerror or e})") from None
    print(f"wrote {config.name} ({config.num_parameters:,} parameters, {args.dtype}, seed {args.seed}) to {args.out}",
          file=sys.stderr)


# ---- info ------------------------------------------------------------------------------------

def add_info_command(subparsers) -> None:
    p = subparsers.add_parser("info", help="architecture, parameter count and memory of a model or preset")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help="checkpoint directory, cached Hub id or embedded model name")
    group.add_argument("--preset", default=None, help="named preset")
    p.set_defaults(func=run_info)


def describe(config) -> str:
    gib = 1024 ** 3
    lines = [
        f"name                     {config.name}",
        "architecture             GPT-NeoX decoder (GPTNeoXForCausalLM)",
        f"layers                   {config.num_layers}",
        f"hidden size              {config.hidden_size}",
        f"attention heads          {config.num_heads} x {config.head_dim} dims",
        f"MLP size                 {config.intermediate_size} (exact GELU)",
        f"rotary                   {config.rotary_dims} of {config.head_dim} dims per head, base {config.rotary_base:g}",
        f"residual                 {'parallel' if config.use_parallel_residual else 'sequential'}"
        + (" (one shared LayerNorm)" if config.shared_layernorm else ""),
        f"context                  {config.max_position_embeddings} tokens",
        f"vocabulary               {config.vocab_size}",
        f"tied embeddings          {config.tie_word_embeddings}",
        f"parameters               {config.num_parameters:,}",
    ]
    for dtype, size in (("float32", 4), ("bfloat16/float16", 2), ("int8 (weight-only)", 1), ("int4 (weight-only)", 0.5)):
        lines.append(f"weights {dtype:<17}{config.num_parameters * size / gib:8.2f} GiB")
    for name, per_token in (("bf16", config.kv_cache_bytes_per_token(2)), ("int8", config.kv_cache_bytes_per_token(1))):
        lines.append(f"KV cache ({name}){'':<{14 - len(name)}}{per_token:,} bytes/token, "
                     f"{per_token * config.max_position_embeddings / gib:.2f} GiB at full context")
    return "\n".join(lines)


def run_info(args) -> None:
    from stablecode.checkpoint import load_config
    from stablecode.config import ModelConfig
    from stablecode.registry import resolve_model_dir

    config = ModelConfig.from_preset(args.preset) if args.preset else load_config(resolve_model_dir(args.model))
    print(describe(config))


# ---- complete --------------------------------------------------------------------------------

def add_complete_command(subparsers) -> None:
    p = subparsers.add_parser("complete", help="complete code from a prompt (argument, --file or stdin)")
    p.add_argument("prompt", nargs="?", default=None, help="the code to complete (default: read --file or stdin)")
    p.add_argument("--file", type=Path, default=None, help="read the prompt from this file")
    add_model_options(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    add_stop_option(p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-stream", action="store_true", help="print the completion only at the end")
    p.add_argument("--show-prompt", action="store_true", help="print the prompt before the completion")
    add_kv_cache_option(p)
    p.set_defaults(func=run_complete)


def run_complete(args) -> None:
    from stablecode.api import Completer

    if args.prompt is not None and args.file is not None:
        raise StablecodeError("give the prompt as an argument or with --file, not both")
    apply_threads(args)
    if args.prompt is not None:
        prompt = args.prompt
    elif args.file is not None:
        try:
            prompt = args.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise StablecodeError(f"{args.file}: cannot read prompt ({e})") from None
    elif not sys.stdin.isatty():
        prompt = sys.stdin.read()
    else:
        raise StablecodeError("no prompt: give it as an argument, with --file, or on stdin")
    completer = Completer(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                          progress=sys.stderr.isatty(), kv_cache_dtype=args.kv_cache)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)
    if args.show_prompt:
        sys.stdout.write(prompt)
    if args.no_stream:
        result = completer.complete(prompt, **options)
        sys.stdout.write(result.text)
    else:
        for piece in completer.stream(prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")


# ---- quantize --------------------------------------------------------------------------------

def add_quantize_command(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write an int8 or int4 quantized copy of a checkpoint")
    add_model_options(p, quantize=False)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--method", required=True, choices=QUANTIZE_CHOICES)
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (multiple of 32)")
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> None:
    from stablecode.checkpoint import load_model, save_quantized
    from stablecode.quantize import quantize_model
    from stablecode.registry import resolve_model_dir

    apply_threads(args)
    source = resolve_model_dir(args.model)
    model = load_model(source, dtype=args.dtype, device=args.device)
    quantize_model(model, args.method, args.group_size)
    tokenizer = source / "tokenizer.json"
    save_quantized(model, args.out, tokenizer_file=tokenizer if tokenizer.exists() else None)
    print(f"wrote {args.method} checkpoint to {args.out}", file=sys.stderr)


# ---- entry point -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    name: str
    module: str  # imported only when this command runs (or prints its own --help)
    register: str  # function(subparsers) in `module` that adds the command's parser
    help: str
    extra: str | None = None  # the pip extra (stablecode[...]) its optional dependencies come from


COMMANDS = [
    Command("init", "stablecode.cli", "add_init_command",
            "write a randomly initialised checkpoint (tests, benchmarks, smoke runs)"),
    Command("info", "stablecode.cli", "add_info_command", "architecture, parameter count and memory of a model or preset"),
    Command("complete", "stablecode.cli", "add_complete_command",
            "complete code from a prompt (argument, --file or stdin)"),
    Command("serve", "stablecode.server.cli", "add_serve_command",
            "HTTP completion server for editors (TGI, OpenAI and Ollama APIs)"),
    Command("quantize", "stablecode.cli", "add_quantize_command", "write an int8 or int4 quantized copy of a checkpoint"),
    Command("eval", "stablecode.eval.cli", "add_eval_command", "HumanEval pass@k (sandboxed) and line completion",
            "eval"),
    Command("train", "stablecode.train.cli", "add_train_command",
            "pre-train a model on packed token data (works under torchrun)", "train"),
    Command("data", "stablecode.data.cli", "add_data_command",
            "build, read and pack training data (starcoderdata layout)", "train"),
    Command("tokenizer", "stablecode.data.cli", "add_tokenizer_command", "train a tokenizer", "train"),
    Command("index", "stablecode.attribution.cli", "add_index_command",
            "build or describe an attribution index of a training corpus", "attribution"),
    Command("attribute", "stablecode.attribution.cli", "add_attribute_command",
            "find which parts of code come from the training data, and from where", "attribution"),
]


def _command_name(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the full options of the command named in `argv` (None: of every command)."""
    parser = argparse.ArgumentParser(
        prog="stablecode", description="Run, serve, train and evaluate StableCode code-completion models.")
    parser.add_argument("--version", action="version", version=f"stablecode {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _command_name(argv) if argv is not None else None
    for command in COMMANDS:
        if argv is None or command.name == chosen:
            getattr(import_module(command.module), command.register)(subparsers)
        else:  # listed in --help, its module not imported
            subparsers.add_parser(command.name, help=command.help, add_help=False)
    return parser


def _one_line_warnings() -> None:
    """Our own warnings as `stablecode: warning: ...`, without the source line Python adds."""
    default = warnings.formatwarning

    def format(message, category, filename, lineno, line=None):
        if issubclass(category, StablecodeWarning):
            return f"stablecode: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = format


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _one_line_warnings()
    try:
        args = build_parser(argv).parse_args(argv)
        args.func(args)
    except ImportError as e:
        command = next((c for c in COMMANDS if c.name == _command_name(argv)), None)
        message = missing_extra_message(e, command.extra if command else None,
                                        f"stablecode {command.name}" if command else "this command")
        if message is None:
            raise
        print(f"stablecode: error: {message}", file=sys.stderr)
        return 2
    except StablecodeError as e:
        print(f"stablecode: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # invalid option values from the API (sampling ranges, ...)
        print(f"stablecode: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`stablecode complete ... | head`): stop quietly, as `yes | head` does.
        # Python would otherwise report the failed flush of stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
