"""Appy Stamp imports end to end: the fake (in process, or over HTTP for the CLI), the real sync
run, ingest and balances, on SQLite and PostgreSQL.

Time never really passes: the rate budget and the client's retry backoff sleep on a FakeClock.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from connectors.ratelimit import LocalBudget
from connectors.records import ForeignCustomer
from models.balances import import_ledger, set_balance
from models.cards import create_card
from models.connections import connect
from models.db import make_sessionmaker
from models.ingest import apply_customer_page
from models.tables import (
    Connection,
    Customer,
    CustomerCard,
    ExternalReference,
    OutboxMessage,
    StampLedgerEntry,
)
from tests.fakes.appystamp import API_KEY, API_SECRET, BASE_URL, FakeAppyStamp, encode_cursor
from tests.fakes.shopify import FakeClock
from worker.settings import Settings
from worker.sync import SyncSummary, run_customer_sync

KEY = Fernet.generate_key()


@dataclass
class Harness:
    engine: Engine
    settings: Settings
    fake: FakeAppyStamp = field(default_factory=lambda: FakeAppyStamp(seed=3))
    clock: FakeClock = field(default_factory=FakeClock)
    sessions: sessionmaker[Session] = field(init=False)
    budget: LocalBudget = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = make_sessionmaker(self.engine)
        self.budget = LocalBudget(
            capacity=10_000, refill_per_second=1000, clock=self.clock, sleep=self.clock.sleep
        )

    def card(self, store_id: int, initial_stamps: int = 2) -> int:
        with self.sessions() as session:
            card = create_card(
                session,
                store_id=store_id,
                name="Coffee",
                stamps_required=10,
                initial_stamps=initial_stamps,
            )
            session.commit()
            return card.id

    def connect(self, store_id: int, card_id: int | None = None) -> int:
        with self.sessions() as session:
            row, _ = connect(
                session,
                store_id=store_id,
                source="appystamp",
                account="",
                secrets={"api_key": API_KEY, "api_secret": API_SECRET},
                api_base_url=BASE_URL,
                api_version=None,
                key=KEY,
                config={"card_id": card_id} if card_id is not None else None,
            )
            session.commit()
            return row.id

    def sync(
        self,
        connection_id: int,
        *,
        fake: FakeAppyStamp | None = None,
        transport: httpx.BaseTransport | None = None,
        **kwargs: Any,
    ) -> SyncSummary:
        return run_customer_sync(
            self.sessions,
            connection_id=connection_id,
            settings=self.settings,
            key=KEY,
            transport=transport or httpx.MockTransport((fake or self.fake).handle),
            budget=self.budget,
            sleep=self.clock.sleep,
            **kwargs,
        )


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(DATABASE_URL=db_url, LOG_FORMAT="json")


@pytest.fixture
def h(engine: Engine, settings: Settings) -> Harness:
    return Harness(engine, settings)


class FailAfterLists(httpx.BaseTransport):
    """Passes requests to the fake until `ok` customer pages were served, then answers the
    next customer page with a non-retriable 400 (a crash mid-run)."""

    def __init__(self, fake: FakeAppyStamp, ok: int) -> None:
        self.fake = fake
        self.ok = ok

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/customers") and self.fake.list_requests >= self.ok:
            return httpx.Response(
                400, json={"success": False, "error": {"code": "BOOM"}}, request=request
            )
        response = self.fake.handle(request)
        response.read()
        return response


# --- helpers ----------------------------------------------------------------------------------


def customers_by_ref(engine: Engine, store_id: int) -> dict[str, tuple[Any, ...]]:
    """appystamp external id → (customer id, state, email, first name, birthday)."""
    with make_sessionmaker(engine)() as session:
        rows = session.execute(
            select(
                ExternalReference.external_id,
                Customer.id,
                Customer.state,
                Customer.email,
                Customer.first_name,
                Customer.birth_month,
                Customer.birth_day,
            )
            .join(Customer, Customer.id == ExternalReference.customer_id)
            .where(ExternalReference.store_id == store_id, ExternalReference.source == "appystamp")
        ).all()
    return {r[0]: tuple(r[1:]) for r in rows}


def card_balances(engine: Engine, card_id: int) -> dict[int, tuple[int, int]]:
    """customer id → (card stamps, ledger sum)."""
    with make_sessionmaker(engine)() as session:
        rows = session.execute(
            select(
                CustomerCard.customer_id,
                CustomerCard.stamps,
                func.coalesce(func.sum(StampLedgerEntry.delta), 0),
            )
            .outerjoin(StampLedgerEntry, StampLedgerEntry.customer_card_id == CustomerCard.id)
            .where(CustomerCard.card_id == card_id)
            .group_by(CustomerCard.customer_id, CustomerCard.stamps)
        ).all()
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def assert_balances_match(h: Harness, store_id: int, card_id: int) -> None:
    """Every live customer's card balance equals its stampBalance and its ledger sum."""
    refs = customers_by_ref(h.engine, store_id)
    balances = card_balances(h.engine, card_id)
    for cid in h.fake.customer_ids:
        source = h.fake.customer(cid)
        if source.get("mergedIntoCustomerId"):
            continue
        customer_id = refs[cid][0]
        stamps, ledger = balances.get(customer_id, (0, 0))
        assert stamps == source["stampBalance"], cid
        assert ledger == stamps, cid


