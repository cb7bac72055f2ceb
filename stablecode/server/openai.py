"""OpenAI's completions API: the `openai` package, Continue and other OpenAI-compatible plugins,
llm-vscode's `openai` backend.

POST /v1/completions (streaming: `data: {chunk}` lines, then `data: [DONE]`), GET /v1/models.
Error bodies carry both OpenAI's {"error": {message, type, param, code}} and a FastAPI-style
{"detail": [{loc, msg, type}]}, which is what llm-ls parses (with `loc` a string, as it expects).
Extension: `"attribution": true` adds "attribution": {"spans", "sources"} to each choice (when
streaming, to the choice's chunk that carries its finish_reason); 400 without an attribution index.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from stablecode.inference.engine import Failed, Finished, TokenEvent
from stablecode.server.engine import ApiError, Engine, GenerationStream
from stablecode.server.validation import GenerationRequest

router = APIRouter(prefix="/v1", tags=["OpenAI"])

ERROR_TYPES = {"validation": "invalid_request_error", "authentication": "authentication_error",
               "overloaded": "server_overloaded", "unavailable": "service_unavailable",
               "not_found": "not_found_error", "generation": "server_error", "forbidden": "permission_error",
               "timeout": "timeout"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI completion request; unknown fields (llm-ls adds `parameters`/`options`) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="any value: this server has one model")
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = Field(None, description="the text after the cursor (fill-in-the-middle): only for a model "
                                                 "trained for it (GET /info `fill_in_the_middle`), else 400")
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 16 (OpenAI's own API takes 4; Continue sends 12 "
                                                            "with a FIM template)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    echo: bool = False
    logprobs: int | None = Field(None, description="not supported: must be null")
    best_of: int | None = None
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict | None = None
    user: str | None = None
    # Extensions many OpenAI-compatible servers accept.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    attribution: bool = Field(False, description="extension: add `attribution` {spans, sources} to each choice, the "
                                                 "parts of its text found in the training data (needs an index)")


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   details: list | None = None) -> JSONResponse:
    if status == 422:
        status = 400  # OpenAI answers invalid requests with 400
    body = {"error": {"message": message, "type": ERROR_TYPES.get(kind, kind), "param": param,
                      "code": "invalid_api_key" if kind == "authentication" else None},
            "detail": details or [{"loc": param or "body", "msg": message, "type": kind}]}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _refuse_unsupported(body: CompletionRequest) -> None:
    if body.logprobs is not None:
        raise ApiError(400, "`logprobs` is not supported by this server", param="logprobs")
    if body.best_of not in (None, body.n):
        raise ApiError(400, "`best_of` is not supported by this server (leave it unset or equal to n)", param="best_of")
    if body.presence_penalty or body.frequency_penalty:
        raise ApiError(400, "presence_penalty and frequency_penalty are not supported; use repetition_penalty",
                       param="presence_penalty" if body.presence_penalty else "frequency_penalty")
    if body.logit_bias:
        raise ApiError(400, "`logit_bias` is not supported by this server", param="logit_bias")


def _request(body: CompletionRequest) -> GenerationRequest:
    _refuse_unsupported(body)
    prompts = body.prompt
    if isinstance(prompts, str) or prompts and all(isinstance(p, int) for p in prompts):
        prompts = [prompts]  # one text, or one prompt of token ids
    return GenerationRequest(
        prompts=list(prompts), suffix=body.suffix,
        max_new_tokens=16 if body.max_tokens is None else body.max_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        temperature=1.0 if body.temperature is None else body.temperature, top_p=body.top_p or 1.0,
        top_k=body.top_k or 0, repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, n=body.n,
        attribution=body.attribution, echo=body.echo, names={"max_new_tokens": "max_tokens"})


def _validate(engine: Engine, body: CompletionRequest):
    return engine.validate(_request(body))


def _header(engine: Engine) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": engine.model_id}


def _usage(completions: list, n: int) -> dict:
    prompt_tokens = sum(c.prompt_tokens for c in completions[::n])
    completion_tokens = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@router.post("/completions", summary="Complete a prompt (OpenAI completions API)")
async def completions(request: Request, body: CompletionRequest):
    engine: Engine = request.app.state.engine
    submission = engine.submit(await run_in_threadpool(_validate, engine, body))  # tokenizing: off the event loop
    prompts = submission.request.prompts
    if body.stream:
        return GenerationStream(submission, _stream(engine, body, submission), "text/event-stream")
    results = await engine.wait(submission, request.receive)
    choices = []
    for index, result in enumerate(results):
        text = result.completion.text
        if body.echo:
            text = prompts[index // body.n].text + text
        choices.append({"index": index, "text": text, "logprobs": None,
                        "finish_reason": result.completion.finish_reason})
    if body.attribution:
        attributions = await run_in_threadpool(lambda: [engine.attribute(c["text"]) for c in choices])
        for choice, attribution in zip(choices, attributions):
            choice["attribution"] = attribution
    return {**_header(engine), "choices": choices, "usage": _usage([r.completion for r in results], body.n)}


async def _stream(engine: Engine, body: CompletionRequest, submission):
    header = _header(engine)
    prompts, group = submission.request.prompts, submission.group

    def chunk(index: int, text: str, finish_reason: str | None = None, **extra) -> bytes:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, **extra}
        return _sse({**header, "choices": [choice]})

    if body.echo:
        for index in range(len(group.tickets)):
            yield chunk(index, prompts[index // body.n].text)
    completions = [None] * len(group.tickets)
    async for index, event in engine.events(submission):
        if isinstance(event, TokenEvent):
            if event.text:
                yield chunk(index, event.text)
        elif isinstance(event, Finished):
            completions[index] = event.completion
            extra = {}
            if body.attribution:
                text = (prompts[index // body.n].text if body.echo else "") + event.completion.text
                try:
                    extra["attribution"] = await run_in_threadpool(engine.attribute, text)
                except ApiError as e:
                    yield _sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
                    return
            yield chunk(index, "", event.completion.finish_reason, **extra)
        elif isinstance(event, Failed):
            yield _sse({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})
            return
    if body.stream_options is not None and body.stream_options.include_usage:
        yield _sse({**header, "choices": [], "usage": _usage(completions, body.n)})
    yield b"data: [DONE]\n\n"


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


@router.get("/models", summary="The served model (OpenAI models list)")
async def models(request: Request) -> dict:
    engine: Engine = request.app.state.engine
    return {"object": "list", "data": [_model(engine)]}


@router.get("/models/{model_id:path}", summary="One model (OpenAI models retrieve)")
async def model(request: Request, model_id: str) -> dict:
    engine: Engine = request.app.state.engine
    if model_id != engine.model_id:
        raise ApiError(404, f"model {model_id!r} not found; this server serves {engine.model_id!r}",
                       "not_found", param="model")
    return _model(engine)


def _model(engine: Engine) -> dict:
    return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "stablecode"}
