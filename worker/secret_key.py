"""Where the key that encrypts credentials at rest comes from (an edge concern).

`SECRET_KEY` when set: any string, turned into a Fernet key with SHA-256 (models.crypto.derive_key).
Otherwise the embedded default: a Fernet key generated once into `./var/secret.key` (mode 0600)
and reused by every later command. Losing that file (or changing SECRET_KEY) makes stored
credentials unreadable: connect the sources again.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.fernet import Fernet

from models.crypto import derive_key
from worker.settings import Settings

KEY_FILE_NAME = "secret.key"


class SecretKeyError(Exception):
    """The key file exists but is not a usable Fernet key."""


def resolve_secret_key(settings: Settings, *, var_dir: Path = Path("var")) -> bytes:
    if settings.secret_key:
        return derive_key(settings.secret_key)
    path = var_dir / KEY_FILE_NAME
    if not path.exists():
        var_dir.mkdir(parents=True, exist_ok=True)
        key = Fernet.generate_key()
        # Written whole to a private temporary file, then published with link(), which is
        # atomic and fails if the name exists: two commands starting at once cannot both
        # write a key, and neither can ever read a half-written one.
        fd, tmp = tempfile.mkstemp(dir=var_dir, prefix=".secret-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(key + b"\n")
            os.chmod(tmp, 0o600)
            os.link(tmp, path)
        except FileExistsError:
            pass  # another command published its key first: use that one
        else:
            return key
        finally:
            os.unlink(tmp)
    key = path.read_bytes().strip()
    try:
        Fernet(key)
    except ValueError as exc:
        raise SecretKeyError(
            f"{path} does not hold a valid key; set SECRET_KEY or restore it"
        ) from exc
    return key
