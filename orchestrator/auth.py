"""API keys: kept only as SHA-256 digests, checked without timing leaks.

There are two scopes. User keys come from ``server.api_key_sha256`` (digests)
and ``$CONCILIUM_API_KEYS`` (plain, comma-separated, hashed at start); admin
keys from ``server.admin_key_sha256`` and ``$CONCILIUM_ADMIN_KEYS``. An admin
key is also a user key. With no keys at all, the API is open, which suits the
loopback-only default; once any key exists, admin actions need an admin key.
"""

from __future__ import annotations

import hashlib
import hmac
import os

API_KEYS_ENV = "CONCILIUM_API_KEYS"
ADMIN_KEYS_ENV = "CONCILIUM_ADMIN_KEYS"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, digests: list[str]) -> None:
        self.digests = list(digests)

    @classmethod
    def from_config(cls, configured: list[str], env: str = API_KEYS_ENV) -> KeyRing:
        plain = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
        return cls([*configured, *(digest(k) for k in plain)])

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def accepts(self, key: str) -> bool:
        """Compares against every digest, without stopping early, so timing says nothing about which matched."""
        presented = digest(key)
        found = False
        for d in self.digests:
            found |= hmac.compare_digest(presented, d)
        return found
