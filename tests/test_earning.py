"""models/earning.py: rules, earning, refunds, cancellation, floors, identity, exactly-once."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from sqlalchemy import Engine, delete, select

from connectors.records import ForeignCustomer
from models import cards, lifecycle
from models.db import make_sessionmaker
from models.earning import (
    apply_orders,
    configure_earning,
    parse_earn,
    rule_from_config,
    verify_balances,
)
from models.errors import NotFound, ValidationFailed
from models.ingest import apply_customer_page
from models.tables import (
    Connection,
    Customer,
    CustomerCard,
    ExternalReference,
    OrderEarning,
    Reward,
)
from tests.earning_helpers import (
    T0,
    assert_balances_match_ledger,
    balance_of,
    earning_row,
    ledger,
    outbox_count,
    setup_store,
    shopify_order,
    shopify_refund,
)


def _apply(engine: Engine, connection_id: int, records: list, via: str = "webhook"):  # type: ignore[no-untyped-def,type-arg]
    with make_sessionmaker(engine)() as s:
        connection = s.get(Connection, connection_id)
        assert connection is not None
        counts = apply_orders(s, connection=connection, orders=records, via=via, now=T0)  # type: ignore[arg-type]
        s.commit()
        return counts


# --- the rule -----------------------------------------------------------------------------


def test_parse_earn_and_rule_round_trip() -> None:
    assert parse_earn("per_order:2") == {"kind": "per_order", "stamps": 2}
    assert parse_earn("per_amount:500") == {"kind": "per_amount", "minor_units": 500}
    for bad in ("per_order", "per_visit:1", "per_amount:x", ""):
        with pytest.raises(ValidationFailed):
            parse_earn(bad)
    rule = rule_from_config(
        {"card_id": 3, "earn": {"kind": "per_amount", "minor_units": 500}, "min_amount": 1000}
    )
    assert rule is not None
    assert (rule.entitlement(999), rule.entitlement(1000), rule.entitlement(2499)) == (0, 2, 4)
    assert rule_from_config({"owned_fields": ["email"]}) is None
    with pytest.raises(ValidationFailed):
        rule_from_config({"card_id": 3, "earn": {"kind": "per_order", "stamps": 0}})


def test_configure_validates_card_and_numbers(engine: Engine) -> None:
    _store_id, card_id, connection_id = setup_store(engine)
    with make_sessionmaker(engine)() as s:
        with pytest.raises(ValidationFailed) as info:
            configure_earning(s, connection_id, 999_999, {"kind": "per_order", "stamps": 0}, -1)
        assert set(info.value.errors) == {"card_id", "earn", "min_amount"}
        with pytest.raises(ValidationFailed):
            configure_earning(
                s, connection_id, card_id, {"kind": "per_amount", "minor_units": 0}, None
            )
        with pytest.raises(NotFound):
            configure_earning(s, 999_999, card_id, {"kind": "per_order", "stamps": 1}, None)
        cards.archive_card(s, card_id=card_id)
        s.flush()
        with pytest.raises(ValidationFailed) as info:
            configure_earning(s, connection_id, card_id, {"kind": "per_order", "stamps": 1}, None)
        assert info.value.errors == {"card_id": ["is archived"]}
        s.rollback()
        other_card = setup_store(engine)[1]
        with pytest.raises(ValidationFailed):  # a card of another store
            configure_earning(
                s, connection_id, other_card, {"kind": "per_order", "stamps": 1}, None
            )


# --- earning --------------------------------------------------------------------------------


def test_per_order_earns_once_and_creates_the_customer(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(engine, earn={"kind": "per_order", "stamps": 2})
    counts = _apply(engine, connection_id, [shopify_order(1001)])
    assert (counts.stamps_earned, counts.customers_created, counts.new, counts.missed) == (
        2,
        1,
        1,
        0,
    )
    again = _apply(engine, connection_id, [shopify_order(1001)], via="reconcile")
    assert (again.stamps_earned, again.new, again.missed) == (0, 0, 0)
    assert ledger(session, store_id) == [("shopify:order:1001", 2, "order")]
    assert balance_of(session, store_id, "shopify", "207119551") == 2
    assert earning_row(session, store_id, "1001").via == "webhook"
    assert outbox_count(session, store_id) == 2  # pass update + push of the live order


def test_per_amount_and_minimum(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(
        engine, earn={"kind": "per_amount", "minor_units": 500}, min_amount=1000
    )
    _apply(engine, connection_id, [shopify_order(1, amount=2499), shopify_order(2, amount=999)])
    assert ledger(session, store_id) == [("shopify:order:1", 4, "order")]
    assert earning_row(session, store_id, "2").outcome == "below_minimum"


def test_currency_mismatch_earns_nothing_and_is_counted(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(engine, currency="USD")
    counts = _apply(engine, connection_id, [shopify_order(1, currency="EUR")])
    assert counts.currency_mismatch == 1
    assert ledger(session, store_id) == []
    assert earning_row(session, store_id, "1").outcome == "currency_mismatch"


def test_unpaid_order_waits_then_earns_when_paid(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(engine)
    _apply(engine, connection_id, [shopify_order(1, paid=False)])
    assert ledger(session, store_id) == []
    _apply(engine, connection_id, [shopify_order(1, paid=True, updated_at=T0.replace(hour=13))])
    assert ledger(session, store_id) == [("shopify:order:1", 1, "order")]


def test_reconcile_enrols_quietly_webhook_gets_welcome_bonus(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(engine, initial_stamps=2)
    _apply(engine, connection_id, [shopify_order(1, customer_id=11)], via="reconcile")
    _apply(engine, connection_id, [shopify_order(2, customer_id=22)], via="webhook")
    keys = [k for k, _, _ in ledger(session, store_id)]
    assert sum(k.startswith("welcome_bonus:") for k in keys) == 1
    assert balance_of(session, store_id, "shopify", "11") == 1
    assert balance_of(session, store_id, "shopify", "22") == 3
    assert earning_row(session, store_id, "1").via == "reconcile"
    assert outbox_count(session, store_id) == 2  # only the webhook order notified


# --- refunds and cancellation ----------------------------------------------------------------


def test_partial_and_multiple_refunds_reverse_proportionally(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(
        engine, earn={"kind": "per_amount", "minor_units": 100}
    )
    _apply(engine, connection_id, [shopify_order(1, amount=1000)])
    _apply(engine, connection_id, [shopify_refund(71, 1, 250)])
    _apply(engine, connection_id, [shopify_refund(71, 1, 250)])  # replayed
    _apply(engine, connection_id, [shopify_refund(72, 1, 300)])
    assert ledger(session, store_id) == [
        ("shopify:order:1", 10, "order"),
        ("shopify:refund:71", -3, "reversal"),
        ("shopify:refund:72", -3, "reversal"),
    ]
    # Over-refund: never more than the order earned in total.
    _apply(engine, connection_id, [shopify_refund(73, 1, 5000)])
    assert balance_of(session, store_id, "shopify", "207119551") == 0
    assert earning_row(session, store_id, "1").reversed == 10
    assert_balances_match_ledger(session, store_id)


def test_refund_before_order_is_applied_when_the_order_arrives(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(
        engine, earn={"kind": "per_amount", "minor_units": 100}
    )
    _apply(engine, connection_id, [shopify_refund(71, 1, 400)])
    assert ledger(session, store_id) == []
    _apply(engine, connection_id, [shopify_order(1, amount=1000)])
    assert ledger(session, store_id) == [
        ("shopify:order:1", 10, "order"),
        ("shopify:refund:71", -4, "reversal"),
    ]


def test_per_order_partial_refund_keeps_stamps_until_under_minimum(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(
        engine, earn={"kind": "per_order", "stamps": 2}, min_amount=500
    )
    _apply(engine, connection_id, [shopify_order(1, amount=1000), shopify_refund(71, 1, 100)])
    assert balance_of(session, store_id, "shopify", "207119551") == 2
    _apply(engine, connection_id, [shopify_refund(72, 1, 600)])
    assert ledger(session, store_id)[-1] == ("shopify:refund:72", -2, "reversal")


def test_cancellation_reverses_the_rest(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(
        engine, earn={"kind": "per_amount", "minor_units": 100}
    )
    _apply(engine, connection_id, [shopify_order(1, amount=1000), shopify_refund(71, 1, 200)])
    _apply(engine, connection_id, [shopify_order(1, amount=1000, cancelled=True)])
    _apply(engine, connection_id, [shopify_order(1, amount=1000, cancelled=True)])
    assert ledger(session, store_id) == [
        ("shopify:order:1", 10, "order"),
        ("shopify:order:1:cancel", -8, "reversal"),
        ("shopify:refund:71", -2, "reversal"),
    ]
    # An order cancelled before it was ever paid earns nothing.
    _apply(engine, connection_id, [shopify_order(2, paid=False, cancelled=True)])
    assert earning_row(session, store_id, "2").outcome == "cancelled"


def test_reversal_after_redemption_floors_at_zero_with_shortfall(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, card_id, connection_id = setup_store(engine, earn={"kind": "per_order", "stamps": 5})
    _apply(engine, connection_id, [shopify_order(1), shopify_order(2)])
    with make_sessionmaker(engine)() as s:
        reward = cards.create_reward(s, card_id=card_id, name="Free coffee", stamps=8)
        cc = s.scalars(select(CustomerCard).where(CustomerCard.store_id == store_id)).one()
        cards.redeem(s, customer_card=cc, reward_id=reward.id, idempotency_key="r1")
        s.commit()
    _apply(engine, connection_id, [shopify_order(1, cancelled=True)])
    entries = ledger(session, store_id)
    assert ("shopify:order:1:cancel", -2, "reversal") in entries
    row = earning_row(session, store_id, "1")
    assert (row.reversed, row.shortfall) == (5, 3)
    from models.tables import StampLedgerEntry

    entry = session.scalars(
        select(StampLedgerEntry).where(StampLedgerEntry.idempotency_key == "shopify:order:1:cancel")
    ).one()
    assert entry.details["shortfall"] == 3
    assert entry.balance_after == 0
    session.rollback()
    # Nothing left at all: no entry (delta can't be 0), the shortfall is on the order row.
    _apply(engine, connection_id, [shopify_order(2, cancelled=True)])
    assert earning_row(session, store_id, "2").shortfall == 5
    assert_balances_match_ledger(session, store_id)
    assert reward.id is not None
    assert Reward.__tablename__ == "rewards"


# --- customers --------------------------------------------------------------------------------


def test_excluded_customer_earns_nothing(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(engine)
    _apply(engine, connection_id, [shopify_order(1)])
    with make_sessionmaker(engine)() as s:
        customer = s.scalars(select(Customer).where(Customer.store_id == store_id)).one()
        customer.state = "excluded"
        s.commit()
    counts = _apply(engine, connection_id, [shopify_order(2)])
    assert counts.excluded == 1
    assert earning_row(session, store_id, "2").outcome == "excluded"
    assert [k for k, _, _ in ledger(session, store_id)] == ["shopify:order:1"]


def test_merged_customer_earns_on_the_survivor(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(engine)
    _apply(
        engine, connection_id, [shopify_order(1, customer_id=11), shopify_order(2, customer_id=22)]
    )
    with make_sessionmaker(engine)() as s:
        lifecycle.follow_merge(
            s, store_id=store_id, source="shopify", loser_external_id="11", winner_external_id="22"
        )
        s.commit()
    # A late order of the merged-away customer (payload without the embedded customer).
    late = shopify_order(3, customer_id=11)
    late = type(late)(**{**{f: getattr(late, f) for f in late.__slots__}, "customer": None})  # type: ignore[attr-defined]
    _apply(engine, connection_id, [late])
    session.expire_all()
    survivor = session.scalar(
        select(ExternalReference.customer_id).where(ExternalReference.external_id == "22")
    )
    cc = session.scalars(select(CustomerCard).where(CustomerCard.customer_id == survivor)).one()
    assert cc.stamps == 3
    session.rollback()
    assert_balances_match_ledger(session, store_id)


def test_order_whose_reference_points_at_a_merged_customer_earns_on_the_survivor(
    engine: Engine, session
) -> None:  # type: ignore[no-untyped-def]
    """A reference left on a merged-away customer (merged_into_id set, state merged): the batch
    follows the chain to the live survivor and earns on the survivor's card."""
    store_id, _, connection_id = setup_store(engine, earn={"kind": "per_order", "stamps": 2})
    _apply(engine, connection_id, [shopify_order(1, customer_id=11)])
    with make_sessionmaker(engine)() as s:
        loser_id = s.scalar(
            select(ExternalReference.customer_id).where(ExternalReference.external_id == "11")
        )
        survivor = Customer(store_id=store_id, first_name="Survivor", state="active")
        middle = Customer(store_id=store_id, first_name="Middle", state="merged")
        s.add_all([survivor, middle])
        s.flush()
        middle.merged_into_id = survivor.id
        loser = s.get(Customer, loser_id)
        assert loser is not None
        loser.state, loser.merged_into_id = "merged", middle.id
        s.commit()
        survivor_id = survivor.id
    late = replace(shopify_order(2, customer_id=11), customer=None)
    counts = _apply(engine, connection_id, [late])
    assert (counts.earned_orders, counts.enrolled) == (1, 1)
    cards = session.execute(
        select(CustomerCard.customer_id, CustomerCard.stamps).where(
            CustomerCard.store_id == store_id
        )
    ).all()
    session.rollback()
    assert sorted(cards) == sorted([(loser_id, 2), (survivor_id, 2)])
    assert earning_row(session, store_id, "2").outcome == "earned"
    assert_balances_match_ledger(session, store_id)


