"""Scheduled and operator-triggered Celery tasks: customer syncs in page-sized steps, single
customer resyncs, stamp reconciliation, outbox delivery and retention.

Names are dotted by area; `worker.celery_app.TASK_ROUTES` sends each area to its queue
(`syncs`, `outbox`), so a long backfill never delays webhook processing. The beat schedule that
triggers the periodic ones is `worker.celery_app.beat_schedule`.

- `loyalty_sync.syncs.dispatch` (beat, every minute): enqueue a sync step for every connection
  whose own, jittered interval has passed (or whose run in progress stopped moving).
- `loyalty_sync.syncs.run`: one step of one connection's customer sync — at most
  `SYNC_STEP_PAGES` pages under the (connection, stream) lock, then it enqueues the next step of
  the same run. A worker killed mid-step loses nothing: the cursor of every committed page is
  saved, the lock expires (or dies with its connection/process), and the next dispatch resumes.
- `loyalty_sync.syncs.resync_customer`: one customer from its source, now.
- `loyalty_sync.stamps.reconcile_all` (beat, hourly) → `loyalty_sync.stamps.reconcile` per store.
- `loyalty_sync.outbox.deliver` (beat every 30 s, and woken after commits that add rows).
- `loyalty_sync.maintenance.retention` (beat): delete old handled events and delivered rows.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any, Final

import structlog
from sqlalchemy.exc import DBAPIError

from models.schedule import connection_is_due, due_connections, prune_handled
from models.sync_state import CUSTOMERS_STREAM
from models.tables import utcnow
from worker.celery_app import app
from worker.locks import exclusive_lock
from worker.settings import Settings
from worker.tasks import database

log = structlog.get_logger("worker.scheduled")

DISPATCH_TASK: Final = "loyalty_sync.syncs.dispatch"
SYNC_TASK: Final = "loyalty_sync.syncs.run"
RESYNC_TASK: Final = "loyalty_sync.syncs.resync_customer"
RECONCILE_ALL_TASK: Final = "loyalty_sync.stamps.reconcile_all"
RECONCILE_TASK: Final = "loyalty_sync.stamps.reconcile"
OUTBOX_TASK: Final = "loyalty_sync.outbox.deliver"
RETENTION_TASK: Final = "loyalty_sync.maintenance.retention"
# One step of a sync: enough pages to amortise the task, few enough to stay far below the
# task time limit even when the source throttles (Shopify 250/page, Square 100/page).
SYNC_STEP_PAGES: Final = 20
# A lock outlives a dead holder by at most this long (Redis; advisory/file locks die at once).
SYNC_LOCK_TTL: Final = 120.0
OUTBOX_BATCH: Final = 200
OUTBOX_MAX_BATCHES: Final = 10


@functools.cache
def settings() -> Settings:
    """This worker process's settings (the environment, read once)."""
    return Settings()


def _key() -> bytes:
    from worker.secret_key import resolve_secret_key

    return resolve_secret_key(settings())


def sync_lock_name(connection_id: int, stream: str = CUSTOMERS_STREAM) -> str:
    return f"sync:{connection_id}:{stream}"


@app.task(name=DISPATCH_TASK, ignore_result=True)
def dispatch_syncs() -> dict[str, int]:
    """Enqueue one sync step per due connection."""
    with database.sessionmaker()() as session:
        due = due_connections(session, default_interval=settings().sync_interval_seconds)
    for connection_id in due:
        sync_connection.apply_async(
            kwargs={"connection_id": connection_id}, expires=settings().sync_interval_seconds
        )
    if due:
        log.info("sync.dispatched", connections=len(due))
    return {"dispatched": len(due)}


@app.task(
    name=SYNC_TASK,
    ignore_result=True,
    # The database went away mid-step (restart, failover): every committed page is kept with
    # its cursor; try again shortly and the run resumes where it stopped.
    autoretry_for=(DBAPIError,),
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=12,
    bind=True,
)
def sync_connection(
    self: Any,
    connection_id: int,
    full: bool = False,
    force: bool = False,
    continue_run: int | None = None,
    max_pages: int = SYNC_STEP_PAGES,
) -> dict[str, Any]:
    """One step of a connection's customer sync (see the module docstring).

    Scheduled steps re-check that the connection is still due when they start (a queue backlog
    never turns into back-to-back runs); `force` (an operator's `sync run --enqueue`),
    continuation steps and retries don't.
    """
    from worker.sync import run_customer_sync

    sessions = database.sessionmaker()
    retry = bool(getattr(self.request, "retries", 0))
    if not force and continue_run is None and not retry:
        with sessions() as session:
            if not connection_is_due(
                session, connection_id, default_interval=settings().sync_interval_seconds
            ):
                return {"status": "not_due", "connection_id": connection_id}
    engine = database.engine
    assert engine is not None  # made with the sessionmaker
    with exclusive_lock(
        sync_lock_name(connection_id),
        redis_url=settings().redis_url,
        engine=engine,
        ttl=SYNC_LOCK_TTL,
    ) as held:
        if not held:
            log.info("sync.step_skipped_locked", connection_id=connection_id)
            return {"status": "locked", "connection_id": connection_id}
        summary = run_customer_sync(
            sessions,
            connection_id=connection_id,
            full=full,
            settings=settings(),
            key=_key(),
            max_pages=max_pages,
            continue_run=continue_run,
        )
    if summary.more:
        sync_connection.apply_async(
            kwargs={
                "connection_id": connection_id,
                "full": full,
                "continue_run": summary.run_id,
                "max_pages": max_pages,
            }
        )
    return {"connection_id": connection_id, **summary.as_dict()}


