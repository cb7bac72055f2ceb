"""The StableCode network: a GPT-NeoX decoder.

embedding → N blocks (attention with partial rotary + MLP, parallel residual) → final LayerNorm → head.

Module and parameter names follow Hugging Face's GPTNeoXForCausalLM, so a state dict maps
one-to-one onto released checkpoints (`gpt_neox.layers.0.attention.query_key_value.weight`, ...).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stablecode.config import ModelConfig
from stablecode.kernels import attention, gelu, rotary_heads, use_rotary_kernel
from stablecode.kv_cache import AttentionPlan, KVCache


def rotary_tables(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, rotary_dims] in fp32, GPT-NeoX's half-split layout."""
    dims = config.rotary_dims
    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, dims, 2, device=device, dtype=torch.int64).float() / dims))
    positions = torch.arange(config.max_position_embeddings, device=device, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `rotary_dims` dims of x [B, H, T, D]; the rest pass through.

    Half-split form (rotate_half), not interleaved pairs: the released weights depend on it.
    """
    rotary_dims = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dims], x[..., rotary_dims:]
    half = rotary_dims // 2
    rotated_half = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated_half * sin, x_pass), dim=-1)


def split_heads(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """q, k, v [B, H, T, D] from the fused projection [B, T, H·3D] (per head [q_h, k_h, v_h]), q and k rotated."""
    if use_rotary_kernel(qkv, cos):
        return rotary_heads(qkv, cos, sin, head_dim)  # the same values in one pass (kernels/)
    batch, steps, _ = qkv.shape
    # -1 heads: under tensor parallelism this rank holds only its own whole heads.
    q, k, v = qkv.view(batch, steps, -1, 3 * head_dim).transpose(1, 2).chunk(3, dim=-1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # this layer's index in the KV cache
        self.head_dim = config.head_dim
        # One fused projection laid out per head: [q_h, k_h, v_h] for h = 0, 1, ...
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, plan: AttentionPlan, cache: KVCache | None) -> torch.Tensor:
        batch, steps, _ = x.shape
        q, k, v = split_heads(self.query_key_value(x), plan.cos, plan.sin, self.head_dim)
        scales = None
        if cache is not None:
            k, v, scales = cache.update(self.layer, k, v, plan)
        y = attention(q, k, v, plan.mask, plan.is_causal, plan.rows, plan.key_lengths, plan.prompt_start, scales)
        return self.dense(y.transpose(1, 2).reshape(batch, steps, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(gelu(self.dense_h_to_4h(x)))  # exact erf GELU


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if not config.shared_layernorm:
            self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, plan: AttentionPlan, cache: KVCache | None = None) -> torch.Tensor:
        attention_input = self.input_layernorm(x)
        attention_output = self.attention(attention_input, plan, cache)
        if self.use_parallel_residual:
            mlp_input = self.post_attention_layernorm(x) if hasattr(self, "post_attention_layernorm") else attention_input
            # Summed in GPT-NeoX's order for the closest low-precision agreement.
            return self.mlp(mlp_input) + attention_output + x
        hidden = attention_output + x
        return self.mlp(self.post_attention_layernorm(hidden)) + hidden


class GPTNeoX(nn.Module):
    """GPT-NeoX causal language model; `model(input_ids)` returns logits [batch, seq, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # On the meta device (loading a checkpoint) skip the embedding's random init and build the
        # rotary tables on the CPU: meta normal_/div import torch._dynamo, seconds on every load.
        on_meta = torch.empty(0).device.type == "meta"
        self.gpt_neox = nn.ModuleDict(dict(
            embed_in=nn.Embedding(config.vocab_size, config.hidden_size,
                                  _weight=torch.empty(config.vocab_size, config.hidden_size) if on_meta else None),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_layers)),
            final_layer_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        ))
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight
        cos, sin = rotary_tables(config, device="cpu" if on_meta else None)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.rotary_cos.device

    def reset_rotary_tables(self) -> None:
        """Recompute the rotary tables (after building on the meta device)."""
        cos, sin = rotary_tables(self.config, device=self.embed_out.weight.device if
                                 self.embed_out.weight.device.type != "meta" else "cpu")
        self.rotary_cos, self.rotary_sin = cos, sin

    # ---- forward -----------------------------------------------------------------------------

    def _plan(self, batch: int, steps: int, cache: KVCache | None, input_pos, cache_rows, dtype) -> AttentionPlan:
        context = self.config.max_position_embeddings
        if input_pos is None:
            input_pos = 0
        if isinstance(input_pos, int):
            end = input_pos + steps
            if end > context:
                raise ValueError(f"positions up to {end} exceed the model's context of {context} tokens")
            if cache is not None and end > cache.slots:
                raise ValueError(f"positions up to {end} exceed the KV cache of {cache.slots} tokens")
            cos = self.rotary_cos[input_pos:end].to(dtype)
            sin = self.rotary_sin[input_pos:end].to(dtype)
            if cache_rows is None:
                # Without a cache the keys are this pass's tokens alone, wherever they sit.
                return AttentionPlan(cos, sin, start=input_pos if cache is not None else 0, length=end)
            input_pos = torch.arange(input_pos, end, device=cos.device).expand(batch, steps)
        if cache is None:
            raise ValueError("per-row positions need a KV cache (pass cache=KVCache.for_model(...))")
        positions = input_pos.expand(batch, steps) if input_pos.dim() == 1 else input_pos
        length = int(positions.max()) + 1
        if length > min(cache.slots, context):
            raise ValueError(f"positions up to {length} exceed the KV cache of {cache.slots} tokens "
                             f"(context {context})")
        cos = self.rotary_cos[positions].to(dtype).unsqueeze(1)
        sin = self.rotary_sin[positions].to(dtype).unsqueeze(1)
        return AttentionPlan(cos, sin, positions=positions, rows=cache_rows, length=length)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                input_pos: int | torch.Tensor | None = None, cache_rows: torch.Tensor | None = None,
                logit_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, steps, vocab] for input_ids [batch, steps].

        cache: the KV cache these tokens' keys/values go to and earlier ones come from (None: the
        tokens see only each other, causally).
        input_pos: where these tokens sit. An int start (all rows alike, cache rows 0..batch-1), or
        a LongTensor [batch, steps] of per-row positions, which are also the rows' cache slots.
        cache_rows: LongTensor [batch], the cache rows these sequences use (default 0..batch-1).
        logit_positions: LongTensor [batch, k]: compute logits only there (prefill needs one per row).
        """
        batch, steps = input_ids.shape
        x = self.gpt_neox.embed_in(input_ids)
        plan = self._plan(batch, steps, cache, input_pos, cache_rows, x.dtype)
        for block in self.gpt_neox.layers:
            x = block(x, plan, cache)
        if logit_positions is not None:
            x = x.gather(1, logit_positions[..., None].expand(-1, -1, x.shape[-1]))
        return self.embed_out(self.gpt_neox.final_layer_norm(x))


def init_weights(model: GPTNeoX, generator: torch.Generator | None = None) -> None:
    """GPT-NeoX initialisation: small_init everywhere, wang_init on the residual output projections."""
    config = model.config
    small = math.sqrt(2.0 / (5.0 * config.hidden_size))
    wang = 2.0 / (config.num_layers * math.sqrt(config.hidden_size))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            elif name.endswith("attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
                param.normal_(0.0, wang, generator=generator)
            else:
                param.normal_(0.0, small, generator=generator)
