"""The operator CLI: JSON on stdout, one-line errors on stderr, one transaction per command.

Most tests run in-process through Typer's `CliRunner` on SQLite and PostgreSQL (`db_url`); one
runs the real `loyalty-sync up` in a fresh directory and talks to it over HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner, Result

from models.accounts import authenticate
from models.db import make_sessionmaker
from models.migrate import current_heads
from models.tables import ApiToken, CardTemplate, Reward, Store
from worker.cli import app

SETTINGS_VARIABLES = (
    "DATABASE_URL",
    "WALLET_BASE_URL",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "API_HOST",
    "API_PORT",
    "DB_POOL_SIZE",
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No configuration leaks in from the environment or a `.env` (the logging set-up each
    command does is put back by conftest's `_restore_logging`)."""
    for name in SETTINGS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def run(db_url: str | None, *args: str, **env: str) -> Result:
    environment = {"DATABASE_URL": db_url} if db_url else {}
    return CliRunner().invoke(app, list(args), env={**environment, **env})


def ok(db_url: str | None, *args: str, **env: str) -> Any:
    """Run a command that must succeed; its stdout must be exactly one JSON document."""
    result = run(db_url, *args, **env)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def assert_clean_failure(result: Result, *, code: int = 1, mentions: str = "") -> str:
    """A non-zero exit with a one-line message, no traceback, nothing on stdout."""
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    # An exception that escaped the CLI would be recorded here instead of a SystemExit.
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("error: ")
    assert mentions in lines[0]
    return lines[0]


# --- db upgrade -------------------------------------------------------------------------------


def test_db_upgrade_creates_the_database_directory_and_is_repeatable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'dir' / 'loyalty.db'}"
    head = current_heads()[0]
    assert ok(url, "db", "upgrade") == {"status": "ok", "revision": head}
    assert (tmp_path / "nested" / "dir" / "loyalty.db").is_file()
    assert ok(url, "db", "upgrade") == {"status": "ok", "revision": head}


def test_db_upgrade_defaults_to_var_in_the_working_directory() -> None:
    assert ok(None, "db", "upgrade")["status"] == "ok"
    assert Path("var/loyalty.db").is_file()


def test_db_upgrade_on_a_migrated_database(db_url: str, engine: Engine) -> None:
    assert ok(db_url, "db", "upgrade") == {"status": "ok", "revision": current_heads()[0]}


def test_commands_on_an_unmigrated_database_say_what_to_do(tmp_path: Path) -> None:
    result = run(f"sqlite:///{tmp_path / 'empty.db'}", "store", "list")
    assert_clean_failure(result, mentions="loyalty-sync db upgrade")


def test_unreachable_database_is_a_one_line_error_without_the_password() -> None:
    result = run("postgresql://postgres:hunter2@127.0.0.1:1/nothing", "store", "list")
    line = assert_clean_failure(result, mentions="database error")
    assert "hunter2" not in line


def test_invalid_configuration_is_a_one_line_error(tmp_path: Path) -> None:
    result = run(f"sqlite:///{tmp_path / 'x.db'}", "store", "list", API_PORT="0")
    assert_clean_failure(result, mentions="API_PORT")


# --- stores and tokens --------------------------------------------------------------------------


def test_store_create_prints_the_store_and_a_working_token(db_url: str, engine: Engine) -> None:
    result = run(db_url, "store", "create", "--name", " Corner Café ", "--country", "gb")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"id", "name", "country", "api_token"}
    assert out["name"] == "Corner Café"
    assert out["country"] == "GB"
    assert out["api_token"].startswith("lsk_")
    # The human message goes to stderr; the token is never in it.
    assert "not shown again" in result.stderr
    assert out["api_token"] not in result.stderr
    with make_sessionmaker(engine)() as s:
        assert authenticate(s, out["api_token"]) == out["id"]
        assert s.get(Store, out["id"]) is not None


