"""models/cards.py on SQLite and PostgreSQL: templates, rewards, enrolment, ledger, outbox."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from models import cards as cards_module
from models.cards import (
    MAX_STAMPS_PER_CALL,
    add_stamps,
    archive_card,
    card_status,
    create_card,
    create_reward,
    enrol,
    generate_code,
    get_customer_card,
    ledger_sum,
    list_cards,
    queue_card_links,
    redeem,
    redeemable_rewards,
    resolve_enrolment_card,
    wallet_urls,
)
from models.customers import CustomerFields, create_customer, update_customer
from models.db import make_sessionmaker
from models.errors import NotFound, ValidationFailed
from models.tables import (
    CardTemplate,
    Customer,
    CustomerCard,
    OutboxMessage,
    StampLedgerEntry,
)

MakeStore = Callable[..., tuple[int, str]]
_counter = itertools.count()


@pytest.fixture
def store_id(make_store: MakeStore) -> int:
    return make_store()[0]


def _customer(session: Session, store_id: int, **fields: Any) -> Customer:
    n = next(_counter)
    values: dict[str, Any] = {"first_name": f"C{n}", "email": f"c{n}@example.com", **fields}
    return create_customer(session, store_id=store_id, fields=CustomerFields(**values)).customer


def _card(
    session: Session, store_id: int, required: int = 10, initial: int = 0, name: str = "Coffee"
) -> CardTemplate:
    return create_card(
        session, store_id=store_id, name=name, stamps_required=required, initial_stamps=initial
    )


def _enrolled(
    session: Session, store_id: int, required: int = 10, initial: int = 0
) -> CustomerCard:
    card = _card(session, store_id, required, initial)
    cc, created = enrol(session, customer=_customer(session, store_id), card=card)
    assert created
    return cc


def _ledger(session: Session, cc: CustomerCard) -> list[StampLedgerEntry]:
    return list(
        session.scalars(
            select(StampLedgerEntry)
            .where(StampLedgerEntry.customer_card_id == cc.id)
            .order_by(StampLedgerEntry.id)
        ).all()
    )


def _outbox(session: Session, store_id: int, kind: str | None = None) -> list[OutboxMessage]:
    query = select(OutboxMessage).where(OutboxMessage.store_id == store_id)
    if kind is not None:
        query = query.where(OutboxMessage.kind == kind)
    return list(session.scalars(query.order_by(OutboxMessage.id)).all())


def _db_balance(session: Session, cc: CustomerCard) -> int:
    return int(session.scalar(select(CustomerCard.stamps).where(CustomerCard.id == cc.id)) or 0)


# --- card templates -----------------------------------------------------------------------------


def test_card_template_bounds_accepted(session: Session, store_id: int) -> None:
    cases = [(1, 0), (18, 0), (18, 17), (10, 9), (2, 1)]
    ids = [_card(session, store_id, required, initial).id for required, initial in cases]
    session.commit()
    session.expire_all()
    for card_id, (required, initial) in zip(ids, cases, strict=True):
        stored = session.get(CardTemplate, card_id)
        assert stored is not None
        assert (stored.stamps_required, stored.initial_stamps) == (required, initial)
        assert stored.archived_at is None


def test_card_template_bounds_rejected(session: Session, store_id: int) -> None:
    cases = [
        (0, 0, "stamps_required"),
        (19, 0, "stamps_required"),
        (-1, 0, "stamps_required"),
        (1, 1, "initial_stamps"),
        (10, 10, "initial_stamps"),
        (18, 18, "initial_stamps"),
        (10, -1, "initial_stamps"),
    ]
    for required, initial, field in cases:
        with pytest.raises(ValidationFailed) as info:
            _card(session, store_id, required, initial)
        assert list(info.value.errors) == [field], (required, initial)
    assert list_cards(session, store_id=store_id, scope="all") == []


def test_card_name_required(session: Session, store_id: int) -> None:
    with pytest.raises(ValidationFailed) as info:
        _card(session, store_id, name="  ")
    assert list(info.value.errors) == ["name"]


def test_card_for_unknown_store(session: Session) -> None:
    with pytest.raises(NotFound):
        create_card(session, store_id=999_999, name="x", stamps_required=5)


def test_list_cards_scopes(session: Session, make_store: MakeStore) -> None:
    store_id, _ = make_store()
    other, _ = make_store()
    live = _card(session, store_id, name="Live")
    old = _card(session, store_id, name="Old")
    _card(session, other, name="Other store")
    archive_card(session, card_id=old.id)
    first_archived_at = old.archived_at
    archive_card(session, card_id=old.id)  # archiving twice keeps the first time
    session.commit()
    assert old.archived_at == first_archived_at
    assert [c.id for c in list_cards(session, store_id=store_id)] == [live.id]
    assert [c.id for c in list_cards(session, store_id=store_id, scope="active")] == [live.id]
    assert [c.id for c in list_cards(session, store_id=store_id, scope="archived")] == [old.id]
    assert [c.id for c in list_cards(session, store_id=store_id, scope="all")] == [live.id, old.id]


def test_archived_card_cannot_be_enrolled_into(session: Session, store_id: int) -> None:
    card = _card(session, store_id)
    archive_card(session, card_id=card.id)
    with pytest.raises(ValidationFailed) as info:
        resolve_enrolment_card(session, store_id=store_id, card_id=card.id)
    assert list(info.value.errors) == ["card_id"]


def test_enrolment_card_of_another_store_is_rejected(
    session: Session, make_store: MakeStore
) -> None:
    a, _ = make_store()
    b, _ = make_store()
    card_b = _card(session, b)
    assert resolve_enrolment_card(session, store_id=b, card_id=card_b.id).id == card_b.id
    for bad in (card_b.id, "1", True, None, 1.0):
        with pytest.raises(ValidationFailed) as info:
            resolve_enrolment_card(session, store_id=a, card_id=bad)
        assert list(info.value.errors) == ["card_id"]


# --- rewards ------------------------------------------------------------------------------------


def test_reward_cost_bounds(session: Session, store_id: int) -> None:
    card = _card(session, store_id, required=10)
    for cost in (1, 10):
        reward = create_reward(session, card_id=card.id, name="Free coffee", stamps=cost)
        assert (reward.stamps, reward.active, reward.store_id) == (cost, True, store_id)
    for cost in (0, 11, -3):
        with pytest.raises(ValidationFailed) as info:
            create_reward(session, card_id=card.id, name="Free coffee", stamps=cost)
        assert list(info.value.errors) == ["stamps"], cost
    with pytest.raises(ValidationFailed) as info:
        create_reward(session, card_id=card.id, name=" ", stamps=1)
    assert list(info.value.errors) == ["name"]


def test_reward_active_flag_and_redeemable_rewards(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id, required=10)
    cheap = create_reward(session, card_id=cc.card_id, name="Cookie", stamps=3)
    dear = create_reward(session, card_id=cc.card_id, name="Coffee", stamps=8)
    off = create_reward(session, card_id=cc.card_id, name="Old", stamps=1, active=False)
    session.commit()
    assert off.active is False
    assert redeemable_rewards(session, cc) == []
    add_stamps(session, customer_card=cc, stamps=3)
    assert [r.id for r in redeemable_rewards(session, cc)] == [cheap.id]
    add_stamps(session, customer_card=cc, stamps=5)
    assert [r.id for r in redeemable_rewards(session, cc)] == [cheap.id, dear.id]


def test_reward_for_unknown_card(session: Session) -> None:
    with pytest.raises(NotFound):
        create_reward(session, card_id=999_999, name="x", stamps=1)


# --- enrolment ----------------------------------------------------------------------------------


def _ean13_ok(code: str) -> bool:
    digits = [int(d) for d in code]
    return sum(d * (3 if i % 2 else 1) for i, d in enumerate(digits)) % 10 == 0


def test_generate_code_is_a_valid_ean13() -> None:
    for _ in range(200):
        code = generate_code()
        assert re.fullmatch(r"\d{13}", code)
        assert _ean13_ok(code)


def test_enrolment_creates_a_customer_card(session: Session, store_id: int) -> None:
    card = _card(session, store_id, required=8)
    customer = _customer(session, store_id)
    cc, created = enrol(session, customer=customer, card=card)
    session.commit()
    assert created is True
    assert (cc.store_id, cc.customer_id, cc.card_id, cc.stamps) == (
        store_id,
        customer.id,
        card.id,
        0,
    )
    assert re.fullmatch(r"\d{13}", cc.code)
    assert _ean13_ok(cc.code)
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", cc.pass_token)
    assert cc.wallet_pass_installed is False
    assert [c.id for c in customer.customer_cards] == [cc.id]
    assert _ledger(session, cc) == []
    assert card_status(cc.stamps, card.stamps_required) == "active"
    urls = wallet_urls(cc.pass_token, wallet_base_url="https://wallet.example.com/")
    assert urls == {
        "apple_wallet_url": f"https://wallet.example.com/passes/{cc.pass_token}/apple",
        "google_wallet_url": f"https://wallet.example.com/passes/{cc.pass_token}/google",
    }
    loaded = get_customer_card(
        session, store_id=store_id, customer_id=customer.id, customer_card_id=cc.id
    )
    assert loaded.id == cc.id


def test_enrolling_twice_returns_the_same_card(session: Session, store_id: int) -> None:
    card = _card(session, store_id, required=8, initial=2)
    customer = _customer(session, store_id)
    first, created = enrol(session, customer=customer, card=card)
    session.commit()
    again, created_again = enrol(session, customer=customer, card=card)
    session.commit()
    assert (created, created_again) == (True, False)
    assert again.id == first.id
    assert again.code == first.code
    count = session.scalar(
        select(func.count())
        .select_from(CustomerCard)
        .where(CustomerCard.customer_id == customer.id)
    )
    assert count == 1
    assert [e.reason for e in _ledger(session, first)] == ["welcome_bonus"]  # applied once
    # A second template is a second card.
    other, created_other = enrol(session, customer=customer, card=_card(session, store_id))
    assert created_other is True
    assert other.id != first.id


def test_codes_and_tokens_are_unique(session: Session, store_id: int) -> None:
    card = _card(session, store_id)
    ccs = [enrol(session, customer=_customer(session, store_id), card=card)[0] for _ in range(30)]
    session.commit()
    assert len({cc.code for cc in ccs}) == 30
    assert len({cc.pass_token for cc in ccs}) == 30


def test_code_collision_draws_another_code(
    session: Session, make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_id, _ = make_store()
    other_store, _ = make_store()
    card = _card(session, store_id)
    first, _ = enrol(session, customer=_customer(session, store_id), card=card)
    session.commit()
    codes = iter([first.code, first.code, "1234567890128"])
    monkeypatch.setattr(cards_module, "generate_code", lambda: next(codes))
    second, created = enrol(session, customer=_customer(session, store_id), card=card)
    session.commit()
    assert created is True
    assert second.code == "1234567890128"
    # Codes are unique per store: another store may hold the same code.
    monkeypatch.setattr(cards_module, "generate_code", lambda: first.code)
    card_b = _card(session, other_store)
    third, _ = enrol(session, customer=_customer(session, other_store), card=card_b)
    session.commit()
    assert third.code == first.code


def test_initial_stamps_are_a_welcome_bonus(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id, required=10, initial=3)
    session.commit()
    entries = _ledger(session, cc)
    assert [(e.reason, e.delta, e.balance_after) for e in entries] == [("welcome_bonus", 3, 3)]
    assert cc.stamps == 3
    assert _db_balance(session, cc) == 3 == ledger_sum(session, customer_card_id=cc.id)


# --- stamps -------------------------------------------------------------------------------------


def test_add_stamps_bounds_rejected(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id)
    for stamps in (0, -1, MAX_STAMPS_PER_CALL + 1, True, "3", 1.5, None):
        with pytest.raises(ValidationFailed) as info:
            add_stamps(session, customer_card=cc, stamps=stamps)
        assert list(info.value.errors) == ["stamps"], stamps
    assert _ledger(session, cc) == []
    assert _db_balance(session, cc) == 0


def test_add_stamps_bounds_accepted(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id, required=10)
    add_stamps(session, customer_card=cc, stamps=1)
    result = add_stamps(session, customer_card=cc, stamps=MAX_STAMPS_PER_CALL)
    session.commit()
    assert result.applied is True
    assert result.customer_card.stamps == 1 + MAX_STAMPS_PER_CALL
    assert (result.entry.delta, result.entry.balance_after, result.entry.reason) == (
        MAX_STAMPS_PER_CALL,
        1 + MAX_STAMPS_PER_CALL,
        "stamp",
    )
    assert _db_balance(session, cc) == ledger_sum(session, customer_card_id=cc.id)


@pytest.mark.parametrize(
    ("stamps", "required", "status"),
    [(0, 10, "active"), (9, 10, "active"), (10, 10, "completed"), (11, 10, "completed")],
)
def test_card_status(stamps: int, required: int, status: str) -> None:
    assert card_status(stamps, required) == status


def test_status_follows_the_balance(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id, required=5, initial=1)
    reward = create_reward(session, card_id=cc.card_id, name="Free", stamps=2)
    statuses = []
    for op in ("stamp3", "stamp1", "redeem", "stamp1"):
        if op.startswith("stamp"):
            add_stamps(session, customer_card=cc, stamps=int(op[-1]))
        else:
            redeem(session, customer_card=cc, reward_id=reward.id)
        statuses.append((cc.stamps, card_status(cc.stamps, cc.card.stamps_required)))
    assert statuses == [(4, "active"), (5, "completed"), (3, "active"), (4, "active")]


def test_idempotency_key_applies_once(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id)
    first = add_stamps(session, customer_card=cc, stamps=2, idempotency_key="shopify:order:5501")
    session.commit()
    again = add_stamps(session, customer_card=cc, stamps=2, idempotency_key="shopify:order:5501")
    session.commit()
    assert (first.applied, again.applied) == (True, False)
    assert again.entry.id == first.entry.id
    assert again.customer_card.stamps == 2
    assert _db_balance(session, cc) == 2
    assert len(_ledger(session, cc)) == 1
    assert len(_outbox(session, store_id, "push")) == 1  # no second notification
    # Another key applies.
    add_stamps(session, customer_card=cc, stamps=2, idempotency_key="shopify:order:5502")
    assert _db_balance(session, cc) == 4


def test_idempotency_keys_are_per_store(session: Session, make_store: MakeStore) -> None:
    a, _ = make_store()
    b, _ = make_store()
    cc_a = _enrolled(session, a)
    cc_b = _enrolled(session, b)
    assert add_stamps(session, customer_card=cc_a, stamps=1, idempotency_key="k").applied
    assert add_stamps(session, customer_card=cc_b, stamps=1, idempotency_key="k").applied
    session.commit()
    assert (_db_balance(session, cc_a), _db_balance(session, cc_b)) == (1, 1)


# --- redeem -------------------------------------------------------------------------------------


def test_redeem_deducts_the_cost(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id, required=10)
    reward = create_reward(session, card_id=cc.card_id, name="Free coffee", stamps=4)
    add_stamps(session, customer_card=cc, stamps=10)
    result = redeem(session, customer_card=cc, reward_id=reward.id)
    session.commit()
    assert result.applied is True
    assert result.customer_card.stamps == 6
    assert (result.entry.delta, result.entry.reason, result.entry.reward_id) == (
        -4,
        "redeem",
        reward.id,
    )
    assert result.entry.balance_after == 6
    assert _db_balance(session, cc) == 6 == ledger_sum(session, customer_card_id=cc.id)


def test_redeem_with_a_short_balance_fails(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id, required=10)
    reward = create_reward(session, card_id=cc.card_id, name="Free coffee", stamps=4)
    add_stamps(session, customer_card=cc, stamps=3)
    session.commit()
    with pytest.raises(ValidationFailed) as info:
        redeem(session, customer_card=cc, reward_id=reward.id)
    assert list(info.value.errors) == ["base"]
    assert "not enough stamps" in info.value.errors["base"][0]
    session.rollback()
    assert _db_balance(session, cc) == 3
    assert [e.reason for e in _ledger(session, cc)] == ["stamp"]
    # Exactly the cost is enough.
    add_stamps(session, customer_card=cc, stamps=1)
    assert redeem(session, customer_card=cc, reward_id=reward.id).customer_card.stamps == 0


def test_redeem_an_inactive_reward_fails(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id, required=10)
    reward = create_reward(session, card_id=cc.card_id, name="Old", stamps=1, active=False)
    add_stamps(session, customer_card=cc, stamps=5)
    with pytest.raises(ValidationFailed) as info:
        redeem(session, customer_card=cc, reward_id=reward.id)
    assert list(info.value.errors) == ["reward_id"]
    assert _db_balance(session, cc) == 5


def test_redeem_a_reward_of_another_card_is_not_found(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    other_store, _ = make_store()
    cc = _enrolled(session, store_id, required=10)
    add_stamps(session, customer_card=cc, stamps=10)
    other_card = _card(session, store_id, name="Tea")
    other_reward = create_reward(session, card_id=other_card.id, name="Free tea", stamps=1)
    foreign = create_reward(
        session, card_id=_card(session, other_store).id, name="Foreign", stamps=1
    )
    for reward_id in (other_reward.id, foreign.id, 999_999):
        with pytest.raises(NotFound):
            redeem(session, customer_card=cc, reward_id=reward_id)
    for bad in ("1", True, None):
        with pytest.raises(ValidationFailed) as info:
            redeem(session, customer_card=cc, reward_id=bad)
        assert list(info.value.errors) == ["reward_id"]
    assert _db_balance(session, cc) == 10


def test_redeem_idempotency_key(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id, required=10)
    reward = create_reward(session, card_id=cc.card_id, name="Free", stamps=3)
    add_stamps(session, customer_card=cc, stamps=9)
    first = redeem(session, customer_card=cc, reward_id=reward.id, idempotency_key="pos:1")
    again = redeem(session, customer_card=cc, reward_id=reward.id, idempotency_key="pos:1")
    session.commit()
    assert (first.applied, again.applied) == (True, False)
    assert again.entry.id == first.entry.id
    assert _db_balance(session, cc) == 6


def test_customer_card_lookup_is_scoped(session: Session, make_store: MakeStore) -> None:
    a, _ = make_store()
    b, _ = make_store()
    cc = _enrolled(session, a)
    other_customer = _customer(session, a)
    session.commit()
    for store_id, customer_id in ((b, cc.customer_id), (a, other_customer.id)):
        with pytest.raises(NotFound):
            get_customer_card(
                session, store_id=store_id, customer_id=customer_id, customer_card_id=cc.id
            )


# --- balance == ledger sum, as a property -------------------------------------------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("stamp"), st.integers(1, 12)),
        st.tuples(st.just("redeem"), st.sampled_from([0, 1, 2])),
        st.tuples(st.just("replay"), st.integers(0, 20)),
    ),
    min_size=1,
    max_size=15,
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=_OPS, initial=st.integers(0, 4))
def test_balance_always_equals_the_ledger_sum(
    engine: Engine, make_store: MakeStore, ops: list[tuple[str, int]], initial: int
) -> None:
    store_id, _ = make_store()
    costs = [1, 5, 9]
    with make_sessionmaker(engine)() as session:
        cc = _enrolled(session, store_id, required=10, initial=initial)
        rewards = [
            create_reward(session, card_id=cc.card_id, name=f"R{c}", stamps=c).id for c in costs
        ]
        session.commit()
        model = initial
        keys: list[str] = []
        for op, arg in ops:
            if op == "stamp":
                key = f"k{len(keys)}"
                keys.append(key)
                result = add_stamps(session, customer_card=cc, stamps=arg, idempotency_key=key)
                assert result.applied
                model += arg
            elif op == "redeem":
                if model >= costs[arg]:
                    redeem(session, customer_card=cc, reward_id=rewards[arg])
                    model -= costs[arg]
                else:
                    with pytest.raises(ValidationFailed):
                        redeem(session, customer_card=cc, reward_id=rewards[arg])
            elif keys:
                replay = add_stamps(
                    session, customer_card=cc, stamps=7, idempotency_key=keys[arg % len(keys)]
                )
                assert replay.applied is False
            session.commit()
            assert cc.stamps == model
            assert _db_balance(session, cc) == model
            assert ledger_sum(session, customer_card_id=cc.id) == model
            assert cc.stamps >= 0
        # Each entry's balance_after is the running sum of the deltas.
        running = 0
        for entry in _ledger(session, cc):
            running += entry.delta
            assert entry.balance_after == running
        expected_status = "completed" if model >= 10 else "active"
        assert card_status(cc.stamps, cc.card.stamps_required) == expected_status


# --- outbox -------------------------------------------------------------------------------------


def test_stamp_and_redeem_write_pass_update_and_push(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id, required=10)
    reward = create_reward(session, card_id=cc.card_id, name="Free", stamps=2)
    stamped = add_stamps(session, customer_card=cc, stamps=3)
    redeemed = redeem(session, customer_card=cc, reward_id=reward.id)
    session.commit()
    rows = _outbox(session, store_id)
    assert sorted((m.kind, m.payload["ledger_entry_id"]) for m in rows) == sorted(
        [
            ("pass_update", stamped.entry.id),
            ("push", stamped.entry.id),
            ("pass_update", redeemed.entry.id),
            ("push", redeemed.entry.id),
        ]
    )
    for m in rows:
        assert m.status == "pending"
        assert m.payload["customer_card_id"] == cc.id
        assert m.store_id == store_id
    balances = {m.payload["ledger_entry_id"]: m.payload["stamps"] for m in rows}
    assert balances == {stamped.entry.id: 3, redeemed.entry.id: 1}


def test_skip_notifications_writes_no_outbox_rows(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id, required=10, initial=2)
    reward = create_reward(session, card_id=cc.card_id, name="Free", stamps=2)
    add_stamps(session, customer_card=cc, stamps=3, skip_notifications=True)
    redeem(session, customer_card=cc, reward_id=reward.id, skip_notifications=True)
    session.commit()
    assert _outbox(session, store_id) == []
    assert _db_balance(session, cc) == 3


def test_failed_redeem_writes_no_outbox_rows(session: Session, store_id: int) -> None:
    cc = _enrolled(session, store_id, required=10)
    reward = create_reward(session, card_id=cc.card_id, name="Free", stamps=2)
    with pytest.raises(ValidationFailed):
        redeem(session, customer_card=cc, reward_id=reward.id)
    session.commit()
    assert _outbox(session, store_id) == []


def test_queue_card_links_once_per_card_and_contact(session: Session, store_id: int) -> None:
    customer = _customer(session, store_id, phone="+12125554240")
    c1, _ = enrol(session, customer=customer, card=_card(session, store_id, name="One"))
    c2, _ = enrol(session, customer=customer, card=_card(session, store_id, name="Two"))
    base = "https://wallet.example.com"
    for _ in range(2):
        queue_card_links(session, customer=customer, customer_cards=[c1, c2], wallet_base_url=base)
    session.commit()
    queue_card_links(session, customer=customer, customer_cards=[c1], wallet_base_url=base)
    session.commit()
    rows = _outbox(session, store_id, "card_links")
    assert len(rows) == 2
    by_card = {m.payload["customer_card_id"]: m.payload for m in rows}
    assert set(by_card) == {c1.id, c2.id}
    for cc in (c1, c2):
        payload = by_card[cc.id]
        assert payload["customer_id"] == customer.id
        assert payload["card_id"] == cc.card_id
        assert payload["channels"] == ["email", "sms"]
        assert payload["apple_wallet_url"] == f"{base}/passes/{cc.pass_token}/apple"
        assert payload["google_wallet_url"] == f"{base}/passes/{cc.pass_token}/google"
    assert _outbox(session, store_id, "push") == []
    # New contact details: the links go out again (to the new address only once).
    update_customer(
        session,
        store_id=store_id,
        customer=customer,
        fields=CustomerFields(email="new@example.com", phone=""),
    )
    for _ in range(2):
        queue_card_links(session, customer=customer, customer_cards=[c1], wallet_base_url=base)
    session.commit()
    rows = _outbox(session, store_id, "card_links")
    assert len(rows) == 3
    assert rows[-1].payload["channels"] == ["email"]
