"""What the scheduler needs from the store: which connections are due for a sync, the operator's
status report, and retention of handled webhook events. No HTTP, no Celery, no settings.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from models.errors import NotFound
from models.sync_state import CUSTOMERS_STREAM
from models.tables import (
    Connection,
    OutboxMessage,
    Store,
    SyncRun,
    SyncState,
    WebhookEvent,
    is_valid_id,
    utcnow,
)

# A run in progress whose state has not moved for this long lost its worker (its chain of
# steps broke): the next dispatch resumes it from the saved cursor.
STALE_AFTER: Final = dt.timedelta(minutes=10)
# A run that failed half-way is resumed (from its cursor) this long after it failed.
RETRY_AFTER: Final = dt.timedelta(minutes=1)
# Each connection's interval is stretched by up to ±JITTER so connections don't pull in step.
JITTER: Final = 0.1
# Webhook events that may be deleted once old: handled ones. `failed`/`invalid` stay for the
# operator (replay / inspection) and `pending`/`processing` are still work.
PRUNABLE_EVENT_STATUSES: Final = ("done", "ignored")
PRUNABLE_OUTBOX_STATUSES: Final = ("delivered", "skipped")


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def interval_of(connection: Connection, default: float) -> dt.timedelta:
    """The connection's sync interval (`config.sync_interval_seconds`, else `default`)."""
    raw = (connection.config or {}).get("sync_interval_seconds")
    seconds = float(raw) if isinstance(raw, int | float) and raw > 0 else default
    return dt.timedelta(seconds=seconds)


def jittered(interval: dt.timedelta, connection_id: int, run_id: int | None) -> dt.timedelta:
    """`interval` * (1 +/- JITTER), deterministic per (connection, last run) so a re-check of the
    same connection gives the same answer."""
    fraction = zlib.crc32(f"{connection_id}:{run_id}".encode()) / 0xFFFFFFFF
    return interval * (1 - JITTER + 2 * JITTER * fraction)


def _last_runs(session: Session, stream: str) -> dict[int, SyncRun]:
    latest = (
        select(SyncRun.connection_id, func.max(SyncRun.id).label("run_id"))
        .where(SyncRun.stream == stream, SyncRun.dry_run.is_(False))
        .group_by(SyncRun.connection_id)
        .subquery()
    )
    rows = session.scalars(select(SyncRun).join(latest, SyncRun.id == latest.c.run_id)).all()
    return {run.connection_id: run for run in rows}


def is_due(
    connection: Connection,
    state: SyncState | None,
    last_run: SyncRun | None,
    *,
    now: dt.datetime,
    default_interval: float,
    stale_after: dt.timedelta = STALE_AFTER,
) -> bool:
    """Whether a scheduled incremental sync of `connection` should start (or resume) now."""
    if not connection.enabled or connection.status != "active":
        return False
    if state is not None and state.in_progress:
        if last_run is not None and last_run.status != "running":
            # The run in progress ended failed (source outage, database gone): resume it from
            # its cursor once RETRY_AFTER has passed.
            ended = _aware(last_run.finished_at) or _aware(last_run.started_at)
            return ended is None or now - ended >= RETRY_AFTER
        # A chain of steps is working on it, unless it stopped moving (its worker died).
        moved = _aware(state.updated_at)
        return moved is None or now - moved >= stale_after
    if last_run is None:
        return True
    started = _aware(last_run.started_at)
    assert started is not None
    interval = jittered(interval_of(connection, default_interval), connection.id, last_run.id)
    return now - started >= interval


def due_connections(
    session: Session,
    *,
    now: dt.datetime | None = None,
    default_interval: float,
    stream: str = CUSTOMERS_STREAM,
    stale_after: dt.timedelta = STALE_AFTER,
) -> list[int]:
    """Ids of the enabled, active connections whose `stream` sync is due."""
    now = now or utcnow()
    connections = session.scalars(
        select(Connection)
        .where(Connection.enabled.is_(True), Connection.status == "active")
        .order_by(Connection.id)
    ).all()
    states = {
        s.connection_id: s
        for s in session.scalars(select(SyncState).where(SyncState.stream == stream))
    }
    runs = _last_runs(session, stream)
    return [
        c.id
        for c in connections
        if is_due(
            c,
            states.get(c.id),
            runs.get(c.id),
            now=now,
            default_interval=default_interval,
            stale_after=stale_after,
        )
    ]


