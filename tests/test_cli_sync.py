"""`loyalty-sync sync run` and `loyalty-sync conflicts list` through Typer's `CliRunner`, on SQLite
and PostgreSQL, against the fakes served over real HTTP on 127.0.0.1 (the CLI builds its own
HTTP client from the connection's base URL, as in production)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from sqlalchemy import Engine, func, select
from typer.testing import Result

from models.db import make_sessionmaker
from models.tables import Base, Connection, SyncConflict
from tests.fakes.shopify import API_VERSION as SHOPIFY_VERSION
from tests.fakes.shopify import TOKEN as SHOPIFY_TOKEN
from tests.fakes.shopify import FakeShopify
from tests.fakes.square import DEFAULT_TOKEN as SQUARE_TOKEN
from tests.fakes.square import FakeSquare
from tests.test_cli import _isolated, assert_clean_failure, ok, run  # noqa: F401 - fixture
from worker.sync import EXTRA_KEYS, SUMMARY_KEYS

SECRET = "a passphrase for the tests"
ENV = {"SECRET_KEY": SECRET, "LOG_LEVEL": "WARNING"}


@pytest.fixture(autouse=True)
def _no_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "SECRET_KEY", "SHOPIFY_API_VERSION", "SQUARE_VERSION"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _uncached_loggers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each CLI invocation configures structlog to print to *its* stderr. With the production
    setting `cache_logger_on_first_use`, a module-level logger first used in one invocation
    would keep printing to that invocation's (by then closed) stream in the next one — and in
    later tests. One process runs one command in production; here loggers must not cache."""
    import worker.logging

    original = worker.logging.configure_logging

    def configure(**kwargs: Any) -> None:
        original(**kwargs)
        structlog.configure(cache_logger_on_first_use=False)

    monkeypatch.setattr(worker.logging, "configure_logging", configure)


def cli(db_url: str, *args: str) -> Result:
    return run(db_url, *args, **ENV)


def cli_ok(db_url: str, *args: str) -> Any:
    return ok(db_url, *args, **ENV)


def make_store(db_url: str) -> int:
    return int(cli_ok(db_url, "store", "create", "--name", "Shop")["id"])


@pytest.fixture
def shopify() -> Iterator[tuple[FakeShopify, str]]:
    fake = FakeShopify()
    fake.generate(30)
    with fake.serve() as url:
        yield fake, url


def connect_shopify(db_url: str, store: int, url: str, token: str = SHOPIFY_TOKEN) -> int:
    result = cli_ok(
        db_url,
        "connect",
        "shopify",
        "--store",
        str(store),
        "--shop-domain",
        "fake-shop.local",
        "--access-token",
        token,
        "--api-base-url",
        url,
        "--api-version",
        SHOPIFY_VERSION,
    )
    return int(result["id"])


def row_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t.name: conn.scalar(select(func.count()).select_from(t)) or 0
            for t in Base.metadata.sorted_tables
        }


def test_sync_run_json_summary(
    db_url: str, engine: Engine, shopify: tuple[FakeShopify, str]
) -> None:
    fake, url = shopify
    store = make_store(db_url)
    connect_shopify(db_url, store, url)

    summary = cli_ok(db_url, "sync", "run", "--store", str(store), "--source", "shopify", "--json")

    assert set(summary) == {*SUMMARY_KEYS, *EXTRA_KEYS}
    assert {k: summary[k] for k in SUMMARY_KEYS} == {
        "status": "succeeded",
        "pages": 1,
        "requests": 1,
        "seen": 30,
        "created": 30,
        "updated": 0,
        "linked": 0,
        "unchanged": 0,
        "skipped": 0,
        "conflicts": 0,
    }
    assert summary["dry_run"] is False
    assert isinstance(summary["run_id"], int)
    assert fake.requests == 1

    # Incremental: nothing new but the record on the watermark (inside the 5 minute overlap,
    # all 30 are: the fake's customers are one second apart).
    again = cli_ok(db_url, "sync", "run", "--store", str(store), "--source", "shopify", "--json")
    assert (again["status"], again["created"], again["unchanged"]) == ("succeeded", 0, 30)


def test_sync_run_human_summary_and_dry_run(
    db_url: str, engine: Engine, shopify: tuple[FakeShopify, str]
) -> None:
    _, url = shopify
    store = make_store(db_url)
    connect_shopify(db_url, store, url)
    before = row_counts(engine)

    result = cli(db_url, "sync", "run", "--store", str(store), "--source", "shopify", "--dry-run")

    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith("Sync succeeded (dry run): 1 pages")
    assert "30 created" in result.stdout
    assert row_counts(engine) == before

    full = cli_ok(
        db_url, "sync", "run", "--store", str(store), "--source", "shopify", "--full", "--json"
    )
    assert (full["status"], full["created"]) == ("succeeded", 30)


