"""Stamp reconciliation (edge): re-pull recent orders/payments, apply what webhooks missed.

`reconcile_store` walks every enabled Shopify/Square connection of a store that has an earning
rule (`models.earning`):

1. pulls what changed in the window (default 72 h, `RECONCILE_WINDOW_HOURS`): Shopify — the
   GraphQL `orders` connection filtered `updated_at:>='…'`, sorted `UPDATED_AT`, refunds
   included; Square — `ListPayments` per location with `updated_at_begin_time` +
   `sort_field=UPDATED_AT`, then `ListPaymentRefunds` (`begin_time`, on created_at). A payment
   without `customer_id` but with an order has its order fetched (`GET /v2/orders/{id}`) for the
   order's `customer_id` — the only time an order is read. Buyers the store does not know yet
   are fetched (`GET /v2/customers/{id}`, Shopify `customer(id:)`) so they can be created;
2. applies each page with `apply_orders(..., via="reconcile")`, one transaction per page (a
   crash or an upstream outage loses nothing: the next run re-applies idempotently). Orders
   whose row did not exist yet were missed by the webhooks: counted per connection;
3. records a `SyncRun` of stream `orders` per connection: `seen` = orders/payments pulled,
   `created` = orders found only by polling (missed by webhooks; miss rate = created / seen),
   `updated` = orders that earned in this run, `skipped` = source items that could not be
   mapped, `requests`/`throttled`/`pages` as for customer syncs; `error` when it failed;
4. completeness per connection: `source_count` (paid orders/payments the source lists in the
   window) vs `local_count` (paid `order_earnings` rows of the connection with a source update
   time in the window), and the ids missing on either side (first 20);
5. verifies balance == ledger sum for every card of the store; each drift is logged and fixed
   with a `reconcile` ledger entry.

`dry_run` does everything in transactions that are rolled back: the report shows what a real
run would do; nothing is written (no run row, no entry). Upstream faults are retried by the
clients (429/5xx/timeouts, with backoff); a connection that still fails is reported with its
error and the others go on.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from connectors.errors import ConfigurationError, ConnectorError
from connectors.http import make_client
from connectors.ratelimit import RateBudget
from connectors.records import ForeignCustomer, ForeignOrder, ForeignRefund, OrderPage
from models.connections import credentials
from models.earning import (
    ORDERS_STREAM,
    EarningCounts,
    apply_orders,
    rule_from_config,
    verify_balances,
)
from models.errors import NotFound, ValidationFailed
from models.sync_state import policy_from_config
from models.tables import (
    Connection,
    ExternalReference,
    OrderEarning,
    Store,
    SyncRun,
    is_valid_id,
    utcnow,
)
from worker.settings import Settings
from worker.sync import AdapterContext, Target, make_adapter

SOURCES = ("shopify", "square")
MAX_LISTED_IDS = 20


def _log() -> Any:
    """Resolved per call, never cached at import: each CLI invocation configures its own
    output, and a logger bound to an earlier invocation's (closed) stream would fail."""
    return structlog.get_logger(__name__)


@dataclass(slots=True)
class _ConnectionReport:
    connection_id: int
    source: str
    account: str
    status: str = "succeeded"
    run_id: int | None = None
    pages: int = 0
    requests: int = 0
    throttled: int = 0
    skipped: int = 0
    error: str | None = None
    counts: EarningCounts = field(default_factory=EarningCounts)
    source_ids: set[str] = field(default_factory=set)
    source_count: int = 0
    local_count: int = 0
    missing_locally: list[str] = field(default_factory=list)
    unknown_to_source: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        counts = self.counts.as_dict()
        orders = counts["orders"]
        return {
            "connection_id": self.connection_id,
            "source": self.source,
            "account": self.account,
            "status": self.status,
            "run_id": self.run_id,
            "error": self.error,
            "pages": self.pages,
            "requests": self.requests,
            "throttled": self.throttled,
            "skipped": self.skipped,
            "orders": orders,
            "refunds": counts["refunds"],
            "missed": counts["missed"],
            "miss_rate": round(counts["missed"] / orders, 4) if orders else 0.0,
            "stamps_earned": counts["stamps_earned"],
            "stamps_reversed": counts["stamps_reversed"],
            "counts": counts,
            "completeness": {
                "source_count": self.source_count,
                "local_count": self.local_count,
                "complete": not self.missing_locally and self.source_count == self.local_count,
                "missing_locally": self.missing_locally,
                "unknown_to_source": self.unknown_to_source,
            },
        }


def _targets(session: Session, store_id: int) -> list[Target]:
    connections = session.scalars(
        select(Connection)
        .where(
            Connection.store_id == store_id,
            Connection.enabled.is_(True),
            Connection.source.in_(SOURCES),
        )
        .order_by(Connection.id)
    ).all()
    found: list[Target] = []
    for c in connections:
        try:
            if rule_from_config(c.config) is None:
                continue
        except ValidationFailed as exc:
            _log().warning("reconcile.bad_rule", connection_id=c.id, error=str(exc))
            continue
        target = Target(
            id=c.id,
            store_id=c.store_id,
            source=c.source,
            account=c.account,
            api_base_url=c.api_base_url,
            api_version=c.api_version,
            config=dict(c.config or {}),
        )
        found.append(target)
    return found


