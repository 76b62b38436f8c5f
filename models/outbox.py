"""The transactional outbox: side effects recorded with the change that causes them.

Rows are delivered by the worker after commit; nothing is sent from inside a request.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.tables import OutboxMessage

KINDS = frozenset({"card_links", "pass_update", "push"})


def enqueue(
    session: Session, *, store_id: int, kind: str, idempotency_key: str, payload: dict[str, Any]
) -> OutboxMessage:
    """Add a message unless one with the same key exists (then return that one)."""
    if kind not in KINDS:
        raise ValueError(f"unknown outbox kind {kind!r}")
    existing = session.scalar(
        select(OutboxMessage).where(OutboxMessage.idempotency_key == idempotency_key)
    )
    if existing is not None:
        return existing
    message = OutboxMessage(
        store_id=store_id, kind=kind, idempotency_key=idempotency_key, payload=payload
    )
    session.add(message)
    return message
