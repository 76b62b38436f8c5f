"""Connections: credentials encrypted at rest, upsert per (store, source, account), the CLI.

Store-level tests run on SQLite and PostgreSQL (`session`, `make_store`); CLI tests through
`CliRunner` in a temporary working directory so the embedded key file lands in its `./var/`.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from models.connections import connect, credentials
from models.crypto import DecryptionFailed, decrypt, derive_key, encrypt
from models.errors import NotFound, ValidationFailed
from models.tables import Connection
from worker.cli import app

KEY = Fernet.generate_key()
TOKEN = "shpat_0123456789abcdef-very-secret"


def _connect(session: Session, store_id: int, **overrides: Any) -> tuple[Connection, bool]:
    args: dict[str, Any] = {
        "store_id": store_id,
        "source": "shopify",
        "account": "My-Shop.myshopify.com",
        "access_token": TOKEN,
        "api_base_url": None,
        "api_version": "2026-10",
        "key": KEY,
    }
    args.update(overrides)
    return connect(session, **args)


# --- crypto -----------------------------------------------------------------------------------


def test_encrypt_decrypt_round_trip() -> None:
    token = encrypt("héllo", key=KEY)
    assert "héllo" not in token
    assert decrypt(token, key=KEY) == "héllo"


def test_wrong_key_is_a_clear_error() -> None:
    token = encrypt("secret", key=KEY)
    with pytest.raises(DecryptionFailed, match="wrong SECRET_KEY"):
        decrypt(token, key=Fernet.generate_key())
    with pytest.raises(DecryptionFailed):
        decrypt("not-a-token", key=KEY)


def test_derived_key_is_stable_and_usable() -> None:
    assert derive_key("a passphrase") == derive_key("a passphrase")
    assert derive_key("a passphrase") != derive_key("another")
    assert decrypt(encrypt("x", key=derive_key("p")), key=derive_key("p")) == "x"


# --- store ------------------------------------------------------------------------------------


def test_connect_encrypts_and_upserts(
    session: Session, engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    row, created = _connect(session, store_id)
    session.commit()
    assert created is True
    assert row.account == "my-shop.myshopify.com"
    assert row.api_base_url == "https://my-shop.myshopify.com"
    assert row.api_version == "2026-10"
    assert row.status == "active"
    assert row.enabled is True
    assert row.config == {}
    with engine.connect() as conn:
        raw = conn.execute(text("SELECT credentials FROM connections")).scalar_one()
    assert TOKEN not in raw
    assert credentials(row, key=KEY) == {"access_token": TOKEN}

    row.status = "needs_attention"
    row.last_error = "401"
    session.commit()
    again, created = _connect(session, store_id, access_token="new-token")
    session.commit()
    assert created is False
    assert again.id == row.id
    assert again.status == "active"
    assert again.last_error is None
    assert credentials(again, key=KEY) == {"access_token": "new-token"}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM connections")).scalar_one() == 1
    with pytest.raises(DecryptionFailed):
        credentials(again, key=Fernet.generate_key())


def test_square_defaults_and_distinct_accounts(
    session: Session, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    sq, _ = _connect(session, store_id, source="square", account="MLABC123", api_version="x")
    other, created = _connect(session, store_id, source="square", account="MLOTHER")
    session.commit()
    assert sq.api_base_url == "https://connect.squareup.com"
    assert sq.api_version is None
    assert sq.account == "MLABC123"  # merchant ids are case-sensitive: kept as given
    assert created is True
    assert other.id != sq.id


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"account": "not a domain"}, "shop_domain"),
        ({"account": "shop.example.com"}, "shop_domain"),
        ({"account": "bad_host", "api_base_url": "http://127.0.0.1:9"}, "shop_domain"),
        ({"access_token": "  "}, "access_token"),
        ({"api_base_url": "ftp://example"}, "api_base_url"),
        ({"api_base_url": "not a url"}, "api_base_url"),
        ({"source": "square", "account": " "}, "merchant_id"),
        ({"source": "woo"}, "source"),
    ],
)
def test_validation(
    session: Session,
    make_store: Callable[..., tuple[int, str]],
    overrides: dict[str, Any],
    field: str,
) -> None:
    store_id, _ = make_store()
    with pytest.raises(ValidationFailed) as info:
        _connect(session, store_id, **overrides)
    assert field in info.value.errors


def test_any_hostname_with_custom_base_url(
    session: Session, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    row, _ = _connect(
        session, store_id, account="Shop.Local", api_base_url="http://127.0.0.1:8123/"
    )
    assert row.account == "shop.local"
    assert row.api_base_url == "http://127.0.0.1:8123"


def test_unknown_store(session: Session) -> None:
    with pytest.raises(NotFound):
        _connect(session, 999_999)
    with pytest.raises(NotFound):
        _connect(session, 2**70)


# --- CLI --------------------------------------------------------------------------------------


@pytest.fixture
def cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("SECRET_KEY", "SHOPIFY_API_VERSION", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def run(db_url: str, *args: str, **env: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"DATABASE_URL": db_url, **env})


def ok(db_url: str, *args: str, **env: str) -> Any:
    result = run(db_url, *args, **env)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert TOKEN not in result.stdout
    assert TOKEN not in result.stderr
    return json.loads(result.stdout)


def _row(engine: Engine, connection_id: int) -> Connection:
    with Session(engine) as s:
        row = s.get(Connection, connection_id)
        assert row is not None
        s.expunge(row)
        return row


def test_cli_connect_shopify_key_file(
    cwd: Path, db_url: str, engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    args = ["connect", "shopify", "--store", str(store_id), "--shop-domain", "a.myshopify.com"]
    first = ok(db_url, *args, "--access-token", TOKEN)
    assert first == {
        "id": first["id"],
        "source": "shopify",
        "account": "a.myshopify.com",
        "api_base_url": "https://a.myshopify.com",
        "status": "active",
        "created": True,
    }
    key_file = cwd / "var" / "secret.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    key = key_file.read_bytes().strip()
    assert credentials(_row(engine, first["id"]), key=key) == {"access_token": TOKEN}
    row = _row(engine, first["id"])
    assert row.api_version == "2026-10"

    second = ok(db_url, *args, "--access-token", TOKEN + "2", "--api-version", "2025-01")
    assert second["id"] == first["id"]
    assert second["created"] is False
    assert key_file.read_bytes().strip() == key  # created once, reused
    row = _row(engine, first["id"])
    assert credentials(row, key=key) == {"access_token": TOKEN + "2"}
    assert row.api_version == "2025-01"


def test_cli_connect_square_with_secret_key(
    cwd: Path, db_url: str, engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    result = ok(
        db_url,
        "connect",
        "square",
        "--store",
        str(store_id),
        "--merchant-id",
        "MLX1",
        "--access-token",
        TOKEN,
        "--api-base-url",
        "http://127.0.0.1:9999",
        SECRET_KEY="correct horse battery staple",
    )
    assert result["source"] == "square"
    assert result["account"] == "MLX1"
    assert not (cwd / "var" / "secret.key").exists()
    row = _row(engine, result["id"])
    assert row.api_base_url == "http://127.0.0.1:9999"
    key = derive_key("correct horse battery staple")
    assert credentials(row, key=key) == {"access_token": TOKEN}

    listed = ok(db_url, "connections", "list", "--store", str(store_id))
    assert listed == [
        {
            "id": result["id"],
            "store_id": store_id,
            "source": "square",
            "account": "MLX1",
            "api_base_url": "http://127.0.0.1:9999",
            "api_version": None,
            "status": "active",
            "enabled": True,
        }
    ]
    assert TOKEN not in json.dumps(ok(db_url, "connections", "list"))


def test_cli_errors(cwd: Path, db_url: str, make_store: Callable[..., tuple[int, str]]) -> None:
    store_id, _ = make_store()
    cases = [
        (["--store", "999999", "--shop-domain", "a.myshopify.com"], "Store not found"),
        (["--store", str(store_id), "--shop-domain", "nope"], "shop_domain"),
    ]
    for extra, message in cases:
        result = run(db_url, "connect", "shopify", *extra, "--access-token", TOKEN)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert TOKEN not in result.stderr
    result = run(db_url, "connections", "list", "--store", "999999")
    assert result.exit_code == 1
    assert "Store not found" in result.stderr


def test_cli_connect_import_sources(
    cwd: Path, db_url: str, engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    store_id, _ = make_store()
    other_store, _ = make_store()
    with Session(engine) as s:
        from models.cards import create_card

        card = create_card(s, store_id=store_id, name="Imported", stamps_required=10)
        foreign = create_card(s, store_id=other_store, name="Not ours", stamps_required=10)
        s.commit()
        card_id, foreign_id = card.id, foreign.id
    appy = ["connect", "appystamp", "--store", str(store_id), "--api-key", "k1"]
    first = ok(db_url, *appy, "--api-secret", "s1", "--card", str(card_id))
    assert first["source"] == "appystamp"
    assert first["created"] is True
    assert first["config"] == {"card_id": card_id}
    # One account per store: connecting again replaces the keys.
    again = ok(db_url, *appy, "--api-secret", "s2")
    assert again["id"] == first["id"]
    assert again["created"] is False
    with Session(engine) as s:
        row = s.get(Connection, first["id"])
        assert row is not None
        key = (cwd / "var" / "secret.key").read_bytes().strip()
        assert credentials(row, key=key) == {"api_key": "k1", "api_secret": "s2"}
    bad_card = run(db_url, *appy, "--api-secret", "s1", "--card", str(foreign_id))
    assert bad_card.exit_code == 1
    assert "Card not found" in bad_card.stderr

    loke = ["connect", "loke", "--store", str(store_id), "--organization-id", "org-1"]
    creds = ["--client-id", "cid", "--client-secret", "csecret"]
    made = ok(db_url, *loke, *creds, "--card", str(card_id), "--points-per-stamp", "100")
    assert made["account"] == "org-1"
    assert made["config"] == {
        "auth_url": "https://auth.loke.global",
        "card_id": card_id,
        "points_per_stamp": 100,
    }
    half = run(db_url, *loke, *creds, "--card", str(card_id))
    assert half.exit_code == 2
    blank = run(db_url, *loke, "--client-id", "cid", "--client-secret", " ")
    assert blank.exit_code == 1
    assert "client_secret" in blank.stderr
