"""Shared HTTP machinery of every connector: client construction, one classifier, retries.

- `make_client` builds the injected `httpx.Client` with explicit timeouts (never httpx's default).
- `classify` is the ONE place that turns a status code into the error taxonomy of
  `connectors.errors`; source clients wrap it when their envelope says more (Shopify THROTTLED
  with 200, Square `errors[].code`).
- `send_with_retries` retries `RetriableError` only — never `Exception`, never 401/403/400 —
  waiting at least what the server asked for (`Retry-After`) and otherwise an exponential backoff
  with full jitter, so N workers that failed together don't come back together.
- `observers` is the one observability hook: each callable gets `(source, status_class,
  throttled)` once per HTTP attempt made through `send_with_retries` (retries included), so the
  worker can count upstream requests and throttles without `connectors/` importing it.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import time
from collections.abc import Callable, Mapping

import httpx
import structlog
import tenacity

from connectors.errors import ConfigurationError, FatalError, RetriableError

log = structlog.get_logger(__name__)

RETRIABLE_STATUSES = frozenset({408, 429})
CONFIGURATION_STATUSES = frozenset({401, 403})

UpstreamObserver = Callable[[str, str, bool], None]
"""`(source, status_class, throttled)`: `status_class` is `2xx`…`5xx`, or `error` when no answer
came (timeout, connection error); `throttled` is True for a 429 or a THROTTLED envelope."""

observers: list[UpstreamObserver] = []
"""Called after every attempt of `send_with_retries`, in order; registered once at start-up
(e.g. `worker.metrics.install_upstream_observer`). An observer that raises is logged and
skipped: it never fails or retries a request."""


def status_class(status: int) -> str:
    """`2xx`, `4xx`, … for an HTTP status (`error` outside 100 to 599)."""
    return f"{status // 100}xx" if 100 <= status < 600 else "error"


def notify_observers(source: str, status: str, *, throttled: bool) -> None:
    """Tell every registered observer about one attempt (see `observers`)."""
    for observer in tuple(observers):
        try:
            observer(source, status, throttled)
        except Exception as exc:  # noqa: BLE001 - observability must never break a request
            log.warning("upstream.observer_failed", source=source, error_type=type(exc).__name__)


def make_client(
    *,
    base_url: str,
    headers: Mapping[str, str] | None = None,
    auth: httpx.Auth | None = None,
    timeout: float = 30.0,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """An `httpx.Client` for one foreign API; `transport` is the test seam (`MockTransport`)."""
    return httpx.Client(
        base_url=base_url,
        headers=dict(headers or {}),
        auth=auth,
        timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
        transport=transport,
    )


def parse_retry_after(headers: httpx.Headers, *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, or None when it didn't say (or said nonsense).

    `retry-after-ms` (milliseconds, more precise) wins over `Retry-After`, which is either
    delta-seconds or an HTTP-date (RFC 9110 §10.2.3). A date in the past means "now" (0).
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis.strip())
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value / 1000.0)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            return None
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" zone: RFC 5322 says UTC with unknown local offset
        when = when.replace(tzinfo=dt.UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _describe(response: httpx.Response) -> str:
    """`HTTP 503 Service Unavailable (POST /admin/api/…/graphql.json)` — never headers or query.

    Tokens travel in headers (and, for some APIs, in query strings), so neither is ever part of
    a message that may end up in logs or in the connection's "needs attention" note.
    """
    text = f"HTTP {response.status_code}"
    if response.reason_phrase:
        text += f" {response.reason_phrase}"
    try:
        request = response.request
    except RuntimeError:  # a Response built by hand, without a request
        return text
    return f"{text} ({request.method} {request.url.path})"


def classify(response: httpx.Response) -> None:
    """Return for 2xx; otherwise raise the error class the status calls for.

    408/429/5xx → `RetriableError` (with `retry_after` from the headers); 401/403 →
    `ConfigurationError` (stop, mark the connection, don't retry); any other status → `FatalError`.
    """
    status = response.status_code
    if 200 <= status < 300:
        return
    message = _describe(response)
    if status in RETRIABLE_STATUSES or 500 <= status < 600:
        raise RetriableError(
            message, status=status, retry_after=parse_retry_after(response.headers)
        )
    if status in CONFIGURATION_STATUSES:
        raise ConfigurationError(message, status=status)
    raise FatalError(message, status=status)


def _transport_error(exc: httpx.TransportError) -> RetriableError | ConfigurationError:
    kind = type(exc).__name__
    if isinstance(exc, httpx.UnsupportedProtocol):
        # A base URL without http(s):// never works however often it is retried.
        return ConfigurationError(f"{kind}: the API base URL has no supported scheme")
    detail = str(exc)[:200]
    return RetriableError(f"{kind}: {detail}" if detail else kind)


def send_with_retries(
    send: Callable[[], httpx.Response],
    *,
    classify: Callable[[httpx.Response], None] = classify,
    max_attempts: int = 6,
    base_delay: float = 0.5,
    max_delay: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[RetriableError, float], None] | None = None,
    source: str = "unknown",
) -> httpx.Response:
    """Call `send()` until `classify` accepts the answer or a non-retriable error occurs.

    Timeouts and transport errors count as `RetriableError`. Before retry n (1-based) the wait is
    `max(retry_after, uniform(0, min(max_delay, base_delay * 2**(n-1))))`: the server's own
    figure is honoured as given, the backoff is capped. After `max_attempts` calls the last
    `RetriableError` is re-raised; `ConfigurationError`/`FatalError` propagate at once.
    `on_retry(error, wait)` is called before each sleep (logging, `throttled` counters).
    Every attempt is reported to `observers` under `source` (a bounded name: `shopify`, …).
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    backoff = tenacity.wait_random_exponential(multiplier=base_delay, max=max_delay)

    def attempt() -> httpx.Response:
        try:
            response = send()
        except httpx.TransportError as exc:  # includes every httpx.TimeoutException
            if observers:
                notify_observers(source, "error", throttled=False)
            raise _transport_error(exc) from exc
        throttled = False
        try:
            classify(response)
        except RetriableError as exc:
            throttled = exc.status == 429 or exc.code == "THROTTLED"
            raise
        finally:
            if observers:
                notify_observers(source, status_class(response.status_code), throttled=throttled)
        return response

    def wait(state: tenacity.RetryCallState) -> float:
        jittered = backoff(state)
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = error.retry_after if isinstance(error, RetriableError) else None
        return max(retry_after or 0.0, jittered)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is None or state.outcome is None or state.next_action is None:
            return
        error = state.outcome.exception()
        if isinstance(error, RetriableError):
            on_retry(error, state.next_action.sleep)

    retrying = tenacity.Retrying(
        sleep=sleep,
        stop=tenacity.stop_after_attempt(max_attempts),
        wait=wait,
        retry=tenacity.retry_if_exception_type(RetriableError),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(attempt)
