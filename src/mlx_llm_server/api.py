"""HTTP: routes, body parsing, and the one place where errors become OpenAI's error JSON."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import protocol as wire
from .errors import InvalidRequestError, ServerError, ServerOverloadedError, ServiceUnavailableError
from .metrics import CONTENT_TYPE, ServerMetrics
from .service import ChatService

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("mlx_llm_server.access")
T = TypeVar("T")
KNOWN_ROUTES = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions"})


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
    """Gives every request an id (`X-Request-Id`, echoed), counts it, and logs one line."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

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
            access_logger.info(
                "%s %s %s %d %.3fs",
                request_id,
                scope.get("method", ""),
                path,
                status,
                time.monotonic() - started,
            )


def error_response(error: ServerError) -> JSONResponse:
    headers = {}
    if isinstance(error, ServerOverloadedError):
        headers["Retry-After"] = str(error.retry_after_seconds)
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=headers)


def _reject_constant(name: str) -> Any:
    raise InvalidRequestError(f"The request body is not valid JSON: {name} is not allowed.")


async def read_json_body(request: Request) -> Any:
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError("The request body is not valid UTF-8.") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise InvalidRequestError(f"The request body is not valid JSON: {error}.") from None


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it if the client goes away first (frees its engine slot)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError("client disconnected")


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(title="MLX LLM Server", docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(RequestAccounting, state=state)

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
        models = state.service.models()
        if not all(m.engine.running for m in models):
            return JSONResponse({"status": "engine_stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "models": [m.model_id for m in models]})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            raise ServiceUnavailableError("Metrics are not available yet.")
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> wire.ModelList:
        service = state.ready_service()
        cards = [wire.ModelCard(id=m.model_id, created=m.created) for m in service.models()]
        return wire.ModelList(data=cards)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> wire.ModelCard:
        served = state.ready_service().model(model_id)
        return wire.ModelCard(id=served.model_id, created=served.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        service = state.ready_service()
        payload = await read_json_body(request)
        chat = wire.parse_model(wire.ChatCompletionRequest, payload)
        prepared = await service.prepare(chat)
        handle = prepared.start()
        if chat.stream:
            # The background task also runs when the client left before the first chunk.
            return StreamingResponse(
                prepared.stream(handle),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                background=BackgroundTask(handle.cancel),
            )
        try:
            completion = await until_disconnected(request, prepared.complete(handle))
        finally:
            handle.cancel()
        return Response(completion.model_dump_json(), media_type="application/json")

    return app
