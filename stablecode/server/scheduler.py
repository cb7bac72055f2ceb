"""Continuous batching: one model thread serving many requests at once.

Requests wait in a bounded queue; between decode steps each waiting request takes a free KV-cache
row and is prefilled into it, then every active row decodes together in one forward pass at its
own position. A finished or cancelled request leaves its row at the next step boundary, so rows
join and leave the running batch freely. Per-request state (sampling, stop strings, streamed
text, finish reason) lives in `stablecode.generate.Sequence`; this module only schedules.

Results travel back to the asyncio event loop through `loop.call_soon_threadsafe`, once per
step for all rows, so request handlers await plain `asyncio.Queue`s and never block the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import torch

from stablecode.generate import Completion, Sequence
from stablecode.model import GPTNeoX

log = logging.getLogger("stablecode.server")


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
    """One sequence in the scheduler; events go to its group's queue tagged with `index`."""

    def __init__(self, group: "Group", index: int, sequence: Sequence):
        self.group = group
        self.index = index
        self.sequence = sequence
        self.cancelled = False  # set from the event loop, read by the model thread
        self.done = False
        self.row: int | None = None


class Group:
    """The sequences of one HTTP request (several for OpenAI's `n` or a list of prompts).

    Created on the event loop; `queue` yields (index, TokenEvent | Finished | Failed) and
    `finished` is set once every sequence has ended.
    """

    def __init__(self, sequences: list[Sequence], loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = asyncio.Event()
        self.tickets = [Ticket(self, i, s) for i, s in enumerate(sequences)]
        self._open = len(sequences)
        self.scheduler: Scheduler | None = None

    def receive(self, index: int, event) -> None:
        """Called on the event loop."""
        self.queue.put_nowait((index, event))
        if isinstance(event, (Finished, Failed)):
            self._open -= 1
            if self._open == 0:
                self.finished.set()

    async def events(self):
        """Yield (index, event) until every sequence has finished or failed."""
        remaining = len(self.tickets)
        while remaining:
            index, event = await self.queue.get()
            if isinstance(event, (Finished, Failed)):
                remaining -= 1
            yield index, event

    def cancel(self) -> None:
        """Stop generating for this request (client gone); a no-op once finished."""
        if self.scheduler is not None and not self.finished.is_set():
            self.scheduler.cancel(self)


class Scheduler:
    """Runs `model` in one background thread over `max_batch` KV-cache rows.

    `submit(group)` queues a request's sequences or raises Overloaded when more than `max_queue`
    sequences would be waiting for a row.
    """

    def __init__(self, model: GPTNeoX, max_batch: int = 8, max_queue: int = 32, max_seq_len: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_seq_len = max_seq_len or model.config.max_position_embeddings
        self.device = model.rotary_cos.device
        self._condition = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._rows: list[Ticket | None] = [None] * max_batch
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Counters, read by /info and the tests; written only by the model thread (or under the lock).
        self.steps = 0
        self.rows_per_step: Counter[int] = Counter()
        self.generated_tokens = 0
        self.prefilled_tokens = 0
        self.finished_requests = 0
        self.cancelled_requests = 0
        self.failed_requests = 0
        self.kv_cache_bytes = 0
        self.seconds = Counter()  # time spent in "prefill", "decode" (forward) and "sample"
        self._outbox: list[tuple[Ticket, object]] = []  # events of the current step, sent together

    # ---- event-loop side -----------------------------------------------------------------------

    def start(self) -> None:
        self.model.setup_kv_cache(self.max_batch, self.max_seq_len)
        caches = [block.attention.kv_cache for block in self.model.gpt_neox.layers]
        self.kv_cache_bytes = sum(c.k.nbytes + c.v.nbytes for c in caches)
        log.info("KV cache: %d rows x %d tokens = %.2f GiB", self.max_batch, self.max_seq_len,
                 self.kv_cache_bytes / 2**30)
        self._thread = threading.Thread(target=self._run, name="stablecode-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, fail everything still queued or running, and free the cache."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, group: Group) -> None:
        with self._condition:
            if self._stopping:
                raise RuntimeError("the scheduler is stopped")
            if len(self._waiting) + len(group.tickets) > self.max_queue + self._free_rows():
                raise Overloaded(f"the server is busy: {self.active} requests are generating and "
                                 f"{len(self._waiting)} are waiting (limit {self.max_queue}); retry shortly")
            group.scheduler = self
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

    @property
    def active(self) -> int:
        return sum(ticket is not None for ticket in self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> dict:
        with self._condition:
            return {"active": self.active, "waiting": self.waiting, "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "kv_cache_bytes": self.kv_cache_bytes, "steps": self.steps,
                    "rows_per_step": dict(sorted(self.rows_per_step.items())),
                    "max_rows_in_step": max(self.rows_per_step, default=0),
                    "generated_tokens": self.generated_tokens, "prefilled_tokens": self.prefilled_tokens,
                    "finished_requests": self.finished_requests, "cancelled_requests": self.cancelled_requests,
                    "failed_requests": self.failed_requests,
                    "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}

    # ---- model thread --------------------------------------------------------------------------

    def _free_rows(self) -> int:
        return sum(ticket is None for ticket in self._rows)

    def _emit(self, ticket: Ticket, event) -> None:
        self._outbox.append((ticket, event))

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for ticket, event in self._outbox:
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
                    self._decode_step()
                    self._flush()
        except BaseException:
            log.exception("the scheduler thread stopped on an unexpected error")
            raise
        finally:
            self._shutdown()

    def _admit(self) -> bool:
        """Free the rows of cancelled tickets, then prefill waiting tickets into free rows.

        Blocks while there is nothing to do; returns False when the scheduler is stopping.
        """
        with self._condition:
            while True:
                for row, ticket in enumerate(self._rows):
                    if ticket is not None and ticket.cancelled:
                        self._release(row, cancelled=True)
                if self._stopping:
                    return False
                if self._waiting or self.active:
                    break
                self._condition.wait()
            admitted = []
            for row, ticket in enumerate(self._rows):
                if ticket is None and self._waiting:
                    ticket = self._waiting.popleft()
                    ticket.row = row
                    self._rows[row] = ticket
                    admitted.append(ticket)
        for ticket in admitted:
            if ticket.cancelled:  # gone while earlier prompts were prefilled; its row is freed next step
                continue
            self._prefill(ticket)
            self._flush()  # each new request's first token goes out before the next prefill
        return True

    def _prefill(self, ticket: Ticket) -> None:
        sequence = ticket.sequence
        if sequence.finished:  # nothing to generate (max_new_tokens 0)
            self._finish(ticket)
            return
        ids = torch.tensor(sequence.prompt_ids, device=self.device)[None]
        length = ids.shape[1]
        started = time.perf_counter()
        try:
            logits = self.model(ids, input_pos=torch.arange(length, device=self.device)[None],
                                cache_rows=torch.tensor([ticket.row], device=self.device),
                                logit_positions=torch.tensor([[length - 1]], device=self.device))[:, -1]
        except Exception as e:  # a bad request must not take the server down
            log.exception("prefill failed")
            self._fail([ticket], f"generation failed during prefill: {e}")
            return
        self.prefilled_tokens += length
        self.seconds["prefill"] += time.perf_counter() - started
        self._sample([ticket], logits)

    def _decode_step(self) -> None:
        tickets = [t for t in self._rows if t is not None and not t.cancelled]
        if not tickets:
            return
        rows = [t.row for t in tickets]
        tokens = torch.tensor([t.sequence.generated_ids[-1] for t in tickets], device=self.device)[:, None]
        positions = torch.tensor([t.sequence.position for t in tickets], device=self.device)[:, None]
        # Rows 0..B-1 in order let the model read the cache as a view instead of gathering rows.
        cache_rows = None if rows == list(range(len(rows))) else torch.tensor(rows, device=self.device)
        started = time.perf_counter()
        try:
            logits = self.model(tokens, input_pos=positions, cache_rows=cache_rows)[:, -1]
        except Exception as e:
            log.exception("decode step failed")
            self._fail(tickets, f"generation failed: {e}")
            return
        with self._condition:
            self.steps += 1
            self.rows_per_step[len(tickets)] += 1
            self.seconds["decode"] += time.perf_counter() - started
        self._sample(tickets, logits)

    def _sample(self, tickets: list[Ticket], logits: torch.Tensor) -> None:
        """Choose each row's next token, stream it, and retire finished rows."""
        started = time.perf_counter()
        logprobs = logits.float().log_softmax(dim=-1)
        for ticket, row_logits, row_logprobs in zip(tickets, logits, logprobs):
            sequence = ticket.sequence
            try:
                token = sequence.choose(row_logits)
                piece = sequence.append(token)
            except Exception as e:
                log.exception("sampling failed")
                self._fail([ticket], f"sampling failed: {e}")
                continue
            self.generated_tokens += 1
            self._emit(ticket, TokenEvent(token, piece, float(row_logprobs[token]), token in sequence.special_ids,
                                   sequence.finished))
            if sequence.finished:
                self._finish(ticket)
        self.seconds["sample"] += time.perf_counter() - started

    def _finish(self, ticket: Ticket) -> None:
        self._emit(ticket, Finished(ticket.sequence.result()))
        self.finished_requests += 1
        with self._condition:
            ticket.done = True
            if ticket.row is not None:
                self._rows[ticket.row] = None

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

    def _release(self, row: int, cancelled: bool) -> None:
        """Free a row (caller holds the lock)."""
        ticket = self._rows[row]
        self._rows[row] = None
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
        self.model.clear_kv_cache()


def _deliver(items: list[tuple[Group, int, object]]) -> None:
    for group, index, event in items:
        group.receive(index, event)