def test_lost_order_rows_are_rebuilt_from_the_ledger_without_earning_twice(
    engine: Engine, session
) -> None:  # type: ignore[no-untyped-def]
    """A restore that kept the ledger but lost `order_earnings` rows: the replayed order finds
    its entry by key (nothing earned again, `earned` taken from the ledger); a replayed refund
    reverses nothing twice; a new refund still reverses what is left."""
    store_id, _, connection_id = setup_store(
        engine, earn={"kind": "per_amount", "minor_units": 100}
    )
    _apply(engine, connection_id, [shopify_order(1, amount=1000)])
    _apply(engine, connection_id, [shopify_refund(71, 1, 300)])
    with make_sessionmaker(engine)() as s:
        s.execute(delete(OrderEarning).where(OrderEarning.store_id == store_id))
        s.commit()
    counts = _apply(
        engine,
        connection_id,
        [shopify_order(1, amount=1000), shopify_refund(71, 1, 300)],
        via="reconcile",
    )
    assert (counts.new, counts.stamps_earned, counts.stamps_reversed) == (1, 0, 0)
    row = earning_row(session, store_id, "1")
    assert (row.outcome, row.earned, row.reversed) == ("earned", 10, 3)
    assert balance_of(session, store_id, "shopify", "207119551") == 7
    _apply(engine, connection_id, [shopify_refund(72, 1, 200)])
    assert ledger(session, store_id) == [
        ("shopify:order:1", 10, "order"),
        ("shopify:refund:71", -3, "reversal"),
        ("shopify:refund:72", -2, "reversal"),
    ]
    assert balance_of(session, store_id, "shopify", "207119551") == 5
    assert_balances_match_ledger(session, store_id)


