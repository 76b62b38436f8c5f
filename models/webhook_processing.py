"""Draining the webhook inbox: claimed `pending` rows → the store, in batches.

The API (`models.inbox`) writes one `webhook_events` row per accepted delivery; this module is
the processing core the Celery tasks call (`drain`, `sweep`, `replay`, `list_events`,
`render_event`). No Celery, no settings: the caller hands in a sessionmaker (`drain`) or a
session whose transaction it owns (`sweep`, `replay`: they only flush).

`drain` loops over batches:

1. **Claim** (one short transaction): up to `batch_size` due `pending` rows (oldest
   `next_attempt_at` first) become `processing`, `attempts + 1`. On PostgreSQL the rows are
   picked with `FOR UPDATE SKIP LOCKED`, so concurrent workers never take the same row; SQLite
   serialises writers (`BEGIN IMMEDIATE`). While a row is `processing`, its `next_attempt_at`
   holds the time it was claimed: the lease start `sweep` measures.
2. **Route**: a row whose `connection_id` names an enabled connection goes there; otherwise it
   is routed by `(source, account)` (within its `store_id` when set) — several stores may connect
   one shop, then the row applies to each. No enabled connection → `ignored`.
3. **Process**, one transaction per connection (rows routed to several connections: one
   transaction for that set): payloads are mapped to `ForeignCustomer`s and applied with ONE
   `apply_customer_page` (stale guard, newest-per-external-id, tombstones for deletes); merges
   are followed before the page (so the survivor's record lands on the merged customer), GDPR
   erasures run after it (so nothing in the batch outlives them); the rows' statuses are written
   in the same transaction. A payload that can't be mapped fails alone (`failed`, no retry); an
   exception rolls the group back and its rows are retried one by one (a poison row can't hold
   the others back), each failing row going back to `pending` with exponential backoff — after
   `MAX_ATTEMPTS` it is parked as `failed` with the error (`replay` puts it back).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import structlog
from sqlalchemy import ColumnElement, CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from connectors.errors import SkippableRecord
from connectors.records import ForeignCustomer, ForeignOrder, ForeignRefund, parse_instant
from connectors.shopify.mapping import (
    map_webhook_customer,
    map_webhook_order,
    map_webhook_refund,
)
from connectors.square.mapping import (
    PAYMENT_EVENTS,
    REFUND_EVENTS,
    map_webhook_event,
    map_webhook_payment,
)
from connectors.square.mapping import map_webhook_refund as map_square_refund
from models import lifecycle
from models.earning import EarningCounts, apply_orders
from models.inbox import HANDLED_TOPICS, IGNORED, PENDING, STATUSES
from models.ingest import PageCounts, apply_customer_page, lock_store
from models.sync_state import policy_from_config
from models.tables import Connection, Customer, ExternalReference, WebhookEvent, utcnow

# `customers/merge` payloads (Shopify's sample: `admin_graphql_api_customer_kept_id`,
# `admin_graphql_api_customer_deleted_id`, `admin_graphql_api_job_id`, `status`, `errors`) apply
# only once the merge finished; a `failed` (or still running) merge changes nothing.
MERGE_DONE_STATUSES: Final = frozenset({"completed", "complete", "succeeded", "success"})
SHOPIFY_ORDER_TOPICS: Final = frozenset({"orders/paid", "orders/updated", "orders/cancelled"})

log = structlog.get_logger(__name__)

PROCESSING, DONE, FAILED = "processing", "done", "failed"
MAX_ATTEMPTS: Final = 8
BACKOFF_BASE: Final = dt.timedelta(seconds=10)
BACKOFF_MAX: Final = dt.timedelta(hours=1)
DEFAULT_LEASE: Final = dt.timedelta(minutes=5)
MAX_ERROR_LENGTH: Final = 1000

Clock = Callable[[], dt.datetime]

_SHOPIFY_GID = re.compile(r"^gid://shopify/Customer/(\d+)$")
_MIN_TIME = dt.datetime.min.replace(tzinfo=dt.UTC)


class Unmappable(Exception):
    """The payload can never be applied (bad JSON, no customer id, …): the row fails for good."""


def backoff(attempts: int) -> dt.timedelta:
    """Delay before attempt `attempts + 1`: 10 s, 20 s, 40 s, … capped at one hour."""
    delay: dt.timedelta = BACKOFF_BASE * (2 ** min(max(attempts - 1, 0), 20))
    return delay if delay < BACKOFF_MAX else BACKOFF_MAX


def _error_text(error: object) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text


@dataclass(slots=True)
class DrainResult:
    """What one `drain` call did: batches claimed, rows claimed, and how the rows ended.

    `retried`: rows put back to `pending` with backoff; `failed`: rows parked as `failed`
    (unmappable, or out of attempts); `ignored`: rows with no enabled connection.
    """

    batches: int = 0
    claimed: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    ignored: int = 0
    # Stamps moved by order/payment/refund events, by source (for the worker's metrics).
    stamps_earned: dict[str, int] = field(default_factory=dict)
    stamps_reversed: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        return {
            "batches": self.batches,
            "claimed": self.claimed,
            "done": self.done,
            "failed": self.failed,
            "retried": self.retried,
            "ignored": self.ignored,
            "stamps_earned": sum(self.stamps_earned.values()),
            "stamps_reversed": sum(self.stamps_reversed.values()),
        }


# --- claimed rows and their targets ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    source: str
    topic: str | None
    store_id: int | None
    connection_id: int | None
    account: str | None
    triggered_at: dt.datetime | None
    received_at: dt.datetime
    attempts: int
    body: str


@dataclass(frozen=True, slots=True)
class _Target:
    connection_id: int
    store_id: int
    source: str
    account: str
    config: Mapping[str, Any] = field(compare=False)


_ROW_COLUMNS = (
    WebhookEvent.id,
    WebhookEvent.source,
    WebhookEvent.topic,
    WebhookEvent.store_id,
    WebhookEvent.connection_id,
    WebhookEvent.account,
    WebhookEvent.triggered_at,
    WebhookEvent.received_at,
    WebhookEvent.attempts,
    WebhookEvent.body,
)


def _claim(session: Session, *, limit: int, now: dt.datetime) -> list[_Row]:
    """Mark up to `limit` due pending rows `processing` (attempts + 1) and return them."""
    due = (
        select(WebhookEvent.id)
        .where(WebhookEvent.status == PENDING, WebhookEvent.next_attempt_at <= now)
        .order_by(WebhookEvent.next_attempt_at, WebhookEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    statement = (
        update(WebhookEvent)
        .where(WebhookEvent.id.in_(due))
        .values(status=PROCESSING, attempts=WebhookEvent.attempts + 1, next_attempt_at=now)
        .returning(*_ROW_COLUMNS)
        .execution_options(synchronize_session=False)
    )
    rows = [_Row(**row._mapping) for row in session.execute(statement)]
    rows.sort(key=lambda r: r.id)
    return rows


def _resolve(session: Session, rows: Sequence[_Row]) -> dict[int, tuple[_Target, ...]]:
    """Each row's target connections (enabled ones only); rows without any are absent."""
    ids = {r.connection_id for r in rows if r.connection_id is not None}
    accounts = {(r.source, r.account) for r in rows if r.account is not None}
    conditions: list[ColumnElement[bool]] = []
    if ids:
        conditions.append(Connection.id.in_(ids))
    for source in sorted({s for s, _ in accounts}):
        names = sorted(a for s, a in accounts if s == source)
        conditions.append(and_(Connection.source == source, Connection.account.in_(names)))
    if not conditions:
        return {}
    found = session.scalars(
        select(Connection).where(Connection.enabled.is_(True), or_(*conditions))
    ).all()
    by_id = {
        c.id: _Target(c.id, c.store_id, c.source, c.account, dict(c.config or {})) for c in found
    }
    by_account: dict[tuple[str, str], list[_Target]] = {}
    for target in by_id.values():
        by_account.setdefault((target.source, target.account), []).append(target)
    routes: dict[int, tuple[_Target, ...]] = {}
    for row in rows:
        direct = by_id.get(row.connection_id) if row.connection_id is not None else None
        if direct is not None and direct.source == row.source:
            routes[row.id] = (direct,)
            continue
        candidates = by_account.get((row.source, row.account or ""), [])
        if row.store_id is not None:
            candidates = [t for t in candidates if t.store_id == row.store_id]
        if candidates:
            routes[row.id] = tuple(sorted(candidates, key=lambda t: (t.store_id, t.connection_id)))
    return routes


