"""The one validation stage every route's request goes through (as TGI's validation.rs).

A route parses its own JSON shape into a `GenerationRequest` (API-neutral: prompts, suffix,
lengths, stop strings, sampling, n), `Validator.validate` checks it against the model and the
server's `Limits` and tokenises it, and the engine takes the resulting `ValidRequest`. Cheap
checks come first: the number of prompts, their lengths and the parameters are refused before
any prompt is tokenised. `/overlap` documents go through `Validator.document`.

Errors are `ApiError`s with the API's own parameter name (`GenerationRequest.names`); each API
family formats them its own way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from stablecode.errors import ConfigError
from stablecode.tokenizer import Tokenizer

# StarCoder's fill-in-the-middle sentinels, in PSM order (prefix, suffix, middle), and the pad token.
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PAD = "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>"
FIM_TOKENS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PAD)

# Below these, logits / temperature and the penalty's division overflow float32 for ordinary logits;
# a temperature this small is greedy decoding in all but name, so ask for 0 instead.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 1e-2
MAX_REPETITION_PENALTY = 100.0
MAX_SEED = 2**63 - 1


class ApiError(Exception):
    """An error answered to the client; each API family formats it its own way.

    kind: "validation", "authentication", "overloaded", "unavailable", "not_found", "generation",
    "forbidden".
    """

    def __init__(self, status: int, message: str, kind: str = "validation", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for; reported by GET /info."""

    max_body_bytes: int = 2 * 1024 * 1024
    max_prompt_chars: int = 256 * 1024  # longer prompts are refused; longer-than-context ones are cut
    max_new_tokens: int | None = None  # None: the model's context length
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_sequences_per_request: int = 16  # OpenAI's n x number of prompts
    max_document_chars: int = 1_000_000  # POST /overlap

    def resolved(self, context_length: int) -> "Limits":
        if self.max_new_tokens is None:
            return Limits(**{**asdict(self), "max_new_tokens": context_length})
        return self


@dataclass
class GenerationRequest:
    """What a route parsed from its body, before validation; the same for every API.

    `prompts` holds strings or lists of token ids. `names` maps these field names to the API's
    own (e.g. {"max_new_tokens": "max_tokens"}) for error messages.
    """

    prompts: list
    max_new_tokens: int
    suffix: str | None = None
    stop: list[str] = field(default_factory=list)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    n: int = 1
    truncate: int | None = None  # keep only the last N prompt tokens (TGI)
    context_length: int | None = None  # a smaller context than the model's (Ollama num_ctx)
    attribution: bool = False
    echo: bool = False  # the answer repeats the prompt (OpenAI echo, TGI return_full_text)
    empty_prompt_allowed: bool = True
    names: dict[str, str] = field(default_factory=dict)

    def name(self, key: str) -> str:
        return self.names.get(key, key)


@dataclass(frozen=True)
class ValidPrompt:
    text: str  # as the client sent it (token-id prompts decoded), for echo / return_full_text
    ids: list[int]  # what the model is fed, already fitted to the context
    stop: tuple[str, ...] = ()  # this prompt's own stop strings (`suffix_stop` of a FIM prompt)


# A suffix's opening shorter than this ("}", ")", "):") is too common in ordinary code to stop at.
MIN_SUFFIX_STOP_CHARS = 4


def suffix_stop(suffix: str) -> str | None:
    """Where a fill-in-the-middle answer should end when the model goes on to write the suffix again.

    Small models rarely end the middle with end-of-text; they run on into a copy of the code after
    the cursor, which the editor would then show twice. The stop is the suffix's own start, up to the
    end of its first line with at least MIN_SUFFIX_STOP_CHARS non-blank characters (None when the
    suffix has none), so the answer keeps its newlines exactly as the suffix expects them.
    """
    end = 0
    for line in suffix.splitlines(keepends=True):
        end += len(line)
        if len("".join(line.split())) >= MIN_SUFFIX_STOP_CHARS:
            return suffix[:end].rstrip("\r\n")
    return None


