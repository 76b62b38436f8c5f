"""`Idempotency-Key` for POSTs a point-of-sale may retry (create, stamp, redeem).

The key row is inserted in the same transaction as the change it protects. A concurrent request
with the same key blocks on the unique (store, key) constraint until the first commits, then finds
the stored response and replays it; if the first rolls back, the second proceeds as new. So a key
applies its change at most once, with no window in between. Failed requests store nothing and
may be retried with the same key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from api.errors import ApiError
from models.errors import ValidationFailed
from models.tables import IdempotentRequest, utcnow

TTL = dt.timedelta(hours=24)
MAX_KEY_LENGTH = 255


@dataclass(slots=True)
class Replay:
    status_code: int
    body: str  # the JSON text of the first response, replayed byte for byte


def fingerprint(method: str, path: str, body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def claim(session: Session, *, store_id: int, key: str, request_fingerprint: str) -> Replay | None:
    """Claim `key` for this request, or return the response it already produced."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationFailed.single(
            "idempotency_key", f"must be 1 to {MAX_KEY_LENGTH} printable characters"
        )
    session.execute(
        delete(IdempotentRequest).where(
            IdempotentRequest.store_id == store_id,
            IdempotentRequest.key == key,
            IdempotentRequest.created_at < utcnow() - TTL,
        )
    )
    values = {
        "store_id": store_id,
        "key": key,
        "fingerprint": request_fingerprint,
        "created_at": utcnow(),
    }
    dialect = session.get_bind().dialect.name
    stmt: Any
    if dialect == "postgresql":
        stmt = pg_insert(IdempotentRequest).values(values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite_insert(IdempotentRequest).values(values).on_conflict_do_nothing()
    else:  # pragma: no cover
        stmt = insert(IdempotentRequest).values(values)
    inserted = session.execute(stmt.returning(IdempotentRequest.id)).scalar()
    if inserted is not None:
        return None
    row = session.execute(
        select(IdempotentRequest).where(
            IdempotentRequest.store_id == store_id, IdempotentRequest.key == key
        )
    ).scalar_one()
    if row.fingerprint != request_fingerprint:
        raise ValidationFailed.single(
            "idempotency_key", "was already used with a different request"
        )
    if row.status_code is None or row.response_body is None:  # pragma: no cover - not committed
        raise ApiError(409, "a request with this Idempotency-Key is in progress")
    return Replay(status_code=row.status_code, body=row.response_body)


def remember(session: Session, *, store_id: int, key: str, status_code: int, body: str) -> None:
    session.execute(
        update(IdempotentRequest)
        .where(IdempotentRequest.store_id == store_id, IdempotentRequest.key == key)
        .values(status_code=status_code, response_body=body)
    )
