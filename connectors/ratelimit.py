"""Rate budgets: one token bucket per shop/merchant, taken from BEFORE each call.

A bucket holds up to `capacity` units and refills at `refill_per_second`. `acquire` blocks (through
the injected `sleep`) until `cost` units are there, takes them and says how long it waited;
`observe` overwrites a bucket with what the server reported (Shopify's `throttleStatus`:
`currentlyAvailable`, `maximumAvailable`, `restoreRate`), so the next wait is exactly what the
server's bucket needs.

- `LocalBudget`: in process, thread-safe — for a single worker (and tests).
- `RedisBudget`: one bucket per key in Redis, updated by an atomic Lua script, so every worker
  process shares it and N workers never exceed one shop's limit.
- `make_budget`: Redis when a URL is configured, in process otherwise (the edge decides).

The budget lives beside the client, not inside it: the client is per run, the budget per shop.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import redis


class RateBudget(Protocol):
    def acquire(self, key: str, cost: float = 1.0) -> float:
        """Block until `cost` units are available in `key`'s bucket, take them, return the wait."""
        ...

    def observe(self, key: str, *, available: float, maximum: float, restore_rate: float) -> None:
        """Overwrite `key`'s bucket with the state the server reported."""
        ...


def _check_config(capacity: float, refill_per_second: float) -> None:
    if not (math.isfinite(capacity) and capacity > 0):
        raise ValueError("capacity must be a positive number")
    if not (math.isfinite(refill_per_second) and refill_per_second > 0):
        raise ValueError("refill_per_second must be a positive number")


def _check_cost(cost: float, capacity: float) -> None:
    if not (math.isfinite(cost) and cost >= 0):
        raise ValueError("cost must be a non-negative number")
    if cost > capacity:
        # It would never fit: waiting forever is worse than failing loudly.
        raise ValueError(f"cost {cost:g} exceeds the bucket's capacity {capacity:g}")


# Refill arithmetic in floats (and a wall clock near 1.7e9 s, whose resolution is ~2.4e-7 s) can
# leave 0.9999999 where 1 was due; the missing sliver would ask for a sleep too small to move the
# clock and spin. A take that is due within this many seconds counts as due (same in Lua).
_EARLY = 1e-6


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    capacity: float
    rate: float

    def refill(self, now: float) -> None:
        if now > self.stamp:  # a clock that steps back never drains the bucket
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now


class LocalBudget:
    """In-process token buckets, one per key, safe to share between threads."""

    def __init__(
        self,
        *,
        capacity: float,
        refill_per_second: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        _check_config(capacity, refill_per_second)
        self.capacity = capacity
        self.refill_per_second = refill_per_second
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self.capacity, now, self.capacity, self.refill_per_second)
            self._buckets[key] = bucket
        bucket.refill(now)
        return bucket

    def acquire(self, key: str, cost: float = 1.0) -> float:
        waited = 0.0
        while True:
            with self._lock:  # never held while sleeping
                bucket = self._bucket(key, self._clock())
                _check_cost(cost, bucket.capacity)
                if bucket.tokens >= cost - bucket.rate * _EARLY:
                    bucket.tokens = max(0.0, bucket.tokens - cost)
                    return waited
                wait = (cost - bucket.tokens) / bucket.rate
            self._sleep(wait)
            waited += wait

    def observe(self, key: str, *, available: float, maximum: float, restore_rate: float) -> None:
        _check_config(maximum, restore_rate)
        with self._lock:
            self._buckets[key] = _Bucket(
                max(0.0, min(available, maximum)), self._clock(), maximum, restore_rate
            )

    def available(self, key: str) -> float:
        """Units in `key`'s bucket right now (for tests and progress reports)."""
        with self._lock:
            return self._bucket(key, self._clock()).tokens


