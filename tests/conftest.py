"""Shared fixtures: every store/API test runs on SQLite and on PostgreSQL.

- `db_url`: parametrized over `sqlite` and `postgresql`. PostgreSQL comes from `TEST_POSTGRES_URL`;
  without it the PostgreSQL variants are skipped locally and fail under CI (`CI=true`).
- `engine`: a migrated, empty database for the test (SQLite: a fresh copy of a migrated template
  file; PostgreSQL: one database per test process, emptied after each test).
- `session`: a Session on that engine (the test commits what it wants to be visible).
- `make_store`: creates a store and returns `(store_id, api_token)`.
- `client`: a `TestClient` of the real app bound to the test database.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from models.db import make_engine, make_sessionmaker
from models.migrate import upgrade
from models.tables import Base
from tests.pg import scratch_database

BACKENDS = ["sqlite", "postgresql"]


def _worker_suffix() -> str:
    return f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_{os.getpid()}"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Put back the logging set-up a test changed (a CLI command configures structlog and the
    stdlib root logger to print to *its* stderr, which is closed after the command). Without
    this, a logger first used by a later test would be cached on that closed stream."""
    was_configured = structlog.is_configured()
    structlog_config = structlog.get_config()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    if was_configured:
        structlog.configure(**structlog_config)
    else:
        structlog.reset_defaults()


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def _postgres_database() -> Iterator[str]:
    with scratch_database(f"loyalty_test_{_worker_suffix()}") as url:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        if request.node.get_closest_marker("postgres_only"):
            pytest.skip("PostgreSQL only")
        template: Path = request.getfixturevalue("_sqlite_template")
        path = tmp_path / "store.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    return str(request.getfixturevalue("_postgres_database"))


def _empty_postgres(engine: Engine) -> None:
    # DELETE (children first) is much faster than TRUNCATE on tables this small: TRUNCATE
    # rewrites every table's files, ~0.15 s a test. Ids are not reset; no test relies on them.
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url, pool_size=20)
    yield eng
    if eng.dialect.name == "postgresql":
        _empty_postgres(eng)
    eng.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with make_sessionmaker(engine)() as s:
        yield s


@pytest.fixture
def make_store(engine: Engine) -> Callable[..., tuple[int, str]]:
    from models.accounts import create_store

    def _make(name: str | None = None, country: str = "US") -> tuple[int, str]:
        with make_sessionmaker(engine)() as s:
            store, token = create_store(
                s, name=name or f"Store {uuid.uuid4().hex[:6]}", country=country
            )
            s.commit()
            return store.id, token

    return _make


@pytest.fixture
def app_settings(db_url: str):  # type: ignore[no-untyped-def]
    from worker.settings import Settings

    return Settings(
        DATABASE_URL=db_url, WALLET_BASE_URL="https://wallet.example.com", LOG_FORMAT="json"
    )


@pytest.fixture
def client(app_settings, engine: Engine):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from api.app import create_app

    app = create_app(app_settings, engine=engine)
    with TestClient(app) as c:
        yield c


def is_postgres(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def connect_shop(engine: Engine, store_id: int, shop: str) -> int:
    """Connect `store_id` to Shopify shop `shop` (a throwaway token and key); the connection id."""
    from cryptography.fernet import Fernet

    from models.connections import connect

    with make_sessionmaker(engine)() as s:
        connection, _ = connect(
            s,
            store_id=store_id,
            source="shopify",
            account=shop,
            access_token="tok",
            api_base_url=None,
            api_version=None,
            key=Fernet.generate_key(),
        )
        s.commit()
        return connection.id