def count(engine: Engine, model: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(model)) or 0)


# --- imports ----------------------------------------------------------------------------------


def test_import_customers_and_ledger_then_rerun_changes_nothing(
    h: Harness, make_store: Callable[..., tuple[int, str]]
) -> None:
    ids = h.fake.generate(1500, excluded_every=7)
    store_id, _ = make_store()
    card_id = h.card(store_id, initial_stamps=2)
    cid = h.connect(store_id, card_id)

    summary = h.sync(cid)

    assert summary.status == "succeeded", summary.error
    assert (summary.pages, summary.seen, summary.created) == (2, 1500, 1500)
    assert summary.requests == 2 + 1500  # two customer pages, one activities page each
    assert h.fake.activity_requests == 1500
    refs = customers_by_ref(h.engine, store_id)
    assert set(refs) == set(ids)
    first = h.fake.customer(ids[1])
    _, state, email, name, month, day = refs[ids[1]]
    assert (email, name, state) == (first["email"], first["firstName"], "active")
    dd, mm = (int(p) for p in first["dateOfBirth"].split("-"))
    assert (month, day) == (mm, dd)
    assert refs[ids[0]][1] == "excluded"  # state removed
    assert sum(1 for r in refs.values() if r[1] == "excluded") == len(ids[::7])
    assert_balances_match(h, store_id, card_id)
    with h.sessions() as session:
        reasons = set(session.scalars(select(StampLedgerEntry.reason)))
        keys = list(session.scalars(select(StampLedgerEntry.idempotency_key)))
        metadata = session.scalar(
            select(ExternalReference.metadata_).where(ExternalReference.external_id == ids[1])
        )
    assert reasons == {"import"}  # no welcome bonus although the card has initial stamps
    assert all(k.startswith("appystamp:activity:") for k in keys)
    assert len(keys) == sum(len(h.fake.activities(i)) for i in ids)
    assert count(h.engine, OutboxMessage) == 0  # imports never notify
    assert metadata is not None
    assert metadata["stamp_balance"] == first["stampBalance"]
    assert metadata["state"] == "active"

    entries, cards = count(h.engine, StampLedgerEntry), count(h.engine, CustomerCard)
    requests = h.fake.requests
    again = h.sync(cid, full=True)
    assert again.status == "succeeded"
    assert (again.created, again.updated, again.linked, again.unchanged) == (0, 0, 0, 1500)
    assert h.fake.requests - requests == 2  # only the customer pages: nothing changed
    assert (count(h.engine, StampLedgerEntry), count(h.engine, CustomerCard)) == (entries, cards)

    # A new stamp at Appy Stamp: that customer's activities are read again, one entry added.
    h.fake.add_stamps(ids[5], 4)
    third = h.sync(cid)
    assert (third.updated, third.unchanged) == (1, 1499)
    assert count(h.engine, StampLedgerEntry) == entries + 1
    assert_balances_match(h, store_id, card_id)


