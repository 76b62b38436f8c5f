"""Imported stamp balances: ledger entries from another loyalty system, never notified.

Two ways to bring a foreign balance over, both through the ledger (a card's `stamps` always
equals the sum of its entries' deltas):

- `import_ledger` copies the foreign system's own ledger (Appy Stamp activities), one entry per
  foreign entry, keyed by the caller (`appystamp:activity:<id>`): a key already present is
  skipped, so re-running an import adds nothing;
- `set_balance` writes ONE adjustment that makes the balance equal a target, keyed
  `<key_prefix>:<n>` with n = 1 + the entries already keyed under that prefix: a re-run finds
  the balance already right and writes nothing; a later change of the source's balance gives
  the next n. A negative target is recorded as 0 with the shortfall in the entry's details.

`import_balances` does both for a whole page of customers in a constant number of statements
(the two functions above are it, for one customer). Every entry has reason `import`. Nothing here
queues a notification (no pass update, no push) or gives a welcome bonus: a customer without a
card of the template is enrolled quietly. The customer card rows are locked (`FOR UPDATE` on
PostgreSQL; SQLite has one writer) and everything is written in one savepoint of the caller's
transaction (the caller commits); a unique-key race (a concurrent enrolment or import) rolls
the savepoint back and the batch is planned again once.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.cards import generate_code
from models.tables import (
    CardTemplate,
    Customer,
    CustomerCard,
    StampLedgerEntry,
    is_valid_id,
    utcnow,
)

log = structlog.get_logger(__name__)

IMPORT_REASON: Final = "import"
KEY_MAX: Final = 255
_CHUNK: Final = 500  # values per `IN (…)` look-up

_cards: Table = CustomerCard.__table__  # type: ignore[assignment]
_ledger: Table = StampLedgerEntry.__table__  # type: ignore[assignment]

Entry = tuple[str, int, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class BalanceImport:
    """What to import for one customer: foreign ledger `entries` (key, signed delta, details),
    then, when `target` is set, one adjustment keyed under `key_prefix` to reach it."""

    customer_id: int
    entries: Sequence[Entry] = ()
    target: int | None = None
    key_prefix: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class BalanceResult:
    """What was written for one customer: ledger entries added, and the adjustment's delta."""

    added: int = 0
    delta: int = 0
    balance: int = 0


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key or len(key) > KEY_MAX:
        raise ValueError(f"an idempotency key must be a string of 1 to {KEY_MAX} characters")


def _validate(imports: Sequence[BalanceImport]) -> None:
    seen: set[int] = set()
    prefixes: set[str] = set()
    for item in imports:
        if not is_valid_id(item.customer_id):
            raise LookupError("customer ids must be valid ids")
        if item.customer_id in seen:
            raise ValueError("one BalanceImport per customer")
        seen.add(item.customer_id)
        for key, delta, _ in item.entries:
            _check_key(key)
            if isinstance(delta, bool) or not isinstance(delta, int):
                raise ValueError("a ledger delta must be an integer")
        if item.target is not None:
            if isinstance(item.target, bool) or not isinstance(item.target, int):
                raise ValueError("target must be an integer")
            if not item.key_prefix:
                raise ValueError("a target needs a key_prefix")
            if item.key_prefix in prefixes:
                raise ValueError("one key_prefix per customer")
            prefixes.add(item.key_prefix)
            _check_key(f"{item.key_prefix}:1")


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _check_owners(session: Session, store_id: int, card_id: int, customer_ids: list[int]) -> None:
    card = session.get(CardTemplate, card_id) if is_valid_id(card_id) else None
    if card is None or card.store_id != store_id:
        raise LookupError(f"card {card_id} is not a card of store {store_id}")
    found: set[int] = set()
    for chunk in _chunks(customer_ids):
        found.update(
            session.scalars(
                select(Customer.id).where(Customer.store_id == store_id, Customer.id.in_(chunk))
            )
        )
    if missing := set(customer_ids) - found:
        raise LookupError(f"{len(missing)} customer(s) are not customers of store {store_id}")


def _locked_cards(
    session: Session, card_id: int, customer_ids: list[int]
) -> dict[int, tuple[int, int]]:
    """customer id → (customer card id, stamps), rows locked."""
    found: dict[int, tuple[int, int]] = {}
    for chunk in _chunks(customer_ids):
        rows = session.execute(
            select(_cards.c.id, _cards.c.customer_id, _cards.c.stamps)
            .where(_cards.c.card_id == card_id, _cards.c.customer_id.in_(chunk))
            .order_by(_cards.c.id)
            .with_for_update()
        ).all()
        found.update({int(r.customer_id): (int(r.id), int(r.stamps)) for r in rows})
    return found


