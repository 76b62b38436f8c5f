"""Customer cards over HTTP (seed 002): index, show with rewards, stamp, redeem; GET /cards."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import Engine

from tests.api_helpers import (
    CUSTOMER_CARD_KEYS,
    StoreApi,
    assert_error,
    assert_invalid,
    ledger,
    ledger_sum,
    make_card,
    make_reward,
    outbox,
    store_api,
    stored_stamps,
)

if TYPE_CHECKING:
    from fastapi.testclient import TestClient


@pytest.fixture
def api(client: TestClient, make_store: Callable[..., tuple[int, str]]) -> StoreApi:
    return store_api(client, make_store())


@dataclass
class Setup:
    customer_id: int
    cc_id: int
    card_id: int
    rewards: dict[str, int]


@pytest.fixture
def enrolled(api: StoreApi, engine: Engine) -> Setup:
    """A customer holding a 6-stamp card (1 welcome stamp) with four rewards."""
    card_id = make_card(engine, api.id, name="Coffee", stamps_required=6, initial_stamps=1)
    rewards = {
        "cookie": make_reward(engine, card_id, name="Cookie", stamps=2),
        "coffee": make_reward(engine, card_id, name="Coffee", stamps=4),
        "retired": make_reward(engine, card_id, name="Retired", stamps=1, active=False),
        "big": make_reward(engine, card_id, name="Lunch", stamps=6),
    }
    body = api.create_customer({"first_name": "Card", "email": "card@example.com"}, card_id=card_id)
    return Setup(body["id"], body["customer_cards"][0]["id"], card_id, rewards)


def test_index_and_show(api: StoreApi, engine: Engine, enrolled: Setup) -> None:
    tea = make_card(engine, api.id, name="Tea", stamps_required=3)
    # Enrol into a second card through the create-as-upsert path (same reference).
    linked = api.patch(
        f"/customers/{enrolled.customer_id}",
        json={"customer": {"external_references": [{"source": "pos", "external_id": "c1"}]}},
    )
    assert linked.status_code == 200, linked.text
    again = api.post(
        "/customers",
        json={
            "customer": {"external_references": [{"source": "pos", "external_id": "c1"}]},
            "card_id": tea,
        },
    )
    assert again.status_code == 200, again.text
    index = api.get(f"/customers/{enrolled.customer_id}/customer_cards")
    assert index.status_code == 200
    cards = index.json()
    assert [c["card_id"] for c in cards] == [enrolled.card_id, tea]
    for cc in cards:
        assert set(cc) == CUSTOMER_CARD_KEYS
    assert cards == again.json()["customer_cards"]

    show = api.get(api.card_path(enrolled.customer_id, enrolled.cc_id))
    assert show.status_code == 200
    body = show.json()
    assert set(body) == CUSTOMER_CARD_KEYS | {"rewards"}
    assert {k: v for k, v in body.items() if k != "rewards"} == cards[0]
    assert body["rewards"] == []  # balance 1: the only 1-stamp reward is inactive

    api.stamp(enrolled.customer_id, enrolled.cc_id, 3)
    rewards = api.get(api.card_path(enrolled.customer_id, enrolled.cc_id)).json()["rewards"]
    assert rewards == [
        {"id": enrolled.rewards["cookie"], "name": "Cookie", "stamps": 2, "active": True},
        {"id": enrolled.rewards["coffee"], "name": "Coffee", "stamps": 4, "active": True},
    ]


def test_unknown_or_foreign_customer_cards_are_404(
    api: StoreApi, engine: Engine, enrolled: Setup
) -> None:
    other = api.create_customer(
        {"first_name": "Other", "email": "other@example.com"}, card_id=enrolled.card_id
    )
    other_cc = other["customer_cards"][0]["id"]
    for customer_id, cc_id in [
        (enrolled.customer_id, 999_999),
        (enrolled.customer_id, other_cc),  # another customer's card under this customer
        (other["id"], enrolled.cc_id),
        (999_999, enrolled.cc_id),
        (enrolled.customer_id, 2**64),
    ]:
        assert_error(api.get(api.card_path(customer_id, cc_id)), 404)
        assert_error(api.stamp(customer_id, cc_id, 1), 404)
        assert_error(api.redeem(customer_id, cc_id, enrolled.rewards["cookie"]), 404)
    assert_error(api.get("/customers/999999/customer_cards"), 404)
    assert_error(api.get("/customers/x/customer_cards/y"), 404)
    assert stored_stamps(engine, enrolled.cc_id) == 1
    assert stored_stamps(engine, other_cc) == 1


def test_stamp(api: StoreApi, engine: Engine, enrolled: Setup) -> None:
    response = api.stamp(enrolled.customer_id, enrolled.cc_id, 2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == CUSTOMER_CARD_KEYS | {"rewards"}
    assert (body["stamps"], body["status"]) == (3, "active")
    assert [r["name"] for r in body["rewards"]] == ["Cookie"]
    # Reaching stamps_required completes the card; going past it stays completed.
    body = api.stamp(enrolled.customer_id, enrolled.cc_id, 3).json()
    assert (body["stamps"], body["status"]) == (6, "completed")
    body = api.stamp(enrolled.customer_id, enrolled.cc_id, 1000).json()
    assert (body["stamps"], body["status"]) == (1006, "completed")
    assert api.get(api.card_path(enrolled.customer_id, enrolled.cc_id)).json()["stamps"] == 1006

    entries = ledger(engine, enrolled.cc_id)
    assert [(e.reason, e.delta, e.balance_after) for e in entries] == [
        ("welcome_bonus", 1, 1),
        ("stamp", 2, 3),
        ("stamp", 3, 6),
        ("stamp", 1000, 1006),
    ]
    for kind in ("pass_update", "push"):
        rows = outbox(engine, api.id, kind)
        assert [r.payload["ledger_entry_id"] for r in rows] == [e.id for e in entries[1:]]
        assert all(r.payload["customer_card_id"] == enrolled.cc_id for r in rows)


def test_stamp_skip_notifications(api: StoreApi, engine: Engine, enrolled: Setup) -> None:
    stamps = 1
    for flag in (True, 1, "true", "1"):
        response = api.stamp(
            enrolled.customer_id, enrolled.cc_id, 2, body={"skip_notifications": flag}
        )
        assert response.status_code == 200, (flag, response.text)
        stamps += 2
        assert response.json()["stamps"] == stamps
        assert outbox(engine, api.id) == [], flag
    # false/0 notify as usual.
    for i, off in enumerate([False, 0, "false", "0"], start=1):
        api.stamp(enrolled.customer_id, enrolled.cc_id, 1, body={"skip_notifications": off})
        assert len(outbox(engine, api.id, "push")) == i, off
        assert len(outbox(engine, api.id, "pass_update")) == i, off
    assert ledger_sum(engine, enrolled.cc_id) == stamps + 4


def test_stamp_validation(
    api: StoreApi, engine: Engine, enrolled: Setup, subtests: pytest.Subtests
) -> None:
    path = api.card_path(enrolled.customer_id, enrolled.cc_id, "stamp")
    for stamps in [0, 1001, -1, 2.5, "x", "", None, True, [1], {"n": 1}, 10**30]:
        with subtests.test(stamps=stamps):
            assert_invalid(api.post(path, json={"stamps": stamps}), "stamps")
    assert_invalid(api.post(path, json={}), "stamps")
    assert_invalid(api.post(path, json=[1]))
    assert_invalid(api.post(path, json={"stamps": 1, "skip_notifications": "perhaps"}))
    assert_error(api.post(path, content=b"{", headers={"Content-Type": "application/json"}), 400)
    assert stored_stamps(engine, enrolled.cc_id) == 1
    assert len(ledger(engine, enrolled.cc_id)) == 1
    assert outbox(engine, api.id) == []


def test_redeem(api: StoreApi, engine: Engine, enrolled: Setup) -> None:
    api.stamp(enrolled.customer_id, enrolled.cc_id, 5)  # 6: completed
    response = api.redeem(enrolled.customer_id, enrolled.cc_id, enrolled.rewards["coffee"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == CUSTOMER_CARD_KEYS | {"rewards"}
    assert (body["stamps"], body["status"]) == (2, "active")
    assert [r["name"] for r in body["rewards"]] == ["Cookie"]
    last = ledger(engine, enrolled.cc_id)[-1]
    assert (last.reason, last.delta, last.balance_after) == ("redeem", -4, 2)
    assert last.reward_id == enrolled.rewards["coffee"]
    assert [r.payload["ledger_entry_id"] for r in outbox(engine, api.id, "push")][-1] == last.id
    assert len(outbox(engine, api.id, "pass_update")) == 2

    # Short: 2 < 4 → 422, nothing changes.
    short = api.redeem(enrolled.customer_id, enrolled.cc_id, enrolled.rewards["coffee"])
    assert_invalid(short)
    # Inactive reward → 422 even though the balance covers it.
    assert_invalid(
        api.redeem(enrolled.customer_id, enrolled.cc_id, enrolled.rewards["retired"]), "reward_id"
    )
    assert stored_stamps(engine, enrolled.cc_id) == 2
    assert len(outbox(engine, api.id, "push")) == 2

    # Exactly the balance is enough, down to zero.
    body = api.redeem(enrolled.customer_id, enrolled.cc_id, enrolled.rewards["cookie"]).json()
    assert body["stamps"] == 0
    assert ledger_sum(engine, enrolled.cc_id) == 0


def test_redeem_skip_notifications(api: StoreApi, engine: Engine, enrolled: Setup) -> None:
    api.stamp(enrolled.customer_id, enrolled.cc_id, 3, body={"skip_notifications": True})
    response = api.post(
        api.card_path(enrolled.customer_id, enrolled.cc_id, "redeem"),
        json={"reward_id": enrolled.rewards["cookie"], "skip_notifications": True},
    )
    assert response.status_code == 200, response.text
    assert response.json()["stamps"] == 2
    assert outbox(engine, api.id) == []


def test_redeem_rewards_of_other_cards_or_unknown_are_404(
    api: StoreApi,
    engine: Engine,
    enrolled: Setup,
    client: TestClient,
    make_store: Callable[..., tuple[int, str]],
) -> None:
    api.stamp(enrolled.customer_id, enrolled.cc_id, 5)
    other_card = make_card(engine, api.id, name="Other")
    other_reward = make_reward(engine, other_card, stamps=1)
    other_store = store_api(client, make_store())
    foreign_card = make_card(engine, other_store.id)
    foreign_reward = make_reward(engine, foreign_card, stamps=1)
    for reward_id in (other_reward, foreign_reward, 999_999, 0, -3, 2**63, 10**40):
        response = api.redeem(enrolled.customer_id, enrolled.cc_id, reward_id)
        assert_error(response, 404)
    path = api.card_path(enrolled.customer_id, enrolled.cc_id, "redeem")
    for bad in ("x", None, True, 1.5, [enrolled.rewards["cookie"]]):
        assert_invalid(api.post(path, json={"reward_id": bad}), "reward_id")
    assert_invalid(api.post(path, json={}), "reward_id")
    assert stored_stamps(engine, enrolled.cc_id) == 6


def test_cards_scopes(api: StoreApi, engine: Engine) -> None:
    live = make_card(engine, api.id, name="Live", stamps_required=10, initial_stamps=2)
    reward = make_reward(engine, live, name="Free", stamps=5)
    old = make_card(engine, api.id, name="Old", archived=True)
    response = api.get("/cards")
    assert response.status_code == 200
    [card] = response.json()
    assert card["id"] == live
    assert card["name"] == "Live"
    assert card["stamps_required"] == 10
    assert card["initial_stamps"] == 2
    assert card["archived"] is False
    assert card["rewards"] == [{"id": reward, "name": "Free", "stamps": 5, "active": True}]
    assert [c["id"] for c in api.get("/cards", params={"scope": "active"}).json()] == [live]
    archived = api.get("/cards", params={"scope": "archived"}).json()
    assert [c["id"] for c in archived] == [old]
    assert archived[0]["archived"] is True
    assert [c["id"] for c in api.get("/cards", params={"scope": "all"}).json()] == [live, old]
    assert_invalid(api.get("/cards", params={"scope": "deleted"}), "scope")


def test_balance_equals_ledger_sum_after_a_run(api: StoreApi, engine: Engine) -> None:
    card_a = make_card(engine, api.id, name="A", stamps_required=8, initial_stamps=3)
    card_b = make_card(engine, api.id, name="B", stamps_required=5)
    rewards: dict[int, list[int]] = {}
    cost_of: dict[int, int] = {}
    for card, card_costs in {card_a: (1, 3, 8), card_b: (2, 5)}.items():
        for cost in card_costs:
            reward_id = make_reward(engine, card, stamps=cost)
            rewards.setdefault(card, []).append(reward_id)
            cost_of[reward_id] = cost
    holders: list[tuple[int, int, int]] = []  # (customer, customer card, card)
    for i, card in enumerate([card_a, card_b, card_a]):
        body = api.create_customer(
            {"first_name": f"R{i}", "email": f"r{i}@example.com"}, card_id=card
        )
        holders.append((body["id"], body["customer_cards"][0]["id"], card))
    rng = random.Random(20240601)
    expected = {cc: (3 if card == card_a else 0) for _, cc, card in holders}
    for _ in range(60):
        customer_id, cc, card = rng.choice(holders)
        if rng.random() < 0.55:
            n = rng.randint(1, 4)
            response = api.stamp(
                customer_id, cc, n, body={"skip_notifications": rng.random() < 0.5}
            )
            assert response.status_code == 200, response.text
            expected[cc] += n
        else:
            reward_id = rng.choice(rewards[card])
            cost = cost_of[reward_id]
            response = api.redeem(customer_id, cc, reward_id)
            if expected[cc] >= cost:
                assert response.status_code == 200, response.text
                expected[cc] -= cost
            else:
                assert_invalid(response)
        assert response.status_code != 200 or response.json()["stamps"] == expected[cc]
    for customer_id, cc, _ in holders:
        shown: dict[str, Any] = api.get(api.card_path(customer_id, cc)).json()
        assert shown["stamps"] == expected[cc]
        assert stored_stamps(engine, cc) == expected[cc]
        assert ledger_sum(engine, cc) == expected[cc]
        entries = ledger(engine, cc)
        assert [e.balance_after for e in entries] == [
            sum(e.delta for e in entries[: i + 1]) for i in range(len(entries))
        ]
