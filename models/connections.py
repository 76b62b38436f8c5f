"""Connections: a store's link to a source (Shopify shop, Square merchant).

Credentials are stored as a Fernet token (models/crypto.py) of `{"access_token": ...}`; the key
is passed in by the edge and never stored.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.crypto import decrypt, encrypt
from models.errors import ErrorBag, NotFound
from models.tables import Connection, Store, is_valid_id

SOURCES = ("shopify", "square")
SQUARE_BASE_URL = "https://connect.squareup.com"
SHOPIFY_DOMAIN = re.compile(r"^[a-z0-9][a-z0-9-]*\.myshopify\.com$")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _is_hostname(value: str) -> bool:
    if not value or len(value) > 253:
        return False
    return all(_LABEL.match(label) for label in value.split("."))


def _valid_base_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def connect(
    session: Session,
    *,
    store_id: int,
    source: str,
    account: str,
    access_token: str,
    api_base_url: str | None,
    api_version: str | None,
    key: bytes,
) -> tuple[Connection, bool]:
    """Create the connection, or replace the credentials of the existing one for that account
    (and mark it active again). Returns `(connection, created)`."""
    if not is_valid_id(store_id) or session.get(Store, store_id) is None:
        raise NotFound("Store")
    errors = ErrorBag()
    if source not in SOURCES:
        errors.add("source", f"must be one of {', '.join(SOURCES)}")
    account = account.strip()
    if api_base_url is not None:
        api_base_url = api_base_url.strip().rstrip("/")
        if not _valid_base_url(api_base_url):
            errors.add("api_base_url", "must be an http(s) URL")
    if source == "shopify":
        account = account.lower()
        if api_base_url is None:
            if not SHOPIFY_DOMAIN.match(account):
                errors.add("shop_domain", "must look like your-shop.myshopify.com")
            api_base_url = f"https://{account}"
        elif not _is_hostname(account):
            errors.add("shop_domain", "must be a hostname")
    elif source == "square":
        if not account:
            errors.add("merchant_id", "can't be blank")
        elif len(account) > 255:
            errors.add("merchant_id", "is too long (maximum is 255 characters)")
        api_base_url = api_base_url or SQUARE_BASE_URL
        api_version = None
    if not access_token.strip():
        errors.add("access_token", "can't be blank")
    errors.raise_if_any()
    assert api_base_url is not None

    sealed = encrypt(json.dumps({"access_token": access_token.strip()}), key=key)
    query = select(Connection).where(
        Connection.store_id == store_id, Connection.source == source, Connection.account == account
    )
    row = session.scalar(query)
    created = row is None
    if row is None:
        row = Connection(store_id=store_id, source=source, account=account)
        try:
            with session.begin_nested():
                _apply(row, sealed, api_base_url, api_version)
                session.add(row)
                session.flush()
            return row, True
        except IntegrityError:
            # A concurrent connect of the same account won the insert: update that one instead.
            row = session.scalars(query).one()
            created = False
    _apply(row, sealed, api_base_url, api_version)
    session.flush()
    return row, created


def _apply(row: Connection, sealed: str, api_base_url: str, api_version: str | None) -> None:
    row.credentials = sealed
    row.api_base_url = api_base_url
    row.api_version = api_version
    row.status = "active"
    row.last_error = None


def credentials(connection: Connection, *, key: bytes) -> dict[str, str]:
    """The decrypted credentials; DecryptionFailed on a wrong key."""
    data = json.loads(decrypt(connection.credentials, key=key))
    return {str(k): str(v) for k, v in data.items()}


def list_connections(session: Session, *, store_id: int | None = None) -> list[Connection]:
    query = select(Connection).order_by(Connection.id)
    if store_id is not None:
        if not is_valid_id(store_id) or session.get(Store, store_id) is None:
            raise NotFound("Store")
        query = query.where(Connection.store_id == store_id)
    return list(session.scalars(query))


def render_connection(connection: Connection) -> dict[str, object]:
    """The public view of a connection: never the credentials."""
    return {
        "id": connection.id,
        "store_id": connection.store_id,
        "source": connection.source,
        "account": connection.account,
        "api_base_url": connection.api_base_url,
        "api_version": connection.api_version,
        "status": connection.status,
        "enabled": connection.enabled,
    }
