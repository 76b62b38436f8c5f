"""`Idempotency-Key` on create, stamp and redeem: one application per key and store for 24 h."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import Engine, update

from models.tables import IdempotentRequest, StampLedgerEntry
from tests.api_helpers import (
    StoreApi,
    assert_invalid,
    count,
    customers_count,
    ledger,
    make_card,
    make_reward,
    outbox,
    session_of,
    store_api,
    stored_stamps,
)

if TYPE_CHECKING:
    from fastapi.testclient import TestClient
    from httpx import Response


REPLAYED = "Idempotent-Replayed"


@dataclass
class Holder:
    api: StoreApi
    customer_id: int
    cc_id: int
    reward_id: int


def make_holder(client: TestClient, engine: Engine, store: tuple[int, str]) -> Holder:
    api = store_api(client, store)
    card_id = make_card(engine, api.id, stamps_required=10, initial_stamps=1)
    reward_id = make_reward(engine, card_id, stamps=3)
    body = api.create_customer({"first_name": "Idem", "email": "idem@example.com"}, card_id=card_id)
    return Holder(api, body["id"], body["customer_cards"][0]["id"], reward_id)


@pytest.fixture
def holder(
    client: TestClient, engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> Holder:
    return make_holder(client, engine, make_store())


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def assert_replay(first: Response, again: Response) -> None:
    assert again.status_code == first.status_code
    assert again.json() == first.json()
    # Byte for byte, on PostgreSQL too (a JSONB column would have reordered the keys).
    assert again.content == first.content
    assert again.headers["content-type"] == "application/json"
    assert again.headers.get(REPLAYED) == "true"
    assert REPLAYED not in first.headers


def stamp_entries(engine: Engine, cc_id: int) -> list[StampLedgerEntry]:
    return [e for e in ledger(engine, cc_id) if e.reason != "welcome_bonus"]


def test_stamp_with_a_key_applies_once(holder: Holder, engine: Engine) -> None:
    h = holder
    first = h.api.stamp(h.customer_id, h.cc_id, 2, headers=key("stamp-1"))
    assert first.status_code == 200, first.text
    assert first.json()["stamps"] == 3
    for _ in range(3):
        assert_replay(first, h.api.stamp(h.customer_id, h.cc_id, 2, headers=key("stamp-1")))
    assert stored_stamps(engine, h.cc_id) == 3
    assert len(stamp_entries(engine, h.cc_id)) == 1
    assert len(outbox(engine, h.api.id, "push")) == 1
    # A different key is a different request; no key is always new.
    assert h.api.stamp(h.customer_id, h.cc_id, 2, headers=key("stamp-2")).json()["stamps"] == 5
    assert h.api.stamp(h.customer_id, h.cc_id, 2).json()["stamps"] == 7
    assert h.api.stamp(h.customer_id, h.cc_id, 2).json()["stamps"] == 9
    # The replay is the first response, not the current state.
    assert h.api.stamp(h.customer_id, h.cc_id, 2, headers=key("stamp-1")).json()["stamps"] == 3
    assert len(stamp_entries(engine, h.cc_id)) == 4


def test_redeem_with_a_key_applies_once(holder: Holder, engine: Engine) -> None:
    h = holder
    h.api.stamp(h.customer_id, h.cc_id, 8)  # 9 stamps: enough for three redeems
    first = h.api.redeem(h.customer_id, h.cc_id, h.reward_id, headers=key("redeem-1"))
    assert first.status_code == 200, first.text
    assert first.json()["stamps"] == 6
    assert_replay(first, h.api.redeem(h.customer_id, h.cc_id, h.reward_id, headers=key("redeem-1")))
    assert stored_stamps(engine, h.cc_id) == 6
    assert [e.reason for e in stamp_entries(engine, h.cc_id)] == ["stamp", "redeem"]


def test_create_with_a_key_applies_once(holder: Holder, engine: Engine) -> None:
    h = holder
    body = {
        "customer": {
            "first_name": "Once",
            "email": "once@example.com",
            "metadata": {"n": 1},
        },
        "send_card_links": True,
    }
    first = h.api.post("/customers", json=body, headers=key("create-1"))
    assert first.status_code == 201, first.text
    again = h.api.post("/customers", json=body, headers=key("create-1"))
    assert_replay(first, again)
    assert customers_count(engine, h.api.id) == 2  # the fixture's customer + this one
    # Without the key the same body is a second create, which the unique email refuses.
    assert_invalid(h.api.post("/customers", json=body), "email")


def test_failed_requests_are_not_remembered(holder: Holder, engine: Engine) -> None:
    h = holder
    short = h.api.redeem(h.customer_id, h.cc_id, h.reward_id, headers=key("retry-me"))
    assert_invalid(short)
    h.api.stamp(h.customer_id, h.cc_id, 5)
    retried = h.api.redeem(h.customer_id, h.cc_id, h.reward_id, headers=key("retry-me"))
    assert retried.status_code == 200, retried.text
    assert REPLAYED not in retried.headers
    assert retried.json()["stamps"] == 3


def test_same_key_with_another_request_is_422(holder: Holder, engine: Engine) -> None:
    h = holder
    assert h.api.stamp(h.customer_id, h.cc_id, 2, headers=key("k")).status_code == 200
    assert_invalid(h.api.stamp(h.customer_id, h.cc_id, 3, headers=key("k")), "idempotency_key")
    assert_invalid(
        h.api.stamp(h.customer_id, h.cc_id, 2, headers=key("k"), body={"skip_notifications": True}),
        "idempotency_key",
    )
    # Same body on another endpoint or card is another request too.
    assert_invalid(
        h.api.redeem(h.customer_id, h.cc_id, h.reward_id, headers=key("k")), "idempotency_key"
    )
    create = {"customer": {"first_name": "K", "email": "k@example.com"}}
    assert_invalid(h.api.post("/customers", json=create, headers=key("k")), "idempotency_key")
    assert stored_stamps(engine, h.cc_id) == 3
    assert customers_count(engine, h.api.id) == 1


def test_invalid_keys_are_422(holder: Holder, engine: Engine) -> None:
    h = holder
    for bad in ("", "x" * 256, "tab\there"):
        response = h.api.stamp(h.customer_id, h.cc_id, 1, headers=key(bad))
        assert_invalid(response, "idempotency_key")
    # The longest accepted key round-trips on both databases.
    longest = h.api.stamp(h.customer_id, h.cc_id, 1, headers=key("k" * 255))
    assert longest.status_code == 200, longest.text
    assert_replay(longest, h.api.stamp(h.customer_id, h.cc_id, 1, headers=key("k" * 255)))
    assert stored_stamps(engine, h.cc_id) == 2


def test_keys_are_per_store(
    holder: Holder, client: TestClient, engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    other = make_holder(client, engine, make_store())
    for h in (holder, other):
        response = h.api.stamp(h.customer_id, h.cc_id, 4, headers=key("shared-key"))
        assert response.status_code == 200, response.text
        assert REPLAYED not in response.headers
        assert response.json()["stamps"] == 5
    create = {"customer": {"first_name": "Same", "email": "same@example.com"}}
    for h in (holder, other):
        response = h.api.post("/customers", json=create, headers=key("shared-create"))
        assert response.status_code == 201, response.text
        assert REPLAYED not in response.headers
    assert count(engine, IdempotentRequest) == 4


def test_a_key_is_fresh_again_after_24_hours(holder: Holder, engine: Engine) -> None:
    h = holder
    first = h.api.stamp(h.customer_id, h.cc_id, 2, headers=key("daily"))
    create = {"customer": {"first_name": "Daily", "email": "daily@example.com"}}
    created = h.api.post("/customers", json=create, headers=key("daily-create"))
    assert created.status_code == 201

    def age(hours: float) -> None:
        with session_of(engine) as s:
            s.execute(
                update(IdempotentRequest).values(
                    created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
                )
            )
            s.commit()

    age(23.5)  # still within the window
    assert_replay(first, h.api.stamp(h.customer_id, h.cc_id, 2, headers=key("daily")))
    assert stored_stamps(engine, h.cc_id) == 3

    age(24.5)
    again = h.api.stamp(h.customer_id, h.cc_id, 2, headers=key("daily"))
    assert again.status_code == 200, again.text
    assert REPLAYED not in again.headers
    assert again.json()["stamps"] == 5  # applied again, not a silent no-op
    assert stored_stamps(engine, h.cc_id) == 5
    assert len(stamp_entries(engine, h.cc_id)) == 2
    # The create key is fresh too: the body now hits the unique email, as a new request would.
    assert_invalid(h.api.post("/customers", json=create, headers=key("daily-create")), "email")
    # And the fresh key is remembered again.
    assert_replay(again, h.api.stamp(h.customer_id, h.cc_id, 2, headers=key("daily")))
    assert stored_stamps(engine, h.cc_id) == 5


def run_together(n: int, call: Callable[[int], Response]) -> list[Response]:
    """Run `call(i)` in `n` threads released at the same moment; the handlers run concurrently
    in the app's thread pool, each with its own database connection."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the test thread
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_concurrent_retries_with_one_key_apply_once(holder: Holder, engine: Engine) -> None:
    h = holder
    responses = run_together(
        8, lambda _i: h.api.stamp(h.customer_id, h.cc_id, 3, headers=key("burst"))
    )
    assert {r.status_code for r in responses} == {200}, [r.text for r in responses]
    assert all(r.json() == responses[0].json() for r in responses)
    assert sum(REPLAYED not in r.headers for r in responses) == 1
    assert stored_stamps(engine, h.cc_id) == 4
    assert len(stamp_entries(engine, h.cc_id)) == 1
    assert len(outbox(engine, h.api.id, "push")) == 1


def test_concurrent_redeems_cannot_overdraw(holder: Holder, engine: Engine) -> None:
    h = holder
    h.api.stamp(h.customer_id, h.cc_id, 4)  # 5 stamps, reward costs 3: room for one redeem
    responses = run_together(
        8, lambda i: h.api.redeem(h.customer_id, h.cc_id, h.reward_id, headers=key(f"r{i}"))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [422] * 7, [r.text for r in responses]
    assert stored_stamps(engine, h.cc_id) == 2
    assert [e.reason for e in stamp_entries(engine, h.cc_id)] == ["stamp", "redeem"]
