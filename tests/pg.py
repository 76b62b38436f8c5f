"""Scratch PostgreSQL databases for tests, created beside the one in `TEST_POSTGRES_URL`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from models.db import normalise_url


def admin_url() -> URL:
    """`TEST_POSTGRES_URL`; without it PostgreSQL tests skip locally and fail under CI=true."""
    base = os.environ.get("TEST_POSTGRES_URL")
    if not base:
        if os.environ.get("CI") == "true":
            pytest.fail("TEST_POSTGRES_URL must be set under CI: the store is tested on PostgreSQL")
        pytest.skip("TEST_POSTGRES_URL is not set")
    return normalise_url(base)


@contextmanager
def scratch_database(name: str) -> Iterator[str]:
    """Create database `name` (dropping a leftover one first), yield its URL, drop it after."""
    admin = create_engine(admin_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
