"""Pre-training as GPT-NeoX trains this family, on one process or many under `torchrun`.

- `config`: TrainConfig, the one description of a run.
- `checkpoints`: atomic training checkpoints with per-file checksums, and finding the one to resume.
- `loop`: distributed setup, optimisation, the training loop, evaluation, export.
- `cli`: `stablecode train`; `__main__`: `python -m stablecode.train` (and torchrun).
"""

from stablecode.train.config import TrainConfig
from stablecode.train.loop import learning_rate, parameter_groups, train

__all__ = ["TrainConfig", "learning_rate", "parameter_groups", "train"]
