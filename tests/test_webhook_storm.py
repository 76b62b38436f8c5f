"""The storm: 2,000 signed Shopify deliveries through the real API into real worker processes.

~600 customers, each created and then updated a few times (increasing `updated_at`); 30% of the
requests are redeliveries; everything shuffled and sent from a thread pool to `loyalty-sync api`
(a subprocess on a free 127.0.0.1 port), drained by `loyalty-sync worker --concurrency 2` (a
subprocess with a prefork pool). PostgreSQL runs with the Redis broker (a Redis database of its
own, emptied after), SQLite with the embedded SQLite broker under the run's `./var/`.

When no row is left pending, the store must equal the source's final state: one customer per
external id holding its newest fields, every accepted delivery `done`, nothing lost or doubled.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import random
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from models.tables import Customer, ExternalReference, WebhookEvent
from tests.conftest import connect_shop, is_postgres
from tests.test_cli import SETTINGS_VARIABLES, _cli_command, _free_port

SECRET = "shpss_storm_secret_0123456789"
SHOP = "storm-shop.myshopify.com"
CUSTOMERS = 600
UNIQUE = 1400  # 600 creates + 800 updates
TOTAL = 2000  # 30% of the requests are redeliveries
DRAIN_TIMEOUT = 90.0
STOP_GRACE_SECONDS = 90.0
T0 = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
CLAIM_KEY = "loyalty-sync:test-claim"
ENV_VARIABLES = (*SETTINGS_VARIABLES, "CELERY_BROKER_URL", "SHOPIFY_API_SECRETS", "REDIS_URL")


# --- the source's history ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    webhook_id: str
    topic: str
    body: bytes


def _fields(customer: int, version: int) -> dict[str, Any]:
    return {
        "first_name": f"First{customer}v{version}",
        "last_name": f"Last{version}",
        "email": f"c{customer}.v{version}@storm.example.com",
    }


def history(seed: int = 4) -> tuple[list[Delivery], dict[str, dict[str, Any]]]:
    """The shuffled requests (duplicates included) and each customer's final fields."""
    rng = random.Random(seed)
    versions = [1] * CUSTOMERS
    for _ in range(UNIQUE - CUSTOMERS):
        versions[rng.randrange(CUSTOMERS)] += 1
    originals: list[Delivery] = []
    final: dict[str, dict[str, Any]] = {}
    for c in range(CUSTOMERS):
        cid = 7_000_000 + c
        for v in range(versions[c]):
            fields = _fields(c, v)
            body = {
                "id": cid,
                "admin_graphql_api_id": f"gid://shopify/Customer/{cid}",
                "created_at": T0.isoformat(),
                "updated_at": (T0 + dt.timedelta(minutes=v)).isoformat(),
                "phone": None,
                "state": "enabled",
                **fields,
            }
            topic = "customers/create" if v == 0 else "customers/update"
            originals.append(Delivery(f"storm-{cid}-{v}", topic, json.dumps(body).encode()))
        final[str(cid)] = _fields(c, versions[c] - 1)
    requests = originals + [rng.choice(originals) for _ in range(TOTAL - UNIQUE)]
    rng.shuffle(requests)
    return requests, final


def signed_headers(delivery: Delivery) -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), delivery.body, hashlib.sha256).digest()
    return {
        "X-Shopify-Topic": delivery.topic,
        "X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(),
        "X-Shopify-Shop-Domain": SHOP,
        "X-Shopify-API-Version": "2026-10",
        "X-Shopify-Webhook-Id": delivery.webhook_id,
        "X-Shopify-Event-Id": f"ev-{delivery.webhook_id}",
        "X-Shopify-Triggered-At": "2026-11-22T06:00:00Z",
        "Content-Type": "application/json",
    }


# --- the broker -------------------------------------------------------------------------------


def _redis_broker() -> Iterator[str]:
    """A Redis database nobody uses (claimed with a key), emptied after the test."""
    import redis

    client: Any = None
    token = uuid.uuid4().hex
    try:
        for db in range(15, 0, -1):
            candidate = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
            if candidate.dbsize() == 0 and candidate.set(CLAIM_KEY, token, nx=True, ex=900):
                client = candidate
                break
            candidate.close()
    except redis.ConnectionError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis must run on {REDIS_HOST}:{REDIS_PORT} under CI: {exc}")
        pytest.skip(f"no Redis on {REDIS_HOST}:{REDIS_PORT}")
    if client is None:
        pytest.skip("no free Redis database (1-15) for the storm")
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{client.connection_pool.connection_kwargs['db']}"
    finally:
        if client.get(CLAIM_KEY) == token.encode():
            client.flushdb()
        client.close()


@pytest.fixture
def broker(db_url: str) -> Iterator[str | None]:
    """Redis for PostgreSQL; None (the embedded SQLite broker) for SQLite."""
    if is_postgres(db_url):
        yield from _redis_broker()
    else:
        yield None


# --- the processes ----------------------------------------------------------------------------


