"""The transactional outbox: side effects recorded with the change that causes them.

Rows are delivered by the worker after commit; nothing is sent from inside a request. This
module holds the delivery *state machine*; the worker edge (`worker.outbox`) does the I/O.

Statuses: `pending` → `sending` (claimed, under a lease) → `delivered` | `skipped` | `failed`,
or back to `pending` with a later `next_attempt_at` (transient error, exponential backoff with
jitter). `failed` and `skipped` rows go back to `pending` only through `retry` (operator).

**Claim and lease.** `claim` picks due rows — `pending`, or `sending` whose lease expired —
with `FOR UPDATE SKIP LOCKED` on PostgreSQL (SQLite serialises writers: every transaction is
`BEGIN IMMEDIATE`, so the one-statement claim is atomic there too), and in the same committed
statement sets `status='sending'`, `attempts + 1` and `next_attempt_at = now + lease` (the
lease expiry). Nothing is sent before that commit. `attempts` is the *fencing token*: every
later write of the claimant (`mark_channel`, `finish`) is conditional on `status='sending' AND
attempts = <its claim's attempts>`, so a worker whose lease expired and was re-claimed by
another cannot overwrite the new owner's state — its write matches no row and it stops.

**Per-channel progress.** A `card_links` row fans out to several channels (`email`, `sms`,
and one write-back per linked source record, e.g. `shopify:<connection>:<customer id>`). Their
progress lives in `payload["delivery"][channel] = {"state": ..., "at": ...}`, each change
committed on its own (fenced), so a retry never repeats a channel that already succeeded:

- `done`: delivered; never attempted again.
- `skipped`: nothing to do (no address, channel not configured); a retry re-evaluates it.
- `failed`: a permanent error (e.g. 550 bad address); not re-attempted by automatic retries.
- `attempting`: committed *before* an email/SMS is handed to the provider, replaced by `done`
  (or cleared, when the provider surely did not take it) right after.
- `unknown`: a claim that finds `attempting` (the previous worker died, or lost its lease, or
  the provider's answer never came) records `unknown` and does NOT send again.

**The double-send window.** Email and SMS are not idempotent on the receiving side, so they
are delivered *at most once* automatically: a channel is only sent by the claim that committed
its `attempting` mark, and a later claim never re-sends an `attempting` channel. There is
therefore no window in which two automatic attempts both send; the price is that a worker
killed between the provider's acceptance and the commit of `done` (or a timeout waiting for
the provider's answer) leaves the channel `unknown` and the row `failed` with "outcome
unknown" — the operator decides (`outbox retry` clears `unknown`/`failed` channel marks and
sends again). Write-backs (Shopify `metafieldsSet`, Square upsert with an idempotency key) and
pass-service posts (idempotency-key header) are idempotent, so they are simply retried.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

from sqlalchemy import CursorResult, and_, func, or_, select, update
from sqlalchemy.orm import Session

from models.tables import OutboxMessage, is_valid_id, utcnow

KINDS = frozenset({"card_links", "pass_update", "push"})
PENDING, SENDING, DELIVERED, FAILED, SKIPPED = (
    "pending",
    "sending",
    "delivered",
    "failed",
    "skipped",
)
STATUSES: Final = (PENDING, SENDING, DELIVERED, FAILED, SKIPPED)
RETRYABLE_STATUSES: Final = frozenset({FAILED, SKIPPED})

# Channel states kept in payload["delivery"].
DONE, ATTEMPTING, UNKNOWN, CHANNEL_FAILED, CHANNEL_SKIPPED = (
    "done",
    "attempting",
    "unknown",
    "failed",
    "skipped",
)
PROGRESS_KEY: Final = "delivery"

BACKOFF_BASE: Final = dt.timedelta(seconds=30)
BACKOFF_MAX: Final = dt.timedelta(hours=1)
DEFAULT_LEASE: Final = dt.timedelta(minutes=5)
MAX_ERROR_LENGTH: Final = 1000


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


# --- claiming -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Claim:
    """One row claimed by this worker: a snapshot of it plus the fencing token (`attempts`)."""

    id: int
    store_id: int
    kind: str
    idempotency_key: str
    attempts: int
    lease_until: dt.datetime
    payload: dict[str, Any] = field(default_factory=dict)

    def progress(self) -> dict[str, dict[str, Any]]:
        """`payload["delivery"]`: channel → `{"state", "at", ...}` (a copy)."""
        raw = self.payload.get(PROGRESS_KEY)
        if not isinstance(raw, Mapping):
            return {}
        return {str(k): dict(v) for k, v in raw.items() if isinstance(v, Mapping)}

    def channel_state(self, channel: str) -> str | None:
        entry = self.progress().get(channel)
        state = entry.get("state") if entry else None
        return state if isinstance(state, str) else None


def claim(
    session: Session,
    *,
    limit: int,
    now: dt.datetime | None = None,
    lease: dt.timedelta = DEFAULT_LEASE,
) -> list[Claim]:
    """Take up to `limit` due rows for this worker; the caller commits at once, before sending.

    Due: `pending` with `next_attempt_at <= now`, or `sending` whose lease (`next_attempt_at`)
    expired. Oldest due first. Concurrent callers never get the same row (SKIP LOCKED on
    PostgreSQL, serialised writers on SQLite).
    """
    if limit < 1:
        return []
    now = now or utcnow()
    due = (
        select(OutboxMessage.id)
        .where(
            OutboxMessage.status.in_((PENDING, SENDING)),
            OutboxMessage.next_attempt_at <= now,
        )
        .order_by(OutboxMessage.next_attempt_at, OutboxMessage.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    lease_until = now + lease
    statement = (
        update(OutboxMessage)
        .where(OutboxMessage.id.in_(due))
        .values(status=SENDING, attempts=OutboxMessage.attempts + 1, next_attempt_at=lease_until)
        .returning(
            OutboxMessage.id,
            OutboxMessage.store_id,
            OutboxMessage.kind,
            OutboxMessage.idempotency_key,
            OutboxMessage.attempts,
            OutboxMessage.payload,
        )
        .execution_options(synchronize_session=False)
    )
    claims = [
        Claim(
            id=row.id,
            store_id=row.store_id,
            kind=row.kind,
            idempotency_key=row.idempotency_key,
            attempts=row.attempts,
            lease_until=lease_until,
            payload=dict(row.payload or {}),
        )
        for row in session.execute(statement)
    ]
    claims.sort(key=lambda c: c.id)
    return claims


def _fenced(claimed: Claim) -> Any:
    return and_(
        OutboxMessage.id == claimed.id,
        OutboxMessage.status == SENDING,
        OutboxMessage.attempts == claimed.attempts,
    )


def _rowcount(session: Session, statement: Any) -> int:
    result = cast(CursorResult[Any], session.execute(statement))
    return int(result.rowcount or 0)


def error_text(error: object) -> str:
    """One line, clipped to `MAX_ERROR_LENGTH`."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text


