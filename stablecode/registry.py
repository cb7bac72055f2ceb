"""Names to model directories: a checkpoint path, or the name of a model shipped inside the package."""

from __future__ import annotations

import os
from pathlib import Path

from stablecode.errors import CheckpointError

EMBEDDED_MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "stablecode-nano"


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """A checkpoint directory, or the name of an embedded model (default: stablecode-nano)."""
    if model is None:
        model = DEFAULT_MODEL
    path = Path(model)
    if path.is_dir():
        return path
    embedded = EMBEDDED_MODELS_DIR / str(model)
    if embedded.is_dir() and (embedded / "config.json").exists():
        return embedded
    if str(model) == DEFAULT_MODEL:
        raise CheckpointError(f"the embedded model {DEFAULT_MODEL!r} is not installed in {embedded}; "
                              "pass --model DIR with a checkpoint directory")
    raise CheckpointError(f"{model}: no such checkpoint directory (and not an embedded model name)")


def is_embedded(directory: str | os.PathLike) -> bool:
    """Whether `directory` is one of the models shipped inside the package."""
    return Path(directory).resolve().parent == EMBEDDED_MODELS_DIR.resolve()
