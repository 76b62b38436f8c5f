"""LOKE connector without a database: OAuth2 token handling, errors, paging, mapping."""

from __future__ import annotations

import base64
import datetime as dt
import logging
from typing import Any

import httpx
import pytest
import structlog
from structlog.testing import capture_logs

from connectors.errors import ConfigurationError, FatalError, RetriableError
from connectors.loke import client as client_module
from connectors.loke import mapping
from connectors.loke.client import LokeClient, classify_token, next_page
from connectors.loke.paginate import fetch_memberships, iter_customer_pages
from connectors.ratelimit import LocalBudget
from tests.fakes.loke import (
    AUTH_URL,
    BASE_URL,
    CLIENT_ID,
    CLIENT_SECRET,
    ORGANIZATION_ID,
    FakeLoke,
)
from tests.fakes.shopify import FakeClock


def make_client(
    fake: FakeLoke,
    clock: FakeClock | None = None,
    *,
    secret: str = CLIENT_SECRET,
    method: str = "client_secret_basic",
    transport: httpx.BaseTransport | None = None,
) -> LokeClient:
    clock = clock or FakeClock()
    return LokeClient(
        http=httpx.Client(
            base_url=BASE_URL, transport=transport or httpx.MockTransport(fake.handle)
        ),
        organization_id=ORGANIZATION_ID,
        client_id=CLIENT_ID,
        client_secret=secret,
        auth_url=AUTH_URL,
        token_auth_method=method,
        budget=LocalBudget(capacity=100, refill_per_second=100, clock=clock, sleep=clock.sleep),
        budget_key="loke:test",
        sleep=clock.sleep,
        clock=clock,
    )


@pytest.fixture(autouse=True)
def _fresh_loggers(monkeypatch: pytest.MonkeyPatch) -> None:
    structlog.reset_defaults()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    monkeypatch.setattr(client_module, "log", structlog.get_logger(client_module.__name__))


# --- the token ------------------------------------------------------------------------------


def test_token_is_fetched_once_and_cached_until_it_expires() -> None:
    clock = FakeClock()
    fake = FakeLoke(clock=clock, token_lifetime=3600, page_size=5)
    fake.generate(3)
    client = make_client(fake, clock)

    for _ in range(4):
        client.list_customers(after=None)
    assert fake.token_requests == 1
    assert fake.list_requests == 4
    assert fake.auth_methods == ["basic"]

    # Renewed before the server's expiry (margin 60 s): never a request with a dead token.
    clock.now += 3600 - 61
    client.list_customers(after=None)
    assert fake.token_requests == 1
    clock.now += 2
    client.list_customers(after=None)
    assert fake.token_requests == 2
    assert fake.unauthorized == 0
    assert client.token_requests == 2
    assert client.requests == 2 + 6


def test_basic_auth_form_urlencodes_the_client_credentials() -> None:
    clock = FakeClock()
    secret = "s:e/c r+t%"
    fake = FakeLoke(clock=clock, client_secret=secret)
    seen: list[str] = []

    def spy(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            seen.append(request.headers["Authorization"])
            assert b"client_secret" not in request.content
            assert request.content == b"grant_type=client_credentials"
        return fake.handle(request)

    client = make_client(fake, clock, secret=secret, transport=httpx.MockTransport(spy))
    client.list_customers(after=None)
    (header,) = seen
    assert base64.b64decode(header[6:]).decode() == f"{CLIENT_ID}:s%3Ae%2Fc+r%2Bt%25"
    assert fake.token_requests == 1


def test_client_secret_post_sends_the_credentials_in_the_form() -> None:
    fake = FakeLoke()
    client = make_client(fake, method="client_secret_post")
    client.list_customers(after=None)
    assert fake.auth_methods == ["post"]


def test_a_401_renews_the_token_once_and_repeats_the_call() -> None:
    clock = FakeClock()
    fake = FakeLoke(clock=clock)
    fake.generate(2)
    client = make_client(fake, clock)
    client.list_customers(after=None)
    fake.revoke_tokens()  # revoked before its stated expiry

    data, _ = client.list_customers(after=None)

    assert len(data) == 2
    assert fake.token_requests == 2
    assert fake.unauthorized == 1


def test_threads_sharing_a_client_renew_a_revoked_token_once() -> None:
    from concurrent.futures import ThreadPoolExecutor

    clock = FakeClock()
    fake = FakeLoke(clock=clock)
    ids = fake.generate(16)
    client = make_client(fake, clock)
    client.access_token()
    fake.revoke_tokens()

    with ThreadPoolExecutor(max_workers=8) as pool:
        lists = list(pool.map(lambda cid: fetch_memberships(client, cid), ids))

    assert lists == [fake.lists_of(cid) for cid in ids]
    assert fake.token_requests == 2  # the first token and ONE renewal
    assert client.requests == fake.requests


def test_a_second_401_in_a_row_is_a_configuration_error_not_retried() -> None:
    clock = FakeClock()
    fake = FakeLoke(clock=clock)
    calls: list[str] = []

    def always_401(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/token":
            return fake.handle(request)
        return httpx.Response(401, json={"message": "Unauthorized"})

    client = make_client(fake, clock, transport=httpx.MockTransport(always_401))
    with pytest.raises(ConfigurationError) as info:
        client.list_customers(after=None)
    assert info.value.status == 401
    customers = f"/organizations/{ORGANIZATION_ID}/customers"
    assert calls == ["/token", customers, "/token", customers]
    assert clock.sleeps == []


def test_bad_client_secret_is_a_configuration_error_without_retries() -> None:
    clock = FakeClock()
    fake = FakeLoke(clock=clock)
    client = make_client(fake, clock, secret="wrong")
    with pytest.raises(ConfigurationError) as info:
        client.list_customers(after=None)
    assert (info.value.status, info.value.code) == (401, "invalid_client")
    assert "wrong" not in str(info.value)
    assert fake.requests == 1
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (400, {"error": "invalid_client"}, ConfigurationError),
        (400, {"error": "unsupported_grant_type"}, ConfigurationError),
        (401, {"error": "invalid_client"}, ConfigurationError),
        (403, {}, ConfigurationError),
        (429, {}, RetriableError),
        (503, {}, RetriableError),
        (404, {}, FatalError),
    ],
)
def test_token_endpoint_classification(status: int, body: dict[str, Any], kind: type) -> None:
    request = httpx.Request("POST", f"{AUTH_URL}/token")
    with pytest.raises(kind):
        classify_token(httpx.Response(status, json=body, request=request))


