"""The Celery plumbing: app configuration, task registry, the API's waker, the worker's periodic
sweep, the tasks run in process, and the `events` CLI (rows inserted directly).

The real processes (API + workers, both brokers) are exercised by tests/test_webhook_storm.py.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from models.inbox import Delivery, find_routes, insert_batch
from models.tables import Customer, OutboxMessage, WebhookEvent, utcnow
from tests.conftest import connect_shop
from worker import celery_app, tasks
from worker.celery_app import EMBEDDED_BROKER_URL, celery_config, ensure_broker_directory
from worker.cli import app as cli
from worker.settings import Settings

SHOP = "plumbing.myshopify.com"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "LOG_FORMAT", "LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    # The CLI's logging set-up caches loggers on CliRunner's stderr, closed after each command:
    # here they write to whatever stderr is current instead, uncached.
    from worker import logging as worker_logging

    real = worker_logging.configure_logging

    def configure(**kwargs: Any) -> None:
        real(**kwargs)
        structlog.configure(
            cache_logger_on_first_use=False,
            logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        )

    monkeypatch.setattr(worker_logging, "configure_logging", configure)


class _CurrentStderr:
    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


# --- configuration ------------------------------------------------------------------------------


def test_the_embedded_broker_is_the_default() -> None:
    config = celery_config(Settings())
    assert (
        config["broker_url"] == EMBEDDED_BROKER_URL == "sqla+sqlite:///./var/celery-broker.sqlite"
    )
    # The SQLAlchemy transport has no fanout exchange: no remote control there.
    assert config["worker_enable_remote_control"] is False
    assert config["broker_transport_options"] == {"connect_args": {"timeout": 30}}


def test_celery_broker_url_selects_redis() -> None:
    config = celery_config(Settings(CELERY_BROKER_URL="redis://127.0.0.1:6379/3"))
    assert config["broker_url"] == "redis://127.0.0.1:6379/3"
    assert config["worker_enable_remote_control"] is True
    assert config["broker_transport_options"]["visibility_timeout"] > config["task_time_limit"]
    # An empty value means unset.
    assert celery_config(Settings(CELERY_BROKER_URL=""))["broker_url"] == EMBEDDED_BROKER_URL


def test_a_closed_redis_connection_is_a_connection_error_not_a_crash() -> None:
    """Celery closes a lost broker connection before restarting its steps; a channel of that
    connection asked for a client then meets `client is None`. Our transport reports that as a
    Redis connection error (which Celery ignores while closing, or retries), where kombu's
    raised an AttributeError that ended the worker ("Unrecoverable error")."""
    config = celery_config(Settings(CELERY_BROKER_URL="redis://127.0.0.1:6379/3"))
    assert config["broker_transport"] == celery_app.REDIS_TRANSPORT
    app = celery_app.create_celery(Settings(CELERY_BROKER_URL="redis://127.0.0.1:6379/3"))
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, celery_app.RedisTransport)
        assert connection.transport.driver_name == "redis"
        channel = connection.default_channel  # connects: the shared Redis is up
        channel.client.ping()
        assert channel._connparams()["db"] == 3
        channel.connection.client = None  # what a close leaves behind
        with pytest.raises(tuple(connection.connection_errors)) as raised:
            channel._connparams()
        assert isinstance(raised.value, redis.exceptions.ConnectionError)
    # Other brokers keep their own transports.
    assert "broker_transport" not in celery_config(Settings())


def test_delivery_guarantees_and_limits() -> None:
    conf = celery_app.create_celery(Settings()).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True
    assert conf.result_backend is None
    assert 0 < conf.task_soft_time_limit < conf.task_time_limit
    assert conf.worker_hijack_root_logger is False
    assert conf.task_default_queue == "loyalty_sync"
    assert conf.accept_content == ["json"]


def test_tasks_are_registered_explicitly_with_dotted_names() -> None:
    app = celery_app.app
    assert app.main == "loyalty_sync"
    assert tuple(app.conf.include) == ("worker.tasks", "worker.scheduled")
    app.loader.import_default_modules()
    names = {name for name in app.tasks if name.startswith("loyalty_sync.")}
    assert names == {
        "loyalty_sync.webhooks.drain",
        "loyalty_sync.webhooks.sweep",
        "loyalty_sync.syncs.dispatch",
        "loyalty_sync.syncs.run",
        "loyalty_sync.syncs.resync_customer",
        "loyalty_sync.stamps.reconcile_all",
        "loyalty_sync.stamps.reconcile",
        "loyalty_sync.outbox.deliver",
        "loyalty_sync.maintenance.retention",
    }
    assert app.tasks[tasks.DRAIN_TASK] is tasks.drain_inbox._get_current_object()
    assert app.tasks[tasks.SWEEP_TASK] is tasks.sweep_inbox._get_current_object()


def test_each_area_has_its_queue_and_beat_schedules_every_periodic_task() -> None:
    from worker.scheduled import SYNC_TASK

    conf = celery_app.create_celery(Settings(OUTBOX_INTERVAL_SECONDS="12")).conf
    router = celery_app.create_celery(Settings()).amqp.router
    assert router.route({}, tasks.DRAIN_TASK)["queue"].name == "webhooks"
    assert router.route({}, SYNC_TASK)["queue"].name == "syncs"
    assert router.route({}, "loyalty_sync.stamps.reconcile")["queue"].name == "syncs"
    assert router.route({}, "loyalty_sync.outbox.deliver")["queue"].name == "outbox"
    schedule = conf.beat_schedule
    tasks_by_entry = {name: entry["task"] for name, entry in schedule.items()}
    assert tasks_by_entry == {
        "customer-syncs": "loyalty_sync.syncs.dispatch",
        "stamp-reconciliation": "loyalty_sync.stamps.reconcile_all",
        "outbox-delivery": "loyalty_sync.outbox.deliver",
        "inbox-sweep": "loyalty_sync.webhooks.sweep",
        "retention": "loyalty_sync.maintenance.retention",
    }
    assert schedule["outbox-delivery"]["schedule"] == 12.0
    assert schedule["stamp-reconciliation"]["schedule"] == 3600.0
    # A tick nobody consumed expires instead of piling up.
    assert all(entry["options"]["expires"] > 0 for entry in schedule.values())


def test_the_broker_directory_is_created(tmp_path: Path) -> None:
    ensure_broker_directory(EMBEDDED_BROKER_URL)
    assert Path("var").is_dir()
    ensure_broker_directory(f"sqla+sqlite:///{tmp_path / 'a' / 'b' / 'broker.sqlite'}")
    assert (tmp_path / "a" / "b").is_dir()
    ensure_broker_directory("redis://127.0.0.1:6379/0")  # nothing to create


def test_a_drain_message_goes_through_the_embedded_broker(tmp_path: Path) -> None:
    """kombu's SQLAlchemy transport works with the SQLAlchemy installed here."""
    url = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    app = celery_app.configure(Settings(CELERY_BROKER_URL=url))
    try:
        tasks.send_drain()
        with app.connection_for_read() as conn:
            message = conn.SimpleQueue("webhooks").get(timeout=5)
            assert message.headers["task"] == "loyalty_sync.webhooks.drain"
            assert message.headers["expires"] is not None
            message.ack()
    finally:
        celery_app.configure(Settings())


