"""Faults, with real worker processes, a real broker and the real database.

- A worker killed with SIGKILL in the middle of draining the inbox: after a restart every
  event is applied exactly once (rows the dead worker had claimed are re-driven when their
  lease expires; nothing is lost, no customer is doubled).
- The broker down while webhooks arrive (PostgreSQL + a private Redis server): every delivery
  is still accepted (committed to the inbox) and processed once the broker is back.
- PostgreSQL drops every connection in the middle of a scheduled sync (what a server restart
  looks like to the clients; a real restart would also cut the other tests running beside
  this one): the sync task retries and the run finishes with the source's full state.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from models.connections import connect
from models.crypto import derive_key
from models.db import make_sessionmaker
from models.inbox import Delivery, find_routes, insert_batch
from models.tables import Customer, ExternalReference, SyncRun, SyncState, WebhookEvent
from tests.conftest import connect_shop, is_postgres
from tests.fakes.server import serve
from tests.fakes.shopify import API_VERSION, TOKEN, FakeShopify
from tests.test_cli import _cli_command, _free_port
from tests.test_webhook_storm import (  # noqa: F401 - broker is a fixture
    ENV_VARIABLES,
    SECRET,
    SHOP,
    Processes,
    broker,
    signed_headers,
    wait_healthy,
)
from tests.test_webhook_storm import Delivery as StormDelivery

SECRET_KEY = "faults-secret"
T0 = dt.datetime(2026, 5, 1, 9, 0, tzinfo=dt.UTC)


def _env(db_url: str, broker_url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}
    env.update(
        DATABASE_URL=db_url,
        SHOPIFY_API_SECRETS=SECRET,
        SECRET_KEY=SECRET_KEY,
        LOG_LEVEL="WARNING",
        LOG_FORMAT="json",
        DB_POOL_SIZE="4",
        PYTHONWARNINGS="ignore",
        **extra,
    )
    if broker_url is not None:
        env["CELERY_BROKER_URL"] = broker_url
    return env


def _body(customer: int, version: int) -> dict[str, Any]:
    cid = 8_000_000 + customer
    return {
        "id": cid,
        "admin_graphql_api_id": f"gid://shopify/Customer/{cid}",
        "created_at": T0.isoformat(),
        "updated_at": (T0 + dt.timedelta(minutes=version)).isoformat(),
        "first_name": f"F{customer}v{version}",
        "last_name": "Fault",
        "email": f"f{customer}.v{version}@faults.example.com",
        "phone": None,
        "state": "enabled",
    }


def _count(engine: Engine, *statuses: str) -> int:
    """Rows with these statuses, read without waiting for writers: the store's SQLite engine
    begins every transaction IMMEDIATE (so a poll would queue behind the workers' batches until
    they are all done); a plain deferred read in WAL mode sees the last commit at once."""
    reader = create_engine(engine.url, poolclass=NullPool)
    try:
        with reader.connect() as conn:
            return int(
                conn.scalar(
                    select(func.count())
                    .select_from(WebhookEvent)
                    .where(WebhookEvent.status.in_(statuses))
                )
                or 0
            )
    finally:
        reader.dispose()


def _assert_store_holds_final_versions(
    engine: Engine, store_id: int, customers: int, version: int
) -> None:
    with Session(engine) as s:
        refs = s.execute(
            select(ExternalReference.external_id, Customer.first_name, Customer.email)
            .join(Customer, Customer.id == ExternalReference.customer_id)
            .where(ExternalReference.store_id == store_id)
        ).all()
        assert len(refs) == customers
        total = s.scalar(
            select(func.count()).select_from(Customer).where(Customer.store_id == store_id)
        )
        assert total == customers  # no customer doubled
        for external_id, first_name, email in refs:
            n = int(external_id) - 8_000_000
            assert first_name == f"F{n}v{version}", external_id
            assert email == f"f{n}.v{version}@faults.example.com"


class Worker:
    """`loyalty-sync worker` in its own process group, so SIGKILL reaches its pool too."""

    def __init__(self, workdir: Path, env: dict[str, str], name: str) -> None:
        self.log = workdir / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*_cli_command(), "worker", "--concurrency", "2", "--sweep-interval", "1"],
                cwd=workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def test_a_worker_killed_mid_drain_loses_and_doubles_nothing(
    db_url: str,
    engine: Engine,
    broker: str | None,  # noqa: F811 - the fixture
    make_store: Callable[..., tuple[int, str]],
    tmp_path: Path,
) -> None:
    customers, versions = 3000, 3
    store_id, _ = make_store()
    connect_shop(engine, store_id, SHOP)
    deliveries = [
        Delivery(
            source="shopify",
            dedupe_key=f"fault-{c}-{v}",
            body=json.dumps(_body(c, v)),
            topic="customers/create" if v == 0 else "customers/update",
            account=SHOP,
        )
        for v in range(versions)
        for c in range(customers)
    ]
    with engine.begin() as conn:
        routes = {("shopify", SHOP): find_routes(conn, "shopify", [SHOP])[SHOP]}
        for start in range(0, len(deliveries), 1000):
            insert_batch(conn, deliveries[start : start + 1000], routes)
    assert _count(engine, "pending") == customers * versions

    workdir = tmp_path / "run"
    workdir.mkdir()
    # A short lease: rows the killed worker had claimed come back within seconds.
    env = _env(db_url, broker, WEBHOOK_LEASE_SECONDS="3")
    first = Worker(workdir, env, "first")
    try:
        deadline = time.monotonic() + 60
        while _count(engine, "done") == 0:
            assert first.proc.poll() is None, first.output()
            assert time.monotonic() < deadline, f"nothing drained in 60 s:\n{first.output()}"
            time.sleep(0.01)
    finally:
        first.kill()
    left = _count(engine, "pending", "processing")
    assert left > 0, "the worker finished before it could be killed: nothing was tested"

    second = Worker(workdir, env, "second")
    try:
        deadline = time.monotonic() + 120
        while _count(engine, "pending", "processing"):
            assert second.proc.poll() is None, second.output()
            assert time.monotonic() < deadline, (
                f"{_count(engine, 'pending', 'processing')} rows left:\n{second.output()}"
            )
            time.sleep(0.2)
    finally:
        code = second.stop()
    assert code == 0, second.output()
    assert _count(engine, "done") == customers * versions
    _assert_store_holds_final_versions(engine, store_id, customers, versions - 1)


# --- the broker down ----------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, Callable[[], None], Callable[[], None]]]:
    """A Redis server of this test's own on a free port: (port, start, stop)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        deadline = time.monotonic() + 10
        import redis

        while True:
            try:
                if redis.Redis(port=port, socket_timeout=1).ping():
                    return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "private redis did not start"
                time.sleep(0.05)

    def stop() -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)

    start()
    try:
        yield port, start, stop
    finally:
        stop()


