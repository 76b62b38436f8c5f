"""End-to-end benchmark: Shopify `orders/paid` webhooks → stamps, on PostgreSQL + Redis.

    uv run python bench/e2e.py [--orders 20000] [--customers 4000] [--concurrency 50]
                               [--worker-concurrency 2] [--admin-url URL] [--keep]

1. A throwaway database `loyalty_bench_e2e` on the local PostgreSQL, migrated, with one store,
   a 10-stamp card and a Shopify connection earning 1 stamp per paid order on that card.
2. `loyalty-sync api` and `loyalty-sync worker --concurrency N` (the real Celery worker, woken by
   the API through a Redis broker database of the bench's own) in subprocesses.
3. `--orders` signed `orders/paid` deliveries, each embedding its customer (`--customers` of
   them, unknown to the store at first: the first order of each creates and enrols it), sent
   over `--concurrency` keep-alive connections (bench/loadgen.py).
4. Waits until every order has its ledger entry, then prints events/s (deliveries until the last
   ledger entry) and the latency from each delivery's 200 to its ledger entry (p50/p99), then
   checks every customer's balance equals its number of orders and the ledger.

Target (issue 5): ≥ 5k events/s. Exits 1 when the check fails.
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
from models.cards import create_card
from models.connections import connect
from models.db import make_sessionmaker
from models.earning import configure_earning
from models.tables import CustomerCard, StampLedgerEntry, WebhookEvent
from worker.secret_key import resolve_secret_key
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "loyalty_bench_e2e"
BROKER_URL = "redis://127.0.0.1:6379/12"
SECRET = "bench-e2e-secret"
SHOP = "bench-e2e.myshopify.com"
T0 = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def order_payload(order_id: int, customer: int, when: dt.datetime) -> dict[str, object]:
    """A Shopify REST order as the `orders/paid` webhook sends it (the fields that matter)."""
    cid = 9_000_000_000 + customer
    stamp = when.isoformat()
    return {
        "id": order_id,
        "admin_graphql_api_id": f"gid://shopify/Order/{order_id}",
        "name": f"#{order_id}",
        "email": f"buyer{customer}@example.com",
        "created_at": stamp,
        "updated_at": stamp,
        "processed_at": stamp,
        "cancelled_at": None,
        "currency": "USD",
        "presentment_currency": "USD",
        "financial_status": "paid",
        "total_price": "12.50",
        "subtotal_price": "12.50",
        "current_total_price": "12.50",
        "total_discounts": "0.00",
        "total_tax": "0.00",
        "refunds": [],
        "customer": {
            "id": cid,
            "admin_graphql_api_id": f"gid://shopify/Customer/{cid}",
            "email": f"buyer{customer}@example.com",
            "first_name": f"Buyer{customer}",
            "last_name": "Bench",
            "phone": None,
            "state": "enabled",
            "created_at": T0.isoformat(),
            "updated_at": T0.isoformat(),
        },
    }


def deliveries(
    orders: int, customers: int, rng: random.Random
) -> tuple[list[tuple[int, bytes, dict[str, str]]], dict[int, int]]:
    """(order id, body, headers) per delivery, shuffled; and each customer's order count."""
    out = []
    per_customer: dict[int, int] = {}
    for i in range(orders):
        customer = rng.randrange(customers)
        per_customer[customer] = per_customer.get(customer, 0) + 1
        order_id = 5_000_000_000 + i
        body = json.dumps(order_payload(order_id, customer, T0 + dt.timedelta(seconds=i))).encode()
        signature = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest())
        headers = {
            "Content-Type": "application/json",
            "X-Shopify-Topic": "orders/paid",
            "X-Shopify-Shop-Domain": SHOP,
            "X-Shopify-Webhook-Id": f"e2e-{order_id}",
            "X-Shopify-Event-Id": f"e2e-event-{order_id}",
            "X-Shopify-Triggered-At": T0.isoformat(),
            "X-Shopify-API-Version": "2026-10",
            "X-Shopify-Hmac-Sha256": signature.decode(),
        }
        out.append((order_id, body, headers))
    rng.shuffle(out)
    return out, per_customer


