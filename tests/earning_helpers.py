"""Shared set-up for the stamps-from-orders tests: a store, a card, connections with a rule."""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from connectors.records import ForeignCustomer, ForeignOrder, ForeignRefund
from models import cards
from models.accounts import create_store
from models.connections import connect
from models.db import make_sessionmaker
from models.earning import configure_earning
from models.tables import (
    CustomerCard,
    ExternalReference,
    OrderEarning,
    OutboxMessage,
    StampLedgerEntry,
)

KEY = Fernet.generate_key()
T0 = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)


def setup_store(
    engine: Engine,
    *,
    source: str = "shopify",
    earn: dict[str, Any] | None = None,
    min_amount: int | None = None,
    currency: str | None = None,
    initial_stamps: int = 0,
    api_base_url: str | None = None,
    key: bytes = KEY,
) -> tuple[int, int, int]:
    """(store_id, card_id, connection_id) with an earning rule on the connection."""
    with make_sessionmaker(engine)() as s:
        store, _ = create_store(s, name="Coffee", country="US")
        card = cards.create_card(
            s,
            store_id=store.id,
            name="Coffee card",
            stamps_required=10,
            initial_stamps=initial_stamps,
        )
        connection, _ = connect(
            s,
            store_id=store.id,
            source=source,
            account="shop-1.myshopify.com" if source == "shopify" else "MERCHANT1",
            access_token="tok",
            api_base_url=api_base_url,
            api_version=None,
            key=key,
        )
        configure_earning(
            s,
            connection.id,
            card.id,
            earn or {"kind": "per_order", "stamps": 1},
            min_amount,
            currency,
        )
        s.commit()
        return store.id, card.id, connection.id


def shopify_order(
    order_id: int,
    *,
    customer_id: int | None = 207119551,
    amount: int = 1999,
    currency: str = "USD",
    paid: bool = True,
    cancelled: bool = False,
    refunds: tuple[ForeignRefund, ...] = (),
    updated_at: dt.datetime = T0,
    email: str | None = None,
) -> ForeignOrder:
    customer = (
        ForeignCustomer(
            source="shopify",
            external_id=str(customer_id),
            first_name="Bob",
            last_name="Norman",
            email=email or f"bob{customer_id}@mail.example.com",
            source_updated_at=updated_at,
        )
        if customer_id is not None
        else None
    )
    return ForeignOrder(
        source="shopify",
        external_id=str(order_id),
        kind="order",
        customer_external_id=str(customer_id) if customer_id is not None else None,
        customer=customer,
        currency=currency,
        amount=amount,
        paid=paid,
        cancelled=cancelled,
        status="paid" if paid else "pending",
        source_updated_at=updated_at,
        refunds=refunds,
    )


def shopify_refund(
    refund_id: int, order_id: int, amount: int, *, at: dt.datetime = T0
) -> ForeignRefund:
    return ForeignRefund(
        source="shopify",
        external_id=str(refund_id),
        order_external_id=str(order_id),
        amount=amount,
        currency="USD",
        created_at=at,
        updated_at=at,
    )


def ledger(session: Session, store_id: int) -> list[tuple[str, int, str]]:
    """(idempotency key, delta, reason) of the store's entries, in key order."""
    session.expire_all()
    rows = session.execute(
        select(StampLedgerEntry.idempotency_key, StampLedgerEntry.delta, StampLedgerEntry.reason)
        .where(StampLedgerEntry.store_id == store_id)
        .order_by(StampLedgerEntry.idempotency_key)
    ).all()
    session.rollback()  # SQLite: never hold the write lock other sessions need
    return [(k, d, r) for k, d, r in rows]


def balance_of(session: Session, store_id: int, source: str, customer_external_id: str) -> int:
    """The balance of the card held by the customer of a source reference (0 without a card)."""
    session.expire_all()
    customer_id = session.scalar(
        select(ExternalReference.customer_id).where(
            ExternalReference.store_id == store_id,
            ExternalReference.source == source,
            ExternalReference.external_id == customer_external_id,
        )
    )
    stamps = session.scalar(
        select(CustomerCard.stamps).where(CustomerCard.customer_id == customer_id)
    )
    session.rollback()
    return int(stamps or 0)


def assert_balances_match_ledger(session: Session, store_id: int) -> None:
    session.expire_all()
    for cc in session.scalars(select(CustomerCard).where(CustomerCard.store_id == store_id)):
        total = session.scalar(
            select(func.coalesce(func.sum(StampLedgerEntry.delta), 0)).where(
                StampLedgerEntry.customer_card_id == cc.id
            )
        )
        assert cc.stamps == total, (cc.id, cc.stamps, total)
    session.rollback()


def outbox_count(session: Session, store_id: int) -> int:
    count = session.scalar(
        select(func.count()).select_from(OutboxMessage).where(OutboxMessage.store_id == store_id)
    )
    session.rollback()
    return int(count or 0)


def earning_row(session: Session, store_id: int, external_id: str) -> OrderEarning:
    session.expire_all()
    row = session.scalar(
        select(OrderEarning).where(
            OrderEarning.store_id == store_id, OrderEarning.external_id == external_id
        )
    )
    assert row is not None
    session.expunge(row)
    session.rollback()
    return row
