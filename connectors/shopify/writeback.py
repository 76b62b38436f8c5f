"""Write the loyalty card URL back into Shopify: a customer metafield via `metafieldsSet`.

`metafieldsSet` is an idempotent *set* (the same value written twice is one value), so a retry
after a timeout is safe. Our own write makes Shopify send a `customers/update` webhook; the
worker maps customers without metafields, so that delivery changes nothing and queues nothing
(no loop).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connectors.errors import FatalError
from connectors.shopify.client import ShopifyClient

METAFIELD_KEY = "card_url"
METAFIELD_TYPE = "url"

METAFIELDS_SET = """
mutation MetafieldsSet($metafields: [MetafieldsSetInput!]!) {
  metafieldsSet(metafields: $metafields) {
    metafields { id namespace key value }
    userErrors { field message code }
  }
}
""".strip()


def customer_gid(external_id: str) -> str:
    """`gid://shopify/Customer/<id>` for a numeric id (a gid is accepted as is)."""
    if external_id.startswith("gid://shopify/Customer/"):
        return external_id
    if not external_id.isdigit():
        raise FatalError(f"not a Shopify customer id: {external_id!r}")
    return f"gid://shopify/Customer/{external_id}"


def set_card_url(
    client: ShopifyClient, *, external_id: str, namespace: str, card_url: str
) -> dict[str, Any]:
    """Set metafield `<namespace>.card_url` (type `url`) of the customer to `card_url`.

    Returns the metafield Shopify reports. `userErrors` (unknown customer, invalid value, ...)
    raise `FatalError` (the request will never succeed as sent); transport, throttling and
    auth failures raise what `ShopifyClient.execute` raises.
    """
    variables = {
        "metafields": [
            {
                "ownerId": customer_gid(external_id),
                "namespace": namespace,
                "key": METAFIELD_KEY,
                "type": METAFIELD_TYPE,
                "value": card_url,
            }
        ]
    }
    data = client.execute(METAFIELDS_SET, variables, cost=10.0)
    result = data.get("metafieldsSet")
    if not isinstance(result, Mapping):
        raise FatalError("shopify metafieldsSet answer has no result")
    errors = result.get("userErrors") or []
    if errors:
        messages = "; ".join(
            f"{'.'.join(str(p) for p in (e.get('field') or []))}: {e.get('message')}"
            if isinstance(e, Mapping)
            else str(e)
            for e in errors
        )
        code = errors[0].get("code") if isinstance(errors[0], Mapping) else None
        raise FatalError(
            f"shopify metafieldsSet refused: {messages[:300]}",
            code=str(code) if code else None,
        )
    metafields = result.get("metafields") or []
    first = metafields[0] if metafields and isinstance(metafields[0], Mapping) else {}
    return dict(first)
