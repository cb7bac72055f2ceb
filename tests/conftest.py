import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STARCODER_TOKENIZER = SHARED / "tokenizers" / "starcoder-49k"


@pytest.fixture(scope="session")
def starcoder_tokenizer_dir():
    if not (STARCODER_TOKENIZER / "tokenizer.json").exists():
        pytest.skip("../shared/tokenizers/starcoder-49k is not present (only in the project's workspace)")
    return STARCODER_TOKENIZER


@pytest.fixture(scope="session")
def byte_tokenizer_file(tmp_path_factory):
    """A small byte-level BPE tokenizer (512 tokens) trained on the fly, StarCoder-style specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<fim_prefix>", "<fim_middle>",
                                                                  "<fim_suffix>", "<fim_pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
              "class Foo:\n    def __init__(self):\n        self.x = 1\n", "héllo wörld ünïcode ✓ 日本語\n"] * 50
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, byte_tokenizer_file):
    """A random `tiny` checkpoint directory with a tokenizer, written by our own save path."""
    from stablecode import GPTNeoX, ModelConfig, save_checkpoint
    from stablecode.model import init_weights

    torch.manual_seed(0)
    model = GPTNeoX(ModelConfig.from_preset("tiny"))
    init_weights(model)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, out, tokenizer_file=byte_tokenizer_file)
    return out
