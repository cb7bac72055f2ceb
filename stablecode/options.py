"""Command-line options that several commands share, each declared once.

Torch-free: `stablecode --help` and every command's `--help` run without importing torch.
"""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
QUANTIZE_CHOICES = ("int8", "int4")
# What the KV cache stores: the activations' dtype ("auto"), or int8 with a float scale per key and value row.
KV_CACHE_DTYPES = ("auto", "int8")


def add_model_options(parser: argparse.ArgumentParser, quantize: bool = True) -> None:
    """--model, --dtype, --device, --quantize, --threads: which model to load and how to run it."""
    parser.add_argument("--model", default=None,
                        help="checkpoint directory in Hugging Face layout, a Hub id already in the local "
                             "Hugging Face cache, or an embedded model name (default: the embedded stablecode-nano)")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="weights dtype (default: as stored)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    if quantize:
        parser.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                            help="weight-only quantization while loading")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")


def add_kv_cache_option(parser: argparse.ArgumentParser) -> None:
    """--kv-cache: what the inference engine's KV cache stores."""
    parser.add_argument("--kv-cache", default="auto", choices=KV_CACHE_DTYPES,
                        help="KV cache storage: auto (the model's activation dtype, default) or int8 (half of bf16's "
                             "memory and attention reads, for long prompts; slightly less exact)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's thread count from --threads, if given."""
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# The escapes a stop string may use on a command line, where a newline is hard to type.
STOP_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def stop_string(text: str) -> str:
    r"""A --stop value: `\n`, `\t` and `\r` mean newline, tab and carriage return, `\\` a backslash;
    any other backslash is kept as it is."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in STOP_ESCAPES:
            out.append(STOP_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    if not out:
        raise argparse.ArgumentTypeError("a stop string cannot be empty")
    return "".join(out)


def add_stop_option(parser: argparse.ArgumentParser, help: str = "stop string (repeatable)") -> None:
    parser.add_argument("--stop", action="append", default=[], type=stop_string,
                        help=help + r"; \n, \t and \r mean newline, tab and carriage return, \\ a backslash")
