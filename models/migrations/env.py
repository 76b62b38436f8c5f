"""Alembic environment: migrations run on the connection or URL the caller provides."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection

from models.db import make_engine
from models.tables import Base

config = context.config
target_metadata = Base.metadata


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    # PostgreSQL-only indexes (ddl_if) do not exist on SQLite: don't report them as drift there.
    if type_ == "index" and not reflected and obj is not None:
        ddl_if = getattr(obj, "_ddl_if", None)
        bind = context.get_bind()
        if ddl_if is not None and ddl_if.dialect and bind.dialect.name != ddl_if.dialect:
            return False
    return True


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        include_object=include_object,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from worker.settings import Settings

        url = Settings().database_url
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run against a database")
run_migrations_online()
