"""Connections: a store's link to a source (Shopify shop, Square merchant, Appy Stamp account,
LOKE organization).

Credentials are stored as a Fernet token (models/crypto.py) of a JSON object —
`{"access_token": ...}` for Shopify and Square, `{"api_key", "api_secret"}` for Appy Stamp,
`{"client_id", "client_secret"}` for LOKE; the key is passed in by the edge and never stored.
Non-secret settings (LOKE's `auth_url`, the card to earn on, ...) live in `config`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.crypto import decrypt, encrypt
from models.errors import ErrorBag, NotFound
from models.tables import Connection, Store, is_valid_id

SOURCES = ("shopify", "square", "appystamp", "loke")
SQUARE_BASE_URL = "https://connect.squareup.com"
APPYSTAMP_BASE_URL = "https://stamp.appydesign.io/rest_api/v1"
LOKE_BASE_URL = "https://api.loke.global"
LOKE_AUTH_URL = "https://auth.loke.global"
# Appy Stamp is a Shopify app: one account per store, so reconnecting replaces its keys.
APPYSTAMP_ACCOUNT = "appystamp"
# The secrets each source needs (all required, stored encrypted).
SECRET_FIELDS = {
    "shopify": ("access_token",),
    "square": ("access_token",),
    "appystamp": ("api_key", "api_secret"),
    "loke": ("client_id", "client_secret"),
}
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


def _account_and_url(
    errors: ErrorBag,
    source: str,
    account: str,
    api_base_url: str | None,
    api_version: str | None,
) -> tuple[str, str | None, str | None]:
    """Validate the source's account and base URL; fill in the source's defaults."""
    if source not in SOURCES:
        errors.add("source", f"must be one of {', '.join(SOURCES)}")
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
        return account, api_base_url, api_version
    if source == "appystamp":
        return account or APPYSTAMP_ACCOUNT, api_base_url or APPYSTAMP_BASE_URL, None
    label = "organization_id" if source == "loke" else "merchant_id"
    if not account:
        errors.add(label, "can't be blank")
    elif len(account) > 255:
        errors.add(label, "is too long (maximum is 255 characters)")
    default = LOKE_BASE_URL if source == "loke" else SQUARE_BASE_URL
    return account, api_base_url or default, None


def _secrets(
    errors: ErrorBag,
    source: str,
    access_token: str | None,
    secrets: Mapping[str, str] | None,
) -> dict[str, str]:
    """The source's required secrets, stripped; blank ones are errors."""
    given = dict(secrets or {})
    if access_token is not None:
        given["access_token"] = access_token
    values: dict[str, str] = {}
    for name in SECRET_FIELDS.get(source, ()):
        value = str(given.get(name) or "").strip()
        if not value:
            errors.add(name, "can't be blank")
        values[name] = value
    return values


def _config(errors: ErrorBag, config: Mapping[str, Any] | None) -> dict[str, Any]:
    extra = dict(config or {})
    auth_url = extra.get("auth_url")
    if auth_url is not None:
        auth_url = str(auth_url).strip().rstrip("/")
        if not _valid_base_url(auth_url):
            errors.add("auth_url", "must be an http(s) URL")
        extra["auth_url"] = auth_url
    return extra


def connect(
    session: Session,
    *,
    store_id: int,
    source: str,
    account: str,
    access_token: str | None = None,
    secrets: Mapping[str, str] | None = None,
    api_base_url: str | None,
    api_version: str | None,
    key: bytes,
    config: Mapping[str, Any] | None = None,
) -> tuple[Connection, bool]:
    """Create the connection, or replace the credentials of the existing one for that account
    (and mark it active again). Returns `(connection, created)`.

    `access_token` (Shopify, Square) or `secrets` (the source's `SECRET_FIELDS`) are stored
    encrypted; `config` entries are merged into the connection's config (e.g. LOKE's
    `auth_url`, Appy Stamp's `card_id`)."""
    if not is_valid_id(store_id) or session.get(Store, store_id) is None:
        raise NotFound("Store")
    errors = ErrorBag()
    account, api_base_url, api_version = _account_and_url(
        errors, source, account.strip(), api_base_url, api_version
    )
    sealed_values = _secrets(errors, source, access_token, secrets)
    extra = _config(errors, config)
    errors.raise_if_any()
    assert api_base_url is not None

    sealed = encrypt(json.dumps(sealed_values), key=key)
    query = select(Connection).where(
        Connection.store_id == store_id, Connection.source == source, Connection.account == account
    )
    row = session.scalar(query)
    created = row is None
    if row is None:
        row = Connection(store_id=store_id, source=source, account=account)
        try:
            with session.begin_nested():
                _apply(row, sealed, api_base_url, api_version, extra)
                session.add(row)
                session.flush()
            return row, True
        except IntegrityError:
            # A concurrent connect of the same account won the insert: update that one instead.
            row = session.scalars(query).one()
            created = False
    _apply(row, sealed, api_base_url, api_version, extra)
    session.flush()
    return row, created


def _apply(
    row: Connection,
    sealed: str,
    api_base_url: str,
    api_version: str | None,
    config: Mapping[str, Any],
) -> None:
    if config:
        row.config = {**(row.config or {}), **config}
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
