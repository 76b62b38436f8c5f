"""Run one customer sync of a connection in process (an edge: opens sessions, commits).

    summary = run_customer_sync(sessionmaker, connection_id=7, settings=settings, key=key)

Transactions:

1. load the connection, its policy and credentials; `begin_run` (resume or start) — commit;
2. for each page the source gives: `apply_customer_page` + `save_page` — ONE commit per page,
   so a run that dies after page k resumes at the cursor saved with page k;
3. `finish_run` (the watermark moves) — commit.

Failures end the run instead of raising: a `ConfigurationError` (401/403, revoked token, bad
connection config) marks the connection `needs_attention` and is not retried; a
`RetriableError` left after the client's retries, or a `FatalError`, ends it `failed`. Either way
the state keeps its cursor, so the next run resumes. Anything else (a bug, Ctrl+C) marks the
run failed, best effort, and propagates.

A dry run writes nothing at all: no run row, no state change; every page is applied with
`dry_run=True` in a transaction that is rolled back. It reads the window a real run would read,
from its first page (it never consumes a saved cursor).
"""

from __future__ import annotations

import datetime as dt
import importlib
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import structlog
from sqlalchemy.orm import Session, sessionmaker

from connectors.errors import ConfigurationError, ConnectorError
from connectors.http import make_client
from connectors.ratelimit import RateBudget, make_budget
from connectors.records import ForeignCustomer, Page
from models.connections import credentials
from models.errors import NotFound, ValidationFailed
from models.ingest import IngestPolicy, PageCounts, apply_customer_page
from models.sync_state import (
    CUSTOMERS_STREAM,
    begin_run,
    fail_run,
    finish_run,
    mark_active,
    mark_needs_attention,
    planned_window,
    policy_from_config,
    read_state,
    save_page,
)
from models.tables import Connection, SyncRun, SyncState, is_valid_id
from worker.settings import Settings

# Cold-start rate budgets (capacity, refill per second). Shopify: a standard plan's GraphQL
# bucket is larger (see bench/upstream.py), but the client overwrites the budget with the
# bucket the server reports after the first answer, so starting small only costs a little wait
# on a cold start. Square publishes no limit: 10 requests/s keeps N workers polite.
SHOPIFY_BUDGET = (1000.0, 50.0)
SQUARE_BUDGET = (10.0, 10.0)

SUMMARY_KEYS = (
    "status",
    "pages",
    "requests",
    "seen",
    "created",
    "updated",
    "linked",
    "unchanged",
    "skipped",
    "conflicts",
)
EXTRA_KEYS = (
    "run_id",
    "resumed",
    "throttled",
    "deleted",
    "stale",
    "suppressed",
    "merged",
    "error",
    "dry_run",
    "more",
)


@dataclass(slots=True)
class SyncSummary:
    """What one call of `run_customer_sync` did (a dry run: what it would do)."""

    status: str = "running"
    pages: int = 0
    requests: int = 0
    seen: int = 0
    created: int = 0
    updated: int = 0
    linked: int = 0
    unchanged: int = 0
    skipped: int = 0
    conflicts: int = 0
    run_id: int | None = None
    resumed: bool = False
    throttled: int = 0
    deleted: int = 0
    stale: int = 0
    suppressed: int = 0
    merged: int = 0
    error: str | None = None
    dry_run: bool = False
    # A step of a scheduled sync stopped at its page limit: status stays "running" and the run
    # goes on in the next step (`continue_run=run_id`).
    more: bool = False

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def add_page(self, page: Page, counts: PageCounts) -> None:
        self.pages += 1
        self.skipped += page.skipped
        for name, value in counts.as_dict().items():
            if name in _COUNT_FIELDS:
                setattr(self, name, getattr(self, name) + int(value))

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*SUMMARY_KEYS, *EXTRA_KEYS)}


_COUNT_FIELDS = frozenset(
    {
        "seen",
        "created",
        "updated",
        "linked",
        "unchanged",
        "conflicts",
        "deleted",
        "merged",
        "stale",
        "suppressed",
    }
)


