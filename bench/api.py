"""Benchmark of the store and its REST API on PostgreSQL at realistic size.

    uv run python bench/api.py [--database-url URL] [--n 100000] [--samples 500] [--keep]
                               [--explain]

Without `--database-url` a throwaway database `loyalty_bench` is (re)created on the local
PostgreSQL (postgresql://postgres@127.0.0.1:5432), migrated, and dropped at the end unless
`--keep`. With `--database-url` that database is migrated and a new store is seeded into it.

1. Bulk seed: N customers of one store, each with a `shopify` external reference and a customer
   card (on a card template with rewards), through psycopg COPY; prints customers/s; VACUUM ANALYZE.
2. Through the real HTTP API (uvicorn in a subprocess on a free 127.0.0.1 port, one keep-alive
   httpx client): exact reference lookup, search by name fragment, search by phone digits,
   create (with a reference and enrolment), stamp. Prints p50/p95/p99 and the targets.
3. The same operations in-process (the models functions on a Session, one session per call),
   alternated call by call with the HTTP ones, so that the HTTP/framework share is visible.
4. `--explain`: EXPLAIN (ANALYZE, BUFFERS) of every SELECT a list request runs, for a sample of
   each read operation.

Exits 1 when an HTTP target fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import phonenumbers
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from bench.harness import recreate_database, server
from models import accounts, cards
from models import customers as customer_ops
from models.db import make_engine, make_sessionmaker, normalise_url
from models.migrate import upgrade
from models.normalize import build_search_text

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "loyalty_bench"
SOURCE = "shopify"

# (operation, target p50 in ms or None)
OPERATIONS: list[tuple[str, float | None]] = [
    ("reference lookup", 5.0),
    ("search name fragment", 20.0),
    ("search phone digits", 20.0),
    ("create customer", None),
    ("stamp", 10.0),
]

FIRST_NAMES = """
James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard
Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty
Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew Donna Joshua Michelle
Kenneth Carol Kevin Amanda Brian Dorothy George Melissa Timothy Deborah Ronald Stephanie Edward
Rebecca Jason Sharon Jeffrey Laura Ryan Cynthia Jacob Kathleen Gary Amy Nicholas Angela Eric
Shirley Jonathan Anna Stephen Brenda Larry Pamela Justin Emma Scott Nicole Brandon Helen Benjamin
Samantha Samuel Katherine Gregory Christine Alexander Debra Frank Rachel Patrick Carolyn Raymond
Janet Jack Catherine Dennis Maria Jerry Heather Tyler Diane Aaron Ruth Jose Julie Adam Olivia Nathan
Joyce Henry Virginia Douglas Victoria Zachary Kelly Peter Lauren Kyle Christina Ethan Joan Walter
Evelyn Noah Judith Jeremy Megan Christian Andrea Keith Cheryl Roger Hannah Terry Jacqueline Gerald
Martha Harold Gloria Sean Teresa Austin Ann Carl Sara Arthur Madison Lawrence Frances Dylan Kathryn
Jesse Janice Jordan Jean Bryan Abigail Billy Alice Joe Julia Bruce Judy Gabriel Sophia Logan Grace
Albert Denise Willie Amber Alan Doris Juan Marilyn Wayne Danielle Elijah Beverly Randy Isabella Roy
Theresa Vincent Diana Ralph Natalie Eugene Brittany Russell Charlotte Bobby Marie Mason Kayla
Philip Alexis Louis Lori Carlos Camila Miguel Lucia Diego Valentina Mateo Ximena Hiroshi Yuki
Wei Mei Priya Arjun Fatima Omar Aisha Tariq Ingrid Lars Siobhan Niamh Giulia Luca Chloe Hugo
"""
LAST_NAMES = """
Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez
Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark
Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores Green Adams
Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips Evans Turner Diaz Parker
Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook Rogers Gutierrez Ortiz Morgan Cooper
Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson Watson Brooks Chavez Wood James
Bennett Gray Mendoza Ruiz Hughes Price Alvarez Castillo Sanders Patel Myers Long Ross Foster
Jimenez Powell Jenkins Perry Russell Sullivan Bell Coleman Butler Henderson Barnes Gonzales Fisher
Vasquez Simmons Romero Jordan Patterson Alexander Hamilton Graham Reynolds Griffin Wallace Moreno
West Cole Hayes Bryant Herrera Gibson Ellis Tran Medina Aguilar Stevens Murray Ford Castro Marshall
Owens Harrison Fernandez McDonald Woods Washington Kennedy Wells Vargas Henry Chen Freeman Webb
Tucker Guzman Burns Crawford Olson Simpson Porter Hunter Gordon Mendez Silva Shaw Snyder Mason
Dixon Munoz Hunt Hicks Holmes Palmer Wagner Black Robertson Boyd Rose Stone Salazar Fox Warren
Mills Meyer Rice Schmidt Garza Daniels Ferguson Nichols Stephens Soto Weaver Ryan Gardner Payne
Grant Dunn Kelley Spencer Hawkins Arnold Pierce Vazquez Hansen Peters Santos Hart Bradley Knight
Elliott Cunningham Duncan Armstrong Hudson Carroll Lane Riley Andrews Alvarado Ray Delgado Berry
Perkins Hoffman Johnston Matthews Pena Richards Contreras Willis Carpenter Lawrence Sandoval
Okafor Nakamura Yamamoto Kowalski Novak Lindqvist OBrien Rossi Dubois Muller Schneider Ivanova
"""
AREA_CODES = (212, 310, 415, 646, 718, 917)
EMAIL_DOMAINS = ("example.com", "mail.example.org", "inbox.example.net", "example.co")


# --- data generation ---------------------------------------------------------------------------


@dataclass(slots=True)
class Person:
    first_name: str
    last_name: str
    email: str
    phone: str  # E.164
    external_id: str


def unique_phones(rng: random.Random, count: int) -> list[str]:
    """`count` distinct US numbers (area code, exchange 200-999, last four), all valid."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        number = f"+1{rng.choice(AREA_CODES)}{rng.randint(200, 999)}{rng.randint(0, 9999):04d}"
        if number in seen:
            continue
        seen.add(number)
        out.append(number)
    for number in out:
        if not phonenumbers.is_valid_number(phonenumbers.parse(number)):
            raise SystemExit(f"generated an invalid phone number: {number}")
    return out


