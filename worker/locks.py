"""Cluster-wide exclusive locks for scheduled work (one sync per connection and stream).

    with exclusive_lock("sync:7:customers", redis_url=settings.redis_url, engine=engine) as held:
        if held:
            ...  # nobody else holds it until the block ends (or this process dies)

Three implementations, picked by what the deployment has:

- **Redis** (`REDIS_URL` set): `SET NX` with an expiry, extended by a heartbeat thread while the
  block runs; a worker that dies stops extending it and the lock expires after `ttl` seconds.
  Release is owner-checked (redis-py's Lock token), so an expired-and-retaken lock is never
  released by the old holder.
- **PostgreSQL** without Redis: a session-level `pg_try_advisory_lock` on a connection held for the
  block; the server releases it the moment that connection ends (process killed included).
- **SQLite** (embedded, one machine): `flock` on a lock file beside the database; the kernel
  releases it when the process ends, however it ends.

None of them blocks: a lock held elsewhere yields `False` at once (the caller skips the work).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Final

import structlog
from sqlalchemy import Engine, text

log = structlog.get_logger(__name__)

REDIS_PREFIX: Final = "loyalty-sync:lock:"
ADVISORY_CLASS: Final = 0x4C4B  # "LK": this module's pg_advisory_lock namespace
DEFAULT_TTL: Final = 120.0


def _advisory_key(name: str) -> int:
    digest = hashlib.blake2b(name.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


class _Heartbeat:
    """Extends a Redis lock every `ttl / 3` seconds until stopped."""

    def __init__(self, lock: object, ttl: float) -> None:
        self._lock = lock
        self._ttl = ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-heartbeat", daemon=True)
        self.lost = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        from redis.exceptions import LockError, RedisError

        while not self._stop.wait(self._ttl / 3):
            try:
                self._lock.extend(self._ttl, replace_ttl=True)  # type: ignore[attr-defined]
            except LockError:
                self.lost = True
                log.error("lock.lost")
                return
            except RedisError as exc:  # transient: the next beat tries again before expiry
                log.warning("lock.heartbeat_failed", error=type(exc).__name__)


@contextmanager
def _redis_lock(name: str, redis_url: str, ttl: float) -> Iterator[bool]:
    import redis
    from redis.exceptions import LockError

    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    lock = client.lock(REDIS_PREFIX + name, timeout=ttl, blocking=False, thread_local=False)
    try:
        if not lock.acquire():
            yield False
            return
        heartbeat = _Heartbeat(lock, ttl)
        heartbeat.start()
        try:
            yield True
        finally:
            heartbeat.stop()
            with suppress(LockError):
                lock.release()
    finally:
        client.close()


@contextmanager
def _postgres_lock(name: str, engine: Engine) -> Iterator[bool]:
    key = _advisory_key(name)
    with engine.connect() as conn:
        held = bool(
            conn.scalar(
                text("SELECT pg_try_advisory_lock(:cls, :key)"), {"cls": ADVISORY_CLASS, "key": key}
            )
        )
        conn.commit()
        try:
            yield held
        finally:
            if held:
                with suppress(Exception):  # a dead connection released it already
                    conn.execute(
                        text("SELECT pg_advisory_unlock(:cls, :key)"),
                        {"cls": ADVISORY_CLASS, "key": key},
                    )
                    conn.commit()


def lock_directory(engine: Engine) -> Path:
    """Where SQLite deployments keep their lock files: beside the database file."""
    database = engine.url.database
    if not database or database == ":memory:":
        return Path("var") / "locks"
    return Path(database).expanduser().resolve().parent / "locks"


@contextmanager
def _file_lock(name: str, directory: Path) -> Iterator[bool]:
    directory.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    fd = os.open(directory / f"{safe}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def exclusive_lock(
    name: str, *, redis_url: str | None, engine: Engine, ttl: float = DEFAULT_TTL
) -> Iterator[bool]:
    """Hold the cluster-wide lock `name` for the block if nobody else does; yields whether it
    is held (never waits)."""
    if redis_url:
        with _redis_lock(name, redis_url, ttl) as held:
            yield held
    elif engine.dialect.name == "postgresql":
        with _postgres_lock(name, engine) as held:
            yield held
    else:
        with _file_lock(name, lock_directory(engine)) as held:
            yield held