def test_10k_import_resumes_after_a_crash_at_the_next_page(
    h: Harness, make_store: Callable[..., tuple[int, str]]
) -> None:
    n, pages, k = 10_000, 10, 4
    ids = h.fake.generate(n)
    store_id, _ = make_store()
    cid = h.connect(store_id)  # no card: balances stay in the reference metadata

    crashed = h.sync(cid, transport=FailAfterLists(h.fake, ok=k))
    assert crashed.status == "failed"
    assert crashed.pages == k
    assert len(customers_by_ref(h.engine, store_id)) == k * 1000
    assert h.fake.list_requests == k

    resumed = h.sync(cid)
    assert resumed.status == "succeeded", resumed.error
    assert resumed.resumed is True
    assert resumed.pages == pages - k  # page k+1 onwards, nothing read twice
    assert h.fake.list_requests == pages
    # The first request of the resumed run asked for what follows the last committed page.
    assert h.fake.cursors[k] == encode_cursor(ids[k * 1000 - 1])
    assert resumed.created == n - k * 1000
    assert set(customers_by_ref(h.engine, store_id)) == set(ids)
    assert count(h.engine, CustomerCard) == 0
    assert count(h.engine, Customer) == n

    again = h.sync(cid, full=True)
    assert (again.created, again.updated, again.unchanged) == (0, 0, n)