# --- mapping payloads -----------------------------------------------------------------------


@dataclass(slots=True)
class _Work:
    """What a group of rows asks of one store (independent of the store)."""

    records: list[tuple[tuple[Any, ...], ForeignCustomer]] = field(default_factory=list)
    merges: list[tuple[str, str]] = field(default_factory=list)  # (loser, winner) external ids
    erasures: list[str] = field(default_factory=list)
    shop_redact: bool = False
    data_requests: list[tuple[_Row, Mapping[str, Any]]] = field(default_factory=list)
    # Orders/payments and refunds, keyed oldest first (see `_event_key`).
    orders: list[tuple[tuple[Any, ...], ForeignOrder | ForeignRefund]] = field(default_factory=list)


def _payload(row: _Row) -> Mapping[str, Any]:
    try:
        payload = json.loads(row.body)
    except ValueError as exc:
        raise Unmappable(f"body is not JSON: {exc}") from None
    if not isinstance(payload, Mapping):
        raise Unmappable("body is not a JSON object")
    return payload


def _shopify_id(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if value > 0 else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.isdigit():
        return text
    match = _SHOPIFY_GID.match(text)
    return match.group(1) if match else None


def _changed_at(row: _Row, payload: Mapping[str, Any]) -> dt.datetime:
    """A delete's change time: the payload's `updated_at`, else the delivery's trigger time."""
    return parse_instant(payload.get("updated_at")) or row.triggered_at or row.received_at


def _order_key(record: ForeignCustomer, row: _Row) -> tuple[Any, ...]:
    """Oldest first: Square version, the source's change time, trigger time, delivery order.

    `apply_customer_page` keeps the newest record per external id, the later one on a tie."""
    return (
        record.version if record.version is not None else -1,
        record.source_updated_at or _MIN_TIME,
        row.triggered_at or _MIN_TIME,
        row.received_at,
        row.id,
    )


def _event_key(updated_at: dt.datetime | None, row: _Row) -> tuple[Any, ...]:
    return (updated_at or _MIN_TIME, row.triggered_at or _MIN_TIME, row.received_at, row.id)


def _plan_order(row: _Row, payload: Mapping[str, Any], work: _Work) -> None:
    """An order/payment/refund event → `work.orders` (stamps, see models/earning.py)."""
    topic = row.topic
    item: ForeignOrder | ForeignRefund
    try:
        if row.source == "shopify":
            if topic == "refunds/create":
                item = map_webhook_refund(payload)
            else:
                item = map_webhook_order(payload)
        elif topic in PAYMENT_EVENTS:
            item = map_webhook_payment(payload)
        else:
            item = map_square_refund(payload)
    except SkippableRecord as exc:
        raise Unmappable(str(exc)) from None
    stamp = item.source_updated_at if isinstance(item, ForeignOrder) else item.updated_at
    work.orders.append((_event_key(stamp, row), item))


def _plan_shopify(row: _Row, payload: Mapping[str, Any], work: _Work) -> None:
    topic = row.topic
    if topic in SHOPIFY_ORDER_TOPICS or topic == "refunds/create":
        _plan_order(row, payload, work)
    elif topic in ("customers/create", "customers/update"):
        try:
            record = map_webhook_customer(payload)
        except SkippableRecord as exc:
            raise Unmappable(str(exc)) from None
        work.records.append((_order_key(record, row), record))
    elif topic == "customers/delete":
        external_id = _shopify_id(payload.get("id")) or _shopify_id(
            payload.get("admin_graphql_api_id")
        )
        if external_id is None:
            raise Unmappable("customers/delete without a customer id")
        record = ForeignCustomer(
            source="shopify",
            external_id=external_id,
            deleted=True,
            source_updated_at=_changed_at(row, payload),
        )
        work.records.append((_order_key(record, row), record))
    elif topic == "customers/merge":
        # Shopify's payload names the kept and the deleted customer (GraphQL ids).
        kept = _shopify_id(payload.get("admin_graphql_api_customer_kept_id")) or _shopify_id(
            payload.get("customer_kept_id")
        )
        deleted = _shopify_id(payload.get("admin_graphql_api_customer_deleted_id")) or _shopify_id(
            payload.get("customer_deleted_id")
        )
        status = payload.get("status")
        if isinstance(status, str) and status.lower() not in MERGE_DONE_STATUSES:
            log.info("webhook.merge.not_completed", inbox_id=row.id, status=status)
            return
        if kept is None or deleted is None:
            raise Unmappable("customers/merge without the kept and deleted customer ids")
        work.merges.append((deleted, kept))
    elif topic == "customers/redact":
        customer = payload.get("customer")
        external_id = _shopify_id(customer.get("id")) if isinstance(customer, Mapping) else None
        if external_id is None:
            raise Unmappable("customers/redact without customer.id")
        work.erasures.append(external_id)
    elif topic == "shop/redact":
        work.shop_redact = True
    elif topic == "customers/data_request":
        work.data_requests.append((row, payload))
    else:  # pragma: no cover - filtered by `_map_rows`
        raise Unmappable(f"topic {topic!r} is not handled")


def _plan_square(row: _Row, payload: Mapping[str, Any], work: _Work) -> None:
    if row.topic in PAYMENT_EVENTS or row.topic in REFUND_EVENTS:
        _plan_order(row, payload, work)
        return
    try:
        record = map_webhook_event(payload)
    except SkippableRecord as exc:
        raise Unmappable(str(exc)) from None
    merged_from = record.attributes.get("merged_from")
    if not record.deleted and isinstance(merged_from, list):
        # The profile a merge created: the merged profiles' customers become one first.
        work.merges.extend((loser, record.external_id) for loser in merged_from)
    work.records.append((_order_key(record, row), record))


def _map_rows(rows: Sequence[_Row]) -> tuple[_Work, dict[int, str]]:
    """The group's work, and the rows that can never be applied (id → reason)."""
    work = _Work()
    failures: dict[int, str] = {}
    for row in rows:
        try:
            payload = _payload(row)
            if row.source == "shopify":
                _plan_shopify(row, payload, work)
            else:
                _plan_square(row, payload, work)
        except Unmappable as exc:
            failures[row.id] = _error_text(f"unmappable: {exc}")
    return work, failures


# --- applying -------------------------------------------------------------------------------


def _erase_source(session: Session, *, store_id: int, source: str, now: dt.datetime) -> int:
    """Erase every customer of the store holding a reference of `source` (shop/redact)."""
    ids = session.scalars(
        select(ExternalReference.customer_id)
        .join(Customer, Customer.id == ExternalReference.customer_id)
        .where(
            ExternalReference.store_id == store_id,
            ExternalReference.source == source,
            Customer.state != "redacted",
        )
        .distinct()
    ).all()
    erased = 0
    for customer_id in sorted(ids):
        customer = session.get(Customer, customer_id)
        if customer is None or customer.state == "redacted":
            continue  # erased already with the person it was merged into
        lifecycle.erase_customer(session, store_id=store_id, customer_id=customer_id, now=now)
        erased += 1
    return erased


def _forget(session: Session) -> None:
    """Drop the ORM's cached rows: the page writes with Core statements, and an erasure that
    wiped a stale copy (a field None in the cache, set in the database) would keep that PII."""
    session.flush()
    session.expire_all()


def _apply(
    session: Session,
    target: _Target,
    work: _Work,
    now: dt.datetime,
    earning: EarningCounts | None = None,
) -> PageCounts:
    policy = policy_from_config(target.config)
    # Merges and erasures resolve identities too: under the page's per-store lock (PostgreSQL).
    lock_store(session, target.store_id)
    for loser, winner in work.merges:
        lifecycle.follow_merge(
            session,
            store_id=target.store_id,
            source=target.source,
            loser_external_id=loser,
            winner_external_id=winner,
            now=now,
        )
    _forget(session)
    counts = PageCounts()
    if work.records:
        ordered = [record for _, record in sorted(work.records, key=lambda item: item[0])]
        counts = apply_customer_page(
            session, store_id=target.store_id, records=ordered, policy=policy, now=now
        )
        _forget(session)
    for external_id in work.erasures:
        lifecycle.erase_reference(
            session,
            store_id=target.store_id,
            source=target.source,
            external_id=external_id,
            now=now,
        )
    if work.shop_redact:
        erased = _erase_source(session, store_id=target.store_id, source=target.source, now=now)
        log.info(
            "webhook.shop_redact", store_id=target.store_id, account=target.account, erased=erased
        )
    for row, payload in work.data_requests:
        customer = payload.get("customer")
        data_request = payload.get("data_request")
        orders = payload.get("orders_requested")
        log.warning(
            "webhook.data_request",
            inbox_id=row.id,
            store_id=target.store_id,
            connection_id=target.connection_id,
            shop=target.account,
            customer_id=_shopify_id(customer.get("id")) if isinstance(customer, Mapping) else None,
            data_request_id=(data_request.get("id") if isinstance(data_request, Mapping) else None),
            orders_requested=len(orders) if isinstance(orders, list) else 0,
        )
    if work.orders:
        # After the customers of the batch: an order's buyer is then already up to date.
        connection = session.get(Connection, target.connection_id)
        if connection is not None:
            applied = apply_orders(
                session,
                connection=connection,
                orders=[item for _, item in sorted(work.orders, key=lambda pair: pair[0])],
                via="webhook",
                now=now,
                policy=policy,
            )
            if earning is not None:
                earning.add(applied)
    return counts


def _set_status(
    session: Session,
    ids: Iterable[int],
    *,
    status: str,
    error: str | None,
    next_attempt_at: dt.datetime | None = None,
) -> None:
    ids = sorted(ids)
    if not ids:
        return
    values: dict[str, Any] = {"status": status, "last_error": error}
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id.in_(ids), WebhookEvent.status == PROCESSING)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def _process_group(
    factory: sessionmaker[Session],
    targets: tuple[_Target, ...],
    rows: Sequence[_Row],
    now: dt.datetime,
    result: DrainResult,
) -> None:
    """One transaction: apply `rows` to each of `targets`, write the rows' statuses."""
    work, failures = _map_rows(rows)
    earned: dict[str, int] = {}
    reversed_: dict[str, int] = {}
    with factory() as session, session.begin():
        for target in targets:  # sorted by store id: a stable lock order
            earning = EarningCounts()
            _apply(session, target, work, now, earning)
            earned[target.source] = earned.get(target.source, 0) + earning.stamps_earned
            reversed_[target.source] = reversed_.get(target.source, 0) + earning.stamps_reversed
        for row_id, reason in failures.items():
            _set_status(session, [row_id], status=FAILED, error=reason)
        done = [r.id for r in rows if r.id not in failures]
        _set_status(session, done, status=DONE, error=None)
    for row_id, reason in failures.items():
        log.warning("webhook.unmappable", inbox_id=row_id, error=reason)
    result.done += len(done)
    result.failed += len(failures)
    for source, stamps in earned.items():
        result.stamps_earned[source] = result.stamps_earned.get(source, 0) + stamps
    for source, stamps in reversed_.items():
        result.stamps_reversed[source] = result.stamps_reversed.get(source, 0) + stamps


