"""Real concurrent writers: one Session (one connection) per thread, released together.

The interesting cases run on PostgreSQL, where transactions truly interleave; the SQLite variants
check that the embedded default serialises the same calls without errors ("database is locked").
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from models.cards import (
    add_stamps,
    create_card,
    create_reward,
    enrol,
    get_customer_card,
    ledger_sum,
    redeem,
)
from models.customers import (
    CustomerFields,
    create_customer,
    get_customer,
    parse_references,
    update_customer,
)
from models.db import make_sessionmaker
from models.errors import ValidationFailed
from models.tables import (
    Customer,
    CustomerCard,
    ExternalReference,
    OutboxMessage,
    StampLedgerEntry,
)

MakeStore = Callable[..., tuple[int, str]]
TIMEOUT = 60


@dataclass
class Outcome:
    value: Any = None
    error: Exception | None = None


def run_concurrently(engine: Engine, n: int, work: Callable[[Session, int], Any]) -> list[Outcome]:
    """Run `work(session, i)` in `n` threads, each with its own session, released together.

    Each thread commits on success and rolls back on error; the outcomes come back in order.
    """
    factory = make_sessionmaker(engine)
    barrier = threading.Barrier(n, timeout=TIMEOUT)
    outcomes = [Outcome() for _ in range(n)]

    def _thread(i: int) -> None:
        with factory() as session:
            try:
                barrier.wait()
                outcomes[i].value = work(session, i)
                session.commit()
            except Exception as exc:  # noqa: BLE001 - handed to the main thread
                session.rollback()
                outcomes[i].error = exc

    threads = [threading.Thread(target=_thread, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a concurrent writer hung"
    return outcomes


def _errors(outcomes: list[Outcome]) -> list[Exception]:
    return [o.error for o in outcomes if o.error is not None]


def _unexpected(outcomes: list[Outcome], allowed: type[Exception]) -> list[Exception]:
    return [e for e in _errors(outcomes) if not isinstance(e, allowed)]


@dataclass
class CardSetup:
    store_id: int
    customer_id: int
    customer_card_id: int
    reward_id: int


def _setup_card(
    engine: Engine, make_store: MakeStore, *, balance: int, cost: int, required: int = 10
) -> CardSetup:
    store_id, _ = make_store()
    with make_sessionmaker(engine)() as s:
        card = create_card(s, store_id=store_id, name="Coffee", stamps_required=required)
        reward = create_reward(s, card_id=card.id, name="Free", stamps=cost)
        customer = create_customer(
            s, store_id=store_id, fields=CustomerFields(first_name="A", email="a@x.com")
        ).customer
        cc, _ = enrol(s, customer=customer, card=card)
        if balance:
            add_stamps(s, customer_card=cc, stamps=balance, skip_notifications=True)
        s.commit()
        return CardSetup(store_id, customer.id, cc.id, reward.id)


def _card_in(session: Session, setup: CardSetup) -> CustomerCard:
    return get_customer_card(
        session,
        store_id=setup.store_id,
        customer_id=setup.customer_id,
        customer_card_id=setup.customer_card_id,
    )


def _final(engine: Engine, setup: CardSetup) -> tuple[int, int, list[StampLedgerEntry]]:
    with make_sessionmaker(engine)() as s:
        balance = s.scalar(
            select(CustomerCard.stamps).where(CustomerCard.id == setup.customer_card_id)
        )
        entries = list(
            s.scalars(
                select(StampLedgerEntry)
                .where(StampLedgerEntry.customer_card_id == setup.customer_card_id)
                .order_by(StampLedgerEntry.id)
            ).all()
        )
        return int(balance or 0), ledger_sum(s, customer_card_id=setup.customer_card_id), entries


# --- redeem -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threads", "balance", "cost", "winners"),
    [(2, 5, 3, 1), (2, 6, 3, 2), (8, 10, 3, 3), (8, 18, 2, 8), (8, 1, 2, 0)],
)
def test_concurrent_redeems_never_overdraw(
    engine: Engine,
    make_store: MakeStore,
    threads: int,
    balance: int,
    cost: int,
    winners: int,
) -> None:
    setup = _setup_card(engine, make_store, balance=balance, cost=cost, required=18)

    def work(session: Session, _i: int) -> int:
        cc = _card_in(session, setup)
        return redeem(session, customer_card=cc, reward_id=setup.reward_id).entry.id

    outcomes = run_concurrently(engine, threads, work)
    assert _unexpected(outcomes, ValidationFailed) == []
    succeeded = [o for o in outcomes if o.error is None]
    assert len(succeeded) == winners
    for err in _errors(outcomes):
        assert isinstance(err, ValidationFailed)
        assert list(err.errors) == ["base"]
    final, summed, entries = _final(engine, setup)
    assert final == balance - winners * cost
    assert final >= 0
    assert summed == final
    assert [e.reason for e in entries].count("redeem") == winners
    # Each redeem saw its own balance: balance_after values are distinct and consistent.
    running = 0
    for e in entries:
        running += e.delta
        assert e.balance_after == running


# --- stamps -------------------------------------------------------------------------------------


def test_concurrent_stamps_with_distinct_keys_all_apply(
    engine: Engine, make_store: MakeStore
) -> None:
    setup = _setup_card(engine, make_store, balance=0, cost=1)

    def work(session: Session, i: int) -> bool:
        cc = _card_in(session, setup)
        return add_stamps(session, customer_card=cc, stamps=i + 1, idempotency_key=f"o:{i}").applied

    outcomes = run_concurrently(engine, 8, work)
    assert _errors(outcomes) == []
    assert all(o.value is True for o in outcomes)
    final, summed, entries = _final(engine, setup)
    assert final == summed == sum(range(1, 9))
    assert len(entries) == 8
    assert sorted(e.balance_after for e in entries) == sorted({e.balance_after for e in entries})
    assert max(e.balance_after for e in entries) == final


def test_concurrent_stamps_with_the_same_key_apply_once(
    engine: Engine, make_store: MakeStore
) -> None:
    setup = _setup_card(engine, make_store, balance=0, cost=1)

    def work(session: Session, _i: int) -> tuple[bool, int, int]:
        cc = _card_in(session, setup)
        result = add_stamps(
            session, customer_card=cc, stamps=2, idempotency_key="shopify:order:5501"
        )
        return result.applied, result.entry.id, result.customer_card.stamps

    outcomes = run_concurrently(engine, 8, work)
    # The losers are told the key was used, not handed a raw IntegrityError.
    assert _errors(outcomes) == []
    applied = [o.value for o in outcomes if o.value[0]]
    assert len(applied) == 1
    assert {o.value[1] for o in outcomes} == {applied[0][1]}  # everyone sees the one entry
    assert {o.value[2] for o in outcomes} == {2}
    final, summed, entries = _final(engine, setup)
    assert final == summed == 2
    assert len(entries) == 1
    with make_sessionmaker(engine)() as s:
        kinds = s.scalars(
            select(OutboxMessage.kind).where(OutboxMessage.store_id == setup.store_id)
        ).all()
    assert sorted(kinds) == ["pass_update", "push"]


@pytest.mark.parametrize("balance", [10, 3], ids=["plenty", "enough-for-one"])
def test_concurrent_redeems_with_the_same_key_apply_once(
    engine: Engine, make_store: MakeStore, balance: int
) -> None:
    # With enough for one only, the replays find the balance spent: still a replay, not a 422.
    setup = _setup_card(engine, make_store, balance=balance, cost=3)

    def work(session: Session, _i: int) -> bool:
        return redeem(
            session,
            customer_card=_card_in(session, setup),
            reward_id=setup.reward_id,
            idempotency_key="pos:redeem:1",
        ).applied

    outcomes = run_concurrently(engine, 8, work)
    assert _errors(outcomes) == []
    assert sorted(o.value for o in outcomes) == [False] * 7 + [True]
    final, summed, _ = _final(engine, setup)
    assert final == summed == balance - 3


def test_concurrent_stamps_and_redeems_keep_the_ledger_exact(
    engine: Engine, make_store: MakeStore
) -> None:
    setup = _setup_card(engine, make_store, balance=4, cost=3)

    def work(session: Session, i: int) -> None:
        cc = _card_in(session, setup)
        if i % 2:
            redeem(session, customer_card=cc, reward_id=setup.reward_id)
        else:
            add_stamps(session, customer_card=cc, stamps=1)

    outcomes = run_concurrently(engine, 8, work)
    assert _unexpected(outcomes, ValidationFailed) == []
    redeemed = sum(1 for i, o in enumerate(outcomes) if i % 2 and o.error is None)
    final, summed, entries = _final(engine, setup)
    assert final == summed == 4 + 4 - 3 * redeemed
    assert all(e.balance_after >= 0 for e in entries)


# --- customers ----------------------------------------------------------------------------------


def _count(engine: Engine, model: Any, store_id: int) -> int:
    with make_sessionmaker(engine)() as s:
        return int(
            s.scalar(select(func.count()).select_from(model).where(model.store_id == store_id)) or 0
        )


@pytest.mark.parametrize("same_email", [True, False], ids=["same-email", "distinct-emails"])
def test_concurrent_creates_with_the_same_reference_make_one_customer(
    engine: Engine, make_store: MakeStore, same_email: bool
) -> None:
    store_id, _ = make_store()
    refs = parse_references([{"source": "shopify", "external_id": "5501"}])

    def work(session: Session, i: int) -> tuple[int, bool]:
        email = "jane@x.com" if same_email else f"jane{i}@x.com"
        result = create_customer(
            session,
            store_id=store_id,
            fields=CustomerFields(first_name=f"Jane {i}", email=email),
            references=refs,
        )
        return result.customer.id, result.created

    outcomes = run_concurrently(engine, 8, work)
    assert _errors(outcomes) == []
    assert len({o.value[0] for o in outcomes}) == 1
    assert sorted(o.value[1] for o in outcomes) == [False] * 7 + [True]
    assert _count(engine, Customer, store_id) == 1
    assert _count(engine, ExternalReference, store_id) == 1


def test_concurrent_creates_with_the_same_email_name_the_field(
    engine: Engine, make_store: MakeStore
) -> None:
    store_id, _ = make_store()

    def work(session: Session, i: int) -> int:
        email = "Jane@X.com" if i % 2 else "jane@x.com"
        return create_customer(
            session, store_id=store_id, fields=CustomerFields(first_name=f"J{i}", email=email)
        ).customer.id

    outcomes = run_concurrently(engine, 8, work)
    assert _unexpected(outcomes, ValidationFailed) == []
    errors = _errors(outcomes)
    assert len(errors) == 7
    for err in errors:
        assert isinstance(err, ValidationFailed)
        assert err.errors == {"email": ["has already been taken"]}
    assert _count(engine, Customer, store_id) == 1


def test_concurrent_creates_with_the_same_phone_name_the_field(
    engine: Engine, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    formats = ["+1 (212) 555-4240", "+12125554240", "(212) 555-4240", "212.555.4240"]

    def work(session: Session, i: int) -> int:
        return create_customer(
            session,
            store_id=store_id,
            fields=CustomerFields(first_name=f"J{i}", phone=formats[i % len(formats)]),
        ).customer.id

    outcomes = run_concurrently(engine, 8, work)
    assert _unexpected(outcomes, ValidationFailed) == []
    errors = _errors(outcomes)
    assert len(errors) == 7
    for err in errors:
        assert isinstance(err, ValidationFailed)
        assert err.errors == {"phone": ["has already been taken"]}
    assert _count(engine, Customer, store_id) == 1


def test_concurrent_updates_to_the_same_email_name_the_field(
    engine: Engine, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    with make_sessionmaker(engine)() as s:
        ids = [
            create_customer(
                s, store_id=store_id, fields=CustomerFields(first_name=f"J{i}", email=f"j{i}@x.com")
            ).customer.id
            for i in range(4)
        ]
        s.commit()

    def work(session: Session, i: int) -> None:
        customer = get_customer(session, store_id=store_id, customer_id=ids[i])
        update_customer(
            session,
            store_id=store_id,
            customer=customer,
            fields=CustomerFields(email="taken@x.com"),
        )

    outcomes = run_concurrently(engine, 4, work)
    assert _unexpected(outcomes, ValidationFailed) == []
    errors = _errors(outcomes)
    assert len(errors) == 3
    for err in errors:
        assert isinstance(err, ValidationFailed)
        assert err.errors == {"email": ["has already been taken"]}
    with make_sessionmaker(engine)() as s:
        emails = s.scalars(select(Customer.email).where(Customer.store_id == store_id)).all()
    assert sorted(emails).count("taken@x.com") == 1


def test_concurrent_enrolments_make_one_card(engine: Engine, make_store: MakeStore) -> None:
    setup = _setup_card(engine, make_store, balance=0, cost=1)
    with make_sessionmaker(engine)() as s:
        card_id = s.scalar(
            select(CustomerCard.card_id).where(CustomerCard.id == setup.customer_card_id)
        )
        other = create_customer(
            s, store_id=setup.store_id, fields=CustomerFields(first_name="B", email="b@x.com")
        ).customer.id
        s.commit()

    def work(session: Session, _i: int) -> int:
        from models.tables import CardTemplate

        card = session.get(CardTemplate, card_id)
        assert card is not None
        customer = get_customer(session, store_id=setup.store_id, customer_id=other)
        return enrol(session, customer=customer, card=card)[0].id

    outcomes = run_concurrently(engine, 6, work)
    assert _errors(outcomes) == []
    assert len({o.value for o in outcomes}) == 1
    with make_sessionmaker(engine)() as s:
        count = s.scalar(
            select(func.count()).select_from(CustomerCard).where(CustomerCard.customer_id == other)
        )
    assert count == 1
