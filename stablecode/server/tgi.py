"""Text Generation Inference's API: what llm-vscode (backends `tgi`, `huggingface`) and
`huggingface_hub.InferenceClient` speak.

POST /generate → {"generated_text"}; POST / and POST /models/{id} → [{"generated_text"}], or a
stream with "stream": true; POST /generate_stream → server-sent events, one per token.
Errors are {"error", "error_type"}: 422 validation, 429 overloaded.
Extension: `"parameters": {"attribution": true}` adds "attribution": {"spans", "sources"} of the
generated text (to the last event when streaming); 422 when the server has no attribution index.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from stablecode.inference.engine import Failed, Finished, TokenEvent
from stablecode.server.engine import ApiError, Engine, GenerationStream, Result
from stablecode.server.validation import GenerationRequest
from stablecode.tokenizer import IncrementalDecoder, Tokenizer

router = APIRouter(tags=["Text Generation Inference"])

DEFAULT_MAX_NEW_TOKENS = 100


class Parameters(BaseModel):
    """TGI generation parameters; unknown keys are ignored.

    llm-ls can send `{"parameters": {"parameters": {...}}}`: the inner object's keys count as if
    given at the outer level; the same key at both levels with different values is refused.
    """

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _merge_nested(cls, data):
        if not isinstance(data, dict) or not isinstance(data.get("parameters"), dict):
            return data
        merged = {k: v for k, v in data.items() if k != "parameters"}
        for key, value in data["parameters"].items():
            if key == "parameters" or key not in cls.model_fields:
                continue
            if key in merged and merged[key] != value:
                raise ValueError(f"`{key}` is given twice, as parameters.{key} ({merged[key]!r}) and "
                                 f"parameters.parameters.{key} ({value!r}); give it once")
            merged[key] = value
        return merged

    max_new_tokens: int | None = Field(None, ge=1, description="default 100")
    do_sample: bool | None = None
    temperature: float | None = Field(None, ge=0.0, le=100.0, description="0 means greedy")
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    return_full_text: bool | None = None
    truncate: int | None = Field(None, ge=1, description="keep only the last N prompt tokens")
    details: bool | None = None
    attribution: bool | None = Field(None, description="extension: add `attribution` {spans, sources}, the parts of "
                                                        "generated_text found in the training data (needs an index)")
    # Known TGI options this server does not implement: refused when set to a non-default value.
    best_of: int | None = None
    typical_p: float | None = None
    watermark: bool | None = None
    decoder_input_details: bool | None = None
    top_n_tokens: int | None = None
    grammar: dict | None = None
    frequency_penalty: float | None = None
    adapter_id: str | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   details: list | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": kind}, status_code=status)


def _refuse_unsupported(p: Parameters) -> None:
    unsupported = {
        "best_of": p.best_of not in (None, 1),
        "typical_p": p.typical_p not in (None, 1.0),
        "watermark": bool(p.watermark),
        "decoder_input_details": bool(p.decoder_input_details),
        "top_n_tokens": p.top_n_tokens not in (None, 0),
        "grammar": p.grammar is not None,
        "frequency_penalty": p.frequency_penalty not in (None, 0.0),
        "adapter_id": bool(p.adapter_id),
    }
    names = [name for name, refused in unsupported.items() if refused]
    if names:
        raise ApiError(422, f"parameters not supported by this server: {', '.join(names)}", param=names[0])


def _request(body: GenerateRequest) -> GenerationRequest:
    p = body.parameters
    _refuse_unsupported(p)
    # As TGI: any warper (temperature != 1, top_k, top_p < 1) or do_sample turns sampling on.
    sample = bool(p.do_sample) or p.temperature not in (None, 1.0) or bool(p.top_k) or p.top_p not in (None, 1.0)
    return GenerationRequest(
        prompts=[body.inputs], empty_prompt_allowed=False,
        max_new_tokens=p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, stop=p.stop or [],
        temperature=(1.0 if p.temperature is None else p.temperature) if sample else 0.0,
        top_p=p.top_p or 1.0, top_k=p.top_k or 0, repetition_penalty=p.repetition_penalty or 1.0, seed=p.seed,
        truncate=p.truncate, attribution=bool(p.attribution), echo=bool(p.return_full_text),
        names={"prompt": "inputs", "echo": "return_full_text"})


def _validate(engine: Engine, body: GenerateRequest):
    # Tokenizing a long prompt takes a while: validation runs off the event loop, so streams keep flowing.
    return engine.validate(_request(body))


def _finish_reason(engine: Engine, completion) -> str:
    if completion.finish_reason == "length":
        return "length"
    if completion.token_ids and completion.token_ids[-1] == engine.tokenizer.eos_id:
        return "eos_token"
    return "stop_sequence"


def _token(event: TokenEvent, text: str | None = None) -> dict:
    return {"id": event.id, "text": event.text if text is None else text, "logprob": event.logprob,
            "special": event.special}


def token_texts(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text, whatever the stop matcher held back: together they make the decoded
    ids (special tokens as their names); a token that only starts a character has none."""
    decoder = IncrementalDecoder(tokenizer)
    texts = []
    for i in ids:
        texts.append(tokenizer.token_text(i) if i in tokenizer.special_ids else decoder.add(i))
    if texts:
        texts[-1] += decoder.flush()
    return texts


