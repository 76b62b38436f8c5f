"""Shopify connector against the behaving fake: paging, incremental windows, resume, the cost
bucket (THROTTLED as 200 and 429, a budget kept in sync), faults, auth, loops, real HTTP."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator

import httpx
import pytest

from connectors.errors import ConfigurationError, FatalError
from connectors.http import make_client
from connectors.ratelimit import LocalBudget, RateBudget
from connectors.records import Page
from connectors.shopify.client import ShopifyClient
from connectors.shopify.paginate import NODE_COST, iter_customer_pages, search_query
from tests.fakes.shopify import API_VERSION, EPOCH, TOKEN, FakeClock, FakeShopify

SHOP = "fake-shop.myshopify.com"


class NullBudget:
    """A budget that knows nothing (another process, a cold start): lets the server throttle."""

    def __init__(self) -> None:
        self.acquired: list[float] = []
        self.observed = 0

    def acquire(self, key: str, cost: float = 1.0) -> float:
        self.acquired.append(cost)
        return 0.0

    def observe(self, key: str, *, available: float, maximum: float, restore_rate: float) -> None:
        self.observed += 1


def make_shopify(
    fake: FakeShopify,
    clock: FakeClock,
    *,
    budget: RateBudget | None = None,
    token: str = TOKEN,
) -> ShopifyClient:
    http = httpx.Client(transport=httpx.MockTransport(fake.handle), base_url="https://fake")
    return ShopifyClient(
        http=http,
        shop_domain=SHOP,
        access_token=token,
        api_version=API_VERSION,
        budget=budget
        if budget is not None
        else LocalBudget(capacity=1e9, refill_per_second=1e9, clock=clock, sleep=clock.sleep),
        sleep=clock.sleep,
    )


def sync(client: ShopifyClient, **kwargs: object) -> list[Page]:
    return list(iter_customer_pages(client, **kwargs))  # type: ignore[arg-type]


def ids_of(pages: list[Page]) -> list[str]:
    return [record.external_id for page in pages for record in page.records]


def clean_run(n: int) -> list[str]:
    """What a fault-free, throttle-free sync of `n` generated customers yields."""
    clock = FakeClock()
    fake = FakeShopify(clock=clock)
    fake.generate(n)
    return ids_of(sync(make_shopify(fake, clock), updated_since=None))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.mark.parametrize("n", [1000, 1001, 249])
def test_full_sync_uses_ceil_n_over_250_requests_and_sees_everyone_once(
    clock: FakeClock, n: int
) -> None:
    fake = FakeShopify(clock=clock)
    created = fake.generate(n)
    client = make_shopify(fake, clock)

    pages = sync(client, updated_since=None)

    assert fake.requests == client.requests == math.ceil(n / 250) == len(pages)
    assert sum(page.requests for page in pages) == len(pages)
    assert ids_of(pages) == [str(numeric) for numeric in created]  # sorted by updatedAt, once
    assert [page.cursor is None for page in pages] == [False] * (len(pages) - 1) + [True]
    assert all(seen["query"] is None for seen in fake.variables_seen)


@pytest.mark.parametrize("offset_hours", [0, -5, 9])
def test_incremental_picks_up_exactly_the_changed_records_plus_overlap(
    clock: FakeClock, offset_hours: int
) -> None:
    fake = FakeShopify(clock=clock, utc_offset=dt.timedelta(hours=offset_hours))
    created = fake.generate(1000)  # updated at EPOCH + 0 s … + 999 s
    watermark = EPOCH + dt.timedelta(seconds=900)
    changed = [created[3], created[250], created[777]]
    for numeric in changed:
        fake.update_customer(numeric, firstName="Changed")
    client = make_shopify(fake, clock)

    pages = sync(client, updated_since=watermark, overlap=dt.timedelta(minutes=5))

    # The window starts at watermark - 5 min = EPOCH + 600 s, inclusive.
    expected = {str(n) for n in created[600:]} | {str(n) for n in changed}
    got = ids_of(pages)
    assert sorted(got) == sorted(expected)
    assert len(got) == len(set(got))
    assert fake.variables_seen[0]["query"] == "updated_at:>='2025-01-01T00:10:00Z'"
    assert fake.requests == math.ceil(len(expected) / 250)
    changed_records = [r for p in pages for r in p.records if r.first_name == "Changed"]
    assert {r.external_id for r in changed_records} == {str(n) for n in changed}
    # Offsets differ on the wire, instants do not.
    assert all(r.source_updated_at == fake.updated_at(int(r.external_id)) for r in changed_records)


def test_search_query_formats_utc_and_rejects_naive_datetimes() -> None:
    since = dt.datetime(2025, 3, 1, 12, 0, 30, 999, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert search_query(since, dt.timedelta(minutes=5)) == "updated_at:>='2025-03-01T16:55:30Z'"
    assert search_query(None, dt.timedelta(minutes=5)) is None
    with pytest.raises(ValueError, match="aware"):
        search_query(dt.datetime(2025, 3, 1), dt.timedelta(0))


def test_resume_from_a_saved_cursor_continues_at_the_next_page(clock: FakeClock) -> None:
    fake = FakeShopify(clock=clock)
    fake.generate(1100)
    # One budget for the shop, shared by both runs (as the Redis budget is across workers).
    budget = LocalBudget(capacity=2000.0, refill_per_second=100.0, clock=clock, sleep=clock.sleep)
    full = sync(make_shopify(fake, clock, budget=budget), updated_since=None)
    assert len(full) == 5

    saved = full[1].cursor  # the run died after upserting page 2
    before = fake.requests
    resumed = sync(make_shopify(fake, clock, budget=budget), updated_since=None, cursor=saved)

    assert fake.requests - before == 3
    assert ids_of(resumed) == ids_of(full[2:])
    assert fake.variables_seen[before]["after"] == saved


@pytest.mark.parametrize("throttle_status", [200, 429])
def test_throttled_answers_wait_what_the_bucket_needs_and_finish_the_same(
    clock: FakeClock, throttle_status: int
) -> None:
    expected = clean_run(1000)

    fake = FakeShopify(
        clock=clock, bucket_max=1000.0, restore_rate=100.0, throttle_status=throttle_status
    )
    fake.generate(1000)
    client = make_shopify(fake, clock, budget=NullBudget())

    pages = sync(client, updated_since=None)

    cost = 2 + 250 * NODE_COST  # 752 per page
    # Page 1 fits (1000 → 248); page 2 needs (752 - 248)/100 s; pages 3 and 4 need 752/100 s.
    assert fake.throttled_answers == client.throttled == 3
    assert clock.sleeps == pytest.approx([(cost - 248) / 100, cost / 100, cost / 100])
    assert sum(page.throttled for page in pages) == 3
    assert fake.requests == client.requests == 4 + 3
    assert ids_of(pages) == expected


def test_budget_kept_in_sync_gets_no_throttled_answers_in_steady_state(clock: FakeClock) -> None:
    fake = FakeShopify(clock=clock, bucket_max=1000.0, restore_rate=100.0)
    fake.generate(2500)
    budget = LocalBudget(capacity=1000.0, refill_per_second=100.0, clock=clock, sleep=clock.sleep)
    client = make_shopify(fake, clock, budget=budget)

    pages = sync(client, updated_since=None)

    assert fake.throttled_answers == client.throttled == 0
    assert fake.requests == 10 == len(pages)
    assert len(ids_of(pages)) == 2500
    # It waited exactly what the bucket needed: all the cost beyond the initial 1000, at 100/s.
    assert sum(clock.sleeps) == pytest.approx((10 * (2 + 250 * NODE_COST) - 1000) / 100)


def test_a_cold_budget_is_corrected_by_the_first_answer(clock: FakeClock) -> None:
    """A budget that believes in a huge bucket is overwritten by what the server reports."""
    fake = FakeShopify(clock=clock, bucket_max=1000.0, restore_rate=100.0)
    fake.generate(2000)
    budget = LocalBudget(capacity=1e6, refill_per_second=1e6, clock=clock, sleep=clock.sleep)
    client = make_shopify(fake, clock, budget=budget)

    pages = sync(client, updated_since=None)

    assert client.throttled == 0
    assert len(ids_of(pages)) == 2000


def test_twenty_percent_faults_give_the_same_records_as_a_clean_run(clock: FakeClock) -> None:
    expected = clean_run(2000)

    fake = FakeShopify(clock=clock, seed=7)
    fake.generate(2000)
    fake.fault_rate = 0.2
    client = make_shopify(fake, clock)

    pages = sync(client, updated_since=None)

    assert ids_of(pages) == expected
    assert fake.faults > 0
    assert client.requests == fake.requests == 8 + fake.faults
    assert sum(page.requests for page in pages) == client.requests


def test_fail_next_and_timeout_next_are_retried(clock: FakeClock) -> None:
    fake = FakeShopify(clock=clock)
    fake.generate(300)
    fake.fail_next(2, status=503)
    fake.timeout_next(1)
    client = make_shopify(fake, clock)

    pages = sync(client, updated_since=None)

    assert len(ids_of(pages)) == 300
    assert pages[0].requests == 4
    assert fake.requests == 5


def test_401_is_a_configuration_error_without_retries(clock: FakeClock) -> None:
    fake = FakeShopify(clock=clock)
    fake.generate(10)
    client = make_shopify(fake, clock, token="shpat_wrong")

    with pytest.raises(ConfigurationError) as caught:
        sync(client, updated_since=None)

    assert fake.requests == 1
    assert "shpat_wrong" not in str(caught.value)
    assert clock.sleeps == []


def _client_answering(body: dict[str, object], status: int = 200) -> ShopifyClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body)

    return ShopifyClient(
        http=httpx.Client(transport=httpx.MockTransport(handler), base_url="https://fake"),
        shop_domain=SHOP,
        access_token=TOKEN,
        api_version=API_VERSION,
        budget=NullBudget(),
        sleep=FakeClock().sleep,
    )


def test_access_denied_is_a_configuration_error() -> None:
    denied = {
        "message": "Access denied for customers field.",
        "extensions": {"code": "ACCESS_DENIED"},
    }
    client = _client_answering({"errors": [denied]})
    with pytest.raises(ConfigurationError):
        client.execute("{ shop { id } }")
    assert client.requests == 1


def test_other_graphql_errors_are_fatal() -> None:
    client = _client_answering({"errors": [{"message": "Field 'nope' doesn't exist"}]})
    with pytest.raises(FatalError, match="doesn't exist"):
        client.execute("{ nope }")
    assert client.requests == 1


def test_an_answer_without_data_is_fatal() -> None:
    client = _client_answering({"extensions": {}})
    with pytest.raises(FatalError):
        client.execute("{ shop { id } }")


def test_a_pagination_loop_is_fatal(clock: FakeClock) -> None:
    fake = FakeShopify(clock=clock)
    fake.generate(1000)
    fake.repeat_cursor = True
    client = make_shopify(fake, clock)

    with pytest.raises(FatalError, match="loop"):
        sync(client, updated_since=None)
    assert fake.requests == 2


def test_the_access_token_travels_in_the_shopify_header(clock: FakeClock) -> None:
    seen: list[httpx.Request] = []
    fake = FakeShopify(clock=clock)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return fake.handle(request)

    client = ShopifyClient(
        http=httpx.Client(transport=httpx.MockTransport(handler), base_url="https://shop.test"),
        shop_domain=SHOP,
        access_token=TOKEN,
        api_version=API_VERSION,
        budget=NullBudget(),
        sleep=clock.sleep,
    )
    sync(client, updated_since=None)
    assert seen[0].headers["X-Shopify-Access-Token"] == TOKEN
    assert seen[0].url == f"https://shop.test/admin/api/{API_VERSION}/graphql.json"
    assert "Authorization" not in seen[0].headers


@pytest.fixture
def served() -> Iterator[tuple[FakeShopify, str]]:
    # A roomy bucket: this test is about the wire, not about waiting in real time.
    fake = FakeShopify(timeout_sleep=0.6, bucket_max=1e6, restore_rate=1e6)
    fake.generate(600)
    with fake.serve() as base_url:
        yield fake, base_url


def test_the_fake_served_over_real_http_syncs_with_a_real_client(
    served: tuple[FakeShopify, str],
) -> None:
    fake, base_url = served
    fake.timeout_next(1)
    sleeps: list[float] = []
    with make_client(base_url=base_url, timeout=0.3) as http:
        client = ShopifyClient(
            http=http,
            shop_domain=SHOP,
            access_token=TOKEN,
            api_version=API_VERSION,
            budget=LocalBudget(capacity=1e6, refill_per_second=1e6),
            sleep=sleeps.append,
        )
        pages = sync(client, updated_since=None)

    assert ids_of(pages) == [str(n) for n in fake.ids()]
    assert fake.requests == client.requests == 3 + 1  # three pages, one timed out and retried
    assert client.throttled == 0


def test_a_record_updated_during_the_walk_is_seen_again_and_nothing_is_lost(
    clock: FakeClock,
) -> None:
    fake = FakeShopify(clock=clock)
    created = fake.generate(600)
    client = make_shopify(fake, clock)

    pages = iter_customer_pages(client, updated_since=None)
    first = next(pages)
    fake.update_customer(created[10], firstName="Moved")  # moves behind the cursor's position
    fake.update_customer(created[400], firstName="Moved")  # not yet read: moves to the end
    rest = list(pages)

    seen = ids_of([first, *rest])
    assert set(seen) == {str(n) for n in created}
    assert seen.count(str(created[10])) == 2  # old version on page 1, new one at the end
    assert seen.count(str(created[400])) == 1
    assert [r.first_name for r in rest[-1].records][-2:] == ["Moved", "Moved"]


def test_the_budget_is_asked_for_the_estimate_then_for_what_the_server_reported(
    clock: FakeClock,
) -> None:
    fake = FakeShopify(clock=clock, node_cost=2)  # the server's real cost differs from ours
    fake.generate(300)
    budget = NullBudget()
    client = make_shopify(fake, clock, budget=budget)

    sync(client, updated_since=None, page_size=100)

    assert budget.acquired == [2 + 100 * NODE_COST, 2 + 100 * 2, 2 + 100 * 2]
    assert budget.observed == 3
