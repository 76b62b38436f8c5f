"""Upstream benchmark: a full Shopify customer sync against the fake enforcing a plan's cost bucket.

    uv run python bench/upstream.py [--n 100000] [--plan standard|advanced|plus] [--http]
                                    [--redis-url URL]

The fake (`tests.fakes.shopify.FakeShopify`) enforces Shopify's calculated-cost leaky bucket and
answers THROTTLED when a query does not fit. The real connector (`ShopifyClient` +
`iter_customer_pages`, budget from `connectors.ratelimit`) walks all N customers, 250 per page.

Time is compressed: the fake, the rate budget and the client share one simulated clock. Every
`sleep` the client or the budget asks for advances that clock instead of sleeping; real elapsed
time advances it too (so our own processing time counts as time, as it would against Shopify).
A standard-plan sync of 100k customers (~50 simulated minutes) runs in seconds.

- Default: in process (`httpx.MockTransport`), to isolate our own cost.
- `--http`: the fake served on 127.0.0.1 (`fake.serve()`) and a real httpx client
  (`connectors.http.make_client`); the bucket still runs on simulated time.
- `--redis-url`: a `RedisBudget` (one unique key, deleted at the end) instead of a `LocalBudget`.

Plans (bucket points / restore points per second): standard 2000/100, advanced 4000/200,
plus 20000/1000. Restore rates: ../shared/reference/square-shopify-apis.md §5 (GraphQL Admin
rate limits, "figures doubled vs. older 50/100/500 table"); the bucket sizes are the older
1000/2000/10000 buckets doubled likewise (the reference quotes the SDK's old-standard example
`maximumAvailable 1000 / restoreRate 50`), i.e. 20 s of restore each.

Targets (exit 1 when one fails): requests == ceil(N/250); 0 THROTTLED answers after the first
request (steady state); every customer received exactly once; points consumed / points allowed
(restore_rate x simulated duration + initial bucket) >= 90%. The share is only meaningful when
the sync is rate-bound: a small N that fits in the initial bucket never waits and fails it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis

from connectors.http import make_client
from connectors.ratelimit import LocalBudget, RateBudget, RedisBudget
from connectors.shopify.client import ShopifyClient
from connectors.shopify.paginate import MAX_PAGE_SIZE, iter_customer_pages
from tests.fakes.shopify import API_VERSION, TOKEN, FakeShopify

SHOP = "bench-shop.myshopify.com"
# (bucket maximum in points, restore rate in points/s) — see the module docstring for the source.
PLANS: dict[str, tuple[float, float]] = {
    "standard": (2000.0, 100.0),
    "advanced": (4000.0, 200.0),
    "plus": (20000.0, 1000.0),
}
SHARE_TARGET = 0.90


class SimulatedClock:
    """Shared clock of the fake, the budget and the client.

    `now = start + real elapsed time + everything slept`; `sleep` only adds to the slept total.
    Thread-safe enough for one sleeper (the client) and readers in other threads (the server).
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._start = start
        self._wall0 = time.perf_counter()
        self._lock = threading.Lock()
        self.slept = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self._start + (time.perf_counter() - self._wall0) + self.slept

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept += max(0.0, seconds)
            self.sleeps += 1