def test_token_endpoint_outages_are_retried_with_retry_after() -> None:
    clock = FakeClock()
    fake = FakeLoke(clock=clock)
    fake.generate(1)
    fake.fail_token_next(2, status=503)
    client = make_client(fake, clock)
    data, _ = client.list_customers(after=None)
    assert len(data) == 1
    assert fake.token_requests == 1
    assert len(clock.sleeps) == 2


def test_token_answer_without_access_token_is_fatal() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"token_type": "Bearer"})

    client = make_client(FakeLoke(), transport=httpx.MockTransport(broken))
    with pytest.raises(FatalError, match="no access_token"):
        client.access_token()


def test_tokens_and_secrets_never_reach_logs_or_reprs() -> None:
    clock = FakeClock()
    fake = FakeLoke(clock=clock)
    fake.generate(1)
    client = make_client(fake, clock)
    with capture_logs() as logs:
        client.list_customers(after=None)
        fake.revoke_tokens()
        client.list_customers(after=None)
    token = client.access_token()
    text = repr(logs) + repr(client) + repr(client._token)
    assert token not in text
    assert CLIENT_SECRET not in text
    assert {entry["event"] for entry in logs} >= {"loke.token.issued", "loke.token.rejected"}


def test_construction_rejects_missing_configuration() -> None:
    fake = FakeLoke()
    with pytest.raises(ConfigurationError):
        make_client(fake, secret="")
    with pytest.raises(ConfigurationError):
        make_client(fake, method="private_key_jwt")


# --- API errors -------------------------------------------------------------------------------


def test_429_and_5xx_are_retried_honouring_retry_after() -> None:
    clock = FakeClock()
    fake = FakeLoke(clock=clock)
    fake.generate(2)
    client = make_client(fake, clock)
    client.access_token()
    fake.throttle_next(1, retry_after=7)
    fake.fail_next(1, status=502)
    fake.timeout_next(1)

    data, _ = client.list_customers(after=None)

    assert len(data) == 2
    assert clock.sleeps[-1] >= 7  # the 429 comes last (after the timeout and the 502)
    assert len(clock.sleeps) == 3
    assert client.throttled == 1


def test_persistent_5xx_gives_up_as_retriable() -> None:
    clock = FakeClock()
    fake = FakeLoke(clock=clock)
    client = make_client(fake, clock)
    client.access_token()
    fake.fail_next(10, status=500)
    with pytest.raises(RetriableError):
        client.list_customers(after=None)


def test_other_organization_is_a_configuration_error() -> None:
    fake = FakeLoke(organization_id="someone-else")
    with pytest.raises(ConfigurationError) as info:
        make_client(fake).list_customers(after=None)
    assert info.value.status == 403


def test_get_customer_returns_none_for_404() -> None:
    fake = FakeLoke()
    (cid,) = fake.generate(1)
    client = make_client(fake)
    assert client.get_customer(cid) == fake.customer(cid)
    assert client.get_customer("nope") is None


