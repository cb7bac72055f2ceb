"""A small packed corpus and a tiny-model training config for the training tests."""

import dataclasses
from pathlib import Path

import pytest

from stablecode.train import TrainConfig

SOURCES = {
    "pkg/util.py": "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n" * 8,
    "pkg/shapes.py": "class Square:\n    def __init__(self, side):\n        self.side = side\n\n"
                     "    def area(self):\n        return self.side ** 2\n" * 8,
    "pkg/loops.py": "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n" * 10,
    "pkg/strings.py": "def shout(text):\n    return text.upper() + '!'\n" * 12,
    "pkg/more.py": "import os\n\n\ndef home():\n    return os.path.expanduser('~')\n" * 10,
}


@pytest.fixture(scope="module")
def packed(tmp_path_factory, byte_tokenizer_file):
    """A small corpus in the starcoderdata layout, packed into 33-token sequences."""
    from stablecode.data.packing import pack
    from stablecode.data.sources import from_dir

    root = tmp_path_factory.mktemp("train-data")
    for name, text in SOURCES.items():
        (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "src" / name).write_text(text)
    from_dir(root / "src", root / "corpus", license="MIT")
    pack(root / "corpus", byte_tokenizer_file, seq_len=32, out=root / "packed", validation_fraction=0.0, workers=1)
    return root / "packed"


def _config_for(packed: Path, out: Path, **changes) -> TrainConfig:
    base = TrainConfig(data=str(packed), out=str(out), model="tiny", micro_batch_size=2, max_steps=6, lr=3e-3,
                       precision="fp32", eval_every=1000, save_every=3, peak_tflops=0.1, seed=7)
    return dataclasses.replace(base, **changes)


@pytest.fixture
def config_for():
    """config_for(packed, out, **changes) -> a TrainConfig of the tiny model on the packed corpus"""
    return _config_for
