"""`stablecode train` and `python -m stablecode.train`: options are the fields of TrainConfig."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from stablecode.errors import StablecodeError
from stablecode.train.config import TrainConfig


def add_train_command(subparsers) -> None:
    """`stablecode train [--config FILE] [--<field> VALUE ...]`: every TrainConfig field is an option."""
    p = subparsers.add_parser("train", help="pre-train a model on packed token data (works under torchrun)")
    add_train_options(p)


def add_train_options(p) -> None:
    p.add_argument("--config", type=Path, default=None, help="training config JSON (fields of TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        kind = {"int": int, "float": float, "bool": _parse_bool}.get(str(f.type).split(" ")[0], str)
        if f.name in ("peak_tflops", "time_limit_s"):
            kind = float
        elif f.name in ("seq_len", "threads"):
            kind = int
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                       help=f"default: {f.default!r}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def config_from_args(args) -> TrainConfig:
    config = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    return dataclasses.replace(config, **overrides)


def run_train(args) -> None:
    from stablecode.train.loop import train

    config = config_from_args(args)
    if not config.data:
        raise StablecodeError("no training data: pass --data PACKDIR (see `stablecode data pack`)")
    history = train(config, progress=not args.no_progress)
    if history["loss"]:
        print(f"done: step {history['step'][-1]}, loss {history['loss'][-1]:.4f}"
              + (f", validation loss {history['val_loss'][-1]:.4f}" if history["val_loss"] else ""), file=sys.stderr)
