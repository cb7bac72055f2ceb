"""stablecode: run, serve, train and evaluate the StableCode-Completion-Alpha-3B-4K model family."""

from stablecode.lazy import lazy_exports

__version__ = "0.1.0"

# The public names, imported on first use: `import stablecode.atomic` or `stablecode --help` must
# not pay for torch, and the torch-free subpackages (data, eval, attribution) must stay that way.
_EXPORTS = {
    "Attributor": "stablecode.attribution",
    "Completer": "stablecode.api",
    "Completion": "stablecode.inference.request",
    "GPTNeoX": "stablecode.model",
    "ModelConfig": "stablecode.config",
    "PRESETS": "stablecode.config",
    "SamplingParams": "stablecode.inference.sampling",
    "StablecodeError": "stablecode.errors",
    "Tokenizer": "stablecode.tokenizer",
    "load_model": "stablecode.checkpoint",
    "load_tokenizer": "stablecode.tokenizer",
    "save_checkpoint": "stablecode.checkpoint",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
