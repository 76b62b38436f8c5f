"""Benchmark of webhook intake and processing on PostgreSQL.

    uv run python bench/webhooks.py [--n 20000] [--customers 5000] [--concurrency 50]
                                    [--workers 2] [--admin-url URL] [--keep]

1. A throwaway database `loyalty_bench_webhooks` on the local PostgreSQL, migrated, with one
   store and its Shopify connection.
2. `loyalty-sync api` in a subprocess (its own core; LOG_LEVEL=WARNING) with a known
   SHOPIFY_API_SECRETS.
3. N signed `customers/update` deliveries (for `--customers` customers, each updated several
   times with increasing `updated_at`, sent in shuffled order) over `--concurrency` keep-alive
   connections (bench/loadgen.py, one event loop): accepted req/s, p50/p99 latency. Every
   answer must be 200 accepted.
4. `--workers` worker processes drain the inbox (`models.webhook_processing.drain`, the code the
   Celery task runs, in plain processes so the figure is the processing, not the broker):
   events/s from the first claim until no row is pending, then a check that the store equals
   the newest update of every customer.

Targets (issue 4): ≥ 5k accepted req/s per API process with p99 ≤ 25 ms; ≥ 5k events/s drained
with 2 workers. Exits 1 when the check fails.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
from sqlalchemy import func, select

from bench.harness import CpuMeter, migrated_database, percentile, recreate_database, server
from bench.loadgen import encode_post
from bench.loadgen import run as run_load
from models import accounts
from models.connections import connect
from models.db import make_sessionmaker
from models.tables import Customer, ExternalReference, WebhookEvent
from worker.secret_key import resolve_secret_key
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "loyalty_bench_webhooks"
SECRET = "bench-webhook-secret"
SHOP = "bench-shop.myshopify.com"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
# A Redis database of the bench's own (flushed after): the drain below runs in plain processes,
# so nobody consumes the wake messages the API sends.
BROKER_URL = "redis://127.0.0.1:6379/13"

DRAIN_CODE = """
import sys, time
from models.db import make_engine, make_sessionmaker
from models.webhook_processing import drain
engine = make_engine(sys.argv[1], pool_size=2)
sm = make_sessionmaker(engine)
idle_since = None
while True:
    result = drain(sm, batch_size=int(sys.argv[2]))
    if result.claimed:
        idle_since = None
    else:
        idle_since = idle_since or time.monotonic()
        if time.monotonic() - idle_since > 3:
            break
        time.sleep(0.05)
