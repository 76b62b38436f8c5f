"""worker/reconcile.py against the order fakes: misses, exactly once, faults, drift, dry run."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from connectors.ratelimit import make_budget
from models.db import make_sessionmaker
from models.earning import webhook_miss_rates
from models.tables import CustomerCard, SyncRun, WebhookEvent
from models.webhook_processing import drain
from tests.earning_helpers import (
    KEY,
    assert_balances_match_ledger,
    ledger,
    setup_store,
)
from tests.fakes.shopify_orders import FakeShopifyOrders
from tests.fakes.square_orders import FakeSquareOrders
from worker.reconcile import reconcile_store
from worker.settings import Settings

NOW = dt.datetime(2026, 11, 22, 9, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def _settings(db_url: str) -> Settings:
    return Settings(DATABASE_URL=db_url, WALLET_BASE_URL="https://wallet.example.com")


def _reconcile(engine: Engine, db_url: str, store_id: int, fake: Any, **kw: Any) -> dict[str, Any]:
    return reconcile_store(
        make_sessionmaker(engine),
        store_id=store_id,
        settings=_settings(db_url),
        key=KEY,
        transport=httpx.MockTransport(fake.handle),
        budget=make_budget(redis_url=None, capacity=1e6, refill_per_second=1e6),
        sleep=lambda _s: None,
        now=NOW,
        **kw,
    )


def _webhook(
    engine: Engine,
    *,
    source: str,
    topic: str,
    body: dict[str, Any],
    key: str,
    account: str,
    store_id: int,
    connection_id: int,
) -> None:
    with make_sessionmaker(engine)() as s:
        s.add(
            WebhookEvent(
                source=source,
                dedupe_key=key,
                topic=topic,
                event_id=key,
                store_id=store_id,
                connection_id=connection_id,
                account=account,
                status="pending",
                body=json.dumps(body),
                headers={},
                received_at=NOW,
                next_attempt_at=NOW - HOUR,
            )
        )
        s.commit()


def _shopify_fake(n: int = 12, *, fault_rate: float = 0.0) -> FakeShopifyOrders:
    fake = FakeShopifyOrders(fault_rate=fault_rate, seed=11, max_page=5)
    for i in range(n):
        at = NOW - dt.timedelta(hours=60) + i * HOUR
        fake.add_order(1000 + i, customer_id=500 + i % 4, amount=1000 + 250 * i, at=at)
    fake.add_order(999, customer_id=500, amount=5000, at=NOW - dt.timedelta(hours=100))  # outside
    fake.refund(1002, 7001, 400, at=NOW - 10 * HOUR)
    fake.refund(1002, 7002, 300, at=NOW - 9 * HOUR)
    fake.cancel(1001, at=NOW - 8 * HOUR)
    return fake


def test_shopify_reconcile_applies_missed_orders_once(engine: Engine, db_url: str, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(
        engine, earn={"kind": "per_amount", "minor_units": 500}
    )
    fake = _shopify_fake()
    # Webhooks delivered 3 of the 12 orders (one twice); the rest were missed.
    fake.orders[1001]["cancelledAt"] = None  # the webhooks came before the cancellation
    for n, order_id in enumerate((1000, 1001, 1001, 1002)):
        _webhook(
            engine,
            source="shopify",
            topic="orders/paid",
            body=fake.rest_order(order_id),
            key=f"wh-{n}",  # Shopify sends a duplicate with a new webhook id
            account="shop-1.myshopify.com",
            store_id=store_id,
            connection_id=connection_id,
        )
    fake.cancel(1001, at=NOW - 8 * HOUR)
    result = drain(make_sessionmaker(engine), now=lambda: NOW)
    assert result.done == 4
    assert result.as_dict()["stamps_earned"] > 0
    webhook_ledger = ledger(session, store_id)

    report = _reconcile(engine, db_url, store_id, fake)
    (conn,) = report["connections"]
    assert conn["status"] == "succeeded"
    assert conn["orders"] == 12
    assert conn["missed"] == 9
    assert conn["miss_rate"] == 0.75
    with make_sessionmaker(engine)() as s:
        assert webhook_miss_rates(s, [connection_id]) == {connection_id: 0.75}
    assert conn["completeness"]["source_count"] == 12
    assert conn["completeness"]["local_count"] == 12
    assert conn["completeness"]["complete"] is True
    assert fake.queries[0] == "updated_at:>='2026-11-19T08:55:00Z'"
    entries = ledger(session, store_id)
    assert set(webhook_ledger) <= set(entries)
    keys = [k for k, _, _ in entries]
    assert len(keys) == len(set(keys))
    assert "shopify:order:999" not in keys  # outside the window
    assert ("shopify:refund:7001", -1, "reversal") in entries  # 1500 → 1100: 3 → 2
    assert ("shopify:order:1001:cancel", -2, "reversal") in entries  # its cancellation was missed
    assert report["drift"] == []
    assert_balances_match_ledger(session, store_id)

    # Again: nothing new, nothing missed.
    again = _reconcile(engine, db_url, store_id, fake)
    assert again["connections"][0]["missed"] == 0
    assert ledger(session, store_id) == entries

    with make_sessionmaker(engine)() as s:
        rates = webhook_miss_rates(s, [connection_id])
        runs = s.scalars(select(SyncRun).where(SyncRun.stream == "orders")).all()
        assert [(r.seen, r.created, r.status) for r in runs] == [
            (12, 9, "succeeded"),
            (12, 0, "succeeded"),
        ]
    assert rates == {connection_id: 0.0}


def test_reconcile_with_twenty_percent_faults_gives_the_clean_ledger(
    engine: Engine, db_url: str, session
) -> None:  # type: ignore[no-untyped-def]
    clean_store, _, _ = setup_store(engine, earn={"kind": "per_amount", "minor_units": 500})
    faulty_store, _, _ = setup_store(engine, earn={"kind": "per_amount", "minor_units": 500})
    clean = _reconcile(engine, db_url, clean_store, _shopify_fake(60))
    faulty_fake = _shopify_fake(60, fault_rate=0.2)
    faulty = _reconcile(engine, db_url, faulty_store, faulty_fake)
    assert faulty_fake.faults >= 3, faulty_fake.faults
    assert faulty["connections"][0]["requests"] > clean["connections"][0]["requests"]
    assert faulty["status"] == "succeeded"
    assert ledger(session, faulty_store) == ledger(session, clean_store)
    assert len(ledger(session, clean_store)) > 60


def test_square_faults_give_the_clean_ledger(engine: Engine, db_url: str, session) -> None:  # type: ignore[no-untyped-def]
    def fake(rate: float) -> FakeSquareOrders:
        f = FakeSquareOrders(fault_rate=rate, seed=3, max_page=3)
        for i in range(30):
            at = NOW - dt.timedelta(hours=50) + i * HOUR
            f.add_payment(
                f"P{i}",
                customer_id=f"C{i % 5}",
                amount=700 + 100 * i,
                at=at,
                location_id=f.locations[i % 2],
            )
        f.add_refund("R1", "P3", 1000, at=NOW - 5 * HOUR)  # P3 paid 1000: fully refunded
        return f

    clean_store, _, _ = setup_store(
        engine, source="square", earn={"kind": "per_order", "stamps": 1}
    )
    faulty_store, _, _ = setup_store(
        engine, source="square", earn={"kind": "per_order", "stamps": 1}
    )
    _reconcile(engine, db_url, clean_store, fake(0.0))
    faulty_fake = fake(0.2)
    report = _reconcile(engine, db_url, faulty_store, faulty_fake)
    assert faulty_fake.faults >= 2, faulty_fake.faults
    assert report["status"] == "succeeded"
    clean_ledger = ledger(session, clean_store)
    assert ledger(session, faulty_store) == clean_ledger
    assert len([k for k, _, _ in clean_ledger if k.startswith("square:payment:")]) == 30
    assert ("square:refund:R1", -1, "reversal") in clean_ledger


def test_square_payment_without_customer_takes_the_order_customer(
    engine: Engine, db_url: str, session
) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(engine, source="square")
    fake = FakeSquareOrders()
    fake.add_payment("P1", customer_id=None, order_customer_id="C9", amount=900, at=NOW - HOUR)
    fake.add_payment("P2", customer_id="C8", amount=900, at=NOW - HOUR, status="APPROVED")
    report = _reconcile(engine, db_url, store_id, fake)
    assert [k for k, _, _ in ledger(session, store_id)] == ["square:payment:P1"]
    assert any(p == "/v2/orders/ORDER-P1" for p in fake.paths)
    assert not any(p == "/v2/orders/ORDER-P2" for p in fake.paths)
    assert report["connections"][0]["completeness"]["source_count"] == 1
    # The webhook for the completed payment later: nothing twice.
    fake.payments["P2"]["status"] = "COMPLETED"
    _webhook(
        engine,
        source="square",
        topic="payment.updated",
        body=fake.payment_event("P2"),
        key="e2",
        account="MERCHANT1",
        store_id=store_id,
        connection_id=connection_id,
    )
    _webhook(
        engine,
        source="square",
        topic="payment.updated",
        body=fake.payment_event("P1"),
        key="e1",
        account="MERCHANT1",
        store_id=store_id,
        connection_id=connection_id,
    )
    drain(make_sessionmaker(engine), now=lambda: NOW)
    # P2's buyer is unknown to the store and a payment event carries no customer record: the
    # payment waits (nothing lost); the next reconciliation fetches C8, creates them, earns.
    assert [k for k, _, _ in ledger(session, store_id)] == ["square:payment:P1"]
    report = _reconcile(engine, db_url, store_id, fake)
    assert report["connections"][0]["counts"]["customers_created"] == 1
    assert [k for k, _, _ in ledger(session, store_id)] == [
        "square:payment:P1",
        "square:payment:P2",
    ]
    assert "/v2/customers/C8" in fake.paths


def test_dry_run_writes_nothing_and_reports(engine: Engine, db_url: str, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, _ = setup_store(engine)
    fake = _shopify_fake(5)
    report = _reconcile(engine, db_url, store_id, fake, dry_run=True)
    conn = report["connections"][0]
    assert report["dry_run"] is True
    assert conn["missed"] == 5
    assert conn["run_id"] is None
    assert conn["completeness"]["local_count"] == 0
    assert len(conn["completeness"]["missing_locally"]) == 5
    assert ledger(session, store_id) == []
    with make_sessionmaker(engine)() as s:
        assert s.scalars(select(SyncRun)).all() == []


def test_drift_is_fixed_with_a_reconcile_entry(engine: Engine, db_url: str, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, _ = setup_store(engine)
    fake = _shopify_fake(3)
    _reconcile(engine, db_url, store_id, fake)
    with make_sessionmaker(engine)() as s:
        cc = s.scalars(
            select(CustomerCard).where(CustomerCard.store_id == store_id).order_by(CustomerCard.id)
        ).first()
        assert cc is not None
        cc.stamps += 4
        s.commit()
    dry = _reconcile(engine, db_url, store_id, fake, dry_run=True)
    assert [d["fixed"] for d in dry["drift"]] == [False]
    report = _reconcile(engine, db_url, store_id, fake)
    assert [(d["balance"] - d["ledger_sum"], d["fixed"]) for d in report["drift"]] == [(4, True)]
    assert next(e for e in ledger(session, store_id) if e[2] == "reconcile")[1] == 4
    assert_balances_match_ledger(session, store_id)
    assert _reconcile(engine, db_url, store_id, fake)["drift"] == []


def test_upstream_outage_fails_the_connection_and_keeps_going(
    engine: Engine, db_url: str, session
) -> None:  # type: ignore[no-untyped-def]
    store_id, _, _ = setup_store(engine)
    fake = _shopify_fake(3)
    fake.fail_next(*([503] * 6))
    report = _reconcile(engine, db_url, store_id, fake)
    assert report["status"] == "partial"
    assert report["connections"][0]["status"] == "failed"
    assert "503" in report["connections"][0]["error"]
    with make_sessionmaker(engine)() as s:
        assert s.scalars(select(SyncRun.status)).all() == ["failed"]
    # The next run finds everything.
    assert _reconcile(engine, db_url, store_id, fake)["connections"][0]["missed"] == 3


def test_unknown_store_is_not_found(engine: Engine, db_url: str) -> None:
    from models.errors import NotFound

    with pytest.raises(NotFound):
        _reconcile(engine, db_url, 987654, FakeShopifyOrders())


def test_webhooks_out_of_order_refund_cancel_and_square_refund(
    engine: Engine, db_url: str, session
) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(
        engine, earn={"kind": "per_amount", "minor_units": 100}
    )
    fake = FakeShopifyOrders()
    fake.add_order(5, customer_id=77, amount=1000, at=NOW - 3 * HOUR)
    fake.refund(5, 51, 300, at=NOW - 2 * HOUR)
    refund_body = fake.rest_refund(5, 51)
    paid_body = fake.rest_order(5)
    paid_body["refunds"] = []  # as it was when paid
    fake.cancel(5, at=NOW - HOUR)
    deliveries = [  # the refund arrives first, the cancellation twice
        ("refunds/create", refund_body),
        ("orders/cancelled", fake.rest_order(5)),
        ("orders/paid", paid_body),
        ("orders/cancelled", fake.rest_order(5)),
    ]
    for n, (topic, body) in enumerate(deliveries):
        _webhook(
            engine,
            source="shopify",
            topic=topic,
            body=body,
            key=f"d{n}",
            account="shop-1.myshopify.com",
            store_id=store_id,
            connection_id=connection_id,
        )
    result = drain(make_sessionmaker(engine), now=lambda: NOW)
    assert result.done == 4
    # One batch: the paid order earns 10, its refund takes 3, the cancellation the other 7.
    assert ledger(session, store_id) == [
        ("shopify:order:5", 10, "order"),
        ("shopify:order:5:cancel", -7, "reversal"),
        ("shopify:refund:51", -3, "reversal"),
    ]
    assert (result.stamps_earned, result.stamps_reversed) == ({"shopify": 10}, {"shopify": 10})
    assert_balances_match_ledger(session, store_id)


def test_square_refund_webhook_reverses_the_payment(engine: Engine, db_url: str, session) -> None:  # type: ignore[no-untyped-def]
    store_id, _, connection_id = setup_store(
        engine, source="square", earn={"kind": "per_amount", "minor_units": 100}
    )
    fake = FakeSquareOrders()
    fake.add_payment("P1", customer_id="C1", amount=900, at=NOW - 2 * HOUR)
    _reconcile(engine, db_url, store_id, fake)  # creates C1 (a payment event carries no record)
    fake.add_refund("R1", "P1", 450, at=NOW - HOUR, status="PENDING")
    for n, (kind, status) in enumerate(
        (("refund.created", "PENDING"), ("refund.updated", "COMPLETED"))
    ):
        fake.refunds["R1"]["status"] = status
        _webhook(
            engine,
            source="square",
            topic=kind,
            body=fake.refund_event("R1", kind),
            key=f"r{n}",
            account="MERCHANT1",
            store_id=store_id,
            connection_id=connection_id,
        )
    drain(make_sessionmaker(engine), now=lambda: NOW)
    assert ledger(session, store_id) == [
        ("square:payment:P1", 9, "order"),
        ("square:refund:R1", -5, "reversal"),  # 900 - 450 = 450 → 4 stamps kept
    ]