def _retry_later(
    factory: sessionmaker[Session],
    rows: Sequence[_Row],
    error: BaseException,
    now: dt.datetime,
    result: DrainResult,
) -> None:
    """The rows go back to `pending` with backoff, or to `failed` when out of attempts."""
    text = _error_text(f"{type(error).__name__}: {error}")
    with factory() as session, session.begin():
        for row in rows:
            if row.attempts >= MAX_ATTEMPTS:
                _set_status(
                    session,
                    [row.id],
                    status=FAILED,
                    error=f"gave up after {row.attempts} attempts: {text}"[:MAX_ERROR_LENGTH],
                )
                result.failed += 1
            else:
                _set_status(
                    session,
                    [row.id],
                    status=PENDING,
                    error=text,
                    next_attempt_at=now + backoff(row.attempts),
                )
                result.retried += 1
    # The message stays on the rows (`events show`); logs get its type only: a database error's
    # detail can quote a customer's email.
    log.warning(
        "webhook.batch.failed",
        events=[r.id for r in rows],
        error_type=type(error).__name__,
        attempts=max(r.attempts for r in rows),
    )


def _process(
    factory: sessionmaker[Session],
    targets: tuple[_Target, ...],
    rows: Sequence[_Row],
    now: dt.datetime,
    result: DrainResult,
) -> None:
    try:
        _process_group(factory, targets, rows, now, result)
        return
    except Exception as exc:  # noqa: BLE001 - any failure: retry later, never lose the rows
        if len(rows) == 1:
            _retry_later(factory, rows, exc, now, result)
            return
        log.info("webhook.batch.isolating", events=len(rows), error_type=type(exc).__name__)
    for row in rows:  # one by one: only the rows that fail on their own are retried
        try:
            _process_group(factory, targets, [row], now, result)
        except Exception as exc:  # noqa: BLE001
            _retry_later(factory, [row], exc, now, result)


