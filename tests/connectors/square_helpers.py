"""Shared helpers of the Square connector tests: a client wired to a FakeSquare."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import httpx

from connectors.http import make_client
from connectors.records import Page
from connectors.square.client import SquareClient
from tests.fakes.square import DEFAULT_TOKEN, FakeSquare

SQUARE_VERSION = "2025-08-20"
MERCHANT = "MLEFBHHSJGVHD"


class NullBudget:
    """A rate budget that never waits (the fake's own limit is what these tests exercise)."""

    def __init__(self) -> None:
        self.acquired: list[str] = []

    def acquire(self, key: str, cost: float = 1.0) -> float:
        self.acquired.append(key)
        return 0.0

    def observe(self, key: str, *, available: float, maximum: float, restore_rate: float) -> None:
        return None


class FakeClock:
    """Monotonic time that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def square_client(
    fake: FakeSquare,
    *,
    token: str = DEFAULT_TOKEN,
    sleep: Callable[[float], None] | None = None,
    max_attempts: int = 6,
    http: httpx.Client | None = None,
) -> SquareClient:
    if http is None:
        http = make_client(
            base_url="https://connect.squareup.test",
            transport=httpx.MockTransport(fake.handle),
        )
    return SquareClient(
        http=http,
        access_token=token,
        square_version=SQUARE_VERSION,
        budget=NullBudget(),
        budget_key=MERCHANT,
        sleep=sleep if sleep is not None else (lambda _s: None),
        max_attempts=max_attempts,
    )


def ids_of(pages: Iterable[Page]) -> list[str]:
    return [record.external_id for page in pages for record in page.records]
