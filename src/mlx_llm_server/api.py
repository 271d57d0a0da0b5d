"""HTTP: routes, body parsing, and the one place where errors become OpenAI's error JSON."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import protocol as wire
from .errors import (
    InvalidRequestError,
    ModelNotFoundError,
    ServerError,
    ServerOverloadedError,
    ServiceUnavailableError,
)
from .metrics import CONTENT_TYPE, ServerMetrics
from .security import SecurityConfig, SecurityMiddleware
from .service import (
    ChatService,
    Generation,
    chat_completion,
    chat_stream,
    text_completion,
    text_stream,
)

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("mlx_llm_server.access")
T = TypeVar("T")
KNOWN_ROUTES = frozenset(
    {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
)


@dataclass
class AppState:
    """What the routes need; `service` is None until the models are loaded."""

    service: ChatService | None = None
    metrics: ServerMetrics | None = None
    loading: list[str] = field(default_factory=list)
    stopping: bool = False

    def ready_service(self) -> ChatService:
        if self.stopping:
            raise ServiceUnavailableError("The server is shutting down.")
        if self.service is None:
            raise ServiceUnavailableError("The model is still loading.")
        return self.service


class RequestAccounting:
    """Gives every request an id (`X-Request-Id`, echoed), counts it, and logs one line.

    The line is text, or with `json_lines` one JSON object (for log shippers).
    """

    def __init__(self, app: ASGIApp, state: AppState, json_lines: bool = False) -> None:
        self.app = app
        self.state = state
        self.json_lines = json_lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128]
        request_id = request_id or uuid.uuid4().hex
        started = time.monotonic()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            route = path if path in KNOWN_ROUTES else "other"
            if self.state.metrics is not None:
                self.state.metrics.requests.labels(route, str(status)).inc()
            elapsed = time.monotonic() - started
            if self.json_lines:
                client = scope.get("client")
                line = {
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "request_id": request_id,
                    "method": scope.get("method", ""),
                    "path": path,
                    "status": status,
                    "duration_s": round(elapsed, 6),
                    "client": client[0] if client else None,
                }
                access_logger.info(json.dumps(line))
            else:
                access_logger.info(
                    "%s %s %s %d %.3fs", request_id, scope.get("method", ""), path, status, elapsed
                )


def error_response(error: ServerError) -> JSONResponse:
    headers = {}
    if isinstance(error, ServerOverloadedError):
        headers["Retry-After"] = str(error.retry_after_seconds)
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=headers)


MAX_JSON_DEPTH = 64
# Larger bodies are parsed in a worker thread, so that one doesn't stall the running streams.
_PARSE_IN_THREAD_BYTES = 256 << 10
# Only a \\u escape can put a surrogate into a str: the UTF-8 decoder refuses encoded ones.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _reject_constant(name: str) -> Any:
    raise InvalidRequestError(f"The request body is not valid JSON: {name} is not allowed.")


def _require_json_media_type(content_type: str | None) -> None:
    """Bodies must be declared JSON. A browser sends text/plain, form and untyped bodies to
    another origin without a CORS preflight: accepting them would let any web page drive a
    server on localhost. (vLLM, through FastAPI, refuses text/plain and forms too.)"""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    raise InvalidRequestError(
        "The request body must be JSON sent with 'Content-Type: application/json', "
        f"not {content_type or 'no content type'!r}.",
        code="unsupported_media_type",
    )


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError(
                "The request body is not valid JSON text: it has a lone UTF-16 surrogate "
                "escape (\\ud800-\\udfff without its pair), which is not a character."
            ) from None


def _check_structure(value: Any, surrogates: bool) -> None:
    """Refuses nesting deeper than MAX_JSON_DEPTH (deep recursion in validation and templates)
    and strings holding lone surrogates (no tokenizer can encode them); iterative on purpose."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequestError(
                f"The request body is nested more than {MAX_JSON_DEPTH} levels deep."
            )
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if surrogates and isinstance(key, str):
                _check_text(key)
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif surrogates and isinstance(child, str):
                _check_text(child)


