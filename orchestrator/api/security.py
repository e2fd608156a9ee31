"""API keys and the per-key rate limit: the two FastAPI dependencies every endpoint declares.

Keys are kept only as SHA-256 digests and checked without timing leaks. There
are two scopes. User keys come from ``server.api_key_sha256`` (digests) and
``$CONCILIUM_API_KEYS`` (plain, comma-separated, hashed at start); admin keys
from ``server.admin_key_sha256`` and ``$CONCILIUM_ADMIN_KEYS``. An admin key is
also a user key. With no keys at all, the API is open, which suits the
loopback-only default; once any key exists, admin actions need an admin key.

Each dependency returns the ``Caller``: the key's id (never the key) names the owner of what the caller
creates and the account its usage is counted in. Without keys, every caller is the one ``anonymous`` tenant,
who may read everything, as before tenants existed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time

from fastapi import Request

from orchestrator import env
from orchestrator.api.errors import ServiceError
from orchestrator.api.store import StoreUnavailable
from orchestrator.config import KEY_ID_CHARS, ServerConfig


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str) -> str:
    """The id that records and usage name a key by: a prefix of its digest, which cannot be turned back into it."""
    return digest(key)[:KEY_ID_CHARS]


@dataclasses.dataclass(frozen=True)
class Caller:
    key_id: str
    admin: bool

    def owns(self, owner: str | None) -> bool:
        """Whether this caller may read a record created by ``owner`` (an admin may read every record)."""
        return self.admin or owner == self.key_id


ANONYMOUS = Caller("anonymous", admin=True)
"""Every caller when no keys are configured: one tenant, who may read everything and do admin actions."""


class KeyRing:
    def __init__(self, digests: list[str]) -> None:
        self.digests = list(digests)

    @classmethod
    def from_config(cls, configured: list[str], env_name: str = env.API_KEYS) -> KeyRing:
        return cls([*configured, *(digest(k) for k in env.plain_keys(env_name))])

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


def presented_key(request: Request) -> str:
    """The key a request carries: ``Authorization: Bearer KEY`` or ``x-api-key``."""
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key") or ""


class Security:
    """The ``guard`` (any valid key, then the rate limit) and ``admin`` (an admin key) dependencies."""

    def __init__(self, server: ServerConfig) -> None:
        self.keys = KeyRing.from_config(server.api_key_sha256)
        self.admin_keys = KeyRing.from_config(server.admin_key_sha256, env.ADMIN_KEYS)
        self.secured = self.keys.enabled or self.admin_keys.enabled
        self.rate_limit = server.rate_limit_per_minute

    async def guard(self, request: Request) -> Caller:
        """API key (when keys are configured) and the per-key rate limit, shared through the store."""
        presented = presented_key(request)
        caller = ANONYMOUS
        if self.secured:
            if not presented:
                raise ServiceError("an API key is required (Authorization: Bearer KEY)", 401, "unauthorized")
            admin = self.admin_keys.accepts(presented)
            if not (self.keys.accepts(presented) | admin):
                raise ServiceError("the API key is not valid", 403, "forbidden")
            caller = Caller(key_id(presented), admin)
        if self.rate_limit is not None:
            who = key_id(presented) if presented else (request.client.host if request.client else "-")
            await self._count(request, who)
        return caller

    async def _count(self, request: Request, who: str) -> None:
        svc = request.app.state.service
        window = int(time.time() // 60)
        try:
            count = await svc.store.incr(f"rate:{who}:{window}", ttl_s=60)
        except StoreUnavailable:  # fail open: a store outage must not take the API down
            svc.metrics.store_errors.labels("rate_limit").inc()
            return
        if count > self.rate_limit:
            retry = str(60 - int(time.time()) % 60)
            raise ServiceError(f"more than {self.rate_limit} requests this minute; retry in {retry} s", 429,
                               "rate_limited", {"Retry-After": retry})

    async def admin(self, request: Request) -> Caller:
        """The admin scope, on top of ``guard``: reloading the config, and /metrics on the API's port."""
        caller = await self.guard(request)
        if not caller.admin:
            raise needs_admin()
        return caller


def needs_admin() -> ServiceError:
    return ServiceError(f"this action needs an admin key (server.admin_key_sha256 or ${env.ADMIN_KEYS})",
                        403, "forbidden")
