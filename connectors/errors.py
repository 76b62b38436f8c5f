"""The one taxonomy of foreign-API failures. Retries key on the class, never on `Exception`."""

from __future__ import annotations


class ConnectorError(Exception):
    """Base of every error a connector raises on purpose."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class RetriableError(ConnectorError):
    """Try again later: 429, 5xx, timeouts, connection errors, THROTTLED.

    `retry_after` is the wait the server asked for (seconds), when it said.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class ConfigurationError(ConnectorError):
    """The connection itself is wrong (401/403, revoked token, missing scope, plan/access
    disabled): stop, mark the connection as needing attention, don't retry."""


class FatalError(ConnectorError):
    """A request that will never succeed as sent (400, 404 on the endpoint, malformed answer)."""


class InvalidCursorError(FatalError):
    """The source no longer accepts a saved cursor (expired/invalid): restart the window."""


class SkippableRecord(ConnectorError):
    """One record cannot be mapped; the run records it and goes on."""
