"""A fake Twilio-style SMS provider: `POST /messages` with a form body `To`, `From`, `Body`.

Counts accepted messages (`count`, `messages`), checks the credentials (HTTP basic `SID:TOKEN`
or a bearer token), and fails on demand: `fail_next(status)` answers an error without sending,
`timeout_next()` never answers (the server drops the connection after `timeout_sleep`) without
sending, and `accept_then_timeout_next()` sends the message but never answers (the client
can't know it was sent). In process: `httpx.MockTransport(fake.handle)`; over real HTTP:
`with fake.serve() as base_url: url = base_url + "/messages"`.
"""

from __future__ import annotations

import base64
import collections
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs

import httpx

from tests.fakes.server import serve as serve_http

TOKEN = "sms-test-token"
PATH = "/messages"


class FakeSms:
    def __init__(self, *, token: str = TOKEN, timeout_sleep: float = 0.2) -> None:
        self.token = token
        self.timeout_sleep = timeout_sleep
        self._lock = threading.Lock()
        self.messages: list[dict[str, Any]] = []
        self.requests = 0
        self.unauthorized = 0
        self._faults: collections.deque[int] = collections.deque()
        self._timeouts = 0
        self._accept_then_timeout = 0

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def fail_next(self, status: int = 500, n: int = 1) -> None:
        with self._lock:
            self._faults.extend([status] * n)

    def timeout_next(self, n: int = 1) -> None:
        with self._lock:
            self._timeouts += n

    def accept_then_timeout_next(self, n: int = 1) -> None:
        with self._lock:
            self._accept_then_timeout += n

    def _authorized(self, request: httpx.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if header == f"Bearer {self.token}":
            return True
        if header.startswith("Basic "):
            try:
                decoded = base64.b64decode(header[6:]).decode()
            except ValueError:
                return False
            return decoded == self.token
        return False

    def respond(self, request: httpx.Request) -> httpx.Response | None:
        with self._lock:
            self.requests += 1
            if request.method != "POST" or request.url.path != PATH:
                return httpx.Response(404, json={"message": "not found"})
            if not self._authorized(request):
                self.unauthorized += 1
                return httpx.Response(401, json={"code": 20003, "message": "Authenticate"})
            if self._timeouts:
                self._timeouts -= 1
                return None
            if self._faults:
                status = self._faults.popleft()
                return httpx.Response(status, json={"message": "provider error"})
            form = {k: v[-1] for k, v in parse_qs(request.content.decode()).items()}
            if not form.get("To", "").startswith("+") or not form.get("Body"):
                return httpx.Response(400, json={"code": 21211, "message": "Invalid 'To'"})
            sid = f"SM{len(self.messages) + 1:032d}"
            self.messages.append(
                {**form, "sid": sid, "idempotency_key": request.headers.get("Idempotency-Key")}
            )
            if self._accept_then_timeout:
                self._accept_then_timeout -= 1
                return None
            return httpx.Response(201, json={"sid": sid, "status": "queued", "to": form["To"]})

    def handle(self, request: httpx.Request) -> httpx.Response:
        answer = self.respond(request)
        if answer is None:
            raise httpx.ReadTimeout("fake sms: no answer", request=request)
        return answer

    @contextmanager
    def serve(self) -> Iterator[str]:
        with serve_http(self.respond, timeout_sleep=self.timeout_sleep, name="fake-sms") as url:
            yield url