def drain(
    sessionmaker: sessionmaker[Session],
    *,
    batch_size: int = 500,
    max_batches: int | None = None,
    now: Clock | None = None,
) -> DrainResult:
    """Process due `pending` inbox rows batch by batch until none is due (or `max_batches`)."""
    clock = now or utcnow
    result = DrainResult()
    while max_batches is None or result.batches < max_batches:
        started = clock()
        with sessionmaker() as session, session.begin():
            rows = _claim(session, limit=batch_size, now=started)
        if not rows:
            break
        result.batches += 1
        result.claimed += len(rows)
        with sessionmaker() as session, session.begin():
            routes = _resolve(session, rows)
            unrouted = [r.id for r in rows if r.id not in routes]
            unhandled = [
                r.id
                for r in rows
                if r.id in routes and r.topic not in HANDLED_TOPICS.get(r.source, frozenset())
            ]
            for row_id in unrouted:
                row = next(r for r in rows if r.id == row_id)
                _set_status(
                    session,
                    [row_id],
                    status=IGNORED,
                    error=f"ignored: no enabled connection for {row.source} {row.account!r}",
                )
            for row_id in unhandled:
                row = next(r for r in rows if r.id == row_id)
                _set_status(
                    session, [row_id], status=IGNORED, error=f"ignored: topic {row.topic!r}"
                )
        result.ignored += len(unrouted) + len(unhandled)
        skip = set(unrouted) | set(unhandled)
        groups: dict[tuple[_Target, ...], list[_Row]] = {}
        for row in rows:
            if row.id not in skip:
                groups.setdefault(routes[row.id], []).append(row)
        for targets in sorted(groups, key=lambda ts: [(t.store_id, t.connection_id) for t in ts]):
            _process(sessionmaker, targets, groups[targets], clock(), result)
        log.info("webhook.batch", batch=len(rows), totals=result.as_dict())
    return result


