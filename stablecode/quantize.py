"""Weight-only quantization and the fast CPU linear layers used for decoding.

- int8: one fp32 scale per output channel, `w = scale[n] * q[n, k]`.
- int4: groups of `group_size` inputs per output channel with an fp16 scale and minimum,
  `w = scale[n, g] * q[n, k] + min[n, g]`, q in 0..15, two values packed per byte.

Decoding multiplies a few activation rows by each weight matrix, so it is bound by how fast the
weights stream from memory. For that case the layers call small AVX2 kernels
(`csrc/cpu_kernels.cpp`, compiled on first use) that multiply int8/int4 weights with int8-quantized
activations. Prompts (many rows) dequantize the weights and run one big GEMM; on CPUs without
native bf16 matrix units that GEMM runs in fp32, which is ~5x faster there than emulated bf16.

Embeddings and norms stay in floating point; the output head is quantized unless tied to the embedding.

The same compiled file holds the decode attention kernel (one new token per row over a bf16 KV
cache), which `stablecode.model` calls where it applies (`use_decode_attention`).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATIONS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 64
# Up to this many rows (tokens) the matrix-vector kernels run; above, dequantize + GEMM is faster.
DECODE_MAX_ROWS = 16
QUANTIZATION_FILE = "quantization.json"
KERNEL_SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"

_kernels = None
_kernels_loaded = False


# ---- the compiled kernels ----------------------------------------------------------------------

def _simd_level() -> str:
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return "avx2" if {"avx2", "fma", "f16c"} <= set(flags) else "generic"


def kernels():
    """The compiled CPU kernels, built once per machine; None (after one warning) if they cannot be.

    STABLECODE_KERNELS=torch skips them and uses PyTorch's own ops (for comparisons).
    """
    global _kernels, _kernels_loaded
    if _kernels_loaded:
        return _kernels
    _kernels_loaded = True
    if os.environ.get("STABLECODE_KERNELS", "native") == "torch":
        return None
    simd = _simd_level()
    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if simd == "avx2" else [])
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        name = f"stablecode_cpu_kernels_{simd}"
        if not any(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
            print("stablecode: compiling the CPU kernels (first use on this machine, about a minute)",
                  file=sys.stderr)
        _kernels = load(name=name, sources=[str(KERNEL_SOURCE)], extra_cflags=flags, verbose=False)
    except Exception as e:  # no compiler, no ninja, build error: all mean the same to the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"stablecode: could not build the CPU kernels ({first_line}); decoding falls back to "
                      "PyTorch's slower ops (install gcc/g++ and ninja for full speed)", RuntimeWarning, stacklevel=2)
        _kernels = None
    return _kernels


# The kernels as torch custom ops: a pybind function is opaque to torch.compile, an op with a
# shape function is not, so a compiled decode step keeps these kernels and fuses the small ops
# between them. Eager calls pay a few microseconds of dispatch per call.

@torch.library.custom_op("stablecode::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] fp32/bf16 @ (scale[n] * weight[n, k]).T + bias, activations quantized to int8 per 32."""
    return kernels().int8_linear(x, weight, scale, bias)


