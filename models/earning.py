"""Stamps from orders: a connection's earning rule and applying source orders/refunds to it.

The rule lives in `Connection.config` (keys `card_id`, `earn`, `min_amount`, `currency`):

- `earn = {"kind": "per_order", "stamps": N}`: N stamps per qualifying order;
- `earn = {"kind": "per_amount", "minor_units": X}`: 1 stamp per whole X minor units paid;
- `min_amount` (minor units, optional): orders paying less earn nothing;
- `currency` (optional ISO 4217): orders in another currency earn nothing (counted, logged).

What an order is entitled to is `entitlement(net)`, `net` being what was paid minus what was
refunded (0 once cancelled): 0 below the minimum, else N (per_order) or `net // X`
(per_amount). An order earns `entitlement(amount)` once, when first seen paid; each refund then
reverses `earned - entitlement(net after it)` minus what earlier refunds reversed (so refunds
never take back more than the order earned, and a per_order order only loses its stamps when
refunds bring it under the minimum or to zero); cancellation reverses the rest.

Exactly once: every order/payment has one `order_earnings` row, locked (`FOR UPDATE`) while it
is worked on and created under a savepoint (concurrent first arrivals meet on its unique key),
and every ledger entry is keyed by the source's ids — `shopify:order:<id>`,
`shopify:refund:<id>`, `square:payment:<id>`, `square:refund:<id>`, cancellations
`<order key>:cancel` — under the ledger's unique `(store_id, idempotency_key)`.

Customers: the buyer is created/linked through `apply_customer_page` (identity rules, stale
guard) and merges are followed to the survivor; `excluded`, `redacted` and `deleted` customers
earn nothing. An order whose buyer is not known yet (no customer id, or an id without a record to
create the customer from) stays undecided until a later event or a reconciliation brings one.
A customer without a card of the rule's template is enrolled: quietly (no welcome bonus, no
notification) for reconciliation; for a live webhook the enrolment is the normal one
(the template's welcome bonus) and ledger changes queue the usual pass update and push.

A reversal larger than the balance (stamps already redeemed) takes the balance to 0 and
records the shortfall in the entry's details (and on the order row when nothing was left).
Functions write in the caller's transaction; the caller commits.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from connectors.records import ForeignCustomer, ForeignOrder, ForeignRefund
from models import cards, earning_sql
from models.errors import ErrorBag, NotFound, ValidationFailed
from models.ingest import (
    IngestPolicy,
    apply_customer_page,
    lock_store,
    prefer_cached_plans,
    prefer_index_probes,
)
from models.tables import (
    CardTemplate,
    Connection,
    Customer,
    CustomerCard,
    OrderEarning,
    StampLedgerEntry,
    SyncRun,
    is_valid_id,
    utcnow,
)


def _log() -> Any:
    """Resolved per call, never cached at import: each CLI invocation configures its own
    output, and a logger bound to an earlier invocation's (closed) stream would fail."""
    return structlog.get_logger(__name__)


Via = Literal["webhook", "reconcile"]
VIAS: Final = ("webhook", "reconcile")
EARNING_KEYS: Final = ("card_id", "earn", "min_amount", "currency")
NO_EARNING_STATES: Final = frozenset({"excluded", "redacted", "deleted"})
MAX_STAMPS_PER_ORDER: Final = 1000
MAX_MERGE_HOPS: Final = 20


@dataclass(frozen=True, slots=True)
class EarningRule:
    """A connection's validated earning rule."""

    card_id: int
    kind: Literal["per_order", "per_amount"]
    value: int  # stamps per order, or minor units per stamp
    min_amount: int | None = None
    currency: str | None = None

    def entitlement(self, net: int) -> int:
        """Stamps an order that paid `net` minor units is entitled to."""
        if net <= 0 or (self.min_amount is not None and net < self.min_amount):
            return 0
        stamps = self.value if self.kind == "per_order" else net // self.value
        return min(stamps, MAX_STAMPS_PER_ORDER)

    def as_config(self) -> dict[str, Any]:
        earn: dict[str, Any] = (
            {"kind": "per_order", "stamps": self.value}
            if self.kind == "per_order"
            else {"kind": "per_amount", "minor_units": self.value}
        )
        return {
            "card_id": self.card_id,
            "earn": earn,
            "min_amount": self.min_amount,
            "currency": self.currency,
        }


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_earn(text: str) -> dict[str, Any]:
    """`per_order:N` / `per_amount:MINOR_UNITS` (the CLI form) → an `earn` spec."""
    kind, sep, raw = text.strip().partition(":")
    if not sep or kind not in ("per_order", "per_amount"):
        raise ValidationFailed.single("earn", "must be per_order:N or per_amount:MINOR_UNITS")
    try:
        value = int(raw)
    except ValueError:
        raise ValidationFailed.single("earn", f"{kind} needs a whole number, got {raw!r}") from None
    key = "stamps" if kind == "per_order" else "minor_units"
    return {"kind": kind, key: value}