def test_existing_customer_is_linked_not_duplicated(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(engine)
    with make_sessionmaker(engine)() as s:
        apply_customer_page(
            s,
            store_id=store_id,
            records=[
                ForeignCustomer(
                    source="square",
                    external_id="SQ1",
                    first_name="Bob",
                    email="bob207119551@mail.example.com",
                )
            ],
        )
        s.commit()
    _apply(engine, connection_id, [shopify_order(1)])
    session.expire_all()
    assert len(session.scalars(select(Customer).where(Customer.store_id == store_id)).all()) == 1


def test_order_without_customer_earns_nothing(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(engine)
    counts = _apply(engine, connection_id, [shopify_order(1, customer_id=None)])
    assert counts.no_customer == 1
    assert ledger(session, store_id) == []


# --- exactly once under concurrency, drift --------------------------------------------------


def _apply_concurrently(
    engine: Engine,
    connection_id: int,
    batches: list[tuple[str, list]],  # type: ignore[type-arg]
    *,
    store_lock: bool = True,
) -> None:
    """Apply each (via, records) batch in its own session and thread, all released at once by
    a barrier; `store_lock=False` leaves out the store's advisory lock (the row locks and
    unique keys alone then keep it exactly once). Fails with any thread's error."""
    from models import earning

    factory = make_sessionmaker(engine)
    barrier = threading.Barrier(len(batches))
    errors: list[BaseException] = []

    def worker(via: str, records: list) -> None:  # type: ignore[type-arg]
        try:
            with factory() as s:
                connection = s.get(Connection, connection_id)
                assert connection is not None
                barrier.wait()
                apply_orders(s, connection=connection, orders=records, via=via, now=T0)  # type: ignore[arg-type]
                s.commit()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    original = earning.lock_store
    if not store_lock:
        earning.lock_store = lambda session, store_id: None  # type: ignore[assignment]
    try:
        threads = [threading.Thread(target=worker, args=batch) for batch in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        earning.lock_store = original  # type: ignore[assignment]
    assert errors == []


@pytest.mark.postgres_only
def test_concurrent_apply_of_one_order_from_four_connections(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(engine, earn={"kind": "per_order", "stamps": 3})
    _apply_concurrently(
        engine, connection_id, [(via, [shopify_order(1)]) for via in ("webhook", "reconcile") * 2]
    )
    assert ledger(session, store_id) == [("shopify:order:1", 3, "order")]
    assert balance_of(session, store_id, "shopify", "207119551") == 3


@pytest.mark.postgres_only
def test_concurrent_first_insert_without_store_lock_meets_on_unique_key(
    engine: Engine, session
) -> None:  # type: ignore[no-untyped-def]
    """The order row's unique key alone (no advisory lock) keeps a refund from applying twice."""
    store_id, _, connection_id = setup_store(
        engine, earn={"kind": "per_amount", "minor_units": 100}
    )
    _apply(engine, connection_id, [shopify_order(1, amount=1000)])
    _apply_concurrently(
        engine, connection_id, [("webhook", [shopify_refund(9, 1, 500)])] * 4, store_lock=False
    )
    assert ledger(session, store_id)[-1] == ("shopify:refund:9", -5, "reversal")
    assert balance_of(session, store_id, "shopify", "207119551") == 5


@pytest.mark.postgres_only
def test_concurrent_new_orders_and_enrolments_without_store_lock_are_replanned(
    engine: Engine, session
) -> None:  # type: ignore[no-untyped-def]
    """Four transactions write the same new orders of two known buyers who hold no card yet,
    with no advisory lock: the losers' order rows and cards hit the unique keys, their batch is
    planned again (savepoint) on the winner's rows, and every order earns exactly once."""
    store_id, _, connection_id = setup_store(engine, earn={"kind": "per_order", "stamps": 2})
    with make_sessionmaker(engine)() as s:
        apply_customer_page(
            s,
            store_id=store_id,
            records=[
                ForeignCustomer(
                    source="shopify", external_id=str(c), email=f"b{c}@mail.example.com"
                )
                for c in (101, 102)
            ],
        )
        s.commit()
    # The buyers are known by reference only: no customer upsert (and no lock) in the batch.
    orders = [
        replace(shopify_order(n, customer_id=101 + n % 2), customer=None) for n in range(1, 11)
    ]
    _apply_concurrently(engine, connection_id, [("webhook", orders)] * 4, store_lock=False)
    entries = ledger(session, store_id)
    assert sorted(key for key, _, reason in entries if reason == "order") == sorted(
        f"shopify:order:{n}" for n in range(1, 11)
    )
    assert balance_of(session, store_id, "shopify", "101") == 10
    assert balance_of(session, store_id, "shopify", "102") == 10
    assert session.query(CustomerCard).filter_by(store_id=store_id).count() == 2
    assert_balances_match_ledger(session, store_id)


def test_verify_balances_fixes_drift_with_a_reconcile_entry(engine: Engine, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(engine, earn={"kind": "per_order", "stamps": 2})
    _apply(engine, connection_id, [shopify_order(1)])
    with make_sessionmaker(engine)() as s:
        cc = s.scalars(select(CustomerCard).where(CustomerCard.store_id == store_id)).one()
        cc.stamps = 7  # a balance changed outside the ledger
        s.commit()
    with make_sessionmaker(engine)() as s:
        found = verify_balances(s, store_id=store_id, fix=False)
        assert [(d.balance, d.ledger_sum, d.fixed) for d in found] == [(7, 2, False)]
        s.rollback()
        fixed = verify_balances(s, store_id=store_id, fix=True)
        s.commit()
    assert [d.fixed for d in fixed] == [True]
    assert [e[1:] for e in ledger(session, store_id) if e[2] == "reconcile"] == [(5, "reconcile")]
    assert_balances_match_ledger(session, store_id)
    with make_sessionmaker(engine)() as s:
        assert verify_balances(s, store_id=store_id, fix=True) == []