def test_consumed_embedded_broker_messages_are_pruned(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "broker.sqlite"
    url = f"sqla+sqlite:///{path}"
    assert tasks.prune_embedded_broker(url) == 0  # no table yet
    app = celery_app.configure(Settings(CELERY_BROKER_URL=url))
    try:
        tasks.send_drain()
        with app.connection_for_read() as conn:
            conn.SimpleQueue("webhooks").get(timeout=5).ack()
        tasks.send_drain()  # not consumed
        assert tasks.prune_embedded_broker(url) == 0  # consumed just now: kept for an hour
        assert tasks.prune_embedded_broker(url, keep=dt.timedelta(seconds=-5)) == 1
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT visible FROM kombu_message").fetchall() == [(1,)]
    finally:
        celery_app.configure(Settings())
    assert tasks.prune_embedded_broker("redis://127.0.0.1:6379/0") == 0


# --- the API's waker -----------------------------------------------------------------------------


class Recorder:
    def __init__(self, *, fail: bool = False, delay: float = 0.0) -> None:
        self.times: list[float] = []
        self.fail = fail
        self.delay = delay

    def __call__(self) -> None:
        time.sleep(self.delay)
        self.times.append(time.monotonic())
        if self.fail:
            raise ConnectionError("broker down")


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_burst_of_commits_sends_few_wakes_and_the_last_commit_is_covered() -> None:
    sent = Recorder()
    waker = tasks.DrainWaker(sent, interval=0.05).start()
    try:
        committed: list[float] = []
        for _ in range(200):  # 200 commits within ~0.2 s
            committed.append(time.monotonic())
            waker(3)
            time.sleep(0.001)
        _wait_for(lambda: bool(sent.times) and sent.times[-1] >= committed[-1])
        time.sleep(0.15)
    finally:
        waker.stop()
    assert waker.notified_rows == 600
    assert 1 <= len(sent.times) <= 12, len(sent.times)  # one per 50 ms window, not 200
    gaps = [b - a for a, b in zip(sent.times, sent.times[1:], strict=False)]
    assert all(gap >= 0.045 for gap in gaps), gaps
    assert sent.times[-1] >= committed[-1]  # every commit is followed by a wake


def test_no_commit_no_wake_and_stop_flushes_the_wake_owed() -> None:
    sent = Recorder()
    waker = tasks.DrainWaker(sent, interval=10).start()
    time.sleep(0.05)
    assert sent.times == []
    waker(1)
    _wait_for(lambda: len(sent.times) == 1)
    waker(1)  # inside the 10 s window: owed, sent by stop()
    waker.stop()
    assert len(sent.times) == 2


def test_a_broker_failure_is_logged_not_raised() -> None:
    sent = Recorder(fail=True)
    waker = tasks.DrainWaker(sent, interval=0.01).start()
    try:
        waker(5)  # the intake writer's thread never sees the error
        _wait_for(lambda: waker.failures == 1)
        waker(5)
        _wait_for(lambda: waker.failures == 2)
    finally:
        waker.stop()
    assert waker.sent == 0


def test_the_api_wakes_the_workers_per_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from worker.cli import serve_api

    apps: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **_kw: apps.append(app))
    serve_api(Settings(), host="127.0.0.1", port=8000)
    assert isinstance(apps[0].state.intake.on_committed, tasks.DrainWaker)


