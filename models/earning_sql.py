"""The statements of a batch of orders (models/earning.py), per database.

A batch of orders reads and writes in whole sets, whatever its size:

- reads: the batch's `order_earnings` rows, the buyers' references and customers (merges
  followed), their cards, and the ledger keys the batch could write, one statement each.
  PostgreSQL gets every key list as one array parameter (`= ANY(:ids)`), so the statement text
  is the same for every batch; SQLite gets `IN (…)` lists, chunked under its variable limit.
- the rows and cards the batch writes are locked as they are read (`FOR UPDATE`, in id order,
  on PostgreSQL; SQLite's one writer is the transaction itself).
- writes: new rows go in by COPY on PostgreSQL (ids drawn from the table's sequence first when
  the batch needs them: ledger entries are named by the notifications they queue), updates are
  `UPDATE … FROM unnest(arrays)`. On SQLite: executemany, with ids after the table's maximum
  (the transaction began IMMEDIATE: nobody else inserts until it ends).

A unique violation (a card enrolled by the API since the batch read, a code collision) raises
SQLAlchemy's IntegrityError; the caller re-plans the batch under a savepoint.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, Final

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    Table,
    Text,
    any_,
    bindparam,
    cast,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from models.ingest_sql import _copy, _customers, _dump, _references, is_postgres
from models.tables import CustomerCard, OrderEarning, OutboxMessage, StampLedgerEntry

ORDERS: Table = OrderEarning.__table__  # type: ignore[assignment]
CARDS: Table = CustomerCard.__table__  # type: ignore[assignment]
LEDGER: Table = StampLedgerEntry.__table__  # type: ignore[assignment]
OUTBOX: Table = OutboxMessage.__table__  # type: ignore[assignment]

SQLITE_CHUNK: Final = 10_000  # well under SQLite's 32,766 bound variables

# What a batch can change on an existing row, with each column's PostgreSQL array type (the
# `unnest` of `update_orders`; `refunds` travels as JSON text).
_PG_TYPES: Final = {
    "customer_external_id": "text",
    "customer_card_id": "bigint",
    "currency": "text",
    "amount": "bigint",
    "paid": "boolean",
    "cancelled": "boolean",
    "outcome": "text",
    "earned": "integer",
    "reversed": "integer",
    "shortfall": "integer",
    "refunds": "text",
    "source_updated_at": "timestamptz",
}
ORDER_UPDATES: Final = tuple(_PG_TYPES)
# What a batch reads of a row: its identity and how it arrived, then what can change.
ORDER_COLUMNS: Final = ("id", "kind", "external_id", "via", "first_seen_at", *ORDER_UPDATES)


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), SQLITE_CHUNK):
        yield values[start : start + SQLITE_CHUNK]


def _matches(session: Session, column: Any, values: Sequence[Any], array_type: Any) -> Any:
    """`column = ANY(:array)` on PostgreSQL (one bound array), `column IN (…)` on SQLite."""
    if is_postgres(session):
        return column == any_(
            cast(bindparam(None, list(values), type_=ARRAY(array_type)), ARRAY(array_type))
        )
    return column.in_(values)


def _select_in(
    session: Session,
    statement_for: Any,
    values: Sequence[Any],
) -> list[Any]:
    """Run `statement_for(chunk)` for the values (one statement on PostgreSQL)."""
    if not values:
        return []
    if is_postgres(session):
        return list(session.execute(statement_for(values)).all())
    rows: list[Any] = []
    for chunk in _chunks(values):
        rows.extend(session.execute(statement_for(chunk)).all())
    return rows


# --- reads ----------------------------------------------------------------------------------


def lock_orders(
    session: Session, store_id: int, source: str, external_ids: Sequence[str]
) -> list[Any]:
    """The batch's existing `order_earnings` rows (`ORDER_COLUMNS`), locked, in id order."""
    o = ORDERS
    columns = [o.c[name] for name in ORDER_COLUMNS]
    return _select_in(
        session,
        lambda ids: (
            select(*columns)
            .where(
                o.c.store_id == store_id,
                o.c.source == source,
                _matches(session, o.c.external_id, ids, Text),
            )
            .order_by(o.c.id)
            .with_for_update()
        ),
        sorted(set(external_ids)),
    )


def reference_ids(
    session: Session, store_id: int, source: str, external_ids: Sequence[str]
) -> dict[str, int]:
    """external id → customer id, for the references among `external_ids`."""
    r = _references
    rows = _select_in(
        session,
        lambda ids: select(r.c.external_id, r.c.customer_id).where(
            r.c.store_id == store_id,
            r.c.source == source,
            _matches(session, r.c.external_id, ids, Text),
        ),
        sorted(set(external_ids)),
    )
    return {external_id: int(customer_id) for external_id, customer_id in rows}


def customer_states(
    session: Session, store_id: int, ids: Sequence[int]
) -> dict[int, tuple[int | None, str]]:
    """customer id → (merged_into_id, state)."""
    c = _customers
    rows = _select_in(
        session,
        lambda chunk: select(c.c.id, c.c.merged_into_id, c.c.state).where(
            c.c.store_id == store_id, _matches(session, c.c.id, chunk, BigInteger)
        ),
        sorted(set(ids)),
    )
    return {int(i): (merged, state) for i, merged, state in rows}