@dataclass
class Tap:
    """Wraps the fake's `respond`: what the server answered, and how long the fake itself took."""

    respond: Callable[[httpx.Request], httpx.Response | None]
    answers: list[str] = field(default_factory=list)  # "ok" | "throttled" | "other"
    consumed: float = 0.0  # sum of actualQueryCost
    fake_seconds: float = 0.0  # time spent inside the fake (and in this tap)

    def __call__(self, request: httpx.Request) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            response = self.respond(request)
            if response is None:
                self.answers.append("other")
                return None
            body: Any = json.loads(response.content) if response.content else None
            cost = body.get("extensions", {}).get("cost") if isinstance(body, dict) else None
            errors = body.get("errors") if isinstance(body, dict) else None
            codes = [
                error.get("extensions", {}).get("code")
                for error in (errors if isinstance(errors, list) else [])
                if isinstance(error, dict)
            ]
            if "THROTTLED" in codes:
                self.answers.append("throttled")
            elif response.status_code == 200 and not errors:
                self.answers.append("ok")
            else:
                self.answers.append("other")
            if isinstance(cost, dict) and isinstance(cost.get("actualQueryCost"), int | float):
                self.consumed += float(cost["actualQueryCost"])
            return response
        finally:
            self.fake_seconds += time.perf_counter() - started


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="customers (default 100000)")
    parser.add_argument("--plan", choices=sorted(PLANS), default="standard")
    parser.add_argument("--http", action="store_true", help="serve the fake on 127.0.0.1")
    parser.add_argument("--redis-url", help="use a RedisBudget on this Redis (unique key)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")

    bucket_max, restore_rate = PLANS[args.plan]
    clock = SimulatedClock()
    fake = FakeShopify(bucket_max=bucket_max, restore_rate=restore_rate, clock=clock)
    generated = time.perf_counter()
    expected_ids = [str(numeric) for numeric in fake.generate(args.n)]
    generated = time.perf_counter() - generated
    tap = Tap(fake.respond)
    fake.respond = tap  # type: ignore[method-assign]  # handle() and serve() both call it

    redis_client: redis.Redis | None = None
    redis_key = ""
    budget: RateBudget
    if args.redis_url:
        redis_client = redis.Redis.from_url(args.redis_url)
        prefix = f"loyalty:bench:upstream:{uuid.uuid4().hex}:"
        redis_key = f"{prefix}{SHOP}"
        budget = RedisBudget(
            redis_client,
            capacity=bucket_max,
            refill_per_second=restore_rate,
            prefix=prefix,
            clock=clock,
            sleep=clock.sleep,
        )
        budget_name = f"RedisBudget ({args.redis_url}, key {redis_key}, deleted after)"
    else:
        budget = LocalBudget(
            capacity=bucket_max, refill_per_second=restore_rate, clock=clock, sleep=clock.sleep
        )
        budget_name = "LocalBudget (in process)"

    def run(http: httpx.Client) -> tuple[Counter[str], int, int, float, float, float]:
        client = ShopifyClient(
            http=http,
            shop_domain=SHOP,
            access_token=TOKEN,
            api_version=API_VERSION,
            budget=budget,
            sleep=clock.sleep,
        )
        received: Counter[str] = Counter()
        sim_start = clock()
        wall_start = time.perf_counter()
        for page in iter_customer_pages(client, updated_since=None):
            received.update(record.external_id for record in page.records)
        wall = time.perf_counter() - wall_start
        sim = clock() - sim_start
        return received, client.requests, client.throttled, sim, wall, tap.fake_seconds

    try:
        if args.http:
            with fake.serve() as base_url, make_client(base_url=base_url) as http:
                transport = f"real HTTP to the fake served at {base_url}"
                received, requests, throttled, sim, wall, fake_s = run(http)
        else:
            transport = "in process (httpx.MockTransport)"
            mock = httpx.MockTransport(fake.handle)
            with make_client(base_url="http://127.0.0.1", transport=mock) as http:
                received, requests, throttled, sim, wall, fake_s = run(http)
    finally:
        if redis_client is not None:
            redis_client.delete(redis_key)
            redis_client.close()

    n = args.n
    target_requests = math.ceil(n / MAX_PAGE_SIZE)
    throttled_first = 1 if tap.answers[:1] == ["throttled"] else 0
    throttled_after = tap.answers[1:].count("throttled")
    exact = received.keys() == set(expected_ids) and all(c == 1 for c in received.values())
    duplicates = sum(c - 1 for c in received.values() if c > 1)
    missing = len(set(expected_ids) - received.keys())
    allowed = restore_rate * sim + bucket_max
    share = tap.consumed / allowed
    ours = max(wall - fake_s, 1e-9)

    checks = {
        "requests": requests == target_requests,
        "throttled": throttled_after == 0,
        "customers": exact,
        "share": share >= SHARE_TARGET,
    }
    print("Shopify upstream sync benchmark (bench/upstream.py)")
    print(
        "  time compressed: the fake, the budget and the client share one simulated clock; "
        "sleeps advance it instead of sleeping (real elapsed time advances it too)"
    )
    print(f"  N                      {n}")
    print(
        f"  plan                   {args.plan}: bucket {bucket_max:g} points, "
        f"restore {restore_rate:g} points/s"
    )
    print(f"  transport              {transport}")
    print(f"  budget                 {budget_name}")
    print(
        f"  requests used          {requests} (target ceil(N/250) = {target_requests}) "
        f"{verdict(checks['requests'])}"
    )
    print(
        f"  throttled answers      {throttled} in all; first request {throttled_first}, "
        f"after the first request {throttled_after} (target 0) {verdict(checks['throttled'])}"
    )
    print(
        f"  customers received     {received.total()} records, {len(received)} distinct of {n} "
        f"(missing {missing}, duplicates {duplicates}) {verdict(checks['customers'])}"
    )
    print(
        f"  simulated duration     {sim:.1f} s ({sim / 60:.1f} min; {clock.sleeps} sleeps "
        f"totalling {clock.slept:.1f} s)"
    )
    print(f"  cost points consumed   {tap.consumed:.0f} (sum of actualQueryCost)")
    print(
        f"  allowed                {allowed:.0f} points "
        f"(restore {restore_rate:g}/s x {sim:.1f} s + initial bucket {bucket_max:g})"
    )
    print(
        f"  share of rate used     {share:.2%} (target >= {SHARE_TARGET:.0%}) "
        f"{verdict(checks['share'])}"
        + ("" if clock.sleeps else " (never waited: N too small to be rate-bound)")
    )
    print(
        f"  wall clock             {wall:.2f} s for the sync ({fake_s:.2f} s inside the fake, "
        f"{ours:.2f} s ours); fixture generation {generated:.2f} s"
    )
    print(
        f"  our processing         {n / ours:,.0f} customers/s "
        f"(end to end incl. the fake: {n / wall:,.0f} customers/s)"
    )
    failed = [name for name, ok in checks.items() if not ok]
    print(f"  result                 {'FAIL: ' + ', '.join(failed) if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