def test_webhooks_accepted_while_the_broker_is_down_are_processed_once_it_is_back(
    db_url: str,
    engine: Engine,
    make_store: Callable[..., tuple[int, str]],
    private_redis: tuple[int, Callable[[], None], Callable[[], None]],
    tmp_path: Path,
) -> None:
    if not is_postgres(db_url):
        pytest.skip("the embedded broker is a file beside the SQLite database: it can't go down")
    port, start_redis, stop_redis = private_redis
    store_id, _ = make_store()
    connect_shop(engine, store_id, SHOP)
    workdir = tmp_path / "run"
    workdir.mkdir()
    processes = Processes(workdir, _env(db_url, f"redis://127.0.0.1:{port}/0"))
    api_port = _free_port()
    base = f"http://127.0.0.1:{api_port}"
    customers = 150
    try:
        processes.start("worker", "worker", "--concurrency", "2", "--sweep-interval", "1")
        processes.start("api", "api", "--port", str(api_port))
        wait_healthy(base, processes)
        stop_redis()
        with httpx.Client(base_url=base, timeout=30) as client:
            for c in range(customers):
                for v in range(2):
                    delivery = StormDelivery(
                        f"down-{c}-{v}",
                        "customers/create" if v == 0 else "customers/update",
                        json.dumps(_body(c, v)).encode(),
                    )
                    response = client.post(
                        "/webhooks/shopify", content=delivery.body, headers=signed_headers(delivery)
                    )
                    assert response.status_code == 200, response.text
                    assert response.json() == {"status": "accepted"}
        # Accepted means committed: every delivery is in the inbox while the broker is down.
        assert _count(engine, "pending", "processing", "done") == customers * 2
        time.sleep(2)
        assert _count(engine, "pending") > 0  # nobody could be woken
        start_redis()
        deadline = time.monotonic() + 90
        while _count(engine, "pending", "processing"):
            processes.check_alive()
            assert time.monotonic() < deadline, (
                f"not drained after the broker came back:\n{processes.logs()}"
            )
            time.sleep(0.3)
    finally:
        processes.stop()
    assert _count(engine, "done") == customers * 2
    _assert_store_holds_final_versions(engine, store_id, customers, 1)


