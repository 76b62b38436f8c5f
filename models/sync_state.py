"""Sync state, runs and conflicts: the store side of a sync run (no HTTP, no settings).

A sync of one (connection, stream) walks the source page by page. Each page is applied together
with `save_page` in ONE transaction, so the saved cursor always matches what was written: a run
that dies after page k resumes (`begin_run`) at the cursor saved with page k.

- `begin_run`: resume the run in progress (same `full`), or start a fresh one. It locks the state
  row (`SELECT … FOR UPDATE` on PostgreSQL; SQLite transactions are `BEGIN IMMEDIATE`, i.e.
  already serialised), so two concurrent calls cannot both start fresh runs.
- `save_page`: the cursor after the page, the run's counters, the high-water mark.
- `finish_run`: the high-water mark becomes the watermark; the cursor is cleared.
- `fail_run`: the run ends `failed` / `needs_attention`; the state keeps its cursor for a resume.

The caller (an edge) owns the transactions: these functions only flush.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from connectors.records import Page
from models.errors import ErrorBag, NotFound, ValidationFailed
from models.ingest import OWNABLE_FIELDS, IngestPolicy
from models.tables import Connection, Store, SyncConflict, SyncRun, SyncState, is_valid_id, utcnow

CUSTOMERS_STREAM = "customers"
RUN_STATUSES = ("running", "succeeded", "failed", "needs_attention")
FAILED_STATUSES = ("failed", "needs_attention")
MAX_ERROR_LENGTH = 500
# What `save_page` adds to the run from the apply counts (PageCounts.as_dict() or any mapping).
_RUN_COUNTERS = ("seen", "created", "updated", "linked", "unchanged", "conflicts", "deleted")


def _error_text(error: str) -> str:
    """One line, bounded: errors end up in the CLI and in `connections list`."""
    text = " ".join(str(error).split())
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text


def _locked_state(session: Session, connection_id: int, stream: str) -> SyncState | None:
    query = (
        select(SyncState)
        .where(SyncState.connection_id == connection_id, SyncState.stream == stream)
        .with_for_update()
        # A row cached in the session from an earlier transaction must be read again.
        .execution_options(populate_existing=True)
    )
    return session.scalars(query).one_or_none()


def get_or_create_state(session: Session, connection_id: int, stream: str) -> SyncState:
    """The state row of (connection, stream), created when missing, locked for this transaction.

    Race-safe: a concurrent creator that wins the unique (connection_id, stream) insert makes
    ours fail inside a savepoint, and we read (and lock) theirs.
    """
    state = _locked_state(session, connection_id, stream)
    if state is not None:
        return state
    try:
        with session.begin_nested():
            state = SyncState(connection_id=connection_id, stream=stream)
            session.add(state)
            session.flush()
        return state
    except IntegrityError:
        state = _locked_state(session, connection_id, stream)
        if state is None:  # pragma: no cover - the winner's row is committed by then
            raise
        return state


def read_state(session: Session, connection_id: int, stream: str) -> SyncState | None:
    """The state row without locking or creating it (dry runs, reports)."""
    query = select(SyncState).where(
        SyncState.connection_id == connection_id, SyncState.stream == stream
    )
    return session.scalars(query).one_or_none()


def planned_window(state: SyncState | None, *, full: bool) -> tuple[dt.datetime | None, bool]:
    """`(window_start, resumable)` a run would use now, without changing anything.

    A run in progress with the same `full` is resumed in its own window; otherwise a fresh run
    starts at the watermark (None for a full sync or when no run ever completed).
    """
    if state is not None and state.in_progress and state.full == full:
        return state.window_start, True
    if full or state is None:
        return None, False
    return state.watermark, False


def begin_run(
    session: Session,
    connection: Connection,
    stream: str,
    *,
    full: bool,
    continue_run: int | None = None,
) -> tuple[SyncRun, SyncState, bool]:
    """Start (or resume) a run of `connection`'s `stream`; returns `(run, state, resumed)`.

    Resume: the state has a run in progress with the same `full` — its cursor, window and
    high-water mark are kept, and the previous run row, if still `running` (its process died),
    is marked `failed`. Otherwise a fresh run: the window starts at the watermark (None when
    `full` or never synced), no cursor, no high-water mark. Either way a new run row is added.

    `continue_run`: the id of the run a scheduled step paused (page-sized steps of one long
    sync): when it is still the state's `running` run, it goes on as the same row (resumed is
    True); otherwise the call behaves as above.
    """
    state = get_or_create_state(session, connection.id, stream)
    resumed = bool(state.in_progress and state.full == full)
    previous = session.get(SyncRun, state.run_id) if state.run_id is not None else None
    if (
        continue_run is not None
        and resumed
        and previous is not None
        and previous.id == continue_run
        and previous.status == "running"
    ):
        return previous, state, True
    now = utcnow()
    if previous is not None and previous.status == "running":
        previous.status = "failed"
        previous.finished_at = now
        previous.error = "interrupted; resumed by a later run" if resumed else "superseded"
    if not resumed:
        state.window_start = None if full else state.watermark
        state.cursor = None
        state.high_water = None
        state.pages_done = 0
        state.full = full
        state.in_progress = True
    run = SyncRun(
        store_id=connection.store_id,
        connection_id=connection.id,
        stream=stream,
        status="running",
        full=full,
        dry_run=False,
        resumed=resumed,
        started_at=now,
        pages=0,
        requests=0,
        throttled=0,
        seen=0,
        created=0,
        updated=0,
        linked=0,
        unchanged=0,
        skipped=0,
        conflicts=0,
        deleted=0,
    )
    session.add(run)
    session.flush()
    state.run_id = run.id
    session.flush()
    return run, state, resumed


def _counts_mapping(counts: Any) -> Mapping[str, Any]:
    if isinstance(counts, Mapping):
        return counts
    as_dict = getattr(counts, "as_dict", None)
    if callable(as_dict):
        result = as_dict()
        if isinstance(result, Mapping):
            return result
    raise TypeError("counts must be a mapping or have as_dict()")


def save_page(session: Session, state: SyncState, run: SyncRun, page: Page, counts: Any) -> None:
    """Record one applied page: the cursor after it, the run's counters, the high-water mark.

    `counts` is the apply's `PageCounts` (or a mapping of the same names). Call it in the same
    transaction as the apply, so a crash can never separate the data from its cursor.
    """
    values = _counts_mapping(counts)
    state.cursor = page.cursor
    state.pages_done = (state.pages_done or 0) + 1
    stamps = [r.source_updated_at for r in page.records if r.source_updated_at is not None]
    if stamps:
        newest = max(stamps)
        if state.high_water is None or newest > state.high_water:
            state.high_water = newest
    run.pages += 1
    run.requests += page.requests
    run.throttled += page.throttled
    run.skipped += page.skipped
    for name in _RUN_COUNTERS:
        setattr(run, name, getattr(run, name) + int(values.get(name, 0)))
    session.flush()


def finish_run(
    session: Session,
    state: SyncState,
    run: SyncRun,
    *,
    requests: int | None = None,
    throttled: int | None = None,
) -> None:
    """The run completed: its high-water mark becomes the watermark, the cursor is cleared.

    `requests`/`throttled`, when given, replace the run's totals (requests the pages did not
    account for, e.g. a last empty answer, are the caller's to report).
    """
    if state.high_water is not None and (
        state.watermark is None or state.high_water > state.watermark
    ):
        state.watermark = state.high_water
    state.in_progress = False
    state.cursor = None
    run.status = "succeeded"
    run.finished_at = utcnow()
    run.error = None
    if requests is not None:
        run.requests = requests
    if throttled is not None:
        run.throttled = throttled
    session.flush()


def fail_run(
    session: Session,
    run: SyncRun,
    *,
    status: str,
    error: str,
    requests: int | None = None,
    throttled: int | None = None,
) -> None:
    """The run stopped: `failed` (retry later) or `needs_attention` (the connection is wrong).

    The state is left alone: it keeps its cursor, so the next run resumes where this one was.
    `error` must not contain secrets (connector messages never do); it is kept on one line.
    """
    if status not in FAILED_STATUSES:
        raise ValueError(f"status must be one of {', '.join(FAILED_STATUSES)}")
    run.status = status
    run.error = _error_text(error)
    run.finished_at = utcnow()
    if requests is not None:
        run.requests = requests
    if throttled is not None:
        run.throttled = throttled
    session.flush()


def mark_needs_attention(session: Session, connection: Connection, error: str) -> None:
    """The connection's credentials or configuration are wrong: an operator must act.

    `connect` (new credentials) sets it active again. `error` must not contain secrets.
    """
    connection.status = "needs_attention"
    connection.last_error = _error_text(error)
    session.flush()


def mark_active(session: Session, connection: Connection) -> None:
    """A run succeeded: whatever needed attention works again."""
    if connection.status != "active" or connection.last_error is not None:
        connection.status = "active"
        connection.last_error = None
        session.flush()


# --- conflicts ---------------------------------------------------------------------------------


def list_conflicts(
    session: Session, *, store_id: int | None = None, include_resolved: bool = False
) -> list[SyncConflict]:
    """Conflicts, oldest first; only unresolved ones unless `include_resolved`."""
    query = select(SyncConflict).order_by(SyncConflict.id)
    if store_id is not None:
        if not is_valid_id(store_id) or session.get(Store, store_id) is None:
            raise NotFound("Store")
        query = query.where(SyncConflict.store_id == store_id)
    if not include_resolved:
        query = query.where(SyncConflict.resolved_at.is_(None))
    return list(session.scalars(query))


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def render_conflict(conflict: SyncConflict) -> dict[str, Any]:
    return {
        "id": conflict.id,
        "store_id": conflict.store_id,
        "source": conflict.source,
        "external_id": conflict.external_id,
        "kind": conflict.kind,
        "detail": conflict.detail,
        "customer_ids": list(conflict.customer_ids or []),
        "occurrences": conflict.occurrences,
        "first_seen_at": _iso(conflict.first_seen_at),
        "last_seen_at": _iso(conflict.last_seen_at),
        "resolved_at": _iso(conflict.resolved_at),
    }


def render_run(run: SyncRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "store_id": run.store_id,
        "connection_id": run.connection_id,
        "stream": run.stream,
        "status": run.status,
        "full": run.full,
        "resumed": run.resumed,
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "pages": run.pages,
        "requests": run.requests,
        "throttled": run.throttled,
        "seen": run.seen,
        "created": run.created,
        "updated": run.updated,
        "linked": run.linked,
        "unchanged": run.unchanged,
        "skipped": run.skipped,
        "conflicts": run.conflicts,
        "deleted": run.deleted,
        "error": run.error,
    }


# --- which connection, which policy -----------------------------------------------------------


def pick_connection(
    session: Session, *, store_id: int, source: str, connection_id: int | None = None
) -> Connection:
    """The store's connection to `source` that a sync should use.

    With `connection_id`: that one, which must belong to the store and the source. Without: the
    store's only connection to the source. `NotFound` (store or connection), `ValidationFailed`
    when there is none or several to choose from.
    """
    if not is_valid_id(store_id) or session.get(Store, store_id) is None:
        raise NotFound("Store")
    if connection_id is not None:
        row = session.get(Connection, connection_id) if is_valid_id(connection_id) else None
        if row is None or row.store_id != store_id or row.source != source:
            raise NotFound("Connection")
        return row
    rows = list(
        session.scalars(
            select(Connection)
            .where(Connection.store_id == store_id, Connection.source == source)
            .order_by(Connection.id)
        )
    )
    if not rows:
        raise ValidationFailed.single(
            "connection",
            f"store {store_id} has no {source} connection; "
            f"add one with `loyalty-sync connect {source}`",
        )
    if len(rows) > 1:
        ids = ", ".join(str(r.id) for r in rows)
        raise ValidationFailed.single(
            "connection",
            f"store {store_id} has {len(rows)} {source} connections (ids {ids}); "
            "choose one with --connection ID",
        )
    return rows[0]


MATCH_KEYS = ("email", "phone")


# Identity keys a source may match by, whatever its connection's config asks: LOKE phone numbers
# are not unique there, so a phone match must never link two LOKE records to one customer.
SOURCE_MATCH_KEYS: dict[str, tuple[str, ...]] = {"loke": ("email",)}


def policy_from_config(
    config: Mapping[str, Any] | None, *, source: str | None = None
) -> IngestPolicy:
    """The ingest policy a connection's `config` asks for (defaults: `IngestPolicy()`).

    `owned_fields`: list of customer fields the source may overwrite (a subset of
    first_name, last_name, email, phone, birthday); `match_by`: ordered, non-empty list of
    identity keys (`email`, `phone`). Anything else is a `ValidationFailed`. For a `source` in
    `SOURCE_MATCH_KEYS` matching is restricted to that source's keys (default: exactly them).
    """
    config = config or {}
    errors = ErrorBag()
    default = IngestPolicy()
    owned_fields = default.owned_fields
    allowed = SOURCE_MATCH_KEYS.get(source or "", MATCH_KEYS)
    match_by = allowed
    raw_owned = config.get("owned_fields")
    if raw_owned is not None:
        if not isinstance(raw_owned, list | tuple) or not all(
            isinstance(v, str) for v in raw_owned
        ):
            errors.add("owned_fields", "must be a list of field names")
        else:
            unknown = sorted(set(raw_owned) - OWNABLE_FIELDS)
            if unknown:
                errors.add(
                    "owned_fields",
                    f"unknown field(s) {', '.join(unknown)}; "
                    f"allowed: {', '.join(sorted(OWNABLE_FIELDS))}",
                )
            else:
                owned_fields = frozenset(raw_owned)
    raw_match = config.get("match_by")
    if raw_match is not None:
        if not isinstance(raw_match, list | tuple) or not all(
            isinstance(v, str) for v in raw_match
        ):
            errors.add("match_by", "must be a list of identity keys")
        elif not raw_match:
            errors.add("match_by", "can't be empty")
        elif len(set(raw_match)) != len(raw_match):
            errors.add("match_by", "has duplicates")
        elif set(raw_match) - set(allowed):
            errors.add("match_by", f"allowed keys: {', '.join(allowed)}")
        else:
            match_by = tuple(raw_match)
    errors.raise_if_any()
    return IngestPolicy(owned_fields=owned_fields, match_by=match_by)