# --- paging -----------------------------------------------------------------------------------


def test_next_page_header() -> None:
    assert next_page(httpx.Headers({"X-Next-Page": " abc "})) == "abc"
    assert next_page(httpx.Headers({"X-Next-Page": ""})) is None
    assert next_page(httpx.Headers()) is None


def test_pages_follow_the_x_next_page_header() -> None:
    fake = FakeLoke(page_size=4)
    ids = fake.generate(10)
    client = make_client(fake)

    pages = list(iter_customer_pages(client))

    assert [len(p.records) for p in pages] == [4, 4, 2]
    assert [r.external_id for p in pages for r in p.records] == ids
    assert pages[-1].cursor is None
    assert fake.cursors == [None, pages[0].cursor, pages[1].cursor]
    assert fake.sorts == [None, None, None]
    assert sum(p.requests for p in pages) == 4  # the token + 3 pages


def test_resuming_from_a_saved_cursor_reads_only_the_rest() -> None:
    fake = FakeLoke(page_size=4)
    ids = fake.generate(10)
    first = next(iter(iter_customer_pages(make_client(fake))))
    assert first.cursor is not None

    rest = list(iter_customer_pages(make_client(fake), cursor=first.cursor))

    assert [r.external_id for p in rest for r in p.records] == ids[4:]


def test_a_rejected_saved_cursor_restarts_from_the_first_page() -> None:
    fake = FakeLoke(page_size=4)
    ids = fake.generate(6)

    pages = list(iter_customer_pages(make_client(fake), cursor="no-longer-valid"))

    assert [r.external_id for p in pages for r in p.records] == ids
    assert fake.cursors[0] is None  # the rejected request is not served; the restart is
    assert fake.list_requests == 2


def test_a_400_on_the_first_page_is_fatal() -> None:
    fake = FakeLoke()

    def bad(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return fake.handle(request)
        return httpx.Response(400, json={"message": "bad request"})

    with pytest.raises(FatalError):
        list(iter_customer_pages(make_client(fake, transport=httpx.MockTransport(bad))))


def test_incremental_runs_ask_for_sort_updated_and_read_everything() -> None:
    fake = FakeLoke(page_size=4)
    fake.generate(10)
    since = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)  # after every record

    pages = list(iter_customer_pages(make_client(fake), updated_since=since))

    # The seed does not say which way sort=updated sorts: no early stop, a full pass.
    assert sum(len(p.records) for p in pages) == 10
    assert fake.sorts == ["updated"] * 3


def test_newest_first_stops_at_the_first_page_older_than_the_window() -> None:
    fake = FakeLoke(page_size=4, updated_order="desc")
    ids = fake.generate(12)
    client = make_client(fake)
    # updatedAt is one second per change from 2024-01-01: ids[i] at i+1 seconds.
    since = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=10)

    pages = list(
        iter_customer_pages(
            client, updated_since=since, overlap=dt.timedelta(seconds=2), newest_first=True
        )
    )

    # Newest first: 12..9 s, 8..5 s, 4..1 s. The window starts at 10 - 2 = 8 s: page 2 still
    # holds the 8 s record, so the walk only ends with the last page.
    assert [len(p.records) for p in pages] == [4, 4, 4]
    assert pages[-1].cursor is None
    fake.update_customer(ids[0], firstName="Changed")  # 13 s: now the newest
    listed = fake.list_requests
    again = list(
        iter_customer_pages(
            make_client(fake),
            updated_since=dt.datetime(2024, 1, 1, 0, 0, 12, tzinfo=dt.UTC),
            newest_first=True,
        )
    )
    # Page 1 (13, 12, 11, 10 s) reaches the window; page 2 (9..6 s) is all older: stop there.
    assert [len(p.records) for p in again] == [4, 4]
    assert again[0].records[0].external_id == ids[0]
    assert again[-1].cursor is None
    assert fake.list_requests - listed == 2


