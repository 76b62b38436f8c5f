"""Prometheus metrics of the service, defined in one place, and how they are exposed.

The API serves them at `/metrics`; a worker exposes them on `METRICS_PORT` (an exporter thread).
Label values are bounded (sources, statuses, kinds, connection ids) — never customer data.

    from worker.metrics import WEBHOOKS_RECEIVED
    WEBHOOKS_RECEIVED.labels(source="shopify", status="accepted").inc()

Celery's prefork pool counts in child processes, so the worker runs prometheus_client's
multiprocess mode: `prepare_multiprocess()` (main process, before the pool forks) points every
process at one directory (`PROMETHEUS_MULTIPROC_DIR`, or a fresh temporary directory), where each
process writes its values to its own memory-mapped files; the exporter (`start_exporter`) sums
them at scrape time, so counts of children that exited (or were replaced) are kept.
`child_exited(pid)` drops a dead child's live gauges. The gauges computed from the database
(outbox, sync lag) are not set in workers: the exporter serves them from
`worker.metrics_db.DbGaugeCollector`, so no process writes them and no series goes stale.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# The classic text format: what every Prometheus version (and the exporter's default) speaks.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# --- webhook intake (api/) ---------------------------------------------------------------------
WEBHOOKS_RECEIVED = Counter(
    "loyalty_webhooks_received_total",
    "Webhook deliveries answered 2xx/400, by outcome (accepted, duplicate, ignored, invalid).",
    ["source", "status"],
)
WEBHOOKS_REJECTED = Counter(
    "loyalty_webhooks_rejected_total",
    "Webhook deliveries refused before storage (bad_signature, too_large, disabled).",
    ["source", "reason"],
)
WEBHOOKS_DUPLICATED = Counter(
    "loyalty_webhooks_duplicated_total",
    "Webhook deliveries already in the inbox (same delivery id).",
    ["source"],
)

# --- inbox processing (worker/) ----------------------------------------------------------------
EVENTS_PROCESSED = Counter(
    "loyalty_events_processed_total",
    "Inbox events applied to the store.",
    ["source"],
)
EVENTS_FAILED = Counter(
    "loyalty_events_failed_total",
    "Inbox event attempts that failed (retried with backoff, parked as failed at the end).",
    ["source"],
)

# --- syncs -------------------------------------------------------------------------------------
SYNC_RECORDS = Counter(
    "loyalty_sync_records_total",
    "Records handled by customer syncs, by connection and outcome (created, updated, ...).",
    ["source", "connection_id", "outcome"],
)
SYNC_LAG = Gauge(
    "loyalty_sync_lag_seconds",
    "Seconds since the connection's stream last completed a sync (its watermark).",
    ["source", "connection_id", "stream"],
    multiprocess_mode="livemostrecent",
)
UPSTREAM_REQUESTS = Counter(
    "loyalty_upstream_requests_total",
    "HTTP requests to foreign APIs, by source and status class (2xx, 4xx, 5xx, error).",
    ["source", "status"],
)
UPSTREAM_THROTTLES = Counter(
    "loyalty_upstream_throttles_total",
    "Times a foreign API throttled us (429 / THROTTLED) or the rate budget made us wait.",
    ["source"],
)

# --- outbox ------------------------------------------------------------------------------------
OUTBOX_PENDING = Gauge(
    "loyalty_outbox_pending",
    "Outbox rows waiting for delivery, by kind.",
    ["kind"],
    multiprocess_mode="livemostrecent",
)
OUTBOX_FAILED = Gauge(
    "loyalty_outbox_failed",
    "Outbox rows parked as failed, by kind.",
    ["kind"],
    multiprocess_mode="livemostrecent",
)
OUTBOX_DELIVERED = Counter(
    "loyalty_outbox_delivered_total",
    "Outbox deliveries made, by kind and channel (email, sms, shopify, square, pass_service).",
    ["kind", "channel"],
)

# --- stamps ------------------------------------------------------------------------------------
STAMPS_EARNED = Counter(
    "loyalty_stamps_earned_total",
    "Stamps added by orders/payments from a source.",
    ["source"],
)
STAMPS_REVERSED = Counter(
    "loyalty_stamps_reversed_total",
    "Stamps taken back by refunds/cancellations from a source.",
    ["source"],
)
EVENT_LATENCY = Histogram(
    "loyalty_event_latency_seconds",
    "From inbox receipt to applied, per event.",
    ["source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

ALL_METRICS: tuple[Counter | Gauge | Histogram, ...] = (
    WEBHOOKS_RECEIVED,
    WEBHOOKS_REJECTED,
    WEBHOOKS_DUPLICATED,
    EVENTS_PROCESSED,
    EVENTS_FAILED,
    SYNC_RECORDS,
    SYNC_LAG,
    UPSTREAM_REQUESTS,
    UPSTREAM_THROTTLES,
    OUTBOX_PENDING,
    OUTBOX_FAILED,
    OUTBOX_DELIVERED,
    STAMPS_EARNED,
    STAMPS_REVERSED,
    EVENT_LATENCY,
)


# --- multiprocess mode (the Celery worker) -----------------------------------------------------


def multiprocess_enabled() -> bool:
    """True when this process writes its values to `PROMETHEUS_MULTIPROC_DIR` files."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def _metrics_in_use() -> list[str]:
    """Names of our metrics that already hold a value (a labelled child was created)."""
    return [family.name for metric in ALL_METRICS for family in metric.collect() if family.samples]


