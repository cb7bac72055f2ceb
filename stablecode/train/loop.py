"""The training loop: pre-training as GPT-NeoX trains this family, on one process or many under `torchrun`.

AdamW (β 0.9/0.95, eps 1e-8, weight decay 0.1 except norms and biases), linear warmup then cosine
decay to 10% of the peak rate, gradient clipping at 1.0, gradient accumulation, bf16 autocast,
small_init/wang_init. Scale-out uses PyTorch's own engine: DistributedDataParallel with
ZeroRedundancyOptimizer (ZeRO-1), FSDP2 `fully_shard`, or tensor parallelism with
`torch.distributed.tensor.parallel` (whole heads per shard).

Checkpoints (stablecode.train.checkpoints) are written whole or not at all: a run killed at any
moment resumes from its last complete checkpoint with the same losses as an uninterrupted run. A
run with no checkpoint yet can start from the weights of an exported model (`init_from`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from stablecode.atomic import atomic_path
from stablecode.checkpoint import save_checkpoint
from stablecode.config import ModelConfig
from stablecode import kernels
from stablecode.errors import StablecodeError
from stablecode.machine import cpu_flags
from stablecode.model import GPTNeoX, init_weights
from stablecode.train.checkpoints import (CheckpointDamaged, _zero_optimizer_class, copy_weights, latest_checkpoint,
                                          load_weights, restore, save_training_checkpoint, sweep_staging, warn)
from stablecode.train.growth import widen
from stablecode.train.config import TrainConfig


# ---- distributed setup ---------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dp_group: object = None
    tp_mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(tensor_parallel: int) -> Distributed:
    """Read torchrun's environment; gloo on CPU, nccl on GPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if tensor_parallel != 1:
            raise StablecodeError("tensor_parallel > 1 needs several processes: launch with torchrun")
        return Distributed(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if world_size % tensor_parallel:
        raise StablecodeError(f"world size {world_size} is not divisible by tensor_parallel {tensor_parallel}")
    from torch.distributed.device_mesh import init_device_mesh

    dp_size = world_size // tensor_parallel
    mesh = init_device_mesh(device.type, (dp_size, tensor_parallel), mesh_dim_names=("dp", "tp"))
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, dp_size=dp_size,
                       dp_rank=mesh.get_local_rank("dp"), tp_size=tensor_parallel, device=device,
                       dp_group=mesh.get_group("dp"), tp_mesh=mesh["tp"])


