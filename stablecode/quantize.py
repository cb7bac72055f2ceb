"""Weight-only quantized formats and the linear layers that run them (and Bf16Linear, the same for bf16).

- int8: one fp32 scale per output channel, `w = scale[n] * q[n, k]`.
- int4: groups of `group_size` inputs per output channel with an fp16 scale and minimum,
  `w = scale[n, g] * q[n, k] + min[n, g]`, q in 0..15, two values packed per byte.

Decoding multiplies a few activation rows by each weight matrix, so it is bound by how fast the
weights stream from memory: for that case the layers call the compiled kernels (`stablecode.kernels`),
or PyTorch's own weight-only ops where those are not loaded. Prompts (many rows) are bound by
arithmetic: where the CPU has AMX-INT8 or AVX-512 VNNI they quantize the activations to int8 per
token and run int8 x int8 GEMMs (`prompt_precision = "int8"`, the default); elsewhere, or with
`prompt_precision = "float"` (`set_prompt_precision`), they dequantize the weights and run one
float GEMM, in fp32 on CPUs without native bf16 matrix units.

Embeddings and norms stay in floating point; the output head is quantized unless tied to the embedding.
How a quantized model is stored on disk is `stablecode.checkpoint`'s business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stablecode import kernels
from stablecode.kernels import (bf16_linear, gemm_dtype, int4_linear, int8_linear, ops, prompt_int4_linear,
                                prompt_int8_linear, use_linear_kernels, use_prompt_kernels)

QUANTIZATIONS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 64


# ---- quantization math (also the reference the kernels are tested against) -------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (q int8 [N, K], scale fp32 [N])."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_row_sums(q: torch.Tensor) -> torch.Tensor:
    """Each int8 weight row's sum, int32 [N]: the VNNI kernels multiply x + 128 (unsigned) by the
    weights and take 128 x this sum off, one product per byte instead of a sign flip and a product.
    Summed a block of rows (about 1M values) at a time: torch widens its input to int32 first, which
    for the whole of the 3B's output layer was a 503 MB temporary, and blocks of 4M values left
    0.2-2 GB of freed heap behind after loading the 3B int8 (it varied run to run; 1M: none)."""
    rows = max(1, (1 << 20) // max(q.shape[1], 1))
    if q.shape[0] <= rows:
        return q.sum(dim=1, dtype=torch.int32)
    return torch.cat([q[i:i + rows].sum(dim=1, dtype=torch.int32) for i in range(0, q.shape[0], rows)])


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
    """Linear layer with int8 weights (per-output-channel scales); state: weight, scale, bias.

    `row_sums` (the weight rows' sums, for the kernels) is derived from the weight, never stored."""

    prompt_precision = "int8"  # "float": prompts dequantize and run a float GEMM (for comparisons)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("row_sums", torch.empty(out_features, dtype=torch.int32, device=device), persistent=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.row_sums = int8_row_sums(self.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        layer.weight, layer.scale = quantize_int8(linear.weight.detach())
        layer.row_sums = int8_row_sums(layer.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def dequantized(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The float weight (output channels start..end)."""
        return dequantize_int8(self.weight[start:end], self.scale[start:end], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if use_linear_kernels(rows):
            y = int8_linear(rows, self.weight, self.scale, self.row_sums, self.bias)
        elif self.prompt_precision == "int8" and use_prompt_kernels(rows, self.out_features):
            y = prompt_int8_linear(rows, self.weight, self.scale, self.bias)
        elif rows.shape[0] <= ops.DECODE_MAX_ROWS and rows.device.type == "cpu":
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

    prompt_precision = "int8"  # as Int8Linear

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
        if use_linear_kernels(rows):
            y = int4_linear(rows, self.weight, self.scale, self.min, self.group_size, self.bias)
        elif self.prompt_precision == "int8" and use_prompt_kernels(rows, self.out_features):
            y = prompt_int4_linear(rows, self.weight, self.scale, self.min, self.group_size, self.bias)
        elif rows.shape[0] <= ops.DECODE_MAX_ROWS and rows.device.type == "cpu":
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
        if use_linear_kernels(rows):
            y = bf16_linear(rows, self.weight, self.bias)
        elif gemm_dtype(rows) == torch.float32 and rows.shape[0] > ops.DECODE_MAX_ROWS:
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
        kernels.load()  # build now (first use on this machine), not during the first request
    return model


PROMPT_PRECISIONS = ("int8", "float")


def set_prompt_precision(model: nn.Module, precision: str) -> nn.Module:
    """How the quantized layers of `model` multiply prompts: "int8" (activations quantized per token,
    int8 x int8 GEMMs where the CPU has AMX-INT8 or AVX-512 VNNI) or "float" (dequantized weights, float GEMM)."""
    if precision not in PROMPT_PRECISIONS:
        raise ValueError(f"unknown prompt precision {precision!r}; choose one of: {', '.join(PROMPT_PRECISIONS)}")
    for _, _, layer in _linear_layers(model):
        if isinstance(layer, (Int8Linear, Int4Linear)):
            layer.prompt_precision = precision
    return model


def check_method(method: str) -> None:
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; choose one of: {', '.join(QUANTIZATIONS)}")


def use_bf16_kernels(model: nn.Module) -> nn.Module:
    """Swap the bf16 projections of a CPU model to Bf16Linear (same parameters, faster inference)."""
    for parent, name, layer in _linear_layers(model):
        if type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16:
            layer.__class__ = Bf16Linear
    kernels.load()
    return model


def prepare_quantized(model: nn.Module, spec: dict) -> None:
    """Give a model built on the meta device the empty quantized layers a quantized checkpoint fills."""
    check_method(spec["method"])
    for parent, name, layer in _linear_layers(model):
        bias = layer.bias is not None
        if spec["method"] == "int8":
            quantized = Int8Linear(layer.in_features, layer.out_features, bias, device="meta")
        else:
            quantized = Int4Linear(layer.in_features, layer.out_features, bias, spec["group_size"], device="meta")
        setattr(parent, name, quantized)
    model.quantization = dict(spec)
