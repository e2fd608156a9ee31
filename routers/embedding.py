"""Text encoders for routing: all-MiniLM-L6-v2 itself, or a static embedding distilled from it.

- ``Embedder``: MiniLM, a transformer. 20 to 60 ms per never-seen query on 2
  cores, so it keeps an on-disk cache: offline evaluation embeds the same
  thousands of questions in every fold and run. The cache keys each vector by
  the SHA-1 of its text, so a second run costs nothing.
- ``StaticEmbedder``: a model2vec static embedding distilled once from the
  bundled MiniLM (``concilium models pull minilm-static``): a token lookup and a
  weighted mean, about 0.1 ms per query, so cold routing needs no cache.

The model folder is passed in: routers do not know where models are stored.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

import numpy as np

DIM = 384
"""MiniLM's width."""


class TextEncoder(Protocol):
    """What routers embed text with: L2-normalised float32 rows, one per text."""

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray: ...


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


MEMORY_KEEP = 4096
"""Vectors an embedder without a disk cache keeps in memory (a server's: every query is new text, and an unbounded
cache would grow with its traffic); the newest are kept, so a query embedded twice in one request is embedded
once."""


class Embedder:
    def __init__(self, model_path: Path, cache_dir: Path | None = None, batch_size: int = 64) -> None:
        self.model_path = model_path
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self._model = None
        self._cache: dict[str, np.ndarray] = {}
        self._dirty: dict[str, np.ndarray] = {}
        if cache_dir is not None:
            self._read_cache()

    def _read_cache(self) -> None:
        assert self.cache_dir is not None
        for shard in sorted(self.cache_dir.glob("emb-*.npz")):
            with np.load(shard) as data:
                for key, vec in zip(data["keys"], data["vecs"]):
                    self._cache[str(key)] = vec

    def _flush(self) -> None:
        if self.cache_dir is None or not self._dirty:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self._dirty))
        vecs = np.stack(list(self._dirty.values()))
        name = hashlib.sha1("".join(keys.tolist()).encode()).hexdigest()[:16]
        # Written aside and renamed into place: another process reading the cache never sees half a shard.
        staging = self.cache_dir / f".emb-{name}.{os.getpid()}.partial"
        with staging.open("wb") as fh:
            np.savez(fh, keys=keys, vecs=vecs)
        os.replace(staging, self.cache_dir / f"emb-{name}.npz")
        self._dirty.clear()

    @property
    def model(self):  # noqa: ANN201
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.model_path), device="cpu")
        return self._model

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text."""
        keys = [_key(t) for t in texts]
        missing = {k: t for k, t in zip(keys, texts) if k not in self._cache}
        if missing:
            vecs = self.model.encode(
                list(missing.values()),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=progress,
            ).astype(np.float32)
            for k, v in zip(missing, vecs):
                self._cache[k] = v
                if self.cache_dir is not None:
                    self._dirty[k] = v
            self._flush()
        if self.cache_dir is None and len(self._cache) > MEMORY_KEEP:  # a server's: the newest texts only
            for k in list(self._cache)[:len(self._cache) - MEMORY_KEEP]:
                del self._cache[k]
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        return np.stack([self._cache[k] for k in keys])


class StaticEmbedder:
    """A model2vec static embedding: no forward pass, so every query is cheap to embed, cached or not."""

    def __init__(self, model_path: Path) -> None:
        from model2vec import StaticModel

        self.model_path = model_path
        self.model = StaticModel.from_pretrained(str(model_path))

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.model.dim), dtype=np.float32)
        vecs = np.asarray(self.model.encode(texts, show_progress_bar=progress), dtype=np.float32)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.where(norms > 0, norms, 1.0)
