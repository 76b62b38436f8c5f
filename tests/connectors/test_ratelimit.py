"""connectors.ratelimit: token buckets in process and in the REAL Redis.

Redis tests use `TEST_REDIS_URL` (default redis://127.0.0.1:6379/15) and a unique key prefix per
test, deleting only their own keys. Redis unreachable → skipped locally, failed under `CI=true`.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from connectors.ratelimit import LocalBudget, RateBudget, RedisBudget, make_budget

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


class FakeClock:
    """A clock that only moves when slept on (or advanced); records every sleep."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


def local(clock: FakeClock, capacity: float = 10, refill: float = 20) -> LocalBudget:
    return LocalBudget(capacity=capacity, refill_per_second=refill, clock=clock, sleep=clock.sleep)


# --- LocalBudget ------------------------------------------------------------------------------


def test_local_starts_full_then_waits_exactly_what_is_missing() -> None:
    clock = FakeClock()
    budget = local(clock, capacity=10, refill=20)
    assert [budget.acquire("shop") for _ in range(10)] == [0.0] * 10
    assert budget.acquire("shop") == pytest.approx(0.05)
    assert budget.acquire("shop", cost=4) == pytest.approx(0.2)
    assert clock.sleeps == pytest.approx([0.05, 0.2])


def test_local_never_exceeds_capacity_after_a_long_idle() -> None:
    clock = FakeClock()
    budget = local(clock, capacity=10, refill=20)
    clock.advance(3_600)
    assert budget.available("shop") == 10
    for _ in range(10):
        assert budget.acquire("shop") == 0.0
    assert budget.acquire("shop") > 0


def test_local_refills_over_time() -> None:
    clock = FakeClock()
    budget = local(clock, capacity=10, refill=20)
    budget.acquire("shop", cost=10)
    assert budget.available("shop") == 0
    clock.advance(0.25)
    assert budget.available("shop") == pytest.approx(5)
    for _ in range(5):
        assert budget.acquire("shop") == 0.0
    assert budget.acquire("shop") == pytest.approx(0.05)


def test_local_total_taken_bounded_by_capacity_plus_refill() -> None:
    """Any interleaving of takes and idles: taken ≤ capacity + refill * elapsed, always."""
    rng = random.Random(1234)
    clock = FakeClock()
    budget = local(clock, capacity=10, refill=20)
    start, taken = clock(), 0.0
    for _ in range(2_000):
        if rng.random() < 0.2:
            clock.advance(rng.uniform(0, 0.3))
        cost = rng.choice([0.5, 1, 1, 2, 5, 10])
        budget.acquire("shop", cost=cost)
        taken += cost
        assert taken <= 10 + 20 * (clock() - start) + 1e-6
    # ... and waits no more than needed: the budget is used, not wasted.
    assert taken >= 20 * (clock() - start) * 0.95


def test_local_keys_are_independent() -> None:
    clock = FakeClock()
    budget = local(clock, capacity=3, refill=1)
    budget.acquire("shop-a", cost=3)
    assert budget.acquire("shop-b", cost=3) == 0.0
    assert budget.acquire("shop-a") == pytest.approx(1.0)


def test_local_observe_overwrites_the_bucket() -> None:
    clock = FakeClock()
    budget = local(clock, capacity=10, refill=20)
    budget.observe("shop", available=40, maximum=1000, restore_rate=50)
    assert budget.available("shop") == 40
    assert budget.acquire("shop", cost=140) == pytest.approx(2.0)  # (140 - 40) / 50
    clock.advance(3_600)
    assert budget.available("shop") == 1000  # the server's maximum, not the configured 10
    budget.observe("shop", available=5000, maximum=100, restore_rate=10)
    assert budget.available("shop") == 100  # never above the reported maximum
    budget.observe("shop", available=0, maximum=100, restore_rate=10)
    assert budget.available("shop") == 0


def test_local_clock_stepping_back_neither_adds_nor_drains() -> None:
    clock = FakeClock()
    budget = local(clock, capacity=10, refill=20)
    budget.acquire("shop", cost=6)
    clock.advance(-100)
    assert budget.available("shop") == 4
    clock.advance(100.1)
    assert budget.available("shop") == pytest.approx(6)