# --- operator operations (the caller owns the transaction) ---------------------------------


def _updated(session: Session, statement: Any) -> int:
    result = cast(CursorResult[Any], session.execute(statement))
    return int(result.rowcount or 0)


def sweep(
    session: Session, *, now: dt.datetime | None = None, lease: dt.timedelta = DEFAULT_LEASE
) -> int:
    """Rows `processing` for longer than `lease` (their worker died) go back to `pending`.

    A row that already used its `MAX_ATTEMPTS` is parked as `failed` instead (a payload that
    kills its worker must not loop forever). Returns the number of rows moved.
    """
    now = now or utcnow()
    expired = and_(WebhookEvent.status == PROCESSING, WebhookEvent.next_attempt_at <= now - lease)
    requeued = _updated(
        session,
        update(WebhookEvent)
        .where(expired, WebhookEvent.attempts < MAX_ATTEMPTS)
        .values(
            status=PENDING,
            next_attempt_at=now,
            last_error="lease expired: the worker did not finish",
        )
        .execution_options(synchronize_session=False),
    )
    parked = _updated(
        session,
        update(WebhookEvent)
        .where(expired, WebhookEvent.attempts >= MAX_ATTEMPTS)
        .values(
            status=FAILED,
            last_error=f"lease expired on each of {MAX_ATTEMPTS} attempts",
        )
        .execution_options(synchronize_session=False),
    )
    count = requeued + parked
    if count:
        log.warning("webhook.sweep", requeued=requeued, failed=parked)
    return count