@app.task(name=RESYNC_TASK, ignore_result=True)
def resync_customer_task(connection_id: int, external_id: str) -> dict[str, Any]:
    from worker.sync import resync_customer

    return resync_customer(
        database.sessionmaker(),
        connection_id=connection_id,
        external_id=external_id,
        settings=settings(),
        key=_key(),
    )


@app.task(name=RECONCILE_ALL_TASK, ignore_result=True)
def reconcile_all() -> dict[str, int]:
    """Enqueue a stamp reconciliation for every store with an earning connection."""
    from sqlalchemy import select

    from models.tables import Connection

    with database.sessionmaker()() as session:
        rows = session.execute(
            select(Connection.store_id, Connection.config).where(Connection.enabled.is_(True))
        ).all()
    stores = sorted({store_id for store_id, config in rows if (config or {}).get("earn")})
    for store_id in stores:
        reconcile_store_task.apply_async(kwargs={"store_id": store_id})
    return {"stores": len(stores)}


@app.task(name=RECONCILE_TASK, ignore_result=True)
def reconcile_store_task(store_id: int, dry_run: bool = False) -> dict[str, Any]:
    """Re-pull the store's recent orders/payments, apply what webhooks missed, check balances.
    One reconciliation per store at a time."""
    from worker.reconcile import reconcile_store

    sessions = database.sessionmaker()
    engine = database.engine
    assert engine is not None
    with exclusive_lock(
        f"reconcile:{store_id}", redis_url=settings().redis_url, engine=engine, ttl=SYNC_LOCK_TTL
    ) as held:
        if not held:
            return {"status": "locked", "store_id": store_id}
        result: dict[str, Any] = reconcile_store(
            sessions,
            store_id=store_id,
            settings=settings(),
            key=_key(),
            window=dt.timedelta(hours=settings().reconcile_window_hours),
            dry_run=dry_run,
        )
    return result


@app.task(name=OUTBOX_TASK, ignore_result=True)
def deliver_outbox() -> dict[str, int]:
    """Deliver due outbox rows, batch after batch, until none is due (bounded per task)."""
    from worker.outbox import deliver_due

    totals: dict[str, int] = {}
    for _ in range(OUTBOX_MAX_BATCHES):
        counts = deliver_due(
            database.sessionmaker(), settings=settings(), key=_key(), limit=OUTBOX_BATCH
        )
        for name, value in counts.items():
            totals[name] = totals.get(name, 0) + int(value)
        if int(counts.get("claimed", 0)) < OUTBOX_BATCH:
            break
    return totals


def send_outbox() -> None:
    """Wake the outbox workers (after a commit that added rows; raises if the broker is down)."""
    deliver_outbox.apply_async(
        expires=60, retry=True, retry_policy={"max_retries": 2, "interval_start": 0}
    )


@app.task(name=RETENTION_TASK, ignore_result=True)
def retention() -> dict[str, int]:
    """Delete handled webhook events and delivered outbox rows older than the retention."""
    cutoff = utcnow() - dt.timedelta(days=settings().event_retention_days)
    with database.sessionmaker()() as session, session.begin():
        pruned = prune_handled(session, older_than=cutoff)
    if any(pruned.values()):
        log.info("retention.pruned", **pruned)
    return pruned


def send_sync(connection_id: int, *, full: bool = False) -> str:
    """Enqueue a forced sync of a connection (operator); returns the task id."""
    result = sync_connection.apply_async(
        kwargs={"connection_id": connection_id, "full": full, "force": True}
    )
    return str(result.id)


__all__ = [
    "DISPATCH_TASK",
    "OUTBOX_TASK",
    "RECONCILE_ALL_TASK",
    "RECONCILE_TASK",
    "RESYNC_TASK",
    "RETENTION_TASK",
    "SYNC_TASK",
    "deliver_outbox",
    "dispatch_syncs",
    "reconcile_all",
    "reconcile_store_task",
    "resync_customer_task",
    "retention",
    "send_outbox",
    "send_sync",
    "sync_connection",
]