@torch.library.custom_op("stablecode::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ the 4-bit weight's dequantized transpose + bias."""
    return kernels().int4_linear(x, weight, scale, minimum, group_size, bias)


@torch.library.custom_op("stablecode::bf16_linear", mutates_args=())
def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ weight.T + bias for a bf16 weight, accumulated in fp32."""
    return kernels().bf16_linear(x, weight, bias)


@int8_linear.register_fake
@bf16_linear.register_fake
def _linear_shape(x, weight, *_):
    return x.new_empty(x.shape[0], weight.shape[0])


@int4_linear.register_fake
def _int4_linear_shape(x, weight, scale, minimum, group_size, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("stablecode::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: Optional[torch.Tensor] = None,
                     lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q kᵀ / √D) v for one query per row and head: q [B, H, 1, D], k and v [R, H, L, D].

    Row b attends to cache row rows[b] (default b), keys 0..lengths[b]-1 (default all L)."""
    return kernels().decode_attention(q, k, v, rows, lengths)


@decode_attention.register_fake
def _decode_attention_shape(q, k, v, rows=None, lengths=None):
    return q.new_empty(q.shape)


def use_decode_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the decode attention kernel applies: one query per row, CPU, a bf16 cache, no gradients.

    (With fp32 caches PyTorch's own attention is as fast; with bf16 it is 4-5x slower here.)"""
    return (q.shape[2] == 1 and q.device.type == "cpu" and q.dtype == torch.bfloat16
            and k.dtype == q.dtype and q.stride(-1) == 1 and k.stride(-1) == 1 and not q.requires_grad
            and kernels() is not None)


def _use_kernels(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.shape[0] <= DECODE_MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16)
            and x.shape[1] % 32 == 0 and kernels() is not None)


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype for big matrix products: bf16 only where the CPU multiplies bf16 natively."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not _native_bf16():
        return torch.float32
    return x.dtype


def _native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ---- quantization math (also the reference the kernels are tested against) -------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (q int8 [N, K], scale fp32 [N])."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(dtype) * scale.to(dtype)[:, None])


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group: (packed uint8 [N, K/2], scale fp16 [N, K/G], min fp16 [N, K/G])."""
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size)
    w = weight.float().view(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError("cannot quantize a weight with inf or nan values")
    # Round scale and minimum to fp16 first, then choose q for the values actually stored.
    minimum = low.half()
    scale = ((high - minimum.float()) / 15.0).half()
    step = scale.float()
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((w - minimum.float()[..., None]) / step[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.view(out_features, in_features)), scale, minimum


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"int4 group size must be a positive multiple of 32, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the layer's {in_features} inputs")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 → [N, K/2] bytes; in each run of 32 values, byte i = value i | value i+16 << 4."""
    blocks = q.view(q.shape[0], -1, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(q.shape[0], -1)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    blocks = packed.view(packed.shape[0], -1, 1, 16)
    return torch.cat((blocks & 0x0F, blocks >> 4), dim=2).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed).to(dtype).view(packed.shape[0], -1, group_size)
    return (q * scale.to(dtype)[..., None] + minimum.to(dtype)[..., None]).view(packed.shape[0], -1)


# ---- layers ----------------------------------------------------------------------------------

def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


# Output channels dequantized at a time for a prompt's GEMM: bounds the float copy of the weights
# (and its temporaries) to a few tens of MB instead of a whole matrix.
GEMM_CHUNK_CHANNELS = 1024


def _dequantized_linear(layer: nn.Module, rows: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    dtype = gemm_dtype(rows)
    x = rows.to(dtype)
    y = torch.empty(rows.shape[0], layer.out_features, dtype=dtype, device=rows.device)
    for start in range(0, layer.out_features, GEMM_CHUNK_CHANNELS):
        end = min(start + GEMM_CHUNK_CHANNELS, layer.out_features)
        bias = None if layer.bias is None else layer.bias[start:end].to(dtype)
        y[:, start:end] = F.linear(x, layer.dequantized(dtype, start, end), bias)
    return y.to(out_dtype)


class Int8Linear(nn.Module):
    """Linear layer with int8 weights (per-output-channel scales); state: weight, scale, bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        layer.weight, layer.scale = quantize_int8(linear.weight.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def dequantized(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The float weight (output channels start..end)."""
        return dequantize_int8(self.weight[start:end], self.scale[start:end], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if _use_kernels(rows):
            y = int8_linear(rows, self.weight, self.scale, self.bias)
        elif rows.shape[0] <= DECODE_MAX_ROWS and rows.device.type == "cpu":
            # PyTorch's own weight-only int8 kernel (no compiler, or STABLECODE_KERNELS=torch).
            y = torch._weight_int8pack_mm(rows, self.weight, self.scale.to(rows.dtype))
            y = y if self.bias is None else y + self.bias
        else:
            y = _dequantized_linear(self, rows, x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """Linear layer with 4-bit weights in groups (fp16 scale and minimum); state: weight, scale, min, bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = DEFAULT_GROUP_SIZE,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("min", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self._torch_packed = None  # PyTorch's own int4 layout, made on first use of its kernel

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> "Int4Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, device="meta")
        layer.weight, layer.scale, layer.min = quantize_int4(linear.weight.detach(), group_size)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def dequantized(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The float weight (output channels start..end)."""
        return dequantize_int4(self.weight[start:end], self.scale[start:end], self.min[start:end], self.group_size,
                               dtype)

    def _torch_int4_mm(self, rows: torch.Tensor) -> torch.Tensor:
        # torch's convention is w = (q - 8) * scale + zero, so zero = min + 8 * scale.
        if self._torch_packed is None:
            q = unpack_int4(self.weight).to(torch.int32)
            scale, zero = self.scale.float(), self.min.float() + 8 * self.scale.float()
            scales_and_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._torch_packed = (torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros)
        packed, scales_and_zeros = self._torch_packed
        y = torch._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), packed, self.group_size, scales_and_zeros)
        return y.to(rows.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if _use_kernels(rows):
            y = int4_linear(rows, self.weight, self.scale, self.min, self.group_size, self.bias)
        elif rows.shape[0] <= DECODE_MAX_ROWS and rows.device.type == "cpu":
            y = self._torch_int4_mm(rows)
            y = y if self.bias is None else y + self.bias
        else:
            y = _dequantized_linear(self, rows, x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


class Bf16Linear(nn.Linear):
    """nn.Linear (same parameters) whose inference forward is fast on CPUs for bf16 weights.

    Few rows: the bf16 matrix-vector kernel. Many rows: fp32 GEMM where bf16 GEMM is emulated.
    Anything needing gradients takes nn.Linear's own path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.weight.dtype != torch.bfloat16 or x.device.type != "cpu":
            return super().forward(x)
        rows = _rows(x)
        if _use_kernels(rows):
            y = bf16_linear(rows, self.weight, self.bias)
        elif gemm_dtype(rows) == torch.float32 and rows.shape[0] > DECODE_MAX_ROWS:
            y = _dequantized_linear(self, rows, x.dtype)
        else:
            y = F.linear(rows, self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self.weight[start:end].to(dtype)


# ---- whole models ----------------------------------------------------------------------------

def _linear_layers(model: nn.Module):
    """(parent module, attribute name, layer) for every projection: the blocks' four and the head."""
    for block in model.gpt_neox.layers:
        for parent, name in ((block.attention, "query_key_value"), (block.attention, "dense"),
                             (block.mlp, "dense_h_to_4h"), (block.mlp, "dense_4h_to_h")):
            yield parent, name, getattr(parent, name)
    if not model.config.tie_word_embeddings:  # a tied head is the embedding, which stays float
        yield model, "embed_out", model.embed_out


def quantize_model(model: nn.Module, method: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Replace the model's projections by int8 or int4 layers, in place, one layer at a time."""
    check_method(method)
    for parent, name, layer in _linear_layers(model):
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name} is already quantized ({type(layer).__name__})")
        with torch.no_grad():
            quantized = Int8Linear.from_linear(layer) if method == "int8" else Int4Linear.from_linear(layer, group_size)
        setattr(parent, name, quantized)
    model.quantization = {"method": method, **({"group_size": group_size} if method == "int4" else {})}
    if model.embed_out.weight.device.type == "cpu":
        kernels()  # compile now, not during the first request
    return model


def check_method(method: str) -> None:
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; choose one of: {', '.join(QUANTIZATIONS)}")


def use_bf16_kernels(model: nn.Module) -> nn.Module:
    """Swap the bf16 projections of a CPU model to Bf16Linear (same parameters, faster inference)."""
    for parent, name, layer in _linear_layers(model):
        if type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16:
            layer.__class__ = Bf16Linear
    kernels()
    return model


# ---- quantized checkpoints -------------------------------------------------------------------

def read_quantization(directory: str | os.PathLike) -> dict | None:
    """The quantization a checkpoint directory was saved with, or None for a float checkpoint."""
    path = Path(directory) / QUANTIZATION_FILE
    if not path.exists():
        return None
    try:
        spec = json.loads(path.read_text())
        check_method(spec["method"])
        group_size = int(spec.get("group_size", DEFAULT_GROUP_SIZE))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        from stablecode.errors import CheckpointError

        raise CheckpointError(f"{path}: not a valid quantization description ({e})") from None
    return {"method": spec["method"], **({"group_size": group_size} if spec["method"] == "int4" else {})}


def prepare_quantized(model: nn.Module, spec: dict) -> None:
    """Give a model built on the meta device the empty quantized layers a quantized checkpoint fills."""
    for parent, name, layer in _linear_layers(model):
        bias = layer.bias is not None
        if spec["method"] == "int8":
            quantized = Int8Linear(layer.in_features, layer.out_features, bias, device="meta")
        else:
            quantized = Int4Linear(layer.in_features, layer.out_features, bias, spec["group_size"], device="meta")
        setattr(parent, name, quantized)
    model.quantization = dict(spec)


def save_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer_file=None, max_shard_size=None) -> Path:
    """Write a quantized model as a checkpoint directory that loads without re-quantizing."""
    from stablecode.checkpoint import save_checkpoint

    spec = getattr(model, "quantization", None)
    if spec is None:
        raise ValueError("the model is not quantized: call quantize_model() first")
    return save_checkpoint(model, directory, max_shard_size=max_shard_size, tokenizer_file=tokenizer_file,
                           extra_files={QUANTIZATION_FILE: (json.dumps(spec, indent=2) + "\n").encode()})


# ---- command line ----------------------------------------------------------------------------

def add_quantize_command(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write an int8 or int4 quantized copy of a checkpoint")
    p.add_argument("--model", default=None, help="checkpoint directory or embedded model name")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--method", required=True, choices=QUANTIZATIONS)
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="int4 group size (multiple of 32)")
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> None:
    from stablecode.checkpoint import load_model, resolve_model_dir

    source = resolve_model_dir(args.model)
    model = load_model(source)
    quantize_model(model, args.method, args.group_size)
    tokenizer = source / "tokenizer.json"
    save_quantized(model, args.out, tokenizer_file=tokenizer if tokenizer.exists() else None)
    print(f"wrote {args.method} checkpoint to {args.out}", file=sys.stderr)
