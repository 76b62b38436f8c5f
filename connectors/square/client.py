"""A thin Square client: bearer auth, pinned `Square-Version`, one classified search call.

Only `POST /v2/customers/search` is needed by the sync. Every call takes a unit from the
merchant's rate budget first (Square doesn't publish its limits; the budget keeps N workers
polite), goes through `connectors.http.send_with_retries`, and is classified with Square's
error envelope `{"errors": [{"category", "code", "detail", "field"}]}` in mind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping
from typing import Any

import httpx

from connectors import http
from connectors.errors import (
    ConfigurationError,
    ConnectorError,
    FatalError,
    InvalidCursorError,
    RetriableError,
)
from connectors.ratelimit import RateBudget

SEARCH_CUSTOMERS_PATH = "/v2/customers/search"
# Square's answers for a connection that needs attention (bad, expired or revoked token, scope).
CONFIGURATION_CODES = frozenset(
    {
        "UNAUTHORIZED",
        "ACCESS_TOKEN_EXPIRED",
        "ACCESS_TOKEN_REVOKED",
        "INSUFFICIENT_SCOPES",
        "CLIENT_DISABLED",
        "MERCHANT_SUBSCRIPTION_NOT_FOUND",
    }
)


class BearerAuth(httpx.Auth):
    """`Authorization: Bearer <token>`; the token never appears in repr or messages."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigurationError("square access token is empty")
        self._token = token

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


def first_error(response: httpx.Response) -> Mapping[str, Any]:
    """The first entry of Square's `errors` list, or an empty mapping when there is none."""
    try:
        body = response.json()
    except ValueError:
        return {}
    if not isinstance(body, Mapping):
        return {}
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], Mapping):
        return errors[0]
    return {}


def _is_cursor_error(error: Mapping[str, Any]) -> bool:
    code = str(error.get("code") or "")
    if code == "INVALID_CURSOR":
        return True
    field = str(error.get("field") or "").lower()
    detail = str(error.get("detail") or "").lower()
    return field == "cursor" or "cursor" in detail


def classify(response: httpx.Response) -> None:
    """`connectors.http.classify` plus what only Square's envelope tells.

    400 about the cursor → InvalidCursorError (restart the window); an auth code on any 4xx →
    ConfigurationError; everything else as the shared classifier says, with the Square code kept
    on the exception.
    """
    if response.is_success:
        return
    status = response.status_code
    error = first_error(response)
    code = str(error["code"]) if isinstance(error.get("code"), str) else None
    label = f"square {status} {code or 'error'}"
    if status == 400 and _is_cursor_error(error):
        raise InvalidCursorError(f"{label}: cursor rejected", status=status, code=code)
    if 400 <= status < 500 and status not in (408, 429) and code in CONFIGURATION_CODES:
        raise ConfigurationError(f"{label}: connection needs attention", status=status, code=code)
    try:
        http.classify(response)
    except ConnectorError as exc:
        if exc.code is None:
            exc.code = code
        raise
    raise FatalError(f"{label}: unexpected answer", status=status, code=code)


class SquareClient:
    """Square Customers API calls for one merchant; counts `requests` and `throttled` answers."""

    def __init__(
        self,
        *,
        http: httpx.Client,
        access_token: str,
        square_version: str,
        budget: RateBudget,
        budget_key: str,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 6,
    ) -> None:
        self._http = http
        self._auth = BearerAuth(access_token)
        self._headers = {
            "Square-Version": square_version,
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        self._budget = budget
        self._budget_key = budget_key
        self._sleep = sleep
        self._max_attempts = max_attempts
        self.requests = 0
        self.throttled = 0
        self.cursor_restarts = 0

    def _on_retry(self, error: RetriableError, _delay: float) -> None:
        if error.status == 429:
            self.throttled += 1

    def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, json=body)

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> dict[str, Any]:
        """One Square API call (rate budget, retries, error classification) → the JSON object.

        Square answers errors as `{"errors": [...]}`; `classify` turns them into the connector
        error taxonomy (401/403 → ConfigurationError, 429/5xx → RetriableError, ...).
        """

        def send() -> httpx.Response:
            self._budget.acquire(self._budget_key)
            self.requests += 1
            return self._http.request(
                method, path, json=json, params=params, headers=self._headers, auth=self._auth
            )

        try:
            response = http.send_with_retries(
                send,
                classify=classify,
                max_attempts=self._max_attempts,
                sleep=self._sleep,
                on_retry=self._on_retry,
                source="square",
            )
        except RetriableError as exc:
            if exc.status == 429:
                self.throttled += 1
            raise
        try:
            data = response.json()
        except ValueError as exc:
            raise FatalError(f"square {response.status_code}: answer is not JSON") from exc
        if not isinstance(data, dict):
            raise FatalError(f"square {response.status_code}: answer is not a JSON object")
        return data

    def search_customers(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """`POST /v2/customers/search` → the decoded answer (`customers`, `cursor`)."""
        return self._post(SEARCH_CUSTOMERS_PATH, body)


def fetch_customer(client: SquareClient, customer_id: str) -> dict[str, Any] | None:
    """`GET /v2/customers/{id}` → the customer object, or None when Square answers 404 (deleted
    or merged away)."""
    from urllib.parse import quote

    try:
        data = client.request("GET", f"/v2/customers/{quote(customer_id, safe='')}")
    except FatalError as exc:
        if exc.status == 404:
            return None
        raise
    customer = data.get("customer")
    return customer if isinstance(customer, dict) else None
