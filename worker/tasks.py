"""Celery tasks of the webhook inbox, the API's worker waker, and the worker's periodic sweep.

- `loyalty_sync.webhooks.drain`: process due `pending` inbox rows (`models.webhook_processing
  .drain`), at most `DRAIN_MAX_BATCHES` batches, then re-enqueue itself if more may be due.
- `loyalty_sync.webhooks.sweep`: put rows whose worker died back to `pending`, then drain.

Each worker process opens one engine, lazily, from `DATABASE_URL` (never inherited across a fork).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import structlog
from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models import webhook_processing
from models.db import make_engine, make_sessionmaker
from worker.celery_app import app, is_sqla_broker
from worker.settings import Settings

log = structlog.get_logger("worker.tasks")

DRAIN_TASK: Final = "loyalty_sync.webhooks.drain"
SWEEP_TASK: Final = "loyalty_sync.webhooks.sweep"
DRAIN_BATCH_SIZE: Final = 500
DRAIN_MAX_BATCHES: Final = 20
# A wake message nobody consumed within this long is dropped (the sweep covers what it meant).
WAKE_EXPIRES_SECONDS: Final = 600
WAKE_INTERVAL_SECONDS: Final = 0.05
SWEEP_INTERVAL_SECONDS: Final = 30.0
# Consumed messages of the embedded broker are deleted after this long.
BROKER_KEEP: Final = dt.timedelta(hours=1)
# Sending a wake never blocks long when the broker is down: the sweep re-drives the rows.
_SEND_RETRY_POLICY: Final = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2}


# --- the database of this process -----------------------------------------------------------


class _Database:
    """One engine per process, created on first use (after the prefork pool forked)."""

    def __init__(self) -> None:
        self.url: str | None = None
        self.engine: Engine | None = None
        self.sessions: sessionmaker[Session] | None = None
        self.lock = threading.Lock()

    def use(self, url: str | None) -> None:
        """Point this process at `url` (None: `DATABASE_URL`); the engine is made lazily."""
        with self.lock:
            self._dispose()
            self.url = url

    def sessionmaker(self) -> sessionmaker[Session]:
        with self.lock:
            if self.sessions is None:
                url = self.url or Settings().database_url
                self.engine = make_engine(url, pool_size=2)
                self.sessions = make_sessionmaker(self.engine)
            return self.sessions

    def forked(self) -> None:
        """In a fresh child process: forget the parent's connections without closing them."""
        self.lock = threading.Lock()
        if self.engine is not None:
            self.engine.dispose(close=False)
        self.engine = None
        self.sessions = None

    def _dispose(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        self.engine = None
        self.sessions = None


database = _Database()


@worker_process_init.connect
def _on_worker_process_init(**_kwargs: Any) -> None:
    database.forked()


@worker_process_shutdown.connect
def _on_worker_process_shutdown(pid: int | None = None, **_kwargs: Any) -> None:
    from worker import metrics

    metrics.child_exited(pid)


# --- tasks -------------------------------------------------------------------------------------


@app.task(name=DRAIN_TASK, ignore_result=True)
def drain_inbox(
    batch_size: int = DRAIN_BATCH_SIZE, max_batches: int = DRAIN_MAX_BATCHES
) -> dict[str, int]:
    """Drain due inbox rows; re-enqueue itself when it stopped at `max_batches`."""
    started = time.perf_counter()
    result = webhook_processing.drain(
        database.sessionmaker(), batch_size=batch_size, max_batches=max_batches
    )
    totals = result.as_dict()
    _count_events(totals)
    _count_stamps(result.stamps_earned, result.stamps_reversed)
    if any(result.stamps_earned.values()) or any(result.stamps_reversed.values()):
        # Live earning queued each change's pass update and push: deliver them now.
        wake_outbox()
    more = result.batches >= max_batches
    if result.claimed or more:
        log.info(
            "webhook.drain",
            **totals,
            more=more,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
    if more:
        drain_inbox.apply_async(
            kwargs={"batch_size": batch_size, "max_batches": max_batches},
            expires=WAKE_EXPIRES_SECONDS,
        )
    return totals


def _count_events(totals: dict[str, int]) -> None:
    """Inbox events applied / failed (all sources: a batch mixes them)."""
    from worker.metrics import EVENTS_FAILED, EVENTS_PROCESSED

    if totals.get("done"):
        EVENTS_PROCESSED.labels(source="all").inc(totals["done"])
    failed = totals.get("failed", 0) + totals.get("retried", 0)
    if failed:
        EVENTS_FAILED.labels(source="all").inc(failed)


def _count_stamps(earned: dict[str, int], reversed_: dict[str, int]) -> None:
    """Stamps earned / reversed by orders, per source."""
    from worker.metrics import STAMPS_EARNED, STAMPS_REVERSED

    for source, stamps in earned.items():
        if stamps:
            STAMPS_EARNED.labels(source=source).inc(stamps)
    for source, stamps in reversed_.items():
        if stamps:
            STAMPS_REVERSED.labels(source=source).inc(stamps)


@app.task(name=SWEEP_TASK, ignore_result=True)
def sweep_inbox() -> dict[str, int]:
    """Re-drive rows whose worker died (lease expired), then drain what is due."""
    lease = dt.timedelta(seconds=Settings().webhook_lease_seconds)
    with database.sessionmaker()() as session, session.begin():
        swept = webhook_processing.sweep(session, lease=lease)
    pruned = prune_embedded_broker(str(app.conf.broker_url))
    drained = drain_inbox.run()
    return {"swept": swept, "pruned": pruned, **drained}


_broker_engines: dict[str, Engine] = {}


def prune_embedded_broker(url: str, *, keep: dt.timedelta = BROKER_KEEP) -> int:
    """kombu's SQLAlchemy transport keeps every consumed message (`visible = false`) forever:
    delete those consumed longer than `keep` ago. Returns how many; 0 for other brokers."""
    if not is_sqla_broker(url):
        return 0
    engine = _broker_engines.get(url)
    if engine is None:
        engine = _broker_engines[url] = create_engine(
            url.split("+", 1)[1], connect_args={"timeout": 30}
        )
    # The transport stamps `timestamp` with naive local time (datetime.now) on each update.
    cutoff = dt.datetime.now() - keep  # noqa: DTZ005
    try:
        with engine.begin() as conn:
            result = conn.execute(
                text("DELETE FROM kombu_message WHERE visible = :no AND timestamp < :cutoff"),
                {"no": False, "cutoff": cutoff},
            )
    except OperationalError as exc:  # no table yet, or busy: next sweep
        log.info("broker.prune_skipped", error=str(exc.orig)[:200])
        return 0
    return int(result.rowcount or 0)


def wake_outbox() -> None:
    """Enqueue an outbox delivery after a commit that queued rows (best effort: when the broker
    can't take it, the beat's periodic delivery sends them)."""
    from worker.scheduled import send_outbox

    try:
        send_outbox()
    except Exception as exc:  # noqa: BLE001 - the rows are committed; the beat delivers them
        log.warning("outbox.wake_failed", error_type=type(exc).__name__)


def send_drain() -> None:
    """Enqueue one drain (raises when the broker can't be reached)."""
    drain_inbox.apply_async(
        expires=WAKE_EXPIRES_SECONDS, retry=True, retry_policy=_SEND_RETRY_POLICY
    )


def send_sweep() -> None:
    sweep_inbox.apply_async(
        expires=WAKE_EXPIRES_SECONDS, retry=True, retry_policy=_SEND_RETRY_POLICY
    )


# --- waking the workers from the API ------------------------------------------------------------


class DrainWaker:
    """`on_webhooks_committed` for the API: one drain message per burst of commits, not one per
    delivery, sent from its own thread (the intake writer never waits on the broker).

    A call only sets a flag; the thread sends one message, then waits `interval` seconds, so
    commits during that window share the next message. Every commit is followed by a message
    sent after it, so no committed row waits for the periodic sweep (unless the broker is down).
    """

    def __init__(
        self, send: Callable[[], None] = send_drain, *, interval: float = WAKE_INTERVAL_SECONDS
    ) -> None:
        self.send = send
        self.interval = interval
        self.sent = 0
        self.failures = 0
        self.notified_rows = 0
        self._dirty = False
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, rows: int) -> None:
        self.notified_rows += rows
        self._dirty = True
        self._wanted.set()

    def start(self) -> DrainWaker:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="drain-waker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Send the wake still owed, then end the thread."""
        self._stopping.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()  # before reading the flag: a later call sets both again
            if self._dirty:
                self._dirty = False
                try:
                    self.send()
                    self.sent += 1
                except Exception as exc:  # noqa: BLE001 - rows are committed; the sweep re-drives
                    self.failures += 1
                    log.warning(
                        "webhook.wake_failed", error_type=type(exc).__name__, error=str(exc)[:200]
                    )
            if self._stopping.is_set():
                return
            self._stopping.wait(self.interval)


# --- the worker's periodic sweep (beat arrives in a later issue) -------------------------------


class PeriodicSweep:
    """A thread in the worker's main process: enqueue a sweep (which drains) every `interval`
    seconds, and one drain at once (rows that arrived while no worker ran).

    When `parent_pid` is given (`up` runs the worker as its child), the worker stops itself
    should that parent go away.
    """

    def __init__(
        self,
        *,
        interval: float = SWEEP_INTERVAL_SECONDS,
        parent_pid: int | None = None,
        send_sweep: Callable[[], None] = send_sweep,
        send_drain: Callable[[], None] = send_drain,
    ) -> None:
        self.interval = interval
        self.parent_pid = parent_pid
        self._send_sweep = send_sweep
        self._send_drain = send_drain
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeriodicSweep:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inbox-sweep", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._thread = None

    def _orphaned(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _send(self, send: Callable[[], None], what: str) -> None:
        try:
            send()
        except Exception as exc:  # noqa: BLE001 - tried again on the next tick
            log.warning(
                "webhook.periodic_send_failed",
                task=what,
                error_type=type(exc).__name__,
                error=str(exc)[:200],
            )

    def _run(self) -> None:
        self._send(self._send_drain, DRAIN_TASK)
        next_sweep = time.monotonic() + self.interval
        while not self._stopping.wait(min(1.0, self.interval)):
            if self._orphaned():
                log.warning("worker.parent_gone", parent_pid=self.parent_pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if time.monotonic() >= next_sweep:
                self._send(self._send_sweep, SWEEP_TASK)
                next_sweep = time.monotonic() + self.interval


__all__ = [
    "DRAIN_TASK",
    "SWEEP_TASK",
    "DrainWaker",
    "PeriodicSweep",
    "database",
    "drain_inbox",
    "send_drain",
    "sweep_inbox",
]
