"""Group commit for webhook deliveries: many concurrent requests, one transaction.

A request hands its verified `Delivery` to the `IntakeWriter` and awaits the outcome. The writer
collects what arrives together (up to `max_rows` deliveries, or `max_wait` seconds after the
first one reached an idle writer; whatever queued up during a commit goes straight into the
next one), inserts the batch with one `INSERT … ON CONFLICT DO NOTHING RETURNING` in one
transaction on its own thread (sync SQLAlchemy; the event loop never blocks on the database),
and only then resolves each request's future. So a 200 always means "committed".

A failed batch (database down, lock timeout) fails only its own requests with
`IntakeUnavailable` (→ 503 + Retry-After: the sender retries, nothing is acknowledged that
wasn't stored); the writer keeps serving the next batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import structlog
from sqlalchemy import Connection, Engine

from models import inbox
from models.inbox import Delivery, Outcome, Route
from worker.metrics import WEBHOOKS_DUPLICATED, WEBHOOKS_RECEIVED

log = structlog.get_logger("api.intake")

# Metric children bound once: a committed batch costs one `inc` per (source, status) seen.
SOURCES = ("shopify", "square")
_RECEIVED = {
    (source, status): WEBHOOKS_RECEIVED.labels(source=source, status=status)
    for source in SOURCES
    for status in ("accepted", "duplicate", "ignored", "invalid")
}
_DUPLICATED = {source: WEBHOOKS_DUPLICATED.labels(source=source) for source in SOURCES}


def count_outcomes(deliveries: Sequence[Delivery], outcomes: Sequence[Outcome]) -> None:
    """Count a committed batch: `received` by the status each request is answered with (a
    signed body that doesn't parse is `invalid`, stored or not), `duplicated` per delivery
    already in the inbox."""
    received: Counter[tuple[str, str]] = Counter()
    duplicated: Counter[str] = Counter()
    for delivery, outcome in zip(deliveries, outcomes, strict=True):
        status: str = "invalid" if delivery.invalid_reason is not None else outcome
        received[(delivery.source, status)] += 1
        if outcome == "duplicate":
            duplicated[delivery.source] += 1
    for (source, status), n in received.items():
        child = _RECEIVED.get((source, status))
        if child is None:
            child = WEBHOOKS_RECEIVED.labels(source=source, status=status)
        child.inc(n)
    for source, n in duplicated.items():
        dup = _DUPLICATED.get(source)
        if dup is None:
            dup = WEBHOOKS_DUPLICATED.labels(source=source)
        dup.inc(n)


RETRY_AFTER_SECONDS = 5


class IntakeUnavailable(Exception):
    """The delivery was not stored (batch failed or writer not running): answer 503."""


class RouteCache:
    """`(source, account)` → `Route` (or None: no connection), reused for `ttl` seconds.

    Used from the writer thread only. Misses are cached too, so a storm from an unknown shop costs
    one look-up per `ttl`; a newly connected shop is routed at most `ttl` seconds late (its
    earlier deliveries stay stored as `ignored`).
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[Route | None, float]] = {}
        self.lookups = 0

    def resolve(
        self, conn: Connection, deliveries: Sequence[Delivery]
    ) -> dict[tuple[str, str], Route | None]:
        now = self._clock()
        out: dict[tuple[str, str], Route | None] = {}
        missing: dict[str, set[str]] = {}
        for d in deliveries:
            if d.account is None or d.invalid_reason is not None:
                continue
            key = (d.source, d.account)
            if key in out:
                continue
            cached = self._entries.get(key)
            if cached is not None and cached[1] > now:
                out[key] = cached[0]
            else:
                missing.setdefault(d.source, set()).add(d.account)
        for source, accounts in missing.items():
            self.lookups += 1
            found = inbox.find_routes(conn, source, accounts)
            for account in accounts:
                route = found.get(account)
                out[(source, account)] = route
                if self.ttl > 0:
                    self._entries[(source, account)] = (route, now + self.ttl)
        if len(self._entries) > 10_000:  # bounded: drop expired entries now and then
            self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
        return out


