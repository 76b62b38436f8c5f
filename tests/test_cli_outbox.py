"""`loyalty-sync outbox list|retry|deliver` through Typer's CliRunner, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from models.tables import OutboxMessage
from tests.fakes.smtp import FakeSmtp
from tests.outbox_helpers import add_customer_with_card, channel_states, row
from worker.cli import app

VARIABLES = (
    "DATABASE_URL",
    "SECRET_KEY",
    "SMTP_URL",
    "SMS_API_URL",
    "SMS_API_TOKEN",
    "PASS_SERVICE_URL",
    "PASS_SERVICE_SECRET",
    "LOG_FORMAT",
    "LOG_LEVEL",
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def run(db_url: str, *args: str, **env: str) -> Result:
    return CliRunner().invoke(
        app, ["outbox", *args], env={"DATABASE_URL": db_url, "SECRET_KEY": "k", **env}
    )


def ok(db_url: str, *args: str, **env: str) -> Any:
    result = run(db_url, *args, **env)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def failed(result: Result, *, code: int, mentions: str) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    assert mentions in result.stderr


def _park_failed(engine: Engine, row_id: int, error: str = "smtp 550: mailbox unavailable") -> None:
    with Session(engine) as s:
        message = s.get(OutboxMessage, row_id)
        assert message is not None
        message.status, message.attempts, message.last_error = "failed", 8, error
        message.payload = {
            **message.payload,
            "delivery": {"email": {"state": "failed", "at": "2026-01-01T00:00:00+00:00"}},
        }
        s.commit()


def test_list_filters_and_json(
    engine: Engine, db_url: str, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_a, _ = make_store()
    store_b, _ = make_store()
    _, a = add_customer_with_card(engine, store_a, email="a@example.com")
    _, b = add_customer_with_card(engine, store_b, email="b@example.com")
    _park_failed(engine, a)

    rows = ok(db_url, "list", "--json")
    assert [r["id"] for r in rows] == [b, a]
    first = rows[1]
    assert first["status"] == "failed"
    assert first["kind"] == "card_links"
    assert first["channels"] == {"email": "failed"}
    assert first["last_error"] == "smtp 550: mailbox unavailable"
    assert "a@example.com" not in json.dumps(rows)  # no contact data in the listing
    assert [r["id"] for r in ok(db_url, "list", "--status", "failed", "--json")] == [a]
    assert [r["id"] for r in ok(db_url, "list", "--store", str(store_b), "--json")] == [b]
    assert ok(db_url, "list", "--kind", "push", "--json") == []

    table = run(db_url, "list")
    assert table.exit_code == 0
    assert "Outbox" in table.stdout
    assert "failed" in table.stdout
    assert run(db_url, "list", "--status", "delivered").stdout.strip() == "No outbox rows."
    failed(run(db_url, "list", "--status", "bogus"), code=2, mentions="bogus")


def test_retry_by_id_and_by_status(
    engine: Engine, db_url: str, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    _, a = add_customer_with_card(engine, store_id, email="a@example.com")
    _, b = add_customer_with_card(engine, store_id, email="b@example.com")
    _, c = add_customer_with_card(engine, store_id, email="c@example.com")
    for row_id in (a, b):
        _park_failed(engine, row_id)

    assert ok(db_url, "retry", str(a)) == {"retried": 1, "ids": [a]}
    message = row(engine, a)
    assert (message.status, message.attempts) == ("pending", 0)
    assert channel_states(message) == {}  # the failed email will be attempted again
    assert ok(db_url, "retry", "--status", "failed") == {"retried": 1, "ids": [b]}
    assert ok(db_url, "retry", "--status", "failed") == {"retried": 0, "ids": []}

    failed(run(db_url, "retry", str(c)), code=1, mentions="is pending")
    failed(run(db_url, "retry", "999999"), code=1, mentions="not found")
    failed(run(db_url, "retry"), code=2, mentions="exactly one of ID or --status")
    failed(run(db_url, "retry", str(a), "--status", "failed"), code=2, mentions="exactly one")
    failed(run(db_url, "retry", "--status", "delivered"), code=2, mentions="delivered")


def test_deliver_runs_one_pass(
    engine: Engine, db_url: str, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    _, a = add_customer_with_card(engine, store_id, email="a@example.com")
    smtp = FakeSmtp()
    with smtp.serve() as url:
        result = ok(db_url, "deliver", "--limit", "10", SMTP_URL=url, SMTP_FROM="c@shop.example")
    assert result == {
        "claimed": 1,
        "delivered": 1,
        "skipped": 0,
        "retried": 0,
        "failed": 0,
        "lost": 0,
        "released": 0,
    }
    assert smtp.count == 1
    assert row(engine, a).status == "delivered"
    failed(run(db_url, "deliver", SMTP_URL="http://nope"), code=1, mentions="smtp://")
