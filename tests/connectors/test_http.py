"""connectors.http: the client factory, the one classifier, and retries with backoff and jitter."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Iterable

import httpx
import pytest

from connectors.errors import ConfigurationError, FatalError, RetriableError
from connectors.http import classify, make_client, parse_retry_after, send_with_retries

TOKEN = "shpat_super_secret_token"


def answer(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    request = httpx.Request(
        "POST",
        "https://shop.example/admin/api/2025-01/graphql.json?access_token=" + TOKEN,
        headers={"X-Shopify-Access-Token": TOKEN, "Authorization": f"Bearer {TOKEN}"},
    )
    return httpx.Response(status, headers=headers, request=request, text=f"token {TOKEN}")


def classified(status: int, headers: dict[str, str] | None = None) -> Exception | None:
    try:
        classify(answer(status, headers))
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever was raised
        return exc
    return None


# --- classify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_classify_accepts_2xx(status: int) -> None:
    assert classified(status) is None


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_classify_retriable(status: int) -> None:
    error = classified(status)
    assert type(error) is RetriableError
    assert error.status == status
    assert error.retry_after is None  # the server didn't say


@pytest.mark.parametrize("status", [401, 403])
def test_classify_configuration(status: int) -> None:
    error = classified(status)
    assert type(error) is ConfigurationError
    assert error.status == status


@pytest.mark.parametrize("status", [400, 402, 404, 405, 409, 410, 422, 451, 301, 302, 304, 101])
def test_classify_fatal_for_other_statuses(status: int) -> None:
    error = classified(status)
    assert type(error) is FatalError
    assert error.status == status


@pytest.mark.parametrize("status", [401, 404, 429, 503])
def test_classify_message_names_status_never_token(status: int) -> None:
    error = classified(status)
    assert error is not None
    assert str(status) in str(error)
    assert "/admin/api/2025-01/graphql.json" in str(error)
    assert TOKEN not in str(error)
    assert TOKEN not in repr(error.args)


def test_classify_without_request_still_names_status() -> None:
    with pytest.raises(FatalError, match="HTTP 404"):
        classify(httpx.Response(404))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": " 2.5 "}, 2.5),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "-3"}, 0.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250.5"}, 0.2505),
        ({"retry-after-ms": "1500", "Retry-After": "30"}, 1.5),  # the precise one wins
        ({"retry-after-ms": "soon", "Retry-After": "30"}, 30.0),  # garbage falls back
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a past date: now
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "nan"}, None),
        ({}, None),
    ],
)
def test_classify_parses_retry_after(headers: dict[str, str], expected: float | None) -> None:
    error = classified(429, headers)
    assert isinstance(error, RetriableError)
    assert error.retry_after == expected


def test_classify_parses_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    error = classified(503, {"Retry-After": when})
    assert isinstance(error, RetriableError)
    assert error.retry_after is not None
    assert 115 <= error.retry_after <= 121


def test_parse_retry_after_http_date_against_given_now() -> None:
    headers = httpx.Headers({"Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT"})
    now = email.utils.parsedate_to_datetime("Sun, 06 Nov 1994 08:49:00 GMT").timestamp()
    assert parse_retry_after(headers, now=now) == 37.0


# --- make_client ------------------------------------------------------------------------------


class TokenAuth(httpx.Auth):
    def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        request.headers["X-Token"] = TOKEN
        yield request


def test_make_client_explicit_timeouts_headers_auth_transport() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    client = make_client(
        base_url="https://api.example/v2/",
        headers={"Square-Version": "2025-01-23"},
        auth=TokenAuth(),
        timeout=45.0,
        transport=httpx.MockTransport(handle),
    )
    with client:
        assert client.timeout == httpx.Timeout(45.0, connect=10.0)
        response = client.post("customers/search", json={})
    assert response.json() == {"ok": True}
    assert str(seen[0].url) == "https://api.example/v2/customers/search"
    assert seen[0].headers["Square-Version"] == "2025-01-23"
    assert seen[0].headers["X-Token"] == TOKEN


def test_make_client_short_timeout_bounds_connect_too() -> None:
    with make_client(base_url="http://127.0.0.1:1", timeout=2.0) as client:
        assert client.timeout == httpx.Timeout(2.0, connect=2.0)
        assert client.timeout.read == 2.0


# --- send_with_retries ------------------------------------------------------------------------


Step = httpx.Response | Exception


class Script:
    """`send()` that plays a scripted sequence of answers/exceptions and counts calls."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps = list(steps)
        self.calls = 0

    def __call__(self) -> httpx.Response:
        step = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        if isinstance(step, Exception):
            raise step
        return step


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def run(
    steps: Iterable[Step], **kwargs: object
) -> tuple[httpx.Response | Exception, Script, Sleeps]:
    script, sleeps = Script(steps), Sleeps()
    try:
        result: httpx.Response | Exception = send_with_retries(
            script,
            sleep=sleeps,
            **kwargs,  # type: ignore[arg-type]
        )
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever was raised
        result = exc
    return result, script, sleeps