class _Runner:
    """The writer's state on one event loop: its queue, wake-up event, task and thread."""

    def __init__(self, writer: IntakeWriter, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: deque[tuple[Delivery, asyncio.Future[Outcome]]] = deque()
        self.wakeup = asyncio.Event()
        self.closing = False
        # One thread, created on first use: one transaction at a time, in arrival order.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook-intake")
        self.task = loop.create_task(writer._run(self), name="webhook-intake")

    def close(self) -> None:
        """Let the task commit what is queued and end (callable from any thread)."""
        self.closing = True
        if self.loop.is_closed():
            self.executor.shutdown(wait=False)
            return
        try:
            self.loop.call_soon_threadsafe(self.wakeup.set)
        except RuntimeError:  # the loop closed meanwhile
            self.executor.shutdown(wait=False)


class IntakeWriter:
    """The in-process group-commit writer of one API process (see the module docstring).

    `start()`/`stop()` come from the app's lifespan. Should requests arrive on another event
    loop than the one it started on (some test clients run each call in a portal of its own),
    the writer moves to that loop. `on_committed(n)` is called on the writer thread after each
    commit that added `n > 0` new pending rows (e.g. to wake the workers once per batch); its
    errors are logged, not raised.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_rows: int = 200,
        max_wait: float = 0.002,
        route_ttl: float = 5.0,
        on_committed: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_rows = max_rows
        self.max_wait = max_wait
        self.on_committed = on_committed
        self.routes = RouteCache(route_ttl)
        # Statistics (read by tests, benchmarks, logs): committed transactions, rows offered,
        # failed batches, and rejected requests by reason (`shopify.bad_signature`, …).
        self.batches = 0
        self.deliveries = 0
        self.failed_batches = 0
        self.rejected: Counter[str] = Counter()
        self._runner: _Runner | None = None
        self._started = False

    async def start(self) -> None:
        """Start the writer on the running event loop (the app's lifespan does this)."""
        if self._runner is None:
            self._runner = _Runner(self, asyncio.get_running_loop())
        self._started = True

    async def stop(self) -> None:
        """Commit what is queued, then stop (new submissions get `IntakeUnavailable`)."""
        self._started = False
        runner, self._runner = self._runner, None
        if runner is None:
            return
        runner.close()
        if runner.loop is asyncio.get_running_loop():
            await runner.task
        # Otherwise its own loop finishes it (if that loop still runs).

    async def submit(self, delivery: Delivery) -> Outcome:
        """Queue `delivery` and wait until its batch is committed; returns its outcome."""
        if not self._started:
            raise IntakeUnavailable("the webhook intake is not running")
        loop = asyncio.get_running_loop()
        runner = self._runner
        if runner is None or runner.loop is not loop:
            if runner is not None:
                runner.close()
            runner = self._runner = _Runner(self, loop)
        future: asyncio.Future[Outcome] = loop.create_future()
        runner.pending.append((delivery, future))
        runner.wakeup.set()
        return await future

    async def _run(self, runner: _Runner) -> None:
        idle = True
        try:
            while True:
                if not runner.pending:
                    if runner.closing:
                        return
                    runner.wakeup.clear()
                    await runner.wakeup.wait()
                    idle = True
                    continue
                if idle and self.max_wait > 0 and len(runner.pending) < self.max_rows:
                    # The first delivery after a quiet spell: give its concurrent peers a moment.
                    await asyncio.sleep(self.max_wait)
                idle = False
                count = min(len(runner.pending), self.max_rows)
                batch = [runner.pending.popleft() for _ in range(count)]
                await self._flush(runner, batch)
        finally:
            runner.executor.shutdown(wait=False)

    async def _flush(
        self, runner: _Runner, batch: list[tuple[Delivery, asyncio.Future[Outcome]]]
    ) -> None:
        deliveries = [d for d, _ in batch]
        try:
            outcomes = await runner.loop.run_in_executor(runner.executor, self._write, deliveries)
        except Exception as exc:  # noqa: BLE001 - any failure fails this batch only
            self.failed_batches += 1
            log.error(
                "webhook.intake_batch_failed",
                rows=len(batch),
                error_type=type(exc).__name__,
                error=str(getattr(exc, "orig", None) or exc)[:300],
            )
            for _, future in batch:
                if not future.done():
                    future.set_exception(IntakeUnavailable("the inbox could not be written"))
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():  # the request may have gone away; the row is stored anyway
                future.set_result(outcome)

    def _write(self, deliveries: list[Delivery]) -> list[Outcome]:
        """One transaction for the whole batch (runs on the writer thread)."""
        started = time.perf_counter()
        with self.engine.begin() as conn:
            routes = self.routes.resolve(conn, deliveries)
            outcomes, new_pending = inbox.insert_batch(conn, deliveries, routes)
        self.batches += 1
        self.deliveries += len(deliveries)
        count_outcomes(deliveries, outcomes)
        log.debug(
            "webhook.intake_batch",
            rows=len(deliveries),
            new_pending=new_pending,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        if new_pending and self.on_committed is not None:
            try:
                self.on_committed(new_pending)
            except Exception as exc:  # noqa: BLE001 - the rows are committed; never fail them
                log.error("webhook.on_committed_failed", error_type=type(exc).__name__)
        return outcomes
