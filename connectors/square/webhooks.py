"""Square webhook signature: base64(HMAC-SHA256(signature key, notification URL + raw body)).

Pure functions over raw bytes. Verify before parsing JSON (a re-serialised body never matches),
with the notification URL exactly as configured in the subscription (never rebuilt from the
incoming request behind a proxy). An empty key or URL means the endpoint is disabled: nothing
verifies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping

SIGNATURE_HEADER = "x-square-hmacsha256-signature"


def signature_header(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> str | None:
    """The `x-square-hmacsha256-signature` value, looked up case-insensitively (or None)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in items:
        if name.lower() == SIGNATURE_HEADER:
            return value
    return None


def compute_signature(raw_body: bytes, *, signature_key: str, notification_url: str) -> str:
    """The header value Square would send for this body."""
    mac = hmac.new(
        signature_key.encode("utf-8"), notification_url.encode("utf-8") + raw_body, hashlib.sha256
    )
    return base64.b64encode(mac.digest()).decode("ascii")


def verify_signature(
    raw_body: bytes,
    header_value: str | None,
    *,
    signature_key: str,
    notification_url: str,
) -> bool:
    """True only when `header_value` is Square's signature of `raw_body` for this subscription."""
    if not signature_key or not notification_url or not header_value or not raw_body:
        return False
    expected = compute_signature(
        raw_body, signature_key=signature_key, notification_url=notification_url
    )
    return hmac.compare_digest(expected.encode("ascii"), header_value.strip().encode("utf-8"))