def _enrol(
    session: Session, store_id: int, card_id: int, customer_ids: list[int]
) -> dict[int, tuple[int, int]]:
    """New empty cards (no welcome stamps, no notification) → customer id → (id, 0)."""
    if not customer_ids:
        return {}
    now = utcnow()
    rows = session.execute(
        insert(_cards).returning(_cards.c.id, _cards.c.customer_id),
        [
            {
                "store_id": store_id,
                "customer_id": customer_id,
                "card_id": card_id,
                "stamps": 0,
                "code": generate_code(),
                "pass_token": secrets.token_urlsafe(24),
                "wallet_pass_installed": False,
                "created_at": now,
                "updated_at": now,
            }
            for customer_id in customer_ids
        ],
    ).all()
    return {int(r.customer_id): (int(r.id), 0) for r in rows}


def _present_keys(session: Session, store_id: int, keys: list[str]) -> set[str]:
    found: set[str] = set()
    for chunk in _chunks(keys):
        found.update(
            session.scalars(
                select(_ledger.c.idempotency_key).where(
                    _ledger.c.store_id == store_id, _ledger.c.idempotency_key.in_(chunk)
                )
            )
        )
    return found


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _prefix_counts(
    session: Session, store_id: int, card_ids: list[int], prefixes: set[str], *, store_wide: bool
) -> dict[str, int]:
    """Entries already keyed `<prefix>:<n>`, per prefix: among the cards' import entries (one
    query per chunk), or — after a key collision — over the whole store (one query each)."""
    counts = dict.fromkeys(prefixes, 0)
    if not prefixes:
        return counts
    if store_wide:
        for prefix in prefixes:
            counts[prefix] = int(
                session.scalar(
                    select(func.count())
                    .select_from(_ledger)
                    .where(
                        _ledger.c.store_id == store_id,
                        _ledger.c.idempotency_key.like(f"{_escape_like(prefix)}:%", escape="\\"),
                    )
                )
                or 0
            )
        return counts
    for chunk in _chunks(card_ids):
        for key in session.scalars(
            select(_ledger.c.idempotency_key).where(
                _ledger.c.customer_card_id.in_(chunk), _ledger.c.reason == IMPORT_REASON
            )
        ):
            prefix, _, n = key.rpartition(":")
            if prefix in counts and n.isdigit():
                counts[prefix] += 1
    return counts


def _plan(
    item: BalanceImport, balance: int, present: set[str], used: Mapping[str, int], taken: set[str]
) -> tuple[list[tuple[str, int, dict[str, Any]]], BalanceResult]:
    """The entries to write for one customer (in order) and what they do; `taken` collects the
    keys the batch writes (a key is used once, whoever repeats it)."""
    rows: list[tuple[str, int, dict[str, Any]]] = []
    result = BalanceResult()
    for key, delta, details in item.entries:
        if key in present or key in taken or delta == 0:
            continue
        taken.add(key)
        applied = max(delta, -balance)  # a card never goes below 0
        if applied == 0:
            continue  # nothing to debit: looked at again by the next import
        kept = dict(details) if applied == delta else {**details, "requested_delta": delta}
        balance += applied
        rows.append((key, applied, kept))
        result.added += 1
    if item.target is not None and item.key_prefix:
        details = dict(item.details)
        target = item.target
        if target < 0:
            details.update(shortfall=-target, requested_target=target)
            target = 0
        if target != balance:
            details.update(target=target, previous=balance)
            key = f"{item.key_prefix}:{used.get(item.key_prefix, 0) + 1}"
            _check_key(key)
            rows.append((key, target - balance, details))
            result.delta = target - balance
            balance = target
    result.balance = balance
    return rows, result


