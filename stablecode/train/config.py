"""TrainConfig: everything a run needs, saved with every checkpoint so a run can be reproduced."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from stablecode.errors import StablecodeError


@dataclass
class TrainConfig:
    """One training run. Every field is also a `stablecode train --<field>` option."""

    data: str = ""  # packed token directory (stablecode data pack)
    out: str = "runs/train"
    model: str = "stablecode-nano"  # preset name, or a config.json path
    tokenizer: str | None = None  # tokenizer.json copied next to the weights (default: the pack's)
    init_from: str | None = None  # model directory whose weights start a run that has no checkpoint yet
    seq_len: int | None = None  # default: the packed data's
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 1.6e-4
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.01
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "bf16"  # bf16 autocast (fp32 master weights) or fp32
    seed: int = 1234
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 100
    keep_checkpoints: int = 3  # complete checkpoints kept; older ones are deleted after each save
    log_every: int = 1
    tensor_parallel: int = 1
    sharding: str = "zero1"  # with several data-parallel ranks: zero1 (DDP + ZeroRedundancyOptimizer) or fsdp
    export_dtype: str = "bfloat16"
    compile: bool = False
    fused_optimizer: bool = True  # one fused AdamW kernel for all parameters (single process)
    threads: int | None = None  # torch intra-op threads (default: torch's choice)
    time_limit_s: float | None = None  # stop (with a checkpoint) after the step that passes this many seconds
    peak_tflops: float | None = None  # for MFU; measured with a short matmul when not given

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TrainConfig":
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StablecodeError(f"{path}: cannot read training config ({e})") from None
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise StablecodeError(f"{path}: unknown training config keys: {', '.join(sorted(unknown))}")
        return cls(**values)