# --- the worker's periodic sweep ------------------------------------------------------------------


def test_the_periodic_sweep_drains_at_once_then_sweeps() -> None:
    sweeps, drains = Recorder(), Recorder()
    periodic = tasks.PeriodicSweep(interval=0.1, send_sweep=sweeps, send_drain=drains).start()
    try:
        _wait_for(lambda: len(sweeps.times) >= 3)
    finally:
        periodic.stop()
    assert len(drains.times) == 1
    count = len(sweeps.times)
    time.sleep(0.25)
    assert len(sweeps.times) == count  # stopped


def test_the_periodic_sweep_survives_a_broker_failure() -> None:
    sweeps = Recorder(fail=True)
    periodic = tasks.PeriodicSweep(
        interval=0.1, send_sweep=sweeps, send_drain=Recorder(fail=True)
    ).start()
    try:
        _wait_for(lambda: len(sweeps.times) >= 2)
    finally:
        periodic.stop()


# --- the tasks, in process, on the real processing core -----------------------------------------


@pytest.fixture
def shop(engine: Engine, make_store: Callable[..., tuple[int, str]]) -> int:
    store_id, _ = make_store()
    connect_shop(engine, store_id, SHOP)
    return store_id


def _customer(cid: int, first_name: str, minute: int = 0) -> str:
    return json.dumps(
        {
            "id": cid,
            "email": f"c{cid}@example.com",
            "first_name": first_name,
            "last_name": "Doe",
            "updated_at": f"2026-05-01T10:{minute:02d}:00+00:00",
        }
    )


def insert(engine: Engine, *bodies: str, topic: str = "customers/update") -> list[int]:
    deliveries = [
        Delivery(
            source="shopify",
            dedupe_key=f"wh-{time.monotonic_ns()}-{i}",
            body=body,
            topic=topic,
            event_id=f"ev-{i}",
            account=SHOP,
        )
        for i, body in enumerate(bodies)
    ]
    with engine.begin() as conn:
        routes = find_routes(conn, "shopify", [SHOP])
        insert_batch(conn, deliveries, {("shopify", SHOP): routes.get(SHOP)})
        keys = [d.dedupe_key for d in deliveries]
        ids = conn.scalars(
            select(WebhookEvent.id)
            .where(WebhookEvent.dedupe_key.in_(keys))
            .order_by(WebhookEvent.id)
        ).all()
    return list(ids)


@pytest.fixture
def task_database(db_url: str, engine: Engine) -> Iterator[None]:
    tasks.database.use(db_url)
    yield
    tasks.database.use(None)


