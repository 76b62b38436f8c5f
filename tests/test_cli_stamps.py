"""`loyalty-sync connection configure` and `loyalty-sync stamps reconcile` through CliRunner,
the reconciliation against the fake Shopify orders API served on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner, Result

from models.db import make_sessionmaker
from models.tables import Connection, SyncRun
from tests.earning_helpers import ledger, setup_store
from tests.fakes.server import serve
from tests.fakes.shopify_orders import FakeShopifyOrders
from worker.cli import app
from worker.secret_key import resolve_secret_key
from worker.settings import Settings

VARIABLES = ("DATABASE_URL", "SECRET_KEY", "LOG_FORMAT", "LOG_LEVEL", "REDIS_URL")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def run(db_url: str, *args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"DATABASE_URL": db_url, "SECRET_KEY": "k"})


def ok(db_url: str, *args: str) -> Any:
    result = run(db_url, *args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def failed(result: Result, *, code: int, mentions: str) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    assert mentions in result.stderr


def _key(db_url: str) -> bytes:
    return resolve_secret_key(Settings(DATABASE_URL=db_url, SECRET_KEY="k"))


def test_configure_prints_the_connection_with_its_rule(engine: Engine, db_url: str) -> None:
    store_id, card_id, connection_id = setup_store(engine)
    out = ok(
        db_url,
        "connection", "configure", str(connection_id),
        "--card", str(card_id), "--earn", "per_amount:500", "--min-amount", "1000",
    )  # fmt: skip
    assert (out["id"], out["store_id"]) == (connection_id, store_id)
    assert out["earning"] == {
        "card_id": card_id,
        "earn": {"kind": "per_amount", "minor_units": 500},
        "min_amount": 1000,
        "currency": None,
    }
    assert "credentials" not in out
    with make_sessionmaker(engine)() as s:
        connection = s.get(Connection, connection_id)
        assert connection is not None
        assert connection.config["earn"] == {"kind": "per_amount", "minor_units": 500}
    out = ok(
        db_url, "connection", "configure", str(connection_id), "--card", str(card_id),
        "--earn", "per_order:2",
    )  # fmt: skip
    assert out["earning"]["earn"] == {"kind": "per_order", "stamps": 2}
    assert out["earning"]["min_amount"] is None


@pytest.mark.parametrize(
    ("args", "code", "mentions"),
    [
        (["--earn", "per_visit:2"], 2, "per_order:N or per_amount:MINOR_UNITS"),
        (["--earn", "per_order:x"], 2, "whole number"),
        (["--earn", "per_order:0"], 1, "earn per_order needs stamps"),
        (["--earn", "per_amount:0"], 1, "per_amount needs minor_units"),
        (["--earn", "per_order:1", "--min-amount", "-5"], 1, "min_amount"),
        (["--earn", "per_order:1", "--card", "999999"], 1, "card_id does not match"),
    ],
)
def test_configure_bad_input_is_a_clear_error(
    engine: Engine, db_url: str, args: list[str], code: int, mentions: str
) -> None:
    _, card_id, connection_id = setup_store(engine)
    card_args = [] if "--card" in args else ["--card", str(card_id)]
    failed(run(db_url, "connection", "configure", str(connection_id), *card_args, *args),
           code=code, mentions=mentions)  # fmt: skip
    with make_sessionmaker(engine)() as s:
        connection = s.get(Connection, connection_id)
        assert connection is not None
        assert connection.config["earn"] == {"kind": "per_order", "stamps": 1}  # unchanged


def test_configure_unknown_connection(engine: Engine, db_url: str) -> None:
    _, card_id, _ = setup_store(engine)
    failed(
        run(db_url, "connection", "configure", "424242", "--card", str(card_id), "--earn",
            "per_order:1"),
        code=1, mentions="Connection not found",
    )  # fmt: skip
    result = run(db_url, "connection", "configure", "1", "--earn", "per_order:1")
    assert result.exit_code == 2  # --card is required
    assert "--card" in result.stderr


def test_stamps_reconcile_against_the_served_fake(engine: Engine, db_url: str) -> None:
    fake = FakeShopifyOrders(max_page=2)
    now = dt.datetime.now(dt.UTC)
    for i in range(5):
        fake.add_order(
            2000 + i, customer_id=40 + i, amount=1200, at=now - dt.timedelta(hours=i + 1)
        )
    fake.add_order(1, customer_id=40, amount=1200, at=now - dt.timedelta(days=10))  # too old
    with serve(fake.respond, timeout_sleep=0.2) as url:
        store_id, _, connection_id = setup_store(engine, api_base_url=url, key=_key(db_url))
        dry = ok(db_url, "stamps", "reconcile", "--store", str(store_id), "--dry-run", "--json")
        assert dry["dry_run"] is True
        assert dry["connections"][0]["missed"] == 5
        with make_sessionmaker(engine)() as s:
            assert s.scalars(select(SyncRun)).all() == []
        out = ok(db_url, "stamps", "reconcile", "--store", str(store_id), "--json")
        human = run(db_url, "stamps", "reconcile", "--store", str(store_id))
    (conn,) = out["connections"]
    assert (conn["connection_id"], conn["orders"], conn["missed"]) == (connection_id, 5, 5)
    assert conn["completeness"]["complete"] is True
    assert out["drift"] == []
    with make_sessionmaker(engine)() as s:
        keys = [k for k, _, _ in ledger(s, store_id)]
    assert keys == [f"shopify:order:{2000 + i}" for i in range(5)]
    assert human.exit_code == 0, human.stderr
    assert "missed by webhooks 0" in human.stdout


def test_stamps_reconcile_errors(engine: Engine, db_url: str) -> None:
    fake = FakeShopifyOrders(access_token="rotated")  # the stored token was revoked: 401
    with serve(fake.respond, timeout_sleep=0.2) as url:
        # (Set up before any command: a command points logging at its own, then closed, stderr.)
        store_id, _, _ = setup_store(engine, api_base_url=url, key=_key(db_url))
        failed(run(db_url, "stamps", "reconcile", "--store", "777777", "--json"), code=1,
               mentions="Store not found")  # fmt: skip
        failed(run(db_url, "stamps", "reconcile", "--store", "1", "--window-hours", "0"),
               code=2, mentions="--window-hours must be positive")  # fmt: skip
        # The connection fails: exit 1, the report says which connection and why.
        result = run(db_url, "stamps", "reconcile", "--store", str(store_id), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["status"] == "partial"
    (conn,) = report["connections"]
    assert conn["status"] == "needs_attention"
    assert "401" in conn["error"]
    assert "tok" not in result.stdout + result.stderr  # never the credentials
