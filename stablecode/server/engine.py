"""What the API modules share: the loaded model and its scheduler, request limits, and errors.

Each API family (tgi, openai, ollama) parses its own request shape, validates it against
`Engine.limits` (`check_*`), builds `Sequence`s with `Engine.sequence`, queues them with
`Engine.submit`, and either awaits `Engine.wait` (whole answer) or iterates `group.events()`
inside a `GenerationStream` (streaming).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

import torch
from starlette.responses import StreamingResponse

from stablecode.checkpoint import load_config, load_model, resolve_model_dir
from stablecode.errors import StablecodeError
from stablecode.generate import Sequence
from stablecode.sampling import SamplingParams
from stablecode.server.scheduler import Failed, Finished, Group, Overloaded, Scheduler, TokenEvent
from stablecode.tokenizer import load_tokenizer

log = logging.getLogger("stablecode.server")


class ApiError(Exception):
    """An error answered to the client; each API family formats it its own way.

    kind: "validation", "authentication", "overloaded", "unavailable", "not_found", "generation".
    """

    def __init__(self, status: int, message: str, kind: str = "validation", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for; reported by GET /info."""

    max_body_bytes: int = 2 * 1024 * 1024
    max_prompt_chars: int = 256 * 1024  # longer prompts are refused; longer-than-context ones are cut
    max_new_tokens: int | None = None  # None: the model's context length
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_sequences_per_request: int = 16  # OpenAI's n x number of prompts

    def resolved(self, context_length: int) -> "Limits":
        if self.max_new_tokens is None:
            return Limits(**{**asdict(self), "max_new_tokens": context_length})
        return self


@dataclass
class Result:
    """One finished sequence of a request, with its per-token events (for TGI `details`)."""

    completion: object  # stablecode.generate.Completion
    tokens: list[TokenEvent]


