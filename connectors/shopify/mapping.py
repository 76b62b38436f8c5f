"""Shopify payloads → `records.ForeignCustomer`.

Two shapes: the GraphQL Admin `Customer` node (pull) and the REST-shaped body of the
`customers/*` webhooks. Both give the same record for the same customer: enum values
(`state`, marketing states) are lower-cased because GraphQL says `DISABLED`/`NOT_SUBSCRIBED`
where REST says `disabled`/`not_subscribed`, and the reference metadata must not flip between
the two.

A missing first name is NOT filled in here: the fallback (nickname / company name / email local
part) is a store rule and lives in `models/`. Absent fields stay None — never "clear".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from connectors.errors import SkippableRecord
from connectors.records import ForeignCustomer, clean, parse_instant

SOURCE = "shopify"

_GID = re.compile(r"^gid://shopify/Customer/(\d+)$")


def _external_id(legacy_id: Any, gid: Any) -> str | None:
    if isinstance(legacy_id, int) and not isinstance(legacy_id, bool):
        return str(legacy_id)
    legacy = clean(legacy_id)
    if legacy is not None and legacy.isdigit():
        return legacy
    if isinstance(gid, int) and not isinstance(gid, bool):
        return str(gid)
    text = clean(gid)
    if text is None:
        return None
    if text.isdigit():
        return text
    match = _GID.match(text)
    return match.group(1) if match else None


def _sub(payload: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = payload.get(key)
    return value if isinstance(value, Mapping) else {}


def _enum(value: Any) -> str | None:
    text = clean(value)
    return text.lower() if text is not None else None


def _attributes(
    *,
    tags: list[str] | None,
    state: Any,
    email_marketing: Any,
    sms_marketing: Any,
    verified_email: Any,
    note: Any,
) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    if tags is not None:
        attributes["tags"] = tags
    if (value := _enum(state)) is not None:
        attributes["state"] = value
    if (value := _enum(email_marketing)) is not None:
        attributes["email_marketing_state"] = value
    if (value := _enum(sms_marketing)) is not None:
        attributes["sms_marketing_state"] = value
    if isinstance(verified_email, bool):
        attributes["verified_email"] = verified_email
    if (value := clean(note)) is not None:
        attributes["note"] = value
    return attributes


def map_customer(payload: Mapping[str, Any]) -> ForeignCustomer:
    """A GraphQL Admin `Customer` node → ForeignCustomer.

    `defaultEmailAddress`/`defaultPhoneNumber` (2025-04+) win; the deprecated `email`/`phone`
    are the fallback for older API versions.
    """
    external_id = _external_id(payload.get("legacyResourceId"), payload.get("id"))
    if external_id is None:
        raise SkippableRecord("shopify customer without a usable id", code="missing_id")
    email_box = _sub(payload, "defaultEmailAddress")
    phone_box = _sub(payload, "defaultPhoneNumber")
    raw_tags = payload.get("tags")
    tags = (
        [tag for tag in (clean(t) for t in raw_tags) if tag is not None]
        if isinstance(raw_tags, list)
        else None
    )
    return ForeignCustomer(
        source=SOURCE,
        external_id=external_id,
        first_name=clean(payload.get("firstName")),
        last_name=clean(payload.get("lastName")),
        email=clean(email_box.get("emailAddress")) or clean(payload.get("email")),
        phone=clean(phone_box.get("phoneNumber")) or clean(payload.get("phone")),
        source_updated_at=parse_instant(payload.get("updatedAt")),
        attributes=_attributes(
            tags=tags,
            state=payload.get("state"),
            email_marketing=email_box.get("marketingState"),
            sms_marketing=phone_box.get("marketingState"),
            verified_email=payload.get("verifiedEmail"),
            note=payload.get("note"),
        ),
    )


def split_tags(value: Any) -> list[str] | None:
    """REST `tags` is one comma-separated string (`"Léon, Noël"`); GraphQL gives a list."""
    if isinstance(value, list):
        return [tag for tag in (clean(t) for t in value) if tag is not None]
    if not isinstance(value, str):
        return None
    return [tag for tag in (clean(t) for t in value.split(",")) if tag is not None]


def map_webhook_customer(payload: Mapping[str, Any]) -> ForeignCustomer:
    """The REST-shaped body of a `customers/create|update` webhook → ForeignCustomer.

    From API version 2025-01 these bodies no longer carry `tags` and the marketing consents; such
    keys are then simply absent from `attributes` (absent never clears).
    """
    external_id = _external_id(payload.get("id"), payload.get("admin_graphql_api_id"))
    if external_id is None:
        raise SkippableRecord("shopify webhook customer without a usable id", code="missing_id")
    return ForeignCustomer(
        source=SOURCE,
        external_id=external_id,
        first_name=clean(payload.get("first_name")),
        last_name=clean(payload.get("last_name")),
        email=clean(payload.get("email")),
        phone=clean(payload.get("phone")),
        source_updated_at=parse_instant(payload.get("updated_at")),
        attributes=_attributes(
            tags=split_tags(payload.get("tags")),
            state=payload.get("state"),
            email_marketing=_sub(payload, "email_marketing_consent").get("state"),
            sms_marketing=_sub(payload, "sms_marketing_consent").get("state"),
            verified_email=payload.get("verified_email"),
            note=payload.get("note"),
        ),
    )
