"""Square sync against the fake: full, incremental, resume, expired cursors, 429, faults, auth."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from itertools import islice
from typing import Any

import httpx
import pytest

from connectors.errors import (
    ConfigurationError,
    FatalError,
    InvalidCursorError,
    RetriableError,
)
from connectors.http import make_client
from connectors.ratelimit import LocalBudget
from connectors.records import Page
from connectors.square.client import SquareClient
from connectors.square.paginate import MAX_RESTARTS, iter_customer_pages
from tests.connectors.square_helpers import (
    MERCHANT,
    SQUARE_VERSION,
    FakeClock,
    NullBudget,
    ids_of,
    square_client,
)
from tests.fakes.square import DEFAULT_TOKEN, FakeSquare

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)


def full_sync(client: SquareClient, **kwargs: Any) -> list[Page]:
    return list(iter_customer_pages(client, updated_since=None, **kwargs))


def test_full_sync_reads_every_customer_once_in_ceil_n_over_100_requests() -> None:
    fake = FakeSquare()
    expected = fake.generate(1000)
    client = square_client(fake)

    pages = full_sync(client)

    assert ids_of(pages) == expected  # every record, once, in Square's order
    assert fake.requests == client.requests == math.ceil(1000 / 100) == len(pages)
    assert sum(page.requests for page in pages) == 10
    assert [page.cursor is None for page in pages] == [False] * 9 + [True]
    first, second = fake.bodies[0], fake.bodies[1]
    assert first == {"limit": 100, "query": {"sort": {"field": "DEFAULT", "order": "ASC"}}}
    assert second["cursor"] == pages[0].cursor
    assert second["query"] == first["query"]  # the same query goes with every cursor


def test_requests_carry_bearer_token_and_pinned_version() -> None:
    seen: list[httpx.Request] = []
    fake = FakeSquare()
    fake.generate(3)

    def spy(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return fake.handle(request)

    http = make_client(base_url="https://connect.squareup.test", transport=httpx.MockTransport(spy))
    budget = NullBudget()
    client = SquareClient(
        http=http,
        access_token="tok-123",
        square_version=SQUARE_VERSION,
        budget=budget,
        budget_key=MERCHANT,
    )
    fake.access_token = "tok-123"
    assert len(ids_of(full_sync(client))) == 3
    (request,) = seen
    assert request.method == "POST"
    assert request.url.path == "/v2/customers/search"
    assert request.headers["Authorization"] == "Bearer tok-123"
    assert request.headers["Square-Version"] == SQUARE_VERSION
    assert request.headers["Content-Type"] == "application/json"
    assert budget.acquired == [MERCHANT]  # one unit of the merchant's budget per request


def test_incremental_sync_picks_up_exactly_the_changed_records_plus_overlap() -> None:
    fake = FakeSquare(now=lambda: NOW)
    ids = fake.generate(500)  # updated in 2024
    watermark = NOW - dt.timedelta(hours=1)
    changed = ids[3:300:37]
    for cid in changed:
        fake.update_customer(cid, given_name="Changed")
    in_overlap = fake.add_customer(updated_at="2025-06-01T10:57:00Z", given_name="Late")["id"]
    fake.add_customer(updated_at="2025-06-01T10:54:59Z", given_name="Before overlap")
    client = square_client(fake)

    pages = list(iter_customer_pages(client, updated_since=watermark))

    assert sorted(ids_of(pages)) == sorted([*changed, in_overlap])
    assert fake.requests == 1
    assert fake.bodies[0]["query"]["filter"] == {
        "updated_at": {"start_at": "2025-06-01T10:55:00.000Z"}
    }
    records = {r.external_id: r for r in pages[0].records}
    assert {records[cid].version for cid in changed} == {1}
    assert records[changed[0]].first_name == "Changed"
    assert records[changed[0]].source_updated_at == NOW


def test_incremental_sync_needs_an_aware_watermark() -> None:
    client = square_client(FakeSquare())
    with pytest.raises(ValueError, match="aware"):
        next(iter_customer_pages(client, updated_since=dt.datetime(2025, 1, 1)))


def test_resume_from_a_saved_cursor_reads_only_the_remaining_pages() -> None:
    fake = FakeSquare()
    expected = fake.generate(1000)
    first_run = list(islice(iter_customer_pages(square_client(fake), updated_since=None), 3))
    saved = first_run[-1].cursor
    assert saved is not None
    requests_before = fake.requests

    client = square_client(fake)
    second_run = list(iter_customer_pages(client, updated_since=None, cursor=saved))

    assert fake.requests - requests_before == client.requests == 7
    assert ids_of(first_run) + ids_of(second_run) == expected


def test_expired_cursor_mid_run_restarts_the_window_and_misses_nothing() -> None:
    fake = FakeSquare()
    expected = fake.generate(1000)
    client = square_client(fake)
    pages: list[Page] = []
    for page in iter_customer_pages(client, updated_since=None):
        pages.append(page)
        if len(pages) == 4:
            fake.expire_cursors()

    assert set(ids_of(pages)) == set(expected)
    assert ids_of(pages[4:]) == expected  # the window was read again from its first page
    assert fake.invalid_cursors == client.cursor_restarts == 1
    assert fake.requests == client.requests == 4 + 1 + 10
    assert sum(page.requests for page in pages) == 15
    assert pages[4].requests == 2  # the rejected request is charged to the page after it


def test_resuming_with_a_stale_cursor_restarts_the_window() -> None:
    fake = FakeSquare(cursor_ttl_requests=2)
    expected = fake.generate(1000)
    first_run = list(islice(iter_customer_pages(square_client(fake), updated_since=None), 5))
    stale = first_run[0].cursor  # issued 5 requests ago, TTL is 2

    client = square_client(fake)
    second_run = list(iter_customer_pages(client, updated_since=None, cursor=stale))

    assert ids_of(second_run) == expected
    assert client.cursor_restarts == 1
    assert client.requests == 1 + 10


def test_a_window_whose_cursors_always_expire_gives_up() -> None:
    fake = FakeSquare(cursor_ttl_requests=0)  # every cursor is dead on arrival
    fake.generate(250)
    client = square_client(fake)
    with pytest.raises(InvalidCursorError):
        full_sync(client)
    assert client.cursor_restarts == MAX_RESTARTS
    assert fake.requests == 2 * (MAX_RESTARTS + 1)  # first page + rejected cursor, each time


def test_rate_limited_waits_the_retry_after_and_finishes() -> None:
    fake = FakeSquare()
    expected = fake.generate(250)
    fake.throttle_next(1, retry_after=7)
    sleeps: list[float] = []
    client = square_client(fake, sleep=sleeps.append)

    pages = full_sync(client)

    assert ids_of(pages) == expected
    assert 7.0 in sleeps
    assert sum(sleeps) < 7.0 + 1.0  # nothing else waited that long
    assert fake.throttled == client.throttled == 1
    assert [page.throttled for page in pages] == [1, 0, 0]
    assert [page.requests for page in pages] == [2, 1, 1]


def test_fake_rate_limit_is_respected_through_retry_after() -> None:
    clock = FakeClock()
    fake = FakeSquare(rate_limit=(2, 1.0), clock=clock)
    expected = fake.generate(1000)
    client = square_client(fake, sleep=clock.sleep)

    pages = full_sync(client)

    assert ids_of(pages) == expected
    assert fake.throttled == client.throttled > 0
    assert fake.served == 10
    # 10 requests at 1/s with a burst of 2 cannot take less than 8 s of waiting.
    assert clock.now - 1000.0 >= 8.0


def test_local_budget_keeps_the_client_under_the_limit() -> None:
    clock = FakeClock()
    fake = FakeSquare(rate_limit=(2, 1.0), clock=clock)
    expected = fake.generate(1000)
    client = SquareClient(
        http=make_client(
            base_url="https://connect.squareup.test", transport=httpx.MockTransport(fake.handle)
        ),
        access_token=DEFAULT_TOKEN,
        square_version=SQUARE_VERSION,
        budget=LocalBudget(capacity=2, refill_per_second=1.0, clock=clock, sleep=clock.sleep),
        budget_key=MERCHANT,
        sleep=clock.sleep,
    )

    assert ids_of(full_sync(client)) == expected
    assert fake.throttled == client.throttled == 0  # waited before asking, never refused
    assert fake.requests == 10


def test_injected_faults_give_the_same_records_as_a_clean_run() -> None:
    clean_fake = FakeSquare(seed=7)
    clean_fake.generate(1000)
    clean = [r for page in full_sync(square_client(clean_fake)) for r in page.records]

    faulty_fake = FakeSquare(seed=7, fault_rate=0.2)
    faulty_fake.generate(1000)
    faulty = [r for page in full_sync(square_client(faulty_fake)) for r in page.records]

    assert faulty_fake.faults > 0
    assert faulty == clean
    assert faulty_fake.requests == 10 + faulty_fake.faults


def test_5xx_and_timeouts_are_retried() -> None:
    fake = FakeSquare()
    expected = fake.generate(150)
    fake.fail_next(2, status=503)
    fake.timeout_next(1)
    client = square_client(fake)
    assert ids_of(full_sync(client)) == expected
    assert fake.requests == client.requests == 2 + 3


def test_retries_stop_after_max_attempts() -> None:
    fake = FakeSquare()
    fake.generate(10)
    fake.fail_next(10, status=500)
    client = square_client(fake, max_attempts=3)
    with pytest.raises(RetriableError):
        full_sync(client)
    assert fake.requests == 3


def test_unauthorized_is_a_configuration_error_without_retries() -> None:
    fake = FakeSquare(access_token="the-right-token")
    fake.generate(10)
    client = square_client(fake, token="wrong-secret-token-123")
    with pytest.raises(ConfigurationError) as caught:
        full_sync(client)
    assert fake.requests == fake.unauthorized == 1
    assert caught.value.status == 401
    assert caught.value.code == "UNAUTHORIZED"
    assert "wrong-secret-token-123" not in str(caught.value)
    assert "wrong-secret-token-123" not in repr(caught.value.args)


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (401, "ACCESS_TOKEN_EXPIRED", ConfigurationError),
        (401, "ACCESS_TOKEN_REVOKED", ConfigurationError),
        (403, "INSUFFICIENT_SCOPES", ConfigurationError),
        (400, "INVALID_CURSOR", InvalidCursorError),
        (400, "VALUE_TOO_HIGH", FatalError),
        (404, "NOT_FOUND", FatalError),
    ],
)
def test_square_error_codes_are_classified(status: int, code: str, error: type[Exception]) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        body = {"errors": [{"category": "X", "code": code, "detail": "nope"}]}
        return httpx.Response(status, json=body)

    client = SquareClient(
        http=make_client(base_url="https://sq.test", transport=httpx.MockTransport(handler)),
        access_token="secret-token",
        square_version=SQUARE_VERSION,
        budget=NullBudget(),
        budget_key=MERCHANT,
        sleep=lambda _s: None,
    )
    with pytest.raises(error) as caught:
        client.search_customers({"limit": 100})
    assert len(calls) == 1
    assert not isinstance(caught.value, InvalidCursorError) or code == "INVALID_CURSOR"
    assert "secret-token" not in str(caught.value)


def test_limit_outside_1_to_100_is_refused() -> None:
    fake = FakeSquare()
    client = square_client(fake)
    with pytest.raises(ValueError, match="page_size"):
        next(iter_customer_pages(client, updated_since=None, page_size=101))
    with pytest.raises(FatalError) as caught:
        client.search_customers({"limit": 101})
    assert caught.value.code == "VALUE_TOO_HIGH"
    assert not isinstance(caught.value, InvalidCursorError)


def test_pagination_loop_is_a_fatal_error() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, json={"customers": [{"id": "A"}], "cursor": "same"})

    client = SquareClient(
        http=make_client(base_url="https://sq.test", transport=httpx.MockTransport(handler)),
        access_token="t",
        square_version=SQUARE_VERSION,
        budget=NullBudget(),
        budget_key=MERCHANT,
    )
    pages: Iterator[Page] = iter_customer_pages(client, updated_since=None)
    with pytest.raises(FatalError, match="loop"):
        list(pages)
    assert len(calls) == 2


def test_records_without_id_are_skipped_not_fatal() -> None:
    fake = FakeSquare()
    fake.generate(2)
    fake.add_customer(id="", given_name="No id")
    pages = full_sync(square_client(fake))
    assert len(ids_of(pages)) == 2
    assert sum(page.skipped for page in pages) == 1


def test_fake_served_over_real_http_with_a_real_client() -> None:
    fake = FakeSquare(timeout_sleep=0.6)
    expected = fake.generate(250)
    fake.timeout_next(1)
    with fake.serve() as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        with make_client(base_url=base_url, timeout=0.3) as http:
            client = square_client(fake, http=http)
            pages = full_sync(client)
    assert ids_of(pages) == expected
    assert fake.served == 3
    assert client.requests == 4  # the timed-out request was retried