def make_people(rng: random.Random, count: int) -> list[Person]:
    firsts = FIRST_NAMES.split()
    lasts = LAST_NAMES.split()
    phones = unique_phones(rng, count)
    external_ids = rng.sample(range(6_000_000_000_000, 7_000_000_000_000), count)
    people = []
    for i in range(count):
        first, last = rng.choice(firsts), rng.choice(lasts)
        domain = EMAIL_DOMAINS[i % len(EMAIL_DOMAINS)]
        people.append(
            Person(
                first_name=first,
                last_name=last,
                # The serial makes it unique; names make it searchable like real addresses.
                email=f"{first}.{last}.{i}@{domain}".lower(),
                phone=phones[i],
                external_id=str(external_ids[i]),
            )
        )
    return people


# --- database set-up and bulk seed --------------------------------------------------------------


@dataclass(slots=True)
class Seeded:
    store_id: int
    token: str
    card_id: int
    # (customer id, customer card id, person) of every seeded customer
    rows: list[tuple[int, int, Person]] = field(default_factory=list)


def create_store(sm: sessionmaker[Session]) -> tuple[int, str, int]:
    with sm() as session:
        store, _ = accounts.create_store(session, name="Bench Coffee", country="US")
        _, token = accounts.create_token(session, store_id=store.id, name="bench")
        card = cards.create_card(
            session, store_id=store.id, name="Coffee card", stamps_required=10, initial_stamps=1
        )
        cards.create_reward(session, card_id=card.id, name="Free pastry", stamps=6)
        cards.create_reward(session, card_id=card.id, name="Free coffee", stamps=10)
        session.commit()
        return store.id, token, card.id


def _reserve_ids(cur: Any, table: str, count: int) -> int:
    """Take `count` consecutive ids from the table's sequence; returns the first."""
    cur.execute("SELECT pg_get_serial_sequence(%s, 'id')", (table,))
    seq = cur.fetchone()[0]
    cur.execute("SELECT nextval(%s)", (seq,))
    first = int(cur.fetchone()[0])
    cur.execute("SELECT setval(%s, %s)", (seq, first + count - 1))
    return first


