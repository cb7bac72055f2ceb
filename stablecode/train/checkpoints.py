"""Training checkpoints: written whole or not at all, verified on resume, found even when `latest` lies.

A checkpoint is `checkpoints/step-NNNNNNN/`: the core engine's HF layout (config.json,
model.safetensors, tokenizer.json, train_config.json), training_state.pt (step, optimizer, loss
history, RNG) and checksums.json (sha256 and size of every other file). It is built in a staging
directory `.step-NNNNNNN.partial` and renamed into place only when complete, then published by
atomically rewriting `latest`.

On resume, `latest` is tried first; when it names a missing directory, or a checkpoint whose files
do not match their checksums (a truncated copy, a bad disk), the newest checkpoint that verifies is
used instead, with a warning. Staging directories and temporary files left by a killed save are
swept at the start of a run. Older complete checkpoints beyond `keep` are deleted after each save.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stablecode.atomic import atomic_path, atomic_write_text
from stablecode.checkpoint import save_checkpoint
from stablecode.model import GPTNeoX

CHECKSUMS = "checksums.json"
TRAINING_STATE = "training_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointDamaged(Exception):
    """A checkpoint directory that cannot be resumed from (missing or corrupt files)."""


def warn(message: str) -> None:
    print(f"stablecode: warning: {message}", file=sys.stderr)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors on CPU, gathering tensor-parallel or FSDP shards."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        state[name.removeprefix("module.")] = tensor.detach().cpu()
    return state


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    atomic_write_text(directory / CHECKSUMS, json.dumps(files, indent=1) + "\n")


def verify(directory: Path) -> None:
    """Raise CheckpointDamaged unless every file listed in checksums.json is there with its size and hash."""
    if not directory.is_dir():
        raise CheckpointDamaged(f"{directory} does not exist")
    listing = directory / CHECKSUMS
    if not listing.exists():
        if not (directory / TRAINING_STATE).exists():
            raise CheckpointDamaged(f"{directory} has no {TRAINING_STATE}")
        warn(f"{directory} predates per-file checksums: resuming from it unverified")
        return
    try:
        files = json.loads(listing.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(f"{listing} is unreadable ({e})") from None
    if TRAINING_STATE not in files:
        raise CheckpointDamaged(f"{listing} does not list {TRAINING_STATE}")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointDamaged(f"{path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointDamaged(f"{path} has {size} bytes, {expected['bytes']} were written (truncated?)")
        if file_sha256(path) != expected["sha256"]:
            raise CheckpointDamaged(f"{path} does not match its sha256 (corrupted)")


def step_of(directory: Path) -> int:
    match = STEP_DIR.match(directory.name)
    return int(match.group(1)) if match else -1


def candidates(checkpoints: Path) -> list[Path]:
    """Checkpoint directories, newest first, with the one `latest` names (when it exists) in front."""
    found = sorted((p for p in checkpoints.glob("step-*") if p.is_dir() and step_of(p) >= 0), key=step_of,
                   reverse=True)
    pointer = checkpoints / "latest"
    if pointer.exists():
        named = checkpoints / pointer.read_text().strip()
        if not named.is_dir():
            if found:
                warn(f"{pointer} names {named.name}, which does not exist; using the newest complete checkpoint")
        else:
            found = [named] + [p for p in found if p != named]
    return found


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint that verifies: `latest` first, then older ones (warning about each skipped)."""
    if not checkpoints.is_dir():
        return None
    for directory in candidates(checkpoints):
        try:
            verify(directory)
            return directory
        except CheckpointDamaged as e:
            warn(f"skipping checkpoint {directory.name}: {e}")
    return None