def mark_channel(
    session: Session,
    claimed: Claim,
    channel: str,
    state: str | None,
    *,
    note: str | None = None,
    now: dt.datetime | None = None,
) -> bool:
    """Record a channel's progress on the row (None clears it); False when the lease was lost.

    The caller commits right after, so the mark survives the worker. The claim's payload
    snapshot is updated in place on success.
    """
    progress = claimed.progress()
    if state is None:
        progress.pop(channel, None)
    else:
        entry: dict[str, Any] = {"state": state, "at": (now or utcnow()).isoformat()}
        if note:
            entry["note"] = error_text(note)[:300]
        progress[channel] = entry
    payload = {**claimed.payload, PROGRESS_KEY: progress}
    changed = _rowcount(
        session,
        update(OutboxMessage)
        .where(_fenced(claimed))
        .values(payload=payload)
        .execution_options(synchronize_session=False),
    )
    if changed:
        claimed.payload = payload
    return bool(changed)


def backoff(attempts: int, *, rng: random.Random | None = None) -> dt.timedelta:
    """Delay after the `attempts`-th failed try: 30 s · 2^(attempts-1), capped at one hour,
    with "equal jitter" (a uniform draw in [½·delay, delay]), so the delay still grows with
    each attempt but workers that failed together don't come back together."""
    ceiling: dt.timedelta = BACKOFF_BASE * (2 ** min(max(attempts - 1, 0), 20))
    ceiling = min(ceiling, BACKOFF_MAX)
    draw = (rng or random).uniform(0.5, 1.0)
    return ceiling * draw