@dataclass(frozen=True, slots=True)
class Target:
    """What the run needs of the connection, read once (no lazy loads between transactions)."""

    id: int
    store_id: int
    source: str
    account: str
    api_base_url: str
    api_version: str | None
    config: Mapping[str, Any]


class SourceAdapter(Protocol):
    """One source behind one shape: its page iterator, request counters and two page hooks.

    `prepare_page` runs inside the page's transaction before its customers are applied and
    returns the page to apply (e.g. records enriched with data fetched only for the records
    `models.ingest.changed_records` reports changed). `after_page` runs inside the page's
    transaction, after the page's customers were applied and before the cursor is saved and
    committed — for per-record follow-ups a source needs (an import's stamp balances, list
    memberships): whatever it writes commits or rolls back with the page, so a crash resumes
    with both undone. In a dry run neither may write anything.
    """

    @property
    def requests(self) -> int: ...

    @property
    def throttled(self) -> int: ...

    def pages(
        self, *, updated_since: dt.datetime | None, overlap: dt.timedelta, cursor: str | None
    ) -> Iterator[Page]: ...

    def prepare_page(self, session: Session, *, page: Page, dry_run: bool) -> Page: ...

    def after_page(
        self, session: Session, *, page: Page, counts: PageCounts, dry_run: bool
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """Everything a source adapter factory may use to build its clients."""

    target: Target
    secrets: Mapping[str, str]
    settings: Settings
    http: httpx.Client
    budget: RateBudget | None
    sleep: Callable[[float], None]


# source → "module:factory"; a factory takes an AdapterContext and returns a SourceAdapter.
# Imported lazily: a run only loads the connector it uses.
ADAPTERS: dict[str, str] = {
    "shopify": "worker.sync:ShopifySquareAdapter",
    "square": "worker.sync:ShopifySquareAdapter",
    "appystamp": "worker.import_appystamp:make_adapter",
    "loke": "worker.import_loke:make_adapter",
}


def make_adapter(context: AdapterContext) -> SourceAdapter:
    """The adapter of the connection's source (ConfigurationError for an unknown source)."""
    spec = ADAPTERS.get(context.target.source)
    if spec is None:
        raise ConfigurationError(f"no connector for source {context.target.source!r}")
    module_name, _, attribute = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attribute)
    adapter: SourceAdapter = factory(context)
    return adapter


class ShopifySquareAdapter:
    """Shopify and Square customers: client + paginator; no per-page follow-up."""

    def __init__(self, context: AdapterContext) -> None:
        target, settings, budget = context.target, context.settings, context.budget
        access_token = context.secrets.get("access_token", "")
        self.source = target.source
        if target.source == "shopify":
            from connectors.shopify.client import ShopifyClient

            capacity, rate = SHOPIFY_BUDGET
            self.client: Any = ShopifyClient(
                http=context.http,
                shop_domain=target.account,
                access_token=access_token,
                api_version=target.api_version or settings.shopify_api_version,
                budget=budget
                or make_budget(
                    redis_url=settings.redis_url, capacity=capacity, refill_per_second=rate
                ),
                budget_key=f"shopify:{target.account}",
                sleep=context.sleep,
            )
        elif target.source == "square":
            from connectors.square.client import SquareClient

            capacity, rate = SQUARE_BUDGET
            self.client = SquareClient(
                http=context.http,
                access_token=access_token,
                square_version=settings.square_version,
                budget=budget
                or make_budget(
                    redis_url=settings.redis_url, capacity=capacity, refill_per_second=rate
                ),
                budget_key=f"square:{target.account}",
                sleep=context.sleep,
            )
        else:
            raise ConfigurationError(f"no connector for source {target.source!r}")

    @property
    def requests(self) -> int:
        return int(self.client.requests)

    @property
    def throttled(self) -> int:
        return int(self.client.throttled)

    def pages(
        self, *, updated_since: dt.datetime | None, overlap: dt.timedelta, cursor: str | None
    ) -> Iterator[Page]:
        if self.source == "shopify":
            from connectors.shopify.paginate import iter_customer_pages as shopify_pages

            return shopify_pages(
                self.client, updated_since=updated_since, overlap=overlap, cursor=cursor
            )
        from connectors.square.paginate import iter_customer_pages as square_pages

        return square_pages(
            self.client, updated_since=updated_since, overlap=overlap, cursor=cursor
        )

    def prepare_page(self, session: Session, *, page: Page, dry_run: bool) -> Page:
        return page

    def after_page(
        self, session: Session, *, page: Page, counts: PageCounts, dry_run: bool
    ) -> None:
        return None

    def fetch_customer(self, external_id: str) -> ForeignCustomer | None:
        """The source's current record of one customer; None when the source has no such
        customer (deleted)."""
        if self.source == "shopify":
            from connectors.shopify.client import fetch_customer as fetch_shopify
            from connectors.shopify.mapping import map_customer as map_shopify

            node = fetch_shopify(self.client, external_id)
            return map_shopify(node) if node is not None else None
        from connectors.square.client import fetch_customer as fetch_square
        from connectors.square.mapping import map_customer as map_square

        obj = fetch_square(self.client, external_id)
        return map_square(obj) if obj is not None else None


