"""The operator's commands around scheduling: `sync status`, `sync run --enqueue`,
`resync customer`, `worker --queues` validation and `beat` (a real beat process sending to the
embedded broker; a second beat refuses to run)."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from models.tables import Customer, ExternalReference
from tests.fakes.shopify import FakeShopify
from tests.test_cli import (  # noqa: F401 - _isolated is an autouse fixture
    SETTINGS_VARIABLES,
    _cli_command,
    _isolated,
    assert_clean_failure,
    ok,
)
from tests.test_cli_sync import (  # noqa: F401 - fixtures
    ENV,
    _no_redis,
    _uncached_loggers,
    cli,
    cli_ok,
    connect_shopify,
    make_store,
)


@pytest.fixture
def shopify() -> Iterator[tuple[FakeShopify, str]]:
    fake = FakeShopify(bucket_max=1e6, restore_rate=1e6)
    fake.generate(30)
    with fake.serve() as url:
        yield fake, url


def test_sync_status_json_and_table(
    db_url: str, engine: Engine, shopify: tuple[FakeShopify, str]
) -> None:
    del engine  # requested so the database is emptied after the test
    _fake, url = shopify
    store = make_store(db_url)
    connection = connect_shopify(db_url, store, url)
    before = cli_ok(db_url, "sync", "status", "--store", str(store), "--json")
    assert [(r["connection_id"], r["stream"], r["last_run"]) for r in before] == [
        (connection, "customers", None)
    ]
    cli_ok(db_url, "sync", "run", "--store", str(store), "--source", "shopify", "--json")
    after = cli_ok(db_url, "sync", "status", "--store", str(store), "--json")
    row = after[0]
    assert row["last_run"]["status"] == "succeeded"
    assert row["last_run"]["created"] == 30
    assert row["lag_seconds"] is not None
    assert row["connection_status"] == "active"
    assert "webhook_miss_rate" in row
    table = cli(db_url, "sync", "status")
    assert table.exit_code == 0
    assert "shopify" in table.stdout
    assert "succeeded" in table.stdout
    assert_clean_failure(cli(db_url, "sync", "status", "--store", "999"), mentions="Store")


def test_resync_customer_applies_one_record_and_tombstones_a_missing_one(
    db_url: str, engine: Engine, shopify: tuple[FakeShopify, str]
) -> None:
    fake, url = shopify
    store = make_store(db_url)
    connect_shopify(db_url, store, url)
    numeric = fake.ids()[3]
    fake.update_customer(numeric, firstName="Resynced")
    args = ["resync", "customer", "--store", str(store), "--source", "shopify"]
    dry = cli_ok(db_url, *args, "--external-id", str(numeric), "--dry-run")
    assert dry["found"] is True
    assert dry["created"] == 1
    with Session(engine) as s:
        assert s.scalar(select(Customer.id)) is None  # a dry run writes nothing
    done = cli_ok(db_url, *args, "--external-id", str(numeric))
    assert done["created"] == 1
    assert done["dry_run"] is False
    with Session(engine) as s:
        assert s.scalars(select(Customer.first_name)).all() == ["Resynced"]
    again = cli_ok(db_url, *args, "--external-id", str(numeric))
    assert again["unchanged"] == 1
    # An id the source never had (nor the store): nothing to write.
    unknown = cli_ok(db_url, *args, "--external-id", "999999")
    assert unknown["found"] is False
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(ExternalReference)) == 1
    # The source deleted the customer: the reference becomes a tombstone.
    with fake._lock:
        del fake._nodes[numeric]
        fake._order = None
    gone = cli_ok(db_url, *args, "--external-id", str(numeric))
    assert gone["found"] is False
    assert gone["deleted"] == 1
    with Session(engine) as s:
        tomb = s.scalars(
            select(ExternalReference).where(ExternalReference.external_id == str(numeric))
        ).one()
        assert tomb.deleted_at is not None
    assert_clean_failure(
        cli(db_url, *args, "--external-id", "gid-not-a-number"), mentions="shopify"
    )


def test_sync_run_enqueue_puts_a_forced_step_on_the_syncs_queue(
    db_url: str, engine: Engine, shopify: tuple[FakeShopify, str]
) -> None:
    del engine  # requested so the database is emptied after the test
    _fake, url = shopify
    store = make_store(db_url)
    connection = connect_shopify(db_url, store, url)
    # A broker file of this test's own (kombu keeps one engine per broker URL per process: the
    # relative default would reach the file of whichever test used it first).
    broker_file = Path.cwd() / "var" / f"broker-{uuid.uuid4().hex}.sqlite"
    result = ok(
        db_url,
        "sync",
        "run",
        "--store",
        str(store),
        "--source",
        "shopify",
        "--enqueue",
        **ENV,
        CELERY_BROKER_URL=f"sqla+sqlite:///{broker_file}",
    )
    assert result["enqueued"] is True
    assert result["connection_id"] == connection
    with sqlite3.connect(broker_file) as broker:
        rows = broker.execute(
            "SELECT q.name, m.payload FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id"
        ).fetchall()
    assert [name for name, _ in rows] == ["syncs"]
    message = json.loads(rows[0][1])
    assert message["headers"]["task"] == "loyalty_sync.syncs.run"
    positional, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert positional == []
    assert kwargs == {"connection_id": connection, "full": False, "force": True}
    assert_clean_failure(
        cli(
            db_url,
            "sync",
            "run",
            "--store",
            str(store),
            "--source",
            "shopify",
            "--enqueue",
            "--dry-run",
        ),
        code=2,
    )


def test_worker_rejects_unknown_queues(db_url: str) -> None:
    assert_clean_failure(
        cli(db_url, "worker", "--queues", "webhooks,nope"), code=2, mentions="nope"
    )


def _broker_queues(path: Path) -> list[str]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as broker:
        try:
            rows = broker.execute(
                "SELECT q.name, m.payload FROM kombu_message m "
                "JOIN kombu_queue q ON q.id = m.queue_id"
            ).fetchall()
        except sqlite3.OperationalError:
            return []
    return [f"{name}:{json.loads(payload)['headers']['task']}" for name, payload in rows]


def test_beat_sends_the_periodic_tasks_and_only_one_beat_runs(tmp_path: Path) -> None:
    workdir = tmp_path / "beat"
    workdir.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (*SETTINGS_VARIABLES, "CELERY_BROKER_URL", "REDIS_URL")
    }
    env.update(
        DATABASE_URL=f"sqlite:///{workdir / 'db.sqlite'}",
        SECRET_KEY="beat-test",
        LOG_LEVEL="WARNING",
        SWEEP_INTERVAL_SECONDS="1",
        OUTBOX_INTERVAL_SECONDS="1",
        SYNC_DISPATCH_SECONDS="1",
        PYTHONWARNINGS="ignore",
    )
    subprocess.run(
        [*_cli_command(), "db", "upgrade"], cwd=workdir, env=env, check=True, capture_output=True
    )
    beat = subprocess.Popen([*_cli_command(), "beat"], cwd=workdir, env=env, stderr=subprocess.PIPE)
    try:
        broker = workdir / "var" / "celery-broker.sqlite"
        deadline = time.monotonic() + 30
        seen: set[str] = set()
        wanted = {
            "webhooks:loyalty_sync.webhooks.sweep",
            "outbox:loyalty_sync.outbox.deliver",
            "syncs:loyalty_sync.syncs.dispatch",
        }
        while not wanted <= seen:
            assert beat.poll() is None, beat.stderr.read() if beat.stderr else ""
            assert time.monotonic() < deadline, f"beat sent only {seen}"
            time.sleep(0.3)
            seen = set(_broker_queues(broker))
        second = subprocess.run(
            [*_cli_command(), "beat"],
            cwd=workdir,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert b"Another beat is already running" in second.stderr
    finally:
        beat.send_signal(signal.SIGTERM)
        code = beat.wait(30)
        if beat.stderr is not None:
            beat.stderr.close()
    assert code == 0
    assert (workdir / "var" / "celerybeat-schedule").exists() or any(
        p.name.startswith("celerybeat-schedule") for p in (workdir / "var").iterdir()
    )
