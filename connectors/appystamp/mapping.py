"""Appy Stamp customer and activity objects → plain records.

Only Appy Stamp's own conventions are translated here:

- `dateOfBirth` is `dd-mm` → year-less `--MM-DD` (an impossible day/month → no birthday);
- `id` is the Shopify customer id (kept as the external id; `models.ingest` resolves it through
  a `shopify` reference first);
- `stampBalance`, `cards`, `stampsToNextReward`, `stampsExpireAt`, `vipTierId`, `vipTierName`,
  `state` → attributes (the reference's metadata): `stamp_balance`, `completed_cards`,
  `stamps_to_next_reward`, `stamps_expire_at`, `vip_tier_id`, `vip_tier_name`, `state`;
- `state` `removed`/`excluded` → `attributes["loyalty_excluded"] = True`, `active` → False
  (the reserved key `models.ingest.EXCLUDED_ATTRIBUTE`: the local customer becomes `excluded`);
  another or no state says nothing;
- `mergedIntoCustomerId` → `merged_into` with `deleted=True` (the record is a tombstone naming
  its survivor; the ingest follows the merge).

A record without an id, or whose fields have the wrong types, is a `SkippableRecord`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from connectors.errors import SkippableRecord
from connectors.records import ForeignCustomer, clean, parse_instant

SOURCE = "appystamp"
EXCLUDED_ATTRIBUTE = "loyalty_excluded"
"""Reserved attribute (same string as `models.ingest.EXCLUDED_ATTRIBUTE`, checked by a test)."""
BALANCE_ATTRIBUTE = "stamp_balance"
EXCLUDED_STATES = frozenset({"removed", "excluded"})
ACTIVE_STATES = frozenset({"active"})
_DAY_MONTH = re.compile(r"^(\d{1,2})-(\d{1,2})$")


def map_birthday(value: Any) -> str | None:
    """`dd-mm` → `--MM-DD`; anything else, or a day the month never has, → None."""
    text = clean(value)
    if text is None:
        return None
    match = _DAY_MONTH.match(text)
    if match is None:
        return None
    day, month = int(match.group(1)), int(match.group(2))
    try:
        dt.date(2000, month, day)  # a leap year: 29-02 is a birthday
    except ValueError:
        return None
    return f"--{month:02d}-{day:02d}"


def _integer(obj: Mapping[str, Any], key: str) -> int | None:
    """An integer field: absent/null → None; a non-integer → SkippableRecord."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise SkippableRecord(f"appystamp customer: {key} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value.strip())
    raise SkippableRecord(f"appystamp customer: {key} is not an integer")


def _external_id(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    return clean(value)


def _attributes(obj: Mapping[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    for key, name in (
        ("stampBalance", BALANCE_ATTRIBUTE),
        ("cards", "completed_cards"),
        ("stampsToNextReward", "stamps_to_next_reward"),
        ("vipTierId", "vip_tier_id"),
    ):
        number = _integer(obj, key)
        if number is not None:
            attributes[name] = number
    for key, name in (("vipTierName", "vip_tier_name"), ("stampsExpireAt", "stamps_expire_at")):
        text = clean(obj.get(key))
        if text is not None:
            attributes[name] = text
    state = clean(obj.get("state"))
    if state is not None:
        attributes["state"] = state
        lowered = state.lower()
        if lowered in EXCLUDED_STATES:
            attributes[EXCLUDED_ATTRIBUTE] = True
        elif lowered in ACTIVE_STATES:
            attributes[EXCLUDED_ATTRIBUTE] = False
    return attributes


def map_customer(obj: Mapping[str, Any]) -> ForeignCustomer:
    """One Appy Stamp customer (list/get shape) → ForeignCustomer (SkippableRecord if unusable)."""
    external_id = _external_id(obj.get("id"))
    if external_id is None:
        raise SkippableRecord("appystamp customer without an id")
    for key in ("firstName", "lastName", "email", "dateOfBirth", "state"):
        if obj.get(key) is not None and not isinstance(obj.get(key), str):
            raise SkippableRecord(f"appystamp customer: {key} is not a string")
    merged_into = _external_id(obj.get("mergedIntoCustomerId"))
    if merged_into == external_id:
        merged_into = None
    return ForeignCustomer(
        source=SOURCE,
        external_id=external_id,
        first_name=clean(obj.get("firstName")),
        last_name=clean(obj.get("lastName")),
        email=clean(obj.get("email")),
        birthday=map_birthday(obj.get("dateOfBirth")),
        attributes=_attributes(obj),
        merged_into=merged_into,
        # A merged-away record no longer stands for a person of its own: a tombstone that
        # names its survivor (as Square's merge deletes do).
        deleted=merged_into is not None,
    )


def stamp_balance(record: ForeignCustomer) -> int | None:
    """The source's stamp balance kept on a mapped record (None when it sent none)."""
    value = record.attributes.get(BALANCE_ATTRIBUTE)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class Activity:
    """One entry of a customer's stamp ledger at Appy Stamp."""

    id: str
    stamp_change: int
    type: str | None = None
    created_at: dt.datetime | None = None
    description: str | None = None

    def details(self) -> dict[str, Any]:
        """What a local ledger entry keeps of it (provenance, no PII)."""
        details: dict[str, Any] = {"source": SOURCE, "activity_id": self.id}
        if self.type:
            details["type"] = self.type
        if self.created_at is not None:
            details["created_at"] = self.created_at.isoformat()
        if self.description:
            details["description"] = self.description[:200]
        return details


def map_activity(obj: Mapping[str, Any]) -> Activity:
    """One activity → Activity; without an id or an integer `stampChange` → SkippableRecord."""
    activity_id = _external_id(obj.get("id"))
    if activity_id is None:
        raise SkippableRecord("appystamp activity without an id")
    change = obj.get("stampChange")
    if isinstance(change, bool) or not isinstance(change, int):
        if isinstance(change, float) and change.is_integer():
            change = int(change)
        else:
            raise SkippableRecord("appystamp activity: stampChange is not an integer")
    return Activity(
        id=activity_id,
        stamp_change=change,
        type=clean(obj.get("type")),
        created_at=parse_instant(obj.get("createdAt")),
        description=clean(obj.get("description")),
    )
