"""Ollama's generate API: Ollama clients and llm-vscode's `ollama` backend.

POST /api/generate streams newline-delimited JSON objects by default ({"response": piece,
"done": false} ..., then one with "done": true, the counts and durations); "stream": false answers
one object. POST /api/show, GET /api/tags and /api/version let clients discover the model. Bodies
are read as JSON whatever their Content-Type, as Ollama does. Errors are {"error"}.
Extension: `"attribution": true` adds "attribution": {"spans", "sources"} of the response (to the
final "done" object when streaming); 400 without an attribution index.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from stablecode.inference.engine import Failed, Finished, TokenEvent
from stablecode.server.engine import ApiError, Engine, GenerationStream
from stablecode.server.validation import GenerationRequest

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
    suffix: str | None = Field(None, description="the text after the cursor (fill-in-the-middle): only for a model "
                                                 "trained for it (GET /info `fill_in_the_middle`), else 400")
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
    refused = {"system": "system prompts need a chat template; this is a raw code-completion model",
               "template": "prompt templates are not supported; send the raw prompt",
               "context": "conversation context is not supported; send the whole prompt",
               "images": "images are not supported by a code model",
               "format": "structured output formats are not supported"}
    for name, reason in refused.items():
        if getattr(body, name):
            raise ApiError(400, f"`{name}` is not supported: {reason}", param=name)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


async def parse_json(request: Request, model: type[BaseModel]) -> BaseModel:
    """The body as JSON whatever its Content-Type says, as Ollama reads it (`curl -d` sends
    application/x-www-form-urlencoded)."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        raise RequestValidationError([{**error, "loc": ("body", *error.get("loc", ()))} for error in e.errors()])


def _request(body: GenerateRequest, engine: Engine) -> GenerationRequest:
    o = body.options
    num_predict = DEFAULT_NUM_PREDICT if o.num_predict is None else o.num_predict
    return GenerationRequest(
        prompts=[body.prompt], suffix=body.suffix,
        max_new_tokens=engine.limits.max_new_tokens if num_predict < 0 else num_predict,
        stop=o.stop or [], temperature=0.8 if o.temperature is None else o.temperature,
        top_p=0.9 if o.top_p is None else o.top_p, top_k=40 if o.top_k is None else o.top_k,
        repetition_penalty=1.0 if o.repeat_penalty is None else o.repeat_penalty,
        seed=None if o.seed is None or o.seed < 0 else o.seed, context_length=o.num_ctx,
        attribution=body.attribution,
        names={"max_new_tokens": "num_predict", "repetition_penalty": "repeat_penalty", "context_length": "num_ctx"})


@router.post("/generate", summary="Complete a prompt (Ollama generate API; NDJSON streaming by default)",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": GenerateRequest.model_json_schema()}}}})
async def generate(request: Request):
    engine: Engine = request.app.state.engine
    body = await parse_json(request, GenerateRequest)
    engine.check_ready()
    _refuse_unsupported(body)
    model_name = body.model or engine.model_id
    if not body.prompt and not body.suffix:  # Ollama's "load the model" request
        return {"model": model_name, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    valid = await run_in_threadpool(engine.validate, _request(body, engine))  # tokenizing: off the event loop
    submission = engine.submit(valid)

    def final(completion, first_token_ns: int | None) -> dict:
        now = time.perf_counter_ns()
        first = first_token_ns or now
        return {"model": model_name, "created_at": _now(), "done": True, "done_reason": completion.finish_reason,
                "total_duration": now - submission.submitted_ns, "load_duration": 0,
                "prompt_eval_count": completion.prompt_tokens, "prompt_eval_duration": first - submission.submitted_ns,
                "eval_count": completion.completion_tokens, "eval_duration": now - first}

    if not body.stream:
        [result] = await engine.wait(submission, request.receive)
        answer = {**final(result.completion, result.first_token_ns), "response": result.completion.text}
        if body.attribution:
            answer["attribution"] = await run_in_threadpool(engine.attribute, result.completion.text)
        return answer

    async def lines():
        async for index, event in engine.events(submission):
            if isinstance(event, TokenEvent):
                if event.text:
                    yield _line({"model": model_name, "created_at": _now(), "response": event.text, "done": False})
            elif isinstance(event, Finished):
                last = {**final(event.completion, submission.first_token_ns.get(index)), "response": ""}
                if body.attribution:
                    try:
                        last["attribution"] = await run_in_threadpool(engine.attribute, event.completion.text)
                    except ApiError as e:
                        yield _line({"error": e.message})
                        return
                yield _line(last)
            elif isinstance(event, Failed):
                yield _line({"error": event.message})

    return GenerationStream(submission, lines(), "application/x-ndjson")


def _line(payload: dict) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n"


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None  # older clients' key


# How Ollama writes a template that takes a suffix; Continue looks for `.Suffix` to decide on FIM.
FIM_TEMPLATE = ("{{- if .Suffix }}<fim_prefix>{{ .Prompt }}<fim_suffix>{{ .Suffix }}<fim_middle>"
                "{{- else }}{{ .Prompt }}{{- end }}")


@router.post("/show", summary="The served model's template and parameters (Continue asks before completing)",
             openapi_extra={"requestBody": {"content": {"application/json": {
                 "schema": ShowRequest.model_json_schema()}}}})
async def show(request: Request) -> dict:
    engine: Engine = request.app.state.engine
    await parse_json(request, ShowRequest)  # one model: any name shows it
    fim = engine.config.fim
    return {"modelfile": "", "parameters": f"num_ctx {engine.context_length}",
            "template": FIM_TEMPLATE if fim else "{{ .Prompt }}",
            "details": {"format": "safetensors", "family": "gptneox", "families": ["gptneox"]},
            "model_info": {"general.architecture": "gptneox", "gptneox.context_length": engine.context_length},
            "capabilities": ["completion", "insert"] if fim else ["completion"]}


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
