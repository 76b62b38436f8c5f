"""Scheduling: which connections are due, page-sized sync steps, the sync lock, the status
report, retention, and the Celery tasks that tie them together (run in process against a fake
Shopify served over real HTTP on 127.0.0.1)."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from models.connections import connect
from models.crypto import derive_key
from models.db import make_sessionmaker
from models.schedule import (
    JITTER,
    connection_is_due,
    due_connections,
    is_due,
    jittered,
    prune_handled,
    sync_status,
)
from models.tables import (
    Connection,
    Customer,
    OutboxMessage,
    SyncRun,
    SyncState,
    WebhookEvent,
    utcnow,
)
from tests.conftest import is_postgres
from tests.fakes.shopify import API_VERSION, TOKEN, FakeShopify
from worker import scheduled
from worker.locks import exclusive_lock
from worker.settings import Settings
from worker.sync import run_customer_sync

SECRET = "schedule-test-secret"
KEY = derive_key(SECRET)
NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
REDIS_URL = "redis://127.0.0.1:6379/0"


def _connect(engine: Engine, store_id: int, base_url: str, shop: str = "s.myshopify.com") -> int:
    with make_sessionmaker(engine)() as s:
        row, _ = connect(
            s,
            store_id=store_id,
            source="shopify",
            account=shop,
            access_token=TOKEN,
            api_base_url=base_url,
            api_version=API_VERSION,
            key=KEY,
        )
        s.commit()
        return row.id


def _run(session: Session, connection_id: int, *, started: dt.datetime, status: str) -> SyncRun:
    connection = session.get(Connection, connection_id)
    assert connection is not None
    run = SyncRun(
        store_id=connection.store_id,
        connection_id=connection_id,
        stream="customers",
        status=status,
        started_at=started,
        pages=0,
        requests=0,
        throttled=0,
        seen=0,
        created=0,
        updated=0,
        linked=0,
        unchanged=0,
        skipped=0,
        conflicts=0,
        deleted=0,
    )
    session.add(run)
    session.flush()
    return run


# --- due connections ---------------------------------------------------------------------------


def test_a_connection_is_due_after_its_jittered_interval(
    engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    cid = _connect(engine, store_id, "http://127.0.0.1:9")
    with Session(engine) as s:
        assert due_connections(s, now=NOW, default_interval=900) == [cid]  # never synced
        run = _run(s, cid, started=NOW, status="succeeded")
        s.commit()
        wait = jittered(dt.timedelta(seconds=900), cid, run.id)
        assert (
            dt.timedelta(seconds=900 * (1 - JITTER))
            <= wait
            <= dt.timedelta(seconds=900 * (1 + JITTER))
        )
        assert (
            due_connections(s, now=NOW + wait - dt.timedelta(seconds=1), default_interval=900) == []
        )
        assert due_connections(s, now=NOW + wait, default_interval=900) == [cid]
        # The connection's own interval wins over the default.
        connection = s.get(Connection, cid)
        assert connection is not None
        connection.config = {"sync_interval_seconds": 60}
        s.commit()
        assert connection_is_due(s, cid, now=NOW + dt.timedelta(seconds=70), default_interval=900)


def test_jitter_spreads_connections_within_bounds() -> None:
    interval = dt.timedelta(minutes=15)
    waits = {jittered(interval, cid, 1) for cid in range(1, 200)}
    assert len(waits) > 150  # spread, not in step
    assert all(interval * (1 - JITTER) <= w <= interval * (1 + JITTER) for w in waits)
    assert jittered(interval, 5, 9) == jittered(interval, 5, 9)  # stable for a re-check


def test_disabled_and_needs_attention_connections_are_never_due(
    engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    off = _connect(engine, store_id, "http://127.0.0.1:9", "off.myshopify.com")
    broken = _connect(engine, store_id, "http://127.0.0.1:9", "broken.myshopify.com")
    live = _connect(engine, store_id, "http://127.0.0.1:9", "live.myshopify.com")
    with Session(engine) as s:
        s.get(Connection, off).enabled = False  # type: ignore[union-attr]
        s.get(Connection, broken).status = "needs_attention"  # type: ignore[union-attr]
        s.commit()
        assert due_connections(s, now=NOW, default_interval=900) == [live]


def test_a_run_in_progress_is_due_again_only_once_it_stopped_moving(
    engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    cid = _connect(engine, store_id, "http://127.0.0.1:9")
    with Session(engine) as s:
        run = _run(s, cid, started=NOW - dt.timedelta(hours=5), status="running")
        s.add(
            SyncState(
                connection_id=cid,
                stream="customers",
                in_progress=True,
                run_id=run.id,
                updated_at=NOW,
            )
        )
        s.commit()
        connection = s.get(Connection, cid)
        state = s.scalars(select(SyncState)).one()
        assert connection is not None
        # Its steps are moving: leave it to them, however old the run.
        assert not is_due(
            connection, state, run, now=NOW + dt.timedelta(minutes=5), default_interval=1
        )
        # Nothing moved for 10 minutes: its worker died; resume it.
        assert is_due(
            connection, state, run, now=NOW + dt.timedelta(minutes=10), default_interval=1
        )


# --- page-sized steps --------------------------------------------------------------------------


def test_a_long_sync_runs_in_page_sized_steps_as_one_run(
    engine: Engine, db_url: str, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    fake = FakeShopify(seed=3, bucket_max=1e6, restore_rate=1e6)
    fake.generate(1700)  # 7 pages of 250
    cid = _connect(engine, store_id, "https://fake.test")
    sessions = make_sessionmaker(engine)
    settings = Settings(DATABASE_URL=db_url)
    steps = []
    continue_run = None
    while True:
        summary = run_customer_sync(
            sessions,
            connection_id=cid,
            settings=settings,
            key=KEY,
            transport=httpx.MockTransport(fake.handle),
            sleep=lambda _s: None,
            max_pages=3,
            continue_run=continue_run,
        )
        steps.append(summary)
        if not summary.more:
            break
        assert summary.status == "running"
        continue_run = summary.run_id
    assert [s.pages for s in steps] == [3, 3, 1]
    assert steps[-1].status == "succeeded"
    assert {s.run_id for s in steps} == {steps[0].run_id}  # one run, continued
    assert steps[1].resumed
    assert steps[2].resumed
    with Session(engine) as s:
        runs = s.scalars(select(SyncRun)).all()
        assert len(runs) == 1
        assert runs[0].status == "succeeded"
        assert runs[0].pages == 7
        assert runs[0].created == 1700
        assert runs[0].requests == sum(step.requests for step in steps)
        state = s.scalars(select(SyncState)).one()
        assert not state.in_progress
        assert state.cursor is None
        assert state.watermark is not None
        assert s.scalar(select(func.count()).select_from(Customer)) == 1700


# --- the lock ----------------------------------------------------------------------------------


def _lock_backends(engine: Engine, db_url: str) -> list[tuple[str, str | None]]:
    backends: list[tuple[str, str | None]] = [("database", None)]
    if is_postgres(db_url):
        backends.append(("redis", REDIS_URL))
    return backends


def test_the_sync_lock_is_exclusive_and_released(engine: Engine, db_url: str) -> None:
    for _name, redis_url in _lock_backends(engine, db_url):
        lock = f"test:{uuid.uuid4().hex}"
        with exclusive_lock(lock, redis_url=redis_url, engine=engine) as first:
            assert first
            with exclusive_lock(lock, redis_url=redis_url, engine=engine) as second:
                assert not second
            with exclusive_lock(lock + "-other", redis_url=redis_url, engine=engine) as other:
                assert other
        with exclusive_lock(lock, redis_url=redis_url, engine=engine) as again:
            assert again


HOLDER = textwrap.dedent(
    """
    import sys, time
    from models.db import make_engine
    from worker.locks import exclusive_lock
    engine = make_engine(sys.argv[1])
    redis_url = sys.argv[3] or None
    with exclusive_lock(sys.argv[2], redis_url=redis_url, engine=engine, ttl=1.5) as held:
        print("held" if held else "busy", flush=True)
        time.sleep(120)
    """
)


def test_a_killed_holder_releases_the_lock(engine: Engine, db_url: str, tmp_path: Path) -> None:
    for name, redis_url in _lock_backends(engine, db_url):
        lock = f"test:{uuid.uuid4().hex}"
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, db_url, lock, redis_url or ""],
            stdout=subprocess.PIPE,
            cwd=Path.cwd(),
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == b"held"
            with exclusive_lock(lock, redis_url=redis_url, engine=engine) as held:
                assert not held, name
            time.sleep(2)  # the heartbeat keeps a live holder's Redis lock past its ttl
            with exclusive_lock(lock, redis_url=redis_url, engine=engine) as held:
                assert not held, name
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            if holder.stdout is not None:
                holder.stdout.close()
        # Advisory and file locks die with the process; a Redis lock at its ttl.
        deadline = time.monotonic() + 5
        while True:
            with exclusive_lock(lock, redis_url=redis_url, engine=engine) as held:
                if held:
                    break
            assert time.monotonic() < deadline, f"{name} lock never released"
            time.sleep(0.2)


# --- the tasks, in process ----------------------------------------------------------------------


@pytest.fixture
def tasks_on(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The scheduled tasks pointed at this test's database; messages captured, not sent."""
    from worker import tasks

    settings = Settings(DATABASE_URL=db_url, SECRET_KEY=SECRET, SYNC_INTERVAL_SECONDS="600")
    monkeypatch.setattr(scheduled, "settings", lambda: settings)
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(
        scheduled.sync_connection, "apply_async", lambda **kw: sent.append(kw["kwargs"])
    )
    tasks.database.use(db_url)
    yield sent
    tasks.database.use(None)