def prepare_multiprocess(directory: str | os.PathLike[str] | None = None) -> Path:
    """Switch this process (and every process it forks later) to multiprocess mode.

    Call it once in the worker's main process before the pool forks and before any metric is
    used. The directory is `directory`, else `$PROMETHEUS_MULTIPROC_DIR`, else a new temporary
    directory (removed when this process exits). Its `*.db` files are deleted first: counts of
    a previous run never leak into this one. `PROMETHEUS_MULTIPROC_DIR` is set for children.

    Raises `RuntimeError` when a metric already holds a value in this process (those values
    would be invisible to the exporter: the call came too late) and `ValueError` when the path
    exists but is not a directory.
    """
    in_use = _metrics_in_use()
    if in_use:
        raise RuntimeError(
            "prepare_multiprocess() must run before any metric is used; already used: "
            + ", ".join(sorted(in_use))
        )
    configured = directory if directory is not None else os.environ.get(MULTIPROC_DIR_VARIABLE)
    if configured:
        path = Path(configured).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise ValueError(f"{MULTIPROC_DIR_VARIABLE} {str(path)!r} is not a directory")
        path.mkdir(parents=True, exist_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="loyalty-sync-metrics-"))
        _remove_at_exit(path)
    stale = list(path.glob("*.db"))
    for file in stale:
        file.unlink(missing_ok=True)
    os.environ[MULTIPROC_DIR_VARIABLE] = str(path)
    if not multiprocess_enabled():
        # prometheus_client picks its value class when first imported; the worker decides
        # later (after its CLI parsed the settings), so the class is switched here. Every
        # metric child is created after this point (checked above), so all use files.
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    log.info("metrics.multiprocess", directory=str(path), stale_files_removed=len(stale))
    return path


def _remove_at_exit(path: Path) -> None:
    owner = os.getpid()

    def _remove() -> None:
        # Forked children inherit atexit handlers: only the process that made it removes it.
        if os.getpid() == owner:
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(_remove)


def child_exited(pid: int | None = None) -> None:
    """Bookkeeping for a pool process that ends (Celery's `worker_process_shutdown`): its live
    gauges are dropped; its counters stay in the totals. No-op outside multiprocess mode."""
    directory = os.environ.get(MULTIPROC_DIR_VARIABLE)
    if not multiprocess_enabled() or not directory:
        return
    multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
        pid if pid is not None else os.getpid(), directory
    )


# --- exposition --------------------------------------------------------------------------------


def registry(collectors: Sequence[Collector] = ()) -> CollectorRegistry:
    """What to expose: the summed files of every process in multiprocess mode, else this
    process's default registry; plus `collectors` (e.g. the database gauges). A family a
    collector describes (its `describe()`) replaces the family of the same name from the base,
    so no metric appears twice."""
    exposed = CollectorRegistry(auto_describe=False)
    replaced = {
        family.name
        for collector in collectors
        for family in (collector.describe() if hasattr(collector, "describe") else ())
    }
    base: Collector = REGISTRY
    if multiprocess_enabled():
        base = multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            None, path=os.environ.get(MULTIPROC_DIR_VARIABLE)
        )
    exposed.register(_Forward(base, replaced))
    for collector in collectors:
        exposed.register(collector)
    return exposed