def _pages(
    adapter: Any, source: str, since: dt.datetime, overlap: dt.timedelta
) -> Iterator[OrderPage]:
    """The connection's order pages for the window (Square: payments, then refunds)."""
    client = adapter.client
    if source == "shopify":
        from connectors.shopify.paginate import iter_order_pages

        yield from iter_order_pages(client, updated_since=since, overlap=overlap)
        return
    from connectors.square import paginate as square

    locations: list[str | None] = [*square.list_location_ids(client)] or [None]
    for location in locations:
        for page in square.iter_payment_pages(
            client, updated_since=since, location_id=location, overlap=overlap
        ):
            yield _with_order_customers(client, page)
    for location in locations:
        yield from square.iter_refund_pages(
            client, updated_since=since, location_id=location, overlap=overlap
        )


def _with_order_customers(client: Any, page: OrderPage) -> OrderPage:
    """Square payments without `customer_id`: take the customer of their order, when any."""
    from dataclasses import replace

    from connectors.square.mapping import order_customer_id
    from connectors.square.paginate import fetch_order

    orders: list[ForeignOrder] = []
    for payment in page.orders:
        found = payment
        if payment.customer_external_id is None and payment.order_id and payment.paid:
            order = fetch_order(client, payment.order_id)
            customer_id = order_customer_id(order) if order is not None else None
            if customer_id is not None:
                found = replace(payment, customer_external_id=customer_id)
        orders.append(found)
    return replace(page, orders=tuple(orders))


def _with_customers(
    session: Session, adapter: Any, target: Target, orders: tuple[ForeignOrder, ...]
) -> list[ForeignOrder]:
    """Paid orders of buyers the store does not know yet get the buyer's record, fetched from
    the source (Square payments never embed it): an unknown customer is created, then earns."""
    from dataclasses import replace

    wanted = {
        o.customer_external_id
        for o in orders
        if o.paid and o.customer is None and o.customer_external_id is not None
    }
    if not wanted:
        return list(orders)
    known = set(
        session.scalars(
            select(ExternalReference.external_id).where(
                ExternalReference.store_id == target.store_id,
                ExternalReference.source == target.source,
                ExternalReference.external_id.in_(sorted(wanted)),
            )
        )
    )
    session.rollback()
    fetched: dict[str, ForeignCustomer | None] = {
        external_id: adapter.fetch_customer(external_id) for external_id in sorted(wanted - known)
    }
    return [
        replace(o, customer=fetched[o.customer_external_id])
        if o.customer is None and o.customer_external_id in fetched
        else o
        for o in orders
    ]


@contextmanager
def _unit(factory: sessionmaker[Session], dry_run: bool) -> Iterator[Session]:
    """One transaction: committed, or rolled back in a dry run (and on error)."""
    with factory() as session:
        try:
            yield session
            if dry_run:
                session.rollback()
            else:
                session.commit()
        except BaseException:
            session.rollback()
            raise


def _completeness(session: Session, report: _ConnectionReport, since: dt.datetime) -> None:
    local = set(
        session.scalars(
            select(OrderEarning.external_id).where(
                OrderEarning.connection_id == report.connection_id,
                OrderEarning.paid.is_(True),
                OrderEarning.source_updated_at >= since,
            )
        )
    )
    present = (
        set(
            session.scalars(
                select(OrderEarning.external_id).where(
                    OrderEarning.connection_id == report.connection_id,
                    OrderEarning.external_id.in_(sorted(report.source_ids)),
                )
            )
        )
        if report.source_ids
        else set()
    )
    report.source_count = len(report.source_ids)
    report.local_count = len(local)
    report.missing_locally = sorted(report.source_ids - present)[:MAX_LISTED_IDS]
    report.unknown_to_source = sorted(local - report.source_ids)[:MAX_LISTED_IDS]