def test_the_drain_task_applies_pending_rows(
    engine: Engine, shop: int, task_database: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    insert(engine, _customer(1, "Ana", 1), _customer(1, "Old", 0), _customer(2, "Bo"))
    requeued: list[Any] = []
    monkeypatch.setattr(tasks.drain_inbox, "apply_async", lambda **kw: requeued.append(kw))
    result = tasks.drain_inbox.run()
    assert result["claimed"] == 3
    assert result["done"] == 3
    assert requeued == []  # nothing more due
    with Session(engine) as s:
        names = sorted(s.scalars(select(Customer.first_name).where(Customer.store_id == shop)))
        assert names == ["Ana", "Bo"]
        assert set(s.scalars(select(WebhookEvent.status))) == {"done"}


def test_a_drain_that_stops_at_its_batch_limit_enqueues_another(
    engine: Engine, shop: int, task_database: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    insert(engine, *[_customer(10 + i, f"N{i}") for i in range(5)])
    requeued: list[Any] = []
    monkeypatch.setattr(tasks.drain_inbox, "apply_async", lambda **kw: requeued.append(kw))
    result = tasks.drain_inbox.run(batch_size=2, max_batches=2)
    assert (result["batches"], result["claimed"]) == (2, 4)
    assert requeued == [
        {"kwargs": {"batch_size": 2, "max_batches": 2}, "expires": tasks.WAKE_EXPIRES_SECONDS}
    ]
    assert tasks.drain_inbox.run()["claimed"] == 1


def test_a_drain_that_earned_stamps_wakes_the_outbox_once(
    engine: Engine, task_database: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live earning queues each change's pass update and push: the drain task wakes the
    outbox workers right after its commit (once), a drain of customer events does not, and a
    broker that can't take the wake loses nothing (the beat delivers the committed rows)."""
    from tests.earning_helpers import setup_store
    from tests.fakes.shopify_orders import FakeShopifyOrders
    from worker import scheduled

    store_id, _, _ = setup_store(engine)
    fake = FakeShopifyOrders()
    at = dt.datetime(2026, 5, 1, 10, tzinfo=dt.UTC)
    for order_id in (1, 2):
        fake.add_order(order_id, customer_id=77, amount=1500, at=at)
    deliveries = [
        Delivery(
            source="shopify",
            dedupe_key=f"paid-{order_id}",
            body=json.dumps(fake.rest_order(order_id)),
            topic="orders/paid",
            event_id=f"paid-{order_id}",
            account="shop-1.myshopify.com",
        )
        for order_id in (1, 2)
    ]
    with engine.begin() as conn:
        routes = find_routes(conn, "shopify", ["shop-1.myshopify.com"])
        insert_batch(
            conn, deliveries, {("shopify", "shop-1.myshopify.com"): routes["shop-1.myshopify.com"]}
        )
    wakes: list[Any] = []
    monkeypatch.setattr(tasks.drain_inbox, "apply_async", lambda **kw: None)
    monkeypatch.setattr(scheduled.deliver_outbox, "apply_async", lambda **kw: wakes.append(kw))
    result = tasks.drain_inbox.run()
    assert (result["done"], result["stamps_earned"]) == (2, 2)
    assert len(wakes) == 1
    with Session(engine) as s:
        kinds = sorted(
            s.scalars(select(OutboxMessage.kind).where(OutboxMessage.store_id == store_id))
        )
    assert kinds == ["pass_update", "pass_update", "push", "push"]

    connect_shop(engine, store_id, SHOP)
    insert(engine, _customer(1, "Ana"))
    assert tasks.drain_inbox.run()["done"] == 1
    assert len(wakes) == 1  # nothing earned, nothing queued: no wake

    def broker_down(**_kw: Any) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(scheduled.deliver_outbox, "apply_async", broker_down)
    fake.add_order(3, customer_id=77, amount=1500, at=at)
    with engine.begin() as conn:
        insert_batch(
            conn,
            [
                Delivery(
                    source="shopify",
                    dedupe_key="paid-3",
                    body=json.dumps(fake.rest_order(3)),
                    topic="orders/paid",
                    event_id="paid-3",
                    account="shop-1.myshopify.com",
                )
            ],
            {("shopify", "shop-1.myshopify.com"): routes["shop-1.myshopify.com"]},
        )
    with structlog.testing.capture_logs() as logs:
        assert tasks.drain_inbox.run()["stamps_earned"] == 1
    assert any(e["event"] == "outbox.wake_failed" for e in logs)


def test_the_sweep_task_re_drives_a_dead_workers_rows(
    engine: Engine, shop: int, task_database: None
) -> None:
    [row_id] = insert(engine, _customer(3, "Cy"))
    with engine.begin() as conn:  # a worker claimed it ten minutes ago, then died
        conn.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == row_id)
            .values(
                status="processing",
                attempts=1,
                next_attempt_at=utcnow() - dt.timedelta(minutes=10),
            )
        )
    result = tasks.sweep_inbox.run()
    assert result["swept"] == 1
    assert result["done"] == 1
    with Session(engine) as s:
        assert s.get(WebhookEvent, row_id).status == "done"  # type: ignore[union-attr]


def test_each_forked_process_opens_its_own_engine(db_url: str) -> None:
    tasks.database.use(db_url)
    try:
        first = tasks.database.sessionmaker()
        assert tasks.database.sessionmaker() is first
        tasks.database.forked()
        assert tasks.database.sessionmaker() is not first
    finally:
        tasks.database.use(None)


# --- the events CLI -------------------------------------------------------------------------------


def run(db_url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"DATABASE_URL": db_url})