def _load(session: Session, connection_id: int) -> Connection:
    connection = session.get(Connection, connection_id) if is_valid_id(connection_id) else None
    if connection is None:
        raise NotFound("Connection")
    return connection


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(slots=True)
class _Plan:
    """Transaction 1's outcome: where the run reads from and what it writes to."""

    target: Target
    policy: IngestPolicy
    secrets: dict[str, str]
    window_start: dt.datetime | None
    cursor: str | None
    run: SyncRun | None  # None in a dry run
    state: SyncState | None
    # What a continued run had counted before this step (finish_run sets the totals).
    base_requests: int = 0
    base_throttled: int = 0


def _plan(
    session: Session,
    summary: SyncSummary,
    *,
    connection_id: int,
    full: bool,
    key: bytes,
    continue_run: int | None = None,
) -> _Plan | None:
    """Transaction 1: load the connection, its policy and credentials; begin (or resume) the
    run. None when the connection's config is invalid (the summary then says so)."""
    connection = _load(session, connection_id)
    target = Target(
        id=connection.id,
        store_id=connection.store_id,
        source=connection.source,
        account=connection.account,
        api_base_url=connection.api_base_url,
        api_version=connection.api_version,
        config=dict(connection.config or {}),
    )
    try:
        policy = policy_from_config(connection.config, source=connection.source)
    except ValidationFailed as exc:
        summary.status = "needs_attention"
        summary.error = f"invalid connection config: {exc}"
        if not summary.dry_run:
            mark_needs_attention(session, connection, summary.error)
            session.commit()
        return None
    secrets = credentials(connection, key=key)
    if summary.dry_run:
        window_start, _ = planned_window(
            read_state(session, target.id, CUSTOMERS_STREAM), full=full
        )
        session.rollback()
        return _Plan(target, policy, secrets, window_start, None, None, None)
    run, state, summary.resumed = begin_run(
        session, connection, CUSTOMERS_STREAM, full=full, continue_run=continue_run
    )
    summary.run_id = run.id
    plan = _Plan(target, policy, secrets, state.window_start, state.cursor, run, state)
    if continue_run is not None and run.id == continue_run:
        plan.base_requests, plan.base_throttled = run.requests, run.throttled
    session.commit()
    return plan


def _apply_page(
    session: Session, plan: _Plan, page: Page, adapter: SourceAdapter, *, dry_run: bool
) -> PageCounts:
    """One page in one transaction: apply + the source's follow-up + save the cursor, committed
    (dry run: rolled back)."""
    try:
        page = adapter.prepare_page(session, page=page, dry_run=dry_run)
        counts = apply_customer_page(
            session,
            store_id=plan.target.store_id,
            records=page.records,
            policy=plan.policy,
            dry_run=dry_run,
        )
        adapter.after_page(session, page=page, counts=counts, dry_run=dry_run)
        if plan.run is not None and plan.state is not None:
            save_page(session, plan.state, plan.run, page, counts)
            session.commit()
        else:
            session.rollback()
    except BaseException:
        session.rollback()
        raise
    return counts