def bulk_seed(
    engine: Engine, store_id: int, card_id: int, people: Sequence[Person], rng: random.Random
) -> tuple[list[tuple[int, int, Person]], dict[str, int], dict[str, float]]:
    """COPY customers, references, customer cards and their ledger rows in one transaction.

    Returns the rows and, per table, the rows loaded and the seconds it took.
    """
    seconds: dict[str, float] = {}
    now = dt.datetime.now(dt.UTC)
    n = len(people)
    codes: set[str] = set()
    while len(codes) < n:
        codes.add(cards.generate_code())
    code_list = list(codes)
    raw = engine.raw_connection()
    try:
        conn: Any = raw.driver_connection
        with conn.cursor() as cur:
            first_customer = _reserve_ids(cur, "customers", n)
            first_card = _reserve_ids(cur, "customer_cards", n)
            created = [
                now - dt.timedelta(minutes=rng.randint(0, 2 * 365 * 24 * 60)) for _ in people
            ]
            stamps = [rng.randint(0, 9) for _ in people]
            mark = time.perf_counter()
            with cur.copy(
                "COPY customers (id, store_id, first_name, last_name, email, phone, birth_year,"
                " birth_month, birth_day, metadata, state, search_text, created_at, updated_at)"
                " FROM STDIN"
            ) as copy:
                for i, p in enumerate(people):
                    has_birthday = i % 3 != 0
                    copy.write_row(
                        (
                            first_customer + i,
                            store_id,
                            p.first_name,
                            p.last_name,
                            p.email,
                            p.phone,
                            rng.randint(1950, 2005) if has_birthday and i % 2 else None,
                            rng.randint(1, 12) if has_birthday else None,
                            rng.randint(1, 28) if has_birthday else None,
                            '{"tier": "bronze"}' if i % 5 == 0 else "{}",
                            "active",
                            build_search_text(p.first_name, p.last_name, p.email, p.phone),
                            created[i],
                            created[i],
                        )
                    )
            mark = _lap(seconds, "customers", mark)
            with cur.copy(
                "COPY external_references (store_id, customer_id, source, external_id, metadata,"
                " created_at, updated_at) FROM STDIN"
            ) as copy:
                for i, p in enumerate(people):
                    copy.write_row(
                        (store_id, first_customer + i, SOURCE, p.external_id, "{}", now, now)
                    )
            mark = _lap(seconds, "references", mark)
            with cur.copy(
                "COPY customer_cards (id, store_id, customer_id, card_id, stamps, code, pass_token,"
                " wallet_pass_installed, created_at, updated_at) FROM STDIN"
            ) as copy:
                for i in range(n):
                    copy.write_row(
                        (
                            first_card + i,
                            store_id,
                            first_customer + i,
                            card_id,
                            stamps[i],
                            code_list[i],
                            secrets.token_urlsafe(24),
                            i % 4 == 0,
                            created[i],
                            created[i],
                        )
                    )
            mark = _lap(seconds, "cards", mark)
            ledger = 0
            with cur.copy(
                "COPY stamp_ledger (store_id, customer_card_id, delta, balance_after, reason,"
                " idempotency_key, details, created_at) FROM STDIN"
            ) as copy:
                # A card's balance is the sum of its ledger: one row per seeded balance.
                for i in range(n):
                    if stamps[i]:
                        ledger += 1
                        copy.write_row(
                            (
                                store_id,
                                first_card + i,
                                stamps[i],
                                stamps[i],
                                "stamp",
                                f"seed:{first_card + i}",
                                "{}",
                                created[i],
                            )
                        )
            mark = _lap(seconds, "ledger", mark)
        conn.commit()
        _lap(seconds, "commit", mark)
    finally:
        raw.close()
    rows = [(first_customer + i, first_card + i, p) for i, p in enumerate(people)]
    counts = {"customers": n, "references": n, "cards": n, "ledger": ledger}
    return rows, counts, seconds


def _lap(seconds: dict[str, float], name: str, mark: float) -> float:
    now = time.perf_counter()
    seconds[name] = now - mark
    return now


def vacuum_analyze(engine: Engine) -> str:
    """Statistics and visibility map for the planner; then flush the seed to disk.

    Without the CHECKPOINT the checkpointer writes the freshly loaded pages out while the first
    operations are being measured. Returns a note when it was not allowed.
    """
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("customers", "external_references", "customer_cards", "stamp_ledger"):
            conn.execute(text(f"VACUUM (ANALYZE) {table}"))
        try:
            conn.execute(text("CHECKPOINT"))
        except DBAPIError as exc:  # needs superuser or pg_checkpoint
            return f" (no CHECKPOINT: {str(exc.orig).strip()})"
    return " + CHECKPOINT"


