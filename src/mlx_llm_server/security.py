"""Secure defaults at the HTTP edge: which Host, which API key, how large a body, which Origin.

`SecurityMiddleware` is a pure ASGI middleware (Starlette's BaseHTTPMiddleware would break
streaming disconnects). For each HTTP request, in this order:

1. Host allow-list, against DNS rebinding: a web page on `evil.example` that re-points its name
   at 127.0.0.1 reaches the server with `Host: evil.example`, so only loopback names (any port)
   are accepted unless configured otherwise. Others get 403 `permission_error`.
2. CORS, off by default: with no `Access-Control-Allow-Origin` header a browser never lets a
   foreign page read a response. Configured origins get Starlette's CORSMiddleware (preflight
   included), placed before the key check so that preflights, which carry no key, succeed.
3. API keys: when any is configured, every path but `/health` needs `Authorization: Bearer KEY`,
   compared in constant time against every key. Otherwise 401 `authentication_error`.
4. Body size: a declared `Content-Length` over the limit is refused at once; a body without one
   is counted as it streams in and refused when it passes the limit, so an oversized body is
   never held in memory. Both are 413 `request_too_large`.

Errors are OpenAI's error JSON (`errors.py`), written here because this runs outside FastAPI's
exception handlers; the body limit, which trips while a route reads, raises
`RequestTooLargeError` for the route's handler to answer.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import AuthenticationError, PermissionDeniedError, RequestTooLargeError, ServerError

logger = logging.getLogger(__name__)

API_KEY_ENV = "MLX_LLM_SERVER_API_KEY"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"
DEFAULT_MAX_BODY_BYTES = 8 << 20
PUBLIC_PATHS = frozenset({"/health"})


def normalize_host(value: str) -> str | None:
    """The name in a Host header (or an --allowed-host), lower-cased, without port or brackets.

    `None` for what no valid Host header looks like (an unbracketed IPv6 address, a bad port).
    """
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or not name or (rest and not _is_port(rest)):
            return None
        return name
    name, colon, port = value.partition(":")
    if colon and not _is_port(colon + port):
        return None
    # A fully qualified `localhost.` names the same host as `localhost`.
    name = name.rstrip(".")
    return name or None


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit() and len(text) <= 6


@dataclass(frozen=True)
class SecurityConfig:
    """What the middleware enforces; the defaults are the safe ones."""

    api_keys: tuple[str, ...] = ()
    # Normalized names (see `normalize_host`); "*" allows any Host.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    public_paths: frozenset[str] = field(default=PUBLIC_PATHS)

    @classmethod
    def for_bind_address(
        cls,
        bind_host: str,
        *,
        api_keys: Iterable[str] = (),
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> SecurityConfig:
        """Loopback names, the bound address when it is another one, and `allowed_hosts`."""
        hosts = list(LOOPBACK_HOSTS)
        for name in [bind_host, *allowed_hosts]:
            name = name.strip()
            if name == ANY_HOST:
                normalized: str | None = ANY_HOST
            elif name.count(":") > 1 and not name.startswith("["):
                normalized = name.lower()  # a bare IPv6 address, as --host takes it ("::")
            else:
                normalized = normalize_host(name)
            if normalized is None:
                raise ValueError(f"{name!r} is not a host name or address")
            if normalized not in hosts:
                hosts.append(normalized)
        return cls(
            api_keys=tuple(api_keys),
            allowed_hosts=tuple(hosts),
            cors_origins=tuple(cors_origins),
            max_body_bytes=max_body_bytes,
        )

    def host_allowed(self, header: bytes | None) -> bool:
        if ANY_HOST in self.allowed_hosts:
            return True
        if header is None:
            # Only non-browser clients omit Host (HTTP/1.0), and they can send any Host anyway:
            # the check exists for browsers.
            return True
        name = normalize_host(header.decode("latin-1"))
        return name is not None and name in self.allowed_hosts

    def key_accepted(self, header: bytes | None) -> bool:
        """Whether `Authorization` carries one of the keys (constant time against each)."""
        if header is None:
            return False
        scheme, _, token = header.decode("latin-1").strip().partition(" ")
        given = token.strip().encode("latin-1")
        matched = False
        for key in self.api_keys:
            # No early exit: the time taken does not tell which key, or how much of it, matched.
            matched |= hmac.compare_digest(given, key.encode("utf-8"))
        return scheme.lower() == "bearer" and matched


def load_api_keys(
    keys: Sequence[str], key_file: str | None, environ: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """Keys from `--api-key`, `--api-key-file` (one a line; blank and `#` lines skipped), env.

    Raises ValueError (a sentence for the user) for an unreadable file or a malformed key.
    """
    environ = os.environ if environ is None else environ
    found = [key.strip() for key in keys]
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the API key file {key_file}: {error}") from None
        found += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not any(found):
            raise ValueError(f"the API key file {key_file} holds no key")
    if environ.get(API_KEY_ENV, "").strip():
        found.append(environ[API_KEY_ENV].strip())
    for key in found:
        # A key must survive an HTTP header unchanged: printable ASCII without spaces.
        if not key or not key.isascii() or not key.isprintable() or " " in key:
            raise ValueError("an API key must be non-empty printable ASCII without spaces")
    return tuple(dict.fromkeys(found))


def parse_origins(value: str | None) -> tuple[str, ...]:
    """`--cors-origins`: comma-separated origins, or `*`."""
    if not value:
        return ()
    origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"CORS origin {origin!r} must start with http:// or https://")
    return origins


async def send_error(
    send: Send, error: ServerError, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Answers with OpenAI's error JSON from outside the app (no FastAPI handler here)."""
    body = json.dumps(error.to_dict(), separators=(",", ":")).encode()  # as FastAPI writes it
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _KeyAndSizeGuard:
    """Steps 3 and 4 of the module docstring."""

    def __init__(self, app: ASGIApp, config: SecurityConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        config = self.config
        if config.api_keys and scope.get("path") not in config.public_paths:
            authorization = headers.get(b"authorization")
            if not config.key_accepted(authorization):
                message = (
                    "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
                    if authorization is None
                    else "Incorrect API key provided."
                )
                await send_error(
                    send, AuthenticationError(message), [(b"www-authenticate", b"Bearer")]
                )
                return
        limit = config.max_body_bytes
        too_large = RequestTooLargeError(
            f"The request body is larger than this server's limit of {limit} bytes."
        )
        declared = headers.get(b"content-length", b"").strip()
        if declared and (not declared.isdigit() or int(declared) > limit):
            await send_error(send, too_large)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except RequestTooLargeError as error:
            # Reached only when no route handler turned it into a response.
            if started:
                raise
            await send_error(send, error)


class SecurityMiddleware:
    """Host check, then CORS (when configured), then API key and body size; see the module."""

    def __init__(self, app: ASGIApp, config: SecurityConfig | None = None) -> None:
        self.config = config or SecurityConfig()
        guarded: ASGIApp = _KeyAndSizeGuard(app, self.config)
        if self.config.cors_origins:
            guarded = CORSMiddleware(
                guarded,
                allow_origins=list(self.config.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                expose_headers=["X-Request-Id", "Retry-After"],
                max_age=600,
            )
        self.inner = guarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        host = dict(scope.get("headers") or []).get(b"host")
        if not self.config.host_allowed(host):
            shown = (host or b"").decode("latin-1")[:100]
            await send_error(
                send,
                PermissionDeniedError(
                    f"Host '{shown}' is not allowed; start the server with --allowed-host to "
                    "accept it."
                ),
            )
            return
        await self.inner(scope, receive, send)
