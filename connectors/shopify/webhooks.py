"""Shopify signature checks: pure functions over raw bytes, constant-time comparisons.

An empty secret never verifies (an unconfigured endpoint is disabled, not open); a missing
header gives False, never an exception.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence

_PREFIXES = ("x-shopify-", "shopify-")


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Look up a Shopify header under both spellings, case-insensitively.

    `name` may be given as `X-Shopify-Hmac-Sha256`, `shopify-hmac-sha256` or just `Hmac-Sha256`;
    Shopify is moving from the `X-Shopify-*` to the `Shopify-*` spelling, so both are accepted.
    """
    suffix = name.strip().lower()
    for prefix in _PREFIXES:
        if suffix.startswith(prefix):
            suffix = suffix[len(prefix) :]
            break
    wanted = [prefix + suffix for prefix in _PREFIXES]
    # Lower-case keys (ASGI headers, case-insensitive mappings) answer directly; other mappings
    # are scanned.
    for key in wanted:
        found = headers.get(key)
        if found is not None:
            return found
    for key, value in headers.items():
        if key.lower() in wanted:
            return value
    return None


def verify_hmac(raw_body: bytes, header_value: str | None, secrets: Sequence[str]) -> bool:
    """`X-Shopify-Hmac-Sha256` = base64(HMAC-SHA256(app secret, raw body)).

    Any of `secrets` may match, so a secret can be rotated (new and old both configured).
    """
    if not header_value:
        return False
    given = header_value.strip().encode()
    verified = False
    for secret in secrets:
        if not secret:
            continue
        digest = hmac.new(secret.encode(), raw_body, hashlib.sha256).digest()
        # No early return: every configured secret costs the same time.
        verified |= hmac.compare_digest(base64.b64encode(digest), given)
    return verified


def verify_oauth_query_hmac(query_message: str, hex_digest: str, secret: str) -> bool:
    """OAuth callback / app-load `hmac` query parameter: hex HMAC-SHA256 of the sorted query.

    `query_message` is the already-built `k=v&k=v` string of every parameter except `hmac`,
    sorted by key (building it — array parameters included — is the caller's job).
    """
    if not secret or not hex_digest:
        return False
    expected = hmac.new(secret.encode(), query_message.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), hex_digest.strip().lower().encode())
