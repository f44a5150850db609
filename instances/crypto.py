"""Encryption of credential secrets at rest (MultiFernet; DESIGN.md §1, §8).

The first key of TOOLEXEC_ENCRYPTION_KEYS encrypts, all of them decrypt. The sealed
plaintext names the row (a credential, or a job holding its inputs) and its owner, so a
ciphertext copied onto another row does not open there.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.utils.crypto import salted_hmac


class SecretUnreadable(Exception):
    """The ciphertext does not open with our keys, or belongs to another row."""


@cache
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(key.encode()) for key in keys])


def fernet() -> MultiFernet:
    return _fernet(tuple(settings.TOOLEXEC_ENCRYPTION_KEYS))


def seal(secret: Any, *, row_id: str, owner_id: int) -> str:
    plaintext = json.dumps({"credential": str(row_id), "owner": owner_id, "secret": secret}, separators=(",", ":"))
    return fernet().encrypt(plaintext.encode()).decode()


def unseal(token: str, *, row_id: str, owner_id: int) -> Any:
    try:
        payload = json.loads(fernet().decrypt(token.encode()))
    except (InvalidToken, ValueError):
        raise SecretUnreadable("The secret does not decrypt with the configured keys.") from None
    if payload.get("credential") != str(row_id) or payload.get("owner") != owner_id:
        raise SecretUnreadable("The secret belongs to another row.")
    return payload["secret"]


def reseal(token: str) -> str:
    """Re-encrypt with the first key (key rotation); the bound plaintext is unchanged."""
    return fernet().rotate(token.encode()).decode()


def fingerprint(secret: dict[str, Any]) -> str:
    """A short keyed hash that tells two secrets apart and reveals nothing of either."""
    canonical = json.dumps(secret, sort_keys=True, separators=(",", ":"))
    return salted_hmac("toolexec.credential-fingerprint", canonical, algorithm="sha256").hexdigest()[:12]