def _end_failed(session: Session, plan: _Plan, summary: SyncSummary, exc: ConnectorError) -> None:
    """A source failure: the run ends failed / needs_attention; the state keeps its cursor."""
    needs_attention = isinstance(exc, ConfigurationError)
    summary.status = "needs_attention" if needs_attention else "failed"
    summary.error = f"{type(exc).__name__}: {exc}"
    if plan.run is None:
        return
    session.rollback()
    if needs_attention:
        mark_needs_attention(session, _load(session, plan.target.id), summary.error)
    fail_run(
        session,
        plan.run,
        status=summary.status,
        error=summary.error,
        requests=plan.base_requests + summary.requests,
        throttled=plan.base_throttled + summary.throttled,
    )
    session.commit()


def _end_crashed(session: Session, plan: _Plan, summary: SyncSummary, exc: BaseException) -> None:
    """Not a source failure (a bug, the database, Ctrl+C): record it if we can."""
    if plan.run is None:
        return
    with suppress(Exception):
        session.rollback()
        fail_run(
            session,
            plan.run,
            status="failed",
            error=f"interrupted: {type(exc).__name__}",
            requests=plan.base_requests + summary.requests,
            throttled=plan.base_throttled + summary.throttled,
        )
        session.commit()


_METRIC_OUTCOMES = ("created", "updated", "linked", "unchanged", "conflicts", "deleted", "merged")


def _count_records(target: Target, counts: PageCounts) -> None:
    """`loyalty_sync_records_total` by connection and outcome (the worker's exporter)."""
    from worker.metrics import SYNC_RECORDS

    values = counts.as_dict()
    for outcome in _METRIC_OUTCOMES:
        if values.get(outcome):
            SYNC_RECORDS.labels(
                source=target.source, connection_id=str(target.id), outcome=outcome
            ).inc(values[outcome])


def run_customer_sync(
    sessionmaker: sessionmaker[Session],
    *,
    connection_id: int,
    full: bool = False,
    dry_run: bool = False,
    settings: Settings,
    key: bytes,
    transport: httpx.BaseTransport | None = None,
    budget: RateBudget | None = None,
    sleep: Callable[[float], None] = time.sleep,
    overlap: dt.timedelta = dt.timedelta(minutes=5),
    on_page: Callable[[SyncSummary], None] | None = None,
    max_pages: int | None = None,
    continue_run: int | None = None,
) -> SyncSummary:
    """Pull the connection's customers into the store; returns the run's summary.

    `full` ignores the watermark (every record); `dry_run` writes nothing. `transport` is the
    test seam for the source's HTTP (`httpx.MockTransport`), `budget` the rate budget (default:
    Redis when `settings.redis_url`, else in process), `sleep` what retries and budgets wait
    with. `on_page(summary)` is called after each page is committed (progress bars).
    Raises `NotFound` for an unknown connection and `DecryptionFailed` for a wrong key.
    """
    summary = SyncSummary(dry_run=dry_run)
    with sessionmaker() as session:
        # Resolved per run, not cached at import: each CLI invocation configures its own output.
        bound = structlog.get_logger(__name__).bind(
            connection_id=connection_id, stream=CUSTOMERS_STREAM, full=full, dry_run=dry_run
        )
        plan = _plan(
            session,
            summary,
            connection_id=connection_id,
            full=full,
            key=key,
            continue_run=continue_run,
        )
        if plan is None:
            bound.warning("sync.run.finished", **summary.as_dict())
            return summary
        bound = bound.bind(
            run_id=summary.run_id, store_id=plan.target.store_id, source=plan.target.source
        )
        bound.info(
            "sync.run.started",
            resumed=summary.resumed,
            window_start=_iso(plan.window_start),
            from_cursor=plan.cursor is not None,
        )
        source: SourceAdapter | None = None
        try:
            with make_client(base_url=plan.target.api_base_url, transport=transport) as http:
                source = make_adapter(
                    AdapterContext(
                        target=plan.target,
                        secrets=plan.secrets,
                        settings=settings,
                        http=http,
                        budget=budget,
                        sleep=sleep,
                    )
                )
                pages = source.pages(
                    updated_since=plan.window_start, overlap=overlap, cursor=plan.cursor
                )
                for page in pages:
                    counts = _apply_page(session, plan, page, source, dry_run=dry_run)
                    summary.add_page(page, counts)
                    if not dry_run:
                        _count_records(plan.target, counts)
                    summary.requests, summary.throttled = source.requests, source.throttled
                    bound.info(
                        "sync.run.page",
                        page=summary.pages,
                        records=len(page.records),
                        skipped=page.skipped,
                        requests=page.requests,
                        **counts.as_dict(),
                    )
                    if on_page is not None:
                        on_page(summary)
                    if (
                        max_pages is not None
                        and summary.pages >= max_pages
                        and page.cursor is not None
                        and not dry_run
                    ):
                        summary.more = True
                        break
        except ConnectorError as exc:
            if source is not None:
                summary.requests, summary.throttled = source.requests, source.throttled
            _end_failed(session, plan, summary, exc)
            bound.warning("sync.run.finished", **summary.as_dict())
            return summary
        except BaseException as exc:
            if source is not None:
                summary.requests, summary.throttled = source.requests, source.throttled
            _end_crashed(session, plan, summary, exc)
            bound.error("sync.run.crashed", error=type(exc).__name__, pages=summary.pages)
            raise

        summary.requests, summary.throttled = source.requests, source.throttled
        if summary.more:
            summary.status = "running"
            bound.info("sync.run.paused", **summary.as_dict())
            return summary
        summary.status = "succeeded"
        if plan.run is not None and plan.state is not None:
            finish_run(
                session,
                plan.state,
                plan.run,
                requests=plan.base_requests + summary.requests,
                throttled=plan.base_throttled + summary.throttled,
            )
            mark_active(session, _load(session, plan.target.id))
            session.commit()
        bound.info("sync.run.finished", **summary.as_dict())
        return summary


