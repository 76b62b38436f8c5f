"""Write the loyalty card URL back into Square: a customer custom attribute.

1. Once per seller, the definition: `POST /v2/customers/custom-attribute-definitions` with
   `visibility: VISIBILITY_READ_ONLY` (the seller and other apps can read the link, only we
   write it). Square's custom-attribute schemas have no URL type among the documented simple
   types, so the value is a `squareup.common.String` (a documented choice). An answer saying
   the key already exists (409 CONFLICT, or 400 mentioning it) means "done".
2. Per customer: `POST /v2/customers/{id}/custom-attributes/{key}` with an `idempotency_key`,
   so a retry after a timeout never writes twice.

Square then sends `customer.custom_attribute.owned.updated` to us; the inbox does not handle
that type (it is stored `ignored`), so our own write can't loop.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import quote

from connectors.errors import FatalError
from connectors.square.client import SquareClient

DEFINITIONS_PATH = "/v2/customers/custom-attribute-definitions"
STRING_SCHEMA = (
    "https://developer-production-s.squarecdn.com/schemas/v1/common.json#squareup.common.String"
)
VISIBILITY = "VISIBILITY_READ_ONLY"
MAX_IDEMPOTENCY_KEY = 45  # Square's limit on `idempotency_key` for this endpoint


def _bounded(idempotency_key: str) -> str:
    """The key as given when it fits Square's limit, else a digest of it (never a truncation,
    which could make two different deliveries share a key)."""
    if len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        return idempotency_key
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:MAX_IDEMPOTENCY_KEY]


def ensure_definition(
    client: SquareClient,
    *,
    key: str,
    name: str = "Loyalty card",
    description: str = "Link to the customer's loyalty stamp card (wallet pass).",
) -> bool:
    """Create the definition of `key` unless it exists. True when this call created it."""
    body = {
        "custom_attribute_definition": {
            "key": key,
            "name": name,
            "description": description,
            "schema": {"$ref": STRING_SCHEMA},
            "visibility": VISIBILITY,
        }
    }
    try:
        client.request("POST", DEFINITIONS_PATH, json=body)
    except FatalError as exc:
        if exc.status == 409 or (exc.status == 400 and exc.code in ("CONFLICT", "ALREADY_EXISTS")):
            return False
        raise
    return True


def upsert_card_url(
    client: SquareClient,
    *,
    customer_id: str,
    key: str,
    card_url: str,
    idempotency_key: str,
) -> dict[str, Any]:
    """Set the customer's custom attribute `key` to `card_url`; returns the attribute.

    `idempotency_key` should name the delivery (e.g. the outbox row and customer): the same key
    sent again is answered with the first result instead of a second write.
    """
    if not customer_id:
        raise FatalError("square customer id is empty")
    path = f"/v2/customers/{quote(customer_id, safe='')}/custom-attributes/{quote(key, safe='')}"
    body = {
        "custom_attribute": {"value": card_url},
        "idempotency_key": _bounded(idempotency_key),
    }
    data = client.request("POST", path, json=body)
    attribute = data.get("custom_attribute")
    return dict(attribute) if isinstance(attribute, dict) else {}