def test_dispatch_enqueues_due_connections_and_steps_chain_to_the_end(
    engine: Engine,
    make_store: Callable[..., tuple[int, str]],
    tasks_on: list[dict[str, Any]],
) -> None:
    store_id, _ = make_store()
    fake = FakeShopify(seed=5, bucket_max=1e6, restore_rate=1e6)
    fake.generate(700)  # 3 pages of 250
    with fake.serve() as base_url:
        cid = _connect(engine, store_id, base_url)
        assert scheduled.dispatch_syncs.run() == {"dispatched": 1}
        assert tasks_on == [{"connection_id": cid}]
        tasks_on.clear()
        first = scheduled.sync_connection.run(connection_id=cid, max_pages=2)
        assert first["status"] == "running"
        assert first["more"] is True
        assert tasks_on == [
            {"connection_id": cid, "full": False, "continue_run": first["run_id"], "max_pages": 2}
        ]
        second = scheduled.sync_connection.run(**tasks_on.pop())
        assert second["status"] == "succeeded"
        assert second["run_id"] == first["run_id"]
        assert tasks_on == []
        # Just synced: not due again, so a duplicate scheduled message does nothing ...
        assert scheduled.dispatch_syncs.run() == {"dispatched": 0}
        assert scheduled.sync_connection.run(connection_id=cid)["status"] == "not_due"
        # ... and while another worker holds the lock, a step skips.
        engine_lock = scheduled.database.engine
        assert engine_lock is not None
        with exclusive_lock(
            scheduled.sync_lock_name(cid), redis_url=None, engine=engine_lock
        ) as held:
            assert held
            assert (
                scheduled.sync_connection.run(connection_id=cid, force=True)["status"] == "locked"
            )
        forced = scheduled.sync_connection.run(connection_id=cid, force=True)
        assert forced["status"] == "succeeded"
        assert forced["unchanged"] >= 1
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Customer)) == 700
        assert s.scalar(select(func.count()).select_from(SyncRun)) == 2