def resync_customer(
    sessionmaker: sessionmaker[Session],
    *,
    connection_id: int,
    external_id: str,
    settings: Settings,
    key: bytes,
    dry_run: bool = False,
    transport: httpx.BaseTransport | None = None,
    budget: RateBudget | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Fetch one customer from the connection's source and apply it like a sync page of one
    (identity, stale guard, conflicts); a customer the source no longer has becomes a tombstone.

    Returns `{connection_id, source, external_id, found, ...PageCounts}`. Raises the connector
    error when the source can't be read (the caller reports it), `ConfigurationError` when the
    source can't fetch single customers.
    """
    external_id = external_id.strip()
    if not external_id:
        raise ValidationFailed({"external_id": ["can't be blank"]})
    with sessionmaker() as session:
        connection = _load(session, connection_id)
        target = Target(
            id=connection.id,
            store_id=connection.store_id,
            source=connection.source,
            account=connection.account,
            api_base_url=connection.api_base_url,
            api_version=connection.api_version,
            config=dict(connection.config or {}),
        )
        policy = policy_from_config(connection.config, source=connection.source)
        secrets = credentials(connection, key=key)
    bound = structlog.get_logger(__name__).bind(
        connection_id=connection_id, source=target.source, dry_run=dry_run
    )
    with make_client(base_url=target.api_base_url, transport=transport) as http:
        adapter = make_adapter(
            AdapterContext(
                target=target,
                secrets=secrets,
                settings=settings,
                http=http,
                budget=budget,
                sleep=sleep,
            )
        )
        fetch = getattr(adapter, "fetch_customer", None)
        if fetch is None:
            raise ConfigurationError(f"{target.source} can't fetch a single customer")
        record: ForeignCustomer | None = fetch(external_id)
    found = record is not None
    if record is None:
        record = ForeignCustomer(source=target.source, external_id=external_id, deleted=True)
    with sessionmaker() as session:
        try:
            counts = apply_customer_page(
                session,
                store_id=target.store_id,
                records=[record],
                policy=policy,
                dry_run=dry_run,
            )
            if dry_run:
                session.rollback()
            else:
                session.commit()
        except BaseException:
            session.rollback()
            raise
    result = {
        "connection_id": target.id,
        "source": target.source,
        "external_id": external_id,
        "found": found,
        "dry_run": dry_run,
        **counts.as_dict(),
    }
    bound.info("sync.resync_customer", **{k: v for k, v in result.items() if k != "external_id"})
    return result
