"""Cursor pagination state for one run: where to ask next, when to stop, loops caught.

A `CursorPaginator` is created fresh per run (never shared, never reused) and knows three moves:
`cursor` (what to send), `update_state(next_cursor)` (what the answer said), `restart()` (the
source rejected a saved cursor: begin again from the first page). It owns no HTTP: the source's
`paginate.py` turns `cursor` into its request and the answer into `next_cursor`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog

from connectors.errors import FatalError, SkippableRecord
from connectors.records import ForeignCustomer

log = structlog.get_logger(__name__)


def map_records(
    items: Iterable[Any],
    map_one: Callable[[Mapping[str, Any]], ForeignCustomer],
    *,
    source: str,
) -> tuple[tuple[ForeignCustomer, ...], int]:
    """Map one page's items → (records, skipped).

    An item that can't be mapped is logged and counted, not fatal: one bad record must not stop
    a sync of thousands.
    """
    records: list[ForeignCustomer] = []
    skipped = 0
    for item in items:
        if not isinstance(item, Mapping):
            log.warning("connector.record.skipped", source=source, reason="not an object")
            skipped += 1
            continue
        try:
            records.append(map_one(item))
        except SkippableRecord as exc:
            log.warning("connector.record.skipped", source=source, reason=str(exc))
            skipped += 1
    return tuple(records), skipped


class CursorPaginator:
    """Follows opaque `next_cursor`s; a cursor seen twice in one run is a loop (`FatalError`).

    `start_cursor` resumes a run at a saved position (it counts as seen). `max_pages` bounds a run:
    once `max_pages` pages have been taken, being told of yet another page raises `FatalError`.
    An empty-string cursor means "no more pages", like None.
    """

    def __init__(self, start_cursor: str | None = None, *, max_pages: int | None = None) -> None:
        if max_pages is not None and max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        self.max_pages = max_pages
        self._cursor = start_cursor or None
        self._seen: set[str] = set()
        if self._cursor is not None:
            self._seen.add(self._cursor)
        self._pages = 0
        self._done = False

    @property
    def cursor(self) -> str | None:
        """The cursor to send for the next page (None: the first page)."""
        return self._cursor

    @property
    def done(self) -> bool:
        """True once a page said there is no next one."""
        return self._done

    @property
    def pages(self) -> int:
        """Pages taken in this run (since the last `restart`)."""
        return self._pages

    def update_state(self, next_cursor: str | None) -> None:
        """Record the page just received and the cursor it gave for the next one."""
        if self._done:
            raise RuntimeError("update_state() after the last page")
        self._pages += 1
        if not next_cursor:
            self._cursor = None
            self._done = True
            return
        if next_cursor in self._seen:
            raise FatalError(
                f"pagination loop: the source repeated a cursor after {self._pages} page(s)"
            )
        if self.max_pages is not None and self._pages >= self.max_pages:
            raise FatalError(f"pagination exceeded max_pages={self.max_pages}")
        self._seen.add(next_cursor)
        self._cursor = next_cursor

    def restart(self) -> None:
        """Back to the first page; forget every cursor seen (after `InvalidCursorError`)."""
        self._cursor = None
        self._seen.clear()
        self._pages = 0
        self._done = False
