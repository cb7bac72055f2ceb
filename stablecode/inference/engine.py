"""The one decode loop: continuous batching with prefix reuse and prompt-lookup speculation.

Every caller goes through `Engine`: `Completer` and the evaluations run it synchronously
(`Engine.run`), the server runs it in a background thread (`start`, `submit`, events delivered
to asyncio). Per-request state (sampling, stop strings, streamed text, finish reason) lives in
`stablecode.inference.request.Request`; this module only schedules and owns the KV cache.

One step of the loop:
1. Requests leave rows they finished or were cancelled in; waiting requests take free rows.
   Each new request starts from the longest cached prefix of any recent sequence
   (`PrefixCache.place`), so only the rest of its prompt runs through the model.
2. Long prompt remainders run alone, a chunk per step, so that other rows keep decoding.
3. Everything else goes through the model in one forward pass of at most `step_tokens` tokens,
   each token its own query row: every decoding row's newest token plus, for greedy rows,
   prompt-lookup guesses to verify, and the few new tokens of prompts that reused a prefix.
   Keeping the pass this small keeps it on the decode kernels, so verifying guesses and
   joining new prompts cost about what the plain decode step costs.

Rows grow on demand up to `max_batch`, and slots up to the context, so the KV cache takes the
memory its traffic needs. Results travel back to asyncio event loops through
`loop.call_soon_threadsafe`, once per step for all rows, so request handlers await plain
`asyncio.Queue`s and never block the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterator

import torch

from stablecode.inference.prefix_cache import PrefixCache, common_prefix_length
from stablecode.inference.request import Completion, Request
from stablecode.inference.speculation import DEFAULT_DRAFT_TOKENS, draft_tokens_option, propose_draft
from stablecode import kernels
from stablecode.machine import keep_freed_memory
from stablecode.kernels import DECODE_MAX_ROWS
from stablecode.kv_cache import KVCache, check_kv_cache_dtype
from stablecode.model import GPTNeoX

log = logging.getLogger("stablecode.inference")

DEFAULT_PREFIX_CACHE_MB = 1024
PREFILL_CHUNK = 512  # prompt tokens a long prefill runs per step while other rows decode
SLOT_GRANULE = 256  # cache rows grow in steps of this many slots
# With "auto" speculation, drafts are kept when a pass of 1 + 8 tokens costs at most this many plain
# passes: prompt lookup's accepted guesses on code pay for that (docs/server.md, editor benchmark).
SPECULATION_COST_LIMIT = 1.5
# Draft lengths "auto" tries, longest first: where extra rows cost arithmetic (4-bit weights, or int8
# on two slow cores) a pass of 1 + 8 tokens can be too dear while one of 1 + 4 or 1 + 2 still pays.
CALIBRATED_DRAFT_TOKENS = (DEFAULT_DRAFT_TOKENS, 4, 2)


class Overloaded(Exception):
    """The waiting queue is full: the caller should answer 429 at once."""


@dataclass
class TokenEvent:
    """One generated token: its id, the text it made visible (may be empty), its log-probability.

    `last` is true on a sequence's final token; its `Finished` event follows at once.
    """

    id: int
    text: str
    logprob: float
    special: bool
    last: bool = False


@dataclass
class Finished:
    completion: Completion


@dataclass
class Failed:
    message: str


class Ticket:
    """One request in the engine; events go to its group tagged with `index`."""

    def __init__(self, group: "Group", index: int, request: Request):
        self.group = group
        self.index = index
        self.request = request
        self.cancelled = False  # set by the caller, read by the model thread
        self.done = False
        self.row: int | None = None
        self.prefilled = 0  # prompt tokens whose keys are in the row so far

    @property
    def sequence(self) -> Request:  # the name the server's routes use
        return self.request


class Group:
    """The requests of one call (several for OpenAI's `n`, a list of prompts, or a batch).

    With an event loop (the server), `queue` yields (index, TokenEvent | Finished | Failed) and
    `finished` is set once every request has ended; without one (`Engine.run`) events collect in
    `pending`, drained by the caller's own thread.
    """

    def __init__(self, requests: list[Request], loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = asyncio.Event()
        self.pending: deque = deque()
        self.tickets = [Ticket(self, i, r) for i, r in enumerate(requests)]
        self._open = len(requests)
        self.engine: Engine | None = None

    @property
    def scheduler(self) -> "Engine | None":
        return self.engine

    def receive(self, index: int, event) -> None:
        """Called on the event loop (or the model thread when there is no loop)."""
        if self.loop is None:
            self.pending.append((index, event))
        else:
            self.queue.put_nowait((index, event))
        if isinstance(event, (Finished, Failed)):
            self._open -= 1
            if self._open == 0:
                self.finished.set()

    @property
    def done(self) -> bool:
        return self._open == 0

    async def events(self):
        """Yield (index, event) until every request has finished or failed."""
        remaining = len(self.tickets)
        while remaining:
            index, event = await self.queue.get()
            if isinstance(event, (Finished, Failed)):
                remaining -= 1
            yield index, event

    def cancel(self) -> None:
        """Stop generating for this group (client gone); a no-op once finished."""
        if self.engine is not None and not self.finished.is_set():
            self.engine.cancel(self)


class Engine:
    """Runs `model` over up to `max_batch` KV-cache rows of up to `max_seq_len` slots.

    prefix_cache_mb: memory for prefixes kept beyond the rows themselves (0 turns prefix reuse
    off). speculative: prompt-lookup draft tokens per greedy row and step ("auto": the default
    number where a pass carrying them is measured to cost little more than a plain one, else
    none; True: the default number; False/0: off); a request's own `speculative` overrides it. step_tokens: tokens one
    decode pass may carry (the decode kernels' row limit). kv_cache_dtype: "auto" (the activations' dtype) or
    "int8" (`KVCache`).
    """

    def __init__(self, model: GPTNeoX, max_batch: int = 8, max_queue: int = 32, max_seq_len: int | None = None,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB, speculative: bool | int | str = "auto",
                 step_tokens: int = DECODE_MAX_ROWS, kv_cache_dtype: str = "auto"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {prefix_cache_mb}")
        self.model = model
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.max_batch = max_batch
        self.max_queue = max_queue
        context = model.config.max_position_embeddings
        self.max_seq_len = min(max_seq_len or context, context)
        # "auto": measured on the first use (`_calibrate`): on where verifying guesses is nearly free.
        self._auto_speculation = speculative == "auto"
        self.draft_tokens = DEFAULT_DRAFT_TOKENS if self._auto_speculation else draft_tokens_option(speculative)
        self.step_tokens = max(1, step_tokens)
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb else None
        self.device = model.device
        if self.device.type == "cpu":
            keep_freed_memory()  # prefill activations reuse freed heap instead of faulting in new pages
            # The decode attention kernel serves every pass (built once per machine, for large models).
            kernels.load_for(model.config.num_parameters, getattr(model, "quantization", None) is not None)
        self.cache: KVCache | None = None
        self.calibration: dict | None = None
        self._condition = threading.Condition()
        self._sync = threading.RLock()  # a stream may call complete() before it is exhausted
        self._waiting: deque[Ticket] = deque()
        self._rows: list[Ticket | None] = []
        self._row_used: list[int] = []  # step count when each row was last released (LRU)
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Counters, read by /info and the tests; written by the model thread (or under the lock).
        self.steps = 0
        self.rows_per_step: Counter[int] = Counter()
        self.generated_tokens = 0
        self.prefilled_tokens = 0
        self.reused_tokens = 0
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self.finished_requests = 0
        self.cancelled_requests = 0
        self.failed_requests = 0
        self.seconds = Counter()  # time spent in "prefill", "decode" (forward) and "sample"
        self._outbox: list[tuple[Ticket, object]] = []  # events of the current step, sent together

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    # ---- the caller's side ---------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a background thread (the server); then use submit/cancel."""
        self._thread = threading.Thread(target=self._run, name="stablecode-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, fail everything still queued or running, and free the cache."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, group: Group, bounded: bool = True) -> None:
        """Queue a group's requests; with `bounded`, raise Overloaded when more than `max_queue`
        would wait for a row."""
        with self._condition:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            if bounded and len(self._waiting) + len(group.tickets) > self.max_queue + self._free_rows():
                raise Overloaded(f"the server is busy: {self.active} requests are generating and "
                                 f"{len(self._waiting)} are waiting (limit {self.max_queue}); retry shortly")
            group.engine = self
            self._waiting.extend(group.tickets)
            self._condition.notify_all()

    def cancel(self, group: Group) -> None:
        """Drop a group: waiting tickets leave the queue now, running ones at the next step."""
        with self._condition:
            for ticket in group.tickets:
                if ticket.done or ticket.cancelled:
                    continue
                ticket.cancelled = True
                if ticket.row is None:
                    try:
                        self._waiting.remove(ticket)
                    except ValueError:
                        pass
                    else:
                        ticket.done = True
                        self.cancelled_requests += 1
            self._condition.notify_all()

    def run(self, requests: list[Request]) -> Iterator[tuple[int, object]]:
        """Complete `requests` in the calling thread, yielding (index, TokenEvent | Finished | Failed).

        Closing the iterator early cancels what is left (its rows are freed before it returns).
        """
        if self._thread is not None:
            raise RuntimeError("this engine runs in a background thread: submit() groups to it instead")
        with self._sync, torch.inference_mode():
            group = Group(requests)
            self.submit(group, bounded=False)
            try:
                while not group.done:
                    self._admit(block=False)
                    self._step()
                    self._flush()
                    while group.pending:
                        yield group.pending.popleft()
                while group.pending:
                    yield group.pending.popleft()
            finally:
                if not group.done:
                    self.cancel(group)
                    self._admit(block=False)
                    self._outbox = []

    @property
    def active(self) -> int:
        return sum(ticket is not None for ticket in self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> dict:
        with self._condition:
            store = self.prefix_cache
            return {"active": self.active, "waiting": self.waiting, "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "kv_cache_bytes": self.kv_cache_bytes,
                    "kv_cache_dtype": self.kv_cache_dtype,
                    "kv_cache_rows": self.cache.rows if self.cache is not None else 0,
                    "kv_cache_slots": self.cache.slots if self.cache is not None else 0, "steps": self.steps,
                    "rows_per_step": dict(sorted(self.rows_per_step.items())),
                    "max_rows_in_step": max(self.rows_per_step, default=0),
                    "generated_tokens": self.generated_tokens, "prefilled_tokens": self.prefilled_tokens,
                    "reused_tokens": self.reused_tokens,
                    "prefix_cache_bytes": store.stored_bytes if store else 0,
                    "prefix_cache_budget_bytes": store.budget_bytes if store else 0,
                    "prefix_cache_prefixes": store.stored_prefixes if store else 0,
                    "prefix_cache_evictions": store.evictions if store else 0,
                    "speculative_tokens": self.draft_tokens, "speculation_calibration": self.calibration,
                    "drafted_tokens": self.drafted_tokens, "accepted_draft_tokens": self.accepted_tokens,
                    "finished_requests": self.finished_requests, "cancelled_requests": self.cancelled_requests,
                    "failed_requests": self.failed_requests,
                    "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}

    # ---- the model thread ----------------------------------------------------------------------

    def _free_rows(self) -> int:
        return sum(ticket is None for ticket in self._rows) + self.max_batch - len(self._rows)

    def _emit(self, ticket: Ticket, event) -> None:
        self._outbox.append((ticket, event))

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for ticket, event in self._outbox:
            if ticket.group.loop is None:
                ticket.group.receive(ticket.index, event)
            else:
                by_loop.setdefault(ticket.group.loop, []).append((ticket.group, ticket.index, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._admit():
                    self._step()
                    self._flush()
        except BaseException:
            log.exception("the engine thread stopped on an unexpected error")
            raise
        finally:
            self._shutdown()

    def _admit(self, block: bool = True) -> bool:
        """Free the rows of cancelled tickets, then give waiting tickets free rows.

        With `block`, waits while there is nothing to do; returns False when the engine is stopping.
        """
        with self._condition:
            while True:
                for row, ticket in enumerate(self._rows):
                    if ticket is not None and ticket.cancelled:
                        self._release(row, cancelled=True)
                if self._stopping:
                    return False
                if self._waiting or self.active or not block:
                    break
                self._condition.wait()
            taken = []
            while self._waiting and len(taken) < self._free_rows():
                taken.append(self._waiting.popleft())
        if taken:
            busy = sum(t is not None for t in self._rows)
            self._grow(rows=min(self.max_batch, busy + len(taken)),
                       slots=max(len(t.request.prompt_ids) + t.request.max_new_tokens for t in taken))
            if self._auto_speculation:
                self._calibrate()
        deferred = []
        placed: set[int] = set()
        for ticket in taken:
            if ticket.cancelled:
                with self._condition:
                    ticket.done = True
                    self.cancelled_requests += 1
                continue
            if not self._place(ticket, placed):
                deferred.append(ticket)
        if deferred:
            with self._condition:
                self._waiting.extendleft(reversed(deferred))
        return True

    def _place(self, ticket: Ticket, placed: set[int]) -> bool:
        """Give `ticket` a row holding the longest cached prefix of its prompt; False: wait a step,
        because a row placed just now will hold much more of this prompt once it has run."""
        request = ticket.request
        prompt = request.prompt_ids
        needed = len(prompt) + request.max_new_tokens
        if needed > self.max_seq_len:
            self._fail([ticket], f"{len(prompt)} prompt tokens + {request.max_new_tokens} new tokens exceed "
                                 f"this engine's {self.max_seq_len} slots per sequence")
            return True
        if request.finished:  # nothing to generate (max_new_tokens 0)
            self._finish(ticket)
            return True
        if placed and self.prefix_cache is not None:
            now = max((common_prefix_length(self.cache.tokens[r], prompt) for r in range(self.cache.rows)
                       if r not in placed), default=0)
            later = max(common_prefix_length(self._rows[r].request.prompt_ids, prompt) for r in placed)
            if later > now + self.step_tokens:
                return False
        free = [r for r, t in enumerate(self._rows) if t is None]
        if self.prefix_cache is not None:
            row, reused = self.prefix_cache.place(self.cache, prompt, free, self._row_used)
        else:
            row, reused = free[0], 0
            self.cache.tokens[row] = []
        # The last prompt token always runs: its logits choose the first new token.
        reused = min(reused, len(prompt) - 1)
        del self.cache.tokens[row][reused:]
        ticket.prefilled = reused
        request.cached_tokens = reused
        self.reused_tokens += reused
        placed.add(row)
        with self._condition:
            ticket.row = row
            self._rows[row] = ticket
        return True

    def _calibrate(self) -> None:
        """Keep prompt-lookup drafts only where a pass carrying them costs little more than a plain one.

        Decoding kernels that stream the weights once for all rows make extra tokens nearly free;
        where their cost grows with the rows (measured: int8 on some AVX-512 machines), a pass of 9
        tokens costs several plain steps and guesses do not pay; shorter drafts (`CALIBRATED_DRAFT_TOKENS`)
        are tried before speculation is turned off. Timed once, on slots of a free row past anything
        it holds, before the first request runs."""
        self._auto_speculation = False
        row = next((r for r, t in enumerate(self._rows) if t is None), None)
        if row is None or self.cache.slots - len(self.cache.tokens[row]) < DEFAULT_DRAFT_TOKENS + 1:
            return
        start = len(self.cache.tokens[row])

        def seconds(n: int) -> float:
            ids = torch.zeros((n, 1), dtype=torch.long, device=self.device)
            positions = torch.arange(start, start + n, device=self.device)[:, None]
            rows = torch.full((n,), row, dtype=torch.long, device=self.device)
            best = float("inf")
            for _ in range(3):
                began = time.perf_counter()
                self.model(ids, cache=self.cache, input_pos=positions, cache_rows=rows)
                best = min(best, time.perf_counter() - began)
            return best

        self.draft_tokens = 0
        drafted: dict[int, float] = {}
        try:
            plain = seconds(1)
            for count in CALIBRATED_DRAFT_TOKENS:
                drafted[count] = seconds(1 + count)
                if drafted[count] <= SPECULATION_COST_LIMIT * plain:
                    self.draft_tokens = count
                    break
        except Exception:  # the requests' own passes report a broken model; no speculation meanwhile
            log.exception("timing the speculation passes failed")
            return
        self.calibration = {"plain_pass_s": round(plain, 5),
                            "drafted_pass_s": {str(count): round(took, 5) for count, took in drafted.items()}}
        log.info("speculation %s: a pass of 1 + %s tokens takes %s a plain one",
                 f"on, {self.draft_tokens} guesses" if self.draft_tokens else "off",
                 " / ".join(map(str, drafted)), " / ".join(f"{took / plain:.2f}x" for took in drafted.values()))

    def _grow(self, rows: int, slots: int) -> None:
        """Make the cache at least rows x slots (slots rounded up, both within the limits)."""
        slots = min(-(-slots // SLOT_GRANULE) * SLOT_GRANULE, self.max_seq_len)
        if self.cache is None:
            self.cache = KVCache.for_model(self.model, rows, slots, kv_cache_dtype=self.kv_cache_dtype)
        elif rows > self.cache.rows or slots > self.cache.slots:
            self.cache = self.cache.grown(rows, max(slots, self.cache.slots))
        while len(self._rows) < self.cache.rows:
            self._rows.append(None)
            self._row_used.append(0)

    def _step(self) -> None:
        tickets = [t for t in self._rows if t is not None and not t.cancelled and not t.done]
        if not tickets:
            return
        budget = self.step_tokens
        decoding = [t for t in tickets if t.prefilled >= len(t.request.prompt_ids)]
        prefilling = [t for t in tickets if t.prefilled < len(t.request.prompt_ids)]
        budget -= len(decoding)
        joining = []
        for ticket in prefilling:
            remaining = len(ticket.request.prompt_ids) - ticket.prefilled
            if remaining <= budget:
                joining.append(ticket)
                budget -= remaining
            else:  # too long to ride along: a chunk of it runs alone
                self._prefill_chunk(ticket)
        parts = [(t, t.request.prompt_ids[t.prefilled:], t.prefilled) for t in joining]
        drafts = self._drafts(decoding, budget)
        for ticket, draft in zip(decoding, drafts):
            parts.append((ticket, [ticket.request.generated_ids[-1]] + draft, ticket.request.position))
        if parts:
            self._forward(parts, drafts=len(decoding))

    def _drafts(self, decoding: list[Ticket], budget: int) -> list[list[int]]:
        """Prompt-lookup guesses for the greedy rows, sharing `budget` extra tokens."""
        drafts: list[list[int]] = [[] for _ in decoding]
        wanting = []
        for i, ticket in enumerate(decoding):
            request = ticket.request
            limit = self.draft_tokens if request.speculative is None else request.speculative
            if request.sampling.greedy and limit > 0:
                room = min(limit, self.cache.slots - request.position - 1,
                           request.max_new_tokens - len(request.generated_ids) - 1)
                if room > 0:
                    wanting.append((i, room))
        for n, (i, room) in enumerate(wanting):
            share = budget // (len(wanting) - n)
            if share <= 0:
                break
            request = decoding[i].request
            drafts[i] = propose_draft(request.prompt_ids + request.generated_ids, min(room, share))
            budget -= len(drafts[i])
        return drafts

    def _prefill_chunk(self, ticket: Ticket) -> None:
        request = ticket.request
        start = ticket.prefilled
        ids = request.prompt_ids[start:start + PREFILL_CHUNK]
        inputs = torch.tensor([ids], device=self.device)
        started = time.perf_counter()
        try:
            logits = self.model(inputs, cache=self.cache,
                                input_pos=torch.arange(start, start + len(ids), device=self.device)[None],
                                cache_rows=torch.tensor([ticket.row], device=self.device),
                                logit_positions=torch.tensor([[len(ids) - 1]], device=self.device))[:, -1]
        except Exception as e:  # a bad request must not take the server down
            log.exception("prefill failed")
            self._fail([ticket], f"generation failed during prefill: {e}")
            return
        self.cache.tokens[ticket.row].extend(ids)
        ticket.prefilled += len(ids)
        self.prefilled_tokens += len(ids)
        self.seconds["prefill"] += time.perf_counter() - started
        if ticket.prefilled == len(request.prompt_ids):
            self._choose(ticket, logits[0], logits[0].float().log_softmax(-1))
            self._flush()  # a new request's first token goes out before the next forward

    def _forward(self, parts: list[tuple[Ticket, list[int], int]], drafts: int) -> None:
        """One pass over every part's tokens (each token a query row of its own), then sampling."""
        ids, positions, rows = [], [], []
        for ticket, inputs, start in parts:
            ids.extend(inputs)
            positions.extend(range(start, start + len(inputs)))
            rows.extend([ticket.row] * len(inputs))
        plain = len(ids) == len(parts) and rows == list(range(len(rows)))
        started = time.perf_counter()
        try:
            logits = self.model(torch.tensor(ids, device=self.device)[:, None], cache=self.cache,
                                input_pos=torch.tensor(positions, device=self.device)[:, None],
                                # Rows 0..B-1 in order let the model read the cache as a view.
                                cache_rows=None if plain else torch.tensor(rows, device=self.device))[:, 0]
        except Exception as e:
            log.exception("decode step failed")
            self._fail([t for t, _, _ in parts], f"generation failed: {e}")
            return
        elapsed = time.perf_counter() - started
        with self._condition:
            self.steps += 1
            self.rows_per_step[len(parts)] += 1
            self.seconds["decode" if drafts else "prefill"] += elapsed
        started = time.perf_counter()
        logprobs = logits.float().log_softmax(dim=-1)
        offset = 0
        for ticket, inputs, start in parts:
            n = len(inputs)
            row_logits, row_logprobs = logits[offset:offset + n], logprobs[offset:offset + n]
            offset += n
            tokens = self.cache.tokens[ticket.row]
            if ticket.prefilled < len(ticket.request.prompt_ids):  # the rest of a prompt
                tokens.extend(inputs)
                ticket.prefilled += n
                self.prefilled_tokens += n
                self._choose(ticket, row_logits[-1], row_logprobs[-1])
                continue
            draft = inputs[1:]
            self.drafted_tokens += len(draft)
            for i in range(n):
                token = self._choose(ticket, row_logits[i], row_logprobs[i])
                if token is None or ticket.done or i == len(draft) or token != draft[i]:
                    break
                self.accepted_tokens += 1
            tokens.extend(inputs[:i + 1])  # the tokens decoding chose; later slots are stale
        self.seconds["sample"] += time.perf_counter() - started

    def _choose(self, ticket: Ticket, logits: torch.Tensor, logprobs: torch.Tensor) -> int | None:
        """Sample a ticket's next token, stream it, retire the ticket when it is finished."""
        request = ticket.request
        try:
            token = request.choose(logits)
            piece = request.append(token)
        except Exception as e:
            log.exception("sampling failed")
            self._fail([ticket], f"sampling failed: {e}")
            return None
        self.generated_tokens += 1
        self._emit(ticket, TokenEvent(token, piece, float(logprobs[token]), token in request.special_ids,
                                      request.finished))
        if request.finished:
            self._finish(ticket)
        return token

    def _finish(self, ticket: Ticket) -> None:
        self._emit(ticket, Finished(ticket.request.result()))
        self.finished_requests += 1
        with self._condition:
            ticket.done = True
            if ticket.row is not None and self._rows[ticket.row] is ticket:
                self._rows[ticket.row] = None
                self._row_used[ticket.row] = self.steps

    def _fail(self, tickets: list[Ticket], message: str) -> None:
        with self._condition:
            for ticket in tickets:
                if ticket.done:
                    continue
                self._emit(ticket, Failed(message))
                ticket.done = True
                self.failed_requests += 1
                if ticket.row is not None and self._rows[ticket.row] is ticket:
                    self._rows[ticket.row] = None
                    self._row_used[ticket.row] = self.steps

    def _release(self, row: int, cancelled: bool) -> None:
        """Free a row (caller holds the lock); what it holds stays reusable."""
        ticket = self._rows[row]
        self._rows[row] = None
        self._row_used[row] = self.steps
        if ticket is not None and not ticket.done:
            ticket.done = True
            if cancelled:
                self.cancelled_requests += 1

    def _shutdown(self) -> None:
        with self._condition:
            self._stopping = True  # later submits are refused instead of waiting forever
            running = [t for t in self._rows if t is not None] + list(self._waiting)
            self._waiting.clear()
        self._fail(running, "the server is shutting down")
        self._flush()
        self.cache = None


def _deliver(items: list[tuple[Group, int, object]]) -> None:
    for group, index, event in items:
        group.receive(index, event)