def connection_is_due(
    session: Session,
    connection_id: int,
    *,
    now: dt.datetime | None = None,
    default_interval: float,
    stream: str = CUSTOMERS_STREAM,
) -> bool:
    """`is_due` for one connection (a scheduled step re-checks before it starts)."""
    connection = session.get(Connection, connection_id) if is_valid_id(connection_id) else None
    if connection is None:
        return False
    state = session.scalars(
        select(SyncState).where(
            SyncState.connection_id == connection_id, SyncState.stream == stream
        )
    ).one_or_none()
    last_run = session.scalars(
        select(SyncRun)
        .where(
            SyncRun.connection_id == connection_id,
            SyncRun.stream == stream,
            SyncRun.dry_run.is_(False),
        )
        .order_by(SyncRun.id.desc())
        .limit(1)
    ).one_or_none()
    return is_due(
        connection, state, last_run, now=now or utcnow(), default_interval=default_interval
    )


def _iso(value: dt.datetime | None) -> str | None:
    value = _aware(value)
    return value.isoformat() if value is not None else None


RUN_COUNTS: Final = (
    "pages",
    "requests",
    "throttled",
    "seen",
    "created",
    "updated",
    "linked",
    "unchanged",
    "skipped",
    "conflicts",
    "deleted",
)


def sync_status(
    session: Session,
    *,
    store_id: int | None = None,
    now: dt.datetime | None = None,
    streams: Sequence[str] = (CUSTOMERS_STREAM,),
) -> list[dict[str, Any]]:
    """Per connection and stream: the last run (status, times, counts, error), the lag since the
    watermark, whether a run is in progress, and the connection's own status and error.

    `streams`: the streams to report even when a connection never ran them; streams with a
    state row (e.g. `orders`) are reported too.
    """
    now = now or utcnow()
    query = select(Connection).order_by(Connection.id)
    if store_id is not None:
        if not is_valid_id(store_id) or session.get(Store, store_id) is None:
            raise NotFound("Store")
        query = query.where(Connection.store_id == store_id)
    connections = session.scalars(query).all()
    ids = [c.id for c in connections]
    states: dict[tuple[int, str], SyncState] = {}
    runs: dict[tuple[int, str], SyncRun] = {}
    if ids:
        for row in session.scalars(select(SyncState).where(SyncState.connection_id.in_(ids))):
            states[(row.connection_id, row.stream)] = row
        latest = (
            select(SyncRun.connection_id, SyncRun.stream, func.max(SyncRun.id).label("run_id"))
            .where(SyncRun.connection_id.in_(ids), SyncRun.dry_run.is_(False))
            .group_by(SyncRun.connection_id, SyncRun.stream)
            .subquery()
        )
        for last in session.scalars(select(SyncRun).join(latest, SyncRun.id == latest.c.run_id)):
            runs[(last.connection_id, last.stream)] = last
    report: list[dict[str, Any]] = []
    for connection in connections:
        names = list(streams) + sorted(
            {stream for (cid, stream) in (*states, *runs) if cid == connection.id} - set(streams)
        )
        for stream in names:
            state = states.get((connection.id, stream))
            run = runs.get((connection.id, stream))
            watermark = _aware(state.watermark) if state is not None else None
            entry: dict[str, Any] = {
                "connection_id": connection.id,
                "store_id": connection.store_id,
                "source": connection.source,
                "account": connection.account,
                "stream": stream,
                "connection_status": connection.status,
                "enabled": connection.enabled,
                "connection_error": connection.last_error,
                "in_progress": bool(state is not None and state.in_progress),
                "watermark": _iso(watermark),
                "lag_seconds": (
                    round((now - watermark).total_seconds(), 1) if watermark is not None else None
                ),
                "last_run": None,
            }
            if run is not None:
                entry["last_run"] = {
                    "id": run.id,
                    "status": run.status,
                    "full": run.full,
                    "started_at": _iso(run.started_at),
                    "finished_at": _iso(run.finished_at),
                    "error": run.error,
                    **{name: getattr(run, name) for name in RUN_COUNTS},
                }
            report.append(entry)
    return report


def prune_handled(session: Session, *, older_than: dt.datetime) -> dict[str, int]:
    """Delete handled webhook events received before `older_than` and delivered/skipped outbox
    rows created before it. Failed, invalid and pending rows are never deleted."""
    events = session.execute(
        delete(WebhookEvent).where(
            WebhookEvent.status.in_(PRUNABLE_EVENT_STATUSES),
            WebhookEvent.received_at < older_than,
        )
    )
    outbox = session.execute(
        delete(OutboxMessage).where(
            OutboxMessage.status.in_(PRUNABLE_OUTBOX_STATUSES),
            OutboxMessage.created_at < older_than,
        )
    )
    return {
        "events": int(getattr(events, "rowcount", 0) or 0),
        "outbox": int(getattr(outbox, "rowcount", 0) or 0),
    }
