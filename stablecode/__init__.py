"""stablecode: run, serve, train and evaluate the StableCode-Completion-Alpha-3B-4K model family."""

from stablecode.api import Completer
from stablecode.attribution import Attributor
from stablecode.checkpoint import load_model, save_checkpoint
from stablecode.config import PRESETS, ModelConfig
from stablecode.errors import StablecodeError
from stablecode.generate import Completion
from stablecode.model import GPTNeoX
from stablecode.sampling import SamplingParams
from stablecode.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Attributor", "Completer", "Completion", "GPTNeoX", "ModelConfig", "PRESETS", "SamplingParams",
           "StablecodeError", "Tokenizer", "load_model", "load_tokenizer", "save_checkpoint"]
__version__ = "0.1.0"