class Engine:
    """A model checkpoint being served: loads in the background, then schedules requests.

    Construction reads the config and tokenizer at once (fast, and it catches most mistakes
    before the port opens); `start_loading()` loads the weights in a thread. `state` is
    "loading", "ready" or "failed".
    """

    def __init__(self, model: str | os.PathLike | None = None, *, dtype: str | None = None, device: str | None = None,
                 quantize: str | None = None, max_batch: int = 8, max_queue: int = 32, limits: Limits = Limits(),
                 attributor=None):
        self.model_dir = resolve_model_dir(model)
        self.config = load_config(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model_id = self.model_dir.name
        self.context_length = self.config.max_position_embeddings
        self.limits = limits.resolved(self.context_length)
        self.dtype, self.device, self.quantize = dtype, device, quantize
        self.max_batch, self.max_queue = max_batch, max_queue
        self.attributor = attributor  # a stablecode.attribution.Attributor, or None: no attribution index
        self.model = None
        self.scheduler: Scheduler | None = None
        self.state = "loading"
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.created = int(time.time())
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    # ---- lifecycle -----------------------------------------------------------------------------

    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="stablecode-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.model = load_model(self.model_dir, dtype=self.dtype, device=self.device, quantize=self.quantize)
            self.device = str(self.model.rotary_cos.device)
            self.dtype = str(self.model.embed_out.weight.dtype).removeprefix("torch.")
            with self._lock:
                if self._stopped:  # the server shut down while the weights were loading
                    return
                self.scheduler = Scheduler(self.model, max_batch=self.max_batch, max_queue=self.max_queue)
                self.scheduler.start()
        except Exception as e:
            log.exception("loading %s failed", self.model_dir)
            self.error = f"loading the model from {self.model_dir} failed: {e}"
            self.state = "failed"
            return
        self.load_seconds = time.perf_counter() - started
        self.state = "ready"
        log.info("model %s ready in %.1f s (%s, %s)", self.model_id, self.load_seconds, self.dtype, self.device)

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state == "ready"

    def stop(self) -> None:
        """Stop serving; a load still in progress is abandoned (its thread is a daemon)."""
        with self._lock:
            self._stopped = True
            scheduler = self.scheduler
        if scheduler is not None:
            scheduler.stop()

    # ---- requests ------------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.state == "loading":
            raise ApiError(503, "the model is still loading; retry in a few seconds (GET /health says when ready)",
                           "unavailable")
        if self.state == "failed":
            raise ApiError(503, self.error or "the model failed to load", "unavailable")

    def check_prompt(self, prompt: str, param: str) -> None:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800" in the JSON
            raise ApiError(422, f"{param} is not valid Unicode: {e.reason} at character {e.start}", param=param) from None
        if len(prompt) > self.limits.max_prompt_chars:
            raise ApiError(413, f"{param} has {len(prompt):,} characters; the limit is "
                                f"{self.limits.max_prompt_chars:,} (see GET /info). Only the last "
                                f"{self.context_length} tokens are used anyway: send the code nearest the cursor",
                           param=param)

    def check_stop(self, stop: list[str], param: str, limit: int | None = None) -> list[str]:
        limit = self.limits.max_stop_strings if limit is None else min(limit, self.limits.max_stop_strings)
        if len(stop) > limit:
            raise ApiError(422, f"{param}: {len(stop)} stop strings given; at most {limit} are allowed", param=param)
        for s in stop:
            if len(s) > self.limits.max_stop_string_chars:
                raise ApiError(422, f"{param}: a stop string has {len(s)} characters; at most "
                                    f"{self.limits.max_stop_string_chars} are allowed", param=param)
            self.check_prompt(s, param)
        return stop

    def check_max_new_tokens(self, value: int, param: str) -> int:
        if value > self.limits.max_new_tokens:
            raise ApiError(422, f"{param} must be <= {self.limits.max_new_tokens} (the model's context), got {value}",
                           param=param)
        return value

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ApiError(422, f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})",
                           param=param)
        return ids

    def check_attribution(self, param: str) -> None:
        """Refuse a request for attribution when the server has no index (before generating anything)."""
        if self.attributor is None:
            raise ApiError(422, f"{param}: this server has no attribution index; start it with "
                                "`stablecode serve --index INDEX` (the embedded model's own index is used by default "
                                "when it is installed)", param=param)

    def attribute(self, text: str) -> dict:
        """Which parts of `text` are in the indexed training data: {"spans": [[start, end], ...], "sources":
        [...]}, offsets in code points (Python string indices) of `text`. CPU work: call it off the event loop."""
        try:
            return self.attributor.overlap(text)
        except StablecodeError as e:  # a corrupted index found while reading a source text
            raise ApiError(500, f"attribution failed: {e}", "attribution") from None

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def sequence(self, prompt_ids: list[int], *, max_new_tokens: int, sampling: SamplingParams,
                 stop: list[str], context_length: int | None = None) -> Sequence:
        """A Sequence for already tokenized, already validated input (cut from the left to fit)."""
        context = min(context_length or self.context_length, self.context_length)
        return Sequence(prompt_ids, self.tokenizer, context, max_new_tokens=max_new_tokens, sampling=sampling,
                        stop_strings=tuple(stop), device=self.device or "cpu")

    @staticmethod
    def sampling(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                 seed: int | None = None, param: str = "parameters") -> SamplingParams:
        try:
            return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        except ValueError as e:
            raise ApiError(422, str(e), param=param) from None

    def submit(self, sequences: list[Sequence]) -> Group:
        """Queue a request's sequences; 429 when the queue is full, 503 while not ready."""
        self.check_ready()
        if len(sequences) > self.limits.max_sequences_per_request:
            raise ApiError(422, f"a request may generate at most {self.limits.max_sequences_per_request} "
                                f"sequences (prompts x n), got {len(sequences)}")
        group = Group(sequences, asyncio.get_running_loop())
        try:
            self.scheduler.submit(group)
        except Overloaded as e:
            raise ApiError(429, str(e), "overloaded") from None
        except RuntimeError as e:
            raise ApiError(503, f"the server is not accepting requests: {e}", "unavailable") from None
        return group

    async def wait(self, group: Group, receive) -> list[Result]:
        """Wait for every sequence of `group`; cancel it if the client disconnects first.

        `receive` is the request's ASGI receive (its body already read): it returns only when
        the client goes away.
        """
        watcher = asyncio.ensure_future(_until_disconnected(receive))
        finished = asyncio.ensure_future(group.finished.wait())
        try:
            await asyncio.wait({watcher, finished}, return_when=asyncio.FIRST_COMPLETED)
            if not group.finished.is_set():
                raise ClientDisconnected()
        finally:
            watcher.cancel()
            finished.cancel()
            group.cancel()
        tokens: list[list[TokenEvent]] = [[] for _ in group.tickets]
        results: list[Result | None] = [None] * len(group.tickets)
        while not group.queue.empty():
            index, event = group.queue.get_nowait()
            if isinstance(event, TokenEvent):
                tokens[index].append(event)
            elif isinstance(event, Finished):
                results[index] = Result(event.completion, tokens[index])
            elif isinstance(event, Failed):
                raise ApiError(500, event.message, "generation")
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
            "limits": {**limits, "openai_max_stop_strings": min(4, self.limits.max_stop_strings),
                       "prompt_longer_than_context": "cut from the left (the last tokens are kept)"},
            "fill_in_the_middle": False,
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

    def __init__(self, group: Group, chunks, media_type: str):
        super().__init__(chunks, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.group = group

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.group.cancel()