def parse_json_body(body: bytes) -> Any:
    """UTF-8 JSON without NaN/Infinity, lone surrogates or absurd nesting; 400 otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError("The request body is not valid UTF-8.") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise InvalidRequestError(f"The request body is not valid JSON: {error}.") from None
    except RecursionError:
        raise InvalidRequestError(
            f"The request body is nested more than {MAX_JSON_DEPTH} levels deep."
        ) from None
    except ValueError as error:  # e.g. an integer longer than Python converts (4300 digits)
        raise InvalidRequestError(f"The request body is not valid JSON: {error}.") from None
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    if isinstance(value, (dict, list)) and (
        surrogates or text.count("[") + text.count("{") > MAX_JSON_DEPTH
    ):
        _check_structure(value, surrogates)
    return value


async def read_json_body(request: Request) -> Any:
    _require_json_media_type(request.headers.get("content-type"))
    body = await request.body()
    if len(body) > _PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(parse_json_body, body)
    return parse_json_body(body)


async def well_formed_stream(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stream that fails midway still ends as a stream should: an error event, `[DONE]`."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception:
        logger.exception("streaming failed")
        error = ServerError("The server had an error while streaming the response.")
        yield f"data: {json.dumps(error.to_dict())}\n\n".encode()
        yield b"data: [DONE]\n\n"


# nginx's status for a client that closed the connection first; nobody reads the response,
# but the access log and the request counts say what happened.
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it if the client goes away first (frees its engine slot)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ClientDisconnected


def streaming_response(generation: Generation, events: AsyncIterator[bytes]) -> Response:
    generation.start()  # may refuse with 429: still before the response starts
    # The background task also runs when the client left before the first chunk.
    return StreamingResponse(
        well_formed_stream(events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(generation.cancel),
    )


async def complete(
    request: Request, generation: Generation, work: Awaitable[BaseModel]
) -> Response:
    generation.start()
    try:
        result = await until_disconnected(request, work)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        generation.cancel()
    return Response(result.model_dump_json(), media_type="application/json")


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    # Loads anyio's asyncio backend (~30 ms) at start-up rather than in the first streamed
    # response, which would otherwise be that much slower than every later one.
    await anyio.sleep(0)
    yield


def create_app(
    state: AppState, security: SecurityConfig | None = None, access_log_json: bool = False
) -> FastAPI:
    """The app; `security` defaults to the safe settings (loopback Host only, no CORS)."""
    app = FastAPI(title="MLX LLM Server", docs_url=None, redoc_url=None, lifespan=_lifespan)
    app.state.server = state
    # The last added runs first: requests refused for security are still counted and logged.
    app.add_middleware(SecurityMiddleware, config=security or SecurityConfig())
    app.add_middleware(RequestAccounting, state=state, json_lines=access_log_json)

    @app.exception_handler(ServerError)
    async def _server_error(_: Request, error: ServerError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        wrapped = ServerError(str(error.detail))
        wrapped.status_code = error.status_code
        wrapped.error_type = "invalid_request_error" if error.status_code < 500 else "server_error"
        return error_response(wrapped)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(InvalidRequestError(str(error)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return error_response(ServerError("The server had an error processing the request."))

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        if state.service is None:
            return JSONResponse({"status": "loading", "loading": state.loading}, status_code=503)
        pool = state.service.pool
        models = pool.status()
        if not pool.healthy():
            stopped = any(m.engine.failure is not None for m in pool.ready())
            failed = any(s == "failed" for s in models.values())
            status = "engine_stopped" if stopped else "failed" if failed else "loading"
            return JSONResponse({"status": status, "models": models}, status_code=503)
        body: dict[str, Any] = {"status": "ok", "models": [m.model_id for m in pool.ready()]}
        if any(s != "ready" for s in models.values()):
            body["not_loaded"] = [m for m, s in models.items() if s != "ready"]
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            raise ServiceUnavailableError("Metrics are not available yet.")
        for served in state.service.pool.ready() if state.service else []:
            state.metrics.engine_up.labels(served.model_id).set(float(served.engine.running))
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> wire.ModelList:
        pool = state.ready_service().pool
        cards = [wire.ModelCard(id=m, created=pool.created(m)) for m in pool.ids()]
        return wire.ModelList(data=cards)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> wire.ModelCard:
        pool = state.ready_service().pool
        if model_id not in pool.ids():
            raise ModelNotFoundError(f"The model '{model_id}' does not exist.", param="model")
        return wire.ModelCard(id=model_id, created=pool.created(model_id))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        service = state.ready_service()
        chat = wire.parse_model(wire.ChatCompletionRequest, await read_json_body(request))
        generation = await service.prepare_chat(chat)
        state.ready_service()  # a stop signal that came while the body arrived refuses it here
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        if chat.stream:
            return streaming_response(
                generation, chat_stream(generation, include_usage, chat.logprobs)
            )
        return await complete(request, generation, chat_completion(generation))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        service = state.ready_service()
        body = wire.parse_model(wire.CompletionRequest, await read_json_body(request))
        generation = await service.prepare_completion(body)
        state.ready_service()  # a stop signal that came while the body arrived refuses it here
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        logprobs = body.logprobs is not None
        if body.stream:
            return streaming_response(generation, text_stream(generation, include_usage, logprobs))
        return await complete(request, generation, text_completion(generation, logprobs))

    return app
