"""models/ingest.py and models/lifecycle.py on SQLite and PostgreSQL: the bulk upsert of foreign
customer records (identity, conflicts, stale guard, ownership, tombstones), merges and erasure."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from connectors.records import ForeignCustomer
from models.cards import add_stamps, create_card, enrol, ledger_sum
from models.customers import CustomerFields, create_customer, list_customers
from models.db import make_sessionmaker
from models.ingest import IngestPolicy, PageCounts, apply_customer_page, content_hash
from models.lifecycle import erase_customer, erase_reference, follow_merge, merge_customers
from models.tables import (
    Customer,
    ExternalReference,
    StampLedgerEntry,
    SyncConflict,
)
from tests.test_store_concurrency import run_concurrently

MakeStore = Callable[..., tuple[int, str]]
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def rec(external_id: str, source: str = "shopify", **fields: Any) -> ForeignCustomer:
    fields.setdefault("source_updated_at", T0)
    return ForeignCustomer(source=source, external_id=external_id, **fields)


def apply(session: Session, store_id: int, *records: ForeignCustomer, **kwargs: Any) -> PageCounts:
    counts = apply_customer_page(session, store_id=store_id, records=records, **kwargs)
    session.commit()
    session.expire_all()  # the page was written with Core statements, not through these objects
    return counts


def customer_of(session: Session, store_id: int, source: str, external_id: str) -> Customer:
    page = list_customers(session, store_id=store_id, source=source, external_id=external_id)
    assert page.items, f"no customer for {source}/{external_id}"
    return page.items[0]


def count(session: Session, model: Any, *where: Any) -> int:
    return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def live_customers(session: Session, store_id: int) -> int:
    return count(
        session, Customer, Customer.store_id == store_id, Customer.state.in_(("active", "excluded"))
    )


# --- create, update, unchanged ----------------------------------------------------------------


def test_first_page_creates_customers_with_references_and_normalised_fields(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    counts = apply(
        session,
        store_id,
        rec(
            "1",
            first_name="Ada",
            last_name="Lovelace",
            email="ADA@Example.com",
            phone="(212) 555-0101",
            birthday="--12-10",
            attributes={"tags": ["vip"], "state": "enabled", "note": None},
        ),
        rec("2", first_name="Bob", email="bob@example.com"),
    )
    assert counts.as_dict() | {} == {
        "seen": 2,
        "created": 2,
        "updated": 0,
        "linked": 0,
        "unchanged": 0,
        "conflicts": 0,
        "deleted": 0,
        "merged": 0,
        "stale": 0,
        "suppressed": 0,
    }
    ada = customer_of(session, store_id, "shopify", "1")
    assert (ada.first_name, ada.last_name, ada.email, ada.phone) == (
        "Ada",
        "Lovelace",
        "ada@example.com",
        "+12125550101",
    )
    assert (ada.birth_year, ada.birth_month, ada.birth_day) == (None, 12, 10)
    assert "ada lovelace" in ada.search_text
    ref = ada.external_references[0]
    assert ref.metadata_ == {"tags": ["vip"], "state": "enabled"}  # None never stored
    assert ref.source_updated_at == T0
    assert ref.content_hash


def test_same_page_again_is_unchanged_and_writes_nothing(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    page = [rec(str(i), first_name=f"N{i}", email=f"n{i}@example.com") for i in range(20)]
    apply(session, store_id, *page)
    before = session.execute(select(ExternalReference.id, ExternalReference.updated_at)).all()
    counts = apply(session, store_id, *page)
    assert (counts.seen, counts.unchanged, counts.created, counts.updated) == (20, 20, 0, 0)
    after = session.execute(select(ExternalReference.id, ExternalReference.updated_at)).all()
    assert sorted(before) == sorted(after)
    assert live_customers(session, store_id) == 20


def test_changed_record_updates_only_what_it_sends(session: Session, make_store: MakeStore) -> None:
    store_id, _ = make_store()
    apply(
        session,
        store_id,
        rec(
            "1",
            first_name="Ada",
            last_name="L",
            email="ada@example.com",
            phone="+12125550101",
            attributes={"tags": ["a"], "state": "enabled"},
        ),
    )
    counts = apply(
        session,
        store_id,
        rec(
            "1",
            first_name="Ada",
            email="ada@new.example.com",
            source_updated_at=T0 + dt.timedelta(hours=1),
            attributes={"tags": ["b"]},
        ),
    )
    assert counts.updated == 1
    ada = customer_of(session, store_id, "shopify", "1")
    session.refresh(ada)
    # Absent fields (last name, phone) are kept; the metadata is merged shallowly.
    assert (ada.last_name, ada.email, ada.phone) == ("L", "ada@new.example.com", "+12125550101")
    ref = ada.external_references[0]
    session.refresh(ref)
    assert ref.metadata_ == {"tags": ["b"], "state": "enabled"}
    assert ref.source_updated_at == T0 + dt.timedelta(hours=1)


def test_first_name_falls_back_to_nickname_company_then_email_local_part(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    apply(
        session,
        store_id,
        rec("1", nickname="Bobby", company_name="ACME", email="bob@example.com"),
        rec("2", company_name="ACME", email="carol@example.com"),
        rec("3", email="dave.smith@example.com"),
        rec("4", phone="+12125550104"),
    )
    names = [customer_of(session, store_id, "shopify", str(i)).first_name for i in range(1, 5)]
    assert names == ["Bobby", "ACME", "dave.smith", None]
    # A later real first name replaces the fallback.
    apply(
        session,
        store_id,
        rec(
            "3",
            first_name="Dave",
            email="dave.smith@example.com",
            source_updated_at=T0 + dt.timedelta(1),
        ),
    )
    assert customer_of(session, store_id, "shopify", "3").first_name == "Dave"


def test_invalid_source_values_are_absent_not_errors(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    counts = apply(
        session,
        store_id,
        rec(
            "1",
            first_name="A\x00da",
            email="not-an-email",
            phone="+12125550101",
            birthday="2023-02-30",
            attributes={"note": "x\x00y"},
        ),
    )
    assert counts.created == 1
    ada = customer_of(session, store_id, "shopify", "1")
    assert (ada.first_name, ada.email, ada.phone, ada.birth_month) == (
        "Ada",
        None,
        "+12125550101",
        None,
    )
    assert ada.external_references[0].metadata_ == {"note": "xy"}


def test_a_page_repeating_a_record_keeps_the_newest(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    counts = apply(
        session,
        store_id,
        rec("1", first_name="New", email="a@example.com", source_updated_at=T0 + dt.timedelta(1)),
        rec("1", first_name="Old", email="a@example.com", source_updated_at=T0),
    )
    assert (counts.seen, counts.created, counts.unchanged) == (2, 1, 1)
    assert customer_of(session, store_id, "shopify", "1").first_name == "New"


# --- identity: linking and conflicts --------------------------------------------------------


def test_links_by_email_then_phone_to_existing_customers(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    by_email = create_customer(
        session,
        store_id=store_id,
        fields=CustomerFields(first_name="E", email="e@example.com"),
    ).customer
    by_phone = create_customer(
        session,
        store_id=store_id,
        fields=CustomerFields(first_name="P", phone="+12125550102"),
    ).customer
    session.commit()
    counts = apply(
        session,
        store_id,
        rec("10", source="square", email="E@EXAMPLE.COM", version=1),
        rec("11", source="square", phone="212-555-0102", email="p@example.com", version=1),
    )
    assert (counts.linked, counts.created) == (2, 0)
    assert customer_of(session, store_id, "square", "10").id == by_email.id
    p = customer_of(session, store_id, "square", "11")
    assert p.id == by_phone.id
    session.refresh(p)
    assert p.email == "p@example.com"  # the source owns what it sends: a new email is added
    assert live_customers(session, store_id) == 2


def test_records_in_one_page_sharing_an_email_become_one_customer(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    counts = apply(
        session,
        store_id,
        rec("1", source="square", first_name="A", email="same@example.com"),
        rec("2", source="shopify", first_name="A", email="same@example.com", phone="+12125550103"),
    )
    assert (counts.created, counts.linked) == (1, 1)
    one = customer_of(session, store_id, "square", "1")
    assert customer_of(session, store_id, "shopify", "2").id == one.id
    session.refresh(one)
    assert one.phone == "+12125550103"


def test_conflicts_are_recorded_not_written_and_resolve_later(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    e = create_customer(
        session, store_id=store_id, fields=CustomerFields(first_name="E", email="e@example.com")
    ).customer
    p = create_customer(
        session, store_id=store_id, fields=CustomerFields(first_name="P", phone="+12125550102")
    ).customer
    session.commit()
    counts = apply(
        session,
        store_id,
        rec("1", first_name="Nobody"),  # neither email nor phone
        rec("2", email="e@example.com", phone="+12125550102"),  # two different customers
        rec("3", first_name="Ok", email="ok@example.com"),
    )
    assert (counts.conflicts, counts.created) == (2, 1)
    rows = {
        c.external_id: c
        for c in session.scalars(select(SyncConflict).where(SyncConflict.store_id == store_id))
    }
    assert rows["1"].kind == "no_contact"
    assert rows["2"].kind == "email_phone_split"
    assert rows["2"].customer_ids == sorted([e.id, p.id])
    assert "e@example.com" not in rows["2"].detail  # no PII in conflicts
    assert count(session, ExternalReference, ExternalReference.external_id.in_(["1", "2"])) == 0
    # Seen again: one row, counted twice.
    apply(session, store_id, rec("1", first_name="Nobody", source_updated_at=T0))
    session.refresh(rows["1"])
    assert rows["1"].occurrences == 2
    # Fixed at the source: written, and the conflict is resolved.
    counts = apply(session, store_id, rec("1", first_name="Nobody", email="nb@example.com"))
    assert counts.created == 1
    session.refresh(rows["1"])
    assert rows["1"].resolved_at is not None


def test_an_update_taking_another_customers_email_is_a_conflict(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    apply(
        session,
        store_id,
        rec("1", first_name="A", email="a@example.com"),
        rec("2", first_name="B", email="b@example.com"),
    )
    counts = apply(
        session,
        store_id,
        rec("1", first_name="A2", email="b@example.com", source_updated_at=T0 + dt.timedelta(1)),
    )
    assert (counts.conflicts, counts.updated) == (1, 0)
    assert customer_of(session, store_id, "shopify", "1").first_name == "A"
    conflict = session.scalars(select(SyncConflict)).one()
    assert (conflict.kind, conflict.external_id) == ("email_taken", "1")


def test_email_only_identity_keeps_a_shared_phone_on_the_reference(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    policy = IngestPolicy(match_by=("email",))
    counts = apply(
        session,
        store_id,
        rec("1", source="loke", first_name="A", email="a@example.com", phone="+12125550101"),
        rec("2", source="loke", first_name="B", email="b@example.com", phone="+12125550101"),
        policy=policy,
    )
    assert (counts.created, counts.linked, counts.conflicts) == (2, 0, 0)
    a = customer_of(session, store_id, "loke", "1")
    b = customer_of(session, store_id, "loke", "2")
    assert a.id != b.id
    assert (a.phone, b.phone) == ("+12125550101", None)
    assert b.external_references[0].metadata_["phone"] == "+12125550101"


# --- stale guard and ownership ----------------------------------------------------------------


def test_stale_updates_change_nothing(session: Session, make_store: MakeStore) -> None:
    store_id, _ = make_store()
    apply(
        session,
        store_id,
        rec("sq", source="square", first_name="V5", email="v@example.com", version=5),
    )
    apply(
        session,
        store_id,
        rec(
            "sh",
            first_name="New",
            email="s@example.com",
            source_updated_at=dt.datetime.fromisoformat("2026-01-01T10:00:00+00:00"),
        ),
    )
    counts = apply(
        session,
        store_id,
        rec("sq", source="square", first_name="V4", email="v@example.com", version=4),
        # 05:00-04:00 is 09:00 UTC: older, although the wall-clock text looks later.
        rec(
            "sh",
            first_name="Old",
            email="s@example.com",
            source_updated_at=dt.datetime.fromisoformat("2026-01-01T05:00:00-04:00"),
        ),
    )
    assert (counts.stale, counts.updated) == (2, 0)
    assert customer_of(session, store_id, "square", "sq").first_name == "V5"
    assert customer_of(session, store_id, "shopify", "sh").first_name == "New"
    counts = apply(
        session,
        store_id,
        rec("sq", source="square", first_name="V6", email="v@example.com", version=6),
    )
    assert counts.updated == 1


def test_field_ownership_and_excluded_state_are_respected(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    apply(session, store_id, rec("1", first_name="Ada", last_name="L", email="a@example.com"))
    ada = customer_of(session, store_id, "shopify", "1")
    ada.state = "excluded"
    session.commit()
    policy = IngestPolicy(owned_fields=frozenset({"last_name"}))
    apply(
        session,
        store_id,
        rec(
            "1",
            first_name="Changed",
            last_name="Lovelace",
            email="other@example.com",
            source_updated_at=T0 + dt.timedelta(1),
        ),
        policy=policy,
    )
    session.refresh(ada)
    assert (ada.first_name, ada.last_name, ada.email, ada.state) == (
        "Ada",
        "Lovelace",
        "a@example.com",
        "excluded",
    )


def test_content_hash_depends_on_content_not_on_timestamps() -> None:
    a = rec("1", email="a@example.com", attributes={"x": 1, "y": 2})
    b = rec(
        "1",
        email="a@example.com",
        attributes={"y": 2, "x": 1},
        source_updated_at=T0 + dt.timedelta(1),
    )
    c = rec("1", email="b@example.com")
    policy = IngestPolicy()
    assert content_hash(a, policy) == content_hash(b, policy) != content_hash(c, policy)


# --- deletes, merges, erasure -----------------------------------------------------------------


def test_source_delete_tombstones_the_reference_and_keeps_loyalty(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    apply(session, store_id, rec("1", first_name="Ada", email="a@example.com"))
    ada = customer_of(session, store_id, "shopify", "1")
    card = create_card(session, store_id=store_id, name="Coffee", stamps_required=10)
    cc, _ = enrol(session, customer=ada, card=card)
    add_stamps(session, customer_card=cc, stamps=3, idempotency_key="k1")
    session.commit()
    counts = apply(
        session, store_id, rec("1", deleted=True, source_updated_at=T0 + dt.timedelta(1))
    )
    assert counts.deleted == 1
    ref = session.scalars(select(ExternalReference)).one()
    assert ref.deleted_at is not None
    session.refresh(ada)
    assert ada.state == "active"
    assert ada.email == "a@example.com"
    assert ledger_sum(session, customer_card_id=cc.id) == 3
    # Deleting again changes nothing.
    assert (
        apply(
            session, store_id, rec("1", deleted=True, source_updated_at=T0 + dt.timedelta(1))
        ).deleted
        == 0
    )


def test_erasure_wipes_pii_keeps_ledger_and_a_later_pull_does_not_resurrect(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    apply(
        session,
        store_id,
        rec(
            "1",
            first_name="Ada",
            last_name="L",
            email="a@example.com",
            phone="+12125550101",
            birthday="1990-01-02",
            attributes={"tags": ["x"]},
        ),
    )
    ada = customer_of(session, store_id, "shopify", "1")
    card = create_card(session, store_id=store_id, name="Coffee", stamps_required=10)
    cc, _ = enrol(session, customer=ada, card=card)
    add_stamps(session, customer_card=cc, stamps=4, idempotency_key="k1")
    session.commit()
    erase_reference(session, store_id=store_id, source="shopify", external_id="1")
    session.commit()
    session.refresh(ada)
    assert ada.state == "redacted"
    assert (ada.first_name, ada.last_name, ada.email, ada.phone, ada.birth_year) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert ada.search_text == ""
    assert ada.metadata_ == {}
    assert ledger_sum(session, customer_card_id=cc.id) == 4
    assert count(session, StampLedgerEntry) == 1
    ref = session.scalars(select(ExternalReference)).one()
    assert ref.deleted_at is not None
    assert ref.metadata_ == {}
    # The source still has the record (or a late update arrives): it is suppressed.
    counts = apply(
        session,
        store_id,
        rec("1", first_name="Ada", email="a@example.com", source_updated_at=T0 + dt.timedelta(1)),
    )
    assert counts.suppressed == 1
    assert live_customers(session, store_id) == 0
    assert list_customers(session, store_id=store_id, search="ada").total_count == 0


def test_erasure_of_an_unknown_id_leaves_a_tombstone(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    erase_reference(session, store_id=store_id, source="shopify", external_id="99")
    session.commit()
    counts = apply(session, store_id, rec("99", first_name="Z", email="z@example.com"))
    assert counts.suppressed == 1
    assert live_customers(session, store_id) == 0


def test_merge_moves_references_and_balances_with_ledger_entries(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    apply(
        session,
        store_id,
        rec("a", source="square", first_name="A", email="a@example.com"),
        rec("b", source="square", first_name="B", phone="+12125550102"),
    )
    a = customer_of(session, store_id, "square", "a")
    b = customer_of(session, store_id, "square", "b")
    coffee = create_card(session, store_id=store_id, name="Coffee", stamps_required=10)
    tea = create_card(session, store_id=store_id, name="Tea", stamps_required=5)
    cc_a, _ = enrol(session, customer=a, card=coffee)
    cc_b, _ = enrol(session, customer=b, card=coffee)
    tea_b, _ = enrol(session, customer=b, card=tea)
    add_stamps(session, customer_card=cc_a, stamps=2, idempotency_key="a1")
    add_stamps(session, customer_card=cc_b, stamps=5, idempotency_key="b1")
    add_stamps(session, customer_card=tea_b, stamps=1, idempotency_key="b2")
    session.commit()
    assert follow_merge(
        session, store_id=store_id, source="square", loser_external_id="b", winner_external_id="a"
    )
    session.commit()
    session.refresh(a)
    session.refresh(b)
    assert (b.state, b.merged_into_id, b.email, b.phone) == ("merged", a.id, None, None)
    assert a.phone == "+12125550102"  # the winner lacked a phone: taken over
    assert customer_of(session, store_id, "square", "b").id == a.id
    balances = {cc.card_id: cc.stamps for cc in a.customer_cards}
    assert balances == {coffee.id: 7, tea.id: 1}
    for cc in a.customer_cards:
        assert ledger_sum(session, customer_card_id=cc.id) == cc.stamps
    assert ledger_sum(session, customer_card_id=cc_b.id) == 0
    reasons = sorted(session.scalars(select(StampLedgerEntry.reason)).all())
    assert reasons.count("merge_in") == 1
    assert reasons.count("merge_out") == 1
    assert live_customers(session, store_id) == 1
    # Merging again (a replayed event) changes nothing.
    assert not follow_merge(
        session, store_id=store_id, source="square", loser_external_id="b", winner_external_id="a"
    )
    session.commit()
    assert count(session, StampLedgerEntry) == 5


def test_merged_into_records_follow_the_merge_in_a_page(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    apply(
        session,
        store_id,
        rec("old", source="appystamp", first_name="O", email="o@example.com"),
        rec("new", source="appystamp", first_name="N", email="n@example.com"),
    )
    counts = apply(
        session,
        store_id,
        rec(
            "old",
            source="appystamp",
            first_name="O",
            email="o@example.com",
            merged_into="new",
            source_updated_at=T0 + dt.timedelta(1),
        ),
    )
    assert counts.merged == 1
    assert live_customers(session, store_id) == 1
    survivor = customer_of(session, store_id, "appystamp", "new")
    assert customer_of(session, store_id, "appystamp", "old").id == survivor.id
    # A merged-away record never seen before only leaves a tombstone on the survivor.
    counts = apply(
        session, store_id, rec("gone", source="appystamp", email="g@example.com", merged_into="new")
    )
    assert (counts.created, counts.merged) == (0, 0)
    assert customer_of(session, store_id, "appystamp", "gone").id == survivor.id
    assert live_customers(session, store_id) == 1


def test_erasing_a_survivor_erases_the_customers_merged_into_it(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    apply(
        session,
        store_id,
        rec("a", first_name="A", email="a@example.com"),
        rec("b", first_name="B", email="b@example.com"),
    )
    a = customer_of(session, store_id, "shopify", "a")
    b = customer_of(session, store_id, "shopify", "b")
    merge_customers(session, store_id=store_id, winner_id=a.id, loser_id=b.id)
    erase_customer(session, store_id=store_id, customer_id=b.id)  # follows to the survivor
    session.commit()
    session.refresh(a)
    session.refresh(b)
    assert a.state == b.state == "redacted"
    assert b.first_name is None
    assert a.first_name is None


def test_dry_run_counts_and_writes_nothing(session: Session, make_store: MakeStore) -> None:
    store_id, _ = make_store()
    apply(session, store_id, rec("1", first_name="A", email="a@example.com"))
    counts = apply(
        session,
        store_id,
        rec("1", first_name="A2", email="a@example.com", source_updated_at=T0 + dt.timedelta(1)),
        rec("2", first_name="B", email="b@example.com"),
        rec("3", first_name="C"),
        dry_run=True,
    )
    assert (counts.updated, counts.created, counts.conflicts) == (1, 1, 1)
    assert count(session, Customer) == 1
    assert count(session, SyncConflict) == 0
    assert customer_of(session, store_id, "shopify", "1").first_name == "A"


# --- concurrency ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [8])
def test_concurrent_upserts_of_one_external_id_make_one_customer(
    engine: Engine, make_store: MakeStore, n: int
) -> None:
    store_id, _ = make_store()

    def work(session: Session, i: int) -> PageCounts:
        return apply_customer_page(
            session,
            store_id=store_id,
            records=[
                rec(
                    "same",
                    first_name=f"W{i}",
                    email="same@example.com",
                    source_updated_at=T0 + dt.timedelta(seconds=i),
                ),
                rec(f"own-{i}", first_name=f"O{i}", email=f"own{i}@example.com"),
            ],
        )

    outcomes = run_concurrently(engine, n, work)
    assert [o.error for o in outcomes] == [None] * n
    with make_sessionmaker(engine)() as s:
        assert count(s, ExternalReference, ExternalReference.external_id == "same") == 1
        assert live_customers(s, store_id) == n + 1
        total = sum(
            o.value.created + o.value.updated + o.value.stale + o.value.unchanged for o in outcomes
        )
        assert total == 2 * n
        # Whatever the order they ran in, the newest version won (older ones came in stale).
        assert customer_of(s, store_id, "shopify", "same").first_name == f"W{n - 1}"


def test_oversized_attributes_are_trimmed_and_bad_text_made_storable(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    tags = [f"tag-{i:05d}-{'x' * 40}" for i in range(1000)]  # ~50 KB
    counts = apply(
        session,
        store_id,
        rec(
            "1",
            first_name="Bad\ud800Name",
            email="a@example.com",
            attributes={"tags": tags, "state": "enabled", "note": "n\ud800"},
        ),
    )
    assert counts.created == 1
    customer = customer_of(session, store_id, "shopify", "1")
    assert customer.first_name == "Bad?Name"
    metadata = customer.external_references[0].metadata_
    assert metadata["state"] == "enabled"
    assert metadata["note"] == "n?"
    assert "tags" not in metadata  # dropped (and logged) rather than failing the page


def test_a_delete_that_overtakes_its_create_keeps_the_record_deleted(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    counts = apply(
        session, store_id, rec("9", deleted=True, source_updated_at=T0 + dt.timedelta(1))
    )
    assert counts.deleted == 1
    # The create (older than the delete) arrives late: stale, nobody appears.
    counts = apply(session, store_id, rec("9", first_name="Late", email="late@example.com"))
    assert counts.stale == 1
    assert live_customers(session, store_id) == 0
    assert list_customers(session, store_id=store_id).total_count == 0
    # Something newer than the delete is a person after all.
    counts = apply(
        session,
        store_id,
        rec(
            "9", first_name="Back", email="back@example.com", source_updated_at=T0 + dt.timedelta(2)
        ),
    )
    assert counts.created == 1
    back = customer_of(session, store_id, "shopify", "9")
    assert (back.first_name, back.email, back.state) == ("Back", "back@example.com", "active")
    assert back.external_references[0].deleted_at is None


def test_a_remembered_delete_later_matching_an_existing_customer_links_to_it(
    session: Session, make_store: MakeStore
) -> None:
    store_id, _ = make_store()
    apply(session, store_id, rec("1", first_name="Ann", email="ann@example.com"))
    apply(session, store_id, rec("2", deleted=True, source_updated_at=T0))
    counts = apply(
        session,
        store_id,
        rec("2", first_name="Ann", email="ann@example.com", source_updated_at=T0 + dt.timedelta(1)),
    )
    assert counts.linked == 1
    assert (
        customer_of(session, store_id, "shopify", "2").id
        == customer_of(session, store_id, "shopify", "1").id
    )
    assert live_customers(session, store_id) == 1
