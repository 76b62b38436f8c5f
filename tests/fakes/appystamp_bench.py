"""Benchmark hook: an Appy Stamp import of N fake customers over real HTTP (127.0.0.1).

    from tests.fakes.appystamp_bench import run_appystamp_import
    result = run_appystamp_import(
        sessions, store_id=store_id, n=10_000, settings=settings, key=secret_key
    )

The fake is served by `FakeAppyStamp.serve()` (a threaded HTTP server on a free port), the
connection is created with the served base URL (and, with `card`, a card to import balances
to), and the import is the production path: `worker.sync.run_customer_sync` building its own
HTTP client. Nothing here reads Settings or the environment beyond what the caller passes.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from connectors.ratelimit import LocalBudget, RateBudget
from models.cards import create_card
from models.connections import connect
from tests.fakes.appystamp import API_KEY, API_SECRET, FakeAppyStamp
from worker.settings import Settings
from worker.sync import run_customer_sync


def run_appystamp_import(
    sessions: sessionmaker[Session],
    *,
    store_id: int,
    n: int,
    settings: Settings,
    key: bytes,
    card: bool = True,
    activities: bool = True,
    fault_rate: float = 0.0,
    seed: int = 0,
    rerun: bool = True,
    budget: RateBudget | None = None,
) -> dict[str, Any]:
    """Import `n` generated customers (with their activities) into `store_id` over HTTP.

    `card`: import balances to a new card of the store (False: metadata only); `activities`:
    False makes the fake answer `PLAN_UPGRADE_REQUIRED` (balance adjustments only);
    `fault_rate`: injected 5xx/timeouts; `budget`: the client's rate budget (default: none to
    speak of — the production default, 10 requests/s per account, would make the benchmark
    measure the budget). Returns `{"first": {...}, "rerun": {...}}` with each
    run's `seconds`, `customers_per_second`, `summary` (the run's JSON summary) and
    `fake_requests` (requests the fake received during that run).
    """
    fake = FakeAppyStamp(
        seed=seed, fault_rate=fault_rate, activities_enabled=activities, timeout_sleep=0.5
    )
    fake.generate(n)
    result: dict[str, Any] = {"n": n, "card": card, "activities": activities}
    with fake.serve() as url:
        with sessions() as session:
            card_id = (
                create_card(session, store_id=store_id, name="Imported", stamps_required=10).id
                if card
                else None
            )
            connection, _ = connect(
                session,
                store_id=store_id,
                source="appystamp",
                account="",
                secrets={"api_key": API_KEY, "api_secret": API_SECRET},
                api_base_url=url,
                api_version=None,
                key=key,
                config={"card_id": card_id} if card_id is not None else None,
            )
            session.commit()
            connection_id = connection.id
        for name in ("first", "rerun") if rerun else ("first",):
            before = fake.requests
            started = time.perf_counter()
            summary = run_customer_sync(
                sessions,
                connection_id=connection_id,
                settings=settings,
                key=key,
                full=True,
                budget=budget or LocalBudget(capacity=1e9, refill_per_second=1e9),
            )
            seconds = time.perf_counter() - started
            result[name] = {
                "seconds": round(seconds, 3),
                "customers_per_second": round(n / seconds, 1) if seconds else None,
                "summary": summary.as_dict(),
                "fake_requests": fake.requests - before,
            }
    return result
