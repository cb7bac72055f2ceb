"""The KV cache: keys and values of every layer in one value, and the plan of one forward pass.

`KVCache` holds k and v as [layers, rows, heads, slots, head_dim] tensors (keys after rotation)
plus, per row, the token ids whose keys and values sit in slots 0..n-1. An int8 cache stores each
key and value row (head_dim values) as int8 with its own float32 scale ([layers, rows, heads, slots]):
half a bf16 cache's bytes, which decode attention reads once per token. One row is one sequence;
the inference engine owns the cache, decides which row each sequence uses and keeps the token
records up to date; the model only reads and writes the slots a forward pass's `AttentionPlan`
names. Nothing else touches the buffers.

The cache does not track lengths for the model: a forward pass says where each token goes, so
rolling back (rejected speculation, an edited prompt) is just writing those slots again.
"""

from __future__ import annotations

import torch

from stablecode.kernels.ops import quantize_rows, store_kv
from stablecode.options import KV_CACHE_DTYPES


class AttentionPlan:
    """Where the tokens of one forward pass sit, computed once and shared by all layers.

    Either `start` (every row's tokens occupy the same contiguous slots start..start+steps-1, rows
    0..batch-1) or `positions` [batch, steps] (per row, which are also its cache slots) with
    `rows` [batch] (the cache rows; None: 0..batch-1). `length`: keys visible to the last query.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, *, start: int | None = None,
                 positions: torch.Tensor | None = None, rows: torch.Tensor | None = None, length: int = 0):
        self.cos, self.sin = cos, sin
        self.start, self.positions, self.rows, self.length = start, positions, rows, length
        steps = cos.shape[-2]
        self.steps = steps
        # Keys are exactly this pass's tokens (no cache, or a cache filled from slot 0): causal.
        self.is_causal = start == 0 and steps > 1
        self.mask = None
        if positions is not None:
            # Each query sees the slots up to its own position: stale slots past it are hidden.
            self.mask = (torch.arange(length, device=positions.device) <= positions[..., None]).unsqueeze(1)
        elif start and steps > 1:
            query = torch.arange(start, start + steps, device=cos.device)
            self.mask = torch.arange(length, device=cos.device)[None, :] <= query[:, None]
        self._slots: torch.Tensor | None = None
        # Keys each row's last query sees (per-row positions): the mask as lengths, for the decode
        # kernel. The engine feeds one token per row (several tokens of a sequence are several
        # rows of the pass), so that kernel serves verification and short prompt tails too.
        self.key_lengths = positions[:, -1] + 1 if positions is not None else None
        # One sequence's consecutive slots from `prompt_start` on (a prompt or a chunk of one, the
        # keys before it already in the cache): the prompt attention kernel's case.
        self.prompt_start = start
        if positions is not None and positions.shape[0] == 1 and steps > 1:
            first = int(positions[0, 0])
            if int(positions[0, -1]) - first == steps - 1 and bool((positions[0].diff() == 1).all()):
                self.prompt_start = first

    def cache_slots(self, layer_shape: torch.Size, batch: int) -> torch.Tensor:
        """Flat indices into one layer's cache [rows, heads, slots, head_dim] viewed as [-1, head_dim],
        in the order of keys [batch, heads, steps, head_dim] written at `positions` (or from `start`)."""
        if self._slots is None:
            device = self.cos.device
            positions = self.positions
            if positions is None:
                positions = torch.arange(self.start, self.start + self.steps, device=device).expand(batch, -1)
            rows = self.rows if self.rows is not None else torch.arange(batch, device=device)
            heads = torch.arange(layer_shape[1], device=device)
            per_head = (rows[:, None] * layer_shape[1] + heads[None, :]) * layer_shape[2]  # [batch, heads]
            self._slots = (per_head[:, :, None] + positions[:, None, :]).reshape(-1)
        return self._slots


def check_kv_cache_dtype(kv_cache_dtype: str) -> str:
    """kv_cache_dtype itself, if it names what a cache can store (`KV_CACHE_DTYPES`); else ValueError."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown KV cache dtype {kv_cache_dtype!r}: choose one of {', '.join(KV_CACHE_DTYPES)}")
    return kv_cache_dtype