def finish(
    session: Session,
    claimed: Claim,
    *,
    status: str,
    error: str | None = None,
    retry_at: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> bool:
    """End the claim: `delivered`, `skipped`, `failed`, or `pending` again at `retry_at`.

    False when the lease was lost (another worker owns the row now; nothing is written).
    """
    now = now or utcnow()
    values: dict[str, Any] = {"status": status, "last_error": error_text(error) if error else None}
    if status == DELIVERED:
        values["delivered_at"] = now
    elif status == PENDING:
        if retry_at is None:
            raise ValueError("a retry needs retry_at")
        values["next_attempt_at"] = retry_at
    elif status not in (SKIPPED, FAILED):
        raise ValueError(f"can't finish a claim as {status!r}")
    return bool(
        _rowcount(
            session,
            update(OutboxMessage)
            .where(_fenced(claimed))
            .values(**values)
            .execution_options(synchronize_session=False),
        )
    )


def release(session: Session, claimed: Claim, *, now: dt.datetime | None = None) -> bool:
    """Give an untouched claim back (due now, the attempt not counted): for a worker that
    claimed more than it can deliver within the lease. False when the lease was already lost."""
    return bool(
        _rowcount(
            session,
            update(OutboxMessage)
            .where(_fenced(claimed))
            .values(
                status=PENDING,
                attempts=OutboxMessage.attempts - 1,
                next_attempt_at=now or utcnow(),
            )
            .execution_options(synchronize_session=False),
        )
    )


# --- operator operations (the caller owns the transaction) ---------------------------------


def _validate_status(status: str | None) -> None:
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown outbox status {status!r}; one of {', '.join(STATUSES)}")


def list_messages(
    session: Session,
    *,
    status: str | None = None,
    store_id: int | None = None,
    kind: str | None = None,
    limit: int = 100,
) -> list[OutboxMessage]:
    """The newest rows first, optionally of one status / store / kind."""
    _validate_status(status)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown outbox kind {kind!r}")
    query = select(OutboxMessage).order_by(OutboxMessage.id.desc()).limit(max(limit, 0))
    if status is not None:
        query = query.where(OutboxMessage.status == status)
    if store_id is not None:
        query = query.where(OutboxMessage.store_id == store_id)
    if kind is not None:
        query = query.where(OutboxMessage.kind == kind)
    return list(session.scalars(query))


def _reopened_payload(payload: Mapping[str, Any] | None) -> dict[str, Any]:
    """The payload with `unknown`/`failed` channel marks cleared (an operator retry sends them
    again); `done` channels stay done."""
    data = dict(payload or {})
    progress = data.get(PROGRESS_KEY)
    if isinstance(progress, Mapping):
        data[PROGRESS_KEY] = {
            k: v
            for k, v in progress.items()
            if not (isinstance(v, Mapping) and v.get("state") in (UNKNOWN, CHANNEL_FAILED))
        }
    return data


def retry(
    session: Session,
    *,
    message_id: int | None = None,
    status: str | None = None,
    store_id: int | None = None,
    now: dt.datetime | None = None,
) -> list[int]:
    """Put rows back to `pending`, due now, attempts reset; returns their ids.

    `message_id`: that row, whatever its status except `pending`/`sending`. Otherwise every row
    of `status` (default `failed`; `skipped` is allowed too, e.g. after configuring SMTP).
    Channels marked `unknown` or `failed` are cleared, so they are attempted again — the
    operator's explicit decision (an `unknown` email may then arrive twice); `done` channels
    are never repeated. Raises ValueError for a status that can't be retried.
    """
    now = now or utcnow()
    condition: Any
    if message_id is not None:
        if not is_valid_id(message_id):
            return []
        condition = and_(
            OutboxMessage.id == message_id, OutboxMessage.status.not_in((PENDING, SENDING))
        )
        if status is not None:
            _validate_status(status)
            condition = and_(condition, OutboxMessage.status == status)
    else:
        status = status or FAILED
        _validate_status(status)
        if status not in RETRYABLE_STATUSES:
            raise ValueError(f"can't retry rows with status {status!r}")
        condition = OutboxMessage.status == status
    if store_id is not None:
        condition = and_(condition, OutboxMessage.store_id == store_id)
    rows = session.execute(
        select(OutboxMessage.id, OutboxMessage.payload)
        .where(condition)
        .order_by(OutboxMessage.id)
        .with_for_update()
    ).all()
    ids: list[int] = []
    for row_id, payload in rows:
        changed = _rowcount(
            session,
            update(OutboxMessage)
            .where(OutboxMessage.id == row_id, OutboxMessage.status.not_in((PENDING, SENDING)))
            .values(
                status=PENDING,
                attempts=0,
                next_attempt_at=now,
                payload=_reopened_payload(payload),
            )
            .execution_options(synchronize_session=False),
        )
        if changed:
            ids.append(row_id)
    return ids


def status_counts(session: Session) -> dict[str, dict[str, int]]:
    """`{kind: {status: rows}}` over the whole outbox, every kind and status present (0s)."""
    counts = {kind: dict.fromkeys(STATUSES, 0) for kind in sorted(KINDS)}
    query = select(OutboxMessage.kind, OutboxMessage.status, func.count()).group_by(
        OutboxMessage.kind, OutboxMessage.status
    )
    for kind, status, n in session.execute(query):
        counts.setdefault(kind, dict.fromkeys(STATUSES, 0))[status] = int(n)
    return counts


def due_count(session: Session, *, now: dt.datetime | None = None) -> int:
    """Rows a `claim` at `now` would consider (pending due, or sending with an expired lease)."""
    now = now or utcnow()
    return int(
        session.scalar(
            select(func.count()).where(
                or_(OutboxMessage.status == PENDING, OutboxMessage.status == SENDING),
                OutboxMessage.next_attempt_at <= now,
            )
        )
        or 0
    )


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def render_message(message: OutboxMessage) -> dict[str, Any]:
    """A JSON-ready view of a row: its state and per-channel progress (never contact data —
    the payload holds ids and wallet URLs only; addresses are read at send time)."""
    payload = dict(message.payload or {})
    progress = payload.get(PROGRESS_KEY)
    channels = {
        str(k): str(v.get("state"))
        for k, v in (progress.items() if isinstance(progress, Mapping) else ())
        if isinstance(v, Mapping)
    }
    return {
        "id": message.id,
        "store_id": message.store_id,
        "kind": message.kind,
        "status": message.status,
        "attempts": message.attempts,
        "idempotency_key": message.idempotency_key,
        "customer_card_id": payload.get("customer_card_id"),
        "channels": channels,
        "created_at": _iso(message.created_at),
        "next_attempt_at": _iso(message.next_attempt_at),
        "delivered_at": _iso(message.delivered_at),
        "last_error": message.last_error,
    }


__all__: Sequence[str] = [
    "Claim",
    "backoff",
    "claim",
    "enqueue",
    "finish",
    "list_messages",
    "mark_channel",
    "release",
    "render_message",
    "retry",
    "status_counts",
]
