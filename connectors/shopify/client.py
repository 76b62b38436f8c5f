"""Shopify GraphQL Admin API client: auth, cost budget, THROTTLED handling, classified errors.

Throttling is a calculated-cost leaky bucket per app and shop. Every answer reports it in
`extensions.cost.throttleStatus`; the client takes the expected cost of a query from the shared
`RateBudget` before each call and overwrites the budget with what the server reported after each
answer, so the next call waits exactly `(requested - currentlyAvailable) / restoreRate` and, in
steady state, the server never has to say THROTTLED. When it does anyway (another app sharing the
bucket, a cold budget), it says so with HTTP 200 or 429 depending on the path; both become a
`RetriableError` whose `retry_after` is the wait the bucket needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping
from typing import Any

import httpx

from connectors import http as connector_http
from connectors.errors import ConfigurationError, FatalError, RetriableError
from connectors.ratelimit import RateBudget

ACCESS_TOKEN_HEADER = "X-Shopify-Access-Token"  # noqa: S105 - a header name, not a secret
DEFAULT_QUERY_COST = 10.0


class ShopifyAccessTokenAuth(httpx.Auth):
    """`X-Shopify-Access-Token: <token>` on every request (never logged, never in errors)."""

    def __init__(self, access_token: str) -> None:
        self._access_token = access_token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[ACCESS_TOKEN_HEADER] = self._access_token
        yield request


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _error_codes(body: Mapping[str, Any]) -> list[str]:
    errors = body.get("errors")
    if not isinstance(errors, list):
        return []
    codes = []
    for error in errors:
        if isinstance(error, Mapping):
            extensions = error.get("extensions")
            if isinstance(extensions, Mapping) and isinstance(extensions.get("code"), str):
                codes.append(extensions["code"])
    return codes


def _error_messages(body: Mapping[str, Any]) -> str:
    errors = body.get("errors")
    if isinstance(errors, str):
        return errors
    if not isinstance(errors, list):
        return "unknown error"
    messages = [str(error.get("message")) for error in errors if isinstance(error, Mapping)] or [
        "unknown error"
    ]
    return "; ".join(messages)[:500]


def _json_body(response: httpx.Response) -> Mapping[str, Any] | None:
    if "json" not in response.headers.get("content-type", ""):
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, Mapping) else None


class ShopifyClient:
    """Executes GraphQL Admin queries for one shop.

    `requests` counts every HTTP call attempted (retries included), `throttled` every THROTTLED
    answer. `budget_key` names the shop's bucket in the (possibly Redis-shared) budget.
    """

    def __init__(
        self,
        *,
        http: httpx.Client,
        shop_domain: str,
        access_token: str,
        api_version: str,
        budget: RateBudget,
        budget_key: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 6,
    ) -> None:
        if not access_token:
            raise ConfigurationError("shopify access token is empty")
        self._http = http
        self._auth = ShopifyAccessTokenAuth(access_token)
        self._path = f"/admin/api/{api_version}/graphql.json"
        self._budget = budget
        self.budget_key = budget_key or shop_domain
        self._sleep = sleep
        self._max_attempts = max_attempts
        # requestedQueryCost the server reported, per (query, page size): the best estimate.
        self._known_costs: dict[tuple[str, Any], float] = {}
        self._maximum: float | None = None
        self.requests = 0
        self.throttled = 0

    def expected_cost(
        self, query: str, variables: Mapping[str, Any], estimate: float | None = None
    ) -> float:
        """What to take from the budget before sending: the server's own figure when known."""
        cost = self._known_costs.get((query, variables.get("first")))
        if cost is None:
            cost = estimate if estimate is not None else DEFAULT_QUERY_COST
        if self._maximum is not None:
            cost = min(cost, self._maximum)
        return cost

    def _observe(
        self, query: str, variables: Mapping[str, Any], body: Mapping[str, Any] | None
    ) -> tuple[float | None, float | None, float | None]:
        """Feed `extensions.cost` back into the budget; return (requested, available, rate)."""
        extensions = body.get("extensions") if body is not None else None
        cost = extensions.get("cost") if isinstance(extensions, Mapping) else None
        if not isinstance(cost, Mapping):
            return None, None, None
        requested = _number(cost.get("requestedQueryCost"))
        if requested is not None:
            self._known_costs[(query, variables.get("first"))] = requested
        status = cost.get("throttleStatus")
        if not isinstance(status, Mapping):
            return requested, None, None
        available = _number(status.get("currentlyAvailable"))
        maximum = _number(status.get("maximumAvailable"))
        rate = _number(status.get("restoreRate"))
        if available is not None and maximum is not None and rate is not None:
            self._maximum = maximum
            self._budget.observe(
                self.budget_key, available=available, maximum=maximum, restore_rate=rate
            )
        return requested, available, rate

    def execute(
        self,
        query: str,
        variables: Mapping[str, Any] | None = None,
        *,
        cost: float | None = None,
    ) -> dict[str, Any]:
        """Run one query (with retries) and return its `data`.

        `cost` is the caller's estimate of the query cost, used until the server has reported
        the real `requestedQueryCost` for this query and page size.
        """
        variables = dict(variables or {})
        payload = {"query": query, "variables": variables}

        def send() -> httpx.Response:
            self._budget.acquire(self.budget_key, cost=self.expected_cost(query, variables, cost))
            self.requests += 1
            return self._http.post(self._path, json=payload, auth=self._auth)

        def classify(response: httpx.Response) -> None:
            body = _json_body(response)
            requested, available, rate = self._observe(query, variables, body)
            if body is not None and "THROTTLED" in _error_codes(body):
                self.throttled += 1
                retry_after = None
                if requested is not None and available is not None and rate:
                    retry_after = max(0.0, (requested - available) / rate)
                raise RetriableError(
                    f"shopify answered THROTTLED (HTTP {response.status_code})",
                    status=response.status_code,
                    code="THROTTLED",
                    retry_after=retry_after,
                )
            connector_http.classify(response)

        response = connector_http.send_with_retries(
            send,
            classify=classify,
            max_attempts=self._max_attempts,
            sleep=self._sleep,
            source="shopify",
        )
        body = _json_body(response)
        if body is None:
            raise FatalError(
                f"shopify answered HTTP {response.status_code} without a JSON object",
                status=response.status_code,
            )
        codes = _error_codes(body)
        if "ACCESS_DENIED" in codes:
            raise ConfigurationError(
                f"shopify denied access: {_error_messages(body)}",
                status=response.status_code,
                code="ACCESS_DENIED",
            )
        if body.get("errors"):
            raise FatalError(
                f"shopify GraphQL error: {_error_messages(body)}",
                status=response.status_code,
                code=codes[0] if codes else None,
            )
        data = body.get("data")
        if not isinstance(data, dict):
            raise FatalError("shopify answer has no data", status=response.status_code)
        return data


CUSTOMER_QUERY = """
query Customer($id: ID!) {
  customer(id: $id) {
    id
    legacyResourceId
    firstName
    lastName
    displayName
    defaultEmailAddress { emailAddress marketingState }
    defaultPhoneNumber { phoneNumber marketingState }
    email
    phone
    note
    tags
    state
    verifiedEmail
    createdAt
    updatedAt
  }
}
""".strip()


def fetch_customer(client: ShopifyClient, external_id: str) -> dict[str, Any] | None:
    """One customer node by its numeric id (the same fields the sync pages read), or None when
    Shopify no longer has it (deleted)."""
    if not external_id.isdigit():
        raise FatalError(f"not a Shopify customer id: {external_id!r}")
    data = client.execute(CUSTOMER_QUERY, {"id": f"gid://shopify/Customer/{external_id}"}, cost=2.0)
    node = data.get("customer")
    return node if isinstance(node, dict) else None
