"""LOKE webhooks: none.

The LOKE API this connector is built from (seed 004, a beta API) documents three read
endpoints — get a customer, list customers, list a customer's memberships — and no webhook
subscription, event payload or signature scheme. There is therefore nothing to verify and no
intake route: LOKE customers arrive through scheduled/manual sync runs only (see
`connectors.loke.paginate`), which is also how every change is picked up (content hashes make
re-reading unchanged customers cost reads only).

Should LOKE publish signed webhooks, their signature check belongs here as a pure function over
the raw body (like `connectors.square.webhooks`), with an empty secret meaning "disabled".
"""

from __future__ import annotations

WEBHOOKS_SUPPORTED = False
"""LOKE offers no webhooks (see the module doc)."""