def _start_run(session: Session, target: Target, now: dt.datetime) -> int:
    run = SyncRun(
        store_id=target.store_id,
        connection_id=target.id,
        stream=ORDERS_STREAM,
        status="running",
        full=False,
        dry_run=False,
        resumed=False,
        started_at=now,
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
    session.commit()
    return run.id


def _finish_run(session: Session, report: _ConnectionReport) -> None:
    """The run row of stream `orders`: created = found only by polling (webhook misses)."""
    run = session.get(SyncRun, report.run_id) if report.run_id is not None else None
    if run is None:
        return
    counts = report.counts
    run.status = report.status
    run.error = report.error
    run.finished_at = utcnow()
    run.pages = report.pages
    run.requests = report.requests
    run.throttled = report.throttled
    run.seen = counts.orders
    run.created = counts.missed
    run.updated = counts.earned_orders
    run.linked = counts.customers_created
    run.skipped = report.skipped
    session.commit()


def _reconcile_connection(
    factory: sessionmaker[Session],
    target: Target,
    *,
    settings: Settings,
    key: bytes,
    since: dt.datetime,
    overlap: dt.timedelta,
    dry_run: bool,
    transport: httpx.BaseTransport | None,
    budget: RateBudget | None,
    sleep: Callable[[float], None],
    now: dt.datetime,
) -> _ConnectionReport:
    report = _ConnectionReport(target.id, target.source, target.account)
    bound = _log().bind(connection_id=target.id, store_id=target.store_id, source=target.source)
    with factory() as session:
        connection = session.get(Connection, target.id)
        assert connection is not None
        secrets = credentials(connection, key=key)
        if not dry_run:
            report.run_id = _start_run(session, target, now)
    adapter: Any = None
    try:
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
            policy = policy_from_config(target.config, source=target.source)
            for page in _pages(adapter, target.source, since, overlap):
                report.pages += 1
                report.skipped += page.skipped
                report.source_ids.update(o.external_id for o in page.orders if o.paid)
                with factory() as session:
                    orders = _with_customers(session, adapter, target, page.orders)
                items: list[ForeignOrder | ForeignRefund] = [*orders, *page.refunds]
                with _unit(factory, dry_run) as session:
                    connection = session.get(Connection, target.id)
                    assert connection is not None
                    counts = apply_orders(
                        session,
                        connection=connection,
                        orders=items,
                        via="reconcile",
                        now=now,
                        policy=policy,
                    )
                    report.counts.add(counts)
                bound.info("reconcile.page", page=report.pages, **counts.as_dict())
    except (ConnectorError, ValidationFailed) as exc:
        report.status = "needs_attention" if isinstance(exc, ConfigurationError) else "failed"
        report.error = f"{type(exc).__name__}: {exc}"
        bound.warning("reconcile.connection.failed", error=report.error)
    finally:
        if adapter is not None:
            report.requests, report.throttled = adapter.requests, adapter.throttled
    with factory() as session:
        # A dry run compares with what is stored now: what it lists missing, a run would add.
        _completeness(session, report, since)
        if not dry_run:
            _finish_run(session, report)
    return report


def reconcile_store(
    sessionmaker: sessionmaker[Session],
    *,
    store_id: int,
    settings: Settings,
    key: bytes,
    window: dt.timedelta = dt.timedelta(hours=72),
    dry_run: bool = False,
    transport: httpx.BaseTransport | None = None,
    budget: RateBudget | None = None,
    sleep: Callable[[float], None] = time.sleep,
    now: dt.datetime | None = None,
    overlap: dt.timedelta = dt.timedelta(minutes=5),
) -> dict[str, Any]:
    """Reconcile one store's stamps with its sources; returns the report (JSON-ready).

    Keys: `store_id`, `dry_run`, `window_start`, `status` (`succeeded`, or `partial` when a
    connection failed), `connections` (one report each: counts, `missed`, `miss_rate`,
    `completeness`, `run_id`, `error`), `drift` (cards whose balance differed from the ledger;
    `fixed` unless dry run), `stamps_earned`, `stamps_reversed`. `NotFound` for an unknown store.
    """
    if window <= dt.timedelta(0):
        raise ValueError("window must be positive")
    now = now or utcnow()
    since = now - window
    with sessionmaker() as session:
        if not is_valid_id(store_id) or session.get(Store, store_id) is None:
            raise NotFound("Store")
        targets = _targets(session, store_id)
    bound = _log().bind(store_id=store_id, dry_run=dry_run)
    bound.info("reconcile.started", connections=len(targets), window_start=since.isoformat())
    reports = [
        _reconcile_connection(
            sessionmaker,
            target,
            settings=settings,
            key=key,
            since=since,
            overlap=overlap,
            dry_run=dry_run,
            transport=transport,
            budget=budget,
            sleep=sleep,
            now=now,
        )
        for target in targets
    ]
    with _unit(sessionmaker, dry_run) as session:
        drifts = verify_balances(session, store_id=store_id, fix=not dry_run, now=now)
    earned = sum(r.counts.stamps_earned for r in reports)
    reversed_ = sum(r.counts.stamps_reversed for r in reports)
    if not dry_run:
        _count_metrics(reports)
    result: dict[str, Any] = {
        "store_id": store_id,
        "dry_run": dry_run,
        "window_start": since.isoformat(),
        "status": "succeeded" if all(r.status == "succeeded" for r in reports) else "partial",
        "connections": [r.as_dict() for r in reports],
        "drift": [d.as_dict() for d in drifts],
        "stamps_earned": earned,
        "stamps_reversed": reversed_,
    }
    bound.info(
        "reconcile.finished",
        status=result["status"],
        connections=len(reports),
        missed=sum(r.counts.missed for r in reports),
        drift=len(drifts),
        stamps_earned=earned,
        stamps_reversed=reversed_,
    )
    return result


def _count_metrics(reports: list[_ConnectionReport]) -> None:
    from worker.metrics import STAMPS_EARNED, STAMPS_REVERSED

    for report in reports:
        if report.counts.stamps_earned:
            STAMPS_EARNED.labels(source=report.source).inc(report.counts.stamps_earned)
        if report.counts.stamps_reversed:
            STAMPS_REVERSED.labels(source=report.source).inc(report.counts.stamps_reversed)
