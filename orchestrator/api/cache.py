"""The response cache: the exact cache (the same normalised request, per API key) first, then the semantic cache
(``semantic_cache``: a paraphrase of an answered query, per scope). Only deterministic requests are cached:
greedy decoding, no self-moa sampling, no tools. Every store call here degrades (a store that is down turns
the cache off) rather than failing the request; ``guarded`` is the service's way of making that call.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.api.answers import new_answer_id
from orchestrator.api.metrics import Metrics
from orchestrator.api.schemas import CacheInfo, QueryBody, QueryResponse
from orchestrator.api.security import Caller
from orchestrator.api.semantic_cache import PREFIX, Probe, SemanticCache
from orchestrator.api.store import Store
from orchestrator.config import ConciliumConfig
from orchestrator.embedders import encoder
from orchestrator.engine.requests import QueryRequest
from routers.vocabulary import Aggregation
from workers.types import Message

EXACT = "cache:"
Guarded = Callable[[str, Awaitable[Any]], Awaitable[Any]]
"""(use, store call) → its result, or None while the store is down."""


@dataclass
class Lookup:
    """What a lookup found, and what its answer is stored under if it found nothing."""

    exact_key: str | None = None
    probe: Probe | None = None
    hit: QueryResponse | None = None


def _sha(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class ResponseCache:
    def __init__(self, store: Store, config: ConciliumConfig, metrics: Metrics, guarded: Guarded) -> None:
        self.store, self.metrics, self.guarded = store, metrics, guarded
        self.semantic: SemanticCache | None = None
        self.configure(config)

    def configure(self, config: ConciliumConfig) -> None:
        """At start and on reload: a changed semantic section starts its indexes again from the store."""
        old = getattr(self, "config", None)
        self.config = config
        if not config.cache.semantic or config.server.cache_ttl_s <= 0:
            self.semantic = None
        elif self.semantic is None or old is None or (old.cache, old.server.cache_ttl_s) != (
                config.cache, config.server.cache_ttl_s):
            embed = encoder(config.cache.encoder, config.store_root)
            self.semantic = SemanticCache(self.store, config.cache, embed, config.server.cache_ttl_s)

    def cacheable(self, request: QueryRequest) -> bool:
        """Not a conversation with tools: its key holds the turns' text, not their calls."""
        if self.config.server.cache_ttl_s <= 0 or request.aggregation == Aggregation.SELF_MOA or request.tools:
            return False
        if any(m.is_tool_turn for m in request.messages):
            return False
        if request.temperature is not None:
            return request.temperature == 0
        return all(e.generation.temperature == 0 for e in self.config.experts)

    @staticmethod
    def _shape_data(body: QueryBody, messages: tuple[Message, ...], versions: list[object]) -> dict:
        data = body.model_dump(mode="json", by_alias=True, exclude={"stream", "query"})
        data["messages"] = [[m.role, m.content] for m in messages]
        data["versions"] = versions
        return data

    def exact_key(self, body: QueryBody, messages: tuple[Message, ...], caller: Caller, versions: list[object]) -> str:
        """Per key: a cached answer is a record its first caller owns, and one tenant's hits are not another's."""
        data = self._shape_data(body, messages, versions)
        data.update(owner=caller.key_id, query=" ".join(body.query.split()))
        return EXACT + _sha(data)

    def shape(self, body: QueryBody, messages: tuple[Message, ...], caller: Caller, versions: list[object]) -> str:
        """Everything a semantic hit must share with the query: the request but its routed text (a chat's last
        user turn), and the scope."""
        data = self._shape_data(body, messages, versions)
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
        if last_user is not None:
            data["messages"][last_user] = ["user", ""]
        data["scope"] = caller.key_id if self.config.cache.scope == "tenant" else "shared"
        return _sha(data)

    async def lookup(self, body: QueryBody, messages: tuple[Message, ...], request: QueryRequest, caller: Caller,
                     versions: list[object]) -> Lookup:
        if not self.cacheable(request):
            return Lookup()
        started = time.perf_counter()
        key = self.exact_key(body, messages, caller, versions)
        raw = await self.guarded("cache", self.store.get(key))
        self.metrics.cache.labels("hit" if raw else "miss").inc()
        self.metrics.cache_lookup.labels("exact").observe(time.perf_counter() - started)
        if raw:
            hit = QueryResponse.model_validate_json(raw)
            return Lookup(key, None, hit.model_copy(update={"cached": True, "cache": CacheInfo(hit="exact",
                                                                                              of=hit.id)}))
        if self.semantic is None:
            return Lookup(key)
        started = time.perf_counter()
        found = await self.guarded("cache", self.semantic.lookup(self.shape(body, messages, caller, versions),
                                                                 body.query, body.category))
        self.metrics.cache_lookup.labels("semantic").observe(time.perf_counter() - started)
        if found is None:  # the store is down
            return Lookup(key)
        probe, semantic = found
        self.metrics.semantic.labels("hit" if semantic else "miss").inc()
        if semantic is None:
            return Lookup(key, probe)
        self.metrics.similarity.observe(semantic.similarity)
        info = CacheInfo(hit="semantic", of=semantic.of, similarity=round(semantic.similarity, 4))
        hit = QueryResponse.model_validate_json(semantic.response)
        return Lookup(key, probe, hit.model_copy(update={"id": new_answer_id(), "cached": True, "cache": info}))

    async def remember(self, lookup: Lookup, response: QueryResponse) -> None:
        if lookup.exact_key is not None:
            ttl = self.config.server.cache_ttl_s
            await self.guarded("cache", self.store.set(lookup.exact_key, response.model_dump_json(), ttl))
        if lookup.probe is not None and self.semantic is not None:
            await self.guarded("cache", self.semantic.remember(lookup.probe, response.id, response.model_dump_json()))

    async def forget(self, answer_id: str, exact_key: str | None) -> None:
        """Evict an answer feedback marked wrong, from both caches."""
        if exact_key is not None:
            await self.guarded("cache", self.store.delete(exact_key))
        if self.semantic is not None:
            await self.guarded("cache", self.semantic.forget(answer_id))

    async def clear(self) -> int:
        """Both caches, for every replica (``POST /v1/admin/cache/clear``)."""
        cleared = await self.store.delete_prefix(EXACT)
        if self.semantic is not None:
            return cleared + await self.semantic.clear()
        return cleared + await self.store.delete_prefix(PREFIX)  # entries an earlier config left
