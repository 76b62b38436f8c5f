"""The plain records connectors yield; `models/` knows how to upsert them.

Connectors never import `models/`: they turn foreign payloads into these frozen dataclasses and
nothing else. Values are as the source sent them, lightly cleaned (strings stripped, empty
strings to None, timestamps parsed to aware UTC datetimes); normalisation to the store's rules
(E.164 phones, lower-cased emails) happens in `models/`, the one place that owns those rules.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ForeignCustomer:
    """One customer record of a foreign system.

    `attributes` are source-specific facts kept as the reference's metadata (tags, state,
    marketing consent, …). `birthday` is `YYYY-MM-DD` or year-less `--MM-DD`, already converted
    from the source's own convention (Square `0000-MM-DD`, Appy Stamp `dd-mm`).

    `deleted` marks a tombstone (the source deleted the record); `merged_into` names the
    external id of the record this one was merged into. `version` is the source's monotonic
    version when it has one (Square), else None; `source_updated_at` is its last-change time.
    """

    source: str
    external_id: str
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    phone: str | None = None
    birthday: str | None = None
    nickname: str | None = None
    company_name: str | None = None
    source_updated_at: dt.datetime | None = None
    version: int | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    deleted: bool = False
    merged_into: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """A page of records and what is needed to ask for the next one.

    `cursor` is the opaque position after this page (None on the last page); saving it with the
    page's upsert is what makes a sync resumable. `skipped` counts the source's items on this
    page that could not be mapped (logged, left out of `records`).
    """

    records: tuple[ForeignCustomer, ...]
    cursor: str | None
    requests: int = 1
    throttled: int = 0
    skipped: int = 0


def clean(value: Any) -> str | None:
    """Strip a string; empty → None; non-strings → None (absent, never "clear")."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def parse_instant(value: Any) -> dt.datetime | None:
    """An RFC 3339 / ISO 8601 timestamp with any UTC offset → aware UTC datetime.

    Shopify mixes offsets (`2024-04-02T09:20:49-05:00`); comparing as instants is the only
    correct comparison. A naive or unparseable value gives None.
    """
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.astimezone(dt.UTC)
