"""A thin LOKE API client: OAuth2 client credentials, bearer calls, one classifier.

Authentication (seeds README: issuer `https://auth.loke.global`, token endpoint `/token`):

- `POST {auth_url}/token` with `grant_type=client_credentials`. The client authenticates with
  HTTP Basic (`client_secret_basic`, the method RFC 6749 §2.3.1 requires every authorization
  server to support; id and secret are form-urlencoded before base64, as that section says).
  A connection whose server only accepts credentials in the body can set
  `config["token_auth_method"] = "client_secret_post"` (RFC 6749 §2.3.1's alternative).
- The access token is cached until `expires_in` minus a margin (60 s, or a tenth of a short
  lifetime), renewed before it expires, and renewed ONCE when the API answers 401 anyway (the
  server may revoke early); a second 401 in a row is a `ConfigurationError` (not retried).
- Token endpoint 400/401/403 (`invalid_client`, `unauthorized_client`, `invalid_grant`, …) →
  `ConfigurationError`: a wrong id/secret never gets better by retrying.
- 408/429/5xx/timeouts (token endpoint and API alike) → `RetriableError`, retried by
  `connectors.http.send_with_retries` honouring `Retry-After`.

Tokens and the client secret never appear in repr, exception messages or logs: messages name
the status and the path only (`connectors.http._describe`).
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, quote_plus

import httpx
import structlog

from connectors import http
from connectors.errors import ConfigurationError, ConnectorError, FatalError, RetriableError
from connectors.ratelimit import RateBudget

SOURCE: Final = "loke"
TOKEN_PATH: Final = "/token"  # noqa: S105 - a path, not a secret
NEXT_PAGE_HEADER: Final = "X-Next-Page"
AUTH_METHODS: Final = frozenset({"client_secret_basic", "client_secret_post"})
# OAuth2 error codes of a token request that only the merchant can fix (RFC 6749 §5.2).
TOKEN_CONFIGURATION_CODES: Final = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "invalid_grant",
        "invalid_scope",
        "unsupported_grant_type",
        "invalid_request",
        "access_denied",
    }
)
# Renew this long before the server's expiry: a token must not die between budget and answer.
TOKEN_MARGIN: Final = 60.0
# A token without `expires_in` is kept this long (the server may still revoke it: 401 renews).
DEFAULT_TOKEN_LIFETIME: Final = 300.0

log = structlog.get_logger(__name__)


def _oauth_error(response: httpx.Response) -> str | None:
    """The RFC 6749 §5.2 `error` code of a token endpoint answer (None when absent)."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, Mapping) and isinstance(body.get("error"), str):
        return str(body["error"]).strip() or None
    return None


def classify_token(response: httpx.Response) -> None:
    """Token endpoint answers: 2xx ok; 400/401/403 → ConfigurationError (bad client id/secret,
    grant not allowed); 408/429/5xx → RetriableError; any other status → FatalError."""
    if response.is_success:
        return
    status = response.status_code
    code = _oauth_error(response)
    if status in (400, 401, 403):
        reason = code if code in TOKEN_CONFIGURATION_CODES else "rejected"
        raise ConfigurationError(
            f"loke token endpoint {status} {reason}: check the client id and secret, and that an "
            "organization admin installed the client",
            status=status,
            code=code,
        )
    try:
        http.classify(response)
    except ConnectorError as exc:
        exc.code = exc.code or code
        raise
    raise FatalError(f"loke token endpoint {status}: unexpected answer", status=status)


def classify(response: httpx.Response) -> None:
    """API answers: `connectors.http.classify` (401/403 → ConfigurationError, 408/429/5xx →
    RetriableError honouring `Retry-After`, other 4xx → FatalError)."""
    http.classify(response)


@dataclass(frozen=True, slots=True)
class Token:
    """A cached access token and the monotonic instant it must be renewed by."""

    value: str
    renew_at: float

    def __repr__(self) -> str:
        return f"Token(value=***, renew_at={self.renew_at:.0f})"