"""


@contextlib.contextmanager
def api_server(database_url: str) -> Iterator[str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SHOPIFY_API_SECRETS": SECRET,
        "LOG_LEVEL": "WARNING",
        "SECRET_KEY": "bench",
        # The production broker: the API wakes the workers through it after each commit.
        "CELERY_BROKER_URL": BROKER_URL,
    }
    with server(
        lambda port: [sys.executable, "-m", "worker.cli", "api", "--port", str(port)], env=env
    ) as url:
        yield url


def deliveries(n: int, customers: int, rng: random.Random) -> list[tuple[bytes, dict[str, str]]]:
    """N signed `customers/update` deliveries, shuffled; the last update of each customer is
    the one with the largest `updated_at`."""
    out = []
    for i in range(n):
        number = i % customers
        version = i // customers
        body = json.dumps(
            {
                "id": 7_000_000_000 + number,
                "first_name": f"First{number}",
                "last_name": f"Last{number}v{version}",
                "email": f"customer{number}@example.com",
                "phone": None,
                "state": "enabled",
                "tags": "bench, webhook",
                "updated_at": (T0 + dt.timedelta(seconds=version)).isoformat(),
                "admin_graphql_api_id": f"gid://shopify/Customer/{7_000_000_000 + number}",
            }
        ).encode()
        signature = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest())
        headers = {
            "Content-Type": "application/json",
            "X-Shopify-Topic": "customers/update",
            "X-Shopify-Shop-Domain": SHOP,
            "X-Shopify-Webhook-Id": f"bench-{i}",
            "X-Shopify-Event-Id": f"event-{i}",
            "X-Shopify-Triggered-At": (T0 + dt.timedelta(seconds=version)).isoformat(),
            "X-Shopify-API-Version": "2026-10",
            "X-Shopify-Hmac-Sha256": signature.decode(),
        }
        out.append((body, headers))
    rng.shuffle(out)
    return out


def send_all(
    base_url: str, items: Sequence[tuple[bytes, dict[str, str]]], concurrency: int
) -> tuple[list[float], dict[str, int], float]:
    """`concurrency` keep-alive connections from one event loop (bench/loadgen.py: a client
    that costs far less per request than the API under test)."""
    parsed = httpx.URL(base_url)
    host, port = parsed.host, parsed.port or 80
    requests = [
        encode_post(f"{host}:{port}", "/webhooks/shopify", body, headers) for body, headers in items
    ]
    return run_load(host, port, requests, concurrency=concurrency)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="deliveries")
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    database_url, engine = migrated_database(args.admin_url, BENCH_DB)
    sm = make_sessionmaker(engine)
    with sm() as session:
        store, _ = accounts.create_store(session, name="Bench", country="US")
        connect(
            session,
            store_id=store.id,
            source="shopify",
            account=SHOP,
            access_token="unused",
            api_base_url="http://127.0.0.1:9",
            api_version=None,
            key=resolve_secret_key(Settings(DATABASE_URL=database_url, SECRET_KEY="bench")),
        )
        session.commit()
    items = deliveries(args.n, args.customers, random.Random(args.seed))
    print(f"PostgreSQL {BENCH_DB}; {args.n} deliveries for {args.customers} customers")
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 CPUs)")
    try:
        with api_server(database_url) as base_url:
            intake_meter = CpuMeter().start()
            latencies, outcomes, elapsed = send_all(base_url, items, args.concurrency)
            intake_cpu = intake_meter.report(args.n)
        rate = args.n / elapsed
        p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
        print(
            f"intake: {rate:,.0f} accepted req/s at {args.concurrency} connections; "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms; answers {outcomes}"
            f"  [target ≥ 5,000 req/s, p99 ≤ 25 ms]"
        )
        print(f"  intake {intake_cpu}")
        processing_meter = CpuMeter().start()
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", DRAIN_CODE, database_url, str(args.batch_size)], cwd=ROOT
            )
            for _ in range(args.workers)
        ]
        with sm() as session:
            while True:
                left = session.scalar(
                    select(func.count())
                    .select_from(WebhookEvent)
                    .where(WebhookEvent.status.in_(("pending", "processing")))
                )
                session.rollback()
                if not left:
                    break
                time.sleep(0.05)
        drained = time.perf_counter() - started
        for proc in procs:
            proc.wait(timeout=60)
        print(
            f"processing: {args.n / drained:,.0f} events/s with {args.workers} worker processes "
            f"({drained:.1f} s)  [target ≥ 5,000 events/s]"
        )
        print(f"  processing {processing_meter.report(args.n)}")
        with sm() as session:
            statuses = dict(
                session.execute(
                    select(WebhookEvent.status, func.count()).group_by(WebhookEvent.status)
                ).all()
            )
            live = session.scalar(select(func.count()).select_from(Customer)) or 0
            refs = session.scalar(select(func.count()).select_from(ExternalReference)) or 0
            last = args.n // args.customers - (1 if args.n % args.customers == 0 else 0)
            sample = session.scalar(
                select(Customer.last_name)
                .join(ExternalReference, ExternalReference.customer_id == Customer.id)
                .where(ExternalReference.external_id == str(7_000_000_000))
            )
        ok = (
            statuses == {"done": args.n}
            and live == args.customers
            and refs == args.customers
            and sample == f"Last0v{last}"
        )
        print(
            f"check: events {statuses}, customers {live}, references {refs}, "
            f"customer 0 last name {sample!r} (expected 'Last0v{last}'): {'OK' if ok else 'FAIL'}"
        )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return 0 if ok else 1
    finally:
        engine.dispose()
        with contextlib.suppress(Exception):
            import redis

            redis.Redis.from_url(BROKER_URL).flushdb()
        if not args.keep:
            recreate_database(args.admin_url, BENCH_DB, drop_only=True)


if __name__ == "__main__":
    raise SystemExit(main())
