"""Per-request dependencies: the database session and the authenticated store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from api.errors import ApiError
from models.accounts import authenticate
from models.tables import OutboxMessage

_bearer = HTTPBearer(auto_error=False, description="API token of the store (`lsk_…`)")


_READ_METHODS = frozenset({"GET", "HEAD"})


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; handlers that write call `commit()` themselves (the edge).

    Reads (GET/HEAD) on PostgreSQL run in autocommit (see api/app.py): each is one statement or
    a few independent ones, and skipping BEGIN/ROLLBACK saves two round trips per request.
    """
    state = request.app.state
    factory = state.read_sessionmaker if request.method in _READ_METHODS else state.sessionmaker
    with factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_OUTBOX_ADDED = "outbox_rows_added"


def on_outbox_commit(factory: sessionmaker[Session], callback: Callable[[], None]) -> None:
    """Call `callback()` after each commit of a `factory` session that added outbox rows (an
    enrolment's card links, a stamp's pass update), so the outbox workers deliver them now
    instead of at their next periodic pass. The callback must not block (e.g. a waker that
    sets a flag for its own thread); a rolled-back transaction calls nothing."""

    @event.listens_for(factory, "after_flush")
    def _added(session: Session, _context: Any) -> None:
        if any(isinstance(obj, OutboxMessage) for obj in session.new):
            session.info[_OUTBOX_ADDED] = True

    @event.listens_for(factory, "after_commit")
    def _committed(session: Session) -> None:
        if session.info.pop(_OUTBOX_ADDED, False):
            callback()

    @event.listens_for(factory, "after_rollback")
    def _rolled_back(session: Session) -> None:
        session.info.pop(_OUTBOX_ADDED, None)


def authenticated_store(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> int:
    """The store id of a valid bearer token; 401 otherwise."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "missing API token", headers={"WWW-Authenticate": "Bearer"})
    store_id = authenticate(session, credentials.credentials.strip())
    if store_id is None:
        raise ApiError(401, "invalid API token", headers={"WWW-Authenticate": "Bearer"})
    return store_id


async def store_scope(
    token_store: Annotated[int, Depends(authenticated_store)],
    account_id: Annotated[int, Path(description="Store (account) id")],
) -> int:
    """A token only ever sees its own store; any other store is simply "not found"."""
    if account_id != token_store:
        raise ApiError(404, "Store not found")
    return token_store


StoreDep = Annotated[int, Depends(store_scope)]


async def wallet_base_url(request: Request) -> str:
    return str(request.app.state.settings.wallet_base_url)


WalletDep = Annotated[str, Depends(wallet_base_url)]
