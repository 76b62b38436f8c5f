"""Walk Square customers with SearchCustomers, ≤ 100 per request, resumable by cursor.

Incremental runs filter on `updated_at.start_at = updated_since - overlap`; a full sync sends
the same body without the filter. The same query goes with every cursor (Square requires it).
Square cursors expire: an `INVALID_CURSOR` answer restarts the window from its first page —
upserts are idempotent, so re-reading pages costs requests, never correctness.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from typing import Any

import structlog

from connectors.errors import FatalError, InvalidCursorError, SkippableRecord
from connectors.paginate import CursorPaginator, map_records
from connectors.records import OrderPage, Page
from connectors.square.client import SquareClient
from connectors.square.mapping import map_customer, map_payment, map_refund

MAX_PAGE_SIZE = 100
# An expired cursor restarts the window; a window that cannot be read without its cursor
# expiring this many times in one run is a fault worth surfacing.
MAX_RESTARTS = 5

log = structlog.get_logger(__name__)


def search_body(
    updated_since: dt.datetime | None, overlap: dt.timedelta, page_size: int
) -> dict[str, Any]:
    """The SearchCustomers body without its cursor."""
    query: dict[str, Any] = {}
    if updated_since is not None:
        if updated_since.tzinfo is None:
            raise ValueError("updated_since must be timezone-aware")
        start = (updated_since - overlap).astimezone(dt.UTC)
        start_at = start.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        query["filter"] = {"updated_at": {"start_at": start_at}}
    query["sort"] = {"field": "DEFAULT", "order": "ASC"}
    return {"limit": page_size, "query": query}


def _answer(data: Mapping[str, Any]) -> tuple[list[Any], str | None]:
    customers = data.get("customers", [])
    if not isinstance(customers, list):
        raise FatalError("square answer: customers is not a list")
    cursor = data.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise FatalError("square answer: cursor is not a string")
    return customers, cursor or None


def iter_customer_pages(
    client: SquareClient,
    *,
    updated_since: dt.datetime | None,
    overlap: dt.timedelta = dt.timedelta(minutes=5),
    cursor: str | None = None,
    page_size: int = MAX_PAGE_SIZE,
) -> Iterator[Page]:
    """Yield pages of Square customers; incremental when `updated_since` is given.

    Each Page's `cursor` is the position after it (None on the last page). `requests` and
    `throttled` count everything since the previous page, including requests lost to an expired
    cursor; restarts are counted on `client.cursor_restarts`. Records that cannot be mapped (no
    id) are logged and left out.
    """
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be within 1..{MAX_PAGE_SIZE}")
    base = search_body(updated_since, overlap, page_size)
    paginator = CursorPaginator(cursor)
    restarts = 0
    requests, throttled = client.requests, client.throttled
    while not paginator.done:
        body = dict(base)
        if paginator.cursor is not None:
            body["cursor"] = paginator.cursor
        try:
            data = client.search_customers(body)
        except InvalidCursorError:
            if paginator.cursor is None or restarts >= MAX_RESTARTS:
                raise
            restarts += 1
            client.cursor_restarts += 1
            log.warning("connector.cursor.restart", source="square", restarts=restarts)
            paginator.restart()
            continue
        customers, next_cursor = _answer(data)
        records, skipped = map_records(customers, map_customer, source="square")
        paginator.update_state(next_cursor)
        yield Page(
            records=records,
            skipped=skipped,
            cursor=next_cursor,
            requests=client.requests - requests,
            throttled=client.throttled - throttled,
        )
        requests, throttled = client.requests, client.throttled


# --- payments, refunds and orders (stamps reconciliation) -----------------------------------

PAYMENTS_PATH = "/v2/payments"
REFUNDS_PATH = "/v2/refunds"
LOCATIONS_PATH = "/v2/locations"
PAYMENTS_PAGE_SIZE = 100


def _rfc3339(value: dt.datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def list_location_ids(client: SquareClient) -> list[str]:
    """`GET /v2/locations` → the merchant's location ids (ListPayments reads one location per
    call and defaults to the main one, so a reconciliation walks each)."""
    data = client.request("GET", LOCATIONS_PATH)
    locations = data.get("locations", [])
    if not isinstance(locations, list):
        raise FatalError("square answer: locations is not a list")
    ids = [loc.get("id") for loc in locations if isinstance(loc, Mapping)]
    return sorted({i for i in ids if isinstance(i, str) and i})


def _walk(
    client: SquareClient,
    path: str,
    params: Mapping[str, str | int],
    key: str,
    map_one: Any,
) -> Iterator[tuple[list[Any], int, str | None, int, int]]:
    paginator = CursorPaginator(None)
    restarts = 0
    requests, throttled = client.requests, client.throttled
    while not paginator.done:
        query = dict(params)
        if paginator.cursor is not None:
            query["cursor"] = paginator.cursor
        try:
            data = client.request("GET", path, params=query)
        except InvalidCursorError:
            if paginator.cursor is None or restarts >= MAX_RESTARTS:
                raise
            restarts += 1
            client.cursor_restarts += 1
            log.warning("connector.cursor.restart", source="square", restarts=restarts)
            paginator.restart()
            continue
        items = data.get(key, [])
        if not isinstance(items, list):
            raise FatalError(f"square answer: {key} is not a list")
        cursor = data.get("cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise FatalError("square answer: cursor is not a string")
        mapped: list[Any] = []
        skipped = 0
        for item in items:
            try:
                if not isinstance(item, Mapping):
                    raise SkippableRecord("not an object", code="not_object")
                mapped.append(map_one(item))
            except SkippableRecord as exc:
                log.warning("connector.record.skipped", source="square", reason=str(exc))
                skipped += 1
        paginator.update_state(cursor or None)
        yield (
            mapped,
            skipped,
            cursor or None,
            client.requests - requests,
            client.throttled - throttled,
        )
        requests, throttled = client.requests, client.throttled


def iter_payment_pages(
    client: SquareClient,
    *,
    updated_since: dt.datetime,
    location_id: str | None = None,
    overlap: dt.timedelta = dt.timedelta(minutes=5),
    page_size: int = PAYMENTS_PAGE_SIZE,
) -> Iterator[OrderPage]:
    """ListPayments of one location updated since `updated_since - overlap`.

    Uses `updated_at_begin_time` with `sort_field=UPDATED_AT` (Square-Version 2024-07+; the
    older `begin_time` filters on `created_at` and would miss a payment completed later than it
    was created). Square's default `begin_time` (one year back) still applies on created_at.
    """
    params: dict[str, str | int] = {
        "updated_at_begin_time": _rfc3339(updated_since - overlap),
        "sort_field": "UPDATED_AT",
        "sort_order": "ASC",
        "limit": page_size,
    }
    if location_id is not None:
        params["location_id"] = location_id
    for items, skipped, cursor, requests, throttled in _walk(
        client, PAYMENTS_PATH, params, "payments", map_payment
    ):
        yield OrderPage(
            orders=tuple(items),
            cursor=cursor,
            skipped=skipped,
            requests=requests,
            throttled=throttled,
        )


def iter_refund_pages(
    client: SquareClient,
    *,
    updated_since: dt.datetime,
    location_id: str | None = None,
    overlap: dt.timedelta = dt.timedelta(minutes=5),
    page_size: int = PAYMENTS_PAGE_SIZE,
) -> Iterator[OrderPage]:
    """ListPaymentRefunds (`GET /v2/refunds`) created since `updated_since - overlap`.

    ListPaymentRefunds filters on `begin_time` (created_at): a refund is created when it is
    asked for, and its later status change (PENDING → COMPLETED) does not change its amount.
    """
    params: dict[str, str | int] = {
        "begin_time": _rfc3339(updated_since - overlap),
        "sort_order": "ASC",
        "limit": page_size,
    }
    if location_id is not None:
        params["location_id"] = location_id
    for items, skipped, cursor, requests, throttled in _walk(
        client, REFUNDS_PATH, params, "refunds", map_refund
    ):
        yield OrderPage(
            refunds=tuple(items),
            cursor=cursor,
            skipped=skipped,
            requests=requests,
            throttled=throttled,
        )


def fetch_order(client: SquareClient, order_id: str) -> dict[str, Any] | None:
    """`GET /v2/orders/{id}` → the order object (None on 404)."""
    from urllib.parse import quote

    try:
        data = client.request("GET", f"/v2/orders/{quote(order_id, safe='')}")
    except FatalError as exc:
        if exc.status == 404:
            return None
        raise
    order = data.get("order")
    return order if isinstance(order, dict) else None
