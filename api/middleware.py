"""Request id + one structured log line per request (pure ASGI: no per-request task overhead)."""

from __future__ import annotations

import random
import re
import time
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("api")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ids = random.Random()  # noqa: S311 - seeded from the OS once; ids, not secrets


def request_id_of(scope: Scope) -> str:
    """The request's id: a safe incoming `X-Request-Id`, else a new one; kept in the scope."""
    request_id = ""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            incoming = value.decode("latin-1")
            request_id = incoming if _SAFE_ID.match(incoming) else ""
            break
    if not request_id:
        # A correlation id, not a secret: the PRNG (no system call per request) is enough.
        request_id = f"{_ids.getrandbits(128):032x}"
    scope.setdefault("state", {})["request_id"] = request_id
    return request_id


def log_request(scope: Scope, status: int, started: float) -> None:
    # The path holds ids only; the query string may hold PII (search=...): not logged.
    log.info(
        "http.request",
        method=scope.get("method"),
        path=scope.get("path"),
        status=status,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
    )


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        status: dict[str, Any] = {"code": 500}
        started = time.perf_counter()

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, _send)
            finally:
                log_request(scope, status["code"], started)