def test_sync_run_failure_exits_1_with_the_summary(
    db_url: str, engine: Engine, shopify: tuple[FakeShopify, str]
) -> None:
    fake, url = shopify
    store = make_store(db_url)
    token = "shpat_wrong_and_secret"
    cid = connect_shopify(db_url, store, url, token=token)

    result = cli(db_url, "sync", "run", "--store", str(store), "--source", "shopify", "--json")

    assert result.exit_code == 1, (result.stdout, result.stderr)
    summary = json.loads(result.stdout)
    assert summary["status"] == "needs_attention"
    assert summary["requests"] == 1
    assert fake.requests == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sync needs_attention: ConfigurationError")
    assert token not in result.stdout + result.stderr
    with make_sessionmaker(engine)() as session:
        connection = session.get(Connection, cid)
        assert connection is not None
        assert connection.status == "needs_attention"
    listed = cli_ok(db_url, "connections", "list", "--store", str(store))
    assert listed[0]["status"] == "needs_attention"


def test_sync_run_square(db_url: str) -> None:
    fake = FakeSquare()
    fake.generate(150)
    store = make_store(db_url)
    with fake.serve() as url:
        cli_ok(
            db_url,
            "connect",
            "square",
            "--store",
            str(store),
            "--merchant-id",
            "MLFAKE",
            "--access-token",
            SQUARE_TOKEN,
            "--api-base-url",
            url,
        )
        summary = cli_ok(
            db_url, "sync", "run", "--store", str(store), "--source", "square", "--json"
        )
    assert (summary["status"], summary["pages"], summary["created"]) == ("succeeded", 2, 150)


def test_sync_run_errors(db_url: str, engine: Engine) -> None:
    assert_clean_failure(
        cli(db_url, "sync", "run", "--store", "999999", "--source", "shopify"),
        mentions="Store not found",
    )
    store = make_store(db_url)
    assert_clean_failure(
        cli(db_url, "sync", "run", "--store", str(store), "--source", "square"),
        mentions="loyalty-sync connect square",
    )
    first = connect_shopify(db_url, store, "http://127.0.0.1:9")
    assert_clean_failure(
        cli(
            db_url,
            "sync",
            "run",
            "--store",
            str(store),
            "--source",
            "shopify",
            "--connection",
            str(first + 1000),
        ),
        mentions="Connection not found",
    )
    cli_ok(
        db_url,
        "connect",
        "shopify",
        "--store",
        str(store),
        "--shop-domain",
        "second.local",
        "--access-token",
        "t",
        "--api-base-url",
        "http://127.0.0.1:9",
    )
    assert_clean_failure(
        cli(db_url, "sync", "run", "--store", str(store), "--source", "shopify"),
        mentions="--connection",
    )
    result = cli(db_url, "sync", "run", "--store", str(store), "--source", "woo")
    assert result.exit_code == 2


def test_conflicts_list(db_url: str, engine: Engine) -> None:
    store = make_store(db_url)
    other = make_store(db_url)
    t0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
    with make_sessionmaker(engine)() as session:
        for store_id, external_id, resolved in (
            (store, "1", None),
            (store, "2", t0),
            (other, "3", None),
        ):
            session.add(
                SyncConflict(
                    store_id=store_id,
                    source="shopify",
                    external_id=external_id,
                    kind="ambiguous_identity",
                    detail="email and phone belong to different customers",
                    customer_ids=[1, 2],
                    occurrences=1,
                    first_seen_at=t0,
                    last_seen_at=t0,
                    resolved_at=resolved,
                )
            )
        session.commit()

    listed = cli_ok(db_url, "conflicts", "list", "--json")
    assert [c["external_id"] for c in listed] == ["1", "3"]
    assert set(listed[0]) == {
        "id",
        "store_id",
        "source",
        "external_id",
        "kind",
        "detail",
        "customer_ids",
        "occurrences",
        "first_seen_at",
        "last_seen_at",
        "resolved_at",
    }
    assert listed[0]["first_seen_at"] == t0.isoformat()
    mine = cli_ok(db_url, "conflicts", "list", "--store", str(store), "--all", "--json")
    assert [(c["external_id"], c["resolved_at"]) for c in mine] == [
        ("1", None),
        ("2", t0.isoformat()),
    ]

    table = cli(db_url, "conflicts", "list", "--store", str(store))
    assert table.exit_code == 0
    assert "ambiguous_identity" in table.stdout
    assert "Sync conflicts" in table.stdout

    empty_store = make_store(db_url)
    empty = cli(db_url, "conflicts", "list", "--store", str(empty_store))
    assert empty.stdout.strip() == "No conflicts."
    assert cli_ok(db_url, "conflicts", "list", "--store", str(empty_store), "--json") == []
    assert_clean_failure(
        cli(db_url, "conflicts", "list", "--store", "999999"), mentions="Store not found"
    )