# --- measurement -----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(pct / 100 * len(sorted_values) + 0.4999))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(slots=True)
class Timing:
    samples_ms: list[float] = field(default_factory=list)
    matches: list[int] = field(default_factory=list)  # Total-Count of list requests

    def stats(self) -> tuple[float, float, float]:
        s = sorted(self.samples_ms)
        return percentile(s, 50), percentile(s, 95), percentile(s, 99)


Op = Callable[[int], int | None]


def measure(
    http_ops: dict[str, Op], local_ops: dict[str, Op], *, warmup: int, samples: int
) -> tuple[dict[str, Timing], dict[str, Timing]]:
    """Per operation: warm up, then alternate one HTTP call and one in-process call.

    Alternating pairs the two measurements: both see the same caches and the same background
    load (autovacuum, checkpoints, other processes on the machine).
    """
    http: dict[str, Timing] = {}
    local: dict[str, Timing] = {}
    for name, http_fn in http_ops.items():
        local_fn = local_ops[name]
        http[name], local[name] = Timing(), Timing()
        for i in range(warmup):
            http_fn(-1 - i)
            local_fn(-1 - i)
        for i in range(samples):
            for fn, timing in ((http_fn, http[name]), (local_fn, local[name])):
                started = time.perf_counter()
                matched = fn(i)
                timing.samples_ms.append((time.perf_counter() - started) * 1000)
                if matched is not None:
                    timing.matches.append(matched)
    return http, local


@dataclass(slots=True)
class Workload:
    """Pre-drawn arguments, so that drawing them is not part of any measured call."""

    refs: list[str]
    name_fragments: list[str]
    phone_fragments: list[str]
    stamp_cards: list[tuple[int, int]]
    new_people: list[Person]


def name_fragment(rng: random.Random, person: Person) -> str:
    name = rng.choice((person.first_name, person.last_name))
    if len(name) < 4:
        name = f"{person.first_name} {person.last_name}"
    length = rng.randint(4, min(6, len(name)))
    start = rng.randint(0, len(name) - length)
    return name[start : start + length]


def phone_fragment(rng: random.Random, person: Person) -> str:
    national = person.phone[2:]  # 10 digits after +1
    return national[-rng.randint(7, 10) :]  # how a clerk types it: the local number or all of it


def draw_workload(
    rng: random.Random, rows: Sequence[tuple[int, int, Person]], extra: list[Person], count: int
) -> Workload:
    picks = [rng.choice(rows) for _ in range(count)]
    return Workload(
        refs=[p.external_id for _, _, p in picks],
        name_fragments=[name_fragment(rng, rng.choice(rows)[2]) for _ in range(count)],
        phone_fragments=[phone_fragment(rng, rng.choice(rows)[2]) for _ in range(count)],
        stamp_cards=[(cid, ccid) for cid, ccid, _ in (rng.choice(rows) for _ in range(count))],
        new_people=extra,
    )


def _at(items: Sequence[Any], i: int) -> Any:
    return items[i % len(items)]


def http_operations(
    client: httpx.Client, store_id: int, card_id: int, work: Workload
) -> dict[str, Op]:
    """The measured calls through the REST API (`work` supplies the arguments of call i)."""
    prefix = f"/api/v1/accounts/{store_id}"
    new_people = iter(work.new_people)

    def get_list(params: dict[str, str]) -> int:
        response = client.get(f"{prefix}/customers", params=params)
        if response.status_code != 200:
            raise SystemExit(f"GET customers {params}: {response.status_code} {response.text}")
        return int(response.headers["Total-Count"])

    def ref_lookup(i: int) -> int:
        matched = get_list({"source": SOURCE, "external_id": _at(work.refs, i)})
        assert matched == 1
        return matched

    def create(_i: int) -> None:
        p = next(new_people)
        body = {
            "customer": {
                "first_name": p.first_name,
                "last_name": p.last_name,
                "email": p.email,
                "phone": p.phone,
                "external_references": [{"source": SOURCE, "external_id": p.external_id}],
            },
            "card_id": card_id,
        }
        response = client.post(f"{prefix}/customers", json=body)
        if response.status_code != 201:
            raise SystemExit(f"POST customers: {response.status_code} {response.text}")

    def stamp(i: int) -> None:
        customer_id, cc_id = _at(work.stamp_cards, i)
        response = client.post(
            f"{prefix}/customers/{customer_id}/customer_cards/{cc_id}/stamp", json={"stamps": 1}
        )
        if response.status_code != 200:
            raise SystemExit(f"POST stamp: {response.status_code} {response.text}")

    return {
        "reference lookup": ref_lookup,
        "search name fragment": lambda i: get_list({"search": _at(work.name_fragments, i)}),
        "search phone digits": lambda i: get_list({"search": _at(work.phone_fragments, i)}),
        "create customer": create,
        "stamp": stamp,
    }


