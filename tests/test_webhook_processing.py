"""The inbox drain (models/webhook_processing.py) on SQLite and PostgreSQL.

Rows are written the way the API writes them (`models.inbox.insert_batch` with the routes of
`find_routes`), then drained; the store must end in the source's final state whatever the
delivery order, duplicates included.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from models import webhook_processing as wp
from models.cards import add_stamps, create_card, enrol
from models.connections import connect
from models.db import make_sessionmaker
from models.inbox import Delivery, Route, find_routes, insert_batch
from models.tables import (
    Customer,
    CustomerCard,
    ExternalReference,
    StampLedgerEntry,
    WebhookEvent,
    utcnow,
)

SHOP = "demo.myshopify.com"
MERCHANT = "MERCHANT1"
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def crypto_key() -> bytes:
    from cryptography.fernet import Fernet

    return Fernet.generate_key()


def _connect(engine: Engine, store_id: int, source: str, account: str, key: bytes) -> int:
    with Session(engine) as s:
        row, _ = connect(
            s,
            store_id=store_id,
            source=source,
            account=account,
            access_token="tok",
            api_base_url=None,
            api_version=None,
            key=key,
        )
        s.commit()
        return row.id


@pytest.fixture
def store(engine: Engine, make_store: Callable[..., tuple[int, str]], crypto_key: bytes) -> int:
    store_id, _ = make_store()
    _connect(engine, store_id, "shopify", SHOP, crypto_key)
    _connect(engine, store_id, "square", MERCHANT, crypto_key)
    return store_id


_seq = iter(range(1, 10**9))


def shopify(
    topic: str, body: dict[str, Any], *, triggered_at: dt.datetime | None = None
) -> Delivery:
    n = next(_seq)
    return Delivery(
        source="shopify",
        dedupe_key=f"wh-{n}",
        body=json.dumps(body),
        topic=topic,
        event_id=f"ev-{n}",
        account=SHOP,
        triggered_at=triggered_at,
    )


def square(body: dict[str, Any]) -> Delivery:
    n = next(_seq)
    return Delivery(
        source="square",
        dedupe_key=f"sq-{n}",
        body=json.dumps(body),
        topic=body.get("type"),
        event_id=f"sq-{n}",
        account=MERCHANT,
    )


def deliver(engine: Engine, deliveries: list[Delivery]) -> None:
    with engine.begin() as conn:
        routes: dict[tuple[str, str], Route | None] = {}
        for source in ("shopify", "square"):
            accounts = {d.account for d in deliveries if d.source == source and d.account}
            found = find_routes(conn, source, accounts)
            routes.update({(source, a): found.get(a) for a in accounts})
        insert_batch(conn, deliveries, routes)


def shopify_customer(cid: int, when: dt.datetime, **fields: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "email": fields.get("email", f"c{cid}@example.com"),
        "first_name": fields.get("first_name", f"First{cid}"),
        "last_name": fields.get("last_name", "Doe"),
        "phone": fields.get("phone"),
        "updated_at": when.isoformat(),
        "admin_graphql_api_id": f"gid://shopify/Customer/{cid}",
    }


def square_event(
    type_: str,
    cid: str,
    version: int,
    *,
    merge: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    customer = {
        "id": cid,
        "given_name": fields.get("given_name", f"Sq{cid}"),
        "family_name": "Square",
        "email_address": fields.get("email", f"{cid.lower()}@example.com"),
        "phone_number": fields.get("phone"),
        "creation_source": fields.get("creation_source", "DIRECTORY"),
        "updated_at": (T0 + dt.timedelta(minutes=version)).isoformat(),
        "version": version,
    }
    obj: dict[str, Any] = {"customer": customer}
    if merge is not None:
        obj["event_context"] = {"merge": merge}
    data: dict[str, Any] = {"type": "customer", "id": cid, "object": obj}
    if type_ == "customer.deleted":
        data["deleted"] = True
    return {
        "merchant_id": MERCHANT,
        "type": type_,
        "event_id": f"e-{next(_seq)}",
        "created_at": (T0 + dt.timedelta(minutes=version)).isoformat(),
        "data": data,
    }


def drain(engine: Engine, **kwargs: Any) -> wp.DrainResult:
    return wp.drain(make_sessionmaker(engine), **kwargs)


def customer_of(s: Session, store_id: int, source: str, external_id: str) -> Customer | None:
    ref = s.scalar(
        select(ExternalReference).where(
            ExternalReference.store_id == store_id,
            ExternalReference.source == source,
            ExternalReference.external_id == external_id,
        )
    )
    return s.get(Customer, ref.customer_id) if ref is not None else None


def statuses(engine: Engine) -> dict[str, int]:
    with Session(engine) as s:
        rows = s.execute(select(WebhookEvent.status, func.count()).group_by(WebhookEvent.status))
        return {str(row[0]): int(row[1]) for row in rows}


# --- create / update / delete ----------------------------------------------------------------


def test_create_update_delete(engine: Engine, store: int) -> None:
    deliver(
        engine,
        [
            shopify("customers/create", shopify_customer(1, T0, first_name="Ann")),
            shopify("customers/create", shopify_customer(2, T0, first_name="Bob")),
        ],
    )
    result = drain(engine)
    assert (result.claimed, result.done, result.failed) == (2, 2, 0)
    deliver(
        engine,
        [
            shopify(
                "customers/update",
                shopify_customer(1, T0 + dt.timedelta(hours=1), first_name="Annie"),
            ),
            shopify("customers/delete", {"id": 2}, triggered_at=T0 + dt.timedelta(hours=1)),
        ],
    )
    assert drain(engine).done == 2
    with Session(engine) as s:
        ann = customer_of(s, store, "shopify", "1")
        assert ann is not None
        assert ann.first_name == "Annie"
        assert ann.email == "c1@example.com"
        bob = customer_of(s, store, "shopify", "2")
        assert bob is not None
        assert bob.state == "active"
        ref = s.scalar(select(ExternalReference).where(ExternalReference.external_id == "2"))
        assert ref is not None
        assert ref.deleted_at is not None
        events = s.scalars(select(WebhookEvent)).all()
        assert {e.status for e in events} == {"done"}
        assert all(e.attempts == 1 and e.last_error is None for e in events)


def test_duplicates_and_shuffled_order_end_at_the_newest(engine: Engine, store: int) -> None:
    rng = random.Random(4)
    deliveries: list[Delivery] = []
    for cid in range(1, 21):
        for step in range(5):
            when = T0 + dt.timedelta(minutes=step)
            body = shopify_customer(cid, when, first_name=f"S{cid}v{step}")
            topic = "customers/create" if step == 0 else "customers/update"
            deliveries.append(shopify(topic, body, triggered_at=when))
            deliveries.append(shopify(topic, body, triggered_at=when))  # redelivered
        for version in range(4):
            deliveries.append(
                square(
                    square_event(
                        "customer.created" if version == 0 else "customer.updated",
                        f"SQ{cid}",
                        version,
                        given_name=f"Q{cid}v{version}",
                    )
                )
            )
    rng.shuffle(deliveries)
    deliver(engine, deliveries)
    result = drain(engine, batch_size=37)
    assert result.claimed == len(deliveries) == result.done
    assert result.batches > 1
    with Session(engine) as s:
        for cid in range(1, 21):
            shop = customer_of(s, store, "shopify", str(cid))
            assert shop is not None
            assert shop.first_name == f"S{cid}v4"
            sq = customer_of(s, store, "square", f"SQ{cid}")
            assert sq is not None
            assert sq.first_name == f"Q{cid}v3"
        assert s.scalar(select(func.count()).select_from(Customer)) == 40


def test_sample_payloads_from_the_vectors(engine: Engine, store: int, crypto_key: bytes) -> None:
    samples = json.loads((Path(__file__).parent / "data" / "vectors.json").read_text())["samples"]
    merchant = samples["square_webhook_customer_created"]["json"]["merchant_id"]
    _connect(engine, store, "square", merchant, crypto_key)

    def sample(kind: str) -> Delivery:
        event = samples[f"square_webhook_customer_{kind}"]["json"]
        return Delivery(
            source="square",
            dedupe_key=event["event_id"],
            body=json.dumps(event),
            topic=event["type"],
            account=merchant,
        )

    shop_customer = samples["shopify_rest_customer_get"]["json"]["customer"]
    deliver(engine, [sample("created"), shopify("customers/update", shop_customer)])
    assert drain(engine).done == 2
    deliver(engine, [sample("deleted"), sample("updated"), sample("created")])  # + a redelivery
    result = drain(engine)
    assert (result.done, result.failed) == (2, 0)  # the redelivery was a duplicate: not stored
    with Session(engine) as s:
        deleted = customer_of(s, store, "square", "QPTXM8PQNX3Q726ZYHPMNP46XC")
        assert deleted is not None
        assert deleted.first_name == "Jenkins"  # a source delete keeps the person
        ref = s.scalar(
            select(ExternalReference).where(
                ExternalReference.external_id == "QPTXM8PQNX3Q726ZYHPMNP46XC"
            )
        )
        assert ref is not None
        assert ref.deleted_at is not None
        assert ref.source_version == 3
        updated = customer_of(s, store, "square", "A0AP25A6SCVTH8JES9BX01GXM4")
        assert updated is not None
        assert updated.phone == "+13477947111"
        bob = customer_of(s, store, "shopify", "207119551")
        assert bob is not None
        assert bob.email == "bob.norman@mail.example.com"


def test_two_deliveries_of_one_customer_in_one_batch_newest_wins(
    engine: Engine, store: int
) -> None:
    newer = shopify_customer(7, T0 + dt.timedelta(minutes=5), first_name="New")
    older = shopify_customer(7, T0, first_name="Old")
    # Delivered newest first; in one batch the order of `updated_at` decides, not arrival.
    deliver(engine, [shopify("customers/update", newer), shopify("customers/create", older)])
    # Same version twice: delivery order is the tie-break (the later delivery wins).
    deliver(
        engine,
        [
            square(square_event("customer.updated", "SQX", 3, given_name="First")),
            square(square_event("customer.updated", "SQX", 3, given_name="Second")),
            square(square_event("customer.updated", "SQX", 2, given_name="Older")),
        ],
    )
    assert drain(engine).done == 5
    with Session(engine) as s:
        c7 = customer_of(s, store, "shopify", "7")
        assert c7 is not None
        assert c7.first_name == "New"
        sq = customer_of(s, store, "square", "SQX")
        assert sq is not None
        assert sq.first_name == "Second"


# --- erasure ---------------------------------------------------------------------------------


def test_redact_then_late_update_is_suppressed(engine: Engine, store: int) -> None:
    deliver(engine, [shopify("customers/create", shopify_customer(5, T0, first_name="Eve"))])
    drain(engine)
    redact = {
        "shop_id": 1,
        "shop_domain": SHOP,
        "customer": {"id": 5, "email": "c5@example.com", "phone": None},
        "orders_to_redact": [],
    }
    deliver(engine, [shopify("customers/redact", redact)])
    assert drain(engine).done == 1
    late = shopify_customer(5, T0 + dt.timedelta(days=1), first_name="Eve")
    deliver(engine, [shopify("customers/update", late)])
    # An id never seen before: the redact leaves a tombstone, its late update is suppressed too.
    unknown = {"shop_id": 1, "shop_domain": SHOP, "customer": {"id": 99}}
    deliver(engine, [shopify("customers/redact", unknown)])
    deliver(engine, [shopify("customers/create", shopify_customer(99, T0, first_name="Zed"))])
    assert drain(engine).done == 3
    with Session(engine) as s:
        for cid in ("5", "99"):
            c = customer_of(s, store, "shopify", cid)
            assert c is not None
            assert c.state == "redacted"
            assert c.first_name is None
            assert c.email is None
        assert (
            s.scalar(select(func.count()).select_from(Customer).where(Customer.state == "active"))
            == 0
        )


def test_merge_update_and_redact_in_one_batch_leave_no_pii(engine: Engine, store: int) -> None:
    deliver(
        engine,
        [
            shopify("customers/create", shopify_customer(1, T0, last_name=None)),
            shopify("customers/create", shopify_customer(2, T0, last_name=None)),
        ],
    )
    drain(engine)
    merge = {
        "admin_graphql_api_customer_kept_id": "gid://shopify/Customer/1",
        "admin_graphql_api_customer_deleted_id": "gid://shopify/Customer/2",
    }
    later = T0 + dt.timedelta(minutes=1)
    deliver(
        engine,
        [
            shopify("customers/merge", merge),
            shopify("customers/update", shopify_customer(1, later, last_name="Late")),
            shopify("customers/redact", {"customer": {"id": 1}}),
        ],
    )
    assert drain(engine).done == 3
    with Session(engine) as s:
        people = s.scalars(select(Customer)).all()
        assert len(people) == 2
        for person in people:
            assert person.state in ("redacted", "merged")
            assert person.last_name is None
            assert person.first_name is None
            assert person.email is None


def test_shop_redact_erases_that_sources_customers(engine: Engine, store: int) -> None:
    deliver(
        engine,
        [shopify("customers/create", shopify_customer(i, T0)) for i in range(1, 4)]
        + [square(square_event("customer.created", "SQ1", 0))],
    )
    drain(engine)
    deliver(engine, [shopify("shop/redact", {"shop_id": 1, "shop_domain": SHOP})])
    assert drain(engine).done == 1
    with Session(engine) as s:
        for i in range(1, 4):
            c = customer_of(s, store, "shopify", str(i))
            assert c is not None
            assert c.state == "redacted"
            assert c.email is None
        sq = customer_of(s, store, "square", "SQ1")
        assert sq is not None
        assert sq.state == "active"
        assert sq.email == "sq1@example.com"


def test_data_request_is_done_and_logged_without_pii(engine: Engine, store: int) -> None:
    body = {
        "shop_id": 1,
        "shop_domain": SHOP,
        "orders_requested": [1, 2],
        "customer": {"id": 42, "email": "secret@example.com", "phone": "+15555550100"},
        "data_request": {"id": 9999},
    }
    deliver(engine, [shopify("customers/data_request", body)])
    with structlog.testing.capture_logs() as logs:
        assert drain(engine).done == 1
    events = [e for e in logs if e["event"] == "webhook.data_request"]
    assert len(events) == 1
    entry = events[0]
    assert entry["customer_id"] == "42"
    assert entry["shop"] == SHOP
    assert entry["data_request_id"] == 9999
    assert entry["orders_requested"] == 2
    assert "secret@example.com" not in repr(entry)
    assert "+1555" not in repr(entry)
    with Session(engine) as s:
        row = s.scalars(select(WebhookEvent)).one()
        assert row.status == "done"
        assert row.body


# --- merges ----------------------------------------------------------------------------------


def test_square_merge_leaves_one_live_customer_with_both_histories(
    engine: Engine, store: int
) -> None:
    deliver(
        engine,
        [
            square(square_event("customer.created", "A", 1, email="a@example.com")),
            square(
                square_event(
                    "customer.created", "B", 1, email="b@example.com", phone="+12125550100"
                )
            ),
        ],
    )
    drain(engine)
    with Session(engine) as s:
        card = create_card(s, store_id=store, name="Coffee", stamps_required=10)
        for cid, stamps in (("A", 3), ("B", 4)):
            customer = customer_of(s, store, "square", cid)
            assert customer is not None
            cc, _ = enrol(s, customer=customer, card=card)
            add_stamps(s, customer_card=cc, stamps=stamps, skip_notifications=True)
        s.commit()
    merge = {"from_customer_ids": ["A", "B"], "to_customer_id": "C"}
    events = [
        square(
            square_event(
                "customer.created",
                "C",
                0,
                merge=merge,
                given_name="Merged",
                email="a@example.com",
                phone="+12125550100",
                creation_source="MERGE",
            )
        ),
        square(square_event("customer.deleted", "A", 2, merge=merge, email="a@example.com")),
        square(square_event("customer.deleted", "B", 2, merge=merge, email="b@example.com")),
    ]
    random.Random(1).shuffle(events)
    deliver(engine, events)
    result = drain(engine)
    assert result.done == 3
    assert result.failed == 0
    with Session(engine) as s:
        live = s.scalars(select(Customer).where(Customer.state == "active")).all()
        assert len(live) == 1
        survivor = live[0]
        assert survivor.first_name == "Merged"
        assert survivor.email == "a@example.com"
        assert survivor.phone == "+12125550100"
        for cid in ("A", "B", "C"):
            c = customer_of(s, store, "square", cid)
            assert c is not None
            while c.state == "merged" and c.merged_into_id is not None:
                c = s.get(Customer, c.merged_into_id)
                assert c is not None
            assert c.id == survivor.id
        cards = s.scalars(select(CustomerCard).where(CustomerCard.customer_id == survivor.id)).all()
        assert [cc.stamps for cc in cards] == [7]
        ledger = s.scalars(
            select(StampLedgerEntry).where(StampLedgerEntry.customer_card_id == cards[0].id)
        ).all()
        assert sum(e.delta for e in ledger) == 7
        assert {e.reason for e in ledger} >= {"merge_in"}
        assert (
            s.scalar(select(func.count()).select_from(Customer).where(Customer.state == "merged"))
            == 1
        )


def test_shopify_merge_follows_kept_customer(engine: Engine, store: int) -> None:
    deliver(
        engine,
        [
            shopify("customers/create", shopify_customer(1, T0)),
            shopify("customers/create", shopify_customer(2, T0)),
        ],
    )
    drain(engine)
    merge = {
        "admin_graphql_api_customer_kept_id": "gid://shopify/Customer/1",
        "admin_graphql_api_customer_deleted_id": "gid://shopify/Customer/2",
        "admin_graphql_api_job_id": None,
        "status": "completed",
        "errors": [],
    }
    deliver(engine, [shopify("customers/merge", merge)])
    assert drain(engine).done == 1
    with Session(engine) as s:
        kept = customer_of(s, store, "shopify", "1")
        gone = customer_of(s, store, "shopify", "2")
        assert kept is not None
        assert gone is not None
        assert kept.id == gone.id
        assert kept.state == "active"


def test_a_failed_shopify_merge_changes_nothing(engine: Engine, store: int) -> None:
    """Shopify's documented `customers/merge` sample: the merge failed (one of the customers was
    being merged already); nothing may be merged here."""
    deliver(
        engine,
        [
            shopify("customers/create", shopify_customer(1, T0)),
            shopify("customers/create", shopify_customer(2, T0)),
        ],
    )
    drain(engine)
    sample = {
        "admin_graphql_api_customer_kept_id": "gid://shopify/Customer/1",
        "admin_graphql_api_customer_deleted_id": "gid://shopify/Customer/2",
        "admin_graphql_api_job_id": None,
        "status": "failed",
        "errors": [
            {
                "customer_ids": [1],
                "field": "merge_in_progress",
                "message": "John Doe is currently being merged.",
            }
        ],
    }
    deliver(engine, [shopify("customers/merge", sample)])
    assert drain(engine).done == 1
    with Session(engine) as s:
        one = customer_of(s, store, "shopify", "1")
        two = customer_of(s, store, "shopify", "2")
        assert one is not None
        assert two is not None
        assert one.id != two.id
        assert (one.state, two.state) == ("active", "active")


# --- failures --------------------------------------------------------------------------------


def test_unmappable_row_fails_alone(engine: Engine, store: int) -> None:
    deliver(
        engine,
        [
            shopify("customers/create", shopify_customer(1, T0)),
            shopify("customers/update", {"first_name": "no id"}),
            Delivery(
                source="shopify",
                dedupe_key="not-json",
                body="[1, 2",
                topic="customers/update",
                account=SHOP,
            ),
            square({"type": "customer.updated", "merchant_id": MERCHANT, "data": "nope"}),
            shopify("customers/create", shopify_customer(2, T0)),
        ],
    )
    result = drain(engine)
    assert (result.done, result.failed, result.retried) == (2, 3, 0)
    with Session(engine) as s:
        failed = s.scalars(select(WebhookEvent).where(WebhookEvent.status == "failed")).all()
        assert len(failed) == 3
        assert all(f.last_error and f.last_error.startswith("unmappable") for f in failed)
        assert customer_of(s, store, "shopify", "1") is not None
        assert customer_of(s, store, "shopify", "2") is not None
    assert drain(engine).claimed == 0  # never retried


def test_failure_retries_with_backoff_then_parks_as_failed(
    engine: Engine, store: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver(engine, [shopify("customers/create", shopify_customer(i, T0)) for i in (1, 2)])

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("store is on fire")

    monkeypatch.setattr(wp, "apply_customer_page", broken)
    clock = [utcnow()]
    for attempt in range(1, wp.MAX_ATTEMPTS + 1):
        result = drain(engine, now=lambda: clock[0])
        assert result.claimed == 2
        with Session(engine) as s:
            rows = s.scalars(select(WebhookEvent)).all()
            assert all(r.attempts == attempt for r in rows)
            assert all("store is on fire" in (r.last_error or "") for r in rows)
            if attempt < wp.MAX_ATTEMPTS:
                assert result.retried == 2
                assert {r.status for r in rows} == {"pending"}
                assert all(r.next_attempt_at == clock[0] + wp.backoff(attempt) for r in rows)
        assert drain(engine, now=lambda: clock[0]).claimed == 0  # not due yet
        clock[0] += wp.backoff(attempt)
    assert result.failed == 2
    assert statuses(engine) == {"failed": 2}
    assert wp.backoff(1) < wp.backoff(2) < wp.backoff(3)
    assert wp.backoff(50) == wp.BACKOFF_MAX
    # Fixed: replay puts them back, and they go through.
    monkeypatch.undo()
    with Session(engine) as s:
        assert wp.replay(s) == 2
        s.commit()
    assert drain(engine).done == 2
    with Session(engine) as s:
        assert {r.attempts for r in s.scalars(select(WebhookEvent))} == {1}


def test_a_poison_row_does_not_hold_back_its_batch(
    engine: Engine, store: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver(
        engine,
        [
            shopify("customers/create", shopify_customer(1, T0)),
            shopify("customers/redact", {"customer": {"id": 666}}),
            shopify("customers/create", shopify_customer(2, T0)),
        ],
    )
    real = wp.lifecycle.erase_reference

    def erase(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("erasure broke")

    monkeypatch.setattr(wp.lifecycle, "erase_reference", erase)
    result = drain(engine)
    assert (result.done, result.retried) == (2, 1)
    monkeypatch.setattr(wp.lifecycle, "erase_reference", real)
    with Session(engine) as s:
        assert customer_of(s, store, "shopify", "1") is not None
        row = s.scalars(select(WebhookEvent).where(WebhookEvent.status == "pending")).one()
        assert row.topic == "customers/redact"
        assert "erasure broke" in (row.last_error or "")


# --- routing ---------------------------------------------------------------------------------


def test_unroutable_rows_are_ignored_and_ambiguous_ones_go_to_every_store(
    engine: Engine, make_store: Callable[..., tuple[int, str]], crypto_key: bytes
) -> None:
    first, _ = make_store()
    second, _ = make_store()
    _connect(engine, first, "shopify", SHOP, crypto_key)
    _connect(engine, second, "shopify", SHOP, crypto_key)
    deliver(engine, [shopify("customers/create", shopify_customer(1, T0))])
    with Session(engine) as s:  # two stores connect the shop: the API stored no route
        row = s.scalars(select(WebhookEvent)).one()
        assert row.store_id is None
        assert row.status == "pending"
        # A row whose shop was disconnected since it was accepted.
        s.add(
            WebhookEvent(
                source="shopify",
                dedupe_key="orphan",
                topic="customers/create",
                account="gone.myshopify.com",
                status="pending",
                body=json.dumps(shopify_customer(2, T0)),
                headers={},
            )
        )
        s.commit()
    result = drain(engine)
    assert (result.done, result.ignored) == (1, 1)
    with Session(engine) as s:
        for store_id in (first, second):
            c = customer_of(s, store_id, "shopify", "1")
            assert c is not None
            assert c.store_id == store_id
        orphan = s.scalars(select(WebhookEvent).where(WebhookEvent.dedupe_key == "orphan")).one()
        assert orphan.status == "ignored"
        assert "no enabled connection" in (orphan.last_error or "")


# --- sweep, replay, list, render -------------------------------------------------------------


def test_sweep_requeues_expired_leases(engine: Engine, store: int) -> None:
    deliver(engine, [shopify("customers/create", shopify_customer(i, T0)) for i in (1, 2, 3)])
    now = utcnow()
    with Session(engine) as s:
        rows = s.scalars(select(WebhookEvent).order_by(WebhookEvent.id)).all()
        # A worker died 10 minutes ago holding two rows; one row is claimed right now.
        for row, claimed_at, attempts in (
            (rows[0], now - dt.timedelta(minutes=10), 1),
            (rows[1], now - dt.timedelta(minutes=10), wp.MAX_ATTEMPTS),
            (rows[2], now - dt.timedelta(seconds=30), 1),
        ):
            row.status, row.next_attempt_at, row.attempts = "processing", claimed_at, attempts
        s.commit()
        ids = [r.id for r in rows]
    with Session(engine) as s:
        assert wp.sweep(s, now=now) == 2
        s.commit()
    with Session(engine) as s:
        got = {r.id: r for r in s.scalars(select(WebhookEvent))}
        assert got[ids[0]].status == "pending"
        assert got[ids[0]].next_attempt_at == now
        assert got[ids[1]].status == "failed"
        assert got[ids[2]].status == "processing"
    result = drain(engine)
    assert result.done == 1
    with Session(engine) as s:
        assert wp.sweep(s, now=now + dt.timedelta(minutes=6)) == 1
        s.commit()
    assert drain(engine, now=lambda: now + dt.timedelta(minutes=6)).done == 1
    assert statuses(engine) == {"done": 2, "failed": 1}


def test_replay_list_and_render(engine: Engine, store: int) -> None:
    deliver(
        engine,
        [
            shopify("customers/create", shopify_customer(1, T0)),
            shopify("customers/update", {"no": "id"}),
        ],
    )
    drain(engine)
    with Session(engine) as s:
        failed = wp.list_events(s, status="failed")
        assert len(failed) == 1
        done = wp.list_events(s, status="done", store_id=store)
        assert len(done) == 1
        assert len(wp.list_events(s, limit=1)) == 1
        assert wp.list_events(s, store_id=store + 1000) == []
        view = wp.render_event(failed[0])
        assert "body" not in view
        assert view["status"] == "failed"
        assert view["attempts"] == 1
        assert view["topic"] == "customers/update"
        assert view["store_id"] == store
        json.dumps(view)
        full = wp.render_event(failed[0], with_body=True)
        assert json.loads(full["body"]) == {"no": "id"}
        # One row by id, any status but pending/processing.
        done_id = done[0].id
        assert wp.replay(s, event_id=done_id) == 1
        s.commit()
    with Session(engine) as s:
        row = s.get(WebhookEvent, done_id)
        assert row is not None
        assert row.status == "pending"
        assert row.attempts == 0
        assert wp.replay(s, event_id=row.id) == 0  # pending: nothing to do
        with pytest.raises(ValueError):
            wp.replay(s, status="processing")
        assert wp.replay(s, status="failed") == 1
        s.commit()
    result = drain(engine)
    assert (result.done, result.failed) == (1, 1)
    assert result.as_dict()["claimed"] == 2


# --- concurrency -----------------------------------------------------------------------------


@pytest.mark.postgres_only
def test_concurrent_drains_process_every_row_exactly_once(engine: Engine, store: int) -> None:
    deliveries = [
        shopify(
            "customers/create" if i % 2 else "customers/update",
            shopify_customer(i % 400, T0 + dt.timedelta(seconds=i)),
        )
        for i in range(1000)
    ]
    deliver(engine, deliveries)
    results: list[wp.DrainResult] = []
    errors: list[Exception] = []
    factory = make_sessionmaker(engine)
    barrier = threading.Barrier(2)

    def run() -> None:
        try:
            barrier.wait()
            results.append(wp.drain(factory, batch_size=50))
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sum(r.claimed for r in results) == 1000
    assert sum(r.done for r in results) == 1000
    assert all(r.claimed > 0 for r in results)  # both workers took part
    with Session(engine) as s:
        rows = s.execute(select(WebhookEvent.status, WebhookEvent.attempts)).all()
        assert len(rows) == 1000
        assert {(status, attempts) for status, attempts in rows} == {("done", 1)}
        assert s.scalar(select(func.count()).select_from(Customer)) == 400
        newest = customer_of(s, store, "shopify", "0")
        assert newest is not None
