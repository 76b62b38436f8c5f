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
from connectors.records import (
    ForeignCustomer,
    ForeignOrder,
    ForeignRefund,
    clean,
    parse_instant,
    to_minor_units,
)

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


# --- orders and refunds -------------------------------------------------------------------------

_ORDER_GID = re.compile(r"^gid://shopify/Order/(\d+)$")
_REFUND_GID = re.compile(r"^gid://shopify/Refund/(\d+)$")
# Financial statuses of an order whose money was taken (REST lower-case, GraphQL upper-case).
PAID_STATUSES = frozenset({"paid", "partially_refunded", "refunded"})


def _numeric_id(legacy_id: Any, gid: Any, pattern: re.Pattern[str]) -> str | None:
    if isinstance(legacy_id, int) and not isinstance(legacy_id, bool):
        return str(legacy_id) if legacy_id > 0 else None
    legacy = clean(legacy_id)
    if legacy is not None and legacy.isdigit():
        return legacy
    if isinstance(gid, int) and not isinstance(gid, bool):
        return str(gid) if gid > 0 else None
    text = clean(gid)
    if text is None:
        return None
    if text.isdigit():
        return text
    match = pattern.match(text)
    return match.group(1) if match else None


def _currency(value: Any) -> str | None:
    text = clean(value)
    return text.upper() if text is not None and len(text) == 3 and text.isalpha() else None


def _amount(value: Any, currency: str | None, what: str) -> int:
    if currency is None:
        raise SkippableRecord(f"shopify {what} without a currency", code="missing_currency")
    minor = to_minor_units(value, currency)
    if minor is None or minor < 0:
        raise SkippableRecord(f"shopify {what} without a usable amount", code="bad_amount")
    return minor


def _rest_refund(payload: Mapping[str, Any], order_id: str, currency: str | None) -> ForeignRefund:
    """A REST refund (`refunds/create` body, or an entry of an order's `refunds`)."""
    refund_id = _numeric_id(payload.get("id"), payload.get("admin_graphql_api_id"), _REFUND_GID)
    if refund_id is None:
        raise SkippableRecord("shopify refund without a usable id", code="missing_id")
    total = 0
    transactions = payload.get("transactions")
    for tx in transactions if isinstance(transactions, list) else []:
        if not isinstance(tx, Mapping):
            continue
        if clean(tx.get("kind")) != "refund" or clean(tx.get("status")) not in (None, "success"):
            continue
        tx_currency = _currency(tx.get("currency")) or currency
        total += _amount(tx.get("amount"), tx_currency, "refund transaction")
        currency = currency or tx_currency
    return ForeignRefund(
        source=SOURCE,
        external_id=refund_id,
        order_external_id=order_id,
        amount=total,
        currency=currency,
        created_at=parse_instant(payload.get("created_at")),
        updated_at=parse_instant(payload.get("processed_at"))
        or parse_instant(payload.get("created_at")),
    )


def map_webhook_refund(payload: Mapping[str, Any]) -> ForeignRefund:
    """The body of a `refunds/create` webhook → ForeignRefund (amount = its successful refund
    transactions, in minor units)."""
    order_id = _numeric_id(payload.get("order_id"), None, _ORDER_GID)
    if order_id is None:
        raise SkippableRecord("shopify refund without its order id", code="missing_order_id")
    return _rest_refund(payload, order_id, None)