def apply_tensor_parallel(model: GPTNeoX, tp_mesh) -> None:
    """Column-wise qkv and h→4h, row-wise attention.dense and 4h→h; the per-head qkv layout keeps heads whole."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    heads, tp = model.config.num_heads, tp_mesh.size()
    if heads % tp:
        raise StablecodeError(f"{heads} attention heads cannot be split across tensor_parallel={tp}")
    plan = {"attention.query_key_value": ColwiseParallel(), "attention.dense": RowwiseParallel(),
            "mlp.dense_h_to_4h": ColwiseParallel(), "mlp.dense_4h_to_h": RowwiseParallel()}
    for block in model.gpt_neox.layers:
        parallelize_module(block, tp_mesh, plan)


# ---- optimisation --------------------------------------------------------------------------------

def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio × lr at max_steps."""
    warmup = max(1, round(config.warmup_fraction * config.max_steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, config.max_steps - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases (and nothing else 1-D) are exempt."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_, also when tensor parallelism mixes sharded (DTensor) and replicated gradients."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if len({isinstance(g, DTensor) for g in grads}) < 2:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    # A sharded gradient's norm is reduced over its shards; a replicated one is the same everywhere.
    norms = [torch.linalg.vector_norm(g) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
    scale = min(1.0, max_norm / (float(total) + 1e-6))
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """6N for the weights plus attention's 12·L·h·T (PaLM's accounting), non-embedding N."""
    non_embedding = config.num_parameters - config.vocab_size * config.hidden_size
    return 6 * non_embedding + 12 * config.num_layers * config.hidden_size * seq_len


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achievable dense matmul FLOP/s on this device, for MFU on machines without a datasheet figure."""
    n = 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    iterations, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        a @ b
        iterations += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * iterations / (time.perf_counter() - start)


# ---- data ----------------------------------------------------------------------------------------

class BatchSampler:
    """Deterministic order of packed sequences: a seeded permutation per epoch, indexed by step.

    The data position is the step number alone, so resuming needs no iterator state and every
    data-parallel layout of the same global batch sees the same sequences.
    """

    def __init__(self, num_sequences: int, global_batch: int, seed: int):
        if num_sequences < global_batch:
            raise StablecodeError(f"the data holds {num_sequences} sequences, fewer than one global batch "
                                  f"({global_batch}); lower micro_batch_size/grad_accum_steps or add data")
        self.num_sequences, self.global_batch, self.seed = num_sequences, global_batch, seed
        self.per_epoch = num_sequences // global_batch
        self._epoch, self._order = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._order = np.random.default_rng(self.seed + epoch).permutation(self.num_sequences)
            self._epoch = epoch
        return self._order[offset * self.global_batch:(offset + 1) * self.global_batch]


def load_batch(dataset, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(np.stack([np.asarray(dataset[int(i)], dtype=np.int64) for i in indices]))
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


# ---- the run ------------------------------------------------------------------------------------

def build_model(config: TrainConfig) -> ModelConfig:
    if config.model.endswith(".json"):
        return ModelConfig.from_json_file(config.model)
    return ModelConfig.from_preset(config.model)


def open_data(config: TrainConfig, split: str):
    from stablecode.data.packing import PackedTokens

    return PackedTokens(config.data, split=split)


def train(config: TrainConfig, train_data=None, validation_data=None, progress: bool = True) -> dict:
    """Run (or resume) training; returns the loss history. Datasets default to the packed `config.data`."""
    ctx = setup_distributed(config.tensor_parallel)
    if config.threads:
        torch.set_num_threads(config.threads)
    model_config = build_model(config)
    train_data = train_data if train_data is not None else open_data(config, "train")
    fim_rate = float((getattr(train_data, "index", None) or {}).get("fim", {}).get("rate", 0.0))
    model_config = model_config.replace(fim=fim_rate > 0)  # the checkpoint's config.json says what it learned
    if validation_data is None and config.data:
        with contextlib.suppress(StablecodeError, OSError, ValueError, KeyError):
            validation_data = open_data(config, "validation")
    if validation_data is not None and len(validation_data) == 0:
        validation_data = None
    seq_len = len(train_data[0]) - 1
    if config.seq_len is not None and config.seq_len != seq_len:
        raise StablecodeError(f"the packed data has sequences of {seq_len} tokens, the config asks for {config.seq_len}")
    if seq_len > model_config.max_position_embeddings:
        raise StablecodeError(f"sequence length {seq_len} is longer than the model's "
                              f"{model_config.max_position_embeddings} positions")
    vocab = getattr(train_data, "vocab_size", None)
    if vocab is not None and vocab > model_config.vocab_size:
        raise StablecodeError(f"the data's tokenizer has {vocab} tokens but the model only {model_config.vocab_size}")

    out = Path(config.out)
    checkpoints = out / "checkpoints"
    if ctx.is_main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        swept = sweep_staging(checkpoints)
        if swept:
            warn(f"removed what an interrupted save left in {checkpoints}: {', '.join(sorted(swept))}")
    if ctx.world_size > 1:
        dist.barrier()
    torch.manual_seed(config.seed)
    if ctx.device.type == "cpu" and "avx512f" in cpu_flags():
        kernels.load()  # the training attention kernel (built once per machine); elsewhere SDPA, no build
    model = GPTNeoX(model_config).to(ctx.device)
    init_weights(model, torch.Generator(device="cpu").manual_seed(config.seed) if ctx.device.type == "cpu" else None)
    model.train()
    unwrapped = model
    if ctx.tp_size > 1:
        apply_tensor_parallel(model, ctx.tp_mesh)
    groups = parameter_groups(model, config.weight_decay)
    adam = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    if ctx.dp_size > 1 and config.sharding == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.gpt_neox.layers:
            fully_shard(block)
        fully_shard(model)
        optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), **adam)
    elif ctx.dp_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        if ctx.tp_size > 1:
            raise StablecodeError("data x tensor parallel together needs sharding='fsdp'")
        model = DistributedDataParallel(model, process_group=ctx.dp_group)
        optimizer = _zero_optimizer_class()(parameter_groups(model.module, config.weight_decay),
                                            optimizer_class=torch.optim.AdamW, process_group=ctx.dp_group, **adam)
    else:
        fused = config.fused_optimizer and ctx.tp_size == 1
        optimizer = torch.optim.AdamW(groups, **adam, **({"fused": True} if fused else {}))
    # Compiled whole, the loss joins the model's graph: the fp32 logits and their log-softmax are
    # never written out in full, in the forward pass or the backward.
    loss_of = torch.compile(next_token_loss) if config.compile else next_token_loss
    bf16 = config.precision == "bf16"

    tokenizer_file = config.tokenizer or _pack_tokenizer(config)
    history = {"step": [], "loss": [], "lr": [], "grad_norm": [], "tokens_per_s": [], "mfu": [],
               "val_step": [], "val_loss": [], "tokens_seen": 0, "train_seconds": 0.0}
    start_step = 0
    resumed = latest_checkpoint(checkpoints)
    if resumed is not None:
        state = restore(resumed, model, optimizer, ctx)
        start_step, history = state["step"], state["history"]
        if ctx.is_main:
            print(f"resumed from {resumed} at step {start_step}", file=sys.stderr)
    elif config.init_from:
        source = Path(config.init_from)
        try:
            source_config = ModelConfig.from_json_file(source / "config.json")
            if source_config.hidden_size == model_config.hidden_size:
                load_weights(source, model)
            else:
                from safetensors.torch import load_file

                narrow = load_file(str(source / "model.safetensors"))
                copy_weights(widen(narrow, source_config, model_config, seed=config.seed), model, source)
                if ctx.is_main:
                    print(f"widened {source_config.hidden_size} → {model_config.hidden_size}: the new model "
                          f"computes what {source} computes", file=sys.stderr)
        except (CheckpointDamaged, OSError) as e:
            raise StablecodeError(f"cannot start from {source}: {e}") from None
        history["init_from"] = str(source.resolve())
        history["tokens_before"] = _tokens_seen(source)
        if ctx.is_main:
            print(f"no checkpoint in {checkpoints}: starting from the weights of {source}", file=sys.stderr)

    global_batch = config.micro_batch_size * config.grad_accum_steps * ctx.dp_size
    sampler = BatchSampler(len(train_data), global_batch, config.seed)
    flops_per_token = training_flops_per_token(model_config, seq_len)
    peak_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    peak = config.peak_tflops * 1e12 if config.peak_tflops else measure_peak_flops(ctx.device, peak_dtype)
    peak_measured_again = False
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.max_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)

    session_started = time.monotonic()
    for step in range(start_step, config.max_steps):
        started = time.perf_counter()
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = sampler.indices(step)
        per_rank = len(indices) // ctx.dp_size
        mine = indices[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank]
        loss_sum = torch.zeros((), device=ctx.device)
        for micro in range(config.grad_accum_steps):
            chunk = mine[micro * config.micro_batch_size:(micro + 1) * config.micro_batch_size]
            inputs, targets = load_batch(train_data, chunk, ctx.device)
            sync = (contextlib.nullcontext() if micro == config.grad_accum_steps - 1 or not hasattr(model, "no_sync")
                    else model.no_sync())
            with sync:
                loss = loss_of(model, inputs, targets, bf16)
                (loss / config.grad_accum_steps).backward()
            loss_sum += loss.detach()
        grad_norm = clip_gradients(list(model.parameters()), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = loss_sum / config.grad_accum_steps
        if ctx.dp_size > 1:
            dist.all_reduce(mean_loss, group=ctx.dp_group)
            mean_loss /= ctx.dp_size
        elapsed = time.perf_counter() - started
        tokens = global_batch * seq_len
        history["tokens_seen"] += tokens
        history["train_seconds"] += elapsed
        tokens_per_s = tokens / elapsed
        mfu = tokens_per_s * flops_per_token / (peak * ctx.world_size)
        if mfu > 1 and not config.peak_tflops and not peak_measured_again:
            # The peak was measured while something else held the cores (a build, a benchmark): once more.
            peak_measured_again = True
            peak = max(peak, measure_peak_flops(ctx.device, peak_dtype))
            mfu = tokens_per_s * flops_per_token / (peak * ctx.world_size)
        for key, value in (("step", step + 1), ("loss", float(mean_loss)), ("lr", lr),
                           ("grad_norm", float(grad_norm)), ("tokens_per_s", tokens_per_s), ("mfu", mfu)):
            history[key].append(value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(mean_loss):.4f}", lr=f"{lr:.2e}", gnorm=f"{float(grad_norm):.2f}",
                            tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}")
        if ctx.is_main and (step + 1) % config.log_every == 0:
            _append_log(out / "log.jsonl", {k: history[k][-1] for k in ("step", "loss", "lr", "grad_norm",
                                                                          "tokens_per_s", "mfu")})
        out_of_time = config.time_limit_s is not None and time.monotonic() - session_started >= config.time_limit_s
        if ctx.world_size > 1:  # every rank stops at the same step
            flag = torch.tensor([float(out_of_time)], device=ctx.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        last = step + 1 == config.max_steps or out_of_time
        if validation_data is not None and ((step + 1) % config.eval_every == 0 or last):
            val_loss = evaluate(model, validation_data, config, ctx)
            history["val_step"].append(step + 1)
            history["val_loss"].append(val_loss)
            if ctx.is_main:
                _append_log(out / "log.jsonl", {"step": step + 1, "val_loss": val_loss})
                plot_losses(history, out / "loss.png")
            model.train()
        if (step + 1) % config.save_every == 0 or last:
            save_training_checkpoint(checkpoints, model, unwrapped, optimizer, step + 1, config, ctx, history,
                                     tokenizer_file, keep=config.keep_checkpoints)
        if out_of_time:
            if ctx.is_main:
                print(f"time limit of {config.time_limit_s:g} s reached: stopped at step {step + 1} "
                      f"(checkpoint saved; the same command continues)", file=sys.stderr)
            break
    if bar is not None:
        bar.close()
    if ctx.is_main and (not history["step"] or history["step"][-1] == config.max_steps):
        final = latest_checkpoint(checkpoints)
        if final is not None:
            export_final(final, out / "final", config)
    return history


def next_token_loss(model, inputs: torch.Tensor, targets: torch.Tensor, bf16: bool,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of model(inputs) against targets: the model under bf16 autocast when `bf16`,
    the softmax in fp32."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model, dataset, config: TrainConfig, ctx: Distributed) -> float:
    """Mean next-token loss over the first eval_batches × micro_batch_size validation sequences."""
    model.eval()
    count = min(len(dataset), config.eval_batches * config.micro_batch_size)
    total = torch.zeros((), device=ctx.device)
    for start in range(0, count, config.micro_batch_size):
        inputs, targets = load_batch(dataset, range(start, min(count, start + config.micro_batch_size)), ctx.device)
        total += next_token_loss(model, inputs, targets, config.precision == "bf16", reduction="sum")
    return float(total) / (count * (len(dataset[0]) - 1))


def export_final(checkpoint: Path, destination: Path, config: TrainConfig) -> None:
    """The last checkpoint as a plain inference checkpoint in the export dtype (no training state)."""
    from stablecode.checkpoint import load_model, parse_dtype

    model = load_model(checkpoint, dtype=parse_dtype(config.export_dtype))
    extra = {"train_config.json": (checkpoint / "train_config.json").read_bytes()}
    tokenizer = checkpoint / "tokenizer.json"
    save_checkpoint(model, destination, tokenizer_file=tokenizer if tokenizer.exists() else None, extra_files=extra)


def _tokens_seen(model_dir: Path) -> int:
    """Training tokens behind an exported model (its training_summary.json), 0 when unrecorded."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        summary = json.loads((model_dir / "training_summary.json").read_text())
        return int(summary.get("tokens_seen", 0)) + int(summary.get("tokens_before", 0))
    return 0


def _pack_tokenizer(config: TrainConfig) -> str | None:
    """The tokenizer.json the packed data was made with (recorded in its index.json)."""
    if not config.data:
        return None
    with contextlib.suppress(OSError, json.JSONDecodeError):
        recorded = json.loads((Path(config.data) / "index.json").read_text()).get("tokenizer")
        name = recorded.get("file") if isinstance(recorded, dict) else recorded
        for candidate in (Path(config.data) / str(name), Path(str(name))):
            if name and candidate.is_file():
                return str(candidate)
    return None


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_losses(history: dict, path: Path) -> None:
    """Train and validation loss curves to a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot(history["step"], history["loss"], label="train", linewidth=0.8, alpha=0.8)
    if history["val_step"]:
        axis.plot(history["val_step"], history["val_loss"], "o-", label="validation", markersize=3)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
