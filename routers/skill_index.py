"""The FAISS skill index: map a query's keywords onto the nearest profile skills.

Normalised MiniLM vectors searched by inner product, which is cosine similarity.
Up to ``FLAT_LIMIT`` skills an exact flat index answers a whole scheduling
window in one call, in well under a millisecond per query. Beyond that, HNSW
keeps search sub-linear at a small recall cost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from routers.profiles import ProfileError, read_artifact

INDEX_VERSION = 1
FLAT_LIMIT = 50_000


@dataclass
class Mapping:
    """For each keyword of one query: the matched profile skills and their similarities."""

    keywords: list[str]
    skill_ids: np.ndarray
    """[keywords, m]; -1 where fewer than m skills exist."""
    sims: np.ndarray
    """[keywords, m]."""


class SkillIndex:
    def __init__(self, skills: list[str], vectors: np.ndarray) -> None:
        if len(skills) != len(vectors):
            raise ValueError(f"{len(skills)} skills but {len(vectors)} vectors")
        self.skills = skills
        dim = vectors.shape[1]
        if len(skills) <= FLAT_LIMIT:
            self.index = faiss.IndexFlatIP(dim)
        else:
            self.index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = 64
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    @property
    def kind(self) -> str:
        return "flat" if isinstance(self.index, faiss.IndexFlatIP) else "hnsw"

    def search(self, vectors: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each [n, m], for a batch of normalised vectors."""
        if len(vectors) == 0:
            return np.zeros((0, m), np.float32), np.zeros((0, m), np.int64)
        return self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), m)

    def map_window(self, keywords: list[list[str]], keyword_vecs: np.ndarray, m: int) -> list[Mapping]:
        """One FAISS search for every keyword of every query in a window."""
        sims, ids = self.search(keyword_vecs, m)
        out, start = [], 0
        for kws in keywords:
            end = start + len(kws)
            out.append(Mapping(kws, ids[start:end], sims[start:end]))
            start = end
        return out

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "skills.faiss"))
        (folder / "skill_index.json").write_text(
            json.dumps({"version": INDEX_VERSION, "kind": self.kind, "skills": self.skills})
        )

    @classmethod
    def load(cls, folder: Path) -> SkillIndex:
        meta_path = folder / "skill_index.json"
        meta = read_artifact(meta_path, lambda p: json.loads(p.read_text()))
        if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION or "skills" not in meta:
            raise ProfileError(f"{meta_path}: not a skill index of version {INDEX_VERSION}")
        obj = cls.__new__(cls)
        obj.skills = meta["skills"]
        obj.index = read_artifact(folder / "skills.faiss", lambda p: faiss.read_index(str(p)))
        if obj.index.ntotal != len(obj.skills):
            raise ProfileError(f"{folder / 'skills.faiss'} holds {obj.index.ntotal} vectors for "
                               f"{len(obj.skills)} skills: rebuild with `concilium profile`")
        return obj
