"""Walk LOKE customers (`GET /organizations/{org}/customers`) and a customer's memberships.

Customers come 1000 per page (the seed's fixed page size; the API takes no limit); the cursor
of the next page is the `X-Next-Page` response header, passed back as `after`, and is saved with
each page so a run that dies resumes after its last committed page. A repeated cursor is a loop
(`FatalError`).

Incremental runs: the seed offers `sort=updated` but does NOT say in which direction it sorts
(nor does it offer an updated-since filter), so a run cannot know that the rest of the list is
older than the watermark. Every run is therefore a FULL pass (incremental runs ask for
`sort=updated`, full runs for the API's default order); unchanged customers cost reads only,
thanks to the ingest's content hashes. Should LOKE document `sort=updated` as newest first,
`newest_first=True` makes an incremental run stop after the first page whose records are all
older than `updated_since - overlap` (that page is still yielded: its cursor moves nothing
past a change).

A saved cursor LOKE no longer accepts (400 on a request that carries `after`; the seed says
nothing about cursor lifetimes) restarts the walk from the first page, at most
`MAX_RESTARTS` times a run: upserts are idempotent, so re-reading costs requests, never
correctness — and a run is never stuck on a dead cursor forever.

Memberships (`GET .../customers/{id}/memberships`) are paged by 10 the same way.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any, Final

import structlog

from connectors.errors import FatalError
from connectors.loke.client import LokeClient
from connectors.loke.mapping import SOURCE, map_customer, membership_names
from connectors.paginate import CursorPaginator, map_records
from connectors.records import Page

PAGE_SIZE: Final = 1000
MEMBERSHIP_PAGE_SIZE: Final = 10
# A customer in more lists than this (10 per page) is a fault worth surfacing, not a loop to follow.
MAX_MEMBERSHIP_PAGES: Final = 1000
MAX_RESTARTS: Final = 2

log = structlog.get_logger(__name__)


def _items(data: Any, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise FatalError(f"loke answer: {what} is not a JSON array")
    return data


def iter_customer_pages(
    client: LokeClient,
    *,
    updated_since: dt.datetime | None = None,
    overlap: dt.timedelta = dt.timedelta(0),
    cursor: str | None = None,
    newest_first: bool = False,
) -> Iterator[Page]:
    """Yield the organization's customers page by page from `cursor` on (see the module doc).

    Each Page's `cursor` is the position after it (None on the last page, or on the page an
    early stop ends with); `requests` and `throttled` count everything since the previous page
    (token requests included). Unmappable records are logged and counted in `skipped`.
    """
    if updated_since is not None and updated_since.tzinfo is None:
        raise ValueError("updated_since must be timezone-aware")
    sort = "updated" if updated_since is not None else None
    floor = updated_since - overlap if updated_since is not None else None
    paginator = CursorPaginator(cursor)
    requests, throttled = client.requests, client.throttled
    restarts = 0
    while not paginator.done:
        try:
            data, following = client.list_customers(after=paginator.cursor, sort=sort)
        except FatalError as exc:
            if exc.status != 400 or paginator.cursor is None or restarts >= MAX_RESTARTS:
                raise
            restarts += 1
            log.warning("connector.cursor.restart", source=SOURCE, restarts=restarts)
            paginator.restart()
            continue
        records, skipped = map_records(_items(data, "customers"), map_customer, source=SOURCE)
        if (
            newest_first
            and floor is not None
            and following is not None
            and records
            and all(
                r.source_updated_at is not None and r.source_updated_at < floor for r in records
            )
        ):
            log.info("loke.customers.early_stop", pages=paginator.pages + 1)
            following = None
        paginator.update_state(following)
        yield Page(
            records=records,
            skipped=skipped,
            cursor=following,
            requests=client.requests - requests,
            throttled=client.throttled - throttled,
        )
        requests, throttled = client.requests, client.throttled


def fetch_memberships(client: LokeClient, customer_id: str) -> list[str] | None:
    """The names of every customer list the customer is a member of (see
    `mapping.membership_names`); None when LOKE no longer has the customer (404)."""
    paginator = CursorPaginator(max_pages=MAX_MEMBERSHIP_PAGES)
    items: list[Any] = []
    while not paginator.done:
        try:
            data, following = client.list_memberships(customer_id, after=paginator.cursor)
        except FatalError as exc:
            if exc.status == 404:
                return None
            raise
        items.extend(_items(data, "memberships"))
        paginator.update_state(following)
    return membership_names(items)