def _validate_spec(
    errors: ErrorBag, earn: Any, min_amount: Any, currency: Any
) -> tuple[str, int, int | None, str | None]:
    kind, value = "per_order", 0
    if not isinstance(earn, Mapping) or earn.get("kind") not in ("per_order", "per_amount"):
        errors.add("earn", "must be {kind: per_order, stamps: N} or {kind: per_amount, ...}")
    else:
        kind = str(earn["kind"])
        key = "stamps" if kind == "per_order" else "minor_units"
        raw = earn.get(key)
        value = raw if isinstance(raw, int) and _positive_int(raw) else 0
        if not value:
            errors.add("earn", f"{kind} needs {key} ≥ 1")
        elif kind == "per_order" and value > MAX_STAMPS_PER_ORDER:
            errors.add("earn", f"per_order stamps must be at most {MAX_STAMPS_PER_ORDER}")
    if min_amount is not None and not (
        isinstance(min_amount, int) and not isinstance(min_amount, bool) and min_amount >= 0
    ):
        errors.add("min_amount", "must be a whole number of minor units ≥ 0")
    if currency is not None and not (
        isinstance(currency, str) and len(currency) == 3 and currency.isalpha()
    ):
        errors.add("currency", "must be a 3-letter ISO 4217 code")
    return kind, value, min_amount, currency.upper() if isinstance(currency, str) else None


def rule_from_config(config: Mapping[str, Any] | None) -> EarningRule | None:
    """The connection's earning rule, or None when it has none (`card_id` absent).

    A config that names a card but is otherwise broken raises `ValidationFailed`: an order must
    never silently earn by a half-read rule.
    """
    config = config or {}
    if config.get("card_id") is None:
        return None
    errors = ErrorBag()
    card_id = config.get("card_id")
    if not _positive_int(card_id):
        errors.add("card_id", "must be a card id")
    kind, value, min_amount, currency = _validate_spec(
        errors, config.get("earn"), config.get("min_amount"), config.get("currency")
    )
    errors.raise_if_any()
    assert isinstance(card_id, int)
    return EarningRule(
        card_id=card_id,
        kind="per_order" if kind == "per_order" else "per_amount",
        value=value,
        min_amount=min_amount,
        currency=currency,
    )


def configure_earning(
    session: Session,
    connection_id: int,
    card_id: int,
    earn_spec: Mapping[str, Any],
    min_amount: int | None,
    currency: str | None = None,
) -> Connection:
    """Set the connection's earning rule (validated; the other config keys are kept).

    `NotFound` for an unknown connection; `ValidationFailed` (every problem at once) when the
    card is not a live card of the connection's store, or the rule is not usable.
    """
    connection = session.get(Connection, connection_id) if is_valid_id(connection_id) else None
    if connection is None:
        raise NotFound("Connection")
    errors = ErrorBag()
    card = (
        session.scalar(
            select(CardTemplate).where(
                CardTemplate.id == card_id, CardTemplate.store_id == connection.store_id
            )
        )
        if _positive_int(card_id) and is_valid_id(card_id)
        else None
    )
    if card is None:
        errors.add("card_id", "does not match a card of the connection's store")
    elif card.archived_at is not None:
        errors.add("card_id", "is archived")
    kind, value, min_amount, currency = _validate_spec(errors, earn_spec, min_amount, currency)
    errors.raise_if_any()
    rule = EarningRule(
        card_id=card_id,
        kind="per_order" if kind == "per_order" else "per_amount",
        value=value,
        min_amount=min_amount,
        currency=currency,
    )
    config = {k: v for k, v in dict(connection.config or {}).items() if k not in EARNING_KEYS}
    config.update(rule.as_config())
    connection.config = config
    session.flush()
    _log().info(
        "earning.configured",
        connection_id=connection.id,
        store_id=connection.store_id,
        card_id=card_id,
        kind=kind,
        value=value,
        min_amount=min_amount,
    )
    return connection


def render_earning(connection: Connection) -> dict[str, Any] | None:
    """The connection's earning config as JSON (None when it has no rule)."""
    rule = rule_from_config(connection.config)
    return rule.as_config() if rule is not None else None


# --- applying orders ----------------------------------------------------------------------------


