"""A thin Appy Stamp REST client: key + secret headers, the `{success, data, meta, timestamp}`
envelope, one classifier for its error codes.

Every call takes a unit from the account's rate budget first, goes through
`connectors.http.send_with_retries` and is classified with Appy Stamp's codes in mind:

- `API_ACCESS_DISABLED`, `PLAN_UPGRADE_REQUIRED` (and 401/403) → `ConfigurationError`: the
  connection needs attention, never retried;
- `CUSTOMER_NOT_FOUND` (404) → `FatalError` with that code (a missing record, not a broken
  connection: callers that look one customer up treat it as "gone");
- rate limiting (429 or `RATE_LIMITED`/`RATE_LIMIT_EXCEEDED`) → `RetriableError` honouring
  `Retry-After`, else `X-RateLimit-Reset` (epoch seconds or seconds from now);
- 5xx, timeouts and transport errors → `RetriableError`; `success: false` on a 2xx → `FatalError`.

The error body's shape is not in the seed: the code is read from `error.code`, `code`,
`errorCode` or `errors[0].code`, whichever is present.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from connectors import http
from connectors.errors import (
    ConfigurationError,
    ConnectorError,
    FatalError,
    RetriableError,
)
from connectors.ratelimit import RateBudget

SOURCE = "appystamp"
CUSTOMERS_PATH = "/customers"
CONFIGURATION_CODES = frozenset({"API_ACCESS_DISABLED", "PLAN_UPGRADE_REQUIRED"})
NOT_FOUND_CODES = frozenset({"CUSTOMER_NOT_FOUND"})
RATE_LIMIT_CODES = frozenset({"RATE_LIMITED", "RATE_LIMIT_EXCEEDED", "TOO_MANY_REQUESTS"})
# An `X-RateLimit-Reset` above this is an epoch timestamp, below it a delay in seconds.
_EPOCH_THRESHOLD = 1_000_000_000


def error_code(response: httpx.Response) -> str | None:
    """The Appy Stamp error code of an answer (None when it names none)."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, Mapping):
        return None
    candidates: list[Any] = []
    error = body.get("error")
    if isinstance(error, Mapping):
        candidates.append(error.get("code"))
    elif isinstance(error, str):
        candidates.append(error)
    candidates += [body.get("code"), body.get("errorCode")]
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], Mapping):
        candidates.append(errors[0].get("code"))
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.strip():
            return candidate.strip().upper()
    return None


def rate_limit_wait(headers: httpx.Headers, *, now: float | None = None) -> float | None:
    """Seconds to wait before the next request: `Retry-After` (or `retry-after-ms`), else
    `X-RateLimit-Reset` (epoch seconds, or seconds from now when small). None: not said."""
    wait = http.parse_retry_after(headers, now=now)
    if wait is not None:
        return wait
    raw = headers.get("x-ratelimit-reset") or headers.get("ratelimit-reset")
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    if value >= _EPOCH_THRESHOLD:
        current = time.time() if now is None else now
        return max(0.0, value - current)
    return value


def classify(response: httpx.Response) -> None:
    """Return for a successful answer; raise the connector error the answer calls for."""
    if response.is_success:
        return
    status = response.status_code
    code = error_code(response)
    label = f"appystamp {status} {code or 'error'}"
    if code in CONFIGURATION_CODES:
        raise ConfigurationError(f"{label}: connection needs attention", status=status, code=code)
    if status == 429 or code in RATE_LIMIT_CODES:
        raise RetriableError(
            f"{label}: rate limited",
            status=status,
            code=code or "RATE_LIMITED",
            retry_after=rate_limit_wait(response.headers),
        )
    if code in NOT_FOUND_CODES:
        raise FatalError(f"{label}: not found", status=status, code=code)
    try:
        http.classify(response)
    except ConnectorError as exc:
        if exc.code is None:
            exc.code = code
        raise
    raise FatalError(f"{label}: unexpected answer", status=status, code=code)  # pragma: no cover