def test_local_rejects_impossible_costs_and_configuration() -> None:
    budget = local(FakeClock(), capacity=10, refill=20)
    with pytest.raises(ValueError, match="exceeds"):
        budget.acquire("shop", cost=11)
    with pytest.raises(ValueError, match="cost"):
        budget.acquire("shop", cost=-1)
    with pytest.raises(ValueError, match="capacity"):
        LocalBudget(capacity=0, refill_per_second=1)
    with pytest.raises(ValueError, match="refill"):
        LocalBudget(capacity=1, refill_per_second=0)
    with pytest.raises(ValueError, match="refill"):
        budget.observe("shop", available=1, maximum=10, restore_rate=0)


def test_local_is_thread_safe_no_lost_updates() -> None:
    """16 threads take 50 units each, one at a time, from a bucket of 1000 that barely refills:
    exactly 200 are left (a lost update would leave more)."""
    budget = LocalBudget(capacity=1000, refill_per_second=1e-9)
    barrier = threading.Barrier(16)

    def take() -> None:
        barrier.wait()
        for _ in range(50):
            budget.acquire("shop")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=take) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert budget.available("shop") == pytest.approx(200, abs=1e-3)


def test_local_threads_never_exceed_the_rate() -> None:
    """8 threads acquiring as fast as they can for 0.6 s on the real clock."""
    budget = LocalBudget(capacity=10, refill_per_second=200)
    counts = [0] * 8
    start = time.monotonic()
    deadline = start + 0.6

    def hammer(index: int) -> None:
        while time.monotonic() < deadline:
            budget.acquire("shop")
            counts[index] += 1

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    assert sum(counts) <= 10 + 200 * elapsed + 1
    assert sum(counts) >= 200 * 0.6 * 0.7  # the threads really were limited by the budget
    assert all(count > 0 for count in counts)