@dataclass(slots=True)
class EarningCounts:
    """What `apply_orders` did. `missed` counts orders first seen by a reconciliation."""

    orders: int = 0
    refunds: int = 0
    new: int = 0
    missed: int = 0
    earned_orders: int = 0
    stamps_earned: int = 0
    stamps_reversed: int = 0
    shortfall: int = 0
    not_paid: int = 0
    below_minimum: int = 0
    currency_mismatch: int = 0
    excluded: int = 0
    no_customer: int = 0
    customers_created: int = 0
    enrolled: int = 0

    def add(self, other: EarningCounts) -> None:
        for name, value in other.as_dict().items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _entry_key(source: str, kind: str, external_id: str) -> str:
    return f"{source}:{kind}:{external_id}"


_MIN_TIME: Final = dt.datetime.min.replace(tzinfo=dt.UTC)
MAX_BATCH_ATTEMPTS: Final = 3


@dataclass(slots=True, eq=False)
class _Card:
    """A card the batch may change: `balance` is its running balance within the batch.
    `id` is None for a card the batch enrols (it gets one when the batch is written);
    `loaded` is the balance read (None for a new card)."""

    id: int | None
    customer_id: int
    balance: int
    loaded: int | None = None


@dataclass(slots=True, eq=False)
class _Order:
    """An `order_earnings` row as the batch works on it (`id` None: created by the batch);
    `loaded` is what was read of `ORDER_UPDATES` (None for a new row)."""

    source: str
    id: int | None
    kind: str
    external_id: str
    customer_external_id: str | None
    customer_card_id: int | None
    currency: str | None
    amount: int | None
    paid: bool
    cancelled: bool
    outcome: str | None
    earned: int
    reversed: int
    shortfall: int
    refunds: dict[str, Any]
    via: str
    source_updated_at: dt.datetime | None
    first_seen_at: dt.datetime
    card: _Card | None = None
    loaded: tuple[Any, ...] | None = None

    @classmethod
    def read(cls, source: str, values: Mapping[str, Any]) -> _Order:
        row = cls(source=source, **{name: values[name] for name in earning_sql.ORDER_COLUMNS})
        row.refunds = dict(row.refunds or {})
        if row.id is not None:
            row.loaded = row.snapshot()
        return row

    def snapshot(self) -> tuple[Any, ...]:
        return tuple(
            json.dumps(self.refunds, sort_keys=True) if name == "refunds" else getattr(self, name)
            for name in earning_sql.ORDER_UPDATES
        )

    @property
    def changed(self) -> bool:
        return self.loaded is None or self.snapshot() != self.loaded

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in earning_sql.ORDER_COLUMNS}


@dataclass(slots=True, eq=False)
class _Entry:
    """A ledger entry the batch writes (`key` None: the welcome bonus of a new card, named
    after the card's id once it has one). `balance_after` is the card's running balance."""

    card: _Card
    delta: int
    balance_after: int
    reason: str
    key: str | None
    details: dict[str, Any]
    notify: bool


