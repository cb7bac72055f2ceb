"""Checkpoints in Hugging Face layout: config.json + safetensors (single or sharded) or weights-only .bin.

Loading builds the model on the meta device and assigns tensors one at a time from memory-mapped
files, so the weights are never held twice. Saving writes what transformers' GPTNeoXForCausalLM loads.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from stablecode import kernels
from stablecode.atomic import staged_directory
from stablecode.config import ModelConfig
from stablecode.errors import CheckpointError, CheckpointWarning, ConfigError
from stablecode.machine import release_freed_memory
from stablecode.model import GPTNeoX
from stablecode.quantize import (DEFAULT_GROUP_SIZE, check_method, prepare_quantized, quantize_model,
                                 use_bf16_kernels)
from stablecode.registry import require_regular_file, resolve_model_dir

# Buffers that old GPT-NeoX checkpoints carry and we recompute (or never need).
IGNORED_SUFFIXES = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")
# Other names for our tensors: a transformers 5 `state_dict()` calls the head `lm_head` (its
# save_pretrained writes `embed_out`, as released checkpoints do).
TENSOR_ALIASES = {"lm_head.weight": "embed_out.weight"}
QUANTIZATION_FILE = "quantization.json"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# ---- dtypes and devices ----------------------------------------------------------------------

def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device_dtype(device: torch.device, dtype: torch.dtype | None) -> None:
    """Refuse a device that is absent or a dtype it cannot run (dtype None: check the device only)."""
    if device.type not in ("cpu", "cuda"):
        raise CheckpointError(f"device {str(device)!r} is not supported (use cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {str(device)!r} was asked for but no CUDA GPU is available")
    if dtype is None:
        return
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise CheckpointError(f"dtype {dtype} is not supported for inference (use float32, bfloat16 or float16)")
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise CheckpointError(f"{torch.cuda.get_device_name(device)} cannot run bfloat16; use --dtype float16")


# ---- reading tensors -------------------------------------------------------------------------

def _shard_name(index: Path, name) -> str:
    """A shard file name from an index's weight_map, refused unless it names a file inside the directory."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{index}: weight_map holds {name!r}, which is not a file name")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts:
        raise CheckpointError(f"{index}: weight_map names {name!r}, outside the checkpoint directory")
    return name


