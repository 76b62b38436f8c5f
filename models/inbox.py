"""The webhook inbox: what a delivery row holds and the batch insert behind the group commit.

Pure data rules, no HTTP and no asyncio: the API edge builds `Delivery` values from verified
requests and hands batches of them to `insert_batch`, inside one transaction it owns.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Connection, select, text
from sqlalchemy.dialects import postgresql, sqlite

from models.tables import Connection as ConnectionRow
from models.tables import WebhookEvent, utcnow

SOURCES = ("shopify", "square")
# Rows the API writes; the worker moves `pending` ones through `processing` to `done`/`failed`.
PENDING, IGNORED, INVALID = "pending", "ignored", "invalid"
STATUSES = (PENDING, IGNORED, INVALID, "processing", "done", "failed")

# Topics the worker handles; anything else is kept as `ignored`.
SHOPIFY_TOPICS = frozenset(
    {
        "customers/create",
        "customers/update",
        "customers/delete",
        "customers/merge",
        "customers/redact",
        "customers/data_request",
        "shop/redact",
        # Stamps from orders (models/earning.py).
        "orders/paid",
        "orders/updated",
        "orders/cancelled",
        "refunds/create",
    }
)
SQUARE_TYPES = frozenset(
    {"customer.created", "customer.updated", "customer.deleted"}
    | {"payment.created", "payment.updated", "refund.created", "refund.updated"}
)
HANDLED_TOPICS: Mapping[str, frozenset[str]] = {"shopify": SHOPIFY_TOPICS, "square": SQUARE_TYPES}

Outcome = Literal["accepted", "duplicate", "ignored", "invalid"]
_OUTCOME_OF_STATUS: Mapping[str, Outcome] = {
    PENDING: "accepted",
    IGNORED: "ignored",
    INVALID: "invalid",
}

# Column widths of `webhook_events` (values from a request are clipped to them, never rejected).
TOPIC_LEN, EVENT_ID_LEN, ACCOUNT_LEN, API_VERSION_LEN, DEDUPE_KEY_LEN = 128, 255, 255, 32, 255
HEADER_VALUE_LEN, MAX_HEADERS = 1024, 32


def clean_text(value: object, max_len: int) -> str | None:
    """A string safe for a text column of both backends, or None.

    Only strings and integers count (a JSON `event_id` of 42 is "42"); NUL characters (rejected
    by PostgreSQL) are dropped, lone surrogates (unencodable) replaced, and the result clipped.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).replace("\x00", "").strip()
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text[:max_len] or None


