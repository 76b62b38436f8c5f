"""The store's tables (SQLAlchemy 2.0 typed declarative models).

Every uniqueness rule the product promises is a database constraint, so that concurrent writers
cannot break it: a check in Python alone would race.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
BigId = BigInteger().with_variant(Integer(), "sqlite")
MAX_ID = 2**63 - 1  # both backends' 64-bit signed integer


def is_valid_id(value: int) -> bool:
    """Whether `value` can be an id at all; larger numbers overflow the driver, not just miss."""
    return 1 <= value <= MAX_ID


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite drops the offset otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TimestampMixin:
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Store(TimestampMixin, Base):
    """A merchant account (Leal's *account*)."""

    __tablename__ = "stores"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # ISO 3166 region used to read national phone numbers (`(212) 555-4240` → +1…).
    country: Mapped[str] = mapped_column(String(2), default="US")


class ApiToken(Base):
    """A bearer token of one store. Only its SHA-256 is kept; the token is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Customer(TimestampMixin, Base):
    __tablename__ = "customers"
    __table_args__ = (
        # Uniqueness per store is what the API promises; NULLs are distinct on both backends,
        # so customers without an email (or phone) do not collide.
        UniqueConstraint("store_id", "email"),
        UniqueConstraint("store_id", "phone"),
        CheckConstraint(
            "birth_month IS NULL OR (birth_month BETWEEN 1 AND 12)", name="birth_month"
        ),
        CheckConstraint("birth_day IS NULL OR (birth_day BETWEEN 1 AND 31)", name="birth_day"),
        Index("ix_customers_store_id_id", "store_id", "id"),
        # Substring search (`LIKE '%frag%'`) over names/email/phone digits: trigram index on
        # PostgreSQL; SQLite scans, which is fine at embedded sizes.
        Index(
            "ix_customers_search_text_trgm",
            "search_text",
            postgresql_using="gin",
            postgresql_ops={"search_text": "gin_trgm_ops"},
        ).ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"))
    first_name: Mapped[str | None] = mapped_column(String(200))
    last_name: Mapped[str | None] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(20))
    birth_year: Mapped[int | None] = mapped_column(SmallInteger)
    birth_month: Mapped[int | None] = mapped_column(SmallInteger)
    birth_day: Mapped[int | None] = mapped_column(SmallInteger)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    merged_into_id: Mapped[int | None] = mapped_column(
        ForeignKey("customers.id", ondelete="SET NULL")
    )
    # Lower-cased "first last\nemail\nphone digits", maintained by the store operations.
    search_text: Mapped[str] = mapped_column(Text, default="", server_default="")

    external_references: Mapped[list[ExternalReference]] = relationship(
        back_populates="customer", order_by="ExternalReference.id", lazy="selectin"
    )
    customer_cards: Mapped[list[CustomerCard]] = relationship(
        back_populates="customer", order_by="CustomerCard.id", lazy="selectin"
    )


class ExternalReference(TimestampMixin, Base):
    __tablename__ = "external_references"
    __table_args__ = (
        # The identity of a foreign record: upserts key on it, so it can never be duplicated.
        UniqueConstraint("store_id", "source", "external_id"),
        # "search by exact external id of any source".
        Index("ix_external_references_store_id_external_id", "store_id", "external_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"))
    customer_id: Mapped[int] = mapped_column(
        ForeignKey("customers.id", ondelete="CASCADE"), index=True
    )
    source: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(255))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    # Stale-update guard for syncs: the newest source timestamp/version applied so far.
    source_updated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    source_version: Mapped[int | None] = mapped_column(BigInteger)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    customer: Mapped[Customer] = relationship(back_populates="external_references")


class CardTemplate(TimestampMixin, Base):
    """A loyalty card design (Leal's *card*)."""

    __tablename__ = "cards"
    __table_args__ = (
        CheckConstraint("stamps_required BETWEEN 1 AND 18", name="stamps_required"),
        CheckConstraint(
            "initial_stamps >= 0 AND initial_stamps < stamps_required", name="initial_stamps"
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    stamps_required: Mapped[int] = mapped_column(SmallInteger)
    initial_stamps: Mapped[int] = mapped_column(SmallInteger, default=0)
    archived_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Reward(TimestampMixin, Base):
    __tablename__ = "rewards"
    __table_args__ = (CheckConstraint("stamps >= 1", name="stamps_positive"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"), index=True)
    card_id: Mapped[int] = mapped_column(ForeignKey("cards.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    stamps: Mapped[int] = mapped_column(SmallInteger)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class CustomerCard(TimestampMixin, Base):
    """A customer's instance of a card template; `stamps` always equals the ledger sum."""

    __tablename__ = "customer_cards"
    __table_args__ = (
        # One card of each template per customer: enrolling twice is a no-op, not a second card.
        UniqueConstraint("customer_id", "card_id"),
        UniqueConstraint("store_id", "code"),
        UniqueConstraint("pass_token"),
        CheckConstraint("stamps >= 0", name="stamps_non_negative"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"))
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"))
    card_id: Mapped[int] = mapped_column(ForeignKey("cards.id", ondelete="RESTRICT"), index=True)
    stamps: Mapped[int] = mapped_column(Integer, default=0)
    code: Mapped[str] = mapped_column(String(32))
    pass_token: Mapped[str] = mapped_column(String(64))
    wallet_pass_installed: Mapped[bool] = mapped_column(Boolean, default=False)

    customer: Mapped[Customer] = relationship(back_populates="customer_cards")
    card: Mapped[CardTemplate] = relationship(lazy="joined")


class StampLedgerEntry(Base):
    """Every change of a card balance. Append-only."""

    __tablename__ = "stamp_ledger"
    __table_args__ = (
        # A source order, refund or API retry applies once: the key is the idempotency guard.
        UniqueConstraint("store_id", "idempotency_key"),
        CheckConstraint("delta <> 0", name="delta_non_zero"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"))
    customer_card_id: Mapped[int] = mapped_column(
        ForeignKey("customer_cards.id", ondelete="CASCADE"), index=True
    )
    delta: Mapped[int] = mapped_column(Integer)
    balance_after: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(32))
    reward_id: Mapped[int | None] = mapped_column(ForeignKey("rewards.id", ondelete="SET NULL"))
    idempotency_key: Mapped[str] = mapped_column(String(255))
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class OutboxMessage(Base):
    """A side effect to deliver after commit (card links, pass updates, pushes)."""

    __tablename__ = "outbox"
    __table_args__ = (
        # Each delivery happens once per key, however often the producing code runs.
        UniqueConstraint("idempotency_key"),
        Index("ix_outbox_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    idempotency_key: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Connection(TimestampMixin, Base):
    """A store's link to a source: where to call it, and the credentials (encrypted at rest)."""

    __tablename__ = "connections"
    __table_args__ = (
        # One connection per shop (merchant) of a store: connecting the same shop again replaces
        # its token instead of adding a second connection that would sync the same records twice.
        UniqueConstraint("store_id", "source", "account"),
        CheckConstraint("source IN ('shopify', 'square', 'appystamp', 'loke')", name="source"),
        CheckConstraint("status IN ('active', 'needs_attention')", name="status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(32))
    # Shopify: the shop domain, lower-case (`x.myshopify.com`); Square: the merchant id.
    account: Mapped[str] = mapped_column(String(255))
    api_base_url: Mapped[str] = mapped_column(String(2048))
    api_version: Mapped[str | None] = mapped_column(String(32))
    # A Fernet token (models/crypto.py) of the JSON object `{"access_token": ...}`.
    credentials: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    last_error: Mapped[str | None] = mapped_column(Text)
    # Later: the card to earn on, the earning rule, field ownership.
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))


class SyncState(Base):
    """Where a (connection, stream) sync stands: the saved cursor of a run in progress and the
    watermark of the last complete run.

    `cursor` is only meaningful with the filter it was issued for, so the run's `window_start`
    (the `updated_since` it asked for; None = full sync) is saved beside it: a resumed run asks
    again with the same filter. `high_water` is the newest `source_updated_at` seen by the run so
    far; it becomes the `watermark` when the run completes.
    """

    __tablename__ = "sync_states"
    __table_args__ = (UniqueConstraint("connection_id", "stream"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    connection_id: Mapped[int] = mapped_column(ForeignKey("connections.id", ondelete="CASCADE"))
    stream: Mapped[str] = mapped_column(String(32))
    cursor: Mapped[str | None] = mapped_column(Text)
    in_progress: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    full: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    window_start: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    high_water: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    watermark: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    pages_done: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("sync_runs.id", ondelete="SET NULL"))
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class SyncRun(Base):
    """One sync run of a (connection, stream) and what it did."""

    __tablename__ = "sync_runs"
    __table_args__ = (
        Index("ix_sync_runs_connection_id_stream_id", "connection_id", "stream", "id"),
        CheckConstraint(
            "status IN ('running', 'succeeded', 'failed', 'needs_attention')", name="status"
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"))
    connection_id: Mapped[int] = mapped_column(ForeignKey("connections.id", ondelete="CASCADE"))
    stream: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="running")
    full: Mapped[bool] = mapped_column(Boolean, default=False)
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    resumed: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    pages: Mapped[int] = mapped_column(Integer, default=0)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    throttled: Mapped[int] = mapped_column(Integer, default=0)
    seen: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    linked: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    conflicts: Mapped[int] = mapped_column(Integer, default=0)
    deleted: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)


class SyncConflict(Base):
    """A foreign record that was not written because its identity is ambiguous.

    One row per (store, source, external id, kind): seeing the same conflict again bumps
    `occurrences`/`last_seen_at`; writing the record later (after the operator fixed the data)
    sets `resolved_at`.
    """

    __tablename__ = "sync_conflicts"
    __table_args__ = (
        UniqueConstraint("store_id", "source", "external_id", "kind"),
        Index("ix_sync_conflicts_store_id_resolved_at", "store_id", "resolved_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text)
    customer_ids: Mapped[list[int]] = mapped_column(JSONType, default=list)
    occurrences: Mapped[int] = mapped_column(Integer, default=1)
    first_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class IdempotentRequest(Base):
    """A response remembered for an `Idempotency-Key` (per store, 24 h)."""

    __tablename__ = "idempotent_requests"
    __table_args__ = (
        # Concurrent retries with one key serialise on this constraint (see api/idempotency.py).
        UniqueConstraint("store_id", "key"),
        Index("ix_idempotent_requests_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    # The exact bytes first sent (as text): a replay must be byte-identical, and JSONB would
    # reorder keys.
    response_body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookEvent(Base):
    """The webhook inbox: one row per signed delivery, committed before the 200 is sent.

    `(source, dedupe_key)` is unique: a redelivery (Shopify `X-Shopify-Webhook-Id`, Square
    `event_id`) never becomes a second row. `body` is the raw request body as received (base64
    when it was not UTF-8 text, see `last_error`), `headers` the delivery's own headers without
    any signature. Rows the API could not route (unknown shop/merchant, unhandled topic) are kept
    as `ignored`, signed but unparseable bodies as `invalid`; the worker drains `pending` ones
    (`processing`, then `done` or `failed`). `store_id`/`connection_id` are set when exactly one
    enabled connection matches `(source, account)`; NULL otherwise (route by `account` then).
    """

    __tablename__ = "webhook_events"
    __table_args__ = (
        UniqueConstraint("source", "dedupe_key"),
        Index("ix_webhook_events_status_next_attempt_at", "status", "next_attempt_at"),
        CheckConstraint("source IN ('shopify', 'square')", name="source"),
        CheckConstraint(
            "status IN ('pending', 'ignored', 'invalid', 'processing', 'done', 'failed')",
            name="status",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    source: Mapped[str] = mapped_column(String(32))
    dedupe_key: Mapped[str] = mapped_column(String(255))
    # Shopify `X-Shopify-Topic` (`customers/update`), Square `type` (`customer.updated`).
    topic: Mapped[str | None] = mapped_column(String(128))
    event_id: Mapped[str | None] = mapped_column(String(255))
    store_id: Mapped[int | None] = mapped_column(
        ForeignKey("stores.id", ondelete="CASCADE"), index=True
    )
    connection_id: Mapped[int | None] = mapped_column(
        ForeignKey("connections.id", ondelete="SET NULL"), index=True
    )
    # Shopify: the shop domain, lower-case; Square: the merchant id (as in `connections`).
    account: Mapped[str | None] = mapped_column(String(255))
    api_version: Mapped[str | None] = mapped_column(String(32))
    triggered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)


class OrderEarning(Base):
    """What one source order (Shopify) or payment (Square) earned in a store, and how it arrived.

    One row per `(store, source, external_id)`: the row lock taken on it (`SELECT … FOR UPDATE`)
    serialises everything done for that order, and its unique key makes concurrent first
    arrivals meet (the loser re-reads the winner's row). `outcome` is decided once, when the
    order is first seen paid with a known buyer (`earned`, or why not: `below_minimum`,
    `currency_mismatch`, `excluded`, `cancelled`); NULL while it is unpaid or its buyer is not
    known yet. `earned` is what it credited, `reversed` what refunds and cancellation took back
    (never more than `earned`), `shortfall` what could not be taken (balance already spent).
    `refunds` maps each refund id seen to `{"amount": minor units, "applied": bool, "at": …}`.
    `via` is how the order first arrived (`webhook` or `reconcile`): a `reconcile` row is an
    order the webhooks missed.
    """

    __tablename__ = "order_earnings"
    __table_args__ = (
        UniqueConstraint("store_id", "source", "external_id"),
        Index("ix_order_earnings_connection_id_first_seen_at", "connection_id", "first_seen_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"))
    connection_id: Mapped[int | None] = mapped_column(
        ForeignKey("connections.id", ondelete="SET NULL")
    )
    source: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str] = mapped_column(String(255))
    customer_external_id: Mapped[str | None] = mapped_column(String(255))
    customer_card_id: Mapped[int | None] = mapped_column(
        ForeignKey("customer_cards.id", ondelete="SET NULL"), index=True
    )
    currency: Mapped[str | None] = mapped_column(String(3))
    amount: Mapped[int | None] = mapped_column(BigInteger)
    paid: Mapped[bool] = mapped_column(Boolean, default=False)
    cancelled: Mapped[bool] = mapped_column(Boolean, default=False)
    outcome: Mapped[str | None] = mapped_column(String(32))
    earned: Mapped[int] = mapped_column(Integer, default=0)
    reversed: Mapped[int] = mapped_column(Integer, default=0)
    shortfall: Mapped[int] = mapped_column(Integer, default=0)
    refunds: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    via: Mapped[str] = mapped_column(String(16))
    source_updated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    first_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


__all__ = [
    "ApiToken",
    "Base",
    "CardTemplate",
    "Connection",
    "Customer",
    "CustomerCard",
    "ExternalReference",
    "IdempotentRequest",
    "OrderEarning",
    "OutboxMessage",
    "Reward",
    "StampLedgerEntry",
    "Store",
    "SyncConflict",
    "SyncRun",
    "SyncState",
    "WebhookEvent",
    "is_valid_id",
    "utcnow",
]
