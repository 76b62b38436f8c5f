"""The statements of the bulk upsert (models/ingest.py), per database.

Every function takes a whole page's rows and costs one round trip on PostgreSQL:

- reads join the page's keys (`unnest` of array parameters) to the table through a LATERAL
  subquery with `LIMIT 1`, which the planner cannot flatten: each key is one probe of a unique
  index, whatever the table statistics say. (A plain `= ANY(array)` is planned from statistics,
  and right after a bulk load they say "empty table": a filter over every row of the store.)
- new rows go in by COPY; updates are `UPDATE … FROM unnest(arrays)`: one parameter per
  column, so the statement text is the same for every page (a multi-row VALUES list would be
  a new statement to parse every time).
- the reference metadata is merged by the database: `metadata || patch` (shallow).

On SQLite (embedded, in-process, no round trips) the same operations are plain SQLAlchemy Core
statements run with executemany; there the caller passes metadata already merged.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Row,
    Table,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.tables import Customer, ExternalReference, SyncConflict, UTCDateTime

_customers: Table = Customer.__table__  # type: ignore[assignment]
_references: Table = ExternalReference.__table__  # type: ignore[assignment]
_conflicts: Table = SyncConflict.__table__  # type: ignore[assignment]

REFERENCE_COLUMNS = (
    "id",
    "source",
    "external_id",
    "customer_id",
    "content_hash",
    "source_version",
    "source_updated_at",
    "deleted_at",
    "metadata",
)
CUSTOMER_COLUMNS = (
    "id",
    "first_name",
    "last_name",
    "email",
    "phone",
    "birth_year",
    "birth_month",
    "birth_day",
    "state",
    "merged_into_id",
)
# The customer columns a page writes (besides id/store/state/metadata/created_at).
CUSTOMER_VALUES = (
    "first_name",
    "last_name",
    "email",
    "phone",
    "birth_year",
    "birth_month",
    "birth_day",
    "search_text",
    "state",
)


EXCLUDED_KEY = "loyalty_excluded"
"""The reserved reference-metadata key that says the source excluded the customer from its
loyalty program (see `models.ingest.EXCLUDED_ATTRIBUTE`). PostgreSQL reads only this one key of
the metadata (`was_excluded`), so a page never decodes metadata it will not use."""


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _column(rows: Sequence[dict[str, Any]], name: str) -> list[Any]:
    return [row[name] for row in rows]


def _json(rows: Sequence[dict[str, Any]], name: str) -> list[str]:
    return [_dump(row[name]) for row in rows]


# --- reads ------------------------------------------------------------------------------------

_PG_REFERENCES = text(
    f"""
    SELECT {", ".join(f"r.{c}" for c in REFERENCE_COLUMNS if c != "metadata")},
        coalesce(r.metadata ->> '{EXCLUDED_KEY}', '') = 'true' AS was_excluded
    FROM unnest(CAST(:sources AS text[]), CAST(:external_ids AS text[])) AS k(source, external_id)
    JOIN LATERAL (
        SELECT * FROM external_references x
        WHERE x.store_id = :store_id AND x.source = k.source AND x.external_id = k.external_id
        LIMIT 1
    ) r ON true
    """  # noqa: S608 - the column names are constants; every value is bound
)


def fetch_references(
    session: Session, store_id: int, keys: Iterable[tuple[str, str]]
) -> Sequence[Row[Any]]:
    """The references among `keys` (source, external_id).

    Their metadata only on SQLite, where the caller merges it; PostgreSQL merges in SQL, so the
    page does not decode what it will not use: there each row carries `was_excluded` instead
    (the metadata's `EXCLUDED_KEY` is true).
    """
    pairs = sorted(set(keys))
    if not pairs:
        return []
    if is_postgres(session):
        return session.execute(
            _PG_REFERENCES,
            {
                "store_id": store_id,
                "sources": [s for s, _ in pairs],
                "external_ids": [e for _, e in pairs],
            },
        ).all()
    r = _references
    return session.execute(
        select(*(r.c[c] for c in REFERENCE_COLUMNS)).where(
            r.c.store_id == store_id, _keys_match(r, pairs)
        )
    ).all()


def _keys_match(table: Table, pairs: Iterable[tuple[str, str]]) -> ColumnElement[bool]:
    """`(source, external_id) IN pairs`, as one `external_id IN (…)` per source (each arm can
    use the table's (store_id, source, external_id) or (store_id, external_id) index)."""
    by_source: dict[str, list[str]] = {}
    for source, external_id in pairs:
        by_source.setdefault(source, []).append(external_id)
    return or_(
        *(
            and_(table.c.source == source, table.c.external_id.in_(sorted(ids)))
            for source, ids in sorted(by_source.items())
        )
    )


def _pg_customers_by(column: str, cast: str) -> str:
    return f"""
    SELECT c.* FROM unnest(CAST(:{column}s AS {cast}[])) AS k(v)
    JOIN LATERAL (
        SELECT {", ".join(CUSTOMER_COLUMNS)} FROM customers x
        WHERE x.store_id = :store_id AND x.{column} = k.v LIMIT 1
    ) c ON true
    """  # noqa: S608 - the column names are constants; every value is bound


# One probe of a unique index per key. (`WHERE store_id = ? AND (email = ANY(?) OR …)` was
# planned, with a store of ~900k customers and no fresh statistics, as a bitmap scan of the
# whole store filtered row by row: 0.6 s per page.)
_PG_CUSTOMERS = text(
    " UNION ".join(
        (
            _pg_customers_by("id", "bigint"),
            _pg_customers_by("email", "text"),
            _pg_customers_by("phone", "text"),
        )
    )
)


def fetch_customers(
    session: Session,
    store_id: int,
    ids: Iterable[int],
    emails: Iterable[str],
    phones: Iterable[str],
) -> Sequence[Row[Any]]:
    """The store's customers with any of these ids, emails or phones."""
    id_list, email_list, phone_list = sorted(set(ids)), sorted(set(emails)), sorted(set(phones))
    if not (id_list or email_list or phone_list):
        return []
    if is_postgres(session):
        return session.execute(
            _PG_CUSTOMERS,
            {"store_id": store_id, "ids": id_list, "emails": email_list, "phones": phone_list},
        ).all()
    # One SELECT per key kind, each on its own unique index (an OR of the three made SQLite
    # walk every customer of the store).
    c = _customers
    columns = [c.c[name] for name in CUSTOMER_COLUMNS]
    rows: list[Row[Any]] = []
    for column, values in ((c.c.id, id_list), (c.c.email, email_list), (c.c.phone, phone_list)):
        if values:
            rows.extend(
                session.execute(
                    select(*columns).where(c.c.store_id == store_id, column.in_(values))
                ).all()
            )
    return rows


# --- writes -----------------------------------------------------------------------------------


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _copy(
    session: Session, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """`COPY table (columns) FROM STDIN` on the session's connection, in its transaction.

    New rows go in by COPY: twice the rows per second of `INSERT … SELECT FROM unnest` measured
    on the references (no per-statement parse of array literals). A unique violation (a writer
    outside the ingest lock took a key since the page looked) surfaces as SQLAlchemy's
    IntegrityError, like a failed INSERT, so the page is planned again.
    """
    raw = session.connection().connection.driver_connection
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    try:
        with raw.cursor() as cursor, cursor.copy(statement) as copy:  # type: ignore[union-attr]
            for row in rows:
                copy.write_row(row)
    except psycopg.errors.IntegrityError as exc:
        raise IntegrityError(statement, None, exc) from exc


_PG_NEXT_IDS = text(
    "SELECT nextval(pg_get_serial_sequence('customers', 'id')) FROM generate_series(1, :n)"
)


def insert_customers(
    session: Session, store_id: int, rows: Sequence[dict[str, Any]], now: dt.datetime
) -> list[int]:
    """Insert new customers (`CUSTOMER_VALUES` keys); their ids, in order."""
    if not rows:
        return []
    if is_postgres(session):
        ids = [int(i) for i in session.execute(_PG_NEXT_IDS, {"n": len(rows)}).scalars()]
        _copy(
            session,
            "customers",
            ("id", "store_id", *CUSTOMER_VALUES, "metadata", "created_at", "updated_at"),
            (
                (new_id, store_id, *(row[n] for n in CUSTOMER_VALUES), "{}", now, now)
                for new_id, row in zip(ids, rows, strict=True)
            ),
        )
        return ids
    # SQLite has one writer, and this transaction is it (BEGIN IMMEDIATE): the ids after the
    # current maximum are ours, and one executemany with explicit ids beats RETURNING per row.
    first = int(session.scalar(select(func.coalesce(func.max(_customers.c.id), 0))) or 0) + 1
    ids = list(range(first, first + len(rows)))
    session.execute(
        insert(_customers),
        [
            {
                **{name: row[name] for name in CUSTOMER_VALUES},
                "id": new_id,
                "store_id": store_id,
                "metadata": {},
                "created_at": now,
                "updated_at": now,
            }
            for new_id, row in zip(ids, rows, strict=True)
        ],
    )
    return ids


_PG_UPDATE_CUSTOMERS = text(
    """
    UPDATE customers AS c SET
        first_name = u.first_name, last_name = u.last_name, email = u.email, phone = u.phone,
        birth_year = u.birth_year, birth_month = u.birth_month, birth_day = u.birth_day,
        search_text = u.search_text, state = u.state, updated_at = :now
    FROM unnest(CAST(:id AS bigint[]), CAST(:first_name AS text[]), CAST(:last_name AS text[]),
                CAST(:email AS text[]), CAST(:phone AS text[]), CAST(:birth_year AS smallint[]),
                CAST(:birth_month AS smallint[]), CAST(:birth_day AS smallint[]),
                CAST(:search_text AS text[]), CAST(:state AS text[]))
         AS u(id, first_name, last_name, email, phone, birth_year, birth_month, birth_day,
              search_text, state)
    WHERE c.id = u.id
    """
)


def update_customers(session: Session, rows: Sequence[dict[str, Any]], now: dt.datetime) -> None:
    """Overwrite `CUSTOMER_VALUES` of existing customers (rows carry `id`)."""
    if not rows:
        return
    if is_postgres(session):
        params: dict[str, Any] = {name: _column(rows, name) for name in CUSTOMER_VALUES}
        session.execute(_PG_UPDATE_CUSTOMERS, {**params, "id": _column(rows, "id"), "now": now})
        return
    c = _customers
    session.execute(
        update(c)
        .where(c.c.id == bindparam("_id"))
        .values({**{name: bindparam(name) for name in CUSTOMER_VALUES}, "updated_at": now}),
        [{"_id": row["id"], **{name: row[name] for name in CUSTOMER_VALUES}} for row in rows],
    )


REFERENCE_VALUES = (
    "customer_id",
    "source",
    "external_id",
    "metadata",
    "source_updated_at",
    "source_version",
    "content_hash",
    "deleted_at",
)


def insert_references(
    session: Session, store_id: int, rows: Sequence[dict[str, Any]], now: dt.datetime
) -> None:
    """Insert new references (`REFERENCE_VALUES` keys)."""
    if not rows:
        return
    if is_postgres(session):
        _copy(
            session,
            "external_references",
            ("store_id", *REFERENCE_VALUES, "created_at", "updated_at"),
            (
                (
                    store_id,
                    *(_dump(row[n]) if n == "metadata" else row[n] for n in REFERENCE_VALUES),
                    now,
                    now,
                )
                for row in rows
            ),
        )
        return
    session.execute(
        insert(_references),
        [
            {
                **{name: row[name] for name in REFERENCE_VALUES},
                "store_id": store_id,
                "created_at": now,
                "updated_at": now,
            }
            for row in rows
        ],
    )


_PG_UPDATE_REFERENCES = text(
    """
    UPDATE external_references AS r SET
        metadata = r.metadata || u.patch, customer_id = u.customer_id,
        content_hash = u.content_hash, source_version = u.source_version,
        source_updated_at = u.source_updated_at, deleted_at = u.deleted_at, updated_at = :now
    FROM unnest(CAST(:id AS bigint[]), CAST(:patch AS jsonb[]), CAST(:customer_id AS bigint[]),
                CAST(:content_hash AS text[]), CAST(:source_version AS bigint[]),
                CAST(:source_updated_at AS timestamptz[]), CAST(:deleted_at AS timestamptz[]))
         AS u(id, patch, customer_id, content_hash, source_version, source_updated_at,
              deleted_at)
    WHERE r.id = u.id
    """
)
_REFERENCE_UPDATES = (
    "customer_id",
    "content_hash",
    "source_version",
    "source_updated_at",
    "deleted_at",
)


def update_references(session: Session, rows: Sequence[dict[str, Any]], now: dt.datetime) -> None:
    """Update references (rows: `id`, `patch`, `_REFERENCE_UPDATES`).

    PostgreSQL merges `patch` into the stored metadata; elsewhere `patch` must already be the
    merged metadata (the caller holds the write lock: SQLite has one writer).
    """
    if not rows:
        return
    if is_postgres(session):
        params: dict[str, Any] = {name: _column(rows, name) for name in _REFERENCE_UPDATES}
        session.execute(
            _PG_UPDATE_REFERENCES,
            {**params, "id": _column(rows, "id"), "patch": _json(rows, "patch"), "now": now},
        )
        return
    r = _references
    session.execute(
        update(r)
        .where(r.c.id == bindparam("_id"))
        .values(
            {
                "metadata": bindparam("patch", type_=r.c.metadata.type),
                **{name: bindparam(name) for name in _REFERENCE_UPDATES},
                "updated_at": now,
            }
        ),
        [
            {"_id": row["id"], "patch": row["patch"], **{n: row[n] for n in _REFERENCE_UPDATES}}
            for row in rows
        ],
    )


_PG_BUMP_REFERENCES = text(
    """
    UPDATE external_references AS r SET
        source_version = COALESCE(u.source_version, r.source_version),
        source_updated_at = COALESCE(u.source_updated_at, r.source_updated_at)
    FROM unnest(CAST(:id AS bigint[]), CAST(:source_version AS bigint[]),
                CAST(:source_updated_at AS timestamptz[]))
         AS u(id, source_version, source_updated_at)
    WHERE r.id = u.id
    """
)


def bump_references(
    session: Session, rows: Sequence[tuple[int, int | None, dt.datetime | None]]
) -> None:
    """Record a newer source version/time on references whose content did not change."""
    if not rows:
        return
    if is_postgres(session):
        session.execute(
            _PG_BUMP_REFERENCES,
            {
                "id": [i for i, _, _ in rows],
                "source_version": [v for _, v, _ in rows],
                "source_updated_at": [u for _, _, u in rows],
            },
        )
        return
    r = _references
    session.execute(
        update(r)
        .where(r.c.id == bindparam("_id"))
        .values(
            source_version=func.coalesce(
                bindparam("_version", type_=BigInteger()), r.c.source_version
            ),
            source_updated_at=func.coalesce(
                bindparam("_updated", type_=UTCDateTime()), r.c.source_updated_at
            ),
        ),
        [{"_id": i, "_version": v, "_updated": u} for i, v, u in rows],
    )


# --- conflicts ----------------------------------------------------------------------------------


def record_conflicts(
    session: Session, store_id: int, rows: Sequence[dict[str, Any]], now: dt.datetime
) -> None:
    """Upsert conflicts (rows: source, external_id, kind, detail, customer_ids): a conflict
    seen again counts one more occurrence and is open again."""
    if not rows:
        return
    table = _conflicts
    maker = pg_insert if is_postgres(session) else sqlite_insert
    statement = maker(table)
    statement = statement.on_conflict_do_update(
        index_elements=["store_id", "source", "external_id", "kind"],
        set_={
            "detail": statement.excluded.detail,
            "customer_ids": statement.excluded.customer_ids,
            "occurrences": table.c.occurrences + 1,
            "last_seen_at": statement.excluded.last_seen_at,
            "resolved_at": None,
        },
    )
    folded = {(row["source"], row["external_id"], row["kind"]): row for row in rows}
    session.execute(
        statement,
        [
            {
                **row,
                "store_id": store_id,
                "occurrences": 1,
                "first_seen_at": now,
                "last_seen_at": now,
                "resolved_at": None,
            }
            for row in folded.values()
        ],
    )


def resolve_conflicts(
    session: Session, store_id: int, written: Iterable[tuple[str, str]], now: dt.datetime
) -> None:
    """Close the open conflicts of records that have now been written."""
    keys = sorted(set(written))
    if not keys:
        return
    table = _conflicts
    session.execute(
        update(table)
        .where(
            table.c.store_id == store_id,
            table.c.resolved_at.is_(None),
            _keys_match(table, keys),
        )
        .values(resolved_at=now)
    )