def body_text(raw: bytes) -> tuple[str, str | None]:
    """The body as stored: `(text, None)`, or base64 with the reason when it isn't storable text.

    Nothing is lost either way: a body that is not UTF-8, or holds NUL bytes (which PostgreSQL
    text cannot), is kept base64-encoded and the reason says so.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "body is not UTF-8; stored base64-encoded"
    if "\x00" in text:
        return base64.b64encode(raw).decode("ascii"), "body holds NUL bytes; stored base64-encoded"
    return text, None


def dedupe_key(*parts: str) -> str:
    """Join the parts; a key longer than the column is replaced by its SHA-256."""
    key = ":".join(parts)
    if len(key) <= DEDUPE_KEY_LEN:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


def body_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def parse_timestamp(value: object) -> dt.datetime | None:
    """An RFC 3339 timestamp (`…Z`, nanoseconds allowed) as an aware UTC datetime, or None."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    try:
        return parsed.astimezone(dt.UTC)
    except (OverflowError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One verified webhook delivery, ready to be stored.

    `invalid_reason` set: the body could not be parsed (stored as `invalid`). Otherwise the row is
    `pending` when its topic is handled and `(source, account)` names a connection, else `ignored`.
    """

    source: str
    dedupe_key: str
    body: str
    headers: dict[str, str] = field(default_factory=dict)
    topic: str | None = None
    event_id: str | None = None
    account: str | None = None
    api_version: str | None = None
    triggered_at: dt.datetime | None = None
    received_at: dt.datetime = field(default_factory=utcnow)
    invalid_reason: str | None = None

    @property
    def handled(self) -> bool:
        return self.topic is not None and self.topic in HANDLED_TOPICS.get(self.source, ())


@dataclass(frozen=True, slots=True)
class Route:
    """Where deliveries for one `(source, account)` go. Ids are None when several stores connect
    the same shop/merchant: the worker then routes by `(source, account)` itself."""

    store_id: int | None
    connection_id: int | None


def find_routes(conn: Connection, source: str, accounts: Iterable[str]) -> dict[str, Route]:
    """The enabled connections of `accounts` (of one source); unknown accounts are absent."""
    wanted = sorted(set(accounts))
    if not wanted:
        return {}
    found: dict[str, list[tuple[int, int]]] = {}
    query = select(ConnectionRow.account, ConnectionRow.id, ConnectionRow.store_id).where(
        ConnectionRow.source == source,
        ConnectionRow.account.in_(wanted),
        ConnectionRow.enabled.is_(True),
    )
    for account, connection_id, store_id in conn.execute(query):
        found.setdefault(account, []).append((connection_id, store_id))
    routes: dict[str, Route] = {}
    for account, matches in found.items():
        if len(matches) == 1:
            connection_id, store_id = matches[0]
            routes[account] = Route(store_id=store_id, connection_id=connection_id)
        else:
            routes[account] = Route(store_id=None, connection_id=None)
    return routes


def _row(delivery: Delivery, route: Route | None) -> dict[str, Any]:
    if delivery.invalid_reason is not None:
        status, note = INVALID, delivery.invalid_reason
    elif not delivery.handled:
        status, note = IGNORED, f"ignored: topic {delivery.topic!r} is not handled"
    elif route is None:
        status, note = IGNORED, f"ignored: no connection for {delivery.source} {delivery.account!r}"
    else:
        status, note = PENDING, None
    return {
        "source": delivery.source,
        "dedupe_key": delivery.dedupe_key,
        "topic": delivery.topic,
        "event_id": delivery.event_id,
        "store_id": route.store_id if route else None,
        "connection_id": route.connection_id if route else None,
        "account": delivery.account,
        "api_version": delivery.api_version,
        "triggered_at": delivery.triggered_at,
        "received_at": delivery.received_at,
        "status": status,
        "attempts": 0,
        "next_attempt_at": delivery.received_at,
        "last_error": note,
        "body": delivery.body,
        "headers": delivery.headers,
    }


# PostgreSQL: the whole batch as ONE JSON parameter expanded server-side
# (`jsonb_to_recordset`): the statement text never changes (parsed and planned once per
# connection, whatever the batch size) and the client encodes one JSON document with the C
# encoder instead of dumping fourteen arrays element by element.
_PG_INSERT = text(
    """
    INSERT INTO webhook_events (
        source, dedupe_key, topic, event_id, store_id, connection_id, account, api_version,
        triggered_at, received_at, status, attempts, next_attempt_at, last_error, body, headers
    )
    SELECT r.source, r.dedupe_key, r.topic, r.event_id, r.store_id, r.connection_id,
           r.account, r.api_version, r.triggered_at, r.received_at, r.status, 0,
           r.received_at, r.last_error, r.body, r.headers
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(
        source text, dedupe_key text, topic text, event_id text, store_id bigint,
        connection_id bigint, account text, api_version text, triggered_at timestamptz,
        received_at timestamptz, status text, last_error text, body text, headers jsonb
    )
    ON CONFLICT (source, dedupe_key) DO NOTHING
    RETURNING source, dedupe_key
    """
)


def _instant(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat() if value is not None else None


def _insert_postgresql(conn: Connection, rows: Sequence[dict[str, Any]]) -> set[tuple[str, str]]:
    payload = [
        {
            **row,
            "triggered_at": _instant(row["triggered_at"]),
            "received_at": _instant(row["received_at"]),
            "next_attempt_at": None,
        }
        for row in rows
    ]
    # NUL can't be stored in PostgreSQL text; `body_text`/`clean_text` already removed it.
    document = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return {(source, key) for source, key in conn.execute(_PG_INSERT, {"rows": document})}


def insert_batch(
    conn: Connection,
    deliveries: Sequence[Delivery],
    routes: Mapping[tuple[str, str], Route | None],
) -> tuple[list[Outcome], int]:
    """Insert `deliveries` in one statement (`ON CONFLICT (source, dedupe_key) DO NOTHING`).

    Returns each delivery's outcome (in order) and the number of new `pending` rows. The first
    delivery of a key in the batch is the one inserted; a later one in the same batch, or one
    whose key is already stored, is a `duplicate`. The caller owns the transaction.
    """
    outcomes: list[Outcome | None] = [None] * len(deliveries)
    rows: list[dict[str, Any]] = []
    first_of: dict[tuple[str, str], int] = {}
    for i, delivery in enumerate(deliveries):
        key = (delivery.source, delivery.dedupe_key)
        if key in first_of:
            outcomes[i] = "duplicate"
            continue
        first_of[key] = i
        route = routes.get((delivery.source, delivery.account)) if delivery.account else None
        rows.append(_row(delivery, route))
    inserted: set[tuple[str, str]] = set()
    if rows and conn.dialect.name == "postgresql":
        inserted = _insert_postgresql(conn, rows)
    elif rows:
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        stmt = (
            insert(WebhookEvent)
            .on_conflict_do_nothing(index_elements=["source", "dedupe_key"])
            .returning(WebhookEvent.source, WebhookEvent.dedupe_key)
        )
        # One statement, compiled once and cached: SQLAlchemy's "insertmanyvalues" sends the
        # parameter list as multi-row VALUES pages (a `.values(rows)` literal would be compiled
        # anew for every batch, ~0.5 ms a row).
        inserted = {(source, key) for source, key in conn.execute(stmt, rows)}
    new_pending = 0
    for row in rows:
        key = (row["source"], row["dedupe_key"])
        index = first_of[key]
        if key in inserted:
            outcomes[index] = _OUTCOME_OF_STATUS[row["status"]]
            new_pending += row["status"] == PENDING
        else:
            outcomes[index] = "duplicate"
    return [o if o is not None else "duplicate" for o in outcomes], new_pending
