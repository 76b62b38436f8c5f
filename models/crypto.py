"""Symmetric encryption of secrets at rest (connection credentials), with Fernet.

Fernet is authenticated encryption (AES-128-CBC + HMAC-SHA256): a token decrypted with the wrong
key, or tampered with, is refused rather than turned into garbage. The key comes from the edge
(see worker/secret_key.py); nothing here reads the environment or the disk.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken

from models.errors import StoreError


class DecryptionFailed(StoreError):
    """A token could not be decrypted: another key encrypted it, or it was altered."""


def derive_key(secret: str) -> bytes:
    """A Fernet key from any secret string: SHA-256 of its UTF-8 bytes, urlsafe base64.

    Every SECRET_KEY goes through this (a Fernet key given as SECRET_KEY is derived from too, not
    used as-is), so changing how a value looks never silently changes which key it means.
    """
    return base64.urlsafe_b64encode(hashlib.sha256(secret.encode("utf-8")).digest())


def encrypt(plaintext: str, *, key: bytes) -> str:
    return Fernet(key).encrypt(plaintext.encode("utf-8")).decode("ascii")


def decrypt(token: str, *, key: bytes) -> str:
    try:
        return Fernet(key).decrypt(token.encode("ascii")).decode("utf-8")
    except (InvalidToken, UnicodeEncodeError) as exc:
        raise DecryptionFailed(
            "cannot decrypt stored credentials: wrong SECRET_KEY (or key file) or corrupted data"
        ) from exc
