"""LOKE `Customer` objects (seed 004) and `CustomerListTiny` memberships → plain records.

- `firstName`, `lastName`, `email`, `phoneNumber` → the customer's fields, as sent (`models/`
  normalises; LOKE phones are not unique there, which the connection's policy deals with);
- `dob` (`YYYY-MM-DD`) → birthday (an impossible date is dropped, not guessed);
- `updatedAt` → `source_updated_at` (the stale guard);
- reference metadata (`ForeignCustomer.attributes`): `gender`, `has_agreed_to_marketing`,
  `created_at`, `statistics` (LOKE's own keys, only the documented ones, well-typed) and
  `points_balance` (`statistics.pointsBalance`, kept top-level for the points → stamps rule).

List memberships are NOT attributes: they are fetched per changed customer after the page is
read and written into the reference metadata under `MEMBERSHIPS_KEY` (see
`worker.import_loke`), so that the content hash — which decides "changed" on the next run —
covers only what the customer list itself returns.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from connectors.errors import SkippableRecord
from connectors.records import ForeignCustomer, clean, parse_instant

SOURCE: Final = "loke"
MEMBERSHIPS_KEY: Final = "memberships"
POINTS_KEY: Final = "points_balance"
# Membership list names kept per customer, and their length: metadata stays bounded.
MAX_MEMBERSHIPS: Final = 200
MAX_LIST_NAME: Final = 200
_DOB: Final = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:$|T)")
_STAT_INTS: Final = ("pointsBalance", "totalPointsEarned", "totalPointsRedeemed", "totalSpend")
_STAT_TIMES: Final = ("lastPointsEarnedAt", "lastPointsRedeemedAt", "lastSpentAt")


def map_dob(value: Any) -> str | None:
    """`YYYY-MM-DD` (a real date, year ≥ 1900) → itself; anything else → None."""
    text = clean(value)
    if text is None:
        return None
    match = _DOB.match(text)
    if match is None:
        return None
    year, month, day = (int(part) for part in match.groups())
    try:
        dt.date(year, month, day)
    except ValueError:
        return None
    if year < 1900:
        return None
    return f"{year:04d}-{month:02d}-{day:02d}"


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _statistics(value: Any) -> dict[str, Any] | None:
    """The documented `CustomerStatistics` fields that are well-typed (others dropped)."""
    if not isinstance(value, Mapping):
        return None
    stats: dict[str, Any] = {}
    for key in _STAT_INTS:
        number = _integer(value.get(key))
        if number is not None:
            stats[key] = number
    for key in _STAT_TIMES:
        text = clean(value.get(key))
        if text is not None and parse_instant(text) is not None:
            stats[key] = text
    return stats or None


def points_balance(record: ForeignCustomer) -> int | None:
    """The record's LOKE `pointsBalance` (None when LOKE did not send one)."""
    value = record.attributes.get(POINTS_KEY)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def map_customer(obj: Mapping[str, Any]) -> ForeignCustomer:
    """One LOKE `Customer` → ForeignCustomer; `SkippableRecord` without a usable id."""
    raw_id = obj.get("id")
    external_id = clean(raw_id) if isinstance(raw_id, str) else None
    if external_id is None:
        raise SkippableRecord("loke customer without an id")
    if len(external_id) > 255:
        raise SkippableRecord("loke customer id is longer than 255 characters")
    attributes: dict[str, Any] = {}
    gender = clean(obj.get("gender"))
    if gender is not None:
        attributes["gender"] = gender[:40]
    marketing = obj.get("hasAgreedToMarketing")
    if isinstance(marketing, bool):
        attributes["has_agreed_to_marketing"] = marketing
    created = clean(obj.get("createdAt"))
    if created is not None and parse_instant(created) is not None:
        attributes["created_at"] = created
    stats = _statistics(obj.get("statistics"))
    if stats is not None:
        attributes["statistics"] = stats
        if "pointsBalance" in stats:
            attributes[POINTS_KEY] = stats["pointsBalance"]
    return ForeignCustomer(
        source=SOURCE,
        external_id=external_id,
        first_name=clean(obj.get("firstName")),
        last_name=clean(obj.get("lastName")),
        email=clean(obj.get("email")),
        phone=clean(obj.get("phoneNumber")),
        birthday=map_dob(obj.get("dob")),
        source_updated_at=parse_instant(obj.get("updatedAt")),
        attributes=attributes,
    )


def membership_names(items: Iterable[Any]) -> list[str]:
    """`CustomerListTiny` items → their list names, in the API's order, without repeats or
    blanks (an item without a usable name is left out), at most `MAX_MEMBERSHIPS`."""
    names: list[str] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, Mapping):
            continue
        name = clean(item.get("name"))
        if name is None:
            continue
        name = name[:MAX_LIST_NAME]
        if name in seen:
            continue
        seen.add(name)
        names.append(name)
        if len(names) >= MAX_MEMBERSHIPS:
            break
    return names