def ok(db_url: str, *args: str) -> Any:
    result = run(db_url, *args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


@pytest.fixture
def wakes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sent: list[int] = []
    monkeypatch.setattr(tasks, "send_drain", lambda: sent.append(1))
    return sent


def test_events_list_show_and_filters(db_url: str, engine: Engine, shop: int) -> None:
    first, second = insert(engine, _customer(5, "Eve"), _customer(6, "Fay"))
    with engine.begin() as conn:
        conn.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == first)
            .values(status="failed", last_error="boom", attempts=8)
        )
    listed = ok(db_url, "events", "list", "--json")
    assert [e["id"] for e in listed] == [second, first]  # newest first
    assert "body" not in listed[0]
    assert listed[1]["status"] == "failed"
    assert listed[1]["last_error"] == "boom"
    assert [e["id"] for e in ok(db_url, "events", "list", "--status", "failed", "--json")] == [
        first
    ]
    assert [e["id"] for e in ok(db_url, "events", "list", "--store", str(shop), "--json")] == [
        second,
        first,
    ]
    assert ok(db_url, "events", "list", "--store", str(shop + 1000), "--json") == []

    shown = ok(db_url, "events", "show", str(first))
    assert shown["id"] == first
    assert json.loads(shown["body"])["first_name"] == "Eve"
    assert shown["topic"] == "customers/update"

    table = run(db_url, "events", "list")
    assert table.exit_code == 0
    assert "customers/update" in table.stdout
    assert "boom" in table.stdout


def test_events_show_unknown_and_bad_status_are_clean_errors(db_url: str, engine: Engine) -> None:
    result = run(db_url, "events", "show", "999999")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "error: webhook event 999999 not found"
    assert run(db_url, "events", "list", "--status", "nope").exit_code == 2


def test_events_replay_by_id_and_by_status(
    db_url: str, engine: Engine, shop: int, wakes: list[int]
) -> None:
    ids = insert(engine, _customer(7, "Gus"), _customer(8, "Hal"), _customer(9, "Ivy"))
    with engine.begin() as conn:
        conn.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id.in_(ids))
            .values(status="failed", attempts=8, last_error="boom")
        )
    assert ok(db_url, "events", "replay", str(ids[0])) == {"replayed": 1}
    assert len(wakes) == 1
    assert ok(db_url, "events", "replay", "--status", "failed") == {"replayed": 2}
    assert len(wakes) == 2
    assert ok(db_url, "events", "replay", "--status", "failed") == {"replayed": 0}
    assert len(wakes) == 2  # nothing replayed, nobody woken
    with Session(engine) as s:
        rows = s.scalars(select(WebhookEvent).where(WebhookEvent.id.in_(ids))).all()
        assert {(r.status, r.attempts) for r in rows} == {("pending", 0)}
    # A pending row is not replayed again.
    assert ok(db_url, "events", "replay", str(ids[0])) == {"replayed": 0}


def test_events_replay_usage_errors(db_url: str, engine: Engine, wakes: list[int]) -> None:
    for args in ((), ("1", "--status", "failed")):
        result = run(db_url, "events", "replay", *args)
        assert result.exit_code == 2
        assert result.stderr.strip() == "error: give exactly one of ID or --status"
    result = run(db_url, "events", "replay", "--status", "pending")
    assert result.exit_code == 2
    assert "can't replay rows with status 'pending'" in result.stderr
    result = run(db_url, "events", "replay", "424242")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: webhook event 424242 not found"
    assert wakes == []


def test_replay_wakes_best_effort(
    db_url: str, engine: Engine, shop: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down() -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(tasks, "send_drain", down)
    [row_id] = insert(engine, _customer(11, "Jo"))
    with engine.begin() as conn:
        conn.execute(update(WebhookEvent).values(status="failed"))
    result = run(db_url, "events", "replay", str(row_id))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"replayed": 1}
    assert "periodic sweep" in result.stderr


def test_waker_threads_do_not_leak() -> None:
    before = {t.name for t in threading.enumerate()}
    tasks.DrainWaker(Recorder()).start().stop()
    tasks.PeriodicSweep(send_sweep=Recorder(), send_drain=Recorder()).start().stop()
    after = {t.name for t in threading.enumerate()}
    assert "drain-waker" not in after - before
    assert "inbox-sweep" not in after - before
