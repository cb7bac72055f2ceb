"""The StableCode network: a GPT-NeoX decoder.

embedding → N blocks (attention with partial rotary + MLP, parallel residual) → final LayerNorm → head.

Module and parameter names follow Hugging Face's GPTNeoXForCausalLM, so a state dict maps
one-to-one onto released checkpoints (`gpt_neox.layers.0.attention.query_key_value.weight`, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stablecode.config import ModelConfig
from stablecode.kernels import attention


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


class KVCache(nn.Module):
    """Preallocated keys and values [batch, heads, max_seq_len, head_dim] for one layer.

    Keys are stored after rotation. The cache does not track lengths: callers say where each
    token goes (`input_pos`), so rolling back (speculation, prefix reuse) is just writing again.
    """

    def __init__(self, batch_size: int, max_seq_len: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch_size, num_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, plan: "AttentionPlan") -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, steps, _ = k.shape
        if plan.start is not None:  # every row writes the same contiguous slots
            end = plan.start + steps
            self.k[:batch, :, plan.start:end] = k
            self.v[:batch, :, plan.start:end] = v
            return self.k[:batch, :, :plan.length], self.v[:batch, :, :plan.length]
        slots = plan.cache_slots(self.k.shape, k.shape[1])
        # One index_copy_ over [rows * heads * slots, head_dim]: far cheaper than a mixed
        # row/position index_put, and the slot numbers are computed once for all layers.
        self.k.view(-1, k.shape[-1]).index_copy_(0, slots, k.reshape(-1, k.shape[-1]))
        self.v.view(-1, v.shape[-1]).index_copy_(0, slots, v.reshape(-1, v.shape[-1]))
        if plan.cache_rows is None:
            return self.k[:batch, :, :plan.length], self.v[:batch, :, :plan.length]
        # Every cache row: attention picks the plan's rows (the decode kernel without copying them).
        return self.k[:, :, :plan.length], self.v[:, :, :plan.length]


class AttentionPlan:
    """Where the tokens of one forward pass sit, computed once and shared by all layers."""

    def __init__(self, cos, sin, start=None, positions=None, length=0, mask=None, is_causal=False,
                 cache_rows=None):
        self.cos, self.sin = cos, sin
        self.start, self.positions, self.length = start, positions, length
        self.mask, self.is_causal, self.cache_rows = mask, is_causal, cache_rows
        self._slots: torch.Tensor | None = None
        # Keys each row's last query sees (per-row positions only): its mask as lengths.
        self.key_lengths = positions[:, -1] + 1 if positions is not None else None

    def cache_slots(self, cache_shape: torch.Size, num_heads: int) -> torch.Tensor:
        """Flat indices into a cache [rows, heads, slots, head_dim] viewed as [-1, head_dim],
        in the order of keys [batch, heads, steps, head_dim] written at `positions`."""
        if self._slots is None:
            batch = self.positions.shape[0]
            rows = self.cache_rows if self.cache_rows is not None else torch.arange(batch, device=self.positions.device)
            heads = torch.arange(num_heads, device=self.positions.device)
            per_head = (rows[:, None] * cache_shape[1] + heads[None, :]) * cache_shape[2]  # [batch, heads]
            self._slots = (per_head[:, :, None] + self.positions[:, None, :]).reshape(-1)
        return self._slots


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        # One fused projection laid out per head: [q_h, k_h, v_h] for h = 0, 1, ...
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        batch, steps, _ = x.shape
        # -1 heads: under tensor parallelism this rank holds only its own whole heads.
        qkv = self.query_key_value(x).view(batch, steps, -1, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q = apply_rotary(q, plan.cos, plan.sin)
        k = apply_rotary(k, plan.cos, plan.sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(k, v, plan)
        y = attention(q, k, v, plan.mask, plan.is_causal, plan.cache_rows, plan.key_lengths)
        return self.dense(y.transpose(1, 2).reshape(batch, steps, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact erf GELU


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if not config.shared_layernorm:
            self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        attention_input = self.input_layernorm(x)
        attention_output = self.attention(attention_input, plan)
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
            layers=nn.ModuleList(Block(config) for _ in range(config.num_layers)),
            final_layer_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        ))
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight
        cos, sin = rotary_tables(config, device="cpu" if on_meta else None)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.kv_cache_size: tuple[int, int] | None = None  # (batch, max_seq_len) when set up

    # ---- KV cache ----------------------------------------------------------------------------

    def setup_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        """Allocate a key/value cache for incremental decoding (replaces any previous one)."""
        max_seq_len = min(max_seq_len or self.config.max_position_embeddings, self.config.max_position_embeddings)
        # The embedding stays floating point when the projections are quantized.
        dtype = dtype or self.gpt_neox.embed_in.weight.dtype
        device = device or self.rotary_cos.device
        for block in self.gpt_neox.layers:
            block.attention.kv_cache = KVCache(batch_size, max_seq_len, self.config.num_heads,
                                               self.config.head_dim, dtype, device)
        self.kv_cache_size = (batch_size, max_seq_len)

    def clear_kv_cache(self) -> None:
        for block in self.gpt_neox.layers:
            block.attention.kv_cache = None
        self.kv_cache_size = None

    def reset_rotary_tables(self) -> None:
        """Recompute the rotary tables (after building on the meta device)."""
        cos, sin = rotary_tables(self.config, device=self.embed_out.weight.device if
                                 self.embed_out.weight.device.type != "meta" else "cpu")
        self.rotary_cos, self.rotary_sin = cos, sin

    # ---- forward -----------------------------------------------------------------------------

    def _plan(self, batch: int, steps: int, input_pos, cache_rows, dtype) -> AttentionPlan:
        cached = self.kv_cache_size is not None
        if input_pos is None:
            input_pos = 0
        if isinstance(input_pos, int):
            end = input_pos + steps
            if end > self.config.max_position_embeddings:
                raise ValueError(f"positions up to {end} exceed the model's context of "
                                 f"{self.config.max_position_embeddings} tokens")
            if cached and end > self.kv_cache_size[1]:
                raise ValueError(f"positions up to {end} exceed the KV cache of {self.kv_cache_size[1]} tokens")
            cos = self.rotary_cos[input_pos:end].to(dtype)
            sin = self.rotary_sin[input_pos:end].to(dtype)
            if cache_rows is None:
                if not cached or input_pos == 0:
                    # Keys are exactly this pass's tokens: the fused causal kernel applies.
                    return AttentionPlan(cos, sin, start=input_pos, length=end, is_causal=steps > 1)
                if steps == 1:
                    return AttentionPlan(cos, sin, start=input_pos, length=end)
                query_pos = torch.arange(input_pos, end, device=cos.device)
                mask = torch.arange(end, device=cos.device)[None, :] <= query_pos[:, None]
                return AttentionPlan(cos, sin, start=input_pos, length=end, mask=mask)
            input_pos = torch.arange(input_pos, end, device=cos.device).expand(batch, steps)
        if not cached:
            raise ValueError("per-row positions need a KV cache: call setup_kv_cache() first")
        positions = input_pos.expand(batch, steps) if input_pos.dim() == 1 else input_pos
        length = int(positions.max()) + 1
        if length > self.kv_cache_size[1]:
            raise ValueError(f"positions up to {length} exceed the KV cache of {self.kv_cache_size[1]} tokens")
        cos = self.rotary_cos[positions].to(dtype).unsqueeze(1)
        sin = self.rotary_sin[positions].to(dtype).unsqueeze(1)
        # Each query sees the cache slots up to its own position: stale slots past it are hidden.
        mask = (torch.arange(length, device=positions.device) <= positions[..., None]).unsqueeze(1)
        return AttentionPlan(cos, sin, positions=positions, length=length, mask=mask, cache_rows=cache_rows)

    def forward(self, input_ids: torch.Tensor, input_pos: int | torch.Tensor | None = None,
                cache_rows: torch.Tensor | None = None, logit_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, steps, vocab] for input_ids [batch, steps].

        input_pos: where these tokens sit. An int start (all rows alike), or a LongTensor
        [batch, steps] of per-row positions, which are also the rows' KV-cache slots.
        cache_rows: LongTensor [batch], the KV-cache rows these sequences use (default 0..batch-1).
        logit_positions: LongTensor [batch, k]: compute logits only there (prefill needs one per row).
        """
        batch, steps = input_ids.shape
        x = self.gpt_neox.embed_in(input_ids)
        plan = self._plan(batch, steps, input_pos, cache_rows, x.dtype)
        for block in self.gpt_neox.layers:
            x = block(x, plan)
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
