"""API keys: kept only as SHA-256 digests, checked without timing leaks.

Keys come from the config (as digests) and from ``$CONCILIUM_API_KEYS``
(plain, comma-separated, hashed at start). With no keys at all, the API is
open, which suits the loopback-only default.
"""

from __future__ import annotations

import hashlib
import hmac
import os

API_KEYS_ENV = "CONCILIUM_API_KEYS"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, digests: list[str]) -> None:
        self.digests = list(digests)

    @classmethod
    def from_config(cls, configured: list[str]) -> KeyRing:
        plain = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
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