class LokeClient:
    """LOKE API calls for one organization; counts `requests` (API and token endpoint alike),
    `token_requests` and `throttled` answers. Safe to share between threads (the adapter
    fetches memberships concurrently): the token cache and the counters are locked.

    `http` is the run's injected client (its base URL is the API base URL); the token endpoint
    is called with an absolute URL built from `auth_url`. `clock` is monotonic seconds (the
    token's expiry), `sleep` what retries and the rate budget wait with.
    """

    def __init__(
        self,
        *,
        http: httpx.Client,
        organization_id: str,
        client_id: str,
        client_secret: str,
        auth_url: str,
        budget: RateBudget,
        budget_key: str,
        token_auth_method: str = "client_secret_basic",  # noqa: S107 - a method name
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        max_attempts: int = 6,
    ) -> None:
        if not organization_id:
            raise ConfigurationError("loke organization id is required")
        if not client_id or not client_secret:
            raise ConfigurationError("loke client id and client secret are required")
        if not auth_url or not auth_url.startswith(("http://", "https://")):
            raise ConfigurationError("loke auth_url must be an http(s) URL")
        if token_auth_method not in AUTH_METHODS:
            raise ConfigurationError(
                f"loke token_auth_method must be one of {', '.join(sorted(AUTH_METHODS))}"
            )
        self._http = http
        self.organization_id = organization_id
        self._client_id = client_id
        self._client_secret = client_secret
        self._token_url = auth_url.rstrip("/") + TOKEN_PATH
        self._auth_method = token_auth_method
        self._budget = budget
        self._budget_key = budget_key
        self._sleep = sleep
        self._clock = clock
        self._max_attempts = max_attempts
        self._token: Token | None = None
        self._token_lock = threading.RLock()
        self._counter_lock = threading.Lock()
        self.requests = 0
        self.token_requests = 0
        self.throttled = 0

    def __repr__(self) -> str:
        return f"LokeClient(organization_id={self.organization_id!r}, credentials=***)"

    def _count(self, *, requests: int = 0, tokens: int = 0, throttled: int = 0) -> None:
        with self._counter_lock:
            self.requests += requests
            self.token_requests += tokens
            self.throttled += throttled

    def _on_retry(self, error: RetriableError, _delay: float) -> None:
        if error.status == 429:
            self._count(throttled=1)

    def _send(
        self, send: Callable[[], httpx.Response], check: Callable[[httpx.Response], None]
    ) -> httpx.Response:
        try:
            return http.send_with_retries(
                send,
                classify=check,
                max_attempts=self._max_attempts,
                sleep=self._sleep,
                on_retry=self._on_retry,
                source=SOURCE,
            )
        except RetriableError as exc:
            if exc.status == 429:
                self._count(throttled=1)
            raise

    # -- the token -------------------------------------------------------------------------

    def _token_request(self) -> tuple[dict[str, str], dict[str, str]]:
        form = {"grant_type": "client_credentials"}
        headers = {"Accept": "application/json"}
        if self._auth_method == "client_secret_post":
            form["client_id"] = self._client_id
            form["client_secret"] = self._client_secret
        else:
            # RFC 6749 §2.3.1: form-urlencode id and secret, then base64 "id:secret".
            pair = f"{quote_plus(self._client_id)}:{quote_plus(self._client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        return form, headers

    def _fetch_token(self) -> Token:
        form, headers = self._token_request()

        def send() -> httpx.Response:
            self._count(requests=1, tokens=1)
            return self._http.post(self._token_url, data=form, headers=headers)

        response = self._send(send, classify_token)
        try:
            body = response.json()
        except ValueError as exc:
            raise FatalError("loke token endpoint: answer is not JSON") from exc
        if not isinstance(body, Mapping):
            raise FatalError("loke token endpoint: answer is not a JSON object")
        value = body.get("access_token")
        if not isinstance(value, str) or not value.strip():
            raise FatalError("loke token endpoint: no access_token in the answer")
        token_type = body.get("token_type")
        if isinstance(token_type, str) and token_type.lower() != "bearer":
            raise FatalError(f"loke token endpoint: unsupported token_type {token_type[:20]!r}")
        lifetime = _lifetime(body.get("expires_in"))
        margin = min(TOKEN_MARGIN, lifetime / 10)
        token = Token(value.strip(), self._clock() + lifetime - margin)
        log.info("loke.token.issued", organization_id=self.organization_id, expires_in=lifetime)
        return token

    def access_token(self) -> str:
        """A valid access token: the cached one until it is due for renewal, else a new one
        (one fetch at a time: threads sharing the client wait for it instead of each asking)."""
        with self._token_lock:
            if self._token is None or self._clock() >= self._token.renew_at:
                self._token = self._fetch_token()
            return self._token.value

    def invalidate_token(self, rejected: str | None = None) -> None:
        """Forget the cached token — only if it is still `rejected` (when given): a token
        another thread already renewed is not thrown away again."""
        with self._token_lock:
            if rejected is None or (self._token is not None and self._token.value == rejected):
                self._token = None

    # -- API calls -------------------------------------------------------------------------

    def get(
        self, path: str, *, params: Mapping[str, str | int] | None = None
    ) -> tuple[Any, httpx.Headers]:
        """One GET of the API (rate budget, bearer token, retries, classification) → (decoded
        JSON, response headers). A 401 renews the token once and repeats the call; a second
        401 is a `ConfigurationError`."""
        renewed = False
        while True:
            # The budget first, the token second: a wait for budget must not outlive the token.
            self._budget.acquire(self._budget_key)
            token = self.access_token()
            attempts = 0

            def send(token: str = token) -> httpx.Response:
                nonlocal attempts
                attempts += 1
                if attempts > 1:  # a retry takes its own unit (the first took one above)
                    self._budget.acquire(self._budget_key)
                self._count(requests=1)
                return self._http.get(
                    path,
                    params=params,
                    headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                )

            try:
                response = self._send(send, classify)
            except ConfigurationError as exc:
                if exc.status != 401 or renewed:
                    raise
                # The server may revoke or rotate a token before its stated expiry: one fresh
                # token, one more try; a second 401 means the client itself is not allowed.
                log.info("loke.token.rejected", organization_id=self.organization_id)
                self.invalidate_token(token)
                renewed = True
                continue
            try:
                return response.json(), response.headers
            except ValueError as exc:
                raise FatalError(f"loke {response.status_code}: answer is not JSON") from exc

    def customers_path(self) -> str:
        return f"/organizations/{quote(self.organization_id, safe='')}/customers"

    def list_customers(
        self, *, after: str | None, sort: str | None = None
    ) -> tuple[Any, str | None]:
        """`GET /organizations/{org}/customers?sort=&after=` → (items, X-Next-Page or None)."""
        params: dict[str, str | int] = {}
        if sort:
            params["sort"] = sort
        if after:
            params["after"] = after
        data, headers = self.get(self.customers_path(), params=params)
        return data, next_page(headers)

    def list_memberships(self, customer_id: str, *, after: str | None) -> tuple[Any, str | None]:
        """`GET /organizations/{org}/customers/{id}/memberships?after=` → (items, next cursor)."""
        params: dict[str, str | int] = {"after": after} if after else {}
        path = f"{self.customers_path()}/{quote(customer_id, safe='')}/memberships"
        data, headers = self.get(path, params=params)
        return data, next_page(headers)

    def get_customer(self, customer_id: str) -> Mapping[str, Any] | None:
        """`GET /organizations/{org}/customers/{id}` → the customer; None on 404."""
        try:
            data, _ = self.get(f"{self.customers_path()}/{quote(customer_id, safe='')}")
        except FatalError as exc:
            if exc.status == 404:
                return None
            raise
        if not isinstance(data, Mapping):
            raise FatalError("loke answer: the customer is not a JSON object")
        return data


def next_page(headers: httpx.Headers) -> str | None:
    """The `X-Next-Page` cursor of an answer (None when absent or blank: the last page)."""
    value = headers.get(NEXT_PAGE_HEADER)
    if value is None:
        return None
    return value.strip() or None


def _lifetime(value: Any) -> float:
    """`expires_in` seconds (a number or a numeric string); a default when absent or nonsense."""
    if isinstance(value, bool):
        return DEFAULT_TOKEN_LIFETIME
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return DEFAULT_TOKEN_LIFETIME
    if isinstance(value, int | float) and value > 0 and value < 10 * 365 * 86400:
        return float(value)
    return DEFAULT_TOKEN_LIFETIME