def lock_cards(
    session: Session,
    store_id: int,
    *,
    template_id: int,
    customer_ids: Sequence[int],
    card_ids: Sequence[int],
) -> list[Any]:
    """The cards of template `template_id` held by `customer_ids`, and the cards `card_ids`:
    (id, customer_id, card_id, stamps), locked, in id order (the API's single-card locks then
    never wait on each other in a cycle with a batch)."""
    customers, ids = sorted(set(customer_ids)), sorted(set(card_ids))
    if not customers and not ids:
        return []
    c = CARDS
    columns = (c.c.id, c.c.customer_id, c.c.card_id, c.c.stamps)
    if is_postgres(session):
        arms: list[ColumnElement[bool]] = []
        if customers:
            arms.append(
                (c.c.card_id == template_id)
                & _matches(session, c.c.customer_id, customers, BigInteger)
            )
        if ids:
            arms.append(_matches(session, c.c.id, ids, BigInteger))
        return list(
            session.execute(
                select(*columns)
                .where(c.c.store_id == store_id, or_(*arms))
                .order_by(c.c.id)
                .with_for_update()
            ).all()
        )
    found = {
        row.id: row
        for row in _select_in(
            session,
            lambda chunk: select(*columns).where(
                c.c.store_id == store_id, c.c.card_id == template_id, c.c.customer_id.in_(chunk)
            ),
            customers,
        )
    }
    found.update(
        (row.id, row)
        for row in _select_in(
            session,
            lambda chunk: select(*columns).where(c.c.store_id == store_id, c.c.id.in_(chunk)),
            ids,
        )
    )
    return [found[i] for i in sorted(found)]


def ledger_deltas(session: Session, store_id: int, keys: Iterable[str]) -> dict[str, int]:
    """idempotency key → delta, for the ledger entries among `keys`."""
    entries = LEDGER
    rows = _select_in(
        session,
        lambda chunk: select(entries.c.idempotency_key, entries.c.delta).where(
            entries.c.store_id == store_id,
            _matches(session, entries.c.idempotency_key, chunk, Text),
        ),
        sorted(set(keys)),
    )
    return {key: int(delta) for key, delta in rows}


# --- writes ---------------------------------------------------------------------------------


def next_ids(session: Session, table: Table, n: int) -> list[int]:
    """`n` fresh ids of `table`: its sequence on PostgreSQL, those after its maximum on SQLite
    (whose single writer is this transaction)."""
    if n <= 0:
        return []
    if is_postgres(session):
        return [
            int(i)
            for i in session.execute(
                text(
                    "SELECT nextval(pg_get_serial_sequence(:table, 'id'))"
                    " FROM generate_series(1, :n)"
                ),
                {"table": table.name, "n": n},
            ).scalars()
        ]
    first = int(session.scalar(select(func.coalesce(func.max(table.c.id), 0))) or 0) + 1
    return list(range(first, first + n))


def insert_rows(
    session: Session,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    json_columns: Sequence[str] = (),
) -> None:
    """Insert `rows` (dicts with the same keys, every non-null column given): one COPY on
    PostgreSQL, one executemany on SQLite."""
    if not rows:
        return
    if is_postgres(session):
        columns = list(rows[0])
        dumped = set(json_columns)
        _copy(
            session,
            table.name,
            columns,
            (tuple(_dump(row[c]) if c in dumped else row[c] for c in columns) for row in rows),
        )
        return
    session.execute(insert(table), list(rows))


_SETS = ", ".join(
    f"{name} = CAST(u.{name} AS jsonb)" if name == "refunds" else f"{name} = u.{name}"
    for name in ORDER_UPDATES
)
_ARRAYS = ", ".join(f"CAST(:{name} AS {_PG_TYPES[name]}[])" for name in ORDER_UPDATES)
_PG_UPDATE_ORDERS = text(
    f"UPDATE order_earnings AS o SET {_SETS}, updated_at = :now"  # noqa: S608 - constant names
    f" FROM unnest(CAST(:id AS bigint[]), {_ARRAYS}) AS u(id, {', '.join(ORDER_UPDATES)})"
    " WHERE o.id = u.id"
)


def update_orders(session: Session, rows: Sequence[dict[str, Any]], now: dt.datetime) -> None:
    """Write `ORDER_UPDATES` of existing rows (each dict carries `id`)."""
    if not rows:
        return
    if is_postgres(session):
        params: dict[str, Any] = {
            name: [_dump(r[name]) if name == "refunds" else r[name] for r in rows]
            for name in ORDER_UPDATES
        }
        session.execute(_PG_UPDATE_ORDERS, {**params, "id": [r["id"] for r in rows], "now": now})
        return
    o = ORDERS
    session.execute(
        update(o)
        .where(o.c.id == bindparam("_id"))
        .values({**{name: bindparam(name) for name in ORDER_UPDATES}, "updated_at": now}),
        [{"_id": r["id"], **{name: r[name] for name in ORDER_UPDATES}} for r in rows],
    )


_PG_SET_BALANCES = text(
    "UPDATE customer_cards AS c SET stamps = u.stamps, updated_at = :now"
    " FROM unnest(CAST(:id AS bigint[]), CAST(:stamps AS integer[])) AS u(id, stamps)"
    " WHERE c.id = u.id"
)


def set_balances(session: Session, balances: Sequence[tuple[int, int]], now: dt.datetime) -> None:
    """Set the (locked) cards' balances: (card id, stamps) pairs."""
    if not balances:
        return
    if is_postgres(session):
        session.execute(
            _PG_SET_BALANCES,
            {"id": [i for i, _ in balances], "stamps": [s for _, s in balances], "now": now},
        )
        return
    c = CARDS
    session.execute(
        update(c)
        .where(c.c.id == bindparam("_id"))
        .values(stamps=bindparam("_stamps"), updated_at=now),
        [{"_id": i, "_stamps": s} for i, s in balances],
    )


__all__ = [
    "customer_states",
    "insert_rows",
    "ledger_deltas",
    "lock_cards",
    "lock_orders",
    "next_ids",
    "reference_ids",
    "set_balances",
    "update_orders",
]
