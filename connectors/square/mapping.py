"""Square `Customer` objects and `customer.*` webhook events → `ForeignCustomer`.

Values stay as Square sent them (phone as entered — `models/` normalises); only Square's own
conventions are translated here: `0000-MM-DD` is a year-less birthday (`--MM-DD`), `version` is
the stale-update guard, a merge is told by `event_context.merge` on the webhook.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from connectors.errors import SkippableRecord
from connectors.records import ForeignCustomer, ForeignOrder, ForeignRefund, clean, parse_instant

SOURCE = "square"
CUSTOMER_EVENTS = frozenset({"customer.created", "customer.updated", "customer.deleted"})
_BIRTHDAY = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:$|T)")


def map_birthday(value: Any) -> str | None:
    """`YYYY-MM-DD` kept; `0000-MM-DD` → `--MM-DD`; anything else (or an impossible date) → None."""
    text = clean(value)
    if text is None:
        return None
    match = _BIRTHDAY.match(text)
    if match is None:
        return None
    year, month, day = (int(part) for part in match.groups())
    try:
        # A leap year stands in for "no year" so that 0000-02-29 stays valid.
        dt.date(year or 2000, month, day)
    except ValueError:
        return None
    if year == 0:
        return f"--{month:02d}-{day:02d}"
    return f"{year:04d}-{month:02d}-{day:02d}"


def _version(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _attributes(obj: Mapping[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    for key in ("reference_id", "creation_source", "note"):
        text = clean(obj.get(key))
        if text is not None:
            attributes[key] = text
    preferences = obj.get("preferences")
    if isinstance(preferences, Mapping) and isinstance(preferences.get("email_unsubscribed"), bool):
        attributes["email_unsubscribed"] = preferences["email_unsubscribed"]
    group_ids = obj.get("group_ids")
    if isinstance(group_ids, list):
        attributes["group_ids"] = [g for g in group_ids if isinstance(g, str)]
    return attributes


def map_customer(obj: Mapping[str, Any]) -> ForeignCustomer:
    """One Square `Customer` (SearchCustomers/ListCustomers/webhook shape) → ForeignCustomer."""
    external_id = clean(obj.get("id"))
    if external_id is None:
        raise SkippableRecord("square customer without an id")
    return ForeignCustomer(
        source=SOURCE,
        external_id=external_id,
        first_name=clean(obj.get("given_name")),
        last_name=clean(obj.get("family_name")),
        nickname=clean(obj.get("nickname")),
        company_name=clean(obj.get("company_name")),
        email=clean(obj.get("email_address")),
        phone=clean(obj.get("phone_number")),
        birthday=map_birthday(obj.get("birthday")),
        version=_version(obj.get("version")),
        source_updated_at=parse_instant(obj.get("updated_at")),
        attributes=_attributes(obj),
    )


def _merge_context(obj: Mapping[str, Any]) -> tuple[list[str], str | None]:
    context = obj.get("event_context")
    merge = context.get("merge") if isinstance(context, Mapping) else None
    if not isinstance(merge, Mapping):
        return [], None
    raw_from = merge.get("from_customer_ids")
    from_ids = (
        [i for i in raw_from if isinstance(i, str) and i] if isinstance(raw_from, list) else []
    )
    return from_ids, clean(merge.get("to_customer_id"))


def map_webhook_event(event: Mapping[str, Any]) -> ForeignCustomer:
    """A `customer.created|updated|deleted` event → ForeignCustomer.

    `customer.deleted` → `deleted=True`; when the delete comes from a merge
    (`data.object.event_context.merge`), `merged_into` names `to_customer_id`. The profile created
    by a merge carries the merged ids as `attributes["merged_from"]`. A deleted profile has no
    `updated_at`: the event's `created_at` stands in as its change time. Other event types →
    SkippableRecord.
    """
    event_type = event.get("type")
    if event_type not in CUSTOMER_EVENTS:
        raise SkippableRecord(f"square event {event_type!r} is not a customer event")
    data = event.get("data")
    if not isinstance(data, Mapping):
        raise SkippableRecord("square customer event without data")
    obj = data.get("object")
    obj = obj if isinstance(obj, Mapping) else {}
    customer = obj.get("customer")
    payload: dict[str, Any] = dict(customer) if isinstance(customer, Mapping) else {}
    if clean(payload.get("id")) is None:
        payload["id"] = data.get("id")
    record = map_customer(payload)
    from_ids, to_id = _merge_context(obj)
    deleted = event_type == "customer.deleted" or data.get("deleted") is True
    changes: dict[str, Any] = {}
    if record.source_updated_at is None:
        changes["source_updated_at"] = parse_instant(event.get("created_at"))
    if deleted:
        changes["deleted"] = True
        if to_id is not None and to_id != record.external_id:
            changes["merged_into"] = to_id
    elif from_ids:
        changes["attributes"] = {
            **record.attributes,
            "merged_from": [i for i in from_ids if i != record.external_id],
        }
    if not changes:
        return record
    return dataclasses.replace(record, **changes)


# --- payments and refunds (stamps from orders) ----------------------------------------------

PAYMENT_EVENTS = frozenset({"payment.created", "payment.updated"})
REFUND_EVENTS = frozenset({"refund.created", "refund.updated"})


def _money(value: Any) -> tuple[int | None, str | None]:
    """Square `Money` `{amount, currency}`: amount already in minor units (an integer)."""
    if not isinstance(value, Mapping):
        return None, None
    amount = value.get("amount")
    currency = clean(value.get("currency"))
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        return None, currency.upper() if currency else None
    return amount, currency.upper() if currency else None


def map_payment(payload: Mapping[str, Any]) -> ForeignOrder:
    """A Square `Payment` object → ForeignOrder (`kind="payment"`, the earning unit).

    `amount` is `amount_money` (the goods, without tip) minus nothing: refunds arrive as their
    own records. `paid` only for status `COMPLETED`; `CANCELED`/`FAILED` are `cancelled`.
    """
    payment_id = clean(payload.get("id"))
    if payment_id is None:
        raise SkippableRecord("square payment without an id", code="missing_id")
    amount, currency = _money(payload.get("amount_money"))
    if amount is None:
        amount, currency = _money(payload.get("total_money"))
    status = clean(payload.get("status"))
    status = status.upper() if status else None
    return ForeignOrder(
        source=SOURCE,
        external_id=payment_id,
        kind="payment",
        customer_external_id=clean(payload.get("customer_id")),
        currency=currency,
        amount=amount,
        paid=status == "COMPLETED",
        cancelled=status in ("CANCELED", "FAILED"),
        status=status,
        order_id=clean(payload.get("order_id")),
        location_id=clean(payload.get("location_id")),
        created_at=parse_instant(payload.get("created_at")),
        source_updated_at=parse_instant(payload.get("updated_at")),
    )


def map_refund(payload: Mapping[str, Any]) -> ForeignRefund:
    """A Square `PaymentRefund` object → ForeignRefund of its PAYMENT."""
    refund_id = clean(payload.get("id"))
    payment_id = clean(payload.get("payment_id"))
    if refund_id is None or payment_id is None:
        raise SkippableRecord("square refund without its id or payment id", code="missing_id")
    amount, currency = _money(payload.get("amount_money"))
    if amount is None:
        raise SkippableRecord("square refund without a usable amount", code="bad_amount")
    status = clean(payload.get("status"))
    return ForeignRefund(
        source=SOURCE,
        external_id=refund_id,
        order_external_id=payment_id,
        amount=amount,
        currency=currency,
        status=status.upper() if status else None,
        created_at=parse_instant(payload.get("created_at")),
        updated_at=parse_instant(payload.get("updated_at")),
    )


def _event_object(payload: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    data = payload.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    inner = obj.get(name) if isinstance(obj, Mapping) else None
    if not isinstance(inner, Mapping):
        raise SkippableRecord(f"square event without data.object.{name}", code="missing_object")
    return inner


def map_webhook_payment(payload: Mapping[str, Any]) -> ForeignOrder:
    """A `payment.created|updated` event → the payment's ForeignOrder."""
    return map_payment(_event_object(payload, "payment"))


def map_webhook_refund(payload: Mapping[str, Any]) -> ForeignRefund:
    """A `refund.created|updated` event → ForeignRefund."""
    return map_refund(_event_object(payload, "refund"))


def order_customer_id(order: Mapping[str, Any]) -> str | None:
    """The `customer_id` of a Square `Order` (filled when a payment's own is missing)."""
    return clean(order.get("customer_id"))