class KVCache:
    """Keys and values of all layers for `rows` sequences of up to `slots` tokens each.

    dtype: what attention computes in (the model's activations). quantized: store int8 rows with
    scales instead (`k_scale`, `v_scale`); otherwise k and v are `dtype` and the scales None."""

    def __init__(self, num_layers: int, rows: int, num_heads: int, slots: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 quantized: bool = False):
        if rows < 1 or slots < 1:
            raise ValueError(f"a KV cache needs at least one row and one slot, got {rows} x {slots}")
        shape = (num_layers, rows, num_heads, slots, head_dim)
        self._dtype = dtype
        self.k = torch.zeros(shape, dtype=torch.int8 if quantized else dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.k_scale = self.v_scale = None
        if quantized:
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = torch.zeros_like(self.k_scale)
        # tokens[r]: the ids whose keys and values fill slots 0..len-1 of row r (kept by the engine).
        self.tokens: list[list[int]] = [[] for _ in range(rows)]

    @classmethod
    def for_model(cls, model, rows: int, slots: int | None = None, dtype: torch.dtype | None = None,
                  kv_cache_dtype: str = "auto") -> "KVCache":
        """A cache shaped for `model` (a GPTNeoX): its layers, heads, dtype and device.

        kv_cache_dtype: "auto" stores the activations' dtype, "int8" int8 rows with scales."""
        config = model.config
        slots = min(slots or config.max_position_embeddings, config.max_position_embeddings)
        # The embedding stays floating point when the projections are quantized.
        dtype = dtype or model.gpt_neox.embed_in.weight.dtype
        return cls(config.num_layers, rows, config.num_heads, slots, config.head_dim, dtype, model.device,
                   quantized=check_kv_cache_dtype(kv_cache_dtype) == "int8")

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the cache keeps, each indexed [layers, rows, heads, slots, ...]."""
        return (self.k, self.v, self.k_scale, self.v_scale) if self.quantized else (self.k, self.v)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def slots(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype attention reads keys and values in (an int8 cache's, dequantized)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached token takes in all layers (keys and values, with their scales)."""
        return sum(b[:, 0, :, 0].nbytes for b in self.buffers)

    def layout(self) -> tuple:
        """What a cached key means only for: (layers, heads, head_dim, dtype, storage, device)."""
        return (self.k.shape[0], self.k.shape[2], self.k.shape[4], self._dtype, self.k.dtype, self.k.device)

    # ---- the model's side: one layer at a time ------------------------------------------------

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan):
        """Write this pass's keys/values [batch, heads, steps, head_dim] of `layer`; return what
        attention reads: keys and values [rows or batch, heads, plan.length, head_dim] (views) and,
        for an int8 cache, their scales [rows or batch, heads, plan.length] (else None)."""
        layer_buffers = [buffer[layer] for buffer in self.buffers]  # k, v (, k_scale, v_scale)
        slots = plan.cache_slots(self.k.shape[1:], k.shape[0])
        scales = layer_buffers[2:] or [None, None]
        if not (store_kv(layer_buffers[0], scales[0], slots, k) and store_kv(layer_buffers[1], scales[1], slots, v)):
            # One index_copy_ over [rows * heads * slots, head_dim]: far cheaper than a mixed
            # row/position index_put, and the slot numbers are computed once for all layers.
            for buffer, new in zip(layer_buffers, self._stored_form(k, v)):
                buffer.view(-1, *buffer.shape[3:]).index_copy_(0, slots, new.reshape(-1, *new.shape[3:]))
        # Every cache row for per-row positions: attention picks the plan's rows (the decode kernel
        # without copying them).
        rows = slice(0, k.shape[0]) if plan.rows is None else slice(None)
        seen = [buffer[rows, :, :plan.length] for buffer in layer_buffers]
        return seen[0], seen[1], (seen[2], seen[3]) if self.quantized else None

    def _stored_form(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """k and v as the buffers hold them: themselves, or int8 with their scales."""
        if not self.quantized:
            return k, v
        (k, k_scale), (v, v_scale) = quantize_rows(k), quantize_rows(v)
        return k, v, k_scale, v_scale

    # ---- the engine's side: whole rows ----------------------------------------------------------

    def grown(self, rows: int, slots: int) -> "KVCache":
        """A larger cache (at least `rows` x `slots`) holding this one's contents and token records."""
        layers, old_rows, heads, old_slots, dim = self.k.shape
        rows, slots = max(rows, old_rows), max(slots, old_slots)
        bigger = KVCache(layers, rows, heads, slots, dim, self.dtype, self.device, self.quantized)
        for new, old in zip(bigger.buffers, self.buffers):
            new[:, :old_rows, :, :old_slots] = old
        bigger.tokens[:old_rows] = self.tokens
        return bigger

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` slots of row `source` (all layers) into row `target`."""
        if source != target and length > 0:
            for buffer in self.buffers:
                buffer[:, target, :, :length] = buffer[:, source, :, :length]
        self.tokens[target] = list(self.tokens[source][:length])

    def read(self, row: int, length: int) -> tuple[torch.Tensor, ...]:
        """Copies of the first `length` slots of `row`, one per buffer: [layers, heads, length, ...]."""
        return tuple(buffer[:, row, :, :length].clone() for buffer in self.buffers)

    def write(self, row: int, parts: tuple[torch.Tensor, ...], tokens: list[int]) -> None:
        """Fill slots 0..n-1 of `row` with what read() returned (or its first n slots) and record their tokens."""
        n = parts[0].shape[2]
        for buffer, part in zip(self.buffers, parts, strict=True):
            buffer[:, row, :, :n] = part
        self.tokens[row] = list(tokens[:n])