def local_operations(
    sm: sessionmaker[Session], store_id: int, card_id: int, work: Workload
) -> dict[str, Op]:
    """The same calls on the models functions directly, one Session per call like a request."""
    new_people = iter(work.new_people)

    def listing(**kwargs: Any) -> int:
        with sm() as session:
            page = customer_ops.list_customers(session, store_id=store_id, **kwargs)
            return page.total_count

    def create(_i: int) -> None:
        p = next(new_people)
        with sm() as session:
            card = cards.resolve_enrolment_card(session, store_id=store_id, card_id=card_id)
            result = customer_ops.create_customer(
                session,
                store_id=store_id,
                fields=customer_ops.CustomerFields(
                    first_name=p.first_name, last_name=p.last_name, email=p.email, phone=p.phone
                ),
                references=[customer_ops.ReferenceInput(SOURCE, p.external_id)],
            )
            assert result.created
            cards.enrol(session, customer=result.customer, card=card)
            session.commit()

    def stamp(i: int) -> None:
        customer_id, cc_id = _at(work.stamp_cards, i)
        with sm() as session:
            cc = cards.get_customer_card(
                session, store_id=store_id, customer_id=customer_id, customer_card_id=cc_id
            )
            cards.add_stamps(session, customer_card=cc, stamps=1)
            session.commit()

    return {
        "reference lookup": lambda i: listing(source=SOURCE, external_id=_at(work.refs, i)),
        "search name fragment": lambda i: listing(search=_at(work.name_fragments, i)),
        "search phone digits": lambda i: listing(search=_at(work.phone_fragments, i)),
        "create customer": create,
        "stamp": stamp,
    }


# --- the API server ------------------------------------------------------------------------------

SERVER_CODE = """
import sys, uvicorn
from api.app import create_app
from worker.logging import configure_logging
from worker.settings import Settings
settings = Settings(DATABASE_URL=sys.argv[1], LOG_FORMAT="json")
configure_logging(log_format="json", level="INFO")
uvicorn.run(create_app(settings), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
            access_log=False)
"""


@contextlib.contextmanager
def api_server(database_url: str) -> Iterator[str]:
    """The real app under uvicorn in a subprocess (its own core); yields its base URL."""
    with server(lambda port: [sys.executable, "-c", SERVER_CODE, database_url, str(port)]) as url:
        yield url


# --- EXPLAIN -----------------------------------------------------------------------------------