def _output(engine: Engine, body: GenerateRequest, result: Result) -> dict:
    text = result.completion.text
    if body.parameters.return_full_text:
        text = body.inputs + text
    output = {"generated_text": text}
    if body.parameters.details:
        output["details"] = {"finish_reason": _finish_reason(engine, result.completion),
                             "generated_tokens": result.completion.completion_tokens,
                             "seed": body.parameters.seed, "prefill": [],
                             "tokens": [_token(e, text) for e, text in
                                        zip(result.tokens, token_texts(engine.tokenizer, [e.id for e in result.tokens]))],
                             "best_of_sequences": None}
    return output


async def _generate(request: Request, body: GenerateRequest) -> dict:
    engine: Engine = request.app.state.engine
    submission = engine.submit(await run_in_threadpool(_validate, engine, body))
    [result] = await engine.wait(submission, request.receive)
    output = _output(engine, body, result)
    if body.parameters.attribution:
        output["attribution"] = await run_in_threadpool(engine.attribute, output["generated_text"])
    return output


async def _stream(request: Request, body: GenerateRequest) -> GenerationStream:
    engine: Engine = request.app.state.engine
    submission = engine.submit(await run_in_threadpool(_validate, engine, body))

    async def events():
        last, count = None, 0
        async for _, event in engine.events(submission):
            if isinstance(event, TokenEvent):
                count += 1
                payload = {"index": count, "token": _token(event),
                           "top_tokens": None, "generated_text": None, "details": None}
                if not event.last:
                    yield _sse(payload)
                else:  # the last token's event carries the whole text, as in TGI
                    last = payload
            elif isinstance(event, Finished):
                if last is None:  # nothing was generated (max_new_tokens reached at once)
                    last = {"index": 0, "token": None, "top_tokens": None, "generated_text": None, "details": None}
                last["generated_text"] = _output(engine, body, Result(event.completion, []))["generated_text"]
                if body.parameters.details:
                    last["details"] = {"finish_reason": _finish_reason(engine, event.completion),
                                       "generated_tokens": event.completion.completion_tokens,
                                       "seed": body.parameters.seed, "input_length": event.completion.prompt_tokens}
                if body.parameters.attribution:
                    try:
                        last["attribution"] = await run_in_threadpool(engine.attribute, last["generated_text"])
                    except ApiError as e:
                        yield _sse({"error": e.message, "error_type": e.kind})
                        return
                yield _sse(last)
            elif isinstance(event, Failed):
                yield _sse({"error": event.message, "error_type": "generation"})

    return GenerationStream(submission, events(), "text/event-stream")


def _sse(payload: dict) -> bytes:
    return b"data:" + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


@router.post("/generate", summary="Generate text (llm-vscode `tgi` backend)")
async def generate(request: Request, body: GenerateRequest) -> dict:
    return await _generate(request, body)


@router.post("/generate_stream", summary="Stream generated tokens as server-sent events")
async def generate_stream(request: Request, body: GenerateRequest):
    return await _stream(request, body)


@router.post("/", summary="TGI root route (huggingface_hub.InferenceClient); \"stream\": true streams")
async def root(request: Request, body: GenerateRequest):
    if body.stream:
        return await _stream(request, body)
    return [await _generate(request, body)]


@router.post("/models/{model_id:path}", summary="Inference-API route (llm-vscode `huggingface` backend)")
async def model_route(request: Request, model_id: str, body: GenerateRequest):
    return await root(request, body)