class _Batch:
    """One batch of orders and refunds of a connection, planned in memory and written in sets.

    `load` reads what the batch can touch in a few statements (its order rows and cards
    locked); `order`/`refund` apply the records one by one in memory, exactly as the rules
    say; `write` then inserts and updates everything in one statement per table. The rare
    buyer unknown to the batch's reads (no reference and no embedded record: a Square payment's
    `customer_id`) is created and loaded on its own.
    """

    def __init__(
        self,
        session: Session,
        *,
        connection: Connection,
        rule: EarningRule,
        card: CardTemplate,
        policy: IngestPolicy,
        via: Via,
        now: dt.datetime,
        counts: EarningCounts,
    ) -> None:
        self.session = session
        self.connection = connection
        self.store_id = connection.store_id
        self.source = connection.source
        self.rule = rule
        self.card = card
        self.policy = policy
        self.via = via
        self.now = now
        self.counts = counts
        self.orders: dict[str, _Order] = {}
        self.references: dict[str, int] = {}
        self.customers: dict[int, tuple[int | None, str]] = {}
        self.cards_by_id: dict[int, _Card] = {}
        self.cards_by_customer: dict[int, _Card] = {}
        self.new_cards: list[_Card] = []
        self.keys: dict[str, int] = {}  # ledger key → delta, of entries already written
        self.entries: list[_Entry] = []

    # -- reading --

    def load(self, items: Sequence[ForeignOrder | ForeignRefund]) -> None:
        order_ids = {
            item.external_id if isinstance(item, ForeignOrder) else item.order_external_id
            for item in items
        }
        for values in earning_sql.lock_orders(
            self.session, self.store_id, self.source, sorted(order_ids)
        ):
            row = _Order.read(self.source, dict(values._mapping))
            self.orders[row.external_id] = row
        buyers = {
            item.customer_external_id
            for item in items
            if isinstance(item, ForeignOrder) and item.customer_external_id is not None
        }
        self.references = earning_sql.reference_ids(
            self.session, self.store_id, self.source, sorted(buyers)
        )
        self._load_people(
            self.references.values(),
            [r.customer_card_id for r in self.orders.values() if r.customer_card_id is not None],
        )
        keys: set[str] = set()
        for item in items:
            if isinstance(item, ForeignOrder):
                base = _entry_key(item.source, item.kind, item.external_id)
                keys.update((base, base + ":cancel"))
                keys.update(_entry_key(item.source, "refund", r.external_id) for r in item.refunds)
            else:
                keys.add(_entry_key(item.source, "refund", item.external_id))
        for row in self.orders.values():
            base = _entry_key(row.source, row.kind, row.external_id)
            keys.update((base, base + ":cancel"))
            keys.update(_entry_key(row.source, "refund", rid) for rid in row.refunds)
        self.keys = earning_sql.ledger_deltas(self.session, self.store_id, keys)

    def _load_people(self, customer_ids: Iterable[int], card_ids: Iterable[int]) -> None:
        """Load customers (following merges to the survivors) and lock the survivors' cards of
        the rule's template, and the cards `card_ids`."""
        wanted = {i for i in customer_ids if i not in self.customers}
        hops = 0
        while wanted and hops <= MAX_MERGE_HOPS:
            found = earning_sql.customer_states(self.session, self.store_id, sorted(wanted))
            self.customers.update(found)
            wanted = {
                merged
                for merged, _state in found.values()
                if merged is not None and merged not in self.customers
            }
            hops += 1
        survivors = {s for i in set(customer_ids) if (s := self._survivor(i)) is not None} - set(
            self.cards_by_customer
        )
        ids = {i for i in card_ids if i not in self.cards_by_id}
        for card_id, customer_id, template_id, stamps in earning_sql.lock_cards(
            self.session,
            self.store_id,
            template_id=self.card.id,
            customer_ids=sorted(survivors),
            card_ids=sorted(ids),
        ):
            if card_id in self.cards_by_id:
                continue
            held = _Card(int(card_id), int(customer_id), int(stamps), loaded=int(stamps))
            self.cards_by_id[held.id] = held  # type: ignore[index]
            if template_id == self.card.id:
                self.cards_by_customer[held.customer_id] = held

    def _survivor(self, customer_id: int) -> int | None:
        current: int | None = customer_id
        for _ in range(MAX_MERGE_HOPS + 1):
            if current is None or current not in self.customers:
                return None
            merged_into, _state = self.customers[current]
            if merged_into is None:
                return current
            current = merged_into
        return None

    def _customer(self, order: ForeignOrder) -> tuple[int | None, str | None]:
        """The live customer an order earns for (merges followed), or None and why not."""
        external_id = order.customer_external_id
        if external_id is None:
            return None, "no_customer"
        if external_id not in self.references:
            # Not in the batch's reads (its embedded record, if any, was applied with the
            # batch and still made no reference): create it from what the order says.
            record = order.customer or ForeignCustomer(source=order.source, external_id=external_id)
            page = apply_customer_page(
                self.session,
                store_id=self.store_id,
                records=[record],
                policy=self.policy,
                now=self.now,
            )
            self.counts.customers_created += page.created
            found = earning_sql.reference_ids(
                self.session, self.store_id, self.source, [external_id]
            )
            if external_id not in found:
                return None, "no_customer"
            self.references.update(found)
            self._load_people(found.values(), ())
        survivor = self._survivor(self.references[external_id])
        if survivor is None:
            return None, "no_customer"
        _merged_into, state = self.customers[survivor]
        if state == "merged":
            return None, "no_customer"
        if state in NO_EARNING_STATES:
            return None, "excluded"
        return survivor, None

    def _card_of(self, customer_id: int) -> _Card:
        """The customer's card of the rule's template; enrolled when they hold none: quietly
        (no welcome bonus) for a reconciliation, with the template's welcome bonus otherwise."""
        held = self.cards_by_customer.get(customer_id)
        if held is not None:
            return held
        held = _Card(None, customer_id, 0)
        self.cards_by_customer[customer_id] = held
        self.new_cards.append(held)
        self.counts.enrolled += 1
        if self.via == "webhook" and self.card.initial_stamps > 0:
            held.balance = self.card.initial_stamps
            self._record(held, self.card.initial_stamps, "welcome_bonus", None, {}, notify=False)
        return held

    def _record(
        self,
        held: _Card,
        delta: int,
        reason: str,
        key: str | None,
        details: dict[str, Any],
        *,
        notify: bool | None = None,
    ) -> None:
        """A ledger entry of `delta` already applied to `held.balance` (pass update and push
        queued with it for a live webhook, never for a reconciliation)."""
        if key is not None:
            self.keys[key] = delta
        self.entries.append(
            _Entry(
                card=held,
                delta=delta,
                balance_after=held.balance,
                reason=reason,
                key=key,
                details=details,
                notify=self.via == "webhook" if notify is None else notify,
            )
        )

    def _row(self, kind: str, external_id: str) -> _Order:
        row = self.orders.get(external_id)
        if row is not None:
            return row
        row = _Order.read(
            self.source,
            {
                "id": None,
                "kind": kind,
                "external_id": external_id,
                "customer_external_id": None,
                "customer_card_id": None,
                "currency": None,
                "amount": None,
                "paid": False,
                "cancelled": False,
                "outcome": None,
                "earned": 0,
                "reversed": 0,
                "shortfall": 0,
                "refunds": {},
                "via": self.via,
                "source_updated_at": None,
                "first_seen_at": self.now,
            },
        )
        self.orders[external_id] = row
        self.counts.new += 1
        if self.via == "reconcile":
            self.counts.missed += 1
        return row

    def details(self, row: _Order, **extra: Any) -> dict[str, Any]:
        return {
            "source": row.source,
            "order_id": row.external_id,
            "kind": row.kind,
            "amount": row.amount,
            "currency": row.currency,
            "via": self.via,
            "connection_id": self.connection.id,
            **extra,
        }

    # -- one order / refund --

    def order(self, order: ForeignOrder) -> None:
        self.counts.orders += 1
        row = self._row(order.kind, order.external_id)
        newer = row.source_updated_at is None or (
            order.source_updated_at is not None and order.source_updated_at >= row.source_updated_at
        )
        if row.outcome is None and newer:
            # Facts are taken until the order is decided; afterwards only flags can advance.
            row.amount = order.amount
            row.currency = order.currency
            row.customer_external_id = order.customer_external_id
        if order.source_updated_at is not None and newer:
            row.source_updated_at = order.source_updated_at
        row.paid = row.paid or order.paid
        row.cancelled = row.cancelled or order.cancelled
        for refund in order.refunds:
            self._note_refund(row, refund)
        self._settle(row, order)

    def refund(self, refund: ForeignRefund) -> None:
        self.counts.refunds += 1
        row = self._row(
            "payment" if refund.source == "square" else "order", refund.order_external_id
        )
        self._note_refund(row, refund)
        self._settle(row, None)

    def _note_refund(self, row: _Order, refund: ForeignRefund) -> None:
        seen = row.refunds.get(refund.external_id)
        if seen is not None and seen.get("applied"):
            return  # applied reversals are final; a later status change does not undo them
        row.refunds[refund.external_id] = {
            "amount": refund.amount if refund.counts else 0,
            "applied": False,
            "at": (refund.created_at or self.now).isoformat(),
        }

    # -- deciding and settling --

    def _decide(self, row: _Order, order: ForeignOrder | None) -> None:
        """Decide what a paid order earns (once)."""
        if row.outcome is not None or order is None:
            return
        if row.cancelled and row.earned == 0:
            row.outcome = "cancelled"
            return
        if not row.paid or row.amount is None:
            self.counts.not_paid += 1
            return
        rule = self.rule
        if rule.currency is not None and row.currency != rule.currency:
            row.outcome = "currency_mismatch"
            self.counts.currency_mismatch += 1
            _log().warning(
                "earning.currency_mismatch",
                connection_id=self.connection.id,
                order_id=row.external_id,
                currency=row.currency,
                expected=rule.currency,
            )
            return
        stamps = rule.entitlement(row.amount)
        if stamps == 0:
            row.outcome = "below_minimum"
            self.counts.below_minimum += 1
            return
        customer_id, why = self._customer(order)
        if customer_id is None:
            if why == "excluded":
                row.outcome = "excluded"
                self.counts.excluded += 1
            else:
                # Not decided: the buyer is not known yet (Square fills `customer_id` late, a
                # payment event carries no customer record). A later event or a reconciliation
                # (which fetches unknown customers) settles the order then.
                self.counts.no_customer += 1
            return
        held = self._card_of(customer_id)
        row.card = held
        row.customer_card_id = held.id
        row.outcome = "earned"
        key = _entry_key(row.source, row.kind, row.external_id)
        if key in self.keys:  # the ledger has it from a row that was lost (restore): trust it
            row.earned = self.keys[key]
            return
        held.balance += stamps
        self._record(held, stamps, "order", key, self.details(row, customer_id=customer_id))
        row.earned = stamps
        self.counts.earned_orders += 1
        self.counts.stamps_earned += stamps

    def _debit(self, row: _Order, stamps: int, key: str, **extra: Any) -> tuple[int, int]:
        """Take up to `stamps` from the order's card (floor at 0) → (taken, shortfall); the
        entry records the shortfall in its details."""
        held = row.card
        if held is None and row.customer_card_id is not None:
            held = self.cards_by_id.get(row.customer_card_id)
        if held is None:
            return 0, stamps
        if key in self.keys:
            return 0, 0  # applied before (the order row says otherwise only after a restore)
        taken = min(stamps, held.balance)
        shortfall = stamps - taken
        if taken == 0:
            return 0, shortfall
        held.balance -= taken
        details = {**self.details(row, **extra), "requested": stamps, "shortfall": shortfall}
        self._record(held, -taken, "reversal", key, details)
        return taken, shortfall

    def _reverse_to(self, row: _Order, target: int, key: str, **extra: Any) -> None:
        target = max(0, min(target, row.earned))
        if target <= row.reversed:
            return
        taken, shortfall = self._debit(row, target - row.reversed, key, **extra)
        row.reversed = target
        row.shortfall += shortfall
        self.counts.stamps_reversed += taken
        self.counts.shortfall += shortfall
        if shortfall:
            _log().info(
                "earning.reversal.shortfall",
                order_id=row.external_id,
                customer_card_id=row.customer_card_id,
                shortfall=shortfall,
            )

    def _settle(self, row: _Order, order: ForeignOrder | None) -> None:
        self._decide(row, order)
        if row.outcome is None:
            return  # not decided yet: refunds wait for the order
        refunds = row.refunds
        pending = sorted(
            (rid for rid, r in refunds.items() if not r.get("applied")),
            key=lambda rid: (str(refunds[rid].get("at")), rid),
        )
        refunded = sum(int(r.get("amount") or 0) for r in refunds.values() if r.get("applied"))
        for rid in pending:
            refunded += int(refunds[rid].get("amount") or 0)
            refunds[rid] = {**refunds[rid], "applied": True}
            if row.earned:
                net = (row.amount or 0) - refunded
                self._reverse_to(
                    row,
                    row.earned - self.rule.entitlement(net),
                    _entry_key(row.source, "refund", rid),
                    refund_id=rid,
                    refunded=refunded,
                )
        if row.cancelled and row.earned:
            self._reverse_to(
                row,
                row.earned,
                _entry_key(row.source, row.kind, row.external_id) + ":cancel",
                cancelled=True,
            )

    # -- writing --

    def write(self) -> None:
        """Everything the batch decided, in one statement per table."""
        session, now = self.session, utcnow()
        for held, card_id in zip(
            self.new_cards,
            earning_sql.next_ids(session, earning_sql.CARDS, len(self.new_cards)),
            strict=True,
        ):
            held.id = card_id
        earning_sql.insert_rows(
            session,
            earning_sql.CARDS,
            [
                {
                    "id": held.id,
                    "store_id": self.store_id,
                    "customer_id": held.customer_id,
                    "card_id": self.card.id,
                    "stamps": held.balance,
                    "code": cards.generate_code(),
                    "pass_token": secrets.token_urlsafe(24),
                    "wallet_pass_installed": False,
                    "created_at": now,
                    "updated_at": now,
                }
                for held in self.new_cards
            ],
        )
        earning_sql.set_balances(
            session,
            [
                (card_id, held.balance)
                for card_id, held in self.cards_by_id.items()
                if held.balance != held.loaded
            ],
            now,
        )
        entry_ids = earning_sql.next_ids(session, earning_sql.LEDGER, len(self.entries))
        ledger_rows: list[dict[str, Any]] = []
        outbox_rows: list[dict[str, Any]] = []
        for entry, entry_id in zip(self.entries, entry_ids, strict=True):
            held_id = entry.card.id
            ledger_rows.append(
                {
                    "id": entry_id,
                    "store_id": self.store_id,
                    "customer_card_id": held_id,
                    "delta": entry.delta,
                    "balance_after": entry.balance_after,
                    "reason": entry.reason,
                    "reward_id": None,
                    "idempotency_key": entry.key or f"welcome_bonus:{held_id}",
                    "details": entry.details,
                    "created_at": now,
                }
            )
            if entry.notify:  # the pass update and push of the change (cards._notify)
                payload = {
                    "customer_card_id": held_id,
                    "ledger_entry_id": entry_id,
                    "stamps": entry.balance_after,
                }
                outbox_rows.extend(
                    {
                        "store_id": self.store_id,
                        "kind": kind,
                        "payload": payload,
                        "idempotency_key": f"{kind}:ledger:{entry_id}",
                        "status": "pending",
                        "attempts": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                    }
                    for kind in ("pass_update", "push")
                )
        earning_sql.insert_rows(
            session,
            earning_sql.LEDGER,
            ledger_rows,
            json_columns=("details",),
        )
        earning_sql.insert_rows(
            session,
            earning_sql.OUTBOX,
            outbox_rows,
            json_columns=("payload",),
        )
        new_rows: list[dict[str, Any]] = []
        changed: list[dict[str, Any]] = []
        for row in self.orders.values():
            if row.card is not None:
                row.customer_card_id = row.card.id
            if not row.changed:
                continue
            values = row.as_dict()
            if row.id is None:
                del values["id"]
                new_rows.append(
                    {
                        **values,
                        "store_id": self.store_id,
                        "connection_id": self.connection.id,
                        "source": row.source,
                        "updated_at": now,
                    }
                )
            else:
                changed.append(values)
        earning_sql.insert_rows(
            session,
            earning_sql.ORDERS,
            new_rows,
            json_columns=("refunds",),
        )
        earning_sql.update_orders(session, changed, now)


