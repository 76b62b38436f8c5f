"""A fake pass service: verifies our `X-Loyalty-Signature` (HMAC-SHA256 over
"<X-Loyalty-Timestamp>.<raw body>"), records what it accepted, dedupes by `Idempotency-Key`,
and fails on demand."""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from tests.fakes.server import serve as serve_http

SECRET = "pass-service-secret"


class FakePassService:
    def __init__(self, *, secret: str = SECRET) -> None:
        self.secret = secret
        self._lock = threading.Lock()
        self.received: list[dict[str, Any]] = []  # accepted, first delivery per key only
        self.requests = 0
        self.bad_signatures = 0
        self.duplicates = 0
        self._keys: set[str] = set()
        self._faults: collections.deque[int] = collections.deque()

    def fail_next(self, status: int = 503, n: int = 1) -> None:
        with self._lock:
            self._faults.extend([status] * n)

    def verify(self, request: httpx.Request) -> bool:
        timestamp = request.headers.get("X-Loyalty-Timestamp", "")
        given = request.headers.get("X-Loyalty-Signature", "")
        mac = hmac.new(
            self.secret.encode(), f"{timestamp}.".encode() + request.content, hashlib.sha256
        )
        return bool(timestamp.isdigit()) and hmac.compare_digest(given, f"sha256={mac.hexdigest()}")

    def respond(self, request: httpx.Request) -> httpx.Response | None:
        with self._lock:
            self.requests += 1
            if not self.verify(request):
                self.bad_signatures += 1
                return httpx.Response(401, json={"error": "bad signature"})
            if self._faults:
                return httpx.Response(self._faults.popleft(), json={"error": "unavailable"})
            key = request.headers.get("Idempotency-Key", "")
            if key in self._keys:
                self.duplicates += 1
                return httpx.Response(200, json={"ok": True, "duplicate": True})
            self._keys.add(key)
            self.received.append(json.loads(request.content))
            return httpx.Response(202, json={"ok": True})

    def handle(self, request: httpx.Request) -> httpx.Response:
        answer = self.respond(request)
        assert answer is not None
        return answer

    @contextmanager
    def serve(self) -> Iterator[str]:
        with serve_http(self.respond, timeout_sleep=0.2, name="fake-pass-service") as url:
            yield url
