"""One API process's nearest-neighbour index over cached queries: FAISS HNSW on unit vectors (cosine).

HNSW, not a flat index: a lookup among 100,000 entries stays well under a millisecond, where an exact scan of
them takes several. HNSW cannot remove a vector, so an entry that is gone (expired, evicted, cleared) is
dropped here as a tombstone and skipped; once tombstones are half of the index, ``stale`` says so, and the
owner builds a ``compacted`` copy from the vectors it holds (on a thread: it takes seconds for a large index).
The entries themselves live in the store (``semantic_cache``): this index only says where to look.
"""

from __future__ import annotations

import faiss
import numpy as np

HNSW_LINKS = 32
"""Neighbours per node: FAISS's usual choice for vectors of a few hundred dimensions."""
SEARCH_DEPTH = 64
"""``efSearch``: candidates kept while searching; higher finds more true neighbours, more slowly."""
REBUILD_BELOW = 0.5
"""Rebuild once fewer than this share of the vectors are alive."""
SEARCH_THREADS = 1
"""OpenMP threads for a search: one query gains nothing from more, and FAISS's idle OpenMP threads spin for a
while after each parallel search, taking the cores from the query encoder that runs next. Building uses them
all (``BUILD_THREADS``); the setting is the process's, so a search and a build at once only slow each other."""
BUILD_THREADS = faiss.omp_get_max_threads()


class VectorIndex:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._index = self._new()
        self._ids: list[str] = []
        """The entry id of each vector, by FAISS's position."""
        self._tags: list[object] = []
        """What the caller keeps with each vector (the query's guard key)."""
        self._position: dict[str, int] = {}
        self._dead: set[int] = set()

    def _new(self) -> faiss.Index:
        index = faiss.IndexHNSWFlat(self.dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = SEARCH_DEPTH
        return index

    def __len__(self) -> int:
        return len(self._ids) - len(self._dead)

    @property
    def size(self) -> int:
        """Vectors held, the dead included: what the index costs in memory."""
        return len(self._ids)

    def add_many(self, entry_ids: list[str], vectors: np.ndarray, tags: list[object]) -> None:
        """Many at once: FAISS builds the graph for a batch faster than one vector at a time."""
        if entry_ids:
            faiss.omp_set_num_threads(BUILD_THREADS)
            self._index.add(np.asarray(vectors, dtype=np.float32).reshape(len(entry_ids), self.dim))
            self._position.update((e, len(self._ids) + i) for i, e in enumerate(entry_ids))
            self._ids.extend(entry_ids)
            self._tags.extend(tags)

    def search(self, vector: np.ndarray, k: int = 4) -> list[tuple[str, float, object]]:
        """The ``k`` nearest live entries: (id, cosine similarity, tag), most similar first."""
        if not self._ids:
            return []
        want = min(len(self._ids), k + len(self._dead))
        faiss.omp_set_num_threads(SEARCH_THREADS)
        sims, positions = self._index.search(np.asarray(vector, dtype=np.float32).reshape(1, self.dim), want)
        found = [(self._ids[p], float(s), self._tags[p]) for s, p in zip(sims[0], positions[0])
                 if p >= 0 and p not in self._dead]
        return found[:k]

    def drop(self, entry_id: str) -> None:
        """Forget an entry that is gone from the store."""
        if entry_id in self._position:
            self._dead.add(self._position[entry_id])

    @property
    def stale(self) -> bool:
        """The dead outnumber the living: time for a ``compacted`` copy."""
        return bool(self._ids) and len(self) < REBUILD_BELOW * len(self._ids)

    def compacted(self, dead: frozenset[int]) -> VectorIndex:
        """A new index of the entries alive but ``dead`` (a snapshot of the tombstones: drops may go on meanwhile,
        and one made after the snapshot is met, and made again, at a later lookup)."""
        keep = [i for i in range(len(self._ids)) if i not in dead]
        fresh = VectorIndex(self.dim)
        if keep:
            vectors = self._index.reconstruct_n(0, len(self._ids))[keep]
            fresh.add_many([self._ids[i] for i in keep], vectors, [self._tags[i] for i in keep])
        return fresh

    @property
    def dead(self) -> frozenset[int]:
        return frozenset(self._dead)
