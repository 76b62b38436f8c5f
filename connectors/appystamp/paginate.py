"""Walk Appy Stamp customers (`GET /customers`, oldest first) and a customer's activities.

The seed offers no updated-since filter or sort on `GET /customers` (only `email`, `limit`,
`after`, `before`, `hasCount`), so every run is a FULL pass in the API's own order (oldest
first), ≤ 1000 per request: `updated_since`/`overlap` are accepted and ignored, and the ingest's
unchanged-record skipping (content hashes) makes a re-read cost reads only. Each page's cursor
is `meta.pagination.nextCursor` (passed back as `after`), saved with the page, so a run that
dies resumes after its last committed page. A repeated cursor is a loop (`FatalError`).

Activities (`GET /customers/{id}/activities`) page the same way (`after`, `meta.pagination`);
the seed's facts do not give their page limit, so they are read 100 at a time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from typing import Any

import structlog

from connectors.appystamp.client import AppyStampClient
from connectors.appystamp.mapping import SOURCE, Activity, map_activity, map_customer
from connectors.errors import FatalError, SkippableRecord
from connectors.paginate import CursorPaginator, map_records
from connectors.records import Page

MAX_PAGE_SIZE = 1000
ACTIVITY_PAGE_SIZE = 100
# A customer with more activity pages than this is a fault worth surfacing, not a loop to follow.
MAX_ACTIVITY_PAGES = 10_000

log = structlog.get_logger(__name__)


def next_cursor(data: Any, meta: Mapping[str, Any]) -> tuple[list[Any], str | None]:
    """(items, the cursor after them) from one answer; FatalError for a malformed one.

    `hasNext: false` ends the walk whatever `nextCursor` says; `hasNext: true` without a cursor
    is malformed (following it would loop on the first page).
    """
    if not isinstance(data, list):
        raise FatalError("appystamp answer: data is not a list")
    pagination = meta.get("pagination")
    if pagination is None:
        return data, None
    if not isinstance(pagination, Mapping):
        raise FatalError("appystamp answer: meta.pagination is not an object")
    cursor = pagination.get("nextCursor")
    if cursor is not None and not isinstance(cursor, str):
        raise FatalError("appystamp answer: nextCursor is not a string")
    if pagination.get("hasNext") is not True:
        return data, None
    if not cursor:
        raise FatalError("appystamp answer: hasNext without a nextCursor")
    return data, cursor


def iter_customer_pages(
    client: AppyStampClient,
    *,
    updated_since: dt.datetime | None = None,
    overlap: dt.timedelta = dt.timedelta(0),
    cursor: str | None = None,
    page_size: int = MAX_PAGE_SIZE,
) -> Iterator[Page]:
    """Yield every page of customers from `cursor` on (a full pass; see the module doc).

    Each Page's `cursor` is the position after it (None on the last page); `requests` and
    `throttled` count everything since the previous page. Unmappable records are logged and
    counted in `skipped`.
    """
    del updated_since, overlap  # no server-side filter exists: always a full pass
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be within 1..{MAX_PAGE_SIZE}")
    paginator = CursorPaginator(cursor)
    requests, throttled = client.requests, client.throttled
    while not paginator.done:
        data, meta = client.list_customers(after=paginator.cursor, limit=page_size)
        items, following = next_cursor(data, meta)
        records, skipped = map_records(items, map_customer, source=SOURCE)
        paginator.update_state(following)
        yield Page(
            records=records,
            skipped=skipped,
            cursor=following,
            requests=client.requests - requests,
            throttled=client.throttled - throttled,
        )
        requests, throttled = client.requests, client.throttled


def fetch_activities(
    client: AppyStampClient, customer_id: str, *, page_size: int = ACTIVITY_PAGE_SIZE
) -> list[Activity]:
    """Every activity of one customer, in the API's order; unmappable ones logged and left out.

    Raises what the client raises (`FatalError` code `CUSTOMER_NOT_FOUND` for an unknown
    customer, `ConfigurationError` `PLAN_UPGRADE_REQUIRED` when the plan has no activities).
    """
    paginator = CursorPaginator(max_pages=MAX_ACTIVITY_PAGES)
    activities: list[Activity] = []
    while not paginator.done:
        data, meta = client.list_activities(customer_id, after=paginator.cursor, limit=page_size)
        items, following = next_cursor(data, meta)
        for item in items:
            try:
                if not isinstance(item, Mapping):
                    raise SkippableRecord("activity is not an object")
                activities.append(map_activity(item))
            except SkippableRecord as exc:
                log.warning("connector.activity.skipped", source=SOURCE, reason=str(exc))
        paginator.update_state(following)
    return activities
