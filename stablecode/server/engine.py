"""What the API modules share: the loaded model and its scheduler, and the lifecycle of a request.

Each API family (tgi, openai, ollama) parses its own request shape into a
`validation.GenerationRequest`, has it checked and tokenised by `Engine.validate`, queues the
result with `Engine.submit`, and either awaits `Engine.wait` (whole answer) or iterates
`Engine.events` inside a `GenerationStream` (streaming).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from starlette.responses import StreamingResponse

from stablecode.checkpoint import load_config, load_model
from stablecode.registry import resolve_model_dir
from stablecode.errors import StablecodeError
from stablecode.inference.engine import DEFAULT_PREFIX_CACHE_MB, Failed, Finished, Group, Overloaded, TokenEvent
from stablecode.inference.engine import Engine as InferenceEngine
from stablecode.inference.request import Request
from stablecode.kv_cache import check_kv_cache_dtype
from stablecode.inference.sampling import SamplingParams
from stablecode.server.validation import (MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, MIN_TEMPERATURE, ApiError,
                                         GenerationRequest, Limits, ValidRequest, Validator)
from stablecode.tokenizer import load_tokenizer

WARMUP_TOKENS = 64  # a prompt this long takes the prompt GEMMs, which touch every weight

log = logging.getLogger("stablecode.server")

__all__ = ["ApiError", "ClientDisconnected", "Engine", "GenerationStream", "Limits", "Result", "Submission"]


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


@dataclass
class Result:
    """One finished sequence of a request, with its per-token events (for TGI `details`) and when its
    first token and its end came (perf_counter_ns)."""

    completion: object  # stablecode.inference.request.Completion
    tokens: list[TokenEvent]
    first_token_ns: int | None = None
    finished_ns: int | None = None


@dataclass
class Submission:
    """A validated request queued in the scheduler."""

    request: ValidRequest
    group: Group
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    first_token_ns: dict[int, int] = field(default_factory=dict)

    def cancel(self) -> None:
        self.group.cancel()


class Engine:
    """A model checkpoint being served: loads in the background, then schedules requests.

    Construction reads the config and tokenizer at once (fast, and it catches most mistakes
    before the port opens); `start_loading()` loads the weights in a thread. `state` is
    "loading", "ready" or "failed".
    """

    def __init__(self, model: str | os.PathLike | None = None, *, dtype: str | None = None, device: str | None = None,
                 quantize: str | None = None, max_batch: int = 8, max_queue: int = 32, limits: Limits = Limits(),
                 attributor=None, prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
                 speculative: bool | int | str = "auto", kv_cache_dtype: str = "auto"):
        self.model_dir = resolve_model_dir(model)
        self.config = load_config(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir, vocab_size=self.config.vocab_size)
        self.model_id = self.model_dir.name
        self.context_length = self.config.max_position_embeddings
        self.limits = limits.resolved(self.context_length)
        self.dtype, self.device, self.quantize = dtype, device, quantize
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefix_cache_mb, self.speculative = prefix_cache_mb, speculative
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.attributor = attributor  # a stablecode.attribution.Attributor, or None: no attribution index
        self.validator = Validator(self.tokenizer, vocab_size=self.config.vocab_size,
                                   context_length=self.context_length, fim=self.config.fim, limits=limits,
                                   attribution=attributor is not None)
        self.model = None
        self.scheduler: InferenceEngine | None = None
        self.state = "loading"
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.created = int(time.time())
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self.shutting_down = False

    # ---- lifecycle -----------------------------------------------------------------------------

    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="stablecode-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.model = load_model(self.model_dir, dtype=self.dtype, device=self.device, quantize=self.quantize)
            self.device = str(self.model.device)
            self.dtype = str(self.model.embed_out.weight.dtype).removeprefix("torch.")
            with self._lock:
                if self._stopped:  # the server shut down while the weights were loading
                    return
                self.scheduler = InferenceEngine(self.model, max_batch=self.max_batch, max_queue=self.max_queue,
                                                 prefix_cache_mb=self.prefix_cache_mb, speculative=self.speculative,
                                                 kv_cache_dtype=self.kv_cache_dtype)
            self._warm_up()
            with self._lock:
                if self._stopped:
                    return
                self.scheduler.start()
        except Exception as e:
            log.exception("loading %s failed", self.model_dir)
            self.error = f"loading the model from {self.model_dir} failed: {e}"
            self.state = "failed"
            return
        self.load_seconds = time.perf_counter() - started
        self.state = "ready"
        log.info("model %s ready in %.1f s (%s, %s)", self.model_id, self.load_seconds, self.dtype, self.device)

    def _warm_up(self) -> None:
        """One short prompt before the server says it is ready, so the first editor request does not
        pay the first pass's one-time costs (weights paged in, thread pools, kernel choice)."""
        tokens = min(WARMUP_TOKENS, self.model.config.max_position_embeddings - 1)
        request = Request([self.tokenizer.eos_id] * tokens, self.tokenizer, self.model.config.max_position_embeddings,
                          max_new_tokens=1, device=self.device)
        for _ in self.scheduler.run([request]):
            pass

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state == "ready"

    def begin_shutdown(self) -> None:
        """Refuse new requests (503); running ones go on until `stop`."""
        self.shutting_down = True

    def busy(self) -> bool:
        scheduler = self.scheduler
        return scheduler is not None and scheduler.active + scheduler.waiting > 0

    def stop(self) -> None:
        """Stop serving: running and waiting sequences end with a Failed("the server is shutting down")
        event; a load still in progress is abandoned (its thread is a daemon)."""
        self.shutting_down = True
        with self._lock:
            self._stopped = True
            scheduler = self.scheduler
        if scheduler is not None:
            scheduler.stop()

    # ---- requests ------------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.shutting_down:
            raise ApiError(503, "the server is shutting down", "unavailable")
        if self.state == "loading":
            raise ApiError(503, "the model is still loading; retry in a few seconds (GET /health says when ready)",
                           "unavailable")
        if self.state == "failed":
            raise ApiError(503, self.error or "the model failed to load", "unavailable")

    def validate(self, request: GenerationRequest) -> ValidRequest:
        """Check and tokenise a parsed request (CPU work for long prompts: call it off the event loop)."""
        self.check_ready()
        return self.validator.validate(request)

    def attribute(self, text: str) -> dict:
        """Which parts of `text` are in the indexed training data: {"spans": [[start, end], ...], "sources":
        [...]}, offsets in code points (Python string indices) of `text`. CPU work: call it off the event loop."""
        try:
            return self.attributor.overlap(text)
        except StablecodeError as e:  # a corrupted index found while reading a source text
            raise ApiError(500, f"attribution failed: {e}", "attribution") from None

    def submit(self, request: ValidRequest) -> Submission:
        """Queue a validated request's sequences; 429 when the queue is full, 503 while not ready."""
        self.check_ready()
        group = Group(self._sequences(request), asyncio.get_running_loop())
        try:
            self.scheduler.submit(group)
        except Overloaded as e:
            raise ApiError(429, str(e), "overloaded") from None
        except RuntimeError as e:
            raise ApiError(503, f"the server is not accepting requests: {e}", "unavailable") from None
        return Submission(request, group)

    def _sequences(self, r: ValidRequest) -> list[Request]:
        sequences = []
        for prompt in r.prompts:
            for j in range(r.n):
                sampling = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                          repetition_penalty=r.repetition_penalty,
                                          seed=None if r.seed is None else r.seed + j)
                sequences.append(Request(prompt.ids, self.tokenizer, r.context_length,
                                          max_new_tokens=r.max_new_tokens, sampling=sampling,
                                          stop_strings=r.stop + prompt.stop, device=self.device or "cpu",
                                          token_healing=True))
        return sequences

    async def events(self, submission: Submission):
        """Yield (index, TokenEvent | Finished | Failed) as they come, noting each sequence's first-token time."""
        async for index, event in submission.group.events():
            if isinstance(event, TokenEvent) and index not in submission.first_token_ns:
                submission.first_token_ns[index] = time.perf_counter_ns()
            yield index, event

    async def wait(self, submission: Submission, receive) -> list[Result]:
        """Wait for every sequence of `submission`; cancel it if the client disconnects first.

        `receive` is the request's ASGI receive (its body already read): it returns only when
        the client goes away.
        """
        results: list[Result | None] = [None] * len(submission.group.tickets)
        tokens: list[list[TokenEvent]] = [[] for _ in results]

        async def collect():
            async for index, event in self.events(submission):
                if isinstance(event, TokenEvent):
                    tokens[index].append(event)
                elif isinstance(event, Finished):
                    results[index] = Result(event.completion, tokens[index], submission.first_token_ns.get(index),
                                            time.perf_counter_ns())
                elif isinstance(event, Failed):
                    raise ApiError(503 if self.shutting_down else 500, event.message,
                                   "unavailable" if self.shutting_down else "generation")

        watcher = asyncio.ensure_future(_until_disconnected(receive))
        collector = asyncio.ensure_future(collect())
        try:
            await asyncio.wait({watcher, collector}, return_when=asyncio.FIRST_COMPLETED)
            if not collector.done():
                raise ClientDisconnected()
            collector.result()  # raises the generation's failure, if any
        finally:
            watcher.cancel()
            collector.cancel()
            submission.cancel()
        return results

    def info(self) -> dict:
        """Model, limits in force and live load (GET /info); field names follow TGI's /info where they exist."""
        limits = asdict(self.limits)
        return {
            "model_id": self.model_id,
            "model_dir": str(self.model_dir),
            "model_dtype": self.dtype,
            "model_device_type": self.device,
            "quantize": self.quantize,
            "state": self.state,
            "error": self.error,
            "load_seconds": self.load_seconds,
            "context_length": self.context_length,
            "max_input_tokens": self.context_length - 1,
            "max_total_tokens": self.context_length,
            "max_stop_sequences": self.limits.max_stop_strings,
            "max_best_of": 1,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "max_concurrent_requests": self.max_batch + self.max_queue,
            "limits": {**limits, "min_temperature": MIN_TEMPERATURE,
                       "repetition_penalty": [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY],
                       "prompt_longer_than_context": "cut from the left (the last tokens are kept); a "
                                                     "fill-in-the-middle prompt loses its prefix's start and its "
                                                     "suffix's end"},
            "fill_in_the_middle": self.config.fim,
            "attribution_index": str(self.attributor.directory) if self.attributor is not None else None,
            "scheduler": self.scheduler.stats() if self.scheduler is not None else None,
            "version": _version(),
            "torch_threads": torch.get_num_threads(),
        }


async def _until_disconnected(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _version() -> str:
    from stablecode import __version__

    return __version__


class GenerationStream(StreamingResponse):
    """A streamed answer that cancels its generation however the response ends.

    Starlette stops iterating when the client disconnects; cancelling in `__call__` (not in the
    iterator) also covers a client gone before the first chunk, when the iterator never started.
    """

    def __init__(self, submission: Submission, chunks, media_type: str):
        super().__init__(chunks, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.submission = submission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.submission.cancel()