def sweep_staging(checkpoints: Path) -> list[str]:
    """Remove what a killed save left behind: staging directories and temporary files. Returns their names."""
    removed = []
    if not checkpoints.is_dir():
        return removed
    for path in checkpoints.iterdir():
        if path.name.startswith(".") and (path.name.endswith((".partial", ".tmp", ".old"))):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def prune(checkpoints: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, never the one `latest` names."""
    if keep < 1:
        return
    pointer = checkpoints / "latest"
    current = pointer.read_text().strip() if pointer.exists() else None
    steps = sorted((p for p in checkpoints.glob("step-*") if p.is_dir() and step_of(p) >= 0), key=step_of,
                   reverse=True)
    for old in steps[keep:]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_training_checkpoint(directory: Path, model, unwrapped: GPTNeoX, optimizer, step: int, config,
                             ctx, history: dict, tokenizer_file, keep: int = 0) -> Path | None:
    """Write checkpoints/step-N (staged, checksummed, renamed), then point `latest` at it. Path on rank 0."""
    import dataclasses

    state = full_state_dict(model)
    sharded = _has_dtensor_parameters(model)  # tensor parallel or FSDP: each rank keeps its own shard
    if isinstance(optimizer, _zero_optimizer_class()):
        optimizer.consolidate_state_dict(to=0)
    optimizer_state = optimizer.state_dict() if ctx.is_main or sharded else None
    if sharded:
        optimizer_state = _local_optimizer_state(optimizer_state)
    target = directory / f"step-{step:07d}"
    staging = directory / f".{target.name}.partial"
    if ctx.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        with torch.device("meta"):
            export = GPTNeoX(unwrapped.config)
        export.load_state_dict(state, assign=True)
        extra = {"train_config.json": json.dumps(dataclasses.asdict(config), indent=2).encode()}
        save_checkpoint(export, staging, tokenizer_file=tokenizer_file, extra_files=extra)
        training_state = {"step": step, "optimizer": None if sharded else optimizer_state, "history": history,
                          "rng": {"torch": torch.get_rng_state()}}
        atomic_torch_save(training_state, staging / TRAINING_STATE)
    if sharded:
        dist.barrier()  # the staging directory exists now
        atomic_torch_save(optimizer_state, staging / f"optimizer-rank{ctx.rank}.pt")
    if ctx.world_size > 1:
        dist.barrier()
    if ctx.is_main:
        write_checksums(staging)
        if target.exists():  # a checkpoint of this step from an earlier attempt: the new one replaces it
            shutil.rmtree(target)
        staging.rename(target)
        atomic_write_text(directory / "latest", target.name + "\n")
        prune(directory, keep)
        return target
    return None


def _zero_optimizer_class():
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer


def _has_dtensor_parameters(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _local_optimizer_state(state: dict) -> dict:
    from torch.distributed.tensor import DTensor

    def local(value):
        return value.to_local() if isinstance(value, DTensor) else value

    return {"state": {k: {n: local(v) for n, v in s.items()} for k, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_weights(source: Path, model: torch.nn.Module) -> None:
    """Copy the weights of a checkpoint or model directory into `model` (sharded parameters included)."""
    from safetensors.torch import load_file

    copy_weights(load_file(str(source / "model.safetensors")), model, source)


def copy_weights(weights: dict[str, torch.Tensor], model: torch.nn.Module, source: Path) -> None:
    """Copy a state dict into `model`; CheckpointDamaged names the first missing or misshapen tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    unwrapped = model.module if hasattr(model, "module") else model
    if unwrapped.config.tie_word_embeddings:
        weights["embed_out.weight"] = weights["gpt_neox.embed_in.weight"]
    with torch.no_grad():
        for name, param in unwrapped.named_parameters():
            if name not in weights or tuple(weights[name].shape) != tuple(_full_shape(param)):
                raise CheckpointDamaged(f"{source}: {name} is missing or has another shape than the model's")
            value = weights[name].to(param.dtype)
            if isinstance(param, DTensor):
                value = distribute_tensor(value, param.device_mesh, param.placements).to_local()
                param.to_local().copy_(value)
            else:
                param.copy_(value)


def _full_shape(param):
    return param.shape  # a DTensor reports its global shape


def restore(target: Path, model: torch.nn.Module, optimizer, ctx) -> dict:
    """Load weights, optimizer and RNG state saved by save_training_checkpoint."""
    from torch.distributed.tensor import DTensor

    load_weights(target, model)
    state = torch.load(target / TRAINING_STATE, map_location="cpu", weights_only=True)
    optimizer_state = state["optimizer"]
    if _has_dtensor_parameters(model):
        local = torch.load(target / f"optimizer-rank{ctx.rank}.pt", map_location="cpu", weights_only=True)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, values in local["state"].items():
            param = params[int(index)]
            for key, value in values.items():
                if isinstance(param, DTensor) and value.ndim > 0:
                    values[key] = DTensor.from_local(value, param.device_mesh, param.placements)
        optimizer_state = local
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(state["rng"]["torch"])
    return state
