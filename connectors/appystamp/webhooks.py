"""Appy Stamp webhooks: none are used, and why.

The seed (003, the Customers REST API) documents no webhooks: no event types, no delivery
format and no signature scheme. Without a documented signature there is nothing an intake
endpoint could verify, and accepting unsigned calls would let anyone write customers. Appy
Stamp is therefore kept in step by polling only: `sync run --source appystamp` (scheduled like
the other sources) reads every customer and skips the unchanged ones by content hash.

`WEBHOOKS_SUPPORTED` is what the rest of the code may check before offering a webhook route.
"""

from __future__ import annotations

WEBHOOKS_SUPPORTED = False
