"""Per-request dependencies: the database session and the authenticated store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import ApiError
from models.accounts import authenticate

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
