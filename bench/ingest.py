"""Ingest benchmark: N Shopify customers through the connector into PostgreSQL and SQLite.

    uv run python bench/ingest.py [--n 100000] [--db sqlite|postgresql|both] [--sample 5000]
                                  [--phone-share 0.5] [--seed N] [--postgres-url URL]
                                  [--pg-database NAME] [--apply bulk|naive] [--keep] [--profile]

The product path, page by page: a fake Shopify GraphQL Admin API served in process
(`httpx.MockTransport`, so that only our own cost is measured) → the real connector
(`ShopifyClient` + `iter_customer_pages`: HTTP client, JSON, `map_customer`) → the bulk upsert
`models.ingest.apply_customer_page` → commit; one transaction per page of 250.

The fake generates its customers lazily, page by page, from their index (a hash of seed and
index): nothing holds all N records, so the peak RSS is ours, not the fixture's. Each customer has
a unique email; `--phone-share` of them (default 50%) a unique valid US phone; names from a few
hundred first x last names; 0-6 tags (1.5 on average); email and SMS marketing states; a note on
~5%. The pages are sorted like Shopify's `sortKey: UPDATED_AT`: a changed customer moves to the
end.

Per database (a scratch PostgreSQL database `--pg-database`, default `loyalty_bench_ingest`,
created beside `--postgres-url` and dropped at the end; SQLite in a temporary file, WAL), three
phases, each a full pass over all N customers:

1. first load (empty store),
2. re-sync with 10% changed at the fake (a last name, the tags, a marketing state, or the email),
3. unchanged re-sync.

Then the baseline: the naive per-record ORM upsert (`find_by_reference`, then `create_customer`
or `update_customer` with the fields and a `ReferenceInput`, commit per page) runs the same three
phases on a `--sample` of customers (another store, same database).

Printed per phase: customers/s of our own processing (wall time minus the time inside the fake)
and end to end; where the time goes (fake, connector HTTP client + JSON, mapping, apply, commit);
the counts `apply_customer_page` returned; peak RSS (`ru_maxrss`, process-wide, so with
`--db both` the second database's figure includes the first's) and current RSS. At the end of
each database: customers == N and references == N for the store, and a spot check of 500 random
customers' fields against the fake (OK/FAIL).

Targets: first load >= 50k customers/s and unchanged re-sync >= 100k customers/s on PostgreSQL
(also shown for SQLite, informational), peak RSS <= 250 MB (stated for 1M). Exit status 1 when a
correctness check or a PostgreSQL/RSS target fails.

`--apply naive` runs the N-customer phases on the naive path too (to test the harness, or to
measure the baseline at scale).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import math
import os
import platform
import pstats
import random
import resource
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from cryptography.fernet import Fernet
from sqlalchemy import Engine, create_engine, event, func, select, text, tuple_
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

import connectors.shopify.paginate as shopify_paginate
from connectors.http import make_client
from connectors.paginate import map_records
from connectors.ratelimit import LocalBudget
from connectors.records import ForeignCustomer
from connectors.shopify.client import ShopifyClient
from connectors.shopify.paginate import MAX_PAGE_SIZE, iter_customer_pages
from models import accounts
from models import customers as customer_ops
from models.db import make_engine, make_sessionmaker, normalise_url
from models.migrate import upgrade
from models.tables import Base, Customer, ExternalReference
from tests.fakes.shopify import API_VERSION, TOKEN, FakeClock

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "loyalty_bench_ingest"
SHOP = "bench-shop.myshopify.com"
SOURCE = "shopify"
CHANGE_SHARE = 0.10
SPOT_CHECKS = 500
MB = 1024 * 1024
PROFILE_LINES = 15
PROGRESS_FROM = 200_000  # customers: print progress every 10% of a pass from this size
ROOT = Path(__file__).resolve().parent.parent

TARGET_FIRST_LOAD = 50_000.0  # customers/s, PostgreSQL
TARGET_UNCHANGED = 100_000.0  # customers/s, PostgreSQL
TARGET_RSS_MB = 250.0

_FIRST = """
James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard
Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty
Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew Donna Joshua Michelle
Kenneth Carol Kevin Amanda Brian Dorothy George Melissa Timothy Deborah Ronald Stephanie Edward
Rebecca Jason Sharon Jeffrey Laura Ryan Cynthia Jacob Kathleen Gary Amy Nicholas Angela Eric
Shirley Jonathan Anna Stephen Brenda Larry Pamela Justin Emma Scott Nicole Brandon Helen Benjamin
Samantha Samuel Katherine Gregory Christine Alexander Debra Frank Rachel Patrick Carolyn Raymond
Carlos Camila Miguel Lucia Diego Valentina Mateo Ximena Hiroshi Yuki Wei Mei Priya Arjun Fatima
Omar Aisha Tariq Ingrid Lars Siobhan Niamh Giulia Luca Chloe Hugo Zoë Renée José Søren
"""
_LAST = """
Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez
Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark
Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores Green Adams
Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips Evans Turner Diaz Parker
Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook Rogers Gutierrez Ortiz Morgan Cooper
Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson Watson Brooks Chavez Wood James
Okafor Nakamura Yamamoto Kowalski Novak Lindqvist O'Brien Rossi Dubois Müller Schneider Ivanova
"""
FIRST_NAMES = tuple(_FIRST.split())
LAST_NAMES = tuple(_LAST.split())
# Email domains hold only ASCII local parts: names are transliterated crudely for the address.
EMAIL_DOMAINS = ("example.com", "mail.example.org", "inbox.example.net", "example.co")
AREA_CODES = (212, 310, 415, 646, 718, 917, 312, 617, 206, 512)  # every exchange 200-999 valid
TAGS = ("vip", "wholesale", "newsletter", "local", "staff", "birthday-club")
EMAIL_STATES = ("SUBSCRIBED",) * 4 + ("NOT_SUBSCRIBED",) * 5 + ("UNSUBSCRIBED",)
SMS_STATES = ("SUBSCRIBED",) * 2 + ("NOT_SUBSCRIBED",) * 7 + ("UNSUBSCRIBED",)
EPOCH = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
FIRST_ID = 7_000_000_000_000  # Shopify customer ids are 13-digit numbers nowadays
_MASK = (1 << 64) - 1
_ASCII = str.maketrans({"ë": "e", "é": "e", "ø": "o", "ü": "u", "'": ""})


def mix(x: int) -> int:
    """splitmix64: a cheap, well-spread hash of an index (the fake's per-customer randomness)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def iso(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the fake ------------------------------------------------------------------------------------


class LazyShopify:
    """A Shopify GraphQL Admin `customers(sortKey: UPDATED_AT)` endpoint over N virtual customers.

    Customer `i` (0 <= i < n) is a pure function of (seed, i, its version): nothing is stored but
    one version byte per customer and the order of the changed ones. Order: the never-changed
    customers by index (updatedAt = EPOCH + i s), then the changed ones in the order they changed
    (updatedAt after every unchanged one), like Shopify's updatedAt sort. The cost extension
    reports a bucket so large that the client's budget never waits: this bench is about our cost.
    """

    def __init__(self, n: int, *, seed: int, phone_share: float) -> None:
        self.n = n
        self._salt = mix(seed) & 0xFFFF_FFFF_0000_0000
        self._phone_cut = round(phone_share * 10_000)
        self._versions = bytearray(n)
        self._changed: list[int] = []  # indices, in change order
        self.seconds = 0.0  # time spent inside `handle` (generation + JSON encoding)
        self.requests = 0
        self.served = 0
        self.served_with_phone = 0
        self.served_tags = 0

    # state -------------------------------------------------------------------------------

    def change(self, share: float, rng: random.Random) -> list[int]:
        """Change `share` of the customers (random ones); they move to the end of the order."""
        count = round(self.n * share)
        picked = rng.sample(range(self.n), count)
        chosen = set(picked)
        for i in picked:
            self._versions[i] = min(255, self._versions[i] + 1)
        self._changed = [i for i in self._changed if i not in chosen] + picked
        return picked

    def node(self, i: int, updated_at: str) -> dict[str, Any]:
        """The GraphQL `Customer` node of customer `i` at its current version."""
        h = mix(self._salt | i)
        first = FIRST_NAMES[h % len(FIRST_NAMES)]
        last = LAST_NAMES[(h >> 10) % len(LAST_NAMES)]
        domain = EMAIL_DOMAINS[(h >> 20) % len(EMAIL_DOMAINS)]
        local = f"{first}.{last}".lower().translate(_ASCII)
        email = f"{local}.{i}@{domain}"
        has_phone = (h >> 24) % 10_000 < self._phone_cut
        email_state = EMAIL_STATES[(h >> 38) % len(EMAIL_STATES)]
        sms_state = SMS_STATES[(h >> 42) % len(SMS_STATES)]
        tags = [tag for k, tag in enumerate(TAGS) if (h >> (46 + 2 * k)) & 3 == 0]
        note = "Prefers oat milk" if (h >> 58) % 20 == 0 else None
        h_more = mix(h)
        verified = h_more % 8 != 0
        created = EPOCH - dt.timedelta(seconds=(h_more >> 8) % (3 * 365 * 86_400))
        version = self._versions[i]
        if version:
            h2 = mix(h ^ version)
            kind = h2 % 4
            if kind == 0:  # a new last name (the email stays)
                last = LAST_NAMES[(LAST_NAMES.index(last) + 1 + (h2 >> 8) % 50) % len(LAST_NAMES)]
            elif kind == 1:  # a tag added or removed
                tags = [t for t in tags if t != "vip"] if "vip" in tags else ["vip", *tags]
            elif kind == 2:  # email marketing consent flipped
                email_state = "UNSUBSCRIBED" if email_state == "SUBSCRIBED" else "SUBSCRIBED"
            else:  # a new email address
                email = f"{local}.{i}.v{version}@{domain}"
        phone = None
        if has_phone:
            rest = i // len(AREA_CODES)
            area = AREA_CODES[i % len(AREA_CODES)]
            phone = f"+1{area}{200 + (rest // 10_000) % 800}{rest % 10_000:04d}"
        numeric = FIRST_ID + i
        return {
            "id": f"gid://shopify/Customer/{numeric}",
            "legacyResourceId": str(numeric),
            "firstName": first,
            "lastName": last,
            "displayName": f"{first} {last}",
            "defaultEmailAddress": {"emailAddress": email, "marketingState": email_state},
            "defaultPhoneNumber": (
                {"phoneNumber": phone, "marketingState": sms_state} if phone else None
            ),
            "email": email,
            "phone": phone,
            "note": note,
            "tags": tags,
            "state": "ENABLED",
            "verifiedEmail": verified,
            "createdAt": iso(created),
            "updatedAt": updated_at,
        }

    def expected(self, i: int) -> tuple[str, str, str, str | None]:
        """(first name, last name, email, phone) customer `i` should have in the store now."""
        node = self.node(i, "")
        return node["firstName"], node["lastName"], node["email"], node["phone"]

    # protocol ----------------------------------------------------------------------------

    def _page(self, first: int, after: str | None) -> tuple[list[tuple[int, str]], str, bool]:
        """(index, updatedAt) of the page's customers, the cursor after it, and hasNextPage.

        Cursors: `b<i>` = scan never-changed customers from index i; `c<j>` = changed list from j.
        """
        kind, pos = ("b", 0) if not after else (after[0], int(after[1:]))
        out: list[tuple[int, str]] = []
        versions = self._versions
        if kind == "b":
            while pos < self.n and len(out) < first:
                if not versions[pos]:
                    out.append((pos, iso(EPOCH + dt.timedelta(seconds=pos))))
                pos += 1
            if len(out) == first:
                return out, f"b{pos}", pos < self.n or bool(self._changed)
            kind, pos = "c", 0
        while pos < len(self._changed) and len(out) < first:
            out.append((self._changed[pos], iso(EPOCH + dt.timedelta(seconds=self.n + pos))))
            pos += 1
        return out, f"c{pos}", pos < len(self._changed)

    def handle(self, request: httpx.Request) -> httpx.Response:
        """The MockTransport handler."""
        started = time.perf_counter()
        try:
            self.requests += 1
            body = json.loads(request.content)
            variables = body.get("variables") or {}
            if variables.get("query"):
                return httpx.Response(
                    200, json={"errors": [{"message": "full passes only", "extensions": {}}]}
                )
            first = int(variables["first"])
            page, cursor, has_next = self._page(first, variables.get("after"))
            nodes = [self.node(i, updated_at) for i, updated_at in page]
            self.served += len(nodes)
            self.served_with_phone += sum(1 for node in nodes if node["phone"])
            self.served_tags += sum(len(node["tags"]) for node in nodes)
            huge = 1e9
            return httpx.Response(
                200,
                json={
                    "data": {
                        "customers": {
                            "nodes": nodes,
                            "pageInfo": {"hasNextPage": has_next, "endCursor": cursor},
                        }
                    },
                    "extensions": {
                        "cost": {
                            "requestedQueryCost": 2 + first * 3,
                            "actualQueryCost": 2 + len(nodes) * 3,
                            "throttleStatus": {
                                "maximumAvailable": huge,
                                "currentlyAvailable": huge,
                                "restoreRate": huge,
                            },
                        }
                    },
                },
            )
        finally:
            self.seconds += time.perf_counter() - started


# --- the two upsert paths ------------------------------------------------------------------------

Counts = dict[str, int]
Applier = Callable[[Session, int, Sequence[ForeignCustomer]], Counts]


def apply_bulk(session: Session, store_id: int, records: Sequence[ForeignCustomer]) -> Counts:
    from models.ingest import apply_customer_page

    return apply_customer_page(session, store_id=store_id, records=records).as_dict()


def apply_naive(session: Session, store_id: int, records: Sequence[ForeignCustomer]) -> Counts:
    """The per-record ORM upsert: look the reference up, then create or update the customer."""
    counts = {"seen": 0, "created": 0, "updated": 0}
    unset = customer_ops.UNSET
    for record in records:
        counts["seen"] += 1
        fields = customer_ops.CustomerFields(
            first_name=record.first_name if record.first_name is not None else unset,
            last_name=record.last_name if record.last_name is not None else unset,
            email=record.email if record.email is not None else unset,
            phone=record.phone if record.phone is not None else unset,
            birthday=record.birthday if record.birthday is not None else unset,
        )
        references = [
            customer_ops.ReferenceInput(
                record.source, record.external_id, metadata=dict(record.attributes)
            )
        ]
        customer = customer_ops.find_by_reference(
            session, store_id=store_id, source=record.source, external_id=record.external_id
        )
        if customer is None:
            customer_ops.create_customer(
                session, store_id=store_id, fields=fields, references=references
            )
            counts["created"] += 1
        else:
            customer_ops.update_customer(
                session, store_id=store_id, customer=customer, fields=fields, references=references
            )
            counts["updated"] += 1
    return counts


APPLIERS: dict[str, Applier] = {"bulk": apply_bulk, "naive": apply_naive}


# --- measurement ---------------------------------------------------------------------------------


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def rss_now_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass(slots=True)
class MappingTimer:
    """Wraps the connector's `map_records` (per page) to time the mapping alone."""

    seconds: float = 0.0

    @contextmanager
    def installed(self) -> Iterator[None]:
        original = map_records
        namespace = vars(shopify_paginate)  # iter_customer_pages looks the name up there

        def timed(
            items: Iterable[Any],
            map_one: Callable[[Mapping[str, Any]], ForeignCustomer],
            *,
            source: str,
        ) -> tuple[tuple[ForeignCustomer, ...], int]:
            started = time.perf_counter()
            try:
                return original(items, map_one, source=source)
            finally:
                self.seconds += time.perf_counter() - started

        namespace["map_records"] = timed
        try:
            yield
        finally:
            namespace["map_records"] = original


@dataclass(slots=True)
class Phase:
    db: str
    path: str
    name: str
    records: int = 0
    pages: int = 0
    wall: float = 0.0  # the whole pass
    fake: float = 0.0  # inside the fake (generating and encoding the answers)
    mapping: float = 0.0  # map_records (map_customer per node)
    apply: float = 0.0  # the applier, in the open transaction
    commit: float = 0.0  # commit + session close
    sql: float = 0.0  # in cursor.execute and COPY (round trips + server + driver), part of apply
    statements: int = 0
    top_sql: list[tuple[str, int, float]] = field(default_factory=list)
    counts: Counts = field(default_factory=dict)
    rss_peak: float = 0.0
    rss_now: float | None = None
    sleeps: int = 0

    @property
    def ours(self) -> float:
        return max(self.wall - self.fake, 1e-9)

    @property
    def connector(self) -> float:
        """HTTP client, JSON decoding, pagination: the pass minus the rest."""
        return max(0.0, self.wall - self.fake - self.mapping - self.apply - self.commit)

    @property
    def rate(self) -> float:
        return self.records / self.ours

    @property
    def rate_incl_fake(self) -> float:
        return self.records / max(self.wall, 1e-9)


@dataclass(slots=True)
class SqlTimer:
    """Time inside `cursor.execute` (engine events) and COPY blocks, per statement shape."""

    statements: dict[str, list[float]] = field(default_factory=dict)  # key → [count, seconds]

    @staticmethod
    def key(statement: str) -> str:
        words = " ".join(statement.split()[:8])
        tables = sorted(name for name in Base.metadata.tables if name in statement)
        return f"{words[:60]} … [{', '.join(tables)}]"

    @contextmanager
    def installed(self, engine: Engine) -> Iterator[None]:
        def before(conn: Any, _cur: Any, _stmt: str, _params: Any, _ctx: Any, _many: bool) -> None:
            conn.info["bench_started"] = time.perf_counter()

        def after(conn: Any, _cur: Any, stmt: str, _params: Any, _ctx: Any, _many: bool) -> None:
            elapsed = time.perf_counter() - conn.info.pop("bench_started", time.perf_counter())
            self.add(stmt, elapsed)

        # COPY goes to the driver's cursor directly, past SQLAlchemy's events: time the block
        # (feeding the rows included) by wrapping psycopg's `Cursor.copy`.
        original_copy = psycopg.Cursor.copy

        @contextmanager
        def timed_copy(cursor: Any, statement: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            started = time.perf_counter()
            try:
                with original_copy(cursor, statement, *args, **kwargs) as copy:
                    yield copy
            finally:
                self.add(str(statement), time.perf_counter() - started)

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        setattr(psycopg.Cursor, "copy", timed_copy)  # noqa: B010 - mypy forbids assigning methods
        try:
            yield
        finally:
            setattr(psycopg.Cursor, "copy", original_copy)  # noqa: B010
            event.remove(engine, "before_cursor_execute", before)
            event.remove(engine, "after_cursor_execute", after)

    def add(self, statement: str, seconds: float) -> None:
        entry = self.statements.setdefault(self.key(statement), [0, 0.0])
        entry[0] += 1
        entry[1] += seconds


def run_phase(
    phase: Phase,
    fake: LazyShopify,
    engine: Engine,
    store_id: int,
    applier: Applier,
    *,
    profile: bool = False,
) -> Phase:
    """One full pass: every page fetched, mapped, applied and committed in its own transaction."""
    sm = make_sessionmaker(engine)
    clock = FakeClock()
    budget = LocalBudget(capacity=1e9, refill_per_second=1e9, clock=clock, sleep=clock.sleep)
    timer = MappingTimer()
    sql = SqlTimer()
    profiler = cProfile.Profile() if profile else None
    fake_before = fake.seconds
    with (
        make_client(base_url=f"https://{SHOP}", transport=httpx.MockTransport(fake.handle)) as http,
        timer.installed(),
        sql.installed(engine),
    ):
        client = ShopifyClient(
            http=http,
            shop_domain=SHOP,
            access_token=TOKEN,
            api_version=API_VERSION,
            budget=budget,
            sleep=clock.sleep,
        )
        if profiler is not None:
            profiler.enable()
        started = time.perf_counter()
        # Progress every 10% on big runs: a per-page cost that grows with the table shows here.
        every = math.ceil(fake.n / MAX_PAGE_SIZE / 10) if fake.n >= PROGRESS_FROM else 0
        mark = (started, fake.seconds, 0)
        for page in iter_customer_pages(client, updated_since=None, page_size=MAX_PAGE_SIZE):
            t0 = time.perf_counter()
            with sm() as session:
                counts = applier(session, store_id, page.records)
                t1 = time.perf_counter()
                session.commit()
            t2 = time.perf_counter()
            phase.apply += t1 - t0
            phase.commit += t2 - t1
            phase.records += len(page.records)
            phase.pages += 1
            for key, value in counts.items():
                phase.counts[key] = phase.counts.get(key, 0) + value
            if every and phase.pages % every == 0:
                mark = print_progress(phase, fake, mark)
        phase.wall = time.perf_counter() - started
        if profiler is not None:
            profiler.disable()
    phase.fake = fake.seconds - fake_before
    phase.mapping = timer.seconds
    phase.sleeps = len(clock.sleeps)
    phase.sql = sum(seconds for _, seconds in sql.statements.values())
    phase.statements = int(sum(count for count, _ in sql.statements.values()))
    phase.top_sql = sorted(
        ((key, int(count), seconds) for key, (count, seconds) in sql.statements.items()),
        key=lambda item: -item[2],
    )
    phase.rss_peak = rss_peak_mb()
    phase.rss_now = rss_now_mb()
    print_phase(phase)
    if profiler is not None:
        print_profile(phase, profiler)
    return phase


def print_progress(
    phase: Phase, fake: LazyShopify, mark: tuple[float, float, int]
) -> tuple[float, float, int]:
    now, fake_s = time.perf_counter(), fake.seconds
    wall, fake_d, records = now - mark[0], fake_s - mark[1], phase.records - mark[2]
    rss = rss_now_mb()
    print(
        f"        … {phase.records / fake.n:4.0%} {phase.records:>9,}: last"
        f" {records:,} at {records / max(wall - fake_d, 1e-9):,.0f}/s ours"
        f" ({records / max(wall, 1e-9):,.0f}/s incl. fake), RSS now"
        f" {f'{rss:.0f}' if rss is not None else '?'} MB",
        flush=True,
    )
    return now, fake_s, phase.records


def run_phases(
    db: str,
    path: str,
    fake: LazyShopify,
    engine: Engine,
    store_id: int,
    rng: random.Random,
    *,
    profile: bool = False,
) -> tuple[list[Phase], list[int]]:
    """First load, re-sync with 10% changed, unchanged re-sync. Returns the phases and changed."""
    applier = APPLIERS[path]
    phases = [
        run_phase(Phase(db, path, "first load"), fake, engine, store_id, applier, profile=profile)
    ]
    changed = fake.change(CHANGE_SHARE, rng)
    for name in ("10% changed", "unchanged"):
        phase = Phase(db, path, name)
        phases.append(run_phase(phase, fake, engine, store_id, applier, profile=profile))
    return phases, changed


def print_profile(phase: Phase, profiler: cProfile.Profile) -> None:
    """The SQL statements by time, and the Python functions by own time (whole pass)."""
    print(f"        SQL by time ({phase.statements} statements, {phase.sql:.2f} s):")
    for key, count, seconds in phase.top_sql[:8]:
        print(f"          {seconds:7.2f} s {count:6d}x {seconds / count * 1000:7.2f} ms  {key}")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(PROFILE_LINES)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    print("        Python functions by own time (cProfile, whole pass, inflates Python cost):")
    for line in lines[start:]:
        print(f"          {line.replace(str(ROOT) + '/', '')}")


def print_phase(p: Phase) -> None:
    counts = " ".join(f"{k} {v}" for k, v in p.counts.items() if v)
    rss_now = f"{p.rss_now:.0f}" if p.rss_now is not None else "?"
    print(
        f"  {p.path:<5} {p.name:<12} {p.records:>8} in {p.pages:>4} pages, {p.wall:7.2f} s"
        f" | {p.rate:>9,.0f}/s ours, {p.rate_incl_fake:>9,.0f}/s incl. fake"
        f" | RSS peak {p.rss_peak:.0f} MB, now {rss_now} MB",
        flush=True,
    )
    print(
        f"        time: fake {p.fake:.2f}, connector {p.connector:.2f}, mapping {p.mapping:.2f},"
        f" apply {p.apply:.2f} (of which SQL {p.sql:.2f} in {p.statements} statements),"
        f" commit {p.commit:.2f} s"
    )
    print(f"        counts: {counts}" + (f"; budget sleeps {p.sleeps}" if p.sleeps else ""))
    top = "; ".join(
        f"{key.split(' … ')[0][:22]}… {key.split(' … ')[1]} {seconds:.2f} s ({count}x)"
        for key, count, seconds in p.top_sql[:3]
    )
    print(f"        top SQL: {top}")


# --- databases -----------------------------------------------------------------------------------


@contextmanager
def postgres_database(admin_url: str, name: str, *, keep: bool) -> Iterator[URL]:
    """A fresh scratch database `name` beside `admin_url`, dropped at the end (unless `keep`)."""
    admin = create_engine(normalise_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield admin.url.set(database=name)
    finally:
        if not keep:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def sqlite_database(*, keep: bool) -> Iterator[URL]:
    directory = tempfile.mkdtemp(prefix="bench-ingest-")
    path = Path(directory) / "bench.sqlite3"
    try:
        yield normalise_url(f"sqlite:///{path}")
    finally:
        if keep:
            print(f"  kept {path}")
        else:
            for leftover in Path(directory).iterdir():
                leftover.unlink()
            Path(directory).rmdir()


def create_store(sm: sessionmaker[Session], name: str) -> int:
    with sm() as session:
        store, _ = accounts.create_store(session, name=name, country="US")
        session.commit()
        return store.id


def database_size(engine: Engine) -> str:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            size = conn.scalar(text("SELECT pg_database_size(current_database())"))
        else:
            pages = conn.scalar(text("PRAGMA page_count"))
            page_size = conn.scalar(text("PRAGMA page_size"))
            size = int(pages or 0) * int(page_size or 0)
    return f"{int(size or 0) / MB:,.0f} MB"


def server_version(engine: Engine) -> str:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            return f"PostgreSQL {conn.scalar(text('SHOW server_version'))}"
    return f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=NORMAL)"


@dataclass(slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def verify(
    sm: sessionmaker[Session],
    store_id: int,
    fake: LazyShopify,
    changed: Sequence[int],
    rng: random.Random,
    label: str,
) -> list[Check]:
    """Counts == N, and a spot check of random customers (half of them changed) vs the fake."""
    n = fake.n
    checks: list[Check] = []
    with sm() as session:
        customers = session.scalar(
            select(func.count()).select_from(Customer).where(Customer.store_id == store_id)
        )
        references = session.scalar(
            select(func.count())
            .select_from(ExternalReference)
            .where(ExternalReference.store_id == store_id, ExternalReference.source == SOURCE)
        )
        checks.append(Check(f"{label} customers", customers == n, f"{customers} (expected {n})"))
        checks.append(Check(f"{label} references", references == n, f"{references} (expected {n})"))
        half = min(SPOT_CHECKS // 2, len(changed))
        picks = set(rng.sample(list(changed), half)) if half else set()
        while len(picks) < min(SPOT_CHECKS, n):
            picks.add(rng.randrange(n))
        wanted = {str(FIRST_ID + i): fake.expected(i) for i in picks}
        rows = session.execute(
            select(
                ExternalReference.external_id,
                Customer.first_name,
                Customer.last_name,
                Customer.email,
                Customer.phone,
            )
            .join(Customer, Customer.id == ExternalReference.customer_id)
            .where(
                ExternalReference.store_id == store_id,
                tuple_(ExternalReference.source, ExternalReference.external_id).in_(
                    [(SOURCE, external_id) for external_id in wanted]
                ),
            )
        ).all()
    found = {row[0]: tuple(row[1:]) for row in rows}
    wrong = [eid for eid, expected in wanted.items() if found.get(eid) != expected]
    example = ""
    if wrong:
        eid = wrong[0]
        example = f"; e.g. {eid}: store {found.get(eid)} vs fake {wanted[eid]}"
    checks.append(
        Check(
            f"{label} spot check",
            not wrong,
            f"{len(wanted) - len(wrong)}/{len(wanted)} customers match the fake{example}",
        )
    )
    return checks


def run_database(
    db: str, url: URL, args: argparse.Namespace
) -> tuple[list[Phase], list[Phase], list[Check]]:
    engine = make_engine(url)
    try:
        started = time.perf_counter()
        upgrade(engine)
        print(f"\n=== {server_version(engine)}: migrated in {time.perf_counter() - started:.1f} s")
        sm = make_sessionmaker(engine)
        rng = random.Random(args.seed)

        fake = LazyShopify(args.n, seed=args.seed, phone_share=args.phone_share)
        store_id = create_store(sm, "Bench ingest")
        main_phases, changed = run_phases(
            db, args.apply, fake, engine, store_id, rng, profile=args.profile
        )
        print(
            f"  fake served {fake.served:,} nodes in {fake.requests} requests;"
            f" {fake.served_with_phone / max(fake.served, 1):.1%} with a phone,"
            f" {fake.served_tags / max(fake.served, 1):.2f} tags per customer"
        )
        checks = verify(sm, store_id, fake, changed, rng, f"{db} {args.apply} N={args.n}")

        sample = LazyShopify(args.sample, seed=args.seed + 1, phone_share=args.phone_share)
        sample_store = create_store(sm, "Bench ingest baseline")
        base_phases, base_changed = run_phases(db, "naive", sample, engine, sample_store, rng)
        checks += verify(sm, sample_store, sample, base_changed, rng, f"{db} naive sample")
        print(f"  database size {database_size(engine)}")
        for check in checks:
            print(f"  check {check.name}: {'OK' if check.ok else 'FAIL'} — {check.detail}")
        return main_phases, base_phases, checks
    finally:
        engine.dispose()


# --- the import sources (Appy Stamp, LOKE) -------------------------------------------------------


def run_import_source(db: str, url: URL, args: argparse.Namespace) -> bool:
    """`--source appystamp|loke`: N customers from the source's fake served on 127.0.0.1 (real
    HTTP, as the worker reads them), imported by `run_customer_sync` (the production path, with
    the per-customer follow-ups: Appy Stamp activities into the stamp ledger, LOKE list
    memberships), then an unchanged re-run. Returns whether the checks passed."""
    from models.tables import CustomerCard, StampLedgerEntry
    from worker.settings import Settings

    engine = make_engine(url)
    try:
        upgrade(engine)
        sm = make_sessionmaker(engine)
        store_id = create_store(sm, f"Bench {args.source}")
        settings = Settings(DATABASE_URL=url.render_as_string(hide_password=False))
        key = Fernet.generate_key()  # a throwaway key for the bench's own connection
        print(f"\n=== {server_version(engine)}: {args.source} import of {args.n:,} customers")
        if args.source == "appystamp":
            from tests.fakes.appystamp_bench import run_appystamp_import

            result = run_appystamp_import(
                sm, store_id=store_id, n=args.n, settings=settings, key=key, seed=args.seed
            )
        else:
            result = _run_loke_import(sm, store_id, args, settings, key)
        for phase in ("first", "rerun"):
            r = result[phase]
            summary = r["summary"]
            print(
                f"  {phase:>6}: {r['customers_per_second']:>9,.0f} customers/s "
                f"({r['seconds']:.1f} s, {r['fake_requests']:,} requests to the fake); "
                f"created {summary['created']:,}, updated {summary['updated']:,}, "
                f"unchanged {summary['unchanged']:,}, status {summary['status']}"
            )
        with sm() as session:
            customers = session.scalar(
                select(func.count()).select_from(Customer).where(Customer.store_id == store_id)
            )
            cards = session.execute(select(CustomerCard.id, CustomerCard.stamps)).all()
            sums = dict(
                session.execute(
                    select(
                        StampLedgerEntry.customer_card_id, func.sum(StampLedgerEntry.delta)
                    ).group_by(StampLedgerEntry.customer_card_id)
                ).all()
            )
        balanced = all(sums.get(cid, 0) == stamps for cid, stamps in cards)
        ok = (
            result["first"]["summary"]["status"] == "succeeded"
            and result["rerun"]["summary"]["status"] == "succeeded"
            and result["rerun"]["summary"]["created"] == 0
            and result["rerun"]["summary"]["updated"] == 0
            and balanced
        )
        print(
            f"  check: {customers:,} customers, {len(cards):,} cards, every balance == its "
            f"ledger sum: {balanced}; re-run wrote nothing: "
            f"{result['rerun']['summary']['created'] + result['rerun']['summary']['updated'] == 0}"
            f" -> {'OK' if ok else 'FAIL'}"
        )
        print(f"  peak RSS {rss_peak_mb():,.0f} MB")
        return ok
    finally:
        engine.dispose()


def _run_loke_import(
    sm: sessionmaker[Session], store_id: int, args: argparse.Namespace, settings: Any, key: bytes
) -> dict[str, Any]:
    from models.cards import create_card
    from models.connections import connect
    from tests.fakes.loke import CLIENT_ID, CLIENT_SECRET, ORGANIZATION_ID, FakeLoke
    from worker.sync import run_customer_sync

    fake = FakeLoke(seed=args.seed)
    fake.generate(args.n, shared_phone_every=50)
    result: dict[str, Any] = {}
    with fake.serve() as base_url:
        with sm() as session:
            card = create_card(session, store_id=store_id, name="LOKE points", stamps_required=10)
            connection, _ = connect(
                session,
                store_id=store_id,
                source="loke",
                account=ORGANIZATION_ID,
                secrets={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
                api_base_url=base_url,
                api_version=None,
                key=key,
                config={"auth_url": base_url, "card_id": card.id, "points_per_stamp": 100},
            )
            session.commit()
            connection_id = connection.id
        for phase in ("first", "rerun"):
            before = fake.requests
            started = time.perf_counter()
            summary = run_customer_sync(
                sm,
                connection_id=connection_id,
                settings=settings,
                key=key,
                budget=LocalBudget(capacity=1e9, refill_per_second=1e9),
            )
            seconds = time.perf_counter() - started
            result[phase] = {
                "seconds": seconds,
                "customers_per_second": args.n / seconds,
                "summary": summary.as_dict(),
                "fake_requests": fake.requests - before,
            }
    return result


# --- report ------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def summary(
    results: dict[str, tuple[list[Phase], list[Phase], list[Check]]], args: argparse.Namespace
) -> bool:
    """The compact table; returns whether every check and PostgreSQL/RSS target passed."""
    ok = True
    print(
        f"\nSummary (customers/s of our own processing; end to end incl. the fake in brackets;"
        f" {args.apply} path at N={args.n:,}, naive baseline on {args.sample:,})"
    )
    print(
        f"{'database':<11} {'phase':<12} {args.apply + ' N':>22} {'naive sample':>22}"
        f" {'speed-up':>9}  {'RSS peak':>8}  target"
    )
    targets = {"first load": TARGET_FIRST_LOAD, "unchanged": TARGET_UNCHANGED}
    for db, (main, base, checks) in results.items():
        for p, b in zip(main, base, strict=True):
            target = targets.get(p.name)
            if target is None or args.apply != "bulk":
                goal = ""
            else:
                met = p.rate >= target
                binding = db == "postgresql"
                ok = ok and (met or not binding)
                goal = f">= {target / 1000:g}k/s {verdict(met)}" + ("" if binding else " (info)")
            main_rate = f"{p.rate:,.0f} ({p.rate_incl_fake:,.0f})"
            base_rate = f"{b.rate:,.0f} ({b.rate_incl_fake:,.0f})"
            print(
                f"{db:<11} {p.name:<12} {main_rate:>22} {base_rate:>22}"
                f" {p.rate / b.rate:>8.1f}x  {p.rss_peak:>5.0f} MB  {goal}"
            )
        ok = ok and all(check.ok for check in checks)
    peak = rss_peak_mb()
    rss_ok = peak <= TARGET_RSS_MB
    ok = ok and rss_ok
    print(
        f"peak RSS of the whole run {peak:.0f} MB (target <= {TARGET_RSS_MB:g} MB, stated for 1M)"
        f" {verdict(rss_ok)}"
    )
    failed = [check.name for _, _, checks in results.values() for check in checks if not check.ok]
    print("correctness: " + ("FAIL: " + ", ".join(failed) if failed else "OK"))
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="customers (default 100000)")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument(
        "--postgres-url", default=ADMIN_URL, help=f"admin URL (default {ADMIN_URL})"
    )
    parser.add_argument(
        "--pg-database",
        default=BENCH_DB,
        help=f"scratch database name, dropped and re-created (default {BENCH_DB})",
    )
    parser.add_argument("--sample", type=int, default=5_000, help="naive baseline customers")
    parser.add_argument("--phone-share", type=float, default=0.5, help="share with a phone")
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument(
        "--apply",
        choices=sorted(APPLIERS),
        default="bulk",
        help="the path of the N-customer phases (default bulk: apply_customer_page)",
    )
    parser.add_argument(
        "--source",
        choices=("shopify", "appystamp", "loke"),
        default="shopify",
        help="shopify (default: the phases below, in process) or an import source over HTTP",
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile and SQL statements by time for the N-customer phases",
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.sample < 1:
        parser.error("--n and --sample must be at least 1")
    if not 0.0 <= args.phone_share <= 1.0:
        parser.error("--phone-share must be within 0..1")

    load_before = os.getloadavg()
    if args.source != "shopify":
        print(f"Import benchmark (bench/ingest.py --source {args.source}), N {args.n:,}")
        good = True
        for db in ("postgresql", "sqlite") if args.db == "both" else (args.db,):
            if db == "postgresql":
                with postgres_database(args.postgres_url, args.pg_database, keep=args.keep) as u:
                    good = run_import_source(db, u, args) and good
            else:
                with sqlite_database(keep=args.keep) as u:
                    good = run_import_source(db, u, args) and good
        print(f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
        return 0 if good else 1
    print("Ingest benchmark (bench/ingest.py)")
    print(
        f"  {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.platform()},"
        f" {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(
        f"  N {args.n:,} customers (every one with an email, {args.phone_share:.0%} with a phone),"
        f" pages of {MAX_PAGE_SIZE}, one transaction per page; re-sync changes"
        f" {CHANGE_SHARE:.0%}; naive baseline on {args.sample:,}; seed {args.seed}"
    )
    print(
        "  fake: in process (httpx.MockTransport), customers generated lazily page by page;"
        " 'ours' = wall time minus the time inside the fake"
    )
    dbs = ("postgresql", "sqlite") if args.db == "both" else (args.db,)
    results: dict[str, tuple[list[Phase], list[Phase], list[Check]]] = {}
    started = time.perf_counter()
    for db in dbs:
        if db == "postgresql":
            with postgres_database(args.postgres_url, args.pg_database, keep=args.keep) as url:
                results[db] = run_database(db, url, args)
        else:
            with sqlite_database(keep=args.keep) as url:
                results[db] = run_database(db, url, args)
    load_after = os.getloadavg()
    ok = summary(results, args)
    print(
        f"run took {time.perf_counter() - started:.0f} s; load average"
        f" {load_before[0]:.2f} before, {load_after[0]:.2f} after ({os.cpu_count()} CPUs)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
