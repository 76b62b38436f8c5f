"""Sync runs end to end, in process: the fakes behind `httpx.MockTransport`, the real ingest, the
store on SQLite and PostgreSQL.

Time never really passes: the Shopify fake, the rate budget and the client's retry backoff share
one `FakeClock`, so throttling and retries cost no wall time. Overlap is 0 so incremental counts
are exact (a run re-reads only the record sitting exactly on the watermark, which the filter's
`>=` includes).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import structlog
from cryptography.fernet import Fernet
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from connectors.ratelimit import LocalBudget
from models.connections import connect
from models.db import make_sessionmaker
from models.errors import NotFound, ValidationFailed
from models.ingest import IngestPolicy
from models.sync_state import (
    CUSTOMERS_STREAM,
    begin_run,
    fail_run,
    finish_run,
    list_conflicts,
    pick_connection,
    policy_from_config,
    render_conflict,
    save_page,
)
from models.tables import (
    Base,
    Connection,
    Customer,
    ExternalReference,
    SyncConflict,
    SyncRun,
    SyncState,
)
from tests.fakes.shopify import API_VERSION as SHOPIFY_VERSION
from tests.fakes.shopify import TOKEN as SHOPIFY_TOKEN
from tests.fakes.shopify import FakeClock, FakeShopify
from tests.fakes.square import DEFAULT_TOKEN as SQUARE_TOKEN
from tests.fakes.square import FakeSquare
from worker.settings import Settings
from worker.sync import EXTRA_KEYS, SUMMARY_KEYS, SyncSummary, run_customer_sync

KEY = Fernet.generate_key()
SOURCES = ["shopify", "square"]
SIZES = {"shopify": 600, "square": 350}  # 3 pages of 250, 4 pages of 100
PAGES = {"shopify": 3, "square": 4}
NO_OVERLAP = dt.timedelta(0)
SQUARE_NOW = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)


# --- the harness ------------------------------------------------------------------------------


@dataclass
class Source:
    """One fake source, its connection(s) in the store, and how to run a sync against it."""

    name: str
    engine: Engine
    settings: Settings
    clock: FakeClock = field(default_factory=FakeClock)
    fake: Any = None
    sessions: sessionmaker[Session] = field(init=False)
    budget: LocalBudget = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = make_sessionmaker(self.engine)
        # One budget per shop, shared by every run (as in production): it knows the bucket.
        self.budget = LocalBudget(
            capacity=2000, refill_per_second=100, clock=self.clock, sleep=self.clock.sleep
        )
        if self.name == "shopify":
            self.fake = FakeShopify(clock=self.clock, seed=7)
        else:
            ticks = itertools.count(1)
            # Square stamps updates with its own "now": one second apart, after the generated.
            self.fake = FakeSquare(
                clock=self.clock,
                seed=7,
                now=lambda: SQUARE_NOW + dt.timedelta(seconds=next(ticks)),
            )

    def generate(self, n: int) -> list[str]:
        return [str(i) for i in self.fake.generate(n)]

    def change(self, external_id: str, first_name: str) -> None:
        if self.name == "shopify":
            self.fake.update_customer(int(external_id), firstName=first_name)
        else:
            self.fake.update_customer(external_id, given_name=first_name)

    def connect(self, store_id: int, *, token: str | None = None, **config: Any) -> int:
        with self.sessions() as session:
            row, _ = connect(
                session,
                store_id=store_id,
                source=self.name,
                account="fake-shop.myshopify.com" if self.name == "shopify" else "MLFAKE",
                access_token=token or (SHOPIFY_TOKEN if self.name == "shopify" else SQUARE_TOKEN),
                api_base_url="https://fake.test",
                api_version=SHOPIFY_VERSION if self.name == "shopify" else None,
                key=KEY,
            )
            if config:
                row.config = config
            session.commit()
            return row.id

    def sync(
        self,
        connection_id: int,
        *,
        transport: httpx.BaseTransport | None = None,
        **kwargs: Any,
    ) -> SyncSummary:
        kwargs.setdefault("overlap", NO_OVERLAP)
        return run_customer_sync(
            self.sessions,
            connection_id=connection_id,
            settings=self.settings,
            key=KEY,
            transport=transport or httpx.MockTransport(self.fake.handle),
            budget=self.budget,
            sleep=self.clock.sleep,
            **kwargs,
        )


# Modules a sync run logs through, each with a module-level structlog logger.
LOGGING_MODULES = (
    "models.ingest",
    "models.lifecycle",
    "connectors.paginate",
    "connectors.shopify.paginate",
    "connectors.square.paginate",
)


@pytest.fixture(autouse=True)
def _plain_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """structlog's defaults, whatever an earlier test left behind.

    A CLI test that does not restore the logging set-up leaves structlog printing to its
    CliRunner's (closed) stderr with `cache_logger_on_first_use`; a module-level logger first
    used then keeps that dead stream for good. Fresh loggers for the duration of each test.
    """
    import importlib

    was_configured, config = structlog.is_configured(), structlog.get_config()
    structlog.reset_defaults()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    for name in LOGGING_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "log"):
            monkeypatch.setattr(module, "log", structlog.get_logger(name))
    yield
    if was_configured:
        structlog.configure(**config)
    else:
        structlog.reset_defaults()


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(DATABASE_URL=db_url, LOG_FORMAT="json")


@pytest.fixture(params=SOURCES)
def src(request: pytest.FixtureRequest, engine: Engine, settings: Settings) -> Source:
    return Source(request.param, engine, settings)


def store_snapshot(engine: Engine, store_id: int) -> list[tuple[Any, ...]]:
    """The store's customers as the sync left them, without ids (comparable across stores)."""
    with make_sessionmaker(engine)() as session:
        rows = session.execute(
            select(
                ExternalReference.source,
                ExternalReference.external_id,
                ExternalReference.deleted_at,
                Customer.first_name,
                Customer.last_name,
                Customer.email,
                Customer.phone,
                Customer.state,
            )
            .join(Customer, Customer.id == ExternalReference.customer_id)
            .where(ExternalReference.store_id == store_id)
            .order_by(ExternalReference.source, ExternalReference.external_id)
        ).all()
        customers = session.scalar(
            select(func.count()).select_from(Customer).where(Customer.store_id == store_id)
        )
    assert customers == len(rows), "one customer per reference: no duplicates, no orphans"
    return [tuple(r) for r in rows]


