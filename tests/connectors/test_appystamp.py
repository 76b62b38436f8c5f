"""Appy Stamp connector without a database: client classification, paging, mapping."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from connectors.appystamp import mapping
from connectors.appystamp.client import AppyStampClient, classify, rate_limit_wait, unwrap
from connectors.appystamp.paginate import fetch_activities, iter_customer_pages, next_cursor
from connectors.errors import ConfigurationError, FatalError, RetriableError
from connectors.ratelimit import LocalBudget
from models.ingest import EXCLUDED_ATTRIBUTE
from tests.fakes.appystamp import API_KEY, API_SECRET, BASE_URL, FakeAppyStamp, encode_cursor
from tests.fakes.shopify import FakeClock


def make_client(
    fake: FakeAppyStamp, clock: FakeClock | None = None, *, secret: str = API_SECRET
) -> AppyStampClient:
    clock = clock or FakeClock()
    return AppyStampClient(
        http=httpx.Client(base_url=BASE_URL, transport=httpx.MockTransport(fake.handle)),
        api_key=API_KEY,
        api_secret=secret,
        budget=LocalBudget(capacity=100, refill_per_second=100, clock=clock, sleep=clock.sleep),
        budget_key="appystamp:test",
        sleep=clock.sleep,
    )


def answer(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    request = httpx.Request("GET", f"{BASE_URL}/customers")
    return httpx.Response(status, json=body, headers=headers, request=request)


def err(code: str) -> dict[str, Any]:
    return {"success": False, "error": {"code": code, "message": "x"}, "timestamp": "t"}


# --- classification ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["API_ACCESS_DISABLED", "PLAN_UPGRADE_REQUIRED"])
@pytest.mark.parametrize("status", [400, 402, 403])
def test_access_and_plan_codes_are_configuration_errors(status: int, code: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        classify(answer(status, err(code)))
    assert info.value.code == code


def test_customer_not_found_is_fatal_with_its_code() -> None:
    with pytest.raises(FatalError) as info:
        classify(answer(404, err("CUSTOMER_NOT_FOUND")))
    assert (info.value.status, info.value.code) == (404, "CUSTOMER_NOT_FOUND")
    assert not isinstance(info.value, ConfigurationError)


@pytest.mark.parametrize("status", [401, 403])
def test_bad_credentials_are_configuration_errors(status: int) -> None:
    with pytest.raises(ConfigurationError):
        classify(answer(status, err("UNAUTHORIZED")))


def test_rate_limit_honours_retry_after() -> None:
    with pytest.raises(RetriableError) as info:
        classify(answer(429, err("RATE_LIMITED"), {"Retry-After": "7"}))
    assert info.value.retry_after == 7.0


def test_rate_limit_reset_header_epoch_and_delta() -> None:
    now = time.time()
    epoch = httpx.Headers({"X-RateLimit-Reset": str(int(now) + 12)})
    assert rate_limit_wait(epoch, now=int(now)) == 12.0
    assert rate_limit_wait(httpx.Headers({"X-RateLimit-Reset": "3"})) == 3.0
    assert rate_limit_wait(httpx.Headers({"X-RateLimit-Reset": "soon"})) is None
    assert rate_limit_wait(httpx.Headers({})) is None
    # A rate-limit code on another status is still a retry.
    with pytest.raises(RetriableError) as info:
        classify(answer(400, err("RATE_LIMIT_EXCEEDED"), {"X-RateLimit-Reset": "2"}))
    assert info.value.retry_after == 2.0


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_retriable(status: int) -> None:
    with pytest.raises(RetriableError):
        classify(answer(status, err("INTERNAL_ERROR")))


def test_other_client_errors_are_fatal() -> None:
    with pytest.raises(FatalError):
        classify(answer(400, err("VALIDATION_ERROR")))


def test_envelope_unwrap() -> None:
    data, meta = unwrap(answer(200, {"success": True, "data": [1], "meta": {"a": 1}}))
    assert (data, dict(meta)) == ([1], {"a": 1})
    with pytest.raises(FatalError):
        unwrap(answer(200, {"success": False, "error": {"code": "X"}}))
    with pytest.raises(ConfigurationError):
        unwrap(answer(200, err("API_ACCESS_DISABLED")))
    with pytest.raises(FatalError):
        unwrap(answer(200, {"success": True}))
    with pytest.raises(FatalError):
        unwrap(answer(200, [1, 2]))


def test_client_retries_timeouts_and_5xx_then_succeeds() -> None:
    fake = FakeAppyStamp()
    fake.generate(3)
    fake.fail_next(2, 503)
    fake.timeout_next(1)
    client = make_client(fake)
    pages = list(iter_customer_pages(client))
    assert [len(p.records) for p in pages] == [3]
    assert client.requests == 4
    assert fake.faults == 3


def test_client_honours_rate_limit_waits() -> None:
    fake = FakeAppyStamp()
    fake.generate(2)
    fake.throttle_next(1, 5.0)
    fake.throttle_next(1, 9.0, header="reset")
    clock = FakeClock()
    client = make_client(fake, clock)
    (page,) = iter_customer_pages(client)
    assert len(page.records) == 2
    assert client.throttled == 2
    assert page.throttled == 2
    waits = [s for s in clock.sleeps if s >= 1]
    assert waits[0] >= 5.0
    assert waits[1] >= 7.0


def test_wrong_secret_and_disabled_access_are_not_retried() -> None:
    fake = FakeAppyStamp()
    fake.generate(1)
    client = make_client(fake, secret="wrong")
    with pytest.raises(ConfigurationError):
        list(iter_customer_pages(client))
    assert fake.requests == 1
    fake.access_disabled = True
    good = make_client(fake)
    with pytest.raises(ConfigurationError) as info:
        list(iter_customer_pages(good))
    assert info.value.code == "API_ACCESS_DISABLED"
    assert fake.requests == 2


def test_credentials_are_required_and_never_shown() -> None:
    with pytest.raises(ConfigurationError):
        make_client(FakeAppyStamp(), secret="")
    assert API_SECRET not in repr(make_client(FakeAppyStamp()))


# --- paging -----------------------------------------------------------------------------------


def test_pages_follow_next_cursor_and_resume() -> None:
    fake = FakeAppyStamp()
    ids = fake.generate(25)
    client = make_client(fake)
    pages = list(iter_customer_pages(client, page_size=10))
    assert [len(p.records) for p in pages] == [10, 10, 5]
    assert [r.external_id for p in pages for r in p.records] == ids
    assert pages[0].cursor == encode_cursor(ids[9])
    assert pages[-1].cursor is None
    assert fake.cursors == [None, encode_cursor(ids[9]), encode_cursor(ids[19])]
    resumed = list(iter_customer_pages(client, cursor=pages[0].cursor, page_size=10))
    assert [r.external_id for p in resumed for r in p.records] == ids[10:]
    with pytest.raises(ValueError):
        list(iter_customer_pages(client, page_size=1001))


def test_a_repeated_cursor_is_a_loop() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        meta = {"pagination": {"hasNext": True, "nextCursor": "same"}}
        return httpx.Response(200, json={"success": True, "data": [], "meta": meta})

    clock = FakeClock()
    client = AppyStampClient(
        http=httpx.Client(base_url=BASE_URL, transport=httpx.MockTransport(handler)),
        api_key="k",
        api_secret="s",
        budget=LocalBudget(capacity=10, refill_per_second=10, clock=clock, sleep=clock.sleep),
        budget_key="k",
        sleep=clock.sleep,
    )
    with pytest.raises(FatalError, match="loop"):
        list(iter_customer_pages(client))


def test_next_cursor_rules() -> None:
    assert next_cursor([], {}) == ([], None)
    assert next_cursor([1], {"pagination": {"hasNext": False, "nextCursor": "x"}}) == ([1], None)
    assert next_cursor([], {"pagination": {"hasNext": True, "nextCursor": "c"}}) == ([], "c")
    with pytest.raises(FatalError):
        next_cursor([], {"pagination": {"hasNext": True, "nextCursor": None}})
    with pytest.raises(FatalError):
        next_cursor({"a": 1}, {})


def test_bad_records_are_skipped_not_fatal() -> None:
    fake = FakeAppyStamp()
    fake.generate(2)
    fake.add_raw({"firstName": "No id"})
    fake.add_raw("not an object")
    fake.add_raw({"id": "1", "stampBalance": "lots"})
    fake.generate(1)
    (page,) = list(iter_customer_pages(make_client(fake)))
    assert len(page.records) == 3
    assert page.skipped == 3


def test_activities_are_paged_and_mapped() -> None:
    fake = FakeAppyStamp()
    cid = fake.add_customer(email="a@example.com", activities=tuple(range(1, 251)))
    client = make_client(fake)
    activities = fetch_activities(client, cid, page_size=100)
    assert [a.stamp_change for a in activities] == list(range(1, 251))
    assert fake.activity_requests == 3
    with pytest.raises(FatalError) as info:
        fetch_activities(client, "404404")
    assert info.value.code == "CUSTOMER_NOT_FOUND"
    fake.activities_enabled = False
    with pytest.raises(ConfigurationError) as plan:
        fetch_activities(client, cid)
    assert plan.value.code == "PLAN_UPGRADE_REQUIRED"


# --- mapping ----------------------------------------------------------------------------------


def test_seed_customer_maps() -> None:
    record = mapping.map_customer(
        {
            "id": "6677889900",
            "firstName": "Ada",
            "lastName": "Lovelace",
            "email": "ada@example.com",
            "stampBalance": 35,
            "cards": 1,
            "stampsToNextReward": 5,
            "vipTierId": 3,
            "vipTierName": "Gold",
            "dateOfBirth": "09-04",
            "state": "active",
        }
    )
    assert record.source == "appystamp"
    assert record.external_id == "6677889900"
    assert (record.first_name, record.last_name, record.email) == (
        "Ada",
        "Lovelace",
        "ada@example.com",
    )
    assert record.birthday == "--04-09"  # dd-mm: 9 April
    assert dict(record.attributes) == {
        "stamp_balance": 35,
        "completed_cards": 1,
        "stamps_to_next_reward": 5,
        "vip_tier_id": 3,
        "vip_tier_name": "Gold",
        "state": "active",
        EXCLUDED_ATTRIBUTE: False,
    }
    assert record.merged_into is None
    assert not record.deleted
    assert mapping.stamp_balance(record) == 35


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("09-04", "--04-09"),
        ("31-12", "--12-31"),
        ("1-2", "--02-01"),
        ("29-02", "--02-29"),
        ("31-04", None),
        ("04-13", None),
        ("2024-01-01", None),
        ("", None),
        (None, None),
    ],
)
def test_day_month_birthday(value: str | None, expected: str | None) -> None:
    assert mapping.map_birthday(value) == expected


def test_states_merges_and_reserved_key() -> None:
    assert mapping.EXCLUDED_ATTRIBUTE == EXCLUDED_ATTRIBUTE
    removed = mapping.map_customer({"id": 5, "state": "removed"})
    assert removed.external_id == "5"
    assert removed.attributes[EXCLUDED_ATTRIBUTE] is True
    assert mapping.map_customer({"id": "5", "state": "excluded"}).attributes[EXCLUDED_ATTRIBUTE]
    assert EXCLUDED_ATTRIBUTE not in mapping.map_customer({"id": "5", "state": "paused"}).attributes
    merged = mapping.map_customer({"id": "5", "mergedIntoCustomerId": "7"})
    assert merged.merged_into == "7"
    assert merged.deleted is True
    assert mapping.map_customer({"id": "5", "mergedIntoCustomerId": "5"}).merged_into is None


@pytest.mark.parametrize(
    "item",
    [{}, {"id": ""}, {"id": True}, {"id": "1", "email": 5}, {"id": "1", "cards": 1.5}],
)
def test_invalid_customers_are_skippable(item: dict[str, Any]) -> None:
    from connectors.errors import SkippableRecord

    with pytest.raises(SkippableRecord):
        mapping.map_customer(item)


def test_activity_mapping() -> None:
    from connectors.errors import SkippableRecord

    activity = mapping.map_activity({"id": 9, "stampChange": -3, "type": "redeem"})
    assert (activity.id, activity.stamp_change) == ("9", -3)
    assert activity.details() == {"source": "appystamp", "activity_id": "9", "type": "redeem"}
    for bad in ({"stampChange": 1}, {"id": "1"}, {"id": "1", "stampChange": "2"}):
        with pytest.raises(SkippableRecord):
            mapping.map_activity(bad)