def _load_card(session: Session, connection: Connection, rule: EarningRule) -> CardTemplate:
    card = session.scalar(
        select(CardTemplate).where(
            CardTemplate.id == rule.card_id, CardTemplate.store_id == connection.store_id
        )
    )
    if card is None:
        raise ValidationFailed.single("card_id", "does not match a card of the connection's store")
    return card


def _order_sort_key(item: ForeignOrder | ForeignRefund) -> tuple[str, int, str]:
    if isinstance(item, ForeignOrder):
        return (item.external_id, 0, (item.source_updated_at or _MIN_TIME).isoformat())
    return (item.order_external_id, 1, (item.created_at or _MIN_TIME).isoformat())


def _apply_customers(
    session: Session,
    *,
    store_id: int,
    items: Sequence[ForeignOrder | ForeignRefund],
    policy: IngestPolicy,
    now: dt.datetime,
) -> int:
    """Apply every order's embedded customer once for the whole batch, in ONE bulk upsert
    (the newest record per customer; identity rules, conflicts and the stale guard as for any
    page) → customers created."""
    newest: dict[str, ForeignCustomer] = {}
    for item in items:
        record = item.customer if isinstance(item, ForeignOrder) else None
        if record is None:
            continue
        seen = newest.get(record.external_id)
        if seen is None or (record.source_updated_at or _MIN_TIME) >= (
            seen.source_updated_at or _MIN_TIME
        ):
            newest[record.external_id] = record
    if not newest:
        return 0
    page = apply_customer_page(
        session, store_id=store_id, records=list(newest.values()), policy=policy, now=now
    )
    return page.created