@dataclass(frozen=True)
class ValidRequest:
    """A checked, tokenised request: `n` sequences per prompt; sequence j of a prompt uses seed + j."""

    prompts: list[ValidPrompt]
    n: int
    max_new_tokens: int
    stop: tuple[str, ...]
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None
    context_length: int
    attribution: bool

    @property
    def num_sequences(self) -> int:
        return len(self.prompts) * self.n


class Validator:
    """Checks requests against one model (its tokenizer, context, FIM training) and the limits."""

    def __init__(self, tokenizer: Tokenizer, *, vocab_size: int, context_length: int, fim: bool, limits: Limits,
                 attribution: bool):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.fim = fim
        self.limits = limits.resolved(context_length)
        self.attribution = attribution
        ids = {token: tokenizer.backend.token_to_id(token) for token in FIM_TOKENS}
        # Sentinels only mean something when the tokenizer has them as tokens.
        self.fim_ids = {token: i for token, i in ids.items() if i is not None}
        missing = [t for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE) if t not in self.fim_ids]
        if fim and missing:
            raise ConfigError(f"the model's config says it was trained for fill-in-the-middle (stablecode_fim), "
                              f"but its tokenizer has no {', '.join(missing)} token")

    # ---- generation ----------------------------------------------------------------------------

    def validate(self, r: GenerationRequest) -> ValidRequest:
        """Check everything cheap first, then tokenise: the costly step runs only for a valid request."""
        limits = self.limits
        prompts = r.prompts
        if not isinstance(prompts, list) or not prompts:
            raise ApiError(422, f"`{r.name('prompt')}` is an empty list", param=r.name("prompt"))
        if r.n < 1:
            raise ApiError(422, f"{r.name('n')} must be >= 1, got {r.n}", param=r.name("n"))
        if len(prompts) * r.n > limits.max_sequences_per_request:
            raise ApiError(422, f"{len(prompts):,} prompts x n={r.n} is more than the "
                                f"{limits.max_sequences_per_request} completions one request may ask for",
                           param=r.name("n") if len(prompts) == 1 else r.name("prompt"))
        for prompt in prompts:
            self._check_prompt(prompt, r)
        if r.suffix is not None:
            self._check_text(r.suffix, r.name("suffix"))
        self._check_fim(r)
        stop = self._check_stop(r)
        self._check_sampling(r)
        max_new_tokens = r.max_new_tokens
        if not 0 <= max_new_tokens <= limits.max_new_tokens:
            raise ApiError(422, f"{r.name('max_new_tokens')} must be in [0, {limits.max_new_tokens}] (the model's "
                                f"context), got {max_new_tokens}", param=r.name("max_new_tokens"))
        if r.truncate is not None and r.truncate < 1:
            raise ApiError(422, f"{r.name('truncate')} must be >= 1, got {r.truncate}", param=r.name("truncate"))
        context = self.context_length
        if r.context_length is not None:
            if r.context_length < 2:
                raise ApiError(422, f"{r.name('context_length')} must be >= 2, got {r.context_length}",
                               param=r.name("context_length"))
            context = min(context, r.context_length)
        if r.attribution and not self.attribution:
            raise ApiError(422, f"{r.name('attribution')}: this server has no attribution index; start it with "
                                "`stablecode serve --index INDEX` (the embedded model's own index is used by default "
                                "when it is installed)", param=r.name("attribution"))
        if r.attribution and r.echo:
            # Each choice's attribution would look the prompt up again: bound the request's lookup work.
            echoed = r.n * sum(len(p) for p in prompts)
            if echoed > limits.max_document_chars:
                raise ApiError(413, f"{r.name('attribution')} with {r.name('echo')}: the answers would repeat "
                                    f"{echoed:,} prompt characters to look up; the limit is "
                                    f"{limits.max_document_chars:,} (ask for fewer choices, or attribute the prompt "
                                    "once with POST /overlap)", param=r.name("attribution"))
        valid = [self._tokenise(prompt, r, context, max_new_tokens) for prompt in prompts]
        return ValidRequest(prompts=valid, n=r.n, max_new_tokens=max_new_tokens, stop=tuple(stop),
                            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                            repetition_penalty=r.repetition_penalty, seed=r.seed, context_length=context,
                            attribution=r.attribution)

    def _check_text(self, text: str, param: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800" in the JSON
            raise ApiError(422, f"{param} is not valid Unicode: {e.reason} at character {e.start}",
                           param=param) from None
        if len(text) > self.limits.max_prompt_chars:
            raise ApiError(413, f"{param} has {len(text):,} characters; the limit is "
                                f"{self.limits.max_prompt_chars:,} (see GET /info). Only the last "
                                f"{self.context_length} tokens are used anyway: send the code nearest the cursor",
                           param=param)

    def _check_prompt(self, prompt, r: GenerationRequest) -> None:
        param = r.name("prompt")
        if isinstance(prompt, str):
            if not prompt and not r.empty_prompt_allowed:
                raise ApiError(422, f"`{param}` cannot be empty", param=param)
            self._check_text(prompt, param)
            return
        if len(prompt) > self.limits.max_prompt_chars:
            raise ApiError(413, f"{param} has {len(prompt):,} tokens; the limit is {self.limits.max_prompt_chars:,}",
                           param=param)
        bad = [i for i in prompt if not 0 <= i < self.vocab_size]
        if bad:
            raise ApiError(422, f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                           param=param)

    def _check_fim(self, r: GenerationRequest) -> None:
        """One rule for every API: FIM (a `suffix`, or sentinels in the prompt) only for a FIM-trained model."""
        sentinels = [token for token in self.fim_ids
                     if any(token in p if isinstance(p, str) else self.fim_ids[token] in p for p in r.prompts)]
        if not self.fim:
            if r.suffix:
                raise ApiError(422, f"`{r.name('suffix')}` (fill-in-the-middle) is not supported: this model was not "
                                    f"trained for it; send only the text before the cursor as `{r.name('prompt')}`",
                               param=r.name("suffix"))
            if sentinels:
                raise ApiError(422, f"{r.name('prompt')} contains the fill-in-the-middle token {sentinels[0]}, but this "
                                    "model was not trained for fill-in-the-middle; send only the text before the "
                                    "cursor (llm-vscode: \"llm.fillInTheMiddle.enabled\": false; Continue: a template "
                                    "without FIM tokens)", param=r.name("prompt"))
            return
        if r.suffix is not None and sentinels:
            raise ApiError(422, f"give either `{r.name('suffix')}` or a prompt with fill-in-the-middle tokens "
                                f"({sentinels[0]}), not both", param=r.name("suffix"))

    def _check_stop(self, r: GenerationRequest) -> list[str]:
        param, limits = r.name("stop"), self.limits
        if len(r.stop) > limits.max_stop_strings:
            raise ApiError(422, f"{param}: {len(r.stop)} stop strings given; at most {limits.max_stop_strings} are "
                                "allowed", param=param)
        for s in r.stop:
            if len(s) > limits.max_stop_string_chars:
                raise ApiError(422, f"{param}: a stop string has {len(s)} characters; at most "
                                    f"{limits.max_stop_string_chars} are allowed", param=param)
            self._check_text(s, param)
        return list(r.stop)

    def _check_sampling(self, r: GenerationRequest) -> None:
        def refuse(key: str, message: str):
            raise ApiError(422, f"{r.name(key)} {message}", param=r.name(key))

        t = r.temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t)) or t < 0 or t > MAX_TEMPERATURE:
            refuse("temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {t}")
        if 0 < t < MIN_TEMPERATURE:
            refuse("temperature", f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {t:g}")
        if r.top_k < 0:
            refuse("top_k", f"must be >= 0, got {r.top_k}")
        if not (math.isfinite(r.top_p) and 0.0 < r.top_p <= 1.0):
            refuse("top_p", f"must be in (0, 1], got {r.top_p}")
        p = r.repetition_penalty
        if not (math.isfinite(p) and MIN_REPETITION_PENALTY <= p <= MAX_REPETITION_PENALTY):
            refuse("repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] "
                                         f"(1 is no penalty), got {p:g}")
        if r.seed is not None and not 0 <= r.seed <= MAX_SEED - max(r.n - 1, 0):
            refuse("seed", f"must be in [0, 2^63 - n], got {r.seed}")

    def _tokenise(self, prompt, r: GenerationRequest, context: int, max_new_tokens: int) -> ValidPrompt:
        if isinstance(prompt, str):
            text = prompt
            if r.suffix is not None:
                ids = self._psm(self.tokenizer.encode(prompt), self.tokenizer.encode(r.suffix))
            else:
                ids = self.tokenizer.encode(prompt)
        else:
            ids, text = list(prompt), self.tokenizer.decode(prompt)
        room = context - max(0, min(max_new_tokens, context - 1))
        if r.truncate is not None and r.truncate < room:
            room = r.truncate
            if not self._is_psm(ids):
                ids = ids[-r.truncate:]
        if not self._is_psm(ids):
            return ValidPrompt(text=text, ids=ids)
        ids = self._fit_psm(ids, room)
        # Every way of asking for FIM (a `suffix`, sentinels in the text or in token ids) ends here.
        stop = suffix_stop(self.tokenizer.decode(ids[ids.index(self.fim_ids[FIM_SUFFIX]) + 1:-1]))
        return ValidPrompt(text=text, ids=ids, stop=(stop,) if stop else ())

    def _psm(self, prefix: list[int], suffix: list[int]) -> list[int]:
        ids = self.fim_ids
        return [ids[FIM_PREFIX], *prefix, ids[FIM_SUFFIX], *suffix, ids[FIM_MIDDLE]]

    def _is_psm(self, ids: list[int]) -> bool:
        """A fill-in-the-middle prompt in prefix-suffix-middle order."""
        f = self.fim_ids
        return (len(f) >= 3 and len(ids) >= 3 and ids[0] == f.get(FIM_PREFIX) and ids[-1] == f.get(FIM_MIDDLE)
                and f.get(FIM_SUFFIX) in ids)

    def _fit_psm(self, ids: list[int], room: int) -> list[int]:
        """Fit a PSM prompt into `room` tokens by cutting the prefix's start and the suffix's end, keeping
        the sentinels (other prompts are cut from the left by the engine: the code nearest the cursor stays)."""
        if len(ids) <= room or room < 4:
            return ids
        prefix_id, suffix_id, middle_id = (self.fim_ids[t] for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
        split = ids.index(suffix_id)
        prefix, suffix = ids[1:split], ids[split + 1:-1]
        room -= 3
        # The code just before the cursor matters most: the prefix keeps at least three quarters.
        keep_prefix = min(len(prefix), max(room - len(suffix), room - room // 4))
        keep_suffix = min(len(suffix), room - keep_prefix)
        return [prefix_id, *prefix[len(prefix) - keep_prefix:], suffix_id, *suffix[:keep_suffix], middle_id]

    # ---- /overlap ------------------------------------------------------------------------------

    def document(self, text: str, param: str = "document") -> str:
        if len(text) > self.limits.max_document_chars:
            raise ApiError(413, f"{param} has {len(text):,} characters; the limit is "
                                f"{self.limits.max_document_chars:,}", param=param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(422, f"{param} is not valid Unicode: {e.reason} at character {e.start}",
                           param=param) from None
        if not self.attribution:
            raise ApiError(404, "this server has no attribution index: start it with `stablecode serve --index INDEX`",
                           "not_found", param=param)
        return text
