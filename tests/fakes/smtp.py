"""A fake SMTP server (aiosmtpd on 127.0.0.1) that counts what it accepted and fails on demand.

    fake = FakeSmtp()
    with fake.serve() as url:          # "smtp://127.0.0.1:<port>"
        ...
    assert fake.count == 1 and fake.messages[0]["To"] == "ada@example.com"

Faults (each consumed by the next message that reaches that stage):
`fail_rcpt_next(code)` refuses RCPT TO (e.g. 550 bad address, 450 mailbox busy),
`fail_data_next(code)` refuses the message at the end of DATA, and `drop_after_data_next()`
*accepts* the message then drops the connection without replying — the client can't know it
was delivered (the "outcome unknown" case). With `username`/`password` the server checks
AUTH (PLAIN, offered without TLS here: it is a local test server) and refuses a wrong
login with 535; mail sent without logging in is not refused (aiosmtpd warns about requiring AUTH
without TLS, and warnings are errors in this suite).

TLS: `tls="starttls"` (with a server `ssl.SSLContext`) offers STARTTLS and refuses mail and
AUTH before it (`require_starttls`, `auth_require_tls`); the URL then says `?starttls=true`.
`tls="implicit"` listens with TLS from the first byte (`smtps://`). `tls_sessions` records,
per accepted message, whether its session was encrypted.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, Literal
from urllib.parse import quote

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class FakeSmtp:
    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: Literal["none", "starttls", "implicit"] = "none",
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if (tls == "none") != (tls_context is None):
            raise ValueError("a TLS mode needs a server context, and only a TLS mode takes one")
        self.username = username
        self.password = password
        self.tls = tls
        self.tls_context = tls_context
        self.tls_sessions: list[bool] = []
        self._lock = threading.Lock()
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.refused = 0
        # (No handler attribute may start with `auth_`: aiosmtpd takes those for mechanisms.)
        self.login_refusals = 0
        self._rcpt_faults: collections.deque[int] = collections.deque()
        self._data_faults: collections.deque[int] = collections.deque()
        self._drops = 0

    # -- state ------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def fail_rcpt_next(self, code: int = 550, n: int = 1) -> None:
        with self._lock:
            self._rcpt_faults.extend([code] * n)

    def fail_data_next(self, code: int = 451, n: int = 1) -> None:
        with self._lock:
            self._data_faults.extend([code] * n)

    def drop_after_data_next(self, n: int = 1) -> None:
        with self._lock:
            self._drops += n

    def message_ids(self) -> list[str]:
        with self._lock:
            return [str(m["Message-ID"]) for m in self.messages]

    # -- aiosmtpd handler hooks -------------------------------------------------------------

    async def handle_RCPT(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        with self._lock:
            code = self._rcpt_faults.popleft() if self._rcpt_faults else None
            if code is not None:
                self.refused += 1
        if code is not None:
            text = "mailbox unavailable" if code >= 500 else "mailbox busy, try later"
            return f"{code} {text}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        with self._lock:
            code = self._data_faults.popleft() if self._data_faults else None
            if code is not None:
                self.refused += 1
                verdict = "rejected" if code >= 500 else "try again later"
                return f"{code} <{', '.join(envelope.rcpt_tos)}>: {verdict}"
            raw = envelope.original_content or envelope.content or b""
            data = raw if isinstance(raw, bytes) else str(raw).encode()
            message = message_from_bytes(data, policy=policy.default)
            assert isinstance(message, EmailMessage)
            self.messages.append(message)
            self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
            transport = server.transport
            self.tls_sessions.append(
                session.ssl is not None
                or (transport is not None and transport.get_extra_info("ssl_object") is not None)
            )
            drop = self._drops > 0
            if drop:
                self._drops -= 1
        transport = server.transport
        if drop and isinstance(transport, asyncio.Transport):
            transport.abort()  # accepted, but the client never hears so
        return "250 Message accepted"

    def _authenticate(
        self, server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, auth: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth, LoginPassword)
            and auth.login.decode() == self.username
            and auth.password.decode() == self.password
        )
        if not ok:
            with self._lock:
                self.login_refusals += 1
        return AuthResult(success=ok, handled=False)  # the server answers 235 / 535

    # -- serving ----------------------------------------------------------------------------

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Run on a free port of 127.0.0.1; yields `smtp://[user:pass@]127.0.0.1:<port>`
        (`?starttls=true` with STARTTLS, `smtps://` with implicit TLS)."""
        port = _free_port()
        kwargs: dict[str, Any] = {}
        if self.username is not None:
            kwargs.update(
                authenticator=self._authenticate,
                auth_require_tls=self.tls == "starttls",
                auth_required=False,
                auth_exclude_mechanism=["LOGIN"],  # one mechanism is enough for the tests
            )
        if self.tls == "starttls":
            kwargs.update(tls_context=self.tls_context, require_starttls=True)
        elif self.tls == "implicit":
            kwargs.update(ssl_context=self.tls_context)
        controller = Controller(self, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        try:
            credentials = (
                f"{quote(self.username, safe='')}:{quote(self.password or '', safe='')}@"
                if self.username
                else ""
            )
            scheme = "smtps" if self.tls == "implicit" else "smtp"
            query = "?starttls=true" if self.tls == "starttls" else ""
            yield f"{scheme}://{credentials}127.0.0.1:{port}{query}"
        finally:
            controller.stop()
