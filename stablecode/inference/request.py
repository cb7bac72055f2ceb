"""One request being completed: its prompt fitted to the context, sampler, streamed text and stop.

Data flows one way: ids → engine (model + KV cache) → logits → `Request.choose` → ids →
`Request.append` → incremental detokenizer → stop-string check → visible text pieces.
The engine (`stablecode.inference.engine`) decides when a request runs; this module decides
what it produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from stablecode.inference.sampling import SamplingParams, sample_token
from stablecode.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class Completion:
    """The result of completing one prompt."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens or the context filled up
    truncated_prompt_tokens: int = 0  # tokens cut from the start of the prompt to fit the context
    token_ids: list[int] = field(default_factory=list)
    cached_prompt_tokens: int = 0  # prompt tokens whose keys came from the prefix cache, not the model


def fit_to_context(prompt_ids: list[int], max_new_tokens: int, context_length: int) -> tuple[list[int], int, int]:
    """Keep the most recent prompt tokens (the code nearest the cursor) so prompt + output fits.

    Returns (prompt_ids, tokens_cut, max_new_tokens); max_new_tokens shrinks only when it alone
    would not leave room for one prompt token.
    """
    max_new_tokens = max(0, min(max_new_tokens, context_length - 1))
    room = context_length - max_new_tokens
    if len(prompt_ids) <= room:
        return prompt_ids, 0, max_new_tokens
    cut = len(prompt_ids) - room
    return prompt_ids[cut:], cut, max_new_tokens


class StopStringMatcher:
    """Holds back text while it could be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stop_strings: list[str] | tuple[str, ...] = ()):
        self.stop_strings = [s for s in stop_strings if s]
        self.longest = max((len(s) for s in self.stop_strings), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add newly decoded text; return the part that is now safe to show."""
        if self.stopped or not piece:
            return ""
        self.text += piece
        if not self.stop_strings:
            self.emitted = len(self.text)
            return piece
        search_from = max(0, self.emitted - self.longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit_until(min(hits))
        held = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(self.text) - self.emitted), held, -1):
                if self.text.endswith(stop[:n]):
                    held = n
                    break
        return self._emit_until(len(self.text) - held)

    def flush(self) -> str:
        """At the end of generation the held-back text was not a stop string after all."""
        return "" if self.stopped else self._emit_until(len(self.text))

    def _emit_until(self, end: int) -> str:
        end = max(end, self.emitted)
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece


class Request:
    """One prompt being completed: its tokens, sampler state, streamed text and stop condition.

    speculative: prompt-lookup draft tokens to verify per step (greedy requests only; None: the
    engine's default, 0: never).

    token_healing: give the prompt's last token back to the model and let it choose the first new
    token among those whose text starts with it, showing only what follows that text. A prompt cut
    at the cursor often ends mid-token: "\n" where the model saw "\n   " as one token, so without
    healing it would continue at column 0. Parity with other engines' plain decoding needs it off.
    """

    def __init__(self, prompt_ids: list[int], tokenizer: Tokenizer, context_length: int, max_new_tokens: int = 64,
                 sampling: SamplingParams = SamplingParams(), stop_strings: list[str] | tuple[str, ...] = (),
                 eos_ids: frozenset[int] | None = None, device="cpu", speculative: int | None = None,
                 token_healing: bool = False):
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        prompt_ids, self.truncated_prompt_tokens, self.max_new_tokens = fit_to_context(
            list(prompt_ids), max_new_tokens, context_length)
        # An empty prompt starts from the end-of-text token, as the model saw between documents.
        self.prompt_ids = prompt_ids or [tokenizer.eos_id]
        if len(self.prompt_ids) + self.max_new_tokens > context_length:
            self.max_new_tokens = context_length - len(self.prompt_ids)
        self.healed_text = ""  # the prompt's last token's text, when token healing gave it back
        self._first_choices: torch.Tensor | None = None
        if token_healing and self.max_new_tokens > 0 and len(self.prompt_ids) > 1:
            self._heal(tokenizer, device)
        self._hidden = len(self.healed_text)  # characters of output still to hide: the prompt has them
        self.tokenizer = tokenizer
        self.sampling = sampling
        if speculative is not None and speculative < 0:
            raise ValueError(f"speculative must be >= 0 draft tokens, got {speculative}")
        self.speculative = speculative
        self.generator = sampling.make_generator(device) if not sampling.greedy else None
        self.eos_ids = eos_ids if eos_ids is not None else frozenset({tokenizer.eos_id})
        self.special_ids = tokenizer.special_ids
        self.generated_ids: list[int] = []
        self.cached_tokens = 0  # set by the engine: prompt tokens reused from the prefix cache
        self.detokenizer = IncrementalDecoder(tokenizer)
        self.stops = StopStringMatcher(stop_strings)
        self.text = ""
        self.finish_reason: str | None = None if self.max_new_tokens > 0 else "length"
        self._penalty_ids = (torch.tensor(self.prompt_ids, device=device)
                             if sampling.repetition_penalty != 1.0 else None)

    def _heal(self, tokenizer: Tokenizer, device) -> None:
        last = self.prompt_ids[-1]
        text = tokenizer.token_text(last)
        if last in tokenizer.special_ids or not text or "\ufffd" in text:
            return
        choices = tokenizer.tokens_starting_with(text)
        if len(choices) < 2:  # only the token itself: nothing to heal
            return
        self.prompt_ids = self.prompt_ids[:-1]  # the first new token stands in for it, and counts as new
        self.healed_text = text
        self._first_choices = torch.tensor(choices, device=device)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Cache slot of the next token fed to the model."""
        return len(self.prompt_ids) + len(self.generated_ids) - 1

    def choose(self, logits: torch.Tensor) -> int:
        if self._first_choices is not None and not self.generated_ids:
            allowed = torch.full_like(logits, float("-inf"))
            allowed[self._first_choices] = logits[self._first_choices]
            logits = allowed
        return sample_token(logits, self.sampling, self.generator, self._penalty_ids)

    def append(self, token_id: int) -> str:
        """Record a sampled token; return the text it makes visible (may be empty)."""
        self.generated_ids.append(token_id)
        if self._penalty_ids is not None:
            self._penalty_ids = torch.cat((self._penalty_ids, self._penalty_ids.new_tensor([token_id])))
        piece = ""
        if token_id in self.eos_ids:
            self.finish_reason = "stop"
            piece = self._finish_text()
        else:
            if token_id not in self.special_ids:  # special tokens never reach the text
                piece = self.stops.push(self._visible(self.detokenizer.add(token_id)))
            if self.stops.stopped:
                self.finish_reason = "stop"
            elif len(self.generated_ids) >= self.max_new_tokens:
                piece += self._finish_text()
                # text held back until now (an unfinished character) can complete a stop string
                self.finish_reason = "stop" if self.stops.stopped else "length"
        self.text += piece
        return piece

    def _visible(self, piece: str) -> str:
        """The decoded text past the healed prompt text."""
        cut = min(len(piece), self._hidden)
        self._hidden -= cut
        return piece[cut:]

    def _finish_text(self) -> str:
        piece = self.stops.push(self._visible(self.detokenizer.flush()))
        if not self.stops.stopped:
            piece += self.stops.flush()
        return piece

    def result(self) -> Completion:
        return Completion(text=self.text, prompt_tokens=len(self.prompt_ids),
                          completion_tokens=len(self.generated_ids), finish_reason=self.finish_reason or "length",
                          truncated_prompt_tokens=self.truncated_prompt_tokens, token_ids=list(self.generated_ids),
                          cached_prompt_tokens=self.cached_tokens)