def row_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t.name: conn.scalar(select(func.count()).select_from(t)) or 0
            for t in Base.metadata.sorted_tables
        }


def table_dump(engine: Engine, *names: str) -> dict[str, list[tuple[Any, ...]]]:
    tables = {t.name: t for t in Base.metadata.sorted_tables}
    with engine.connect() as conn:
        return {n: sorted(tuple(r) for r in conn.execute(select(tables[n])).all()) for n in names}


def counts(summary: SyncSummary) -> dict[str, Any]:
    return {k: summary.as_dict()[k] for k in SUMMARY_KEYS}


def expected(status: str = "succeeded", **values: int) -> dict[str, Any]:
    base: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS, 0)
    base["status"] = status
    base.update(values)
    return base


def state_of(engine: Engine, connection_id: int) -> SyncState:
    with make_sessionmaker(engine)() as session:
        return session.scalars(
            select(SyncState).where(SyncState.connection_id == connection_id)
        ).one()


def runs_of(engine: Engine, connection_id: int) -> list[SyncRun]:
    with make_sessionmaker(engine)() as session:
        return list(
            session.scalars(
                select(SyncRun).where(SyncRun.connection_id == connection_id).order_by(SyncRun.id)
            )
        )


class FailAfter(httpx.BaseTransport):
    """Passes `ok` requests to the fake, then answers a non-retriable 400 (a crash mid-run)."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response], ok: int) -> None:
        self.handler = handler
        self.ok = ok
        self.calls = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls > self.ok:
            return httpx.Response(400, json={"errors": [{"code": "BAD_REQUEST"}]})
        response = self.handler(request)
        response.read()
        return response


# --- full, incremental ------------------------------------------------------------------------


def test_first_full_sync(src: Source, make_store: Callable[..., tuple[int, str]]) -> None:
    n = SIZES[src.name]
    ids = src.generate(n)
    store_id, _ = make_store()
    cid = src.connect(store_id)

    summary = src.sync(cid)

    assert counts(summary) == expected(
        pages=PAGES[src.name], requests=PAGES[src.name], seen=n, created=n
    )
    assert set(summary.as_dict()) == {*SUMMARY_KEYS, *EXTRA_KEYS}
    assert summary.resumed is False
    assert summary.dry_run is False
    assert summary.error is None
    assert src.fake.requests == PAGES[src.name]
    snapshot = store_snapshot(src.engine, store_id)
    assert [(s, e) for s, e, *_ in snapshot] == sorted((src.name, i) for i in ids)
    state = state_of(src.engine, cid)
    assert state.in_progress is False
    assert state.cursor is None
    assert state.watermark is not None
    assert state.pages_done == PAGES[src.name]
    (run,) = runs_of(src.engine, cid)
    assert run.id == summary.run_id
    assert (run.status, run.pages, run.requests, run.seen, run.created) == (
        "succeeded",
        PAGES[src.name],
        PAGES[src.name],
        n,
        n,
    )
    assert run.finished_at is not None

    # The same records again, all of them (full): nothing changes.
    again = src.sync(cid, full=True)
    assert counts(again) == expected(
        pages=PAGES[src.name], requests=PAGES[src.name], seen=n, unchanged=n
    )
    assert store_snapshot(src.engine, store_id) == snapshot


def test_incremental_picks_up_exactly_the_changed_records(
    src: Source, make_store: Callable[..., tuple[int, str]]
) -> None:
    ids = src.generate(SIZES[src.name])
    store_id, _ = make_store()
    cid = src.connect(store_id)
    assert src.sync(cid).succeeded
    watermark = state_of(src.engine, cid).watermark

    changed = ids[10:17]
    for i in changed:
        src.change(i, f"Changed{i}")
    summary = src.sync(cid)

    # The 7 changed records, plus the one record sitting exactly on the old watermark.
    assert counts(summary) == expected(pages=1, requests=1, seen=8, updated=7, unchanged=1)
    names = {e: first for _, e, _, first, *_ in store_snapshot(src.engine, store_id)}
    assert all(names[i] == f"Changed{i}" for i in changed)
    assert sum(1 for name in names.values() if name.startswith("Changed")) == 7
    new_watermark = state_of(src.engine, cid).watermark
    assert watermark is not None
    assert new_watermark is not None
    assert new_watermark > watermark

    # Nothing changed since: only the record on the watermark is read again.
    assert counts(src.sync(cid)) == expected(pages=1, requests=1, seen=1, unchanged=1)


# --- crash and resume -------------------------------------------------------------------------


def test_crash_after_page_k_resumes_at_page_k_plus_1(
    src: Source, make_store: Callable[..., tuple[int, str]]
) -> None:
    src.generate(SIZES[src.name])
    clean_store, _ = make_store()
    clean = src.connect(clean_store)
    assert src.sync(clean).succeeded
    store_id, _ = make_store()
    cid = src.connect(store_id)
    k = 2

    class Crash(Exception):
        pass

    def die_after_k(summary: SyncSummary) -> None:
        if summary.pages == k:
            raise Crash

    before = src.fake.requests
    with pytest.raises(Crash):
        src.sync(cid, on_page=die_after_k)
    assert src.fake.requests - before == k
    state = state_of(src.engine, cid)
    assert (state.in_progress, state.pages_done) == (True, k)
    assert state.cursor is not None
    saved_cursor = state.cursor
    (crashed,) = runs_of(src.engine, cid)
    assert crashed.status == "failed"
    assert crashed.pages == k
    assert len(store_snapshot(src.engine, store_id)) == k * (250 if src.name == "shopify" else 100)

    before = src.fake.requests
    summary = src.sync(cid)

    rest = PAGES[src.name] - k
    assert summary.resumed is True
    assert summary.succeeded
    assert (summary.pages, summary.requests) == (rest, rest)
    assert src.fake.requests - before == rest  # not from page 1
    if src.name == "shopify":
        assert src.fake.variables_seen[-rest]["after"] == saved_cursor
    else:
        assert src.fake.bodies[-rest]["cursor"] == saved_cursor
    assert summary.created == SIZES[src.name] - k * (250 if src.name == "shopify" else 100)
    assert store_snapshot(src.engine, store_id) == store_snapshot(src.engine, clean_store)
    first, second = runs_of(src.engine, cid)
    assert (first.status, second.status, second.resumed) == ("failed", "succeeded", True)
    state = state_of(src.engine, cid)
    assert (state.in_progress, state.cursor, state.pages_done) == (False, None, PAGES[src.name])


def test_source_failure_mid_run_fails_the_run_and_the_next_run_resumes(
    src: Source, make_store: Callable[..., tuple[int, str]]
) -> None:
    src.generate(SIZES[src.name])
    store_id, _ = make_store()
    cid = src.connect(store_id)
    failing = FailAfter(src.fake.handle, ok=1)

    summary = src.sync(cid, transport=failing)

    assert summary.status == "failed"
    assert summary.error is not None
    assert "FatalError" in summary.error
    assert (summary.pages, summary.requests) == (1, 2)
    (run,) = runs_of(src.engine, cid)
    assert (run.status, run.pages, run.requests) == ("failed", 1, 2)
    assert run.error == summary.error
    assert state_of(src.engine, cid).cursor is not None

    resumed = src.sync(cid)
    assert resumed.succeeded
    assert resumed.resumed is True
    assert resumed.pages == PAGES[src.name] - 1
    assert len(store_snapshot(src.engine, store_id)) == SIZES[src.name]


def test_square_expired_cursor_on_resume_restarts_the_window(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    src = Source("square", engine, settings)
    src.generate(SIZES["square"])
    clean_store, _ = make_store()
    assert src.sync(src.connect(clean_store)).succeeded
    store_id, _ = make_store()
    cid = src.connect(store_id)
    assert src.sync(cid, transport=FailAfter(src.fake.handle, ok=2)).status == "failed"

    src.fake.expire_cursors()
    before = src.fake.requests
    summary = src.sync(cid)

    assert summary.succeeded
    assert summary.resumed is True
    assert src.fake.invalid_cursors == 1
    # The rejected cursor, then the whole window again from its first page.
    assert src.fake.requests - before == 1 + PAGES["square"]
    assert summary.requests == 1 + PAGES["square"]
    assert summary.seen == SIZES["square"]
    assert summary.created == SIZES["square"] - 200
    assert summary.unchanged == 200
    assert store_snapshot(engine, store_id) == store_snapshot(engine, clean_store)


# --- faults, auth -----------------------------------------------------------------------------


def test_twenty_percent_faults_reach_the_clean_state(
    src: Source, make_store: Callable[..., tuple[int, str]]
) -> None:
    ids = src.generate(SIZES[src.name])
    clean_store, _ = make_store()
    assert src.sync(src.connect(clean_store)).succeeded
    store_id, _ = make_store()
    cid = src.connect(store_id)

    src.fake.fault_rate = 0.2
    rng = random.Random(42)
    for i in rng.sample(ids, 5):  # and some explicit faults on top of the random ones
        src.change(i, f"Changed{i}")
    src.fake.fail_next(2, status=503)
    src.fake.timeout_next(1)
    before_faults = src.fake.faults
    summary = src.sync(cid)
    src.fake.fault_rate = 0.0
    assert summary.succeeded, summary.error
    assert src.fake.faults - before_faults >= 3
    assert summary.requests > summary.pages
    assert summary.seen == SIZES[src.name]

    assert src.sync(src.connect(clean_store), full=True).succeeded  # the clean store catches up
    assert store_snapshot(src.engine, store_id) == store_snapshot(src.engine, clean_store)


def test_retries_exhausted_fail_the_run_and_keep_the_connection_active(
    src: Source, make_store: Callable[..., tuple[int, str]]
) -> None:
    src.generate(5)
    store_id, _ = make_store()
    cid = src.connect(store_id)
    src.fake.fail_next(6, status=503)  # the clients try 6 times

    summary = src.sync(cid)

    assert summary.status == "failed"
    assert summary.error is not None
    assert summary.error.startswith("RetriableError")
    assert (summary.pages, summary.requests, src.fake.requests) == (0, 6, 6)
    (run,) = runs_of(src.engine, cid)
    assert (run.status, run.requests) == ("failed", 6)
    with make_sessionmaker(src.engine)() as session:
        connection = session.get(Connection, cid)
        assert connection is not None
        assert connection.status == "active"
    assert src.sync(cid).succeeded


def test_401_needs_attention_without_retries(
    src: Source, make_store: Callable[..., tuple[int, str]]
) -> None:
    src.generate(5)
    store_id, _ = make_store()
    token = "wrong-token-0123456789"
    cid = src.connect(store_id, token=token)

    summary = src.sync(cid)

    assert summary.status == "needs_attention"
    assert src.fake.requests == 1
    assert summary.requests == 1
    assert summary.error is not None
    assert "ConfigurationError" in summary.error
    assert token not in summary.error
    with make_sessionmaker(src.engine)() as session:
        connection = session.get(Connection, cid)
        assert connection is not None
        assert connection.status == "needs_attention"
        assert connection.last_error
        assert token not in connection.last_error
    (run,) = runs_of(src.engine, cid)
    assert run.status == "needs_attention"
    assert run.requests == 1
    assert len(store_snapshot(src.engine, store_id)) == 0

    # New credentials (connect again) and the next run succeeds; the connection is active.
    src.connect(store_id)
    assert src.sync(cid).succeeded
    with make_sessionmaker(src.engine)() as session:
        connection = session.get(Connection, cid)
        assert connection is not None
        assert (connection.status, connection.last_error) == ("active", None)


def test_invalid_policy_config_needs_attention(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    src = Source("shopify", engine, settings)
    store_id, _ = make_store()
    cid = src.connect(store_id, owned_fields=["email", "loyalty_points"])
    summary = src.sync(cid)
    assert summary.status == "needs_attention"
    assert summary.error is not None
    assert "owned_fields" in summary.error
    assert src.fake.requests == 0
    with make_sessionmaker(engine)() as session:
        connection = session.get(Connection, cid)
        assert connection is not None
        assert connection.status == "needs_attention"


def test_logs_say_what_happened_without_secrets_or_pii(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    src = Source("shopify", engine, settings)
    src.generate(300)
    store_id, _ = make_store()
    cid = src.connect(store_id)
    with structlog.testing.capture_logs() as logs:
        summary = src.sync(cid)
    ours = [e for e in logs if e["event"].startswith("sync.run.")]
    assert [e["event"] for e in ours] == [
        "sync.run.started",
        "sync.run.page",
        "sync.run.page",
        "sync.run.finished",
    ]
    assert ours[-1]["status"] == "succeeded"
    assert ours[-1]["run_id"] == summary.run_id
    assert all(e["connection_id"] == cid for e in ours)
    text = json.dumps(ours, default=str)
    assert SHOPIFY_TOKEN not in text
    assert "@example.com" not in text
    assert "First1000" not in text


def test_a_record_without_identity_is_a_conflict_listed_for_the_operator(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    src = Source("shopify", engine, settings)
    src.generate(3)
    nobody = src.fake.add_customer(
        defaultEmailAddress=None, defaultPhoneNumber=None, email=None, phone=None
    )
    store_id, _ = make_store()
    cid = src.connect(store_id)

    summary = src.sync(cid)

    assert summary.succeeded
    assert (summary.seen, summary.created, summary.conflicts) == (4, 3, 1)
    (run,) = runs_of(engine, cid)
    assert run.conflicts == 1
    with src.sessions() as session:
        (conflict,) = list_conflicts(session, store_id=store_id)
        rendered = render_conflict(conflict)
    assert (rendered["source"], rendered["external_id"]) == ("shopify", str(nobody))
    assert rendered["resolved_at"] is None


# --- dry run ----------------------------------------------------------------------------------


def test_dry_run_writes_nothing_but_reports(
    src: Source, make_store: Callable[..., tuple[int, str]]
) -> None:
    n = SIZES[src.name]
    ids = src.generate(n)
    store_id, _ = make_store()
    cid = src.connect(store_id)
    tables = ("customers", "external_references", "sync_states", "sync_runs", "connections")

    before, dump = row_counts(src.engine), table_dump(src.engine, *tables)
    summary = src.sync(cid, dry_run=True)
    assert counts(summary) == expected(
        pages=PAGES[src.name], requests=PAGES[src.name], seen=n, created=n
    )
    assert (summary.dry_run, summary.run_id) == (True, None)
    assert row_counts(src.engine) == before
    assert table_dump(src.engine, *tables) == dump

    assert src.sync(cid).succeeded
    for i in ids[:7]:
        src.change(i, f"Changed{i}")
    before, dump = row_counts(src.engine), table_dump(src.engine, *tables)
    summary = src.sync(cid, dry_run=True)
    assert counts(summary) == expected(pages=1, requests=1, seen=8, updated=7, unchanged=1)
    assert row_counts(src.engine) == before
    assert table_dump(src.engine, *tables) == dump


# --- the store operations on their own ----------------------------------------------------------


def _page(cursor: str | None, *stamps: dt.datetime, requests: int = 1) -> Any:
    from connectors.records import ForeignCustomer, Page

    records = tuple(
        ForeignCustomer(source="shopify", external_id=str(i), source_updated_at=s)
        for i, s in enumerate(stamps)
    )
    return Page(records=records, cursor=cursor, requests=requests, throttled=1, skipped=2)


T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def test_begin_save_finish_fail(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    src = Source("shopify", engine, settings)
    store_id, _ = make_store()
    cid = src.connect(store_id)
    with src.sessions() as session:
        connection = session.get(Connection, cid)
        assert connection is not None
        run, state, resumed = begin_run(session, connection, CUSTOMERS_STREAM, full=False)
        assert resumed is False
        assert (state.window_start, state.cursor, state.in_progress) == (None, None, True)
        save_page(session, state, run, _page("c1", T0, T0 + dt.timedelta(hours=2)), {"seen": 2})
        save_page(session, state, run, _page("c2", T0 + dt.timedelta(hours=1)), {"seen": 1})
        assert (state.cursor, state.pages_done) == ("c2", 2)
        assert state.high_water == T0 + dt.timedelta(hours=2)
        assert (run.pages, run.requests, run.throttled, run.skipped, run.seen) == (2, 2, 2, 4, 3)
        fail_run(session, run, status="failed", error="boom\nsecond line")
        session.commit()
        assert run.error == "boom second line"
        assert state.cursor == "c2"  # kept for the resume

        # Same `full`: resumed, cursor and window kept; a different `full`: fresh.
        run2, state, resumed = begin_run(session, connection, CUSTOMERS_STREAM, full=False)
        assert (resumed, run2.resumed, state.cursor) == (True, True, "c2")
        save_page(session, state, run2, _page(None), {"seen": 0})
        finish_run(session, state, run2)
        session.commit()
        assert state.watermark == T0 + dt.timedelta(hours=2)
        assert (state.in_progress, state.cursor, run2.status) == (False, None, "succeeded")

        run3, state, resumed = begin_run(session, connection, CUSTOMERS_STREAM, full=False)
        assert resumed is False
        assert state.window_start == T0 + dt.timedelta(hours=2)
        finish_run(session, state, run3)  # nothing seen: the watermark stays
        assert state.watermark == T0 + dt.timedelta(hours=2)

        run4, state, _ = begin_run(session, connection, CUSTOMERS_STREAM, full=False)
        run5, state, resumed = begin_run(session, connection, CUSTOMERS_STREAM, full=True)
        assert resumed is False
        assert state.window_start is None
        assert run4.status == "failed"  # superseded while still running
        session.commit()
        with pytest.raises(ValueError, match="status"):
            fail_run(session, run5, status="succeeded", error="x")


@pytest.mark.postgres_only
def test_concurrent_begin_run_starts_one_fresh_run(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    src = Source("shopify", engine, settings)
    store_id, _ = make_store()
    cid = src.connect(store_id)
    barrier = threading.Barrier(4)
    results: list[bool] = []
    errors: list[BaseException] = []

    def begin() -> None:
        try:
            with src.sessions() as session:
                connection = session.get(Connection, cid)
                assert connection is not None
                barrier.wait()
                _, _, resumed = begin_run(session, connection, CUSTOMERS_STREAM, full=False)
                session.commit()
                results.append(resumed)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=begin) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [False, True, True, True]
    with src.sessions() as session:
        assert session.scalar(select(func.count()).select_from(SyncState)) == 1
        statuses = sorted(r.status for r in session.scalars(select(SyncRun)))
        assert statuses == ["failed", "failed", "failed", "running"]


def test_policy_from_config() -> None:
    assert policy_from_config({}) == IngestPolicy()
    assert policy_from_config(None) == IngestPolicy()
    policy = policy_from_config({"owned_fields": ["email", "phone"], "match_by": ["email"]})
    assert policy == IngestPolicy(owned_fields=frozenset({"email", "phone"}), match_by=("email",))
    bad: dict[str, Any]
    for bad in (
        {"owned_fields": "email"},
        {"owned_fields": ["stamps"]},
        {"match_by": []},
        {"match_by": ["email", "email"]},
        {"match_by": ["name"]},
        {"match_by": "email"},
    ):
        with pytest.raises(ValidationFailed):
            policy_from_config(bad)


def test_pick_connection(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    src = Source("square", engine, settings)
    store_id, _ = make_store()
    with src.sessions() as session:
        with pytest.raises(NotFound):
            pick_connection(session, store_id=10**6, source="square")
        with pytest.raises(ValidationFailed, match="loyalty-sync connect square"):
            pick_connection(session, store_id=store_id, source="square")
    first = src.connect(store_id)
    with src.sessions() as session:
        assert pick_connection(session, store_id=store_id, source="square").id == first
        with pytest.raises(NotFound):
            pick_connection(session, store_id=store_id, source="shopify", connection_id=first)
        second, _ = connect(
            session,
            store_id=store_id,
            source="square",
            account="MLOTHER",
            access_token="t",
            api_base_url=None,
            api_version=None,
            key=KEY,
        )
        session.commit()
        with pytest.raises(ValidationFailed, match="--connection"):
            pick_connection(session, store_id=store_id, source="square")
        picked = pick_connection(
            session, store_id=store_id, source="square", connection_id=second.id
        )
        assert picked.id == second.id


def test_list_and_render_conflicts(
    engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    other, _ = make_store()
    with make_sessionmaker(engine)() as session:
        session.add_all(
            [
                SyncConflict(
                    store_id=store_id,
                    source="shopify",
                    external_id="1",
                    kind="ambiguous",
                    detail="email and phone belong to two customers",
                    customer_ids=[3, 4],
                    occurrences=2,
                    first_seen_at=T0,
                    last_seen_at=T0,
                ),
                SyncConflict(
                    store_id=store_id,
                    source="square",
                    external_id="2",
                    kind="no_identity",
                    detail="neither email nor phone",
                    customer_ids=[],
                    occurrences=1,
                    first_seen_at=T0,
                    last_seen_at=T0,
                    resolved_at=T0,
                ),
                SyncConflict(
                    store_id=other,
                    source="square",
                    external_id="3",
                    kind="no_identity",
                    detail="neither email nor phone",
                    customer_ids=[],
                    occurrences=1,
                    first_seen_at=T0,
                    last_seen_at=T0,
                ),
            ]
        )
        session.commit()
        assert [c.external_id for c in list_conflicts(session)] == ["1", "3"]
        assert [c.external_id for c in list_conflicts(session, store_id=store_id)] == ["1"]
        assert [
            c.external_id for c in list_conflicts(session, store_id=store_id, include_resolved=True)
        ] == ["1", "2"]
        with pytest.raises(NotFound):
            list_conflicts(session, store_id=10**6)
        rendered = render_conflict(list_conflicts(session, store_id=store_id)[0])
    assert rendered == {
        "id": rendered["id"],
        "store_id": store_id,
        "source": "shopify",
        "external_id": "1",
        "kind": "ambiguous",
        "detail": "email and phone belong to two customers",
        "customer_ids": [3, 4],
        "occurrences": 2,
        "first_seen_at": T0.isoformat(),
        "last_seen_at": T0.isoformat(),
        "resolved_at": None,
    }
    json.dumps(rendered)