def test_store_create_defaults_to_us_and_lists(db_url: str, engine: Engine) -> None:
    first = ok(db_url, "store", "create", "--name", "One")
    second = ok(db_url, "store", "create", "--name", "Two", "--country", "MX")
    assert first["country"] == "US"
    assert ok(db_url, "store", "list") == [
        {"id": first["id"], "name": "One", "country": "US"},
        {"id": second["id"], "name": "Two", "country": "MX"},
    ]


def test_store_create_rejects_bad_input(db_url: str, engine: Engine) -> None:
    assert_clean_failure(
        run(db_url, "store", "create", "--name", "X", "--country", "ZZ"), mentions="country"
    )
    assert_clean_failure(run(db_url, "store", "create", "--name", "  "), mentions="name")
    assert ok(db_url, "store", "list") == []
    result = run(db_url, "store", "create")  # --name is required: a usage error
    assert result.exit_code == 2


def test_token_create_and_revoke_by_token_and_by_id(db_url: str, engine: Engine) -> None:
    store = ok(db_url, "store", "create", "--name", "Shop")
    extra = ok(db_url, "token", "create", "--store", str(store["id"]), "--name", "pos")
    assert extra["store_id"] == store["id"]
    assert extra["name"] == "pos"
    assert extra["api_token"].startswith("lsk_")
    assert extra["api_token"] != store["api_token"]

    sessions = make_sessionmaker(engine)
    with sessions() as s:
        assert authenticate(s, extra["api_token"]) == store["id"]

    assert ok(db_url, "token", "revoke", "--token", extra["api_token"]) == {
        "id": extra["id"],
        "revoked": True,
    }
    with sessions() as s:
        assert authenticate(s, extra["api_token"]) is None
        assert authenticate(s, store["api_token"]) == store["id"]
        first_id = s.scalar(select(ApiToken.id).where(ApiToken.store_id == store["id"]))
    assert first_id is not None
    assert ok(db_url, "token", "revoke", "--id", str(first_id)) == {"id": first_id, "revoked": True}
    # Revoking twice is harmless.
    assert ok(db_url, "token", "revoke", "--id", str(first_id))["revoked"] is True
    with sessions() as s:
        assert authenticate(s, store["api_token"]) is None


def test_token_errors(db_url: str, engine: Engine) -> None:
    assert_clean_failure(run(db_url, "token", "create", "--store", "999"), mentions="Store")
    assert_clean_failure(run(db_url, "token", "revoke", "--id", "999"), mentions="Token")
    assert_clean_failure(
        run(db_url, "token", "revoke", "--token", "lsk_nope"), mentions="Token not found"
    )
    assert_clean_failure(run(db_url, "token", "revoke"), code=2, mentions="--token or --id")
    assert_clean_failure(
        run(db_url, "token", "revoke", "--token", "lsk_x", "--id", "1"), code=2, mentions="--id"
    )


# --- cards and rewards --------------------------------------------------------------------------


def test_card_create_archive_and_list(db_url: str, engine: Engine) -> None:
    store = ok(db_url, "store", "create", "--name", "Cafe")["id"]
    coffee = ok(
        db_url,
        *("card", "create", "--store", str(store), "--name", "Coffee"),
        *("--stamps-required", "10", "--initial-stamps", "2"),
    )
    assert {k: coffee[k] for k in ("name", "stamps_required", "initial_stamps", "archived")} == {
        "name": "Coffee",
        "stamps_required": 10,
        "initial_stamps": 2,
        "archived": False,
    }
    tea = ok(
        db_url, "card", "create", "--store", str(store), "--name", "Tea", "--stamps-required", "5"
    )
    assert tea["initial_stamps"] == 0

    assert ok(db_url, "card", "archive", str(tea["id"])) == {"id": tea["id"], "archived": True}
    with make_sessionmaker(engine)() as s:
        card = s.get(CardTemplate, tea["id"])
        assert card is not None
        assert card.archived_at is not None

    def ids(*scope: str) -> list[int]:
        return [c["id"] for c in ok(db_url, "card", "list", "--store", str(store), *scope)]

    assert ids() == [coffee["id"]]
    assert ids("--scope", "active") == [coffee["id"]]
    assert ids("--scope", "archived") == [tea["id"]]
    assert ids("--scope", "all") == [coffee["id"], tea["id"]]
    assert run(db_url, "card", "list", "--store", str(store), "--scope", "gone").exit_code == 2