def test_a_repeated_cursor_is_a_loop() -> None:
    fake = FakeLoke()

    def looping(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return fake.handle(request)
        return httpx.Response(200, json=[], headers={"X-Next-Page": "same"})

    client = make_client(fake, transport=httpx.MockTransport(looping))
    with pytest.raises(FatalError, match="loop"):
        list(iter_customer_pages(client))


def test_a_non_list_answer_is_fatal() -> None:
    fake = FakeLoke()

    def odd(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return fake.handle(request)
        return httpx.Response(200, json={"customers": []})

    with pytest.raises(FatalError, match="not a JSON array"):
        list(iter_customer_pages(make_client(fake, transport=httpx.MockTransport(odd))))


def test_invalid_records_are_skipped_and_logged() -> None:
    fake = FakeLoke()
    fake.generate(2)
    fake.add_raw({"firstName": "No id"})
    fake.add_raw("not an object")
    fake.add_raw({"id": 12345})
    with capture_logs() as logs:
        (page,) = list(iter_customer_pages(make_client(fake)))
    assert (len(page.records), page.skipped) == (2, 3)
    assert sum(1 for e in logs if e["event"] == "connector.record.skipped") == 3


def test_memberships_are_paged_by_ten() -> None:
    fake = FakeLoke()
    (many, none) = fake.generate(2, many_lists_every=2)
    fake.set_lists(none, ())
    client = make_client(fake)

    names = fetch_memberships(client, many)

    assert names == fake.lists_of(many)
    assert len(names or []) == 14
    assert fake.membership_requests == 2
    assert fetch_memberships(client, none) == []
    assert fetch_memberships(client, "gone") is None


# --- mapping ----------------------------------------------------------------------------------

SEED_CUSTOMER: dict[str, Any] = {
    "createdAt": "2021-10-20T14:51:16Z",
    "dob": "2021-10-20",
    "email": "john@example.com",
    "firstName": "John",
    "gender": "MALE",
    "hasAgreedToMarketing": True,
    "id": "01FCCGYZA9JPQ97HBSTKW0KT7P",
    "lastName": "Smith",
    "phoneNumber": "+61411222333",
    "statistics": {
        "lastPointsEarnedAt": "2021-08-23T02:06:24.000Z",
        "lastPointsRedeemedAt": "2021-03-17T04:27:06.000Z",
        "lastSpentAt": "2021-08-23T02:06:23.000Z",
        "pointsBalance": 3125,
        "totalPointsEarned": 4523,
        "totalPointsRedeemed": 1398,
        "totalSpend": 3687,
    },
    "updatedAt": "2021-10-21T18:34:45Z",
}


def test_seed_customer_maps_to_fields_and_reference_metadata() -> None:
    record = mapping.map_customer(SEED_CUSTOMER)
    assert (record.source, record.external_id) == ("loke", "01FCCGYZA9JPQ97HBSTKW0KT7P")
    assert (record.first_name, record.last_name) == ("John", "Smith")
    assert (record.email, record.phone, record.birthday) == (
        "john@example.com",
        "+61411222333",
        "2021-10-20",
    )
    assert record.source_updated_at == dt.datetime(2021, 10, 21, 18, 34, 45, tzinfo=dt.UTC)
    assert record.attributes == {
        "gender": "MALE",
        "has_agreed_to_marketing": True,
        "created_at": "2021-10-20T14:51:16Z",
        "statistics": SEED_CUSTOMER["statistics"],
        "points_balance": 3125,
    }
    assert mapping.points_balance(record) == 3125
    assert "memberships" not in record.attributes


def test_optional_and_malformed_fields_are_left_out() -> None:
    record = mapping.map_customer(
        {
            "id": " 01X ",
            "firstName": "  ",
            "lastName": "Solo",
            "dob": "2021-02-30",
            "hasAgreedToMarketing": "yes",
            "statistics": {"pointsBalance": "12", "totalSpend": 5.0, "lastSpentAt": "soon"},
            "updatedAt": "yesterday",
        }
    )
    assert record.external_id == "01X"
    assert (record.first_name, record.email, record.phone, record.birthday) == (
        None,
        None,
        None,
        None,
    )
    assert record.source_updated_at is None
    assert record.attributes == {"statistics": {"totalSpend": 5}}
    assert mapping.points_balance(record) is None


@pytest.mark.parametrize("raw", ["1999-12-31", "1900-01-01"])
def test_dob_kept(raw: str) -> None:
    assert mapping.map_dob(raw) == raw


@pytest.mark.parametrize("raw", ["0000-01-01", "31-12-1999", "1999-13-01", "", None, 19991231])
def test_dob_rejected(raw: Any) -> None:
    assert mapping.map_dob(raw) is None


@pytest.mark.parametrize("obj", [{}, {"id": ""}, {"id": 7}, {"id": "x" * 256}])
def test_records_without_a_usable_id_are_skippable(obj: dict[str, Any]) -> None:
    from connectors.errors import SkippableRecord

    with pytest.raises(SkippableRecord):
        mapping.map_customer(obj)


def test_membership_names_dedupe_and_drop_blanks() -> None:
    items = [
        {"id": "1", "name": "Loyal Customers"},
        {"id": "2", "name": "Loyal Customers"},
        {"id": "3", "name": " "},
        "junk",
        {"id": "4", "name": "VIP"},
    ]
    assert mapping.membership_names(items) == ["Loyal Customers", "VIP"]