class _Forward:
    """Exposes another collector's families except `replaced` ones (no `describe`: a registry
    can't be registered into another by name, and nothing is registered twice)."""

    def __init__(self, inner: Collector, replaced: set[str]) -> None:
        self._inner = inner
        self._replaced = replaced

    def collect(self) -> Iterable[Metric]:
        return (family for family in self._inner.collect() if family.name not in self._replaced)


def render_latest(collectors: Sequence[Collector] = ()) -> bytes:
    """The Prometheus text format of `registry(collectors)` (media type `CONTENT_TYPE`)."""
    return generate_latest(registry(collectors))


@dataclass(slots=True)
class Exporter:
    """A running exporter: its HTTP server (one thread per scrape) and serving thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_exporter(
    port: int,
    *,
    addr: str = "0.0.0.0",  # noqa: S104 - scraped from other hosts/pods; exposes no secrets
    collectors: Sequence[Collector] = (),
) -> Exporter | None:
    """Serve the metrics on `addr:port` from a daemon thread (`METRICS_PORT`; 0 = off → None).

    In multiprocess mode it serves the sum over every process of the worker (call
    `prepare_multiprocess()` first), else this process's registry; `collectors` are added (the
    worker passes `DbGaugeCollector`). Raises `OSError` when the port can't be bound.
    """
    if port == 0:
        log.info("metrics.exporter_disabled")
        return None
    server, thread = start_http_server(port, addr=addr, registry=registry(collectors))
    exporter = Exporter(server=server, thread=thread)
    log.info(
        "metrics.exporter_started",
        addr=addr,
        port=exporter.port,
        multiprocess=multiprocess_enabled(),
    )
    return exporter


T = TypeVar("T")


class Cached(Generic[T]):
    """`fn()` at most once per `min_interval` seconds; callers in between get the last result.

    Concurrent callers of a stale value wait for one refresh instead of each running `fn`. A
    failing `fn` is logged (`metrics.refresh_failed`, no details that could hold secrets) and
    the previous result is kept until the next interval: a scrape never fails because the
    database is down, and never hammers it either.
    """

    def __init__(
        self,
        fn: Callable[[], T],
        *,
        min_interval: float,
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fn = fn
        self.min_interval = min_interval
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._at: float | None = None
        self.value: T | None = None
        self.calls = 0
        self.failures = 0

    def __call__(self) -> T | None:
        with self._lock:
            now = self._clock()
            if self._at is not None and now - self._at < self.min_interval:
                return self.value
            self._at = now
            self.calls += 1
            try:
                self.value = self._fn()
            except Exception as exc:  # noqa: BLE001 - keep serving the last figures
                self.failures += 1
                log.warning("metrics.refresh_failed", what=self.name, error_type=type(exc).__name__)
            return self.value


# --- upstream requests (connectors/http.py observer) -------------------------------------------

_upstream_children: dict[tuple[str, str], Any] = {}
_throttle_children: dict[str, Any] = {}


def _count_upstream(source: str, status: str, throttled: bool) -> None:
    requests = _upstream_children.get((source, status))
    if requests is None:
        requests = _upstream_children[(source, status)] = UPSTREAM_REQUESTS.labels(
            source=source, status=status
        )
    requests.inc()
    if throttled:
        throttles = _throttle_children.get(source)
        if throttles is None:
            throttles = _throttle_children[source] = UPSTREAM_THROTTLES.labels(source=source)
        throttles.inc()


def install_upstream_observer() -> None:
    """Count every request the connectors make (`UPSTREAM_REQUESTS` by source and status
    class, `UPSTREAM_THROTTLES` for 429/THROTTLED). Idempotent; call at worker and CLI start."""
    from connectors import http

    if _count_upstream not in http.observers:
        http.observers.append(_count_upstream)


def uninstall_upstream_observer() -> None:
    """Undo `install_upstream_observer` (tests)."""
    from connectors import http

    while _count_upstream in http.observers:
        http.observers.remove(_count_upstream)
