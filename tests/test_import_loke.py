"""LOKE import end to end: the fake behind `httpx.MockTransport` (and over real HTTP for the
CLI), the real sync run and ingest, the store on SQLite and PostgreSQL.

Time never really passes in process: the fake's token expiry, the rate budget and the client's
retry backoff share one `FakeClock`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import structlog
from cryptography.fernet import Fernet
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from connectors.ratelimit import LocalBudget
from models.cards import create_card, ledger_sum
from models.connections import connect
from models.customers import CustomerFields, create_customer
from models.db import make_sessionmaker
from models.tables import (
    Connection,
    Customer,
    CustomerCard,
    ExternalReference,
    StampLedgerEntry,
    SyncState,
)
from tests.fakes.loke import CLIENT_ID, CLIENT_SECRET, ORGANIZATION_ID, FakeLoke
from tests.fakes.shopify import FakeClock
from tests.test_cli import _isolated  # noqa: F401 - autouse fixture: no environment leaks
from tests.test_cli_sync import _no_redis, _uncached_loggers  # noqa: F401 - autouse fixtures
from worker import import_loke
from worker.settings import Settings
from worker.sync import SUMMARY_KEYS, SyncSummary, run_customer_sync

KEY = Fernet.generate_key()
NO_OVERLAP = dt.timedelta(0)
API_URL = "https://fake-api.loke.test"
AUTH_URL = "https://fake-auth.loke.test"


@dataclass
class Loke:
    """The fake LOKE, a store connected to it, and how to run a sync against it."""

    engine: Engine
    settings: Settings
    page_size: int = 1000
    fault_rate: float = 0.0
    clock: FakeClock = field(default_factory=FakeClock)
    fake: FakeLoke = field(init=False)
    sessions: sessionmaker[Session] = field(init=False)
    budget: LocalBudget = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = make_sessionmaker(self.engine)
        self.budget = LocalBudget(
            capacity=5000, refill_per_second=1000, clock=self.clock, sleep=self.clock.sleep
        )
        self.fake = FakeLoke(
            clock=self.clock, seed=11, page_size=self.page_size, fault_rate=self.fault_rate
        )

    def connect(self, store_id: int, *, secret: str = CLIENT_SECRET, **config: Any) -> int:
        with self.sessions() as session:
            row, _ = connect(
                session,
                store_id=store_id,
                source="loke",
                account=ORGANIZATION_ID,
                secrets={"client_id": CLIENT_ID, "client_secret": secret},
                api_base_url=API_URL,
                api_version=None,
                key=KEY,
                config={"auth_url": AUTH_URL, **config},
            )
            session.commit()
            return row.id

    def sync(
        self, connection_id: int, *, transport: httpx.BaseTransport | None = None, **kwargs: Any
    ) -> SyncSummary:
        kwargs.setdefault("overlap", NO_OVERLAP)
        # Tokens expire on the fake's clock during the run (the adapter's clock seam).
        previous, import_loke.clock = import_loke.clock, self.clock
        try:
            return run_customer_sync(
                self.sessions,
                connection_id=connection_id,
                settings=self.settings,
                key=KEY,
                transport=transport or httpx.MockTransport(self.fake.handle),
                budget=self.budget,
                sleep=self.clock.sleep,
                **kwargs,
            )
        finally:
            import_loke.clock = previous


@pytest.fixture(autouse=True)
def _plain_logging() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(DATABASE_URL=db_url, LOG_FORMAT="json")


@pytest.fixture
def loke(engine: Engine, settings: Settings) -> Loke:
    return Loke(engine, settings, page_size=100)


def counts(summary: SyncSummary) -> dict[str, Any]:
    return {k: summary.as_dict()[k] for k in SUMMARY_KEYS}


def snapshot(engine: Engine, store_id: int) -> list[tuple[Any, ...]]:
    """Everything the import wrote, without ids: references (with their metadata), customers,
    card balances and the ledger (comparable across stores and runs)."""
    with make_sessionmaker(engine)() as session:
        refs = session.execute(
            select(
                ExternalReference.external_id,
                ExternalReference.metadata_,
                ExternalReference.content_hash,
                Customer.first_name,
                Customer.last_name,
                Customer.email,
                Customer.phone,
                Customer.state,
            )
            .join(Customer, Customer.id == ExternalReference.customer_id)
            .where(ExternalReference.store_id == store_id, ExternalReference.source == "loke")
            .order_by(ExternalReference.external_id)
        ).all()
        balances = session.execute(
            select(ExternalReference.external_id, CustomerCard.stamps)
            .join(CustomerCard, CustomerCard.customer_id == ExternalReference.customer_id)
            .where(ExternalReference.store_id == store_id)
            .order_by(ExternalReference.external_id)
        ).all()
        ledger = session.execute(
            select(StampLedgerEntry.idempotency_key, StampLedgerEntry.delta)
            .where(StampLedgerEntry.store_id == store_id)
            .order_by(StampLedgerEntry.idempotency_key)
        ).all()
    return [
        *(("ref", *r[:1], sorted(r[1].items()), *r[2:]) for r in refs),
        *(("balance", *b) for b in balances),
        *(("ledger", *entry) for entry in ledger),
    ]


def reference_metadata(engine: Engine, store_id: int) -> dict[str, dict[str, Any]]:
    with make_sessionmaker(engine)() as session:
        rows = session.execute(
            select(ExternalReference.external_id, ExternalReference.metadata_).where(
                ExternalReference.store_id == store_id, ExternalReference.source == "loke"
            )
        ).all()
    return {external_id: dict(metadata) for external_id, metadata in rows}


def customer_count(engine: Engine, store_id: int) -> int:
    with make_sessionmaker(engine)() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Customer).where(Customer.store_id == store_id)
            )
            or 0
        )


class Crash(Exception):
    """The process dying (not a connector error: the run is left as a crash would leave it)."""


class CrashOnListPage(httpx.BaseTransport):
    """Passes requests to the fake until the `page`-th customer-list request (1-based), which
    raises a plain exception instead: the process dying while fetching that page."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response], page: int) -> None:
        self.handler = handler
        self.page = page
        self.list_requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/customers"):
            self.list_requests += 1
            if self.list_requests == self.page:
                raise Crash("killed while fetching the page")
        response = self.handler(request)
        response.read()
        return response