def test_shopify_reference_is_the_identity(
    h: Harness, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    with h.sessions() as session:
        apply_customer_page(
            session,
            store_id=store_id,
            records=[
                ForeignCustomer(
                    source="shopify", external_id="6677889901", email="shop@example.com"
                ),
                ForeignCustomer(source="shopify", external_id="42", email="other@example.com"),
            ],
        )
        session.commit()
        shopify_customer = session.scalar(
            select(ExternalReference.customer_id).where(
                ExternalReference.external_id == "6677889901"
            )
        )
    # Same id as the Shopify customer, another email: linked by id, not created.
    h.fake.add_customer(id="6677889901", email="appy@example.com", firstName="Ada")
    # No Shopify reference, email of the other Shopify customer: linked by email.
    h.fake.add_customer(id="555", email="other@example.com")
    # Neither: created.
    h.fake.add_customer(id="556", email="new@example.com")
    cid = h.connect(store_id)

    summary = h.sync(cid)

    assert (summary.linked, summary.created, summary.conflicts) == (2, 1, 0)
    refs = customers_by_ref(h.engine, store_id)
    assert refs["6677889901"][0] == shopify_customer
    assert refs["6677889901"][2] == "appy@example.com"  # the source owns the email
    assert count(h.engine, Customer) == 3


def test_merges_and_exclusions_hold(h: Harness, make_store: Callable[..., tuple[int, str]]) -> None:
    a = h.fake.add_customer(email="a@example.com", activities=(10, -3))
    b = h.fake.add_customer(email="b@example.com", activities=(5,))
    c = h.fake.add_customer(email="c@example.com", state="removed", activities=(2,))
    d = h.fake.add_customer(email="d@example.com", activities=(1,))
    store_id, _ = make_store()
    card_id = h.card(store_id)
    cid = h.connect(store_id, card_id)
    assert h.sync(cid).succeeded
    refs = customers_by_ref(h.engine, store_id)
    assert refs[c][1] == "excluded"
    assert_balances_match(h, store_id, card_id)

    # Appy Stamp merges a into b, re-includes c; the merchant excludes d locally.
    h.fake.merge(a, b)
    h.fake.set_state(c, "active")
    with h.sessions() as session:
        local_d = session.get(Customer, refs[d][0])
        assert local_d is not None
        local_d.state = "excluded"
        session.commit()
    h.fake.add_stamps(d, 1)  # d changes at the source too, still "active" there

    summary = h.sync(cid)
    assert summary.succeeded, summary.error
    assert summary.merged == 1
    after = customers_by_ref(h.engine, store_id)
    assert after[a][0] == after[b][0]  # both references on the survivor
    with h.sessions() as session:
        loser = session.get(Customer, refs[a][0])
        assert loser is not None
        assert loser.state == "merged"
    assert after[c][1] == "active"  # the source re-included whom it had excluded
    assert after[d][1] == "excluded"  # the merchant's own exclusion is not undone
    assert_balances_match(h, store_id, card_id)
    survivor = card_balances(h.engine, card_id)[after[b][0]]
    assert survivor == (12, 12)

    again = h.sync(cid, full=True)
    assert (again.created, again.updated, again.merged) == (0, 0, 0)
    assert_balances_match(h, store_id, card_id)


def test_faults_and_throttling_give_the_same_final_state(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    clean = Harness(engine, settings, fake=FakeAppyStamp(seed=11))
    faulty = Harness(engine, settings, fake=FakeAppyStamp(seed=11, fault_rate=0.2))
    for harness in (clean, faulty):
        harness.fake.generate(1200, excluded_every=5)
    faulty.fake.throttle_next(3, 2.0)
    stores = []
    for harness in (clean, faulty):
        store_id, _ = make_store()
        card_id = harness.card(store_id)
        cid = harness.connect(store_id, card_id)
        for _ in range(10):  # a run that exhausts its retries resumes where it stopped
            summary = harness.sync(cid)
            if summary.succeeded:
                break
            assert summary.status == "failed"
        assert summary.succeeded
        assert_balances_match(harness, store_id, card_id)
        stores.append((store_id, card_id))
    assert faulty.fake.faults > 100
    assert faulty.fake.throttled >= 3

    def state(store_id: int, card_id: int) -> list[tuple[Any, ...]]:
        refs = customers_by_ref(engine, store_id)
        balances = card_balances(engine, card_id)
        return sorted((ext, *values[1:], balances.get(values[0])) for ext, values in refs.items())

    assert state(*stores[0]) == state(*stores[1])


def test_activities_unavailable_fall_back_to_balance_adjustments(
    h: Harness, make_store: Callable[..., tuple[int, str]]
) -> None:
    h.fake.activities_enabled = False
    ids = h.fake.generate(50)
    h.fake.update_customer(ids[3], stampBalance=-4)  # a negative balance becomes 0
    store_id, _ = make_store()
    card_id = h.card(store_id)
    cid = h.connect(store_id, card_id)

    summary = h.sync(cid)
    assert summary.succeeded, summary.error
    assert summary.requests == 2  # one page + one activities attempt, then adjustments only
    with h.sessions() as session:
        entries = session.execute(
            select(
                StampLedgerEntry.idempotency_key, StampLedgerEntry.delta, StampLedgerEntry.details
            )
        ).all()
    keys = {k for k, _, _ in entries}
    assert keys == {
        f"appystamp:balance:{i}:1"
        for i in ids
        if i != ids[3] and h.fake.customer(i)["stampBalance"] != 0
    }
    refs = customers_by_ref(h.engine, store_id)
    balances = card_balances(h.engine, card_id)
    assert balances.get(refs[ids[3]][0], (0, 0)) == (0, 0)
    for i in ids:
        if i != ids[3]:
            expected = h.fake.customer(i)["stampBalance"]
            assert balances.get(refs[i][0], (0, 0)) == (expected, expected)

    assert h.sync(cid, full=True).succeeded
    assert count(h.engine, StampLedgerEntry) == len(entries)  # never applied twice

    h.fake.update_customer(ids[0], stampBalance=h.fake.customer(ids[0])["stampBalance"] + 3)
    assert h.sync(cid).succeeded
    with h.sessions() as session:
        newest = session.scalar(
            select(StampLedgerEntry).where(
                StampLedgerEntry.idempotency_key == f"appystamp:balance:{ids[0]}:2"
            )
        )
    assert newest is not None
    assert newest.delta == 3
    assert newest.reason == "import"


def test_access_disabled_needs_attention_without_retry(
    h: Harness, make_store: Callable[..., tuple[int, str]]
) -> None:
    h.fake.generate(5)
    h.fake.access_disabled = True
    store_id, _ = make_store()
    cid = h.connect(store_id)

    summary = h.sync(cid)

    assert summary.status == "needs_attention"
    assert "API_ACCESS_DISABLED" in (summary.error or "")
    assert h.fake.requests == 1
    with h.sessions() as session:
        connection = session.get(Connection, cid)
        assert connection is not None
        assert connection.status == "needs_attention"


def test_a_card_of_another_store_needs_attention(
    h: Harness, make_store: Callable[..., tuple[int, str]]
) -> None:
    h.fake.generate(3)
    store_id, _ = make_store()
    other, _ = make_store()
    cid = h.connect(store_id, h.card(other))

    summary = h.sync(cid)

    assert summary.status == "needs_attention"
    assert count(h.engine, Customer) == 0  # the page rolled back


def test_dry_run_writes_nothing(h: Harness, make_store: Callable[..., tuple[int, str]]) -> None:
    h.fake.generate(20)
    store_id, _ = make_store()
    cid = h.connect(store_id, h.card(store_id))
    summary = h.sync(cid, dry_run=True)
    assert (summary.status, summary.created) == ("succeeded", 20)
    assert count(h.engine, Customer) == 0
    assert h.fake.activity_requests == 0


# --- balances ---------------------------------------------------------------------------------


def test_import_ledger_and_set_balance_rules(
    h: Harness, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    card_id = h.card(store_id, initial_stamps=3)
    with h.sessions() as session:
        apply_customer_page(
            session,
            store_id=store_id,
            records=[ForeignCustomer(source="appystamp", external_id="1", email="x@example.com")],
        )
        customer_id = session.scalar(select(Customer.id))
        assert customer_id is not None
        args = {"store_id": store_id, "card_id": card_id, "customer_id": customer_id}
        entries = [("k:1", 5, {"n": 1}), ("k:2", -2, {}), ("k:2", 9, {}), ("k:3", 0, {})]
        assert import_ledger(session, **args, entries=entries) == 2
        assert import_ledger(session, **args, entries=entries) == 0
        assert import_ledger(session, **args, entries=[("k:4", -10, {})]) == 1  # clamped to -3
        debit = session.scalar(
            select(StampLedgerEntry).where(StampLedgerEntry.idempotency_key == "k:4")
        )
        assert debit is not None
        assert (debit.delta, debit.details["requested_delta"]) == (-3, -10)
        assert set_balance(session, **args, target=7, key_prefix="p", details={}) == 7
        assert set_balance(session, **args, target=7, key_prefix="p", details={}) == 0
        assert set_balance(session, **args, target=-2, key_prefix="p", details={}) == -7
        shortfall = session.scalar(
            select(StampLedgerEntry).where(StampLedgerEntry.idempotency_key == "p:2")
        )
        assert shortfall is not None
        assert shortfall.details["shortfall"] == 2
        with pytest.raises(LookupError):
            set_balance(
                session, **{**args, "card_id": card_id + 99}, target=1, key_prefix="q", details={}
            )
        session.commit()
    assert card_balances(h.engine, card_id) == {customer_id: (0, 0)}
    assert count(h.engine, OutboxMessage) == 0
    with h.sessions() as session:
        assert set(session.scalars(select(StampLedgerEntry.reason))) == {"import"}


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_connect_and_sync_run_json(db_url: str, engine: Engine) -> None:
    from tests.test_cli_sync import cli_ok

    fake = FakeAppyStamp(seed=5)
    ids = fake.generate(30)
    store = int(cli_ok(db_url, "store", "create", "--name", "Shop")["id"])
    card = int(
        cli_ok(
            db_url,
            "card",
            "create",
            "--store",
            str(store),
            "--name",
            "C",
            "--stamps-required",
            "10",
        )["id"]
    )
    with fake.serve() as url:
        connection = cli_ok(
            db_url,
            "connect",
            "appystamp",
            "--store",
            str(store),
            "--api-key",
            API_KEY,
            "--api-secret",
            API_SECRET,
            "--api-base-url",
            url,
            "--card",
            str(card),
        )
        assert API_SECRET not in json.dumps(connection)
        summary = cli_ok(
            db_url, "sync", "run", "--store", str(store), "--source", "appystamp", "--json"
        )
    assert summary["status"] == "succeeded"
    assert (summary["seen"], summary["created"], summary["requests"]) == (30, 30, 31)
    with make_sessionmaker(engine)() as session:
        total = session.scalar(select(func.coalesce(func.sum(CustomerCard.stamps), 0)))
    assert total == sum(fake.customer(i)["stampBalance"] for i in ids)


def test_benchmark_hook_over_http(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    from tests.fakes.appystamp_bench import run_appystamp_import

    store_id, _ = make_store()
    result = run_appystamp_import(
        make_sessionmaker(engine), store_id=store_id, n=300, settings=settings, key=KEY
    )
    first, rerun = result["first"], result["rerun"]
    assert (first["summary"]["status"], first["summary"]["created"]) == ("succeeded", 300)
    assert first["fake_requests"] == 1 + 300
    assert (rerun["summary"]["unchanged"], rerun["fake_requests"]) == (300, 1)


@pytest.mark.skipif(
    not __import__("os").environ.get("APPYSTAMP_BENCH"), reason="set APPYSTAMP_BENCH=N to run"
)
def test_benchmark_figures(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    """Opt-in figures: `APPYSTAMP_BENCH=10000 pytest -k benchmark_figures -s`."""
    import os

    from tests.fakes.appystamp_bench import run_appystamp_import

    n = int(os.environ["APPYSTAMP_BENCH"])
    for card in (True, False):
        store_id, _ = make_store()
        result = run_appystamp_import(
            make_sessionmaker(engine), store_id=store_id, n=n, settings=settings, key=KEY, card=card
        )
        assert result["first"]["summary"]["created"] == n
        assert result["rerun"]["summary"]["unchanged"] == n
        print(
            engine.dialect.name,
            f"card={card}",
            {
                k: {x: v[x] for x in ("seconds", "customers_per_second", "fake_requests")}
                for k, v in result.items()
                if isinstance(v, dict)
            },
        )


def test_an_erased_shopify_customer_never_comes_back_through_the_alias(
    h: Harness, make_store: Callable[..., tuple[int, str]]
) -> None:
    from models.lifecycle import erase_customer

    store_id, _ = make_store()
    with h.sessions() as session:
        apply_customer_page(
            session,
            store_id=store_id,
            records=[ForeignCustomer(source="shopify", external_id="77", email="gone@example.com")],
        )
        customer_id = session.scalar(select(Customer.id))
        assert customer_id is not None
        erase_customer(session, store_id=store_id, customer_id=customer_id)
        session.commit()
    h.fake.add_customer(id="77", email="gone@example.com", activities=(3,))
    cid = h.connect(store_id, h.card(store_id))

    summary = h.sync(cid)

    assert summary.succeeded, summary.error
    assert (summary.created, summary.linked, summary.suppressed) == (0, 0, 1)
    assert count(h.engine, Customer) == 1
    assert count(h.engine, CustomerCard) == 0


def test_import_balances_batch_enrols_dedupes_and_survives_key_collisions(
    h: Harness, make_store: Callable[..., tuple[int, str]]
) -> None:
    from models.balances import BalanceImport, import_balances

    store_id, _ = make_store()
    card_a, card_b = h.card(store_id), h.card(store_id)
    with h.sessions() as session:
        apply_customer_page(
            session,
            store_id=store_id,
            records=[
                ForeignCustomer(source="appystamp", external_id=str(i), email=f"{i}@example.com")
                for i in range(3)
            ],
        )
        ids = list(session.scalars(select(Customer.id).order_by(Customer.id)))
        results = import_balances(
            session,
            store_id=store_id,
            card_id=card_a,
            imports=[
                BalanceImport(
                    ids[0], entries=[("e:1", 4, {}), ("e:2", 1, {})], target=6, key_prefix="b:0"
                ),
                BalanceImport(ids[1], entries=[("e:2", 9, {})], target=None),  # e:2 is taken
                BalanceImport(ids[2], target=3, key_prefix="b:2"),
            ],
        )
        assert [(r.added, r.delta, r.balance) for r in results.values()] == [
            (2, 1, 6),
            (0, 0, 0),
            (0, 3, 3),
        ]
        # The same prefix on another card: its first key exists on card A, so the batch is
        # planned again with store-wide counts and takes the next number.
        assert (
            set_balance(
                session,
                store_id=store_id,
                card_id=card_b,
                customer_id=ids[2],
                target=5,
                key_prefix="b:2",
                details={},
            )
            == 5
        )
        keys = set(session.scalars(select(StampLedgerEntry.idempotency_key)))
        session.commit()
    assert keys == {"e:1", "e:2", "b:0:1", "b:2:1", "b:2:2"}
    assert card_balances(h.engine, card_a) == {ids[0]: (6, 6), ids[1]: (0, 0), ids[2]: (3, 3)}
    assert card_balances(h.engine, card_b) == {ids[2]: (5, 5)}
    assert count(h.engine, OutboxMessage) == 0