def explain(engine: Engine, sm: sessionmaker[Session], store_id: int, work: Workload) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of each SELECT a list request runs, one sample per operation."""
    cases = {
        "reference lookup": {"source": SOURCE, "external_id": work.refs[0]},
        "search name fragment": {"search": work.name_fragments[0]},
        "search phone digits": {"search": work.phone_fragments[0]},
    }
    for name, kwargs in cases.items():
        captured: list[tuple[str, Any]] = []

        def capture(
            _conn: Any,
            _cursor: Any,
            statement: str,
            parameters: Any,
            _context: Any,
            _many: bool,
            sink: list[tuple[str, Any]] = captured,
        ) -> None:
            sink.append((statement, parameters))

        event.listen(engine, "before_cursor_execute", capture)
        try:
            with sm() as session:
                page = customer_ops.list_customers(session, store_id=store_id, **kwargs)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        print(f"\n=== EXPLAIN {name} {kwargs} → Total-Count {page.total_count}")
        raw = engine.raw_connection()
        try:
            with raw.driver_connection.cursor() as cur:  # type: ignore[union-attr]
                for statement, parameters in captured:
                    if not statement.lstrip().upper().startswith("SELECT"):
                        continue
                    print(f"\n-- {' '.join(statement.split())}\n-- {parameters}")
                    cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
                    for (line,) in cur.fetchall():
                        print(f"   {line}")
        finally:
            raw.rollback()
            raw.close()


# --- report -----------------------------------------------------------------------------------


def print_tables(http: dict[str, Timing], local: dict[str, Timing]) -> bool:
    ok = True
    header = (
        f"{'operation':<22} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  {'target p50':<12} result"
    )
    print("\nHTTP API (uvicorn + httpx keep-alive, one client)")
    print(header)
    for name, target in OPERATIONS:
        p50, p95, p99 = http[name].stats()
        if target is None:
            goal, verdict = "-", ""
        else:
            goal, verdict = f"<= {target:g} ms", "PASS" if p50 <= target else "FAIL"
            ok = ok and p50 <= target
        print(f"{name:<22} {p50:8.2f} {p95:8.2f} {p99:8.2f}  {goal:<12} {verdict}")
    print("\nIn-process (models functions, one Session per call)")
    print(f"{'operation':<22} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  HTTP overhead p50")
    for name, _ in OPERATIONS:
        p50, p95, p99 = local[name].stats()
        overhead = http[name].stats()[0] - p50
        print(f"{name:<22} {p50:8.2f} {p95:8.2f} {p99:8.2f}  {overhead:+.2f} ms")
    for name in ("search name fragment", "search phone digits"):
        m = sorted(http[name].matches)
        if m:
            print(
                f"{name}: Total-Count median {percentile(m, 50)}, p95 {percentile(m, 95)},"
                f" max {m[-1]}"
            )
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help=f"use this database (default: a fresh {BENCH_DB})")
    parser.add_argument("--n", type=int, default=100_000, help="customers to seed")
    parser.add_argument("--samples", type=int, default=500, help="measured calls per operation")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured calls per operation")
    parser.add_argument("--seed", type=int, default=20261122, help="random seed")
    parser.add_argument("--keep", action="store_true", help=f"keep the {BENCH_DB} database")
    parser.add_argument("--explain", action="store_true", help="print the list queries' plans")
    args = parser.parse_args(argv)

    throwaway = args.database_url is None
    if throwaway:
        url: URL = normalise_url(ADMIN_URL).set(database=BENCH_DB)
        recreate_database(ADMIN_URL, BENCH_DB)
    else:
        url = normalise_url(args.database_url)
        if url.get_backend_name() != "postgresql":
            raise SystemExit("the benchmark needs PostgreSQL")
    url_str = url.render_as_string(hide_password=False)
    print(f"database: {url.render_as_string(hide_password=True)}  customers: {args.n:,}")

    engine = make_engine(url)
    try:
        upgrade(engine)
        sm = make_sessionmaker(engine)
        rng = random.Random(args.seed)
        per_run = args.samples + args.warmup
        started = time.perf_counter()
        people = make_people(rng, args.n + 2 * per_run)
        seed_people, new_people = people[: args.n], people[args.n :]
        print(f"generated {len(people):,} people in {time.perf_counter() - started:.1f} s")

        store_id, token, card_id = create_store(sm)
        started = time.perf_counter()
        rows, counts, seconds = bulk_seed(engine, store_id, card_id, seed_people, rng)
        seed_s = time.perf_counter() - started
        started = time.perf_counter()
        checkpoint = vacuum_analyze(engine)
        analyze_s = time.perf_counter() - started
        print(
            f"bulk seed (COPY, one transaction, indexes in place): {args.n:,} customers in"
            f" {seed_s:.1f} s = {args.n / seed_s:,.0f} customers/s"
        )
        print(
            "  "
            + ", ".join(
                f"{name} {counts[name]:,} rows {seconds[name]:.1f} s"
                if name in counts
                else f"{name} {seconds[name]:.1f} s"
                for name in seconds
            )
            + f"; then VACUUM (ANALYZE){checkpoint} {analyze_s:.1f} s"
        )

        work = draw_workload(rng, rows, new_people[:per_run], per_run)
        local_work = draw_workload(rng, rows, new_people[per_run:], per_run)
        load_before = os.getloadavg()
        started = time.perf_counter()
        with (
            api_server(url_str) as base_url,
            httpx.Client(
                base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0
            ) as client,
        ):
            http, local = measure(
                http_operations(client, store_id, card_id, work),
                local_operations(sm, store_id, card_id, local_work),
                warmup=args.warmup,
                samples=args.samples,
            )
        load_after = os.getloadavg()
        print(
            f"measured {args.samples} samples (+{args.warmup} warm-up) per operation and mode,"
            f" HTTP and in-process alternating, in {time.perf_counter() - started:.1f} s;"
            f" load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
            f" ({os.cpu_count()} CPUs)"
        )
        ok = print_tables(http, local)
        if args.explain:
            explain(engine, sm, store_id, work)
    finally:
        engine.dispose()
        if throwaway and not args.keep:
            recreate_database(ADMIN_URL, BENCH_DB, drop_only=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