def test_success_first_time_never_sleeps() -> None:
    result, script, sleeps = run([answer(200)])
    assert isinstance(result, httpx.Response)
    assert result.status_code == 200
    assert (script.calls, sleeps) == (1, [])


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retries_retriable_statuses_then_succeeds(status: int) -> None:
    result, script, sleeps = run([answer(status), answer(status), answer(200)])
    assert isinstance(result, httpx.Response)
    assert result.status_code == 200
    assert script.calls == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize(
    "error",
    [
        httpx.ReadTimeout("read timed out"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.PoolTimeout("pool"),
        httpx.ConnectError("connection refused"),
        httpx.RemoteProtocolError("peer closed connection"),
        httpx.ReadError("reset by peer"),
    ],
)
def test_retries_timeouts_and_transport_errors(error: Exception) -> None:
    result, script, sleeps = run([error, error, answer(200)])
    assert isinstance(result, httpx.Response)
    assert script.calls == 3
    assert len(sleeps) == 2


def test_transport_errors_exhausted_become_retriable_with_cause() -> None:
    timeout = httpx.ReadTimeout("read timed out")
    result, script, sleeps = run([timeout], max_attempts=3)
    assert type(result) is RetriableError
    assert result.__cause__ is timeout
    assert "ReadTimeout" in str(result)
    assert (script.calls, len(sleeps)) == (3, 2)


def test_wait_honours_retry_after() -> None:
    _, _, sleeps = run(
        [answer(429, {"Retry-After": "5"}), answer(503, {"retry-after-ms": "2500"}), answer(200)],
        base_delay=0.01,
        max_delay=0.05,
    )
    assert len(sleeps) == 2
    assert 5.0 <= sleeps[0] <= 5.05
    assert 2.5 <= sleeps[1] <= 2.55


def test_retry_after_above_max_delay_is_still_honoured() -> None:
    _, _, sleeps = run([answer(429, {"Retry-After": "120"}), answer(200)], max_delay=1.0)
    assert sleeps == [120.0]


def test_backoff_is_capped_exponential_and_jittered() -> None:
    result, script, sleeps = run([answer(500)], max_attempts=30, base_delay=1.0, max_delay=8.0)
    assert type(result) is RetriableError
    assert script.calls == 30
    assert len(sleeps) == 29
    for n, wait in enumerate(sleeps, start=1):
        assert 0.0 <= wait <= min(8.0, 2.0 ** (n - 1))  # full jitter under a capped ceiling
    assert len(set(sleeps)) > 20  # jittered: not one fixed schedule
    assert max(sleeps[5:]) > 4.0  # the window really widens up to the cap


def test_backoff_cap_applies_from_the_start() -> None:
    _, _, sleeps = run([answer(502)], max_attempts=10, base_delay=100.0, max_delay=0.25)
    assert len(sleeps) == 9
    assert all(0.0 <= wait <= 0.25 for wait in sleeps)


def test_stops_at_max_attempts_reraising_last_retriable_error() -> None:
    steps = [answer(500), answer(502), answer(503, {"Retry-After": "1"})]
    result, script, sleeps = run(steps, max_attempts=3)
    assert type(result) is RetriableError
    assert result.status == 503
    assert result.retry_after == 1.0
    assert (script.calls, len(sleeps)) == (3, 2)


def test_max_attempts_one_means_no_retry() -> None:
    result, script, sleeps = run([answer(500), answer(200)], max_attempts=1)
    assert type(result) is RetriableError
    assert (script.calls, sleeps) == (1, [])


def test_max_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        send_with_retries(lambda: answer(200), max_attempts=0)


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(401, ConfigurationError), (403, ConfigurationError), (400, FatalError), (404, FatalError)],
)
def test_never_retries_configuration_or_fatal(status: int, error_type: type[Exception]) -> None:
    result, script, sleeps = run([answer(status), answer(200)])
    assert type(result) is error_type
    assert (script.calls, sleeps) == (1, [])


def test_unsupported_protocol_is_configuration_not_retried() -> None:
    result, script, sleeps = run([httpx.UnsupportedProtocol("no scheme"), answer(200)])
    assert type(result) is ConfigurationError
    assert (script.calls, sleeps) == (1, [])


def test_never_retries_arbitrary_exceptions() -> None:
    boom = ValueError("a bug, not the network")
    result, script, sleeps = run([boom, answer(200)])
    assert result is boom
    assert (script.calls, sleeps) == (1, [])


def test_custom_classify_can_make_a_200_retriable() -> None:
    """Shopify's THROTTLED arrives with 200: the source's classifier says so, retries follow."""

    def throttled_aware(response: httpx.Response) -> None:
        classify(response)
        if response.headers.get("X-Throttled") == "1":
            raise RetriableError("THROTTLED", code="THROTTLED", retry_after=3.0)

    result, script, sleeps = run(
        [answer(200, {"X-Throttled": "1"}), answer(200)], classify=throttled_aware
    )
    assert isinstance(result, httpx.Response)
    assert "X-Throttled" not in result.headers
    assert script.calls == 2
    assert len(sleeps) == 1
    assert sleeps[0] >= 3.0


def test_on_retry_sees_each_error_and_its_wait() -> None:
    seen: list[tuple[RetriableError, float]] = []
    _, _, sleeps = run(
        [answer(429, {"Retry-After": "2"}), httpx.ReadTimeout("slow"), answer(200)],
        on_retry=lambda error, wait: seen.append((error, wait)),
    )
    assert [wait for _, wait in seen] == sleeps
    assert seen[0][0].status == 429
    assert seen[0][1] >= 2.0
    assert "ReadTimeout" in str(seen[1][0])


def test_end_to_end_through_make_client_and_mock_transport() -> None:
    statuses = iter([503, 429, 200])

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(statuses), headers={"Retry-After": "0"}, json={"n": 1})

    sleeps = Sleeps()
    with make_client(base_url="https://api.example", transport=httpx.MockTransport(handle)) as c:
        send: Callable[[], httpx.Response] = lambda: c.get("/v2/customers")  # noqa: E731
        response = send_with_retries(send, sleep=sleeps, base_delay=0.001)
    assert response.json() == {"n": 1}
    assert len(sleeps) == 2
