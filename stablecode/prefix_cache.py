"""Prefix reuse: keep the key/value cache of recent prompts and skip the tokens they share.

Editors send almost the same prompt on every keystroke. Each cache entry holds the KV cache of one
recent sequence and the token ids its slots hold; a new prompt takes the entry with the longest
common token prefix and only the tokens after it are run through the model. The model's cache does
not track lengths, so reusing an entry is just writing the new tokens at the right positions.
"""

from __future__ import annotations

import torch

from stablecode.model import GPTNeoX, KVCache


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class _Entry:
    def __init__(self, layers: list[KVCache]):
        self.layers = layers
        self.ids: list[int] = []  # tokens whose keys/values are in slots 0..len-1
        self.last_used = 0


class PrefixCache:
    """Up to `entries` KV caches of recent sequences (batch 1), each `max_seq_len` slots long.

    Use: `logits = cache.prefill(model, prompt_ids)`, decode with the model's cache as usual
    (positions continue after the prompt), then `cache.release(model, ids_in_cache)`.
    `reused_tokens` / `prefilled_tokens` describe the last prefill.
    """

    def __init__(self, entries: int = 1, max_seq_len: int | None = None):
        if entries < 1:
            raise ValueError(f"a prefix cache needs at least one entry, got {entries}")
        self.max_entries = entries
        self.max_seq_len = max_seq_len
        self._entries: list[_Entry] = []
        self._layout = None  # (config, dtype, device) the entries were allocated for
        self._clock = 0
        self._active: _Entry | None = None
        self.reused_tokens = 0
        self.prefilled_tokens = 0

    @property
    def capacity(self) -> int | None:
        """Slots per entry (None until the first use decides it from the model)."""
        return self._layout[3] if self._layout else None

    def _allocate(self, model: GPTNeoX) -> _Entry:
        config = model.config
        dtype, device = model.gpt_neox.embed_in.weight.dtype, model.rotary_cos.device
        length = min(self.max_seq_len or config.max_position_embeddings, config.max_position_embeddings)
        layout = (config, dtype, device, length)
        if layout != self._layout:  # another model (or dtype): the old entries mean nothing for it
            self._entries, self._layout = [], layout
        if len(self._entries) < self.max_entries:
            entry = _Entry([KVCache(1, length, config.num_heads, config.head_dim, dtype, device)
                            for _ in range(config.num_layers)])
            self._entries.append(entry)
            return entry
        return min(self._entries, key=lambda e: e.last_used)

    def _choose(self, model: GPTNeoX, prompt_ids: list[int]) -> tuple[_Entry, int]:
        layout_matches = self._layout is not None and self._layout[:3] == (
            model.config, model.gpt_neox.embed_in.weight.dtype, model.rotary_cos.device)
        best, best_length = None, 0
        if layout_matches:
            for entry in self._entries:
                length = common_prefix_length(entry.ids, prompt_ids)
                if length > best_length:
                    best, best_length = entry, length
        # A prompt sharing little with every entry (another file, say) takes a free or the least
        # recently used entry rather than overwriting the tail of a related one.
        if best is None or (2 * best_length < len(prompt_ids) and len(self._entries) < self.max_entries):
            best, best_length = self._allocate(model), 0
        return best, best_length

    @torch.inference_mode()
    def prefill(self, model: GPTNeoX, prompt_ids: list[int], max_new_tokens: int = 0) -> torch.Tensor:
        """Make the best entry the model's KV cache, run the prompt's new tokens; logits [vocab] of the last.

        max_new_tokens: how many tokens will follow (they must fit in the entry too).
        """
        if not prompt_ids:
            raise ValueError("cannot prefill an empty prompt")
        entry, reused = self._choose(model, prompt_ids)
        if len(prompt_ids) + max_new_tokens > self._layout[3]:
            raise ValueError(f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new tokens exceed the prefix "
                             f"cache's {self._layout[3]} slots per entry")
        reused = min(reused, len(prompt_ids) - 1)  # the last prompt token always runs: its logits are needed
        self._clock += 1
        entry.last_used = self._clock
        entry.ids = []  # until release() says what the slots hold
        self._activate(model, entry)
        new = torch.tensor([prompt_ids[reused:]], device=model.rotary_cos.device)
        last = torch.tensor([[new.shape[1] - 1]], device=new.device)
        logits = model(new, input_pos=reused, logit_positions=last)[0, -1]
        self.reused_tokens, self.prefilled_tokens = reused, new.shape[1]
        return logits

    def _activate(self, model: GPTNeoX, entry: _Entry) -> None:
        for block, layer_cache in zip(model.gpt_neox.layers, entry.layers):
            block.attention.kv_cache = layer_cache
        model.kv_cache_size = (1, self._layout[3])
        self._active = entry

    def release(self, model: GPTNeoX, ids_in_cache: list[int]) -> None:
        """Record the tokens now held in slots 0..len-1 of the active entry and detach it from the model."""
        if self._active is not None:
            self._active.ids = list(ids_in_cache[:self._layout[3]])
            self._active = None
        model.clear_kv_cache()

    def clear(self) -> None:
        """Forget every entry (frees their memory)."""
        self._entries, self._layout, self._active = [], None, None