def map_webhook_order(payload: Mapping[str, Any]) -> ForeignOrder:
    """The REST body of `orders/paid|updated|cancelled` → ForeignOrder.

    `amount` is `total_price` (what the buyer paid, after discounts) in minor units; the
    order's own `refunds` list comes along, so a late `orders/updated` also tells refunds.
    """
    order_id = _numeric_id(payload.get("id"), payload.get("admin_graphql_api_id"), _ORDER_GID)
    if order_id is None:
        raise SkippableRecord("shopify order without a usable id", code="missing_id")
    currency = _currency(payload.get("currency")) or _currency(payload.get("presentment_currency"))
    customer_payload = payload.get("customer")
    customer: ForeignCustomer | None = None
    if isinstance(customer_payload, Mapping) and customer_payload.get("id") is not None:
        try:
            customer = map_webhook_customer(customer_payload)
        except SkippableRecord:
            customer = None
    refunds_payload = payload.get("refunds")
    refunds = tuple(
        _rest_refund(r, order_id, currency)
        for r in (refunds_payload if isinstance(refunds_payload, list) else [])
        if isinstance(r, Mapping)
    )
    status = _enum(payload.get("financial_status"))
    return ForeignOrder(
        source=SOURCE,
        external_id=order_id,
        kind="order",
        customer_external_id=customer.external_id if customer is not None else None,
        customer=customer,
        currency=currency,
        amount=_amount(payload.get("total_price"), currency, "order"),
        paid=status in PAID_STATUSES,
        cancelled=clean(payload.get("cancelled_at")) is not None or status == "voided",
        status=status,
        created_at=parse_instant(payload.get("created_at")),
        source_updated_at=parse_instant(payload.get("updated_at")),
        refunds=refunds,
    )


def _money(box: Any) -> tuple[Any, str | None]:
    """`{shopMoney: {amount, currencyCode}}` → (amount, currency)."""
    shop = _sub(box, "shopMoney") if isinstance(box, Mapping) else {}
    return shop.get("amount"), _currency(shop.get("currencyCode"))


def map_order(payload: Mapping[str, Any]) -> ForeignOrder:
    """A GraphQL Admin `Order` node (see `paginate.ORDERS_QUERY`) → ForeignOrder, the same
    record the REST webhook gives for the same order."""
    order_id = _numeric_id(payload.get("legacyResourceId"), payload.get("id"), _ORDER_GID)
    if order_id is None:
        raise SkippableRecord("shopify order without a usable id", code="missing_id")
    raw_amount, money_currency = _money(payload.get("totalPriceSet"))
    currency = _currency(payload.get("currencyCode")) or money_currency
    customer_node = payload.get("customer")
    customer: ForeignCustomer | None = None
    if isinstance(customer_node, Mapping):
        try:
            customer = map_customer(customer_node)
        except SkippableRecord:
            customer = None
    refunds: list[ForeignRefund] = []
    raw_refunds = payload.get("refunds")
    for node in raw_refunds if isinstance(raw_refunds, list) else []:
        if not isinstance(node, Mapping):
            continue
        refund_id = _numeric_id(node.get("legacyResourceId"), node.get("id"), _REFUND_GID)
        if refund_id is None:
            raise SkippableRecord("shopify refund without a usable id", code="missing_id")
        refund_amount, refund_currency = _money(node.get("totalRefundedSet"))
        refunds.append(
            ForeignRefund(
                source=SOURCE,
                external_id=refund_id,
                order_external_id=order_id,
                amount=_amount(refund_amount, refund_currency or currency, "refund"),
                currency=refund_currency or currency,
                created_at=parse_instant(node.get("createdAt")),
                updated_at=parse_instant(node.get("updatedAt"))
                or parse_instant(node.get("createdAt")),
            )
        )
    status = _enum(payload.get("displayFinancialStatus"))
    return ForeignOrder(
        source=SOURCE,
        external_id=order_id,
        kind="order",
        customer_external_id=customer.external_id if customer is not None else None,
        customer=customer,
        currency=currency,
        amount=_amount(raw_amount, currency, "order"),
        paid=status in PAID_STATUSES,
        cancelled=payload.get("cancelledAt") is not None or status == "voided",
        status=status,
        created_at=parse_instant(payload.get("createdAt")),
        source_updated_at=parse_instant(payload.get("updatedAt")),
        refunds=tuple(refunds),
    )
