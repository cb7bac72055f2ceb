"""The compiled kernels as torch custom ops, when each one applies, and `attention()`.

A pybind function is opaque to torch.compile, an op with a shape function is not, so a compiled
decode step keeps these kernels and fuses the small ops between them. Eager calls skip the custom
op's Python dispatch and call the extension directly (`_kernel_op`): a 3B decode step makes about
160 of them.

Every `use_*` check asks only whether this process has already loaded the kernels
(`build.loaded()`): choosing a path never starts a build and never waits for one.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from stablecode.kernels import build

# Up to this many rows (tokens) the matrix-vector kernels run; above, dequantize + GEMM is faster.
DECODE_MAX_ROWS = 16


def _library():
    library = build.loaded()
    if library is None:
        raise RuntimeError("the stablecode CPU kernels are not loaded (call stablecode.kernels.load() first)")
    return library


def _kernel_op(kernel):
    """Register `kernel` (a call into the extension) as the custom op stablecode::<name>, for
    torch.compile; eager calls run `kernel` itself. Where autograd would need the op (an input that
    requires grad), the op answers, and says it has no backward."""
    op = torch.library.custom_op(f"stablecode::{kernel.__name__}", mutates_args=())(kernel)

    @functools.wraps(kernel)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))):
            return op(*args, **kwargs)
        return kernel(*args, **kwargs)

    call.register_fake = op.register_fake
    return call


@_kernel_op
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, row_sums: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] fp32/bf16 @ (scale[n] * weight[n, k]).T + bias, activations quantized to int8 per row;
    row_sums: int32 [N], weight.sum(1) (`quantize.int8_row_sums`), which the VNNI loops need."""
    return _library().int8_linear(x, weight, scale, row_sums, bias)


@_kernel_op
def int4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ the 4-bit weight's dequantized transpose + bias."""
    return _library().int4_linear(x, weight, scale, minimum, group_size, bias)


@_kernel_op
def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ weight.T + bias for a bf16 weight, accumulated in fp32."""
    return _library().bf16_linear(x, weight, bias)


@int8_linear.register_fake
@bf16_linear.register_fake
def _linear_shape(x, weight, *_):
    return x.new_empty(x.shape[0], weight.shape[0])


@int4_linear.register_fake
def _int4_linear_shape(x, weight, scale, minimum, group_size, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@_kernel_op
def prompt_int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ (scale[n] * weight[n, k]).T + bias for many rows: x quantized to int8 per row, int8 x int8
    products summed in int32 (AMX tiles, else AVX-512 VNNI, else AVX2), rescaled to x's dtype."""
    return _library().prompt_int8_linear(x, weight, scale, bias)


@_kernel_op
def prompt_int4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                       group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """As prompt_int8_linear for a 4-bit weight (converted to int8 per 32 output channels on the fly)."""
    return _library().prompt_int4_linear(x, weight, scale, minimum, group_size, bias)


@prompt_int8_linear.register_fake
def _prompt_linear_shape(x, weight, *_):
    return x.new_empty(x.shape[0], weight.shape[0])


@prompt_int4_linear.register_fake
def _prompt_int4_linear_shape(x, weight, scale, minimum, group_size, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@_kernel_op
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: Optional[torch.Tensor] = None,
                     lengths: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None,
                     v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q kᵀ / √D) v for one query per row and head: q [B, H, 1, D], k and v [R, H, L, D].

    Row b attends to cache row rows[b] (default b), keys 0..lengths[b]-1 (default all L). An int8
    cache passes its per-row scales, k_scale and v_scale [R, H, L] (`quantize_rows`)."""
    return _library().decode_attention(q, k, v, rows, lengths, k_scale, v_scale)


@decode_attention.register_fake
def _decode_attention_shape(q, k, v, rows=None, lengths=None, k_scale=None, v_scale=None):
    return q.new_empty(q.shape)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [..., D], float32 scales [...]) for x [..., D]: each row of D values times 127 / its largest
    magnitude, rounded to nearest even; scale = largest / 127 (0 for a row of zeros). The kernels'
    activation quantization (`store_kv` writes an int8 cache with it), in PyTorch."""
    largest = x.abs().amax(-1, keepdim=True).float()
    # A tensor divided, not 127 / largest: PyTorch takes that as 127 * (1 / largest), another rounding.
    inverse = torch.where(largest > 0, torch.full_like(largest, 127) / largest, torch.zeros_like(largest))
    return torch.round(x.float() * inverse).to(torch.int8), (largest / 127).squeeze(-1)


def store_kv(cache: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, x: torch.Tensor) -> bool:
    """Write x [B, H, T, D] into one layer's cache [R, H, S, D] at flat slots [B·H·T] (quantized per row
    into an int8 cache, whose scales [R, H, S] are written too) with the kernels, one call where
    PyTorch's index_copy_ takes one per tensor. False (nothing written) where the kernels do not
    apply: the caller writes with PyTorch."""
    if not (_eager_cpu_inference(x) and cache.is_contiguous() and x.stride(-1) == 1 and x.dtype in (torch.float32, torch.bfloat16)
            and (cache.dtype == torch.int8 or cache.dtype == x.dtype)):
        return False
    _library().store_kv(cache, scales, slots, x)
    return True


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., D] int8 times scale [...], as `dtype`: what `quantize_rows` stored."""
    return (q.float() * scale[..., None]).to(dtype)


@_kernel_op
def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of queries at positions start..start+T-1, q [B, H, T, D], over keys and values
    [R, H, L, D] filled from slot 0 (cache rows 0..B-1): flash-style, bf16 products, no [T, L] scores."""
    return _library().prefill_attention(q, k, v, start)