def _forget_written(session: Session) -> None:
    """The batch wrote cards and order rows with Core statements: drop the ORM's copies."""
    for obj in list(session.identity_map.values()):
        if isinstance(obj, (CustomerCard, OrderEarning, Customer)):
            session.expire(obj)


def apply_orders(
    session: Session,
    *,
    connection: Connection,
    orders: Iterable[ForeignOrder | ForeignRefund],
    via: Via,
    now: dt.datetime | None = None,
    policy: IngestPolicy | None = None,
) -> EarningCounts:
    """Apply orders/payments and refunds of `connection`'s source to its earning rule.

    Idempotent: applying the same records again (a replayed webhook, a reconciliation) changes
    nothing. Records are applied per order id (orders before their refunds, oldest update
    first). A connection without a rule applies nothing (all zero counts). Writes in the
    caller's transaction, under the store's identity lock on PostgreSQL, in sets: a batch costs
    a fixed number of statements, not some per order (see `_Batch`).
    """
    if via not in VIAS:
        raise ValueError(f"via must be one of {VIAS}")
    rule = rule_from_config(connection.config)
    items: Sequence[ForeignOrder | ForeignRefund] = sorted(orders, key=_order_sort_key)
    if rule is None or not items:
        return EarningCounts()
    for item in items:
        if item.source != connection.source:
            raise ValueError(f"a {item.source} record given to a {connection.source} connection")
    now = now or utcnow()
    if policy is None:
        from models.sync_state import policy_from_config

        policy = policy_from_config(connection.config, source=connection.source)
    lock_store(session, connection.store_id)
    card = _load_card(session, connection, rule)
    created = _apply_customers(
        session, store_id=connection.store_id, items=items, policy=policy, now=now
    )
    session.flush()
    for attempt in range(1, MAX_BATCH_ATTEMPTS + 1):
        counts = EarningCounts(customers_created=created)
        try:
            # A unique violation (the API enrolled a buyer since the batch read its cards, a
            # card code collision) undoes the batch to here, and it is planned again.
            with session.begin_nested():
                batch = _Batch(
                    session,
                    connection=connection,
                    rule=rule,
                    card=card,
                    policy=policy,
                    via=via,
                    now=now,
                    counts=counts,
                )
                prefer_index_probes(session)
                batch.load(items)
                for item in items:
                    if isinstance(item, ForeignOrder):
                        batch.order(item)
                    else:
                        batch.refund(item)
                prefer_cached_plans(session)
                batch.write()
            break
        except IntegrityError:
            if attempt == MAX_BATCH_ATTEMPTS:
                raise
            _log().info("earning.batch.replanned", connection_id=connection.id, attempt=attempt)
    _forget_written(session)
    _log().info("earning.applied", connection_id=connection.id, via=via, **counts.as_dict())
    return counts