def unwrap(response: httpx.Response) -> tuple[Any, Mapping[str, Any]]:
    """`{success, data, meta, timestamp}` → (data, meta); FatalError for anything else."""
    try:
        body = response.json()
    except ValueError as exc:
        raise FatalError(f"appystamp {response.status_code}: answer is not JSON") from exc
    if not isinstance(body, Mapping):
        raise FatalError(f"appystamp {response.status_code}: answer is not a JSON object")
    if body.get("success") is False:
        code = error_code(response)
        if code in CONFIGURATION_CODES:
            raise ConfigurationError(f"appystamp {code}: connection needs attention", code=code)
        raise FatalError(f"appystamp answer: success is false ({code or 'no code'})", code=code)
    if "data" not in body:
        raise FatalError("appystamp answer: no data in the envelope")
    meta = body.get("meta")
    return body["data"], meta if isinstance(meta, Mapping) else {}


class AppyStampClient:
    """Appy Stamp REST calls for one account; counts `requests` and `throttled` answers.

    The key and secret travel in `X-Api-Key`/`X-Api-Secret` headers set per request; they never
    appear in repr, messages or logs.
    """

    def __init__(
        self,
        *,
        http: httpx.Client,
        api_key: str,
        api_secret: str,
        budget: RateBudget,
        budget_key: str,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 6,
    ) -> None:
        if not api_key or not api_secret:
            raise ConfigurationError("appystamp api key and secret are required")
        self._http = http
        self._headers = {
            "X-Api-Key": api_key,
            "X-Api-Secret": api_secret,
            "Accept": "application/json",
        }
        self._budget = budget
        self._budget_key = budget_key
        self._sleep = sleep
        self._max_attempts = max_attempts
        self.requests = 0
        self.throttled = 0

    def __repr__(self) -> str:
        return f"AppyStampClient(budget_key={self._budget_key!r}, credentials=***)"

    def _on_retry(self, error: RetriableError, _delay: float) -> None:
        if error.status == 429 or error.code in RATE_LIMIT_CODES:
            self.throttled += 1

    def get(
        self, path: str, *, params: Mapping[str, str | int] | None = None
    ) -> tuple[Any, Mapping[str, Any]]:
        """One GET (rate budget, retries, classification) → the envelope's (data, meta)."""

        def send() -> httpx.Response:
            self._budget.acquire(self._budget_key)
            self.requests += 1
            return self._http.get(path, params=params, headers=self._headers)

        try:
            response = http.send_with_retries(
                send,
                classify=classify,
                max_attempts=self._max_attempts,
                sleep=self._sleep,
                on_retry=self._on_retry,
                source=SOURCE,
            )
        except RetriableError as exc:
            if exc.status == 429 or exc.code in RATE_LIMIT_CODES:
                self.throttled += 1
            raise
        return unwrap(response)

    def list_customers(self, *, after: str | None, limit: int) -> tuple[Any, Mapping[str, Any]]:
        """`GET /customers?limit=&after=` → (data, meta)."""
        params: dict[str, str | int] = {"limit": limit}
        if after:
            params["after"] = after
        return self.get(CUSTOMERS_PATH, params=params)

    def list_activities(
        self, customer_id: str, *, after: str | None, limit: int
    ) -> tuple[Any, Mapping[str, Any]]:
        """`GET /customers/{id}/activities?limit=&after=` → (data, meta)."""
        params: dict[str, str | int] = {"limit": limit}
        if after:
            params["after"] = after
        return self.get(f"{CUSTOMERS_PATH}/{quote(customer_id, safe='')}/activities", params=params)

    def get_customer(self, customer_id: str) -> Mapping[str, Any] | None:
        """`GET /customers/{id}` → the customer object; None on `CUSTOMER_NOT_FOUND`/404."""
        try:
            data, _ = self.get(f"{CUSTOMERS_PATH}/{quote(customer_id, safe='')}")
        except FatalError as exc:
            if exc.status == 404:
                return None
            raise
        return data if isinstance(data, Mapping) else None
