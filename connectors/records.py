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
from decimal import Decimal, InvalidOperation
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


# --- orders, payments and refunds (stamps from orders) -----------------------------------------

# ISO 4217 minor-unit exponents that are not 2; every other currency has two decimals.
_EXPONENTS: dict[str, int] = {
    **dict.fromkeys(
        [
            "BIF",
            "CLP",
            "DJF",
            "GNF",
            "ISK",
            "JPY",
            "KMF",
            "KRW",
            "PYG",
            "RWF",
            "UGX",
            "UYI",
            "VND",
            "VUV",
            "XAF",
            "XOF",
            "XPF",
        ],
        0,
    ),
    **dict.fromkeys(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"], 3),
    **dict.fromkeys(["CLF", "UYW"], 4),
}


def currency_exponent(currency: str) -> int:
    """The number of minor-unit digits of an ISO 4217 currency (2 unless listed otherwise)."""
    return _EXPONENTS.get(currency.upper(), 2)


def to_minor_units(amount: Any, currency: str) -> int | None:
    """A decimal amount (`"19.99"`, as Shopify sends it) → integer minor units (`1999`).

    Exact `Decimal` arithmetic, never floats. None for anything that is not a finite decimal
    with at most the currency's number of decimals (`"1.999"` in USD is not an amount).
    """
    if isinstance(amount, bool) or not isinstance(amount, str | int):
        return None
    try:
        value = Decimal(str(amount).strip())
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    scaled = value.scaleb(currency_exponent(currency))
    if scaled != scaled.to_integral_value():
        return None
    return int(scaled)


@dataclass(frozen=True, slots=True)
class ForeignRefund:
    """A refund of one earning unit (a Shopify order, a Square payment).

    `order_external_id` names that unit: the Shopify order id, the Square PAYMENT id (Square
    refunds belong to payments). `amount` is in minor units of `currency`. `status` is the
    source's own (`COMPLETED`, `PENDING`, `REJECTED`, `FAILED` on Square; Shopify refunds exist
    only once processed: None). `counts` tells whether the refund reduces the paid amount.
    """

    source: str
    external_id: str
    order_external_id: str
    amount: int
    currency: str | None = None
    status: str | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    @property
    def counts(self) -> bool:
        return self.status is None or self.status.upper() in ("COMPLETED", "PENDING")


@dataclass(frozen=True, slots=True)
class ForeignOrder:
    """A paid order (Shopify) or payment (Square): the unit that earns stamps.

    `external_id` is the Shopify order id or the Square payment id (`kind` says which: `order`
    or `payment`); `order_id` is Square's order of the payment. `customer_external_id` is the
    buyer in the same source; `customer` the embedded customer record when the payload has one
    (Shopify orders do). `amount` is what was paid, in integer minor units of `currency` (None
    when the payload does not say); `paid` whether the source considers it paid (Shopify
    financial status paid/partially_refunded/refunded/partially_paid, Square status
    `COMPLETED`); `cancelled` whether it was cancelled/voided. `refunds` are the refunds the
    payload itself carries (Shopify orders list theirs; Square refunds arrive on their own).
    """

    source: str
    external_id: str
    kind: str = "order"
    customer_external_id: str | None = None
    customer: ForeignCustomer | None = None
    currency: str | None = None
    amount: int | None = None
    paid: bool = False
    cancelled: bool = False
    status: str | None = None
    order_id: str | None = None
    location_id: str | None = None
    created_at: dt.datetime | None = None
    source_updated_at: dt.datetime | None = None
    refunds: tuple[ForeignRefund, ...] = ()


# Square's payment is its earning unit; the same record type describes it.
ForeignPayment = ForeignOrder


@dataclass(frozen=True, slots=True)
class OrderPage:
    """A page of orders/payments/refunds (reconciliation pulls), like `Page` for customers.

    `cursor` is the position after the page (None on the last one); `skipped` counts source
    items that could not be mapped (logged, left out).
    """

    orders: tuple[ForeignOrder, ...] = ()
    refunds: tuple[ForeignRefund, ...] = ()
    cursor: str | None = None
    requests: int = 1
    throttled: int = 0
    skipped: int = 0
