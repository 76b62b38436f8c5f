"""The API wakes the outbox workers right after a commit that queued deliveries (enrolment card
links, a stamp's pass update), once per such commit, and never for requests that queued nothing
or rolled back."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from api.app import create_app
from models.cards import create_card
from models.tables import OutboxMessage
from worker.settings import Settings


def test_commits_that_queue_outbox_rows_wake_the_outbox(
    db_url: str, engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, token = make_store()
    with Session(engine) as s:
        card = create_card(s, store_id=store_id, name="Coffee", stamps_required=10)
        s.commit()
        card_id = card.id
    wakes: list[int] = []
    app = create_app(
        Settings(DATABASE_URL=db_url), engine=engine, on_outbox_committed=lambda: wakes.append(1)
    )
    auth = {"Authorization": f"Bearer {token}"}
    base = f"/api/v1/accounts/{store_id}/customers"
    with TestClient(app) as client:
        # Nothing queued: a plain read and a customer created without card links.
        assert client.get(base, headers=auth).status_code == 200
        plain = client.post(
            base,
            headers=auth,
            json={"customer": {"first_name": "Plain", "email": "plain@example.com"}},
        )
        assert plain.status_code == 201, plain.text
        assert wakes == []
        # A rejected request rolls back: no wake.
        bad = client.post(
            base, headers=auth, json={"customer": {"first_name": ""}, "card_id": card_id}
        )
        assert bad.status_code == 422
        assert wakes == []
        # Enrolment queues the card links: one wake after its commit.
        enrolled = client.post(
            base,
            headers=auth,
            json={
                "customer": {"first_name": "Ana", "email": "ana@example.com"},
                "card_id": card_id,
                "send_card_links": True,
            },
        )
        assert enrolled.status_code == 201, enrolled.text
        assert wakes == [1]
        customer = enrolled.json()
        cc = customer["customer_cards"][0]["id"]
        stamped = client.post(
            f"{base}/{customer['id']}/customer_cards/{cc}/stamp",
            headers={**auth, "Idempotency-Key": "wake-1"},
            json={"stamps": 1},
        )
        assert stamped.status_code in (200, 201), stamped.text
        assert wakes == [1, 1]  # the pass update and push
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(OutboxMessage)) >= 3