@prefill_attention.register_fake
def _prefill_attention_shape(q, k, v, start):
    return q.new_empty(q.shape)


def sdpa_on_tiles() -> bool:
    """Whether PyTorch's SDPA multiplies bf16 on AMX tiles here (its CPU flash kernel's brgemm does
    where the CPU has AMX), which makes it faster than the prompt attention kernel (docs/performance.md)."""
    return torch.cpu._is_amx_tile_supported()


def use_prefill_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the prompt attention kernel applies: several bf16 queries on a CPU with AVX512-BF16
    but no AMX (`sdpa_on_tiles`), a head size that is a multiple of 16, no gradients."""
    library = build.loaded()
    return (q.shape[2] > 1 and q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16
            and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256 and not q.requires_grad
            and library is not None and _answer(library, "bf16_attention_available") and not sdpa_on_tiles())


@torch.library.custom_op("stablecode::train_attention", mutates_args=())
def train_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax(q kᵀ / √D) v over q, k, v [B, H, T, D] (fp32 or bf16, alike), with a backward:
    (out, log-sum-exp [B, H, T] fp32). Blocks of 64 × 64 in fp32, no [T, T] scores kept."""
    return tuple(_library().train_attention(q, k, v))


@train_attention.register_fake
def _train_attention_shape(q, k, v):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("stablecode::train_attention_backward", mutates_args=())
def train_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of train_attention from its saved output and log-sum-exp."""
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    return tuple(_library().train_attention_backward(grad, q, k, v, out, lse))


@train_attention_backward.register_fake
def _train_attention_backward_shape(grad, q, k, v, out, lse):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _train_attention_save(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _train_attention_grad(ctx, grad_out, _grad_lse):
    return train_attention_backward(grad_out, *ctx.saved_tensors)


train_attention.register_autograd(_train_attention_grad, setup_context=_train_attention_save)


# The extension's answers about this CPU, asked once per library: a plain value, which torch.compile
# reads as a constant, where a call into the extension would break its graph. (Not
# torch.compiler.assume_constant_result: applying it imports torch._dynamo, a second on every start.)
_ANSWERS: dict[tuple[int, str], object] = {}


def _answer(library, question: str):
    key = (id(library), question)
    if key not in _ANSWERS:
        _ANSWERS[key] = getattr(library, question)()
    return _ANSWERS[key]


def train_attention_available() -> bool:
    """Whether training runs on the training attention kernel here (kernels loaded, AVX-512)."""
    library = build.loaded()
    return library is not None and bool(_answer(library, "train_attention_available"))


def use_train_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the training attention kernel applies: causal self-attention (as many keys as
    queries) on the CPU that autograd will differentiate, a head size that is a multiple of 16, a
    CPU with AVX-512, and the kernels loaded (training loads them)."""
    return (q.device.type == "cpu" and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)
            and q.shape == k.shape == v.shape and q.shape[2] > 1 and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256
            and all(t.dtype in (torch.float32, torch.bfloat16) and t.stride(-1) == 1 for t in (q, k, v))
            and train_attention_available())


