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
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import flag_modified

from connectors.records import ForeignCustomer, ForeignOrder, ForeignRefund
from models import cards
from models.errors import ErrorBag, NotFound, ValidationFailed
from models.ingest import IngestPolicy, apply_customer_page, lock_store
from models.tables import (
    CardTemplate,
    Connection,
    Customer,
    CustomerCard,
    ExternalReference,
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


def _locked_row(
    session: Session, store_id: int, source: str, external_id: str
) -> OrderEarning | None:
    return session.scalar(
        select(OrderEarning)
        .where(
            OrderEarning.store_id == store_id,
            OrderEarning.source == source,
            OrderEarning.external_id == external_id,
        )
        .with_for_update()
        .execution_options(populate_existing=True)
    )


def _row_for(
    session: Session,
    *,
    connection: Connection,
    source: str,
    kind: str,
    external_id: str,
    via: Via,
    now: dt.datetime,
    counts: EarningCounts,
) -> OrderEarning:
    """The order's row, locked; created (under a savepoint) on first sight."""
    row = _locked_row(session, connection.store_id, source, external_id)
    if row is not None:
        return row
    fresh = OrderEarning(
        store_id=connection.store_id,
        connection_id=connection.id,
        source=source,
        kind=kind,
        external_id=external_id,
        paid=False,
        cancelled=False,
        earned=0,
        reversed=0,
        shortfall=0,
        refunds={},
        via=via,
        first_seen_at=now,
        updated_at=now,
    )
    try:
        with session.begin_nested():
            session.add(fresh)
            session.flush()
    except IntegrityError:
        # Another transaction created it first (and has committed): work on theirs.
        row = _locked_row(session, connection.store_id, source, external_id)
        if row is None:  # pragma: no cover - the unique key said it exists
            raise
        return row
    counts.new += 1
    if via == "reconcile":
        counts.missed += 1
    return fresh


def _customer_of(
    session: Session,
    *,
    store_id: int,
    order: ForeignOrder,
    policy: IngestPolicy,
    now: dt.datetime,
    counts: EarningCounts,
    preapplied: frozenset[str] = frozenset(),
) -> tuple[Customer | None, str | None]:
    """The live customer an order earns for (merges followed), or None and why not.

    `preapplied`: external ids whose embedded customer records the caller already applied for
    the whole batch (`apply_orders` does, in one bulk upsert): no per-order upsert for them."""
    external_id = order.customer_external_id
    if external_id is None:
        return None, "no_customer"

    def reference() -> ExternalReference | None:
        return session.scalar(
            select(ExternalReference).where(
                ExternalReference.store_id == store_id,
                ExternalReference.source == order.source,
                ExternalReference.external_id == external_id,
            )
        )

    ref = reference()
    if external_id in preapplied and ref is not None:
        pass  # the newest embedded record of this customer was applied with the batch
    elif ref is None or order.customer is not None:
        record = order.customer or ForeignCustomer(source=order.source, external_id=external_id)
        page = apply_customer_page(
            session, store_id=store_id, records=[record], policy=policy, now=now
        )
        counts.customers_created += page.created
        session.flush()
        session.expire_all()
        ref = reference()
    if ref is None:
        return None, "no_customer"
    customer = session.get(Customer, ref.customer_id)
    hops = 0
    while customer is not None and customer.merged_into_id is not None and hops < MAX_MERGE_HOPS:
        customer = session.get(Customer, customer.merged_into_id)
        hops += 1
    if customer is None or customer.state == "merged":
        return None, "no_customer"
    if customer.state in NO_EARNING_STATES:
        return None, "excluded"
    return customer, None


def _enrol_quietly(
    session: Session, customer: Customer, card: CardTemplate
) -> tuple[CustomerCard, bool]:
    """A card of `card` for `customer` without welcome bonus or notification."""
    existing = session.scalar(
        select(CustomerCard).where(
            CustomerCard.customer_id == customer.id, CustomerCard.card_id == card.id
        )
    )
    if existing is not None:
        return existing, False
    for _ in range(5):
        cc = CustomerCard(
            store_id=customer.store_id,
            customer_id=customer.id,
            card_id=card.id,
            stamps=0,
            code=cards.generate_code(),
            pass_token=secrets.token_urlsafe(24),
            wallet_pass_installed=False,
        )
        try:
            with session.begin_nested():
                session.add(cc)
                session.flush()
            return cc, True
        except IntegrityError:
            existing = session.scalar(
                select(CustomerCard).where(
                    CustomerCard.customer_id == customer.id, CustomerCard.card_id == card.id
                )
            )
            if existing is not None:
                return existing, False
    raise RuntimeError("could not allocate a unique card code")  # pragma: no cover


def _debit(
    session: Session,
    *,
    card_id: int | None,
    stamps: int,
    key: str,
    details: dict[str, Any],
    notify: bool,
) -> tuple[int, int]:
    """Take up to `stamps` from the card (floor at 0) → (taken, shortfall).

    The card row is locked first, so the balance read and the decrement are one decision; the
    ledger entry (if anything was taken) records the shortfall in its details.
    """
    cc = (
        session.scalar(
            select(CustomerCard)
            .where(CustomerCard.id == card_id)
            .with_for_update(of=CustomerCard)
            .execution_options(populate_existing=True)
        )
        if card_id is not None
        else None
    )
    if cc is None:
        return 0, stamps
    if session.scalar(
        select(StampLedgerEntry.id).where(
            StampLedgerEntry.store_id == cc.store_id, StampLedgerEntry.idempotency_key == key
        )
    ):
        return 0, 0  # applied before (the order row says otherwise only after a restore)
    taken = min(stamps, cc.stamps)
    shortfall = stamps - taken
    if taken == 0:
        return 0, shortfall
    now = utcnow()
    new_balance = session.scalar(
        update(CustomerCard)
        .where(CustomerCard.id == cc.id)
        .values(stamps=CustomerCard.stamps - taken, updated_at=now)
        .returning(CustomerCard.stamps)
        .execution_options(synchronize_session=False)
    )
    assert new_balance is not None
    entry = StampLedgerEntry(
        store_id=cc.store_id,
        customer_card_id=cc.id,
        delta=-taken,
        balance_after=new_balance,
        reason="reversal",
        idempotency_key=key,
        details={**details, "requested": stamps, "shortfall": shortfall},
    )
    session.add(entry)
    session.flush()
    session.refresh(cc)
    if notify:
        cards._notify(session, cc, entry)
    return taken, shortfall


class _Applier:
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
    ) -> None:
        self.session = session
        self.connection = connection
        self.rule = rule
        self.card = card
        self.policy = policy
        self.via = via
        self.now = now
        self.counts = EarningCounts()
        self.preapplied: frozenset[str] = frozenset()

    def apply_customers(self, items: Sequence[ForeignOrder | ForeignRefund]) -> None:
        """Apply every order's embedded customer once for the whole batch, in ONE bulk upsert
        (the newest record per customer; identity rules, conflicts and the stale guard as for
        any page), instead of one upsert per order."""
        newest: dict[str, ForeignCustomer] = {}
        for item in items:
            record = item.customer if isinstance(item, ForeignOrder) else None
            if record is None:
                continue
            seen = newest.get(record.external_id)
            if seen is None or (
                record.source_updated_at or dt.datetime.min.replace(tzinfo=dt.UTC)
            ) >= (seen.source_updated_at or dt.datetime.min.replace(tzinfo=dt.UTC)):
                newest[record.external_id] = record
        if not newest:
            return
        page = apply_customer_page(
            self.session,
            store_id=self.connection.store_id,
            records=list(newest.values()),
            policy=self.policy,
            now=self.now,
        )
        self.counts.customers_created += page.created
        self.session.flush()
        self.session.expire_all()
        self.preapplied = frozenset(newest)

    def details(self, row: OrderEarning, **extra: Any) -> dict[str, Any]:
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
        row = _row_for(
            self.session,
            connection=self.connection,
            source=order.source,
            kind=order.kind,
            external_id=order.external_id,
            via=self.via,
            now=self.now,
            counts=self.counts,
        )
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
        kind = "payment" if refund.source == "square" else "order"
        row = _row_for(
            self.session,
            connection=self.connection,
            source=refund.source,
            kind=kind,
            external_id=refund.order_external_id,
            via=self.via,
            now=self.now,
            counts=self.counts,
        )
        self._note_refund(row, refund)
        self._settle(row, None)

    def _note_refund(self, row: OrderEarning, refund: ForeignRefund) -> None:
        refunds = dict(row.refunds or {})
        seen = refunds.get(refund.external_id)
        if seen is not None and seen.get("applied"):
            return  # applied reversals are final; a later status change does not undo them
        refunds[refund.external_id] = {
            "amount": refund.amount if refund.counts else 0,
            "applied": False,
            "at": (refund.created_at or self.now).isoformat(),
        }
        row.refunds = refunds
        flag_modified(row, "refunds")

    # -- deciding and settling --

    def _decide(self, row: OrderEarning, order: ForeignOrder | None) -> None:
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
        customer, why = _customer_of(
            self.session,
            store_id=row.store_id,
            order=order,
            policy=self.policy,
            now=self.now,
            counts=self.counts,
            preapplied=self.preapplied,
        )
        if customer is None:
            if why == "excluded":
                row.outcome = "excluded"
                self.counts.excluded += 1
            else:
                # Not decided: the buyer is not known yet (Square fills `customer_id` late, a
                # payment event carries no customer record). A later event or a reconciliation
                # (which fetches unknown customers) settles the order then.
                self.counts.no_customer += 1
            return
        quiet = self.via == "reconcile"
        if quiet:
            cc, enrolled = _enrol_quietly(self.session, customer, self.card)
        else:
            cc, enrolled = cards.enrol(self.session, customer=customer, card=self.card)
        self.counts.enrolled += int(enrolled)
        result = cards.add_stamps(
            self.session,
            customer_card=cc,
            stamps=stamps,
            reason="order",
            idempotency_key=_entry_key(row.source, row.kind, row.external_id),
            skip_notifications=quiet,
            details=self.details(row, customer_id=customer.id),
        )
        row.customer_card_id = cc.id
        row.outcome = "earned"
        if result.applied:
            row.earned = stamps
            self.counts.earned_orders += 1
            self.counts.stamps_earned += stamps
        else:  # the ledger has it from a row that was lost (restore): trust the ledger
            row.earned = result.entry.delta

    def _reverse_to(self, row: OrderEarning, target: int, key: str, **extra: Any) -> None:
        target = max(0, min(target, row.earned))
        if target <= row.reversed:
            return
        wanted = target - row.reversed
        taken, shortfall = _debit(
            self.session,
            card_id=row.customer_card_id,
            stamps=wanted,
            key=key,
            details=self.details(row, **extra),
            notify=self.via == "webhook",
        )
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

    def _settle(self, row: OrderEarning, order: ForeignOrder | None) -> None:
        self._decide(row, order)
        if row.outcome is None:
            self.session.flush()
            return  # not decided yet: refunds wait for the order
        refunds = dict(row.refunds or {})
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
                    row.earned - self.rule_entitlement(net),
                    _entry_key(row.source, "refund", rid),
                    refund_id=rid,
                    refunded=refunded,
                )
        if pending:
            row.refunds = refunds
            flag_modified(row, "refunds")
        if row.cancelled and row.earned:
            self._reverse_to(
                row,
                row.earned,
                _entry_key(row.source, row.kind, row.external_id) + ":cancel",
                cancelled=True,
            )
        self.session.flush()

    def rule_entitlement(self, net: int) -> int:
        return self.rule.entitlement(net)


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
        return (
            item.external_id,
            0,
            (item.source_updated_at or dt.datetime.min.replace(tzinfo=dt.UTC)).isoformat(),
        )
    return (
        item.order_external_id,
        1,
        (item.created_at or dt.datetime.min.replace(tzinfo=dt.UTC)).isoformat(),
    )


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
    caller's transaction, under the store's identity lock on PostgreSQL.
    """
    if via not in VIAS:
        raise ValueError(f"via must be one of {VIAS}")
    rule = rule_from_config(connection.config)
    counts = EarningCounts()
    items: Sequence[ForeignOrder | ForeignRefund] = sorted(orders, key=_order_sort_key)
    if rule is None or not items:
        return counts
    now = now or utcnow()
    if policy is None:
        from models.sync_state import policy_from_config

        policy = policy_from_config(connection.config, source=connection.source)
    lock_store(session, connection.store_id)
    card = _load_card(session, connection, rule)
    applier = _Applier(
        session, connection=connection, rule=rule, card=card, policy=policy, via=via, now=now
    )
    for item in items:
        if item.source != connection.source:
            raise ValueError(f"a {item.source} record given to a {connection.source} connection")
    applier.apply_customers(items)
    for item in items:
        if isinstance(item, ForeignOrder):
            applier.order(item)
        else:
            applier.refund(item)
    counts = applier.counts
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
