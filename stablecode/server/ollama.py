"""Ollama's generate API: Ollama clients and llm-vscode's `ollama` backend.

POST /api/generate streams newline-delimited JSON objects by default ({"response": piece,
"done": false} ..., then one with "done": true and the counts); "stream": false answers one
object. GET /api/tags and /api/version let clients discover the model. Errors are {"error"}.
Extension: `"attribution": true` adds "attribution": {"spans", "sources"} of the response (to the
final "done" object when streaming); 400 without an attribution index.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from stablecode.server.engine import ApiError, Engine, GenerationStream
from stablecode.server.scheduler import Failed, Finished, TokenEvent

router = APIRouter(prefix="/api", tags=["Ollama"])


class Options(BaseModel):
    """Ollama runtime options; the ones a sampler-only server has no use for are ignored."""

    model_config = ConfigDict(extra="ignore")

    num_predict: int | None = Field(None, ge=-2, description="-1 or -2: up to the context (default 128)")
    temperature: float | None = Field(None, ge=0.0, le=100.0, description="default 0.8; 0 means greedy")
    top_k: int | None = Field(None, ge=0, description="default 40")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="default 0.9")
    repeat_penalty: float | None = Field(None, gt=0.0, le=100.0, description="default 1.0 (whole sequence)")
    seed: int | None = Field(None, ge=-1, le=2**63 - 1, description="-1 or unset: random")
    stop: list[str] | None = None
    num_ctx: int | None = Field(None, ge=1, description="a smaller context than the model's (prompt cut from the left)")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="any value: this server has one model")
    prompt: str = ""
    suffix: str | None = Field(None, description="refused: the model has no fill-in-the-middle training")
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    format: str | dict | None = None
    raw: bool | None = None
    stream: bool = True
    options: Options = Field(default_factory=Options)
    attribution: bool = Field(False, description="extension: add `attribution` {spans, sources}, the parts of the "
                                                 "response found in the training data (needs an index)")


DEFAULT_NUM_PREDICT = 128


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   details: list | None = None) -> JSONResponse:
    if status == 422:
        status = 400  # Ollama answers invalid requests with 400
    return JSONResponse({"error": message}, status_code=status)


def _refuse_unsupported(body: GenerateRequest) -> None:
    refused = {"suffix": "fill-in-the-middle is not supported: the model was not trained for it",
               "system": "system prompts need a chat template; this is a raw code-completion model",
               "template": "prompt templates are not supported; send the raw prompt",
               "context": "conversation context is not supported; send the whole prompt",
               "images": "images are not supported by a code model",
               "format": "structured output formats are not supported"}
    for name, reason in refused.items():
        if getattr(body, name):
            raise ApiError(400, f"`{name}` is not supported: {reason}", param=name)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@router.post("/generate", summary="Complete a prompt (Ollama generate API; NDJSON streaming by default)")
async def generate(request: Request, body: GenerateRequest):
    engine: Engine = request.app.state.engine
    engine.check_ready()
    _refuse_unsupported(body)
    if body.attribution:
        engine.check_attribution("attribution")
    model_name = body.model or engine.model_id
    if not body.prompt:  # Ollama's "load the model" request
        return {"model": model_name, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    engine.check_prompt(body.prompt, "prompt")
    o = body.options
    num_predict = DEFAULT_NUM_PREDICT if o.num_predict is None else o.num_predict
    num_predict = engine.limits.max_new_tokens if num_predict < 0 else engine.check_max_new_tokens(num_predict,
                                                                                                   "num_predict")
    sampling = engine.sampling(temperature=0.8 if o.temperature is None else o.temperature,
                               top_p=0.9 if o.top_p is None else o.top_p, top_k=40 if o.top_k is None else o.top_k,
                               repetition_penalty=o.repeat_penalty or 1.0,
                               seed=None if o.seed is None or o.seed < 0 else o.seed, param="options")
    stop = engine.check_stop(o.stop or [], "stop")
    ids = await run_in_threadpool(engine.encode, body.prompt)  # tokenizing: off the event loop
    sequence = engine.sequence(ids, max_new_tokens=num_predict, sampling=sampling, stop=stop, context_length=o.num_ctx)
    started = time.perf_counter_ns()
    group = engine.submit([sequence])

    def final(completion) -> dict:
        elapsed = time.perf_counter_ns() - started
        return {"model": model_name, "created_at": _now(), "done": True, "done_reason": completion.finish_reason,
                "total_duration": elapsed, "load_duration": 0, "prompt_eval_count": completion.prompt_tokens,
                "eval_count": completion.completion_tokens}

    if not body.stream:
        [result] = await engine.wait(group, request.receive)
        answer = {**final(result.completion), "response": result.completion.text}
        if body.attribution:
            answer["attribution"] = await run_in_threadpool(engine.attribute, result.completion.text)
        return answer

    async def lines():
        async for _, event in group.events():
            if isinstance(event, TokenEvent):
                if event.text:
                    yield _line({"model": model_name, "created_at": _now(), "response": event.text, "done": False})
            elif isinstance(event, Finished):
                last = {**final(event.completion), "response": ""}
                if body.attribution:
                    try:
                        last["attribution"] = await run_in_threadpool(engine.attribute, event.completion.text)
                    except ApiError as e:
                        yield _line({"error": e.message})
                        return
                yield _line(last)
            elif isinstance(event, Failed):
                yield _line({"error": event.message})

    return GenerationStream(group, lines(), "application/x-ndjson")


def _line(payload: dict) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n"


@router.get("/tags", summary="The served model (Ollama model list)")
async def tags(request: Request) -> dict:
    engine: Engine = request.app.state.engine
    return {"models": [{"name": engine.model_id, "model": engine.model_id,
                        "modified_at": datetime.fromtimestamp(engine.created, timezone.utc).isoformat(),
                        "size": 0, "digest": "", "details": {"format": "safetensors", "family": "gptneox"}}]}


@router.get("/version", summary="Server version (Ollama clients probe it)")
async def version() -> dict:
    from stablecode import __version__

    return {"version": __version__}
