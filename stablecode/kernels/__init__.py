"""Compiled CPU kernels (`cpu_kernels.cpp`), their build, the torch custom ops over them, and
the ops the model calls (`attention()`, `gelu()`, `rotary_heads()`).

The kernels speed up decoding, which streams every weight once per token: int8/int4/bf16
matrix-vector products with int8-quantized activations (AVX2 where the CPU has it) and attention
for one new token per row over a bf16 or int8 KV cache. Prompts (many rows) run int8 x int8 GEMMs on AMX
tiles or with AVX-512 VNNI where the CPU has them (checked at run time), else PyTorch's float GEMM.
Training's causal attention, forward and backward, has its own AVX-512 kernel.

They are built on first use (`load()`) by the code that needs them: loading a quantized or large
bf16 model, and training on the CPU. Nothing else builds them, and every path works without them
through PyTorch's own ops.
"""

from stablecode.kernels.build import load, load_for, loaded, simd_level, worth_building
from stablecode.kernels.ops import (DECODE_MAX_ROWS, attention, bf16_linear, decode_attention, dequantize_rows, gelu,
                                    gemm_dtype, int4_linear, int8_linear, native_bf16, prompt_int4_linear,
                                    prompt_int8_linear, prompt_isa, quantize_rows, rotary_heads, train_attention,
                                    train_attention_available,
                                    use_decode_attention, use_linear_kernels, use_prompt_kernels, use_rotary_kernel)

__all__ = ["DECODE_MAX_ROWS", "attention", "bf16_linear", "decode_attention", "dequantize_rows", "gelu",
           "gemm_dtype", "int4_linear", "int8_linear", "load", "load_for", "loaded", "native_bf16", "prompt_int4_linear",
           "prompt_int8_linear", "prompt_isa", "quantize_rows", "rotary_heads", "simd_level", "train_attention", "train_attention_available",
           "use_decode_attention", "use_linear_kernels", "use_prompt_kernels", "use_rotary_kernel", "worth_building"]