def _weight_files(directory: Path) -> tuple[str, list[Path]]:
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = directory / index_name
        if index.exists():
            require_regular_file(index)
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: weight_map should be a non-empty object of tensor name -> file")
            files = sorted({directory / _shard_name(index, name) for name in weight_map.values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
            return kind, [require_regular_file(f) for f in files]
    for name, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if (directory / name).exists():
            return kind, [require_regular_file(directory / name)]
    raise CheckpointError(f"{directory}: no weights found (expected model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)")


def _check_size(directory: Path, config: ModelConfig, files: list[Path], quantization: dict | None) -> None:
    """Refuse a config.json that describes far more parameters than the weight files can hold, before
    building anything: a crafted `num_hidden_layers: 1000000000` would otherwise hang or exhaust memory."""
    min_bytes = {"int4": 0.5, "int8": 1.0}.get((quantization or {}).get("method"), 2.0)
    stored = sum(f.stat().st_size for f in files)
    if config.num_parameters * min_bytes > 1.05 * stored + (1 << 20):
        raise CheckpointError(f"{directory}: config.json describes {config.num_parameters:,} parameters, but the "
                              f"weight files hold only {stored:,} bytes; config.json does not belong to these weights")


def _load_weights_only(file: Path):
    # weights_only: tensors and plain containers only, never arbitrary pickled objects.
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
    # Files in torch's pre-1.6 (non-zip) format cannot be memory-mapped; they are read into memory.
    return torch.load(file, map_location="cpu", weights_only=True)


def iter_checkpoint_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the checkpoint, read lazily from mmapped files."""
    kind, files = _weight_files(directory)
    for file in files:
        if kind == "safetensors":
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    names = list(f.keys())
                for name in names:
                    # One handle per tensor: closing it unmaps the pages a dtype conversion read, so
                    # a bf16 file loaded as fp32 is not also held resident in bf16 until the end.
                    with safe_open(str(file), framework="pt", device="cpu") as f:
                        tensor = f.get_tensor(name)
                    yield name, tensor
                    del tensor
            except SafetensorError as e:
                raise CheckpointError(f"{file}: corrupted or truncated safetensors file ({e})") from None
        else:
            try:
                state = _load_weights_only(file)
            except Exception as e:  # torch raises several types for bad pickles and zip files
                raise CheckpointError(f"{file}: cannot be read as a weights-only PyTorch file ({e})") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
            for name, tensor in state.items():
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(f"{file}: entry {name!r} is not a tensor")
                yield name, tensor


def load_config(directory: str | os.PathLike) -> ModelConfig:
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: config.json not found")
    require_regular_file(directory / "config.json")
    try:
        return ModelConfig.from_json_file(directory / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_model(path: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, quantize: str | None = None,
               progress: bool = False) -> GPTNeoX:
    """Load a checkpoint directory (or embedded model name) into a GPTNeoX in eval mode."""
    directory = resolve_model_dir(path)
    config = load_config(directory)
    try:
        device = torch.device(device or "cpu")
    except RuntimeError as e:
        raise CheckpointError(f"invalid device {device!r} ({e})") from None
    dtype = parse_dtype(dtype)
    check_device_dtype(device, dtype)  # refuse before reading gigabytes

    stored_quantization = read_quantization(directory)
    _check_size(directory, config, _weight_files(directory)[1], stored_quantization)
    with torch.device("meta"):
        model = GPTNeoX(config)
    if stored_quantization is not None:  # saved quantized: load as it is, never re-quantize
        if quantize and quantize != stored_quantization["method"]:
            raise CheckpointError(f"{directory} holds {stored_quantization['method']} weights; "
                                  f"cannot load it as {quantize} (quantize from a float checkpoint)")
        prepare_quantized(model, stored_quantization)
        quantize = None
    expected = {name: p for name, p in model.state_dict().items()}
    # Buffers (quantized weights and their scales) keep their stored dtype; parameters take `dtype`.
    parameter_names = {name for name, _ in model.named_parameters()}
    if config.tie_word_embeddings:
        expected.pop("embed_out.weight", None)
    if config.shared_layernorm:
        skipped_shared = (".post_attention_layernorm.weight", ".post_attention_layernorm.bias")
    else:
        skipped_shared = ()

    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    stored_dtype = None
    not_finite: list[str] = []
    tensors = iter_checkpoint_tensors(directory)
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, total=len(expected), desc=f"loading {directory.name}", unit="tensor", leave=False)
    for name, tensor in tensors:
        name = TENSOR_ALIASES.get(name, name)
        if name.endswith(IGNORED_SUFFIXES) or name.endswith(skipped_shared):
            continue
        if config.tie_word_embeddings and name == "embed_out.weight":
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            mismatched.append(f"{name}: expected {tuple(expected[name].shape)}, found {tuple(tensor.shape)}")
            continue
        if name in parameter_names:
            if not tensor.is_floating_point():
                raise CheckpointError(f"{directory}: tensor {name} is {tensor.dtype}, where a float weight belongs "
                                      "(integer weights load only from a quantized checkpoint)")
            if stored_dtype is None:
                stored_dtype = tensor.dtype
            if not torch.isfinite(tensor).all():
                not_finite.append(name)
        target = dtype or (tensor.dtype if tensor.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32)
        converted = tensor.to(device=device, dtype=target if name in parameter_names else None)
        # Never let the file's mapped pages back the model: a file rewritten in place while a server
        # runs would kill it with SIGBUS.
        loaded[name] = converted.clone() if converted.data_ptr() == tensor.data_ptr() else converted
    if unexpected or mismatched or len(loaded) != len(expected):
        problems = []
        missing = sorted(set(expected) - set(loaded) - {m.split(":")[0] for m in mismatched})
        if missing:
            problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}"
                            + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}"
                            + (" ..." if len(unexpected) > 20 else ""))
        if mismatched:
            problems.append("shape mismatches: " + "; ".join(mismatched[:20]))
        raise CheckpointError(f"{directory}: checkpoint does not match config.json: " + " | ".join(problems))
    if not_finite:
        warnings.warn(f"{directory}: {len(not_finite)} weight tensors hold NaN or Inf values "
                      f"({', '.join(not_finite[:3])}{' ...' if len(not_finite) > 3 else ''}); "
                      "the model's output will be meaningless", CheckpointWarning, stacklevel=2)
    final_dtype = loaded["gpt_neox.embed_in.weight"].dtype
    check_device_dtype(device, final_dtype)

    model.load_state_dict(loaded, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.embed_out.weight = model.gpt_neox.embed_in.weight
    model.reset_rotary_tables()
    model.eval()
    del loaded
    if quantize:
        quantize_model(model, quantize)
    elif stored_quantization is not None and device.type == "cpu":
        kernels.load()  # a quantized model is what the kernels are for: built here, not in a request
    elif (device.type == "cpu" and final_dtype == torch.bfloat16 and stored_quantization is None
          and kernels.worth_building(config.num_parameters)):
        use_bf16_kernels(model)  # the embedded model keeps nn.Linear: it never waits for a build
    if device.type == "cpu":
        release_freed_memory()  # the temporaries of loading, which would otherwise stay resident
    return model


# ---- writing ---------------------------------------------------------------------------------

def hf_state_dict(model: GPTNeoX) -> dict[str, torch.Tensor]:
    """The state dict transformers expects: tied head left out, a shared norm written as both norms."""
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "embed_out.weight":
            continue
        state[name] = tensor.detach().contiguous()
        if model.config.shared_layernorm and ".input_layernorm." in name:
            state[name.replace(".input_layernorm.", ".post_attention_layernorm.")] = tensor.detach().clone()
    return state


def save_checkpoint(model: GPTNeoX, directory: str | os.PathLike, max_shard_size: int | None = None,
                    tokenizer_file: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write config.json + safetensors (sharded above max_shard_size bytes) atomically as a directory."""
    directory = Path(directory)
    with staged_directory(directory) as staging:
        state = hf_state_dict(model)
        if dtype is not None:  # floats only: quantized weights and their scales keep their formats
            buffers = {name for name, _ in model.named_buffers()}
            state = {k: v.to(dtype) if v.is_floating_point() and k not in buffers else v for k, v in state.items()}
        state = {k: v.cpu() for k, v in state.items()}
        config = model.config.to_hf_dict()
        config["torch_dtype"] = str(model.gpt_neox.embed_in.weight.dtype if dtype is None else dtype
                                    ).removeprefix("torch.")
        quantization = getattr(model, "quantization", None)
        if quantization is not None:
            config["quantization_config"] = quantization_config(quantization)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        metadata = {"format": "pt"}
        if max_shard_size is None:
            save_file(state, str(staging / "model.safetensors"), metadata=metadata)
        else:
            shards: list[dict[str, torch.Tensor]] = [{}]
            size = 0
            for name, tensor in state.items():
                nbytes = tensor.numel() * tensor.element_size()
                if shards[-1] and size + nbytes > max_shard_size:
                    shards.append({})
                    size = 0
                shards[-1][name] = tensor
                size += nbytes
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(staging / file), metadata=metadata)
                weight_map.update({name: file for name in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (staging / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
    return directory


# ---- quantized checkpoints -------------------------------------------------------------------
#
# A quantized checkpoint is the usual directory; config.json's `quantization_config` says how its
# projections are stored. It deliberately has no `quant_method`: transformers then refuses to load
# the directory instead of reading the int8 values as float weights (checked by the tests).

def quantization_config(spec: dict) -> dict:
    return {"stablecode_method": spec["method"], **({"group_size": spec["group_size"]} if "group_size" in spec else {}),
            "format": "weight-only quantization of stablecode (stablecode.load_model reads it; transformers cannot)"}


def _quantization_spec(source: Path, method, group_size) -> dict:
    try:
        check_method(method)
        group_size = int(group_size if group_size is not None else DEFAULT_GROUP_SIZE)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: not a valid quantization description ({e})") from None
    return {"method": method, **({"group_size": group_size} if method == "int4" else {})}


def read_quantization(directory: str | os.PathLike) -> dict | None:
    """The quantization a checkpoint directory was saved with, or None for a float checkpoint."""
    directory = Path(directory)
    try:
        hf = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        hf = {}
    block = hf.get("quantization_config") if isinstance(hf, dict) else None
    if block is not None:
        if not isinstance(block, dict) or "stablecode_method" not in block:
            method = block.get("quant_method") if isinstance(block, dict) else block
            raise CheckpointError(f"{directory}: quantized by another tool (quant_method {method!r}); stablecode "
                                  "loads float checkpoints and its own int8/int4 ones")
        return _quantization_spec(directory / "config.json", block["stablecode_method"], block.get("group_size"))
    path = directory / QUANTIZATION_FILE  # written by earlier versions, beside an unmarked config.json
    if not path.exists():
        return None
    try:
        spec = json.loads(require_regular_file(path).read_text())
        return _quantization_spec(path, spec["method"], spec.get("group_size"))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid quantization description ({e})") from None


def save_quantized(model: GPTNeoX, directory: str | os.PathLike, tokenizer_file=None, max_shard_size=None) -> Path:
    """Write a quantized model as a checkpoint directory that loads without re-quantizing."""
    if getattr(model, "quantization", None) is None:
        raise ValueError("the model is not quantized: call quantize_model() first")
    return save_checkpoint(model, directory, max_shard_size=max_shard_size, tokenizer_file=tokenizer_file)