# --- RedisBudget (real Redis) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis must be reachable at {REDIS_URL} under CI: {exc}")
        pytest.skip(f"Redis is not reachable at {REDIS_URL} ({exc}); set TEST_REDIS_URL")
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test alone; only its keys are deleted afterwards."""
    value = f"test:budget:{uuid.uuid4().hex}:"
    yield value
    keys = list(redis_client.scan_iter(match=f"{value}*"))
    if keys:
        redis_client.delete(*keys)


def shared(
    client: redis.Redis, prefix: str, clock: FakeClock, capacity: float = 10, refill: float = 20
) -> RedisBudget:
    return RedisBudget(
        client,
        capacity=capacity,
        refill_per_second=refill,
        prefix=prefix,
        clock=clock,
        sleep=clock.sleep,
    )


def test_redis_starts_full_then_waits_exactly_what_is_missing(
    redis_client: redis.Redis, prefix: str
) -> None:
    clock = FakeClock(start=1_700_000_000.0)
    budget = shared(redis_client, prefix, clock)
    assert [budget.acquire("shop") for _ in range(10)] == [0.0] * 10
    assert budget.acquire("shop") == pytest.approx(0.05)
    assert budget.acquire("shop", cost=4) == pytest.approx(0.2)
    assert clock.sleeps == pytest.approx([0.05, 0.2])
    assert redis_client.exists(f"{prefix}shop") == 1
    assert 0 < redis_client.pttl(f"{prefix}shop") <= 60_500 + 1_000


def test_redis_refills_over_time_and_never_exceeds_capacity(
    redis_client: redis.Redis, prefix: str
) -> None:
    clock = FakeClock(start=1_700_000_000.0)
    budget = shared(redis_client, prefix, clock)
    budget.acquire("shop", cost=10)
    assert budget.available("shop") == 0
    clock.advance(0.25)
    assert budget.available("shop") == pytest.approx(5)
    clock.advance(3_600)
    assert budget.available("shop") == 10
    for _ in range(10):
        assert budget.acquire("shop") == 0.0
    assert budget.acquire("shop") > 0


def test_redis_observe_overwrites(redis_client: redis.Redis, prefix: str) -> None:
    clock = FakeClock(start=1_700_000_000.0)
    budget = shared(redis_client, prefix, clock)
    budget.acquire("shop", cost=7)
    budget.observe("shop", available=40, maximum=1000, restore_rate=50)
    assert budget.available("shop") == 40
    assert budget.acquire("shop", cost=140) == pytest.approx(2.0)  # (140 - 40) / 50
    clock.advance(3_600)
    assert budget.available("shop") == 1000  # the server's maximum, not the configured 10
    budget.observe("shop", available=5000, maximum=100, restore_rate=10)
    assert budget.available("shop") == 100
    budget.observe("shop", available=0, maximum=100, restore_rate=10)
    assert budget.available("shop") == 0
    assert budget.acquire("shop", cost=20) == pytest.approx(2.0)  # restore_rate 10 now


def test_redis_is_shared_between_clients_and_keys_independent(
    redis_client: redis.Redis, prefix: str
) -> None:
    clock = FakeClock(start=1_700_000_000.0)
    other_client = redis.Redis.from_url(REDIS_URL)
    try:
        first = shared(redis_client, prefix, clock)
        second = shared(other_client, prefix, clock)
        first.acquire("shop-a", cost=10)
        assert second.available("shop-a") == 0
        assert second.acquire("shop-a") == pytest.approx(0.05)
        assert second.acquire("shop-b", cost=10) == 0.0
    finally:
        other_client.close()


def test_redis_rejects_impossible_costs(redis_client: redis.Redis, prefix: str) -> None:
    clock = FakeClock(start=1_700_000_000.0)
    budget = shared(redis_client, prefix, clock)
    with pytest.raises(ValueError, match="exceeds"):
        budget.acquire("shop", cost=11)
    budget.observe("shop", available=0, maximum=1000, restore_rate=50)
    assert budget.acquire("shop", cost=500) == pytest.approx(10.0)  # fits the observed maximum
    with pytest.raises(ValueError, match="cost"):
        budget.acquire("shop", cost=-1)


def _hammer(url: str, prefix: str, barrier: Any, seconds: float, results: Any) -> None:
    client = redis.Redis.from_url(url)
    budget = RedisBudget(client, capacity=10, refill_per_second=20, prefix=prefix)
    barrier.wait()
    start = time.time()
    deadline = start + seconds
    count = 0
    last = start
    while time.time() < deadline:
        budget.acquire("one-shop")
        last = time.time()
        count += 1
    results.put((count, start, last))
    client.close()


def test_redis_four_processes_never_exceed_one_shops_limit(
    redis_client: redis.Redis, prefix: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=_hammer, args=(REDIS_URL, prefix, barrier, 2.0, results))
        for _ in range(4)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=30) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=10)
    assert all(process.exitcode == 0 for process in processes)
    total = sum(count for count, _, _ in outcomes)
    elapsed = max(last for _, _, last in outcomes) - min(start for _, start, _ in outcomes)
    assert total <= 10 + 20 * elapsed + 1
    assert total >= 10 + 20 * 2.0 * 0.8  # they were held back by the budget, not by speed
    assert all(count > 0 for count, _, _ in outcomes)  # every worker drew from the one bucket


# --- make_budget ------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [None, ""])
def test_make_budget_without_url_is_local(url: str | None) -> None:
    budget = make_budget(redis_url=url, capacity=5, refill_per_second=2)
    assert isinstance(budget, LocalBudget)
    assert (budget.capacity, budget.refill_per_second) == (5, 2)


def test_make_budget_with_url_is_redis(redis_client: redis.Redis) -> None:
    budget: RateBudget = make_budget(redis_url=REDIS_URL, capacity=5, refill_per_second=2)
    assert isinstance(budget, RedisBudget)
    assert (budget.capacity, budget.refill_per_second) == (5, 2)
    key = f"test-make-budget-{uuid.uuid4().hex}"
    try:
        assert budget.acquire(key, cost=5) == 0.0
        assert redis_client.exists(f"{budget.prefix}{key}") == 1  # really in that Redis
    finally:
        redis_client.delete(f"{budget.prefix}{key}")
        budget.redis.close()