@pytest.mark.parametrize(
    ("required", "initial", "field"),
    [("0", "0", "stamps_required"), ("19", "0", "stamps_required"), ("5", "5", "initial_stamps")],
)
def test_card_create_rejects_invalid_stamps(
    db_url: str, engine: Engine, required: str, initial: str, field: str
) -> None:
    store = ok(db_url, "store", "create", "--name", "Cafe")["id"]
    result = run(
        db_url,
        *("card", "create", "--store", str(store), "--name", "Coffee"),
        *("--stamps-required", required, "--initial-stamps", initial),
    )
    assert_clean_failure(result, mentions=field)
    assert ok(db_url, "card", "list", "--store", str(store), "--scope", "all") == []


def test_card_errors_for_unknown_records(db_url: str, engine: Engine) -> None:
    unknown_store = ("card", "create", "--store", "424242", "--name", "C", "--stamps-required", "5")
    assert_clean_failure(run(db_url, *unknown_store), mentions="Store not found")
    assert_clean_failure(run(db_url, "card", "archive", "424242"), mentions="Card not found")
    assert_clean_failure(
        run(db_url, "card", "list", "--store", "424242"), mentions="Store not found"
    )
    assert run(db_url, "card", "archive", "not-a-number").exit_code == 2


def test_reward_create(db_url: str, engine: Engine) -> None:
    store = ok(db_url, "store", "create", "--name", "Cafe")["id"]
    card = ok(
        db_url, "card", "create", "--store", str(store), "--name", "C", "--stamps-required", "8"
    )["id"]
    free = ok(
        db_url, "reward", "create", "--card", str(card), "--name", "Free coffee", "--stamps", "8"
    )
    assert free == {
        "id": free["id"],
        "card_id": card,
        "name": "Free coffee",
        "stamps": 8,
        "active": True,
    }
    off = ok(
        db_url,
        *("reward", "create", "--card", str(card), "--name", "Muffin", "--stamps", "3"),
        "--inactive",
    )
    assert off["active"] is False
    listed = ok(db_url, "card", "list", "--store", str(store))
    assert [r["id"] for r in listed[0]["rewards"]] == [free["id"], off["id"]]

    too_dear = ("reward", "create", "--card", str(card), "--name", "Cake", "--stamps", "9")
    assert_clean_failure(run(db_url, *too_dear), mentions="stamps")
    unknown = ("reward", "create", "--card", "424242", "--name", "Cake", "--stamps", "1")
    assert_clean_failure(run(db_url, *unknown), mentions="Card not found")
    with make_sessionmaker(engine)() as s:
        assert len(s.scalars(select(Reward)).all()) == 2


