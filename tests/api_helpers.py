"""Helpers shared by the HTTP tests of the REST API (tests/test_api_*.py).

Everything goes through the real app (`client` fixture); the database is read directly only to
check what the API cannot show (ledger, outbox, idempotency rows, row counts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from httpx import Response
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from models import cards as card_ops
from models.db import make_sessionmaker
from models.tables import (
    Customer,
    CustomerCard,
    ExternalReference,
    OutboxMessage,
    StampLedgerEntry,
)

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

# Starlette warns (as a UserWarning subclass) when its TestClient is imported with httpx, which the
# `DeprecationWarning` filter in pyproject.toml does not catch; every API test module applies this.
WALLET_BASE_URL = "https://wallet.example.com"

CUSTOMER_KEYS = {
    "id",
    "first_name",
    "last_name",
    "email",
    "phone",
    "birthday",
    "metadata",
    "external_references",
    "customer_cards",
    "created_at",
    "updated_at",
}
OPTIONAL_CUSTOMER_KEYS = {"state"}
CUSTOMER_CARD_KEYS = {
    "id",
    "card_id",
    "card_name",
    "stamps",
    "stamps_required",
    "status",
    "code",
    "wallet_pass_installed",
    "apple_wallet_url",
    "google_wallet_url",
    "created_at",
    "updated_at",
}
PASS_URL = re.compile(r"^https://wallet\.example\.com/passes/([A-Za-z0-9_-]{16,})/(apple|google)$")
LINK = re.compile(r'<([^>]+)>;\s*rel="([a-z]+)"')


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class StoreApi:
    """One store's view of the API: its id, its token and the shared test client."""

    client: TestClient
    id: int
    token: str

    def url(self, path: str = "") -> str:
        return f"/api/v1/accounts/{self.id}{path}"

    def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> Response:
        return self.client.request(
            method, self.url(path), headers={**auth(self.token), **(headers or {})}, **kwargs
        )

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Response:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Response:
        return self.request("PATCH", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Response:
        return self.request("PUT", path, **kwargs)

    # -- shortcuts ---------------------------------------------------------------------------

    def create_customer(self, customer: dict[str, Any], **extra: Any) -> dict[str, Any]:
        response = self.post("/customers", json={"customer": customer, **extra})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def card_path(self, customer_id: int, customer_card_id: int, action: str = "") -> str:
        path = f"/customers/{customer_id}/customer_cards/{customer_card_id}"
        return f"{path}/{action}" if action else path

    def stamp(self, customer_id: int, cc_id: int, stamps: int = 1, **kwargs: Any) -> Response:
        body = {"stamps": stamps, **kwargs.pop("body", {})}
        return self.post(self.card_path(customer_id, cc_id, "stamp"), json=body, **kwargs)

    def redeem(self, customer_id: int, cc_id: int, reward_id: int, **kwargs: Any) -> Response:
        return self.post(
            self.card_path(customer_id, cc_id, "redeem"), json={"reward_id": reward_id}, **kwargs
        )


def store_api(client: TestClient, store: tuple[int, str]) -> StoreApi:
    return StoreApi(client=client, id=store[0], token=store[1])


def session_of(engine: Engine) -> Session:
    return make_sessionmaker(engine)()


def make_card(
    engine: Engine,
    store_id: int,
    *,
    name: str = "Coffee",
    stamps_required: int = 10,
    initial_stamps: int = 0,
    archived: bool = False,
) -> int:
    with session_of(engine) as s:
        card = card_ops.create_card(
            s,
            store_id=store_id,
            name=name,
            stamps_required=stamps_required,
            initial_stamps=initial_stamps,
        )
        if archived:
            card_ops.archive_card(s, card_id=card.id)
        s.commit()
        return card.id


def make_reward(
    engine: Engine, card_id: int, *, name: str = "Free coffee", stamps: int = 3, active: bool = True
) -> int:
    with session_of(engine) as s:
        reward = card_ops.create_reward(s, card_id=card_id, name=name, stamps=stamps, active=active)
        s.commit()
        return reward.id


def count(engine: Engine, model: Any, *where: Any) -> int:
    with session_of(engine) as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def customers_count(engine: Engine, store_id: int) -> int:
    return count(engine, Customer, Customer.store_id == store_id)


def references_count(engine: Engine, store_id: int) -> int:
    return count(engine, ExternalReference, ExternalReference.store_id == store_id)


def ledger(engine: Engine, customer_card_id: int) -> list[StampLedgerEntry]:
    with session_of(engine) as s:
        return list(
            s.scalars(
                select(StampLedgerEntry)
                .where(StampLedgerEntry.customer_card_id == customer_card_id)
                .order_by(StampLedgerEntry.id)
            ).all()
        )


def ledger_sum(engine: Engine, customer_card_id: int) -> int:
    return sum(e.delta for e in ledger(engine, customer_card_id))


def stored_stamps(engine: Engine, customer_card_id: int) -> int:
    with session_of(engine) as s:
        value = s.scalar(select(CustomerCard.stamps).where(CustomerCard.id == customer_card_id))
        assert value is not None
        return int(value)


def outbox(engine: Engine, store_id: int, kind: str | None = None) -> list[OutboxMessage]:
    with session_of(engine) as s:
        query = select(OutboxMessage).where(OutboxMessage.store_id == store_id)
        if kind is not None:
            query = query.where(OutboxMessage.kind == kind)
        return list(s.scalars(query.order_by(OutboxMessage.id)).all())


def links(response: Response) -> dict[str, str]:
    """The `Link` header as {rel: url}."""
    return {rel: url for url, rel in LINK.findall(response.headers.get("Link", ""))}


def assert_error(response: Response, status: int) -> None:
    """A non-validation error: `{"error": "<message>"}` and nothing else."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str)
    assert body["error"]


def assert_invalid(response: Response, *fields: str) -> dict[str, list[str]]:
    """A 422 `{"errors": {field: [messages]}}` naming (at least) `fields`."""
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"errors"}, body
    errors: dict[str, list[str]] = body["errors"]
    assert isinstance(errors, dict)
    for name, messages in errors.items():
        assert isinstance(name, str)
        assert messages
        assert all(isinstance(m, str) and m for m in messages), errors
    for name in fields:
        assert name in errors, (name, errors)
    return errors
