"""Prefix reuse across requests: a new prompt starts from the longest cached prefix of any recent one.

Editors send the same file again and again with a few characters changed near the cursor, so
nearly the whole prompt was seen before. Two places hold cached prefixes:

- the rows of the engine's KV cache: a row keeps what its last sequence left there (prompt and
  completion) until another request takes it, like llama.cpp's per-slot `cache_prompt`;
- an LRU store of prefixes copied out of rows that were about to be overwritten by an unrelated
  prompt, bounded by a byte budget, so that switching between files does not lose either.

For each new request `PrefixCache.place` picks a free row and fills it with the longest common
prefix it finds: in place when that row already holds it, copied from another row (busy or free)
or from the store otherwise. Only the prompt tokens after the prefix then run through the model.
An edit in the middle of the prompt keeps everything before the edit.

Why not fixed-size hashed blocks (vLLM) or a radix tree over paged memory (SGLang): both need
an attention kernel that reads keys through a block table. Ours reads each sequence's keys from
one contiguous cache row, which is what makes batched decoding cheap on a CPU; a whole-row
design keeps that kernel and pays one memory copy (far cheaper than the prefill it saves) when
the prefix lives elsewhere. See docs/core.md.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from stablecode.kv_cache import KVCache

# Prefixes shorter than this are not worth a copy into the store.
MIN_STORED_TOKENS = 16
MAX_STORED_PREFIXES = 256


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (binary search over C-level slice compares)."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    if a[:n] == b[:n]:
        return n
    low, high = 1, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


class _Stored:
    def __init__(self, tokens: list[int], parts: tuple[torch.Tensor, ...]):
        self.tokens, self.parts = tokens, parts  # KVCache.read()'s copies
        self.nbytes = sum(part.nbytes for part in parts)


class PrefixCache:
    """Chooses rows for new requests and keeps evicted prefixes under `budget_bytes` (LRU).

    `reused_tokens` / `stored_bytes` / `evictions` describe what it did (for stats and tests).
    """

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"the prefix cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._stored: OrderedDict[int, _Stored] = OrderedDict()  # least recently used first
        self._next_id = 0
        self._layout = None
        self.stored_bytes = 0
        self.evictions = 0
        self.hits = 0

    @property
    def stored_prefixes(self) -> int:
        return len(self._stored)

    def clear(self) -> None:
        self._stored.clear()
        self.stored_bytes = 0

    def place(self, cache: KVCache, prompt: list[int], free_rows: list[int], row_last_used: list[int]) -> tuple[int, int]:
        """Pick one of `free_rows` for `prompt` and fill its first slots with the longest cached prefix.

        Returns (row, tokens reused); `cache.tokens[row]` is then exactly prompt[:reused].
        """
        if cache.layout() != self._layout:  # another model or dtype: stored keys mean nothing now
            self.clear()
            self._layout = cache.layout()
        free = set(free_rows)
        best_row, best = None, 0
        for row, tokens in enumerate(cache.tokens):
            n = common_prefix_length(tokens, prompt)
            if n > best or (n == best and n > 0 and row in free and best_row not in free):
                best_row, best = row, n
        stored_id, stored_n = self._longest_stored(prompt)
        if best_row in free and best >= stored_n and best > 0:
            target = best_row
        else:
            # A row nothing reuses best: an empty one, else the least recently used.
            target = min(free_rows, key=lambda r: (len(cache.tokens[r]) > 0, row_last_used[r]))
            entry = self._stored[stored_id] if stored_n > best else None
            if entry is not None:
                self._stored.move_to_end(stored_id)  # most recently used: evicted last
            self._keep(cache, target, prompt)
            if best > 0 and entry is None:
                cache.copy_row(best_row, target, best)
            elif entry is not None:
                cache.write(target, tuple(part[:, :, :stored_n] for part in entry.parts), entry.tokens)
                best = stored_n
            else:
                best = 0
        cache.tokens[target] = list(prompt[:best])
        if best:
            self.hits += 1
        return target, best

    def _longest_stored(self, prompt: list[int]) -> tuple[int | None, int]:
        best_id, best = None, 0
        for key, entry in self._stored.items():
            n = common_prefix_length(entry.tokens, prompt)
            if n > best:
                best_id, best = key, n
        return best_id, best

    def _keep(self, cache: KVCache, row: int, prompt: list[int]) -> None:
        """Copy the prefix in `row` to the store before an unrelated prompt overwrites it."""
        tokens = cache.tokens[row]
        if len(tokens) < MIN_STORED_TOKENS or 2 * common_prefix_length(tokens, prompt) >= len(tokens):
            return
        covered = any(r != row and common_prefix_length(t, tokens) == len(tokens) for r, t in enumerate(cache.tokens))
        if covered or any(common_prefix_length(e.tokens, tokens) == len(tokens) for e in self._stored.values()):
            return
        nbytes = len(tokens) * cache.bytes_per_token
        if nbytes > self.budget_bytes:
            return
        for key in [key for key, e in self._stored.items() if common_prefix_length(e.tokens, tokens) == len(e.tokens)]:
            self._drop(key)  # a shorter prefix of this one: superseded
        while self._stored and (self.stored_bytes + nbytes > self.budget_bytes
                                or len(self._stored) >= MAX_STORED_PREFIXES):
            self._drop(next(iter(self._stored)))
            self.evictions += 1
        self._stored[self._next_id] = _Stored(list(tokens), cache.read(row, len(tokens)))
        self._next_id += 1
        self.stored_bytes += nbytes

    def _drop(self, key: int) -> None:
        self.stored_bytes -= self._stored.pop(key).nbytes