# KEYS[1]: the bucket (a hash: tokens, ts, and — once observed — capacity, rate).
# ARGV: now, cost, default capacity, default rate. The TTL is a full refill plus a minute: a
# bucket untouched that long is full again, so letting Redis forget it changes nothing.
# Returns {1, "0", tokens} when taken, {0, "<seconds to wait>", tokens} when not, and
# {-1, "<capacity>", tokens} when `cost` can never fit; numbers travel as strings because Redis
# truncates Lua numbers to integers on the way out.
_ACQUIRE = """
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'capacity', 'rate')
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local capacity = tonumber(state[3]) or tonumber(ARGV[3])
local rate = tonumber(state[4]) or tonumber(ARGV[4])
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
  ts = now
end
local status = 1
local figure = 0
if cost > capacity then
  status = -1
  figure = capacity
elseif tokens >= cost - rate * 1e-6 then
  tokens = math.max(0, tokens - cost)
else
  status = 0
  figure = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'ts', string.format('%.17g', ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 60000)
return {status, string.format('%.17g', figure), string.format('%.17g', tokens)}
"""

# KEYS[1]: the bucket. ARGV: available, maximum, restore_rate, now, ttl_ms.
_OBSERVE = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'tokens', ARGV[1], 'capacity', ARGV[2], 'rate', ARGV[3], 'ts', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


def _ttl_ms(capacity: float, rate: float) -> int:
    # Same rule as in _ACQUIRE: a full refill plus a minute of slack.
    return math.ceil(capacity / rate * 1000) + 60_000


def _num(value: float) -> str:
    return repr(float(value))


class RedisBudget:
    """Token buckets in Redis (`<prefix><key>`), shared by every worker process.

    Each acquire is one atomic script run (refill, take-or-report-wait), so concurrent workers
    can never take the same units twice. `clock` must be a wall clock comparable across
    processes (`time.time`); a clock behind the stored stamp just refills nothing.
    """

    def __init__(
        self,
        redis: redis.Redis,
        *,
        capacity: float,
        refill_per_second: float,
        prefix: str = "loyalty:budget:",
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        _check_config(capacity, refill_per_second)
        self.redis = redis
        self.capacity = capacity
        self.refill_per_second = refill_per_second
        self.prefix = prefix
        self._clock = clock
        self._sleep = sleep
        self._acquire = redis.register_script(_ACQUIRE)
        self._observe = redis.register_script(_OBSERVE)

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _run_acquire(self, key: str, cost: float) -> list[bytes | str | int]:
        args = [_num(self._clock()), _num(cost), _num(self.capacity), _num(self.refill_per_second)]
        answer = self._acquire(keys=[self._key(key)], args=args)
        return cast("list[bytes | str | int]", answer)

    def acquire(self, key: str, cost: float = 1.0) -> float:
        _check_cost(cost, math.inf)
        waited = 0.0
        while True:
            answer = self._run_acquire(key, cost)
            taken, figure = int(answer[0]), float(answer[1])
            if taken == 1:
                return waited
            if taken == -1:
                _check_cost(cost, figure)
            self._sleep(figure)
            waited += figure

    def observe(self, key: str, *, available: float, maximum: float, restore_rate: float) -> None:
        _check_config(maximum, restore_rate)
        self._observe(
            keys=[self._key(key)],
            args=[
                _num(max(0.0, min(available, maximum))),
                _num(maximum),
                _num(restore_rate),
                _num(self._clock()),
                _ttl_ms(maximum, restore_rate),
            ],
        )

    def available(self, key: str) -> float:
        """Units in `key`'s bucket right now, without taking any (for tests and reports)."""
        return float(self._run_acquire(key, 0.0)[2])


def make_budget(*, redis_url: str | None, capacity: float, refill_per_second: float) -> RateBudget:
    """A `RedisBudget` when `redis_url` is set (workers share it), else a `LocalBudget`."""
    if redis_url:
        return RedisBudget(
            redis.Redis.from_url(redis_url),
            capacity=capacity,
            refill_per_second=refill_per_second,
        )
    return LocalBudget(capacity=capacity, refill_per_second=refill_per_second)
