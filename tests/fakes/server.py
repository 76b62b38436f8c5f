"""Serve a fake's request handler over real HTTP on 127.0.0.1, for end-to-end tests and benches."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

# Hop-by-hop and length headers are the server's own business, not the fake's answer's.
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


@contextmanager
def serve(
    respond: Callable[[httpx.Request], httpx.Response | None],
    *,
    timeout_sleep: float,
    name: str = "fake",
) -> Iterator[str]:
    """Run `respond` on a free port and yield the base URL.

    `respond` answers an `httpx.Request` with an `httpx.Response`, or None for "time out": the
    server then sleeps `timeout_sleep` (past the client's read timeout) and drops the connection.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes: with Nagle's algorithm on, each answer
        # waits for the client's delayed ACK (~40 ms on Linux) before its body is sent.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _dispatch(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            content = self.rfile.read(length) if length else b""
            request = httpx.Request(
                self.command,
                f"http://{self.headers.get('Host') or '127.0.0.1'}{self.path}",
                headers=list(self.headers.items()),
                content=content,
            )
            answer = respond(request)
            if answer is None:
                time.sleep(timeout_sleep)
                self.close_connection = True
                return
            payload = answer.read()
            self.send_response(answer.status_code)
            for header, value in answer.headers.items():
                if header.lower() not in _OWN_HEADERS:
                    self.send_header(header, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = _dispatch

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