def test_a_failing_command_writes_nothing(
    db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`store create` flushes the store before it makes the token: if the token fails, the
    command's one transaction must take the store with it."""
    import models.accounts
    from models.errors import NotFound

    def broken_create_token(*_args: Any, **_kwargs: Any) -> Any:
        raise NotFound("Token machine")

    monkeypatch.setattr(models.accounts, "create_token", broken_create_token)
    assert_clean_failure(run(db_url, "store", "create", "--name", "Cafe"), mentions="Token machine")
    with make_sessionmaker(engine)() as s:
        assert s.scalars(select(Store)).all() == []


# --- api and up (the server itself is stubbed here; the subprocess test runs it for real) -------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    import uvicorn

    calls: list[dict[str, Any]] = []

    def fake_run(app: Any, **kwargs: Any) -> None:
        calls.append({"app": app, **kwargs})

    monkeypatch.setattr(uvicorn, "run", fake_run)
    return calls


def test_api_serves_on_the_configured_address(db_url: str, served: list[dict[str, Any]]) -> None:
    result = run(db_url, "api", API_HOST="127.0.0.2", API_PORT="8123")
    assert result.exit_code == 0, result.stderr
    result = run(db_url, "api", "--host", "0.0.0.0", "--port", "9000")
    assert result.exit_code == 0, result.stderr
    assert [(c["host"], c["port"]) for c in served] == [("127.0.0.2", 8123), ("0.0.0.0", 9000)]
    # Our logging set-up stays in charge (uvicorn would install its own otherwise).
    assert all(c["log_config"] is None for c in served)
    assert served[0]["app"].state.settings.database_url == db_url


def test_api_defaults_and_port_validation(served: list[dict[str, Any]]) -> None:
    assert run(None, "api").exit_code == 0
    assert (served[0]["host"], served[0]["port"]) == ("127.0.0.1", 8000)
    assert run(None, "api", "--port", "70000").exit_code == 2


def test_up_migrates_then_serves_and_hints_at_store_create(served: list[dict[str, Any]]) -> None:
    result = run(None, "up", "--port", "8124")
    assert result.exit_code == 0, result.stderr
    assert Path("var/loyalty.db").is_file()
    assert "loyalty-sync store create" in result.stderr
    assert "http://127.0.0.1:8124" in result.stderr
    assert result.stdout == ""
    assert [(c["host"], c["port"]) for c in served] == [("127.0.0.1", 8124)]

    ok(None, "store", "create", "--name", "Shop")
    result = run(None, "up")
    assert result.exit_code == 0, result.stderr
    assert "store create" not in result.stderr


# --- the real thing -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli_command() -> list[str]:
    script = Path(sys.executable).parent / "loyalty-sync"
    if script.exists():
        return [str(script)]
    found = shutil.which("loyalty-sync")
    return [found] if found else [sys.executable, "-m", "worker.cli"]


def test_up_in_a_fresh_directory_serves_the_api(tmp_path: Path) -> None:
    """`loyalty-sync up` with no configuration: ./var/ database, API on the given port."""
    home = tmp_path / "checkout"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARIABLES}
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [*_cli_command(), "up", "--port", str(port)],
            cwd=home,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"`up` exited early:\n{log_path.read_text()}"
            try:
                health = httpx.get(f"{base}/healthz", timeout=1)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"no /healthz in 30 s:\n{log_path.read_text()}"
            time.sleep(0.1)
        assert health.json() == {"status": "ok", "database": "ok"}
        assert (home / "var" / "loyalty.db").is_file()
        assert "loyalty-sync store create" in log_path.read_text()

        created = subprocess.run(
            [*_cli_command(), "store", "create", "--name", "Fresh"],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert created.returncode == 0, created.stderr
        store = json.loads(created.stdout)
        auth = {"Authorization": f"Bearer {store['api_token']}"}
        customers = f"{base}/api/v1/accounts/{store['id']}/customers"

        listed = httpx.get(customers, headers=auth, timeout=10)
        assert listed.status_code == 200, listed.text
        assert listed.json() == []
        assert listed.headers["Total-Count"] == "0"
        made = httpx.post(
            customers,
            headers=auth,
            json={"customer": {"first_name": "Ana", "email": "ana@example.com"}},
            timeout=10,
        )
        assert made.status_code == 201, made.text
        assert [c["id"] for c in httpx.get(customers, headers=auth, timeout=10).json()] == [
            made.json()["id"]
        ]
        assert httpx.get(customers, timeout=10).status_code == 401

        # An error from the real console script: one line, no traceback.
        failed = subprocess.run(
            [*_cli_command(), "token", "create", "--store", "999"],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert failed.returncode == 1
        assert failed.stdout == ""
        assert failed.stderr.strip().splitlines() == ["error: Store not found"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl+C: uvicorn's graceful shutdown
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert proc.returncode == 0, log
    assert "Traceback" not in log
    assert "Application shutdown complete." in log
