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

from connectors.errors import FatalError, InvalidCursorError
from connectors.paginate import CursorPaginator, map_records
from connectors.records import Page
from connectors.square.client import SquareClient
from connectors.square.mapping import map_customer

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
