"""The semantic cache: an answered query serves later queries that mean the same, for the same request shape.

- A query is embedded (``cache.encoder``) and looked up in a FAISS index of this API process
  (``vector_index``), one index per *shape*: the scope (the API key, or everyone with ``cache.scope: shared``)
  and everything in the request but the routed text (router, k, sampling, the rest of the conversation, the
  config and profile versions). A hit can only come from the same shape, so it never crosses API keys.
- The entries live in the store: the answer under ``semcache:e:<answer id>`` (with the cache's TTL), and its
  vector in the shape's log (``Store.append``), which every replica reads from where it left off before it
  looks. A restart, or another replica, rebuilds its index from the log; an entry gone from the store
  (expired, evicted by feedback, cleared) is dropped from the index when a lookup meets it.
- A hit needs a similarity at least the threshold (``cache.threshold``, per category ``cache.thresholds``)
  and the same ``guard_key``: embeddings put "the capital of Spain" as close to "the capital of France" as
  a paraphrase, so the names, numbers and question words must match exactly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass, field

import numpy as np

from orchestrator.api.store import Store
from orchestrator.api.vector_index import VectorIndex
from orchestrator.config import CacheConfig
from routers.embedding import TextEncoder

PREFIX = "semcache:"
NEIGHBOURS = 4
"""Candidates looked at per lookup: the nearest may be gone from the store, or fail the guard."""
QUESTION_WORDS = {"who": "who", "whom": "who", "whose": "who", "when": "when", "where": "where", "why": "why"}
"""Question words that change what is asked; "what", "which" and "how" are left out, as paraphrases swap them."""
_WORDS = re.compile(r'"[^"]+"|[A-Za-z][\w-]*|\d+(?:\.\d+)?')


def guard_key(query: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """What must be equal for two queries to share an answer, whatever their similarity: the names (capitalised
    words after the first, quoted strings), the numbers in their order, and the question words that change the
    question. On the labelled pairs it halves the false hits at a given threshold (docs/benchmarks.md)."""
    names, numbers, asks = set(), [], set()
    for i, word in enumerate(_WORDS.findall(query)):
        lower = word.lower()
        if lower in QUESTION_WORDS:
            asks.add(QUESTION_WORDS[lower])
        if word[0].isdigit():
            numbers.append(word)
        elif word[0] == '"' or (i > 0 and word[0].isupper()):
            names.add(lower)
    return tuple(sorted(names)), tuple(numbers), tuple(sorted(asks))


@dataclass
class Probe:
    """A looked-up query: the shape it belongs to, its vector and guard key, kept to store its answer."""

    shape: str
    vector: np.ndarray
    guard: tuple
    threshold: float


@dataclass
class SemanticHit:
    response: str
    """The cached response's JSON."""
    similarity: float
    of: str
    """The id of the answer it was cached from."""


@dataclass
class _Shape:
    index: VectorIndex
    cursor: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _pack(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype=np.float16).tobytes()).decode()


def _unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float16).astype(np.float32)


class SemanticCache:
    def __init__(self, store: Store, config: CacheConfig, encoder: TextEncoder, ttl_s: float) -> None:
        self.store, self.config, self.encoder, self.ttl_s = store, config, encoder, ttl_s
        self.dim = int(encoder.encode(["dimension"]).shape[1])
        self._shapes: dict[str, _Shape] = {}

    async def lookup(self, shape: str, query: str, category: str | None) -> tuple[Probe, SemanticHit | None]:
        """The probe for ``query``, and the nearest cached answer of its shape that passes, if any."""
        vector = (await asyncio.to_thread(self.encoder.encode, [" ".join(query.split())]))[0]
        probe = Probe(shape, vector, guard_key(query), self.config.threshold_for(category))
        state = await self._synced(shape)
        if state is None:  # its index is being built (a restart, a large log): a miss, not a wait
            return probe, None
        for entry_id, similarity, guard in state.index.search(vector, NEIGHBOURS):
            if similarity < probe.threshold:
                break
            if guard != probe.guard:
                continue
            raw = await self.store.get(f"{PREFIX}e:{entry_id}")
            if raw is None:  # expired, evicted or cleared: gone for every replica
                state.index.drop(entry_id)
                continue
            return probe, SemanticHit(raw, similarity, entry_id)
        return probe, None

    async def _synced(self, shape: str) -> _Shape | None:
        """The shape's index with every entry the store's log holds (one read when nothing is new); None while
        another lookup is reading it in or compacting it, both on a thread: 100,000 entries take tens of
        seconds."""
        state = self._shapes.setdefault(shape, _Shape(VectorIndex(self.dim)))
        if state.lock.locked():
            return None
        async with state.lock:
            if state.index.size > 2 * self.config.max_entries:  # mostly entries the log has trimmed: start over
                state.index, state.cursor = VectorIndex(self.dim), 0
            elif state.index.stale:  # mostly entries gone from the store
                state.index = await asyncio.to_thread(state.index.compacted, state.index.dead)
            last, items = await self.store.read_after(f"{PREFIX}log:{shape}", state.cursor)
            if items:
                entries = [json.loads(value) for _, value in items]
                await asyncio.to_thread(state.index.add_many, [e["id"] for e in entries],
                                        np.stack([_unpack(e["v"]) for e in entries]),
                                        [tuple(tuple(part) for part in e["g"]) for e in entries])
            state.cursor = max(state.cursor, last)
        return state

    async def remember(self, probe: Probe, answer_id: str, response: str) -> None:
        """Store an answer for later paraphrases: its entry first, then its vector in the shape's log."""
        await self.store.set(f"{PREFIX}e:{answer_id}", response, self.ttl_s)
        item = json.dumps({"id": answer_id, "v": _pack(probe.vector), "g": probe.guard})
        await self.store.append(f"{PREFIX}log:{probe.shape}", item, self.config.max_entries, self.ttl_s)

    async def forget(self, answer_id: str) -> None:
        """Evict one answer (feedback said it was wrong): every replica misses it from now on."""
        await self.store.delete(f"{PREFIX}e:{answer_id}")

    async def clear(self) -> int:
        """Every entry and log, for every replica; this replica's indexes at once, the others' at their next
        lookup of each shape (the log began again)."""
        self._shapes.clear()
        return await self.store.delete_prefix(PREFIX)