# --- PostgreSQL drops every connection mid-sync ------------------------------------------------


def test_a_sync_survives_postgresql_dropping_every_connection(
    db_url: str,
    engine: Engine,
    broker: str | None,  # noqa: F811 - the fixture
    make_store: Callable[..., tuple[int, str]],
    tmp_path: Path,
) -> None:
    if not is_postgres(db_url):
        pytest.skip("PostgreSQL only")
    store_id, _ = make_store()
    fake = FakeShopify(seed=11, bucket_max=1e6, restore_rate=1e6)
    fake.generate(2400)  # 10 pages of 250

    def slow(request: httpx.Request) -> httpx.Response | None:
        time.sleep(0.3)
        return fake.respond(request)

    with serve(slow, timeout_sleep=1.0) as base_url:
        with make_sessionmaker(engine)() as s:
            connect(
                s,
                store_id=store_id,
                source="shopify",
                account="faults.myshopify.com",
                access_token=TOKEN,
                api_base_url=base_url,
                api_version=API_VERSION,
                key=derive_key(SECRET_KEY),
            )
            s.commit()
        workdir = tmp_path / "run"
        workdir.mkdir()
        env = _env(db_url, broker)
        worker = Worker(workdir, env, "worker")
        try:
            enqueue = subprocess.run(
                [
                    *_cli_command(),
                    "sync",
                    "run",
                    "--store",
                    str(store_id),
                    "--source",
                    "shopify",
                    "--enqueue",
                ],
                cwd=workdir,
                env=env,
                capture_output=True,
                check=False,
                timeout=60,
            )
            assert enqueue.returncode == 0, enqueue.stderr
            deadline = time.monotonic() + 60
            while True:
                with Session(engine) as s:
                    pages = s.scalar(select(func.max(SyncRun.pages))) or 0
                if pages >= 3:
                    break
                assert worker.proc.poll() is None, worker.output()
                assert time.monotonic() < deadline, f"no progress:\n{worker.output()}"
                time.sleep(0.05)
            # Every connection of the database is dropped, again and again (six rounds, a
            # second apart), while the run goes on: between pages the pool's pre-ping
            # reconnects; a drop that lands inside a page's transaction fails the step, and the
            # task's retry resumes the run. (Dropping forever faster than a page takes would
            # only test that nothing finishes: a restart ends.)
            dropped = rounds = 0
            deadline = time.monotonic() + 180
            while True:
                if rounds < 6:
                    with engine.connect() as conn:
                        dropped += (
                            conn.scalar(
                                text(
                                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                    " WHERE datname = current_database()"
                                    " AND pid <> pg_backend_pid()"
                                )
                            )
                            or 0
                        )
                    rounds += 1
                time.sleep(1.0 if rounds < 6 else 0.2)
                with Session(engine) as s:
                    state = s.scalars(select(SyncState)).one_or_none()
                    succeeded = s.scalar(
                        select(func.count())
                        .select_from(SyncRun)
                        .where(SyncRun.status == "succeeded")
                    )
                if succeeded and state is not None and not state.in_progress:
                    break
                assert worker.proc.poll() is None, worker.output()
                assert time.monotonic() < deadline, f"the sync never finished:\n{worker.output()}"
            assert dropped >= 3
        finally:
            code = worker.stop()
    assert code == 0, worker.output()
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Customer)) == 2400
        assert s.scalar(select(func.count()).select_from(ExternalReference)) == 2400
        runs = s.execute(select(SyncRun.status, SyncRun.pages).order_by(SyncRun.id)).all()
    # An interrupted run is resumed from its cursor, never restarted: each page is applied once
    # (a page whose transaction was cut is applied again by the resumed run, and only it).
    assert runs[-1][0] == "succeeded"
    interrupted = len(runs) - 1
    assert sum(pages for _, pages in runs) == 10, runs
    print(f"runs {runs}, {dropped} connections dropped, {interrupted} interruptions")
