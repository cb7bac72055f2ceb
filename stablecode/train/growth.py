"""Function-preserving widening: start a wider model from a trained narrower one of the family.

Every width (hidden size, number of heads, MLP size) is multiplied by the same integer k; the head
size stays. Each unit of the wider model is a copy of one unit of the narrower one (unit j copies
j mod n), so the residual stream of the wide model is the narrow stream repeated k times. LayerNorm
sees the same mean and variance over a repeated vector, so its output is the narrow output
repeated. A linear layer whose input is repeated splits each weight into k parts that sum to the
original (W/k plus noise that sums to zero over the copies): the output is exactly the narrow
model's, while the noise makes the copies' gradients differ, so they learn different things
(Net2Net's widening, Chen et al. 2016). The wide model's logits equal the narrow model's up to
rounding; training then continues from there instead of from scratch.
"""

from __future__ import annotations

import torch

from stablecode.config import ModelConfig
from stablecode.errors import StablecodeError


def width_factor(narrow: ModelConfig, wide: ModelConfig) -> int:
    """The integer k with wide = k × narrow in every width, or a StablecodeError saying what differs."""
    if wide.hidden_size % narrow.hidden_size:
        raise StablecodeError(f"cannot widen hidden size {narrow.hidden_size} to {wide.hidden_size}: "
                              "not an integer multiple")
    k = wide.hidden_size // narrow.hidden_size
    expected = {"num_heads": narrow.num_heads * k, "intermediate_size": narrow.intermediate_size * k}
    same = ("vocab_size", "num_layers", "rotary_pct", "rotary_base", "max_position_embeddings", "layer_norm_eps",
            "use_parallel_residual", "shared_layernorm", "tie_word_embeddings", "attention_bias")
    expected.update({name: getattr(narrow, name) for name in same})
    wrong = [f"{name} {getattr(wide, name)} (needs {value})" for name, value in expected.items()
             if getattr(wide, name) != value]
    if narrow.tie_word_embeddings:
        wrong.append("tied input and output embeddings (the widened pair would differ)")
    if wrong:
        raise StablecodeError(f"cannot widen {narrow.name} by {k}: " + ", ".join(wrong))
    return k


def _repeat_rows(weight: torch.Tensor, k: int) -> torch.Tensor:
    return weight.repeat(k, *([1] * (weight.dim() - 1)))


def _split_columns(weight: torch.Tensor, k: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """[out, in] → [out, k·in] whose k column blocks sum to `weight`: the same output for a repeated input."""
    parts = weight.unsqueeze(0).repeat(k, 1, 1) / k
    if noise > 0 and k > 1:
        jitter = torch.randn(parts.shape, generator=generator) * (noise * weight.float().std().item())
        parts += jitter - jitter.mean(dim=0, keepdim=True)
    return torch.cat(list(parts), dim=1)


def widen(weights: dict[str, torch.Tensor], narrow: ModelConfig, wide: ModelConfig, *,
          noise: float = 0.01, seed: int = 0) -> dict[str, torch.Tensor]:
    """The wide model's state dict (fp32) computing what `weights` (of `narrow`) computes."""
    k = width_factor(narrow, wide)
    generator = torch.Generator().manual_seed(seed)
    head_size = narrow.hidden_size // narrow.num_heads
    out: dict[str, torch.Tensor] = {}
    for name, value in weights.items():
        value = value.float()
        if name.endswith(("layernorm.weight", "layernorm.bias", "layer_norm.weight", "layer_norm.bias",
                          "dense.bias", "dense_4h_to_h.bias", "dense_h_to_4h.bias")):
            out[name] = _repeat_rows(value, k)  # per-unit vectors: each copy gets its unit's value
        elif name == "gpt_neox.embed_in.weight":
            out[name] = value.repeat(1, k)  # the residual stream, repeated
        elif name == "embed_out.weight":
            out[name] = _split_columns(value, k, noise, generator)
        elif name.endswith("query_key_value.weight") or name.endswith("query_key_value.bias"):
            # Rows are laid out [head][q, k, v][head_size]: repeat whole heads.
            per_head = value.reshape(narrow.num_heads, 3 * head_size, -1)
            heads = per_head.repeat(k, 1, 1).reshape(k * value.shape[0], -1)
            if name.endswith("bias"):
                out[name] = heads.reshape(-1)
            else:
                out[name] = _split_columns(heads, k, noise, generator)
        elif name.endswith(("attention.dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight")):
            out[name] = _split_columns(_repeat_rows(value, k), k, noise, generator)
        else:
            raise StablecodeError(f"cannot widen {name}: not a GPT-NeoX parameter this knows")
    return out
