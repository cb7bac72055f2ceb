"""The KV cache: keys and values of every layer in one value, and the plan of one forward pass.

`KVCache` holds k and v as [layers, rows, heads, slots, head_dim] tensors (keys after rotation)
plus, per row, the token ids whose keys and values sit in slots 0..n-1. One row is one sequence;
the inference engine owns the cache, decides which row each sequence uses and keeps the token
records up to date; the model only reads and writes the slots a forward pass's `AttentionPlan`
names. Nothing else touches the buffers.

The cache does not track lengths for the model: a forward pass says where each token goes, so
rolling back (rejected speculation, an edited prompt) is just writing those slots again.
"""

from __future__ import annotations

import torch


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

    def cache_slots(self, layer_shape: torch.Size) -> torch.Tensor:
        """Flat indices into one layer's cache [rows, heads, slots, head_dim] viewed as [-1, head_dim],
        in the order of keys [batch, heads, steps, head_dim] written at `positions`."""
        if self._slots is None:
            batch = self.positions.shape[0]
            device = self.positions.device
            rows = self.rows if self.rows is not None else torch.arange(batch, device=device)
            heads = torch.arange(layer_shape[1], device=device)
            per_head = (rows[:, None] * layer_shape[1] + heads[None, :]) * layer_shape[2]  # [batch, heads]
            self._slots = (per_head[:, :, None] + self.positions[:, None, :]).reshape(-1)
        return self._slots


class KVCache:
    """Keys and values of all layers for `rows` sequences of up to `slots` tokens each."""

    def __init__(self, num_layers: int, rows: int, num_heads: int, slots: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if rows < 1 or slots < 1:
            raise ValueError(f"a KV cache needs at least one row and one slot, got {rows} x {slots}")
        shape = (num_layers, rows, num_heads, slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # tokens[r]: the ids whose keys and values fill slots 0..len-1 of row r (kept by the engine).
        self.tokens: list[list[int]] = [[] for _ in range(rows)]

    @classmethod
    def for_model(cls, model, rows: int, slots: int | None = None, dtype: torch.dtype | None = None) -> "KVCache":
        """A cache shaped for `model` (a GPTNeoX): its layers, heads, dtype and device."""
        config = model.config
        slots = min(slots or config.max_position_embeddings, config.max_position_embeddings)
        # The embedding stays floating point when the projections are quantized.
        dtype = dtype or model.gpt_neox.embed_in.weight.dtype
        return cls(config.num_layers, rows, config.num_heads, slots, config.head_dim, dtype, model.device)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def slots(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached token takes in all layers (keys and values)."""
        return 2 * self.k[:, 0, :, 0].nbytes

    def layout(self) -> tuple:
        """What a cached key means only for: (layers, heads, head_dim, dtype, device)."""
        return (self.k.shape[0], self.k.shape[2], self.k.shape[4], self.k.dtype, self.k.device)

    # ---- the model's side: one layer at a time ------------------------------------------------

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan):
        """Write this pass's keys/values [batch, heads, steps, head_dim] of `layer`; return the keys
        and values attention reads ([rows or batch, heads, plan.length, head_dim] views)."""
        keys, values = self.k[layer], self.v[layer]
        batch, _, steps, _ = k.shape
        if plan.start is not None:  # every row writes the same contiguous slots
            end = plan.start + steps
            keys[:batch, :, plan.start:end] = k
            values[:batch, :, plan.start:end] = v
            return keys[:batch, :, :plan.length], values[:batch, :, :plan.length]
        slots = plan.cache_slots(keys.shape)
        # One index_copy_ over [rows * heads * slots, head_dim]: far cheaper than a mixed
        # row/position index_put, and the slot numbers are computed once for all layers.
        keys.view(-1, k.shape[-1]).index_copy_(0, slots, k.reshape(-1, k.shape[-1]))
        values.view(-1, v.shape[-1]).index_copy_(0, slots, v.reshape(-1, v.shape[-1]))
        if plan.rows is None:
            return keys[:batch, :, :plan.length], values[:batch, :, :plan.length]
        # Every cache row: attention picks the plan's rows (the decode kernel without copying them).
        return keys[:, :, :plan.length], values[:, :, :plan.length]

    # ---- the engine's side: whole rows ----------------------------------------------------------

    def grown(self, rows: int, slots: int) -> "KVCache":
        """A larger cache (at least `rows` x `slots`) holding this one's contents and token records."""
        layers, old_rows, heads, old_slots, dim = self.k.shape
        rows, slots = max(rows, old_rows), max(slots, old_slots)
        bigger = KVCache(layers, rows, heads, slots, dim, self.dtype, self.device)
        bigger.k[:, :old_rows, :, :old_slots] = self.k
        bigger.v[:, :old_rows, :, :old_slots] = self.v
        bigger.tokens[:old_rows] = self.tokens
        return bigger

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` slots of row `source` (all layers) into row `target`."""
        if source != target and length > 0:
            self.k[:, target, :, :length] = self.k[:, source, :, :length]
            self.v[:, target, :, :length] = self.v[:, source, :, :length]
        self.tokens[target] = list(self.tokens[source][:length])

    def read(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the first `length` slots of `row`: [layers, heads, length, head_dim] each."""
        return self.k[:, row, :, :length].clone(), self.v[:, row, :, :length].clone()

    def write(self, row: int, k: torch.Tensor, v: torch.Tensor, tokens: list[int]) -> None:
        """Fill slots 0..n-1 of `row` with keys/values read() earlier and record their tokens."""
        n = k.shape[2]
        self.k[:, row, :, :n] = k
        self.v[:, row, :, :n] = v
        self.tokens[row] = list(tokens[:n])