def _apply(
    session: Session,
    store_id: int,
    card_id: int,
    imports: Sequence[BalanceImport],
    *,
    store_wide: bool,
) -> dict[int, BalanceResult]:
    ids = [item.customer_id for item in imports]
    cards = _locked_cards(session, card_id, ids)
    cards.update(_enrol(session, store_id, card_id, [i for i in ids if i not in cards]))
    keys = sorted({key for item in imports for key, _, _ in item.entries})
    present = _present_keys(session, store_id, keys)
    prefixes = {item.key_prefix for item in imports if item.target is not None and item.key_prefix}
    used = _prefix_counts(
        session, store_id, [cc_id for cc_id, _ in cards.values()], prefixes, store_wide=store_wide
    )
    now = utcnow()
    ledger_rows: list[dict[str, Any]] = []
    card_rows: list[dict[str, Any]] = []
    results: dict[int, BalanceResult] = {}
    taken: set[str] = set()
    for item in imports:
        cc_id, balance = cards[item.customer_id]
        rows, result = _plan(item, balance, present, used, taken)
        results[item.customer_id] = result
        if not rows:
            continue
        running = balance
        for key, delta, details in rows:
            running += delta
            ledger_rows.append(
                {
                    "store_id": store_id,
                    "customer_card_id": cc_id,
                    "delta": delta,
                    "balance_after": running,
                    "reason": IMPORT_REASON,
                    "reward_id": None,
                    "idempotency_key": key,
                    "details": details,
                    "created_at": now,
                }
            )
        card_rows.append({"_id": cc_id, "stamps": running, "updated_at": now})
    if ledger_rows:
        session.execute(insert(_ledger), ledger_rows)
        session.execute(
            update(_cards)
            .where(_cards.c.id == bindparam("_id"))
            .values(stamps=bindparam("stamps"), updated_at=bindparam("updated_at")),
            card_rows,
        )
        changed = {row["_id"] for row in card_rows}
        for obj in list(session.identity_map.values()):
            if isinstance(obj, CustomerCard) and obj.id in changed:
                session.expire(obj, ["stamps", "updated_at"])
    return results


def import_balances(
    session: Session, *, store_id: int, card_id: int, imports: Sequence[BalanceImport]
) -> dict[int, BalanceResult]:
    """Import ledger entries and/or reach target balances for many customers of one card.

    Per customer, in order: its `entries` not yet in the store's ledger (a zero delta, a
    repeated key, or a debit that finds nothing to take is left out; a debit larger than the
    balance takes the balance, with `requested_delta` in its details), then, with a `target`,
    one adjustment `<key_prefix>:<n>` when the balance differs (a negative target: 0, with the
    `shortfall`). LookupError when the card or a customer is not the store's. Returns the
    result per customer id.
    """
    _validate(imports)
    if not imports:
        return {}
    _check_owners(session, store_id, card_id, [item.customer_id for item in imports])
    for attempt in (1, 2):
        try:
            with session.begin_nested():
                results = _apply(session, store_id, card_id, imports, store_wide=attempt == 2)
        except IntegrityError:
            # A concurrent enrolment/import took a key or card first, or an adjustment key of
            # the prefix lives on another card: plan again from what is committed, store-wide.
            if attempt == 2:
                raise
            log.info("balances.retry", store_id=store_id, card_id=card_id)
            continue
        added = sum(r.added for r in results.values())
        adjusted = sum(1 for r in results.values() if r.delta)
        if added or adjusted:
            log.info(
                "balances.imported",
                store_id=store_id,
                card_id=card_id,
                customers=len(imports),
                entries=added,
                adjustments=adjusted,
            )
        return results
    raise AssertionError("unreachable")  # pragma: no cover


def import_ledger(
    session: Session,
    *,
    store_id: int,
    card_id: int,
    customer_id: int,
    entries: Sequence[tuple[str, int, dict[str, Any]]],
) -> int:
    """Copy foreign ledger entries `(idempotency key, signed delta, details)` onto the
    customer's card, in order; returns how many entries were added.

    Keys already in the store's ledger (and repeats within `entries`) are skipped; a zero delta
    is skipped. A debit larger than the balance at that point is recorded as the balance (the
    card never goes below 0) with `requested_delta` in its details; one that would debit
    nothing is left out (and looked at again by the next import). Never notifies.
    """
    results = import_balances(
        session,
        store_id=store_id,
        card_id=card_id,
        imports=[BalanceImport(customer_id=customer_id, entries=entries)],
    )
    return results[customer_id].added


def set_balance(
    session: Session,
    *,
    store_id: int,
    card_id: int,
    customer_id: int,
    target: int,
    key_prefix: str,
    details: dict[str, Any],
) -> int:
    """Make the customer's card balance equal `target` with one `import` entry keyed
    `<key_prefix>:<n>`; returns the delta written (0: already equal, nothing written).

    n is 1 + the number of entries already keyed under the prefix, so a re-run with the same
    target writes nothing and a changed target writes the next adjustment. A negative target
    sets 0 and records the `shortfall` in the details. Enrols quietly; never notifies.
    """
    results = import_balances(
        session,
        store_id=store_id,
        card_id=card_id,
        imports=[
            BalanceImport(
                customer_id=customer_id, target=target, key_prefix=key_prefix, details=details
            )
        ],
    )
    return results[customer_id].delta