@contextlib.contextmanager
def processes(database_url: str, worker_concurrency: int) -> Iterator[str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SHOPIFY_API_SECRETS": SECRET,
        "LOG_LEVEL": "WARNING",
        "SECRET_KEY": "bench",
        "CELERY_BROKER_URL": BROKER_URL,
        "PYTHONWARNINGS": "ignore",
    }
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "worker",
            "--concurrency",
            str(worker_concurrency),
            "--queues",
            "webhooks",
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        with server(
            lambda port: [sys.executable, "-m", "worker.cli", "api", "--port", str(port)], env=env
        ) as url:
            yield url
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=20000)
    parser.add_argument("--customers", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--worker-concurrency", type=int, default=2)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    database_url, engine = migrated_database(args.admin_url, BENCH_DB)
    sm = make_sessionmaker(engine)
    with sm() as session:
        store, _ = accounts.create_store(session, name="Bench", country="US")
        card = create_card(session, store_id=store.id, name="Bench card", stamps_required=10)
        connection, _ = connect(
            session,
            store_id=store.id,
            source="shopify",
            account=SHOP,
            access_token="unused",
            api_base_url="http://127.0.0.1:9",
            api_version=None,
            key=resolve_secret_key(Settings(DATABASE_URL=database_url, SECRET_KEY="bench")),
        )
        configure_earning(session, connection.id, card.id, {"kind": "per_order", "stamps": 1}, None)
        session.commit()
    items, per_customer = deliveries(args.orders, args.customers, random.Random(args.seed))
    print(
        f"PostgreSQL {BENCH_DB} + Redis broker; {args.orders} orders/paid deliveries for "
        f"{len(per_customer)} customers; worker --concurrency {args.worker_concurrency}"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 CPUs)")
    try:
        with processes(database_url, args.worker_concurrency) as base_url:
            parsed = httpx.URL(base_url)
            host, port = parsed.host, parsed.port or 80
            requests = [
                encode_post(f"{host}:{port}", "/webhooks/shopify", body, headers)
                for _, body, headers in items
            ]
            answered = [0.0] * len(requests)
            meter = CpuMeter().start()
            started = time.time()
            _latencies, outcomes, sent = run_load(
                host, port, requests, concurrency=args.concurrency, answered=answered
            )
            print(
                f"intake: {args.orders / sent:,.0f} req/s; answers {outcomes}; "
                f"all sent after {sent:.1f} s"
            )
            deadline = time.monotonic() + args.timeout
            with sm() as session:
                while True:
                    entries = (
                        session.scalar(
                            select(func.count())
                            .select_from(StampLedgerEntry)
                            .where(StampLedgerEntry.idempotency_key.like("shopify:order:%"))
                        )
                        or 0
                    )
                    session.rollback()
                    if entries >= args.orders or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
            cpu = meter.report(entries)
        with sm() as session:
            rows = session.execute(
                select(StampLedgerEntry.idempotency_key, StampLedgerEntry.created_at).where(
                    StampLedgerEntry.idempotency_key.like("shopify:order:%")
                )
            ).all()
            answered_at = {order_id: answered[i] for i, (order_id, _, _) in enumerate(items)}
            lags = [
                created.timestamp() - answered_at[int(key.rsplit(":", 1)[1])]
                for key, created in rows
            ]
            last = max(created.timestamp() for _, created in rows) if rows else time.time()
            elapsed = last - started
            print(
                f"end to end: {len(rows) / elapsed:,.0f} events/s ({len(rows)} ledger entries "
                f"{elapsed:.1f} s after the first delivery); delivery → ledger entry "
                f"p50 {percentile(lags, 50) * 1000:.0f} ms, "
                f"p99 {percentile(lags, 99) * 1000:.0f} ms"
                f"  [target ≥ 5,000 events/s]"
            )
            print(cpu)
            statuses = dict(
                session.execute(
                    select(WebhookEvent.status, func.count()).group_by(WebhookEvent.status)
                ).all()
            )
            balances = session.execute(select(CustomerCard.stamps)).scalars().all()
            ledger_total = session.scalar(select(func.sum(StampLedgerEntry.delta))) or 0
        ok = (
            statuses == {"done": args.orders}
            and len(rows) == args.orders
            and sorted(balances) == sorted(per_customer.values())
            and ledger_total == args.orders
        )
        print(
            f"check: events {statuses}, {len(balances)} cards, stamps {sum(balances)} "
            f"(ledger {ledger_total}, orders {args.orders}): {'OK' if ok else 'FAIL'}"
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