def use_decode_attention(q: torch.Tensor, k: torch.Tensor, gathering: bool = False) -> bool:
    """Whether the decode attention kernel applies: one query per row, CPU, a bf16 or int8 cache, no gradients.

    (With fp32 caches PyTorch's own attention is as fast, unless it would first gather cache rows
    (`gathering`): the engine's passes hold several queries of one sequence, each its own row.)"""
    return (q.shape[2] == 1 and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and (q.dtype == torch.bfloat16 or gathering or k.dtype == torch.int8)
            and k.dtype in (q.dtype, torch.int8) and q.stride(-1) == 1 and k.stride(-1) == 1 and not q.requires_grad
            and build.loaded() is not None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, rows: torch.Tensor | None = None,
              lengths: torch.Tensor | None = None, start: int | None = None,
              scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The model's attention, softmax(q kᵀ / √D + mask) v: q [B, H, T, D], k and v [R, H, L, D].

    rows [B]: the cache rows of k/v that query row b reads (default: the first B rows).
    lengths [B]: how many keys each row's last query sees; it says the same as `mask`, for the
    decode kernel, which reads only those keys instead of applying a mask.
    start: the queries (of one sequence, when `rows` is given) sit at slots start..start+T-1 over
    keys from slot 0 (`mask` then is causal from there): the prompt kernel's case, or SDPA over
    that row's keys where SDPA is the faster (`use_prefill_attention`). Training
    (causal, with gradients) takes the training kernel. Elsewhere PyTorch's SDPA.
    scales: (k_scale, v_scale) [R, H, L] of an int8 cache (k and v int8): the decode kernel reads it
    as it is; every other path reads the keys and values it needs dequantized to q's dtype.
    """
    if is_causal and mask is None and rows is None and use_train_attention(q, k, v):
        # SDPA's dtype under autocast (rotary leaves q and k in fp32 beside a bf16 v).
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        return train_attention(q.to(dtype), k.to(dtype), v.to(dtype))[0]
    if start is not None and q.shape[2] > 1 and (rows is None or rows.numel() == 1) and k.shape[2] >= start + q.shape[2]:
        # One sequence's prompt (or a chunk of it): its cache row as a view, keys up to the last query.
        if rows is not None:
            row = int(rows[0])
            k, v = k[row:row + 1], v[row:row + 1]
        end = start + q.shape[2]
        k, v = k[:, :, :end], v[:, :, :end]
        if scales is not None:
            k, v = _dequantized(k, v, [s[row:row + 1] if rows is not None else s for s in scales], end, q.dtype)
        if use_prefill_attention(q, k):
            return prefill_attention(q, k, v, start)
        if start == 0:  # causal from the first key: SDPA skips the hidden blocks instead of masking them
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if not is_causal and use_decode_attention(q, k, gathering=rows is not None):
        # One new token per row on the CPU: one pass over each row's cached keys and values.
        return decode_attention(q, k, v, rows, lengths, *(scales or (None, None)))
    if rows is not None:
        k, v = k[rows], v[rows]
        scales = None if scales is None else [s[rows] for s in scales]
    if scales is not None:
        k, v = _dequantized(k, v, scales, k.shape[2], q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def _dequantized(k: torch.Tensor, v: torch.Tensor, scales, end: int, dtype: torch.dtype):
    return dequantize_rows(k, scales[0][:, :, :end], dtype), dequantize_rows(v, scales[1][:, :, :end], dtype)


def _eager_cpu_inference(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and not x.requires_grad and not torch.compiler.is_compiling()
            and build.loaded() is not None)


def use_rotary_kernel(qkv: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether `rotary_heads` applies: fp32/bf16 on the CPU, cos in qkv's dtype, no gradients, eager
    (torch.compile fuses the PyTorch form itself)."""
    return (qkv.dtype in (torch.float32, torch.bfloat16) and cos.dtype == qkv.dtype and qkv.is_contiguous()
            and _eager_cpu_inference(qkv))


def rotary_heads(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, T, D] from the fused projection [B, T, H·3D], q and k rotated over cos/sin's
    dims ([T, R], or [B, 1, T, R] per row): model.apply_rotary's values in one pass, where PyTorch
    takes about twenty small ops."""
    steps, dims = cos.shape[-2], cos.shape[-1]
    heads = _library().rotary_heads(qkv, cos.reshape(-1, steps, dims).contiguous(),
                                    sin.reshape(-1, steps, dims).contiguous(), head_dim)
    return heads[0], heads[1], heads[2]


# Up to this many values GELU runs on the calling thread (PyTorch's own grain for elementwise ops).
SERIAL_GELU_MAX = 32768


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU. A decode step's rows run through the kernels' own vector loop on the calling
    thread (within 5e-7 of the exact value; F.gelu's is within 1.2e-6): between the decode kernels
    PyTorch's took several times its standalone time for a 10,240-wide row. Larger inputs, other dtypes,
    strided inputs and autograd: F.gelu."""
    if (x.numel() <= SERIAL_GELU_MAX and x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()
            and _eager_cpu_inference(x)):
        return _library().serial_gelu(x)
    return F.gelu(x)


def use_linear_kernels(rows: torch.Tensor) -> bool:
    """Whether the matrix-vector kernels apply to these activation rows [M, K]."""
    return (rows.device.type == "cpu" and rows.shape[0] <= DECODE_MAX_ROWS
            and rows.dtype in (torch.float32, torch.bfloat16) and rows.shape[1] % 32 == 0
            and build.loaded() is not None)


def use_prompt_kernels(rows: torch.Tensor, out_features: int) -> bool:
    """Whether the int8 x int8 prompt GEMMs apply to these activation rows [M, K]: more rows than the
    matrix-vector kernels take, no gradients, and a CPU with AMX-INT8, AVX-512 VNNI or AVX2 (`prompt_isa`).

    Elsewhere (or for shapes the GEMMs do not tile) prompts dequantize the weights and run PyTorch's float GEMM."""
    if (rows.device.type != "cpu" or rows.shape[0] <= DECODE_MAX_ROWS or rows.requires_grad
            or rows.dtype not in (torch.float32, torch.bfloat16) or rows.shape[1] % 64 or out_features % 32):
        return False
    return prompt_isa() != ""


def prompt_isa() -> str:
    """The prompt GEMM this CPU runs: "amx", "avx512-vnni", "avx2", or "" (none, or the kernels not loaded)."""
    library = build.loaded()
    return _answer(library, "prompt_isa") if library is not None else ""


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype for big matrix products: bf16 only where the CPU multiplies bf16 natively."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not native_bf16():
        return torch.float32
    return x.dtype


def native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