def replay(session: Session, *, event_id: int | None = None, status: str | None = None) -> int:
    """Put rows back to `pending` (attempts reset, due now); returns how many.

    `event_id`: that row, whatever its status except `pending`/`processing`. Otherwise every row
    of `status` (default `failed`). Raises ValueError for a status that can't be replayed.
    """
    condition: Any
    if event_id is not None:
        condition = and_(
            WebhookEvent.id == event_id, WebhookEvent.status.not_in((PENDING, PROCESSING))
        )
        if status is not None:
            condition = and_(condition, WebhookEvent.status == status)
    else:
        status = status or FAILED
        if status not in STATUSES or status in (PENDING, PROCESSING):
            raise ValueError(f"can't replay rows with status {status!r}")
        condition = WebhookEvent.status == status
    count = _updated(
        session,
        update(WebhookEvent)
        .where(condition)
        .values(status=PENDING, attempts=0, next_attempt_at=utcnow())
        .execution_options(synchronize_session=False),
    )
    log.info("webhook.replay", event_id=event_id, status=status, count=count)
    return count


def list_events(
    session: Session,
    *,
    status: str | None = None,
    store_id: int | None = None,
    limit: int = 100,
) -> list[WebhookEvent]:
    """The newest inbox rows first, optionally of one status / store."""
    query = select(WebhookEvent).order_by(WebhookEvent.id.desc()).limit(max(limit, 0))
    if status is not None:
        query = query.where(WebhookEvent.status == status)
    if store_id is not None:
        query = query.where(WebhookEvent.store_id == store_id)
    return list(session.scalars(query))


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def render_event(event: WebhookEvent, *, with_body: bool = False) -> dict[str, Any]:
    """A JSON-ready view of an inbox row (the body only when asked for)."""
    out: dict[str, Any] = {
        "id": event.id,
        "source": event.source,
        "topic": event.topic,
        "event_id": event.event_id,
        "store_id": event.store_id,
        "connection_id": event.connection_id,
        "account": event.account,
        "status": event.status,
        "attempts": event.attempts,
        "received_at": _iso(event.received_at),
        "triggered_at": _iso(event.triggered_at),
        "next_attempt_at": _iso(event.next_attempt_at),
        "last_error": event.last_error,
    }
    if with_body:
        out["body"] = event.body
        out["headers"] = dict(event.headers or {})
    return out


__all__ = [
    "MAX_ATTEMPTS",
    "DrainResult",
    "backoff",
    "drain",
    "list_events",
    "render_event",
    "replay",
    "sweep",
]