# --- balance verification -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drift:
    """A card whose balance differed from its ledger sum (`fixed`: a `reconcile` entry was
    written that makes the ledger sum equal the balance the customer sees)."""

    customer_card_id: int
    balance: int
    ledger_sum: int
    fixed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_balances(
    session: Session, *, store_id: int, fix: bool, now: dt.datetime | None = None
) -> list[Drift]:
    """Compare every card's balance with its ledger sum; with `fix`, write a `reconcile` entry
    (delta = balance - ledger sum, keyed `reconcile:drift:<card>:<last entry id>`) per drift.

    The balance is what the customer was shown and what redemptions were checked against, so
    the ledger is brought to it (never the other way round). One grouped query for the store.
    """
    sums = (
        select(
            StampLedgerEntry.customer_card_id.label("cc_id"),
            func.coalesce(func.sum(StampLedgerEntry.delta), 0).label("total"),
            func.max(StampLedgerEntry.id).label("last_id"),
        )
        .where(StampLedgerEntry.store_id == store_id)
        .group_by(StampLedgerEntry.customer_card_id)
        .subquery()
    )
    rows = session.execute(
        select(CustomerCard.id, CustomerCard.stamps, sums.c.total, sums.c.last_id)
        .outerjoin(sums, sums.c.cc_id == CustomerCard.id)
        .where(CustomerCard.store_id == store_id)
        .order_by(CustomerCard.id)
    ).all()
    drifts: list[Drift] = []
    for cc_id, balance, total, last_id in rows:
        ledger = int(total or 0)
        if ledger == int(balance):
            continue
        if fix:
            session.add(
                StampLedgerEntry(
                    store_id=store_id,
                    customer_card_id=cc_id,
                    delta=int(balance) - ledger,
                    balance_after=int(balance),
                    reason="reconcile",
                    idempotency_key=f"reconcile:drift:{cc_id}:{last_id or 0}",
                    details={"ledger_sum": ledger, "balance": int(balance)},
                    created_at=now or utcnow(),
                )
            )
            session.flush()
        _log().warning(
            "earning.drift",
            store_id=store_id,
            customer_card_id=cc_id,
            balance=int(balance),
            ledger_sum=ledger,
            fixed=fix,
        )
        drifts.append(
            Drift(customer_card_id=cc_id, balance=int(balance), ledger_sum=ledger, fixed=fix)
        )
    return drifts