# --- a 10k import, a crash, a resume, a re-run -----------------------------------------------


def test_10k_import_resumes_after_a_crash_and_a_rerun_changes_nothing(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    env = Loke(engine, settings)  # 1000 customers a page, as LOKE's own
    ids = env.fake.generate(10_000, shared_phone_every=50)
    store_id, _ = make_store(country="AU")
    cid = env.connect(store_id)
    k = 4

    crash = CrashOnListPage(env.fake.handle, page=k + 1)
    with pytest.raises(Crash):
        env.sync(cid, transport=crash)

    assert env.fake.list_requests == k
    # Memberships were fetched for the first k pages' customers only, each exactly once.
    assert set(env.fake.membership_customers) == set(ids[: k * 1000])
    assert set(env.fake.membership_customers.values()) == {1}
    with env.sessions() as session:
        state = session.scalars(select(SyncState).where(SyncState.connection_id == cid)).one()
        assert state.pages_done == k
        saved_cursor = state.cursor
    assert saved_cursor is not None
    assert customer_count(engine, store_id) == k * 1000

    resumed = env.sync(cid)

    assert resumed.succeeded
    assert resumed.resumed is True
    # Resumed exactly at page k + 1: its first list request sent the cursor saved with page k.
    assert env.fake.cursors[k] == saved_cursor
    assert env.fake.list_requests == 10
    assert resumed.pages == 10 - k
    assert resumed.created == (10 - k) * 1000
    assert set(env.fake.membership_customers) == set(ids)
    assert set(env.fake.membership_customers.values()) == {1}  # none fetched twice
    # LOKE duplicates by phone stay separate customers: one customer per LOKE record.
    assert customer_count(engine, store_id) == 10_000
    metadata = reference_metadata(engine, store_id)
    assert all(metadata[i]["memberships"] == env.fake.lists_of(i) for i in ids[::97])

    before = snapshot(engine, store_id)
    membership_requests = env.fake.membership_requests

    again = env.sync(cid)

    assert counts(again) == {
        **dict.fromkeys(SUMMARY_KEYS, 0),
        "status": "succeeded",
        "pages": 10,
        "requests": 11,  # a token and 10 pages
        "seen": 10_000,
        "unchanged": 10_000,
    }
    assert env.fake.membership_requests == membership_requests  # none fetched
    assert snapshot(engine, store_id) == before


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_crash_mid_page_rolls_back_its_memberships_and_the_resume_fetches_them_again(
    loke: Loke, make_store: Callable[..., tuple[int, str]], concurrency: int
) -> None:
    ids = loke.fake.generate(250)
    store_id, _ = make_store()
    cid = loke.connect(store_id, membership_concurrency=concurrency)
    page2 = set(ids[100:200])
    seen: list[str] = []

    def dies_in_page_two(request: httpx.Request) -> httpx.Response:
        parts = request.url.path.split("/")
        if parts[-1] == "memberships" and parts[-2] in page2:
            seen.append(parts[-2])
            if len(seen) == 50:
                raise Crash("killed mid-page")
        return loke.fake.handle(request)

    with pytest.raises(Crash):
        loke.sync(cid, transport=httpx.MockTransport(dies_in_page_two))
    assert customer_count(loke.engine, store_id) == 100
    assert not any(i in page2 for i in reference_metadata(loke.engine, store_id))

    assert loke.sync(cid).succeeded

    metadata = reference_metadata(loke.engine, store_id)
    assert len(metadata) == 250
    assert all(metadata[i]["memberships"] == loke.fake.lists_of(i) for i in ids)
    # Page 1 was committed: its memberships were never fetched again; page 2's were fetched
    # again in full (49 had been answered before the crash, one at a time; with requests in
    # flight concurrently, those already running when the crash came finished too).
    assert all(loke.fake.membership_customers[i] == 1 for i in ids[:100])
    refetched = sum(loke.fake.membership_customers[i] for i in page2) - 100
    if concurrency == 1:
        assert refetched == 49
    else:
        assert 49 <= refetched < 100


def test_changed_customers_get_their_memberships_again_and_only_they(
    loke: Loke, make_store: Callable[..., tuple[int, str]]
) -> None:
    ids = loke.fake.generate(150, many_lists_every=10)
    store_id, _ = make_store()
    cid = loke.connect(store_id)
    assert loke.sync(cid).succeeded
    metadata = reference_metadata(loke.engine, store_id)
    assert len(metadata[ids[0]]["memberships"]) == 14  # two pages of memberships
    before = dict(loke.fake.membership_customers)

    loke.fake.update_customer(ids[3], firstName="Renamed")
    loke.fake.set_lists(ids[3], ("VIP", "Lapsed"))
    loke.fake.set_points(ids[7], 42)
    loke.fake.set_lists(ids[8], ("Staff",))  # not reflected on the customer: not seen yet
    summary = loke.sync(cid)

    assert (summary.updated, summary.unchanged) == (2, 148)
    # The first run read LOKE's default order; the incremental one asked for sort=updated and,
    # the direction being undocumented, still read every page.
    assert loke.fake.sorts == [None, None, "updated", "updated"]
    fetched = {i: n - before.get(i, 0) for i, n in loke.fake.membership_customers.items()}
    assert {i for i, n in fetched.items() if n} == {ids[3], ids[7]}
    metadata = reference_metadata(loke.engine, store_id)
    assert metadata[ids[3]]["memberships"] == ["VIP", "Lapsed"]
    assert metadata[ids[7]]["points_balance"] == 42
    assert metadata[ids[8]]["memberships"] != ["Staff"]


def test_an_erased_customer_is_never_asked_about_again(
    loke: Loke, make_store: Callable[..., tuple[int, str]]
) -> None:
    from models.lifecycle import erase_reference

    ids = loke.fake.generate(5)
    store_id, _ = make_store()
    cid = loke.connect(store_id)
    assert loke.sync(cid).succeeded
    with loke.sessions() as session:
        erase_reference(session, store_id=store_id, source="loke", external_id=ids[2])
        session.commit()
    loke.fake.update_customer(ids[2], firstName="Back again")
    loke.fake.set_lists(ids[2], ("VIP",))

    summary = loke.sync(cid)

    assert summary.suppressed == 1
    assert loke.fake.membership_customers[ids[2]] == 1  # the first import only
    assert "VIP" not in reference_metadata(loke.engine, store_id)[ids[2]].get("memberships", [])


# --- identity ---------------------------------------------------------------------------------


def test_phone_duplicates_stay_separate_and_a_phone_never_links(
    loke: Loke, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store(country="AU")
    with loke.sessions() as session:
        existing = create_customer(
            session,
            store_id=store_id,
            fields=CustomerFields(
                first_name="Local", email="local@example.com", phone="+61411222333"
            ),
        ).customer.id
        session.commit()
    a = loke.fake.add_customer(firstName="A", email="a@example.com", phoneNumber="+61411222333")
    b = loke.fake.add_customer(firstName="B", email="b@example.com", phoneNumber="+61411222333")
    cid = loke.connect(store_id)

    summary = loke.sync(cid)

    assert (summary.created, summary.linked, summary.conflicts) == (2, 0, 0)
    with loke.sessions() as session:
        owners = dict(
            session.execute(
                select(ExternalReference.external_id, ExternalReference.customer_id).where(
                    ExternalReference.source == "loke"
                )
            ).all()
        )
    assert len({owners[a], owners[b], existing}) == 3


def test_an_email_match_links_to_the_existing_customer(
    loke: Loke, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    with loke.sessions() as session:
        existing = create_customer(
            session,
            store_id=store_id,
            fields=CustomerFields(first_name="Ann", email="ann@example.com"),
        ).customer.id
        session.commit()
    lid = loke.fake.add_customer(firstName="Ann", lastName="Lee", email="ANN@example.com")
    cid = loke.connect(store_id)

    summary = loke.sync(cid)

    assert (summary.linked, summary.created) == (1, 0)
    with loke.sessions() as session:
        ref = session.scalars(
            select(ExternalReference).where(ExternalReference.external_id == lid)
        ).one()
        assert ref.customer_id == existing
        assert session.get(Customer, existing).last_name == "Lee"  # type: ignore[union-attr]


def test_the_policy_matches_loke_by_email_only_even_when_configured_otherwise(
    loke: Loke, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    cid = loke.connect(store_id, match_by=["email", "phone"])
    loke.fake.generate(3)

    summary = loke.sync(cid)

    assert summary.status == "needs_attention"
    assert "match_by" in (summary.error or "")


# --- points → stamps --------------------------------------------------------------------------


def make_card(loke: Loke, store_id: int) -> int:
    with loke.sessions() as session:
        card = create_card(session, store_id=store_id, name="Coffee", stamps_required=10)
        session.commit()
        return card.id


def balances(loke: Loke, card_id: int) -> dict[str, int]:
    with loke.sessions() as session:
        rows = session.execute(
            select(ExternalReference.external_id, CustomerCard.stamps)
            .join(CustomerCard, CustomerCard.customer_id == ExternalReference.customer_id)
            .where(CustomerCard.card_id == card_id)
        ).all()
    return {str(e): int(s) for e, s in rows}


def ledger_keys(loke: Loke) -> list[str]:
    with loke.sessions() as session:
        return sorted(session.scalars(select(StampLedgerEntry.idempotency_key)))


def test_points_per_stamp_sets_balances_and_never_double_counts(
    loke: Loke, make_store: Callable[..., tuple[int, str]]
) -> None:
    ids = loke.fake.generate(120)
    store_id, _ = make_store()
    card_id = make_card(loke, store_id)
    cid = loke.connect(store_id, points_per_stamp=250, card_id=card_id)

    assert loke.sync(cid).succeeded

    points = {i: loke.fake.customer(i)["statistics"]["pointsBalance"] for i in ids}
    expected = {i: p // 250 for i, p in points.items()}
    got = balances(loke, card_id)
    assert {i: got.get(i, 0) for i in ids} == expected
    keys = ledger_keys(loke)
    assert len(keys) == sum(1 for v in expected.values() if v)
    assert all(k.startswith("loke:points:") and k.endswith(":1") for k in keys)

    # Re-runs (incremental and full) write nothing.
    assert loke.sync(cid).succeeded
    assert loke.sync(cid, full=True).succeeded
    assert ledger_keys(loke) == keys

    # A points change moves the balance by one more adjustment; the ledger still adds up.
    loke.fake.set_points(ids[5], 2600)
    loke.fake.set_points(ids[6], 0)
    assert loke.sync(cid).succeeded
    assert loke.sync(cid).succeeded
    got = balances(loke, card_id)
    assert (got[ids[5]], got[ids[6]]) == (10, 0)
    assert len(ledger_keys(loke)) == len(keys) + (expected[ids[5]] != 10) + (expected[ids[6]] != 0)
    with loke.sessions() as session:
        for cc in session.scalars(select(CustomerCard).where(CustomerCard.card_id == card_id)):
            assert ledger_sum(session, customer_card_id=cc.id) == cc.stamps


def test_two_loke_records_of_one_person_add_their_points(
    loke: Loke, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    card_id = make_card(loke, store_id)
    stats = {"pointsBalance": 150}
    loke.fake.add_customer(firstName="Jo", email="jo@example.com", statistics=stats)
    loke.fake.add_customer(firstName="Jo", email="jo@example.com", statistics=stats)
    cid = loke.connect(store_id, points_per_stamp=100, card_id=card_id)

    assert loke.sync(cid).succeeded
    assert loke.sync(cid).succeeded

    assert set(balances(loke, card_id).values()) == {3}  # floor(300 / 100), not 1 + 1
    assert len(ledger_keys(loke)) == 1


@pytest.mark.parametrize(
    ("config", "mentions"),
    [
        ({"points_per_stamp": 0, "card_id": 1}, "points_per_stamp"),
        ({"points_per_stamp": 10}, "card_id"),
        ({"points_per_stamp": 10, "card_id": 999_999}, "not a card of this store"),
    ],
)
def test_an_unusable_points_rule_needs_attention(
    loke: Loke, make_store: Callable[..., tuple[int, str]], config: dict[str, Any], mentions: str
) -> None:
    loke.fake.generate(3)
    store_id, _ = make_store()
    cid = loke.connect(store_id, **config)

    summary = loke.sync(cid)

    assert summary.status == "needs_attention"
    assert mentions in (summary.error or "")


# --- faults and configuration -----------------------------------------------------------------


def test_20_percent_faults_reach_the_same_final_state(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    clean = Loke(engine, settings, page_size=100)
    faulty = Loke(engine, settings, page_size=100, fault_rate=0.2)
    for env in (clean, faulty):
        env.fake.generate(400, shared_phone_every=7, many_lists_every=13)
    stores = []
    for env in (clean, faulty):
        store_id, _ = make_store(country="AU")
        card_id = make_card(env, store_id)
        cid = env.connect(store_id, points_per_stamp=300, card_id=card_id)
        runs = 0
        while True:  # a run that gave up after its retries resumes from its saved cursor
            runs += 1
            summary = env.sync(cid)
            if summary.succeeded:
                break
            assert summary.status == "failed"
            assert runs < 10
        stores.append(store_id)

    assert faulty.fake.faults > 50
    assert clean.fake.faults == 0
    assert snapshot(engine, stores[0]) == snapshot(engine, stores[1])
    assert customer_count(engine, stores[1]) == 400


def test_a_bad_client_secret_needs_attention_without_retries(
    loke: Loke, make_store: Callable[..., tuple[int, str]]
) -> None:
    loke.fake.generate(5)
    store_id, _ = make_store()
    cid = loke.connect(store_id, secret="not-the-secret")

    summary = loke.sync(cid)

    assert summary.status == "needs_attention"
    assert "invalid_client" in (summary.error or "")
    assert "not-the-secret" not in (summary.error or "")
    assert loke.fake.requests == 1  # one token request, not retried
    assert loke.clock.sleeps == []
    with loke.sessions() as session:
        assert session.get(Connection, cid).status == "needs_attention"  # type: ignore[union-attr]
    assert customer_count(loke.engine, store_id) == 0


def test_a_token_that_expires_mid_run_is_renewed(
    engine: Engine, settings: Settings, make_store: Callable[..., tuple[int, str]]
) -> None:
    env = Loke(engine, settings, page_size=50)
    env.fake.token_lifetime = 120
    ids = env.fake.generate(200)
    store_id, _ = make_store()
    cid = env.connect(store_id)
    # Every memberships request waits a second of the fake clock: the run outlives its token.
    env.budget = LocalBudget(
        capacity=1, refill_per_second=1, clock=env.clock, sleep=env.clock.sleep
    )

    summary = env.sync(cid)

    assert summary.succeeded
    assert summary.created == 200
    assert env.fake.token_requests >= 2
    assert env.fake.unauthorized == 0  # renewed ahead of expiry, never refused
    assert len(reference_metadata(engine, store_id)) == len(ids)


def test_dry_run_fetches_no_memberships_and_writes_nothing(
    loke: Loke, make_store: Callable[..., tuple[int, str]]
) -> None:
    loke.fake.generate(30)
    store_id, _ = make_store()
    cid = loke.connect(store_id)

    summary = loke.sync(cid, dry_run=True)

    assert (summary.status, summary.created) == ("succeeded", 30)
    assert loke.fake.membership_requests == 0
    assert customer_count(loke.engine, store_id) == 0


def test_resync_one_customer(loke: Loke, make_store: Callable[..., tuple[int, str]]) -> None:
    from worker.sync import resync_customer

    (lid,) = loke.fake.generate(1)
    store_id, _ = make_store()
    cid = loke.connect(store_id)

    result = resync_customer(
        loke.sessions,
        connection_id=cid,
        external_id=lid,
        settings=loke.settings,
        key=KEY,
        transport=httpx.MockTransport(loke.fake.handle),
        budget=loke.budget,
        sleep=loke.clock.sleep,
    )

    assert (result["found"], result["created"]) == (True, 1)
    assert loke.fake.customer_requests == 1


# --- the CLI over real HTTP -------------------------------------------------------------------


def test_cli_connect_loke_and_sync_run_json(db_url: str, engine: Engine) -> None:
    from tests.test_cli_sync import cli_ok
    from tests.test_cli_sync import make_store as cli_store

    fake = FakeLoke(page_size=20)
    ids = fake.generate(45, shared_phone_every=4)
    store = cli_store(db_url)
    with fake.serve() as url:
        connection = cli_ok(
            db_url,
            "connect",
            "loke",
            "--store",
            str(store),
            "--organization-id",
            ORGANIZATION_ID,
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
            "--api-base-url",
            url,
            "--auth-url",
            url,
        )
        assert connection["source"] == "loke"
        assert CLIENT_SECRET not in repr(connection)

        summary = cli_ok(db_url, "sync", "run", "--store", str(store), "--source", "loke", "--json")
        again = cli_ok(db_url, "sync", "run", "--store", str(store), "--source", "loke", "--json")

    assert {k: summary[k] for k in ("status", "pages", "seen", "created", "skipped")} == {
        "status": "succeeded",
        "pages": 3,
        "seen": 45,
        "created": 45,
        "skipped": 0,
    }
    assert summary["requests"] == 1 + 3 + 45  # token, pages, one memberships page each
    assert (again["status"], again["unchanged"], again["requests"]) == ("succeeded", 45, 4)
    assert fake.token_requests == 2  # one per run (each CLI run is its own process)
    assert customer_count(engine, store) == len(ids)
