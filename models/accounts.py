"""Stores (accounts) and their API tokens."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.errors import NotFound, ValidationFailed
from models.tables import ApiToken, Store, utcnow

TOKEN_PREFIX = "lsk_"  # noqa: S105 - a public prefix, not a secret


def hash_token(token: str) -> str:
    # Tokens carry 256 bits of randomness, so a fast unsalted hash is enough to make a leaked
    # table useless and still lets us find a token with one indexed lookup.
    return hashlib.sha256(token.encode()).hexdigest()


def create_store(session: Session, *, name: str, country: str = "US") -> tuple[Store, str]:
    """Create a store and its first API token; returns the token in clear, once."""
    name = name.strip()
    country = country.strip().upper()
    errors: dict[str, list[str]] = {}
    if not name:
        errors["name"] = ["can't be blank"]
    elif len(name) > 200:
        errors["name"] = ["is too long (maximum is 200 characters)"]
    import phonenumbers

    if country not in phonenumbers.SUPPORTED_REGIONS:
        errors["country"] = ["must be an ISO 3166 alpha-2 region code, e.g. US"]
    if errors:
        raise ValidationFailed(errors)
    store = Store(name=name, country=country)
    session.add(store)
    session.flush()
    _, token = create_token(session, store_id=store.id)
    return store, token


def create_token(
    session: Session, *, store_id: int, name: str | None = None
) -> tuple[ApiToken, str]:
    if session.get(Store, store_id) is None:
        raise NotFound("Store")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(store_id=store_id, token_hash=hash_token(token), prefix=token[:12], name=name)
    session.add(row)
    session.flush()
    return row, token


def revoke_token(
    session: Session, *, token: str | None = None, token_id: int | None = None
) -> ApiToken:
    """Revoke by clear token or by id. Revoking twice is harmless."""
    if token is not None:
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    elif token_id is not None:
        row = session.get(ApiToken, token_id)
    else:
        raise ValidationFailed.single("base", "give a token or a token id")
    if row is None:
        raise NotFound("Token")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def authenticate(session: Session, token: str) -> int | None:
    """The store id a live token belongs to, or None."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    row = session.execute(
        select(ApiToken.store_id, ApiToken.revoked_at).where(
            ApiToken.token_hash == hash_token(token)
        )
    ).first()
    if row is None or row.revoked_at is not None:
        return None
    return int(row.store_id)