# --- status and retention ----------------------------------------------------------------------


def test_sync_status_reports_runs_lag_and_errors(
    engine: Engine, db_url: str, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    other_store, _ = make_store()
    fake = FakeShopify(seed=2)
    fake.generate(40)
    cid = _connect(engine, store_id, "https://fake.test")
    never = _connect(engine, other_store, "https://fake.test", "never.myshopify.com")
    summary = run_customer_sync(
        make_sessionmaker(engine),
        connection_id=cid,
        settings=Settings(DATABASE_URL=db_url),
        key=KEY,
        transport=httpx.MockTransport(fake.handle),
        sleep=lambda _s: None,
    )
    assert summary.succeeded
    with Session(engine) as s:
        report = sync_status(s, store_id=store_id, now=fake.latest + dt.timedelta(minutes=3))
        assert len(report) == 1
        row = report[0]
        assert row["connection_id"] == cid
        assert row["stream"] == "customers"
        assert row["lag_seconds"] == pytest.approx(180, abs=1)
        assert row["last_run"]["status"] == "succeeded"
        assert row["last_run"]["created"] == 40
        assert row["in_progress"] is False
        everything = sync_status(s)
        assert {r["connection_id"] for r in everything} == {cid, never}
        fresh = next(r for r in everything if r["connection_id"] == never)
        assert fresh["last_run"] is None
        assert fresh["lag_seconds"] is None


def test_retention_deletes_only_old_handled_rows(
    engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    old = utcnow() - dt.timedelta(days=40)
    with Session(engine) as s:
        for i, status in enumerate(["done", "ignored", "failed", "invalid", "pending", "done"]):
            s.add(
                WebhookEvent(
                    source="shopify",
                    dedupe_key=f"k{i}",
                    status=status,
                    body="{}",
                    headers={},
                    received_at=old if i < 5 else utcnow(),
                )
            )
        for i, status in enumerate(["delivered", "skipped", "failed", "pending"]):
            s.add(
                OutboxMessage(
                    store_id=store_id,
                    kind="push",
                    idempotency_key=f"o{i}",
                    payload={},
                    status=status,
                    created_at=old,
                )
            )
        s.commit()
        pruned = prune_handled(s, older_than=utcnow() - dt.timedelta(days=30))
        s.commit()
        assert pruned == {"events": 2, "outbox": 2}
        left = sorted(s.scalars(select(WebhookEvent.status)).all())
        assert left == ["done", "failed", "invalid", "pending"]
        assert sorted(s.scalars(select(OutboxMessage.status)).all()) == ["failed", "pending"]


def test_a_run_that_failed_half_way_is_resumed_after_a_minute(
    engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    cid = _connect(engine, store_id, "http://127.0.0.1:9")
    with Session(engine) as s:
        run = _run(s, cid, started=NOW - dt.timedelta(minutes=3), status="failed")
        run.finished_at = NOW
        s.add(
            SyncState(
                connection_id=cid,
                stream="customers",
                in_progress=True,
                run_id=run.id,
                updated_at=NOW,
            )
        )
        s.commit()
        assert due_connections(s, now=NOW + dt.timedelta(seconds=30), default_interval=900) == []
        assert due_connections(s, now=NOW + dt.timedelta(seconds=60), default_interval=900) == [cid]