# --- webhook miss rate (for `sync status`) ----------------------------------------------------

ORDERS_STREAM: Final = "orders"


def webhook_miss_rates(session: Session, connection_ids: Sequence[int]) -> dict[int, float | None]:
    """Per connection: the share of orders its latest reconciliation found only by polling
    (`SyncRun` of stream `orders`: `created` / `seen`); None before any reconciliation that saw
    an order. Connections never reconciled are absent."""
    ids = sorted({i for i in connection_ids if is_valid_id(i)})
    if not ids:
        return {}
    latest = (
        select(SyncRun.connection_id, func.max(SyncRun.id).label("run_id"))
        .where(
            SyncRun.stream == ORDERS_STREAM,
            SyncRun.connection_id.in_(ids),
            SyncRun.status == "succeeded",
        )
        .group_by(SyncRun.connection_id)
        .subquery()
    )
    rows = session.execute(
        select(SyncRun.connection_id, SyncRun.seen, SyncRun.created).join(
            latest, latest.c.run_id == SyncRun.id
        )
    ).all()
    return {cid: (round(created / seen, 4) if seen else None) for cid, seen, created in rows}


__all__ = [
    "ORDERS_STREAM",
    "Drift",
    "EarningCounts",
    "EarningRule",
    "apply_orders",
    "configure_earning",
    "parse_earn",
    "render_earning",
    "rule_from_config",
    "verify_balances",
    "webhook_miss_rates",
]
