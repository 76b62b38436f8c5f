"""Prometheus metrics: `/metrics` on the API, webhook intake counters, database gauges, the
upstream observer of the connectors, and the worker's multiprocess exporter.

Counters are process-wide, so each test compares a value before and after what it does.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from api.app import create_app
from connectors import http as connector_http
from connectors.ratelimit import LocalBudget
from connectors.shopify.client import ShopifyClient
from connectors.square.client import SquareClient
from models.tables import Connection, OutboxMessage, SyncState
from tests.conftest import connect_shop
from tests.test_webhooks_intake import (
    SHOP,
    customer_body,
    settings_for,
    shopify_headers,
    square_body,
    square_signature,
)
from worker import metrics, metrics_db

ROOT = Path(__file__).resolve().parents[1]
NOW = dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.UTC)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`{(sample name, sorted labels): value}` of a Prometheus text exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def wh(engine: Engine, db_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(db_url), engine=engine)) as c:
        yield c


@pytest.fixture
def shop(engine: Engine, make_store: Callable[..., tuple[int, str]]) -> int:
    store_id, _ = make_store()
    return connect_shop(engine, store_id, SHOP)


# --- /metrics ---------------------------------------------------------------------------------


def test_metrics_endpoint_serves_every_family_in_text_format(wh: TestClient) -> None:
    r = wh.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    for metric in metrics.ALL_METRICS:
        [described] = metric.describe()
        assert families.get(described.name) == described.type, described.name
    # Served without a token, and not part of the Leal API's schema.
    assert "/metrics" not in wh.get("/openapi.json").json()["paths"]


def test_metrics_scrapes_query_the_database_at_most_every_few_seconds(wh: TestClient) -> None:
    refresher = wh.app.state.metrics_refresher  # type: ignore[attr-defined]
    assert refresher.min_interval == metrics_db.REFRESH_SECONDS
    calls = refresher.calls
    for _ in range(5):
        assert wh.get("/metrics").status_code == 200
    assert refresher.calls - calls <= 1
    assert 'loyalty_outbox_pending{kind="card_links"}' in wh.get("/metrics").text


# --- webhook intake ---------------------------------------------------------------------------


def test_signed_delivery_counts_accepted(wh: TestClient, shop: int) -> None:
    before = value("loyalty_webhooks_received_total", source="shopify", status="accepted")
    body = customer_body(7)
    r = wh.post("/webhooks/shopify", content=body, headers=shopify_headers(body, webhook_id="m1"))
    assert r.json() == {"status": "accepted"}
    after = value("loyalty_webhooks_received_total", source="shopify", status="accepted")
    assert after == before + 1
    # …and /metrics shows it.
    scraped = parse(wh.get("/metrics").text)
    key = (
        "loyalty_webhooks_received_total",
        (("source", "shopify"), ("status", "accepted")),
    )
    assert scraped[key] == after


def test_bad_and_missing_signatures_count_rejected(wh: TestClient) -> None:
    name = "loyalty_webhooks_rejected_total"
    before = value(name, source="shopify", reason="bad_signature")
    received = value("loyalty_webhooks_received_total", source="shopify", status="accepted")
    body = customer_body(8)
    headers = shopify_headers(body, secret="not-the-secret")
    assert wh.post("/webhooks/shopify", content=body, headers=headers).status_code == 401
    unsigned = {k: v for k, v in headers.items() if "Hmac" not in k}
    assert wh.post("/webhooks/shopify", content=body, headers=unsigned).status_code == 401
    assert value(name, source="shopify", reason="bad_signature") == before + 2
    assert value("loyalty_webhooks_received_total", source="shopify", status="accepted") == (
        received
    )

    sq_before = value(name, source="square", reason="bad_signature")
    body = square_body()
    bad = {"X-Square-HmacSha256-Signature": square_signature(body + b"x")}
    assert wh.post("/webhooks/square", content=body, headers=bad).status_code == 401
    assert value(name, source="square", reason="bad_signature") == sq_before + 1


def test_duplicate_delivery_counts_duplicated(wh: TestClient, shop: int) -> None:
    dup_before = value("loyalty_webhooks_duplicated_total", source="shopify")
    recv_before = value("loyalty_webhooks_received_total", source="shopify", status="duplicate")
    body = customer_body(9)
    headers = shopify_headers(body, webhook_id="dup-1")
    assert wh.post("/webhooks/shopify", content=body, headers=headers).json()["status"] == (
        "accepted"
    )
    assert wh.post("/webhooks/shopify", content=body, headers=headers).json() == {
        "status": "duplicate"
    }
    assert value("loyalty_webhooks_duplicated_total", source="shopify") == dup_before + 1
    assert (
        value("loyalty_webhooks_received_total", source="shopify", status="duplicate")
        == recv_before + 1
    )


def test_invalid_ignored_too_large_and_disabled_are_counted(
    engine: Engine, db_url: str, wh: TestClient
) -> None:
    received = "loyalty_webhooks_received_total"
    invalid = value(received, source="shopify", status="invalid")
    ignored = value(received, source="shopify", status="ignored")
    body = b"{not json"
    r = wh.post("/webhooks/shopify", content=body, headers=shopify_headers(body, webhook_id="i1"))
    assert r.status_code == 400
    assert value(received, source="shopify", status="invalid") == invalid + 1
    body = customer_body(1)  # a shop nobody connected: stored as ignored
    headers = shopify_headers(body, webhook_id="i2", shop="unknown.myshopify.com")
    assert wh.post("/webhooks/shopify", content=body, headers=headers).json() == {
        "status": "ignored"
    }
    assert value(received, source="shopify", status="ignored") == ignored + 1

    rejected = "loyalty_webhooks_rejected_total"
    too_large = value(rejected, source="shopify", reason="too_large")
    disabled = value(rejected, source="square", reason="disabled")
    app = create_app(
        settings_for(db_url, WEBHOOK_MAX_BYTES=64, SQUARE_WEBHOOK_SIGNATURE_KEY=""), engine=engine
    )
    with TestClient(app) as c:
        big = customer_body(2, note="x" * 200)
        r = c.post("/webhooks/shopify", content=big, headers=shopify_headers(big))
        assert r.status_code == 413
        assert c.post("/webhooks/square", content=b"{}").status_code == 404
    assert value(rejected, source="shopify", reason="too_large") == too_large + 1
    assert value(rejected, source="square", reason="disabled") == disabled + 1


# --- database gauges --------------------------------------------------------------------------


def _seed(session: Session, store_id: int, connection_id: int) -> None:
    rows = [
        ("card_links", "pending"),
        ("card_links", "pending"),
        ("card_links", "failed"),
        ("push", "failed"),
        ("pass_update", "delivered"),
    ]
    for i, (kind, status) in enumerate(rows):
        session.add(
            OutboxMessage(
                store_id=store_id, kind=kind, idempotency_key=f"k{i}", status=status, payload={}
            )
        )
    session.add_all(
        [
            SyncState(
                connection_id=connection_id,
                stream="customers",
                watermark=NOW - dt.timedelta(minutes=10),
            ),
            SyncState(connection_id=connection_id, stream="orders", watermark=None),
        ]
    )
    session.commit()


def test_db_gauges_reflect_rows(
    engine: Engine, session: Session, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    connection_id = connect_shop(engine, store_id, SHOP)
    _seed(session, store_id, connection_id)

    reading = metrics_db.refresh_db_gauges(session, now=NOW)
    assert reading.outbox_pending == {"card_links": 2, "pass_update": 0, "push": 0}
    assert reading.outbox_failed == {"card_links": 1, "pass_update": 0, "push": 1}
    lag_key = ("shopify", str(connection_id), "customers")
    assert reading.sync_lag == {lag_key: 600.0}  # the never-completed stream has no series
    assert value("loyalty_outbox_pending", kind="card_links") == 2
    assert value("loyalty_outbox_failed", kind="push") == 1
    assert value("loyalty_outbox_pending", kind="push") == 0
    labels = dict(zip(("source", "connection_id", "stream"), lag_key, strict=True))
    assert value("loyalty_sync_lag_seconds", **labels) == 600.0

    # A disabled connection doesn't sync: its lag series goes away instead of growing.
    session.get_one(Connection, connection_id).enabled = False
    session.commit()
    assert metrics_db.refresh_db_gauges(session, now=NOW).sync_lag == {}
    assert REGISTRY.get_sample_value("loyalty_sync_lag_seconds", labels) is None


def test_db_gauge_collector_for_the_exporter(
    engine: Engine, db_url: str, session: Session, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    connection_id = connect_shop(engine, store_id, SHOP)
    _seed(session, store_id, connection_id)
    collector = metrics_db.DbGaugeCollector.for_url(db_url, min_interval=60)
    try:
        scraped = parse(generate_latest(metrics.registry([collector])).decode())
    finally:
        collector.close()
    assert scraped[("loyalty_outbox_pending", (("kind", "card_links"),))] == 2
    assert scraped[("loyalty_outbox_failed", (("kind", "card_links"),))] == 1
    lag = scraped[
        (
            "loyalty_sync_lag_seconds",
            (("connection_id", str(connection_id)), ("source", "shopify"), ("stream", "customers")),
        )
    ]
    assert lag > 600  # measured against the real clock: the watermark is in the past


def test_cached_refresh_runs_at_most_once_per_interval_and_survives_errors() -> None:
    now = [0.0]
    results: list[Any] = [1, RuntimeError("database down"), 3]

    def fn() -> int:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return int(result)

    cached = metrics.Cached(fn, min_interval=5, name="test", clock=lambda: now[0])
    assert cached() == 1
    now[0] = 4.9
    assert cached() == 1
    assert cached.calls == 1
    now[0] = 5.0
    assert cached() == 1  # failed: the last reading is kept
    assert (cached.calls, cached.failures) == (2, 1)
    now[0] = 9.0
    assert cached() == 1  # and the database isn't asked again before the interval is over
    now[0] = 10.0
    assert cached() == 3


# --- upstream requests --------------------------------------------------------------------------


@pytest.fixture
def observer() -> Iterator[None]:
    metrics.install_upstream_observer()
    metrics.install_upstream_observer()  # idempotent
    yield
    metrics.uninstall_upstream_observer()


def _square(handler: Callable[[httpx.Request], httpx.Response]) -> SquareClient:
    return SquareClient(
        http=connector_http.make_client(
            base_url="https://connect.squareup.test", transport=httpx.MockTransport(handler)
        ),
        access_token="sq-token",
        square_version="2026-08-19",
        budget=LocalBudget(capacity=100, refill_per_second=100),
        budget_key="M1",
        sleep=lambda _s: None,
    )


def test_upstream_observer_counts_a_429_through_a_real_client(observer: None) -> None:
    answers = iter(
        [
            httpx.Response(429, headers={"Retry-After": "0"}, json={"errors": []}),
            httpx.Response(200, json={"customers": []}),
        ]
    )
    client = _square(lambda _request: next(answers))
    throttles = value("loyalty_upstream_throttles_total", source="square")
    four = value("loyalty_upstream_requests_total", source="square", status="4xx")
    two = value("loyalty_upstream_requests_total", source="square", status="2xx")
    assert client.search_customers({}) == {"customers": []}
    assert value("loyalty_upstream_throttles_total", source="square") == throttles + 1
    assert value("loyalty_upstream_requests_total", source="square", status="4xx") == four + 1
    assert value("loyalty_upstream_requests_total", source="square", status="2xx") == two + 1


def test_shopify_throttled_envelope_counts_as_a_throttle(observer: None) -> None:
    cost = {
        "requestedQueryCost": 10,
        "throttleStatus": {"maximumAvailable": 1000, "currentlyAvailable": 10, "restoreRate": 50},
    }
    answers = iter(
        [
            httpx.Response(
                200,
                json={
                    "errors": [{"message": "Throttled", "extensions": {"code": "THROTTLED"}}],
                    "extensions": {"cost": cost},
                },
            ),
            httpx.Response(200, json={"data": {"shop": {"id": "1"}}, "extensions": {"cost": cost}}),
        ]
    )
    client = ShopifyClient(
        http=connector_http.make_client(
            base_url="https://demo.myshopify.test",
            transport=httpx.MockTransport(lambda _request: next(answers)),
        ),
        shop_domain="demo.myshopify.test",
        access_token="shpat-token",
        api_version="2026-10",
        budget=LocalBudget(capacity=1000, refill_per_second=1000),
        sleep=lambda _s: None,
    )
    throttles = value("loyalty_upstream_throttles_total", source="shopify")
    ok = value("loyalty_upstream_requests_total", source="shopify", status="2xx")
    assert client.execute("{ shop { id } }") == {"shop": {"id": "1"}}
    assert value("loyalty_upstream_throttles_total", source="shopify") == throttles + 1
    assert value("loyalty_upstream_requests_total", source="shopify", status="2xx") == ok + 2


def test_transport_errors_count_and_a_failing_observer_breaks_nothing(observer: None) -> None:
    def broken(_source: str, _status: str, _throttled: bool) -> None:
        raise RuntimeError("observer bug")

    connector_http.observers.insert(0, broken)
    try:
        calls = [0]

        def handler(request: httpx.Request) -> httpx.Response:
            calls[0] += 1
            if calls[0] == 1:
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(200, json={"customers": []})

        errors = value("loyalty_upstream_requests_total", source="square", status="error")
        assert _square(handler).search_customers({}) == {"customers": []}
        assert (
            value("loyalty_upstream_requests_total", source="square", status="error") == errors + 1
        )
    finally:
        connector_http.observers.remove(broken)


def test_uninstalled_observer_counts_nothing() -> None:
    metrics.uninstall_upstream_observer()
    before = value("loyalty_upstream_requests_total", source="unknown", status="2xx")
    response = connector_http.send_with_retries(lambda: httpx.Response(200))
    assert response.status_code == 200
    assert value("loyalty_upstream_requests_total", source="unknown", status="2xx") == before
    metrics.install_upstream_observer()
    try:
        connector_http.send_with_retries(lambda: httpx.Response(200))
    finally:
        metrics.uninstall_upstream_observer()
    assert value("loyalty_upstream_requests_total", source="unknown", status="2xx") == before + 1


# --- the worker's multiprocess exporter ---------------------------------------------------------

EXPORTER_SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing, socket, sys, urllib.request

    from worker import metrics

    path = metrics.prepare_multiprocess(sys.argv[1])

    def child(n):
        metrics.EVENTS_PROCESSED.labels(source="shopify").inc(n)
        metrics.EVENT_LATENCY.labels(source="shopify").observe(0.02)
        metrics.OUTBOX_PENDING.labels(kind="push").set(99)  # a live gauge of this child ...
        metrics.child_exited()  # ... dropped when it exits

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=child, args=(n,)) for n in (2, 4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    metrics.STAMPS_EARNED.labels(source="square").inc()  # the main process counts too
    try:
        metrics.prepare_multiprocess(path)
        again = "accepted"
    except RuntimeError:
        again = "refused"
    exporter = metrics.start_exporter(int(sys.argv[2]), addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics", timeout=10) as r:
            body = r.read().decode()
    finally:
        exporter.stop()
    print(json.dumps({"exit": [p.exitcode for p in procs], "again": again, "body": body}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_exporter(directory: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_DIR_VARIABLE}
    done = subprocess.run(
        [sys.executable, "-c", EXPORTER_SCRIPT, str(directory), str(_free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_multiprocess_exporter_sums_child_processes(tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    for run in (1, 2):  # the second run starts on the first one's files: they are cleaned
        result = _run_exporter(directory)
        assert result["exit"] == [0, 0]
        assert result["again"] == "refused"
        scraped = parse(result["body"])
        assert scraped[("loyalty_events_processed_total", (("source", "shopify"),))] == 6, run
        assert scraped[("loyalty_stamps_earned_total", (("source", "square"),))] == 1
        assert scraped[("loyalty_event_latency_seconds_count", (("source", "shopify"),))] == 2
        assert not [key for key in scraped if key[0] == "loyalty_outbox_pending"]
    assert sorted(p.name.split("_")[0] for p in directory.glob("*.db"))  # files were written


def test_exporter_off_and_in_process(tmp_path: Path) -> None:
    assert metrics.start_exporter(0) is None
    exporter = metrics.start_exporter(_free_port(), addr="127.0.0.1")
    assert exporter is not None
    try:
        r = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=10)
    finally:
        exporter.stop()
    assert r.status_code == 200
    assert "# TYPE loyalty_webhooks_received_total counter" in r.text


def test_db_gauge_collector_serves_nothing_rather_than_wrong_figures() -> None:
    def unreachable() -> Session:
        raise ConnectionRefusedError("database down")

    collector = metrics_db.DbGaugeCollector(unreachable)
    assert list(collector.collect()) == []
    # The process's own (never set) gauge families are replaced, not served twice or stale.
    families = [
        f.name
        for f in text_string_to_metric_families(
            generate_latest(metrics.registry([collector])).decode()
        )
    ]
    assert "loyalty_outbox_pending" not in families
    assert "loyalty_webhooks_received" in families  # counters: family name without _total
