"""Gauges computed from the database: outbox backlog and sync lag.

Two aggregate queries, nothing per row:

- outbox: `SELECT kind, status, count(*) FROM outbox WHERE status IN ('pending', 'failed')
  GROUP BY kind, status` (served by the `(status, next_attempt_at)` index);
- sync lag: one row per (enabled connection, stream) with a watermark — seconds from the
  stream's watermark (the newest source update a completed run has seen) to now. A stream that
  never completed a run has no watermark and no series (alert on `absent()` if it matters).

The API calls `refresh_db_gauges` from `/metrics` (through `worker.metrics.Cached`, at most once
every `REFRESH_SECONDS`). The worker's exporter serves the same figures through
`DbGaugeCollector` (its own engine, queried at scrape time, cached the same way), because the
worker runs in multiprocess mode where gauges set in one process can't be removed again.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from models.outbox import KINDS
from models.tables import Connection, OutboxMessage, SyncState
from worker import metrics

REFRESH_SECONDS = 5.0

LagKey = tuple[str, str, str]
"""`(source, connection_id, stream)` — the label values of `SYNC_LAG`."""


@dataclass(frozen=True, slots=True)
class DbGauges:
    """One reading of the database gauges. Every known outbox kind is present (0 when empty)."""

    outbox_pending: dict[str, int] = field(default_factory=dict)
    outbox_failed: dict[str, int] = field(default_factory=dict)
    sync_lag: dict[LagKey, float] = field(default_factory=dict)


def read_db_gauges(session: Session, *, now: dt.datetime | None = None) -> DbGauges:
    """Run the two aggregate queries (read-only; the caller owns the session)."""
    now = now or dt.datetime.now(dt.UTC)
    pending = dict.fromkeys(sorted(KINDS), 0)
    failed = dict.fromkeys(sorted(KINDS), 0)
    rows = session.execute(
        select(OutboxMessage.kind, OutboxMessage.status, func.count())
        .where(OutboxMessage.status.in_(("pending", "failed")))
        .group_by(OutboxMessage.kind, OutboxMessage.status)
    )
    for kind, status, count in rows:
        (pending if status == "pending" else failed)[kind] = int(count)
    lag: dict[LagKey, float] = {}
    states = session.execute(
        select(Connection.source, SyncState.connection_id, SyncState.stream, SyncState.watermark)
        .join(Connection, Connection.id == SyncState.connection_id)
        .where(Connection.enabled.is_(True), SyncState.watermark.is_not(None))
    )
    for source, connection_id, stream, watermark in states:
        if watermark is None:  # excluded by the query; keeps the type checker informed
            continue
        # UTCDateTime returns aware values; a naive one would be UTC too.
        seen = watermark if watermark.tzinfo else watermark.replace(tzinfo=dt.UTC)
        lag[(source, str(connection_id), stream)] = max(0.0, (now - seen).total_seconds())
    return DbGauges(outbox_pending=pending, outbox_failed=failed, sync_lag=lag)


_lag_series: set[LagKey] = set()
_lag_lock = threading.Lock()


def refresh_db_gauges(session: Session, *, now: dt.datetime | None = None) -> DbGauges:
    """Read the database gauges and set `OUTBOX_PENDING`, `OUTBOX_FAILED` and `SYNC_LAG` in
    this process's registry; lag series of streams that went away (connection deleted or
    disabled) are removed. Returns the reading. For single-process use (the API); the worker
    uses `DbGaugeCollector`."""
    reading = read_db_gauges(session, now=now)
    for kind, count in reading.outbox_pending.items():
        metrics.OUTBOX_PENDING.labels(kind=kind).set(count)
    for kind, count in reading.outbox_failed.items():
        metrics.OUTBOX_FAILED.labels(kind=kind).set(count)
    with _lag_lock:
        for key, seconds in reading.sync_lag.items():
            metrics.SYNC_LAG.labels(*key).set(seconds)
        if not metrics.multiprocess_enabled():  # removal isn't supported across processes
            for key in _lag_series - reading.sync_lag.keys():
                metrics.SYNC_LAG.remove(*key)
        _lag_series.clear()
        _lag_series.update(reading.sync_lag)
    return reading


def refresher(
    sessions: Callable[[], Session], *, min_interval: float = REFRESH_SECONDS
) -> metrics.Cached[DbGauges]:
    """`refresh_db_gauges` in a fresh session from `sessions`, at most once per `min_interval`
    seconds (what `/metrics` calls on every scrape)."""

    def run() -> DbGauges:
        with sessions() as session:
            return refresh_db_gauges(session)

    return metrics.Cached(run, min_interval=min_interval, name="db_gauges")


def _family(metric: Gauge, labels: list[str]) -> GaugeMetricFamily:
    [described] = metric.describe()
    return GaugeMetricFamily(described.name, described.documentation, labels=labels)


class DbGaugeCollector:
    """A collector for the worker's exporter: the database gauges, read at scrape time (at most
    once per `min_interval` seconds, last reading kept while the database is unreachable).

    Build it with `for_url(DATABASE_URL)` in the process that serves the exporter: its engine
    (one connection) is created on the first scrape, never before a fork.
    """

    def __init__(
        self, sessions: Callable[[], Session], *, min_interval: float = REFRESH_SECONDS
    ) -> None:
        def run() -> DbGauges:
            with sessions() as session:
                return read_db_gauges(session)

        self._reading = metrics.Cached(run, min_interval=min_interval, name="db_gauges")
        self._close: Callable[[], None] = lambda: None

    def close(self) -> None:
        """Release the engine `for_url` made (if any); later scrapes make a new one."""
        self._close()

    @classmethod
    def for_url(
        cls, database_url: str, *, min_interval: float = REFRESH_SECONDS
    ) -> DbGaugeCollector:
        """A collector with its own lazily created one-connection engine for `database_url`."""
        from models.db import make_engine, make_sessionmaker

        lock = threading.Lock()
        made: list[tuple[Engine, sessionmaker[Session]]] = []

        def sessions() -> Session:
            with lock:
                if not made:
                    engine = make_engine(database_url, pool_size=1)
                    made.append((engine, make_sessionmaker(engine)))
            return made[0][1]()

        def forget_in_child() -> None:
            # A pool process inherits the socket but must neither use nor close it.
            if made:
                made[0][0].dispose(close=False)

        def close() -> None:
            with lock:
                if made:
                    made.pop()[0].dispose()

        os.register_at_fork(after_in_child=forget_in_child)
        collector = cls(sessions, min_interval=min_interval)
        collector._close = close
        return collector

    def describe(self) -> Iterable[Metric]:
        """The families it serves (no database access): they replace the registry's own."""
        return [
            _family(metrics.OUTBOX_PENDING, ["kind"]),
            _family(metrics.OUTBOX_FAILED, ["kind"]),
            _family(metrics.SYNC_LAG, ["source", "connection_id", "stream"]),
        ]

    def collect(self) -> Iterable[Metric]:
        reading = self._reading()
        if reading is None:  # never read successfully: no figures rather than wrong ones
            return
        pending = _family(metrics.OUTBOX_PENDING, ["kind"])
        for kind, count in reading.outbox_pending.items():
            pending.add_metric([kind], count)
        failed = _family(metrics.OUTBOX_FAILED, ["kind"])
        for kind, count in reading.outbox_failed.items():
            failed.add_metric([kind], count)
        lag = _family(metrics.SYNC_LAG, ["source", "connection_id", "stream"])
        for key, seconds in reading.sync_lag.items():
            lag.add_metric(list(key), seconds)
        yield from (pending, failed, lag)