class Processes:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.running: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [*_cli_command(), *args],
                cwd=self.workdir,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.running.append((name, proc, log_path))
        return proc

    def check_alive(self) -> None:
        for name, proc, _ in self.running:
            assert proc.poll() is None, f"{name} exited early:\n{self.logs()}"

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(
            f"--- {name} ---\n{path.read_text(errors='replace')[-tail:]}"
            for name, _, path in self.running
        )

    def stop(self) -> list[int | None]:
        """SIGTERM to all, then their exit codes (None: still running after the grace period,
        killed). A warm shutdown finishes the tasks in flight first, which on a loaded machine
        has taken over 30 s."""
        codes: list[int | None] = []
        for _, proc, _ in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in self.running:
            try:
                codes.append(proc.wait(STOP_GRACE_SECONDS))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes.append(None)
        return codes


def wait_healthy(base: str, processes: Processes, timeout: float = 30.0) -> None:
    """Until the API at `base` answers /healthz (its processes must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        processes.check_alive()
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"no /healthz in {timeout:.0f} s:\n{processes.logs()}"
        time.sleep(0.1)


def _count(engine: Engine, *statuses: str) -> int:
    with Session(engine) as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(WebhookEvent)
                .where(WebhookEvent.status.in_(statuses))
            )
            or 0
        )


# --- the test ---------------------------------------------------------------------------------


def test_storm_through_the_real_api_and_workers(
    db_url: str,
    engine: Engine,
    broker: str | None,
    make_store: Callable[..., tuple[int, str]],
    tmp_path: Path,
) -> None:
    store_id, _ = make_store()
    connect_shop(engine, store_id, SHOP)

    workdir = tmp_path / "run"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}
    env.update(
        DATABASE_URL=db_url,
        SHOPIFY_API_SECRETS=SECRET,
        LOG_LEVEL="WARNING",
        LOG_FORMAT="json",
        DB_POOL_SIZE="4",
        PYTHONWARNINGS="ignore",
    )
    if broker is not None:
        env["CELERY_BROKER_URL"] = broker
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    requests, final = history()
    processes = Processes(workdir, env)
    try:
        # No periodic sweep during the test (its first pass runs at start, before any
        # delivery): whatever gets drained was drained because the API woke the workers.
        processes.start("worker", "worker", "--concurrency", "2", "--sweep-interval", "3600")
        processes.start("api", "api", "--port", str(port))
        wait_healthy(base, processes)

        started = time.monotonic()
        with httpx.Client(base_url=base, timeout=30) as client:

            def send(delivery: Delivery) -> tuple[str, int, str]:
                response = client.post(
                    "/webhooks/shopify", content=delivery.body, headers=signed_headers(delivery)
                )
                status = response.json().get("status", "") if response.status_code == 200 else ""
                return delivery.webhook_id, response.status_code, status

            with ThreadPoolExecutor(max_workers=16) as pool:
                answers = list(pool.map(send, requests))
        sent = time.monotonic() - started

        assert Counter(code for _, code, _ in answers) == {200: TOTAL}
        by_key: dict[str, list[str]] = {}
        for key, _, status in answers:
            by_key.setdefault(key, []).append(status)
        assert len(by_key) == UNIQUE
        for key, statuses in by_key.items():
            assert sorted(statuses) == ["accepted"] + ["duplicate"] * (len(statuses) - 1), key

        deadline = time.monotonic() + DRAIN_TIMEOUT
        while _count(engine, "pending", "processing"):
            processes.check_alive()
            assert time.monotonic() < deadline, (
                f"{_count(engine, 'pending', 'processing')} rows still pending after "
                f"{DRAIN_TIMEOUT:.0f} s:\n{processes.logs()}"
            )
            time.sleep(0.2)
        drained = time.monotonic() - started
    finally:
        codes = processes.stop()
    print(
        f"storm ({engine.dialect.name}, broker {'redis' if broker else 'embedded'}): "
        f"{TOTAL} requests sent in {sent:.1f} s, all drained after {drained:.1f} s"
    )
    # The API's wakes did it: the worker's periodic sweep was an hour away.
    assert drained < DRAIN_TIMEOUT
    # uvicorn re-raises SIGTERM after its graceful shutdown; the worker's warm shutdown exits 0.
    assert codes[0] == 0, f"worker stop {codes}:\n{processes.logs()}"
    assert codes[1] in (0, -signal.SIGTERM), f"api stop {codes}:\n{processes.logs()}"

    # Every accepted delivery is done: nothing lost, nothing left behind.
    with Session(engine) as s:
        events = s.execute(select(WebhookEvent.dedupe_key, WebhookEvent.status)).all()
        assert len(events) == UNIQUE
        assert Counter(status for _, status in events) == {"done": UNIQUE}

        # The store equals the source's final state: one live customer per external id.
        refs = s.execute(
            select(ExternalReference.external_id, Customer)
            .join(Customer, Customer.id == ExternalReference.customer_id)
            .where(ExternalReference.store_id == store_id, ExternalReference.source == "shopify")
        ).all()
        assert len(refs) == CUSTOMERS
        assert {external_id for external_id, _ in refs} == set(final)
        assert len({customer.id for _, customer in refs}) == CUSTOMERS
        customers = s.scalar(
            select(func.count()).select_from(Customer).where(Customer.store_id == store_id)
        )
        assert customers == CUSTOMERS
        for external_id, customer in refs:
            got = {
                "first_name": customer.first_name,
                "last_name": customer.last_name,
                "email": customer.email,
            }
            assert got == final[external_id], external_id
