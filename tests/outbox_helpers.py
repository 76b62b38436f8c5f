"""Building blocks of the outbox tests: customers with cards (and their `card_links` rows),
connections to the fakes, settings, and an HTTP router over several in-process fakes."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from models.cards import create_card, enrol, queue_card_links
from models.connections import connect
from models.db import make_sessionmaker
from models.tables import Customer, ExternalReference, OutboxMessage
from worker.settings import Settings

WALLET = "https://wallet.example.com"
SHOP = "demo.myshopify.com"
MERCHANT = "MERCHANT1"
SHOPIFY_BASE = "https://fake-shopify.test"
SQUARE_BASE = "https://fake-square.test"
SMS_URL = "https://fake-sms.test/messages"
PASS_URL = "https://fake-pass.test/passes"
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def make_settings(db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "DATABASE_URL": db_url,
        "WALLET_BASE_URL": WALLET,
        "SMTP_FROM": "Loyalty <cards@shop.example.com>",
        "SHOPIFY_API_VERSION": "2025-07",
        **overrides,
    }
    return Settings(_env_file=None, **values)


def router(routes: Mapping[str, Callable[[httpx.Request], httpx.Response]]) -> httpx.MockTransport:
    """One MockTransport dispatching by host to the fakes' `handle` methods."""

    def handle(request: httpx.Request) -> httpx.Response:
        handler = routes.get(request.url.host)
        if handler is None:
            raise httpx.ConnectError(f"no fake at {request.url.host}", request=request)
        return handler(request)

    return httpx.MockTransport(handle)


def connect_source(
    engine: Engine,
    store_id: int,
    *,
    source: str,
    account: str,
    token: str,
    base_url: str,
    key: bytes,
    api_version: str | None = None,
) -> int:
    with make_sessionmaker(engine)() as s:
        connection, _ = connect(
            s,
            store_id=store_id,
            source=source,
            account=account,
            access_token=token,
            api_base_url=base_url,
            api_version=api_version,
            key=key,
        )
        s.commit()
        return connection.id


def add_customer_with_card(
    engine: Engine,
    store_id: int,
    *,
    email: str | None = None,
    phone: str | None = None,
    first_name: str = "Ada",
    references: Sequence[tuple[str, str]] = (),
    card_name: str = "Coffee Club",
) -> tuple[int, int]:
    """A customer enrolled on a card, their references, and the card_links row; (customer id,
    outbox row id)."""
    with make_sessionmaker(engine)() as s:
        card = create_card(s, store_id=store_id, name=card_name, stamps_required=10)
        customer = Customer(
            store_id=store_id,
            first_name=first_name,
            email=email,
            phone=phone,
            search_text="",
        )
        s.add(customer)
        s.flush()
        for source, external_id in references:
            s.add(
                ExternalReference(
                    store_id=store_id,
                    customer_id=customer.id,
                    source=source,
                    external_id=external_id,
                )
            )
        cc, _ = enrol(s, customer=customer, card=card)
        queue_card_links(s, customer=customer, customer_cards=[cc], wallet_base_url=WALLET)
        s.commit()
        row_id = s.scalar(
            select(OutboxMessage.id)
            .where(OutboxMessage.kind == "card_links", OutboxMessage.store_id == store_id)
            .order_by(OutboxMessage.id.desc())
            .limit(1)
        )
        assert row_id is not None
        return customer.id, row_id


def unique_email() -> str:
    return f"c{uuid.uuid4().hex[:10]}@example.com"


def row(engine: Engine, row_id: int) -> OutboxMessage:
    with Session(engine, expire_on_commit=False) as s:
        found = s.get(OutboxMessage, row_id)
        assert found is not None
        return found


def outbox_total(engine: Engine) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(func.count()).select_from(OutboxMessage)) or 0)


def channel_states(message: OutboxMessage) -> dict[str, str]:
    progress = (message.payload or {}).get("delivery") or {}
    return {k: v["state"] for k, v in progress.items()}
