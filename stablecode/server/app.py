"""The FastAPI application: routes of every API family over one `Engine`; a guard for the Host
header (DNS rebinding), the API key and the body size; errors formatted the way each family's
clients parse them.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
from collections.abc import Iterable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from stablecode.server import ollama, openai, overlap, tgi
from stablecode.server.engine import ClientDisconnected, Engine
from stablecode.server.validation import ApiError, Limits

log = logging.getLogger("stablecode.server")

# Reachable without the API key: liveness probes and the API documentation.
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# Host names always accepted: loopback names, and (in host_allowed) any IP literal, since DNS
# rebinding needs a host name the attacker controls.
LOOPBACK_NAMES = ("localhost",)
# Chat routes that chat clients (Continue's chat, the ollama CLI) try first: a completion model has
# no chat template, so the 404 says where the same request goes instead.
CHAT_ROUTES = {"/v1/chat/completions": "POST /v1/completions with the code before the cursor as `prompt`",
               "/api/chat": "POST /api/generate with the code before the cursor as `prompt`"}
RETRY_AFTER_SECONDS = 1  # 429: the queue drains in about a completion's time


def error_response(path: str, status: int, message: str, kind: str, param: str | None = None,
                   details: list | None = None) -> JSONResponse:
    """An error in the format of the API family that `path` belongs to."""
    if path.startswith("/v1/") or path == "/v1":
        family = openai
    elif path.startswith("/api/"):
        family = ollama
    else:
        family = tgi
    response = family.error_response(status, message, kind, param, details)
    if status in (429, 503):
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def host_name(header: bytes) -> str:
    """The host part of a Host header value: no port, no IPv6 brackets, lower case, no final dot."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    if "*" in allowed or host in allowed or host in LOOPBACK_NAMES:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class RequestGuard:
    """ASGI middleware: Host header check, API key check, then the request body read whole, up to a
    size limit and within a deadline.

    Reading the body here bounds memory and time before any parsing (a client trickling its body
    gets 408); the app then gets it replayed.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int, allowed_hosts: frozenset[str],
                 body_timeout: float | None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = allowed_hosts
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = dict(scope["headers"])
        host = host_name(headers.get(b"host", b""))
        if host and not host_allowed(host, self.allowed_hosts):
            await error_response(path, 403, f"Host {host!r} is not allowed (a guard against DNS rebinding); start "
                                            f"the server with `--allow-host {host}` to serve it under that name",
                                 "forbidden")(scope, receive, send)
            return
        if self.api_key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                await error_response(path, 401, "missing API key: send the header `Authorization: Bearer <key>`",
                                     "authentication")(scope, receive, send)
                return
            if not hmac.compare_digest(token.strip(), self.api_key):
                await error_response(path, 401, "invalid API key", "authentication")(scope, receive, send)
                return
        too_large = error_response(path, 413, f"request body larger than {self.max_body_bytes:,} bytes "
                                              "(see GET /info for the limits)", "validation")
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_body_bytes:
            await too_large(scope, receive, send)
            return
        body = bytearray()
        loop = asyncio.get_running_loop()
        deadline = None if self.body_timeout is None else loop.time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), None if deadline is None else deadline - loop.time())
            except asyncio.TimeoutError:
                timeout = error_response(path, 408, f"the request body did not arrive within {self.body_timeout:g} s",
                                         "timeout")
                timeout.headers["Connection"] = "close"
                await timeout(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _validation_details(errors) -> tuple[str, str | None, list[dict]]:
    """FastAPI validation errors as (message, param, detail items with a string `loc`)."""
    details = []
    for error in errors:
        if error.get("type") in ("json_invalid", "json_type"):
            position = error.get("loc", ("body", "?"))[-1]
            reason = (error.get("ctx") or {}).get("error", "JSON decode error")
            details.append({"loc": "body", "msg": f"the request body is not valid JSON ({reason} at character "
                                                  f"{position})", "type": "json_invalid"})
            continue
        loc = ".".join(str(part) for part in error.get("loc", ()))
        details.append({"loc": loc or "body", "msg": error.get("msg", "invalid value"), "type": error.get("type", "")})
    message = "; ".join(f"{d['loc']}: {d['msg']}" for d in details) or "invalid request"
    # The parameter is the last name in the location (not a list index, nor a JSON character offset).
    names = [part for part in (errors[0].get("loc", ()) if errors else ())[1:] if isinstance(part, str)]
    json_error = bool(errors) and errors[0].get("type") in ("json_invalid", "json_type")
    param = names[-1] if names and not json_error else None
    return message, param, details


def create_app(model: str | os.PathLike | None = None, *, dtype: str | None = None, device: str | None = None,
               quantize: str | None = None, api_key: str | None = None, max_batch: int = 8, max_queue: int = 32,
               limits: Limits = Limits(), attributor=None, allowed_hosts: Iterable[str] = (),
               body_timeout: float | None = 30.0, **engine_options) -> FastAPI:
    """The completion server for a checkpoint directory or embedded model name (None: the default).

    With an `attributor` (stablecode.attribution.Attributor), POST /overlap is added and the
    completion routes can return the attribution of their text (TGI `parameters.attribution`,
    OpenAI and Ollama `attribution`).

    Requests whose Host header names neither an IP address, `localhost`, nor one of
    `allowed_hosts` ("*": any) get 403: a web page cannot reach the server through DNS rebinding.
    A body not received within `body_timeout` seconds gets 408.

    engine_options: `prefix_cache_mb`, `speculative` and `kv_cache_dtype` of the inference engine.

    The config and tokenizer are read now (bad paths fail here); the weights load in the
    background once the app starts, while GET /health answers 503.
    """
    engine = Engine(model, dtype=dtype, device=device, quantize=quantize, max_batch=max_batch,
                    max_queue=max_queue, limits=limits, attributor=attributor, **engine_options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start_loading()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="stablecode completion server", version=_version(), lifespan=lifespan,
                  description="Code completion with one StableCode model, speaking Text Generation Inference's, "
                              "OpenAI's and Ollama's APIs.")
    app.state.engine = engine
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=engine.limits.max_body_bytes,
                       allowed_hosts=frozenset(host_name(h.encode()) if h != "*" else h for h in allowed_hosts),
                       body_timeout=body_timeout)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(request.url.path, e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        message, param, details = _validation_details(e.errors())
        return error_response(request.url.path, 422, message, "validation", param, details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = {401: "authentication", 404: "not_found", 405: "not_found", 429: "overloaded"}.get(
            e.status_code, "server_error" if e.status_code >= 500 else "validation")
        message = str(e.detail)
        if e.status_code == 404 and request.url.path in CHAT_ROUTES:
            message = (f"no route {request.method} {request.url.path}: this server completes code and has no chat "
                       f"template; use {CHAT_ROUTES[request.url.path]} (see /docs)")
        elif e.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        elif e.status_code == 400:
            message = f"the request body could not be parsed: it must be JSON encoded in UTF-8 ({e.detail})"
        return error_response(request.url.path, e.status_code, message, kind)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, e: ClientDisconnected):
        return JSONResponse({"error": "client disconnected"}, status_code=499)

    @app.get("/health", summary="200 when the model is ready, 503 while it loads (or if loading failed)")
    async def health():
        if engine.state == "ready":
            return {"status": "ready"}
        return JSONResponse({"status": engine.state, "error": engine.error}, status_code=503)

    @app.get("/info", summary="Model, context length, limits in force and scheduler load")
    async def info():
        return engine.info()

    app.include_router(tgi.router)
    app.include_router(openai.router)
    app.include_router(ollama.router)
    if attributor is not None:
        app.include_router(overlap.router)
    return app


def _version() -> str:
    from stablecode import __version__

    return __version__
