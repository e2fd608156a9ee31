"""The text encoder routers use, by name: the static embedding from the model store, or MiniLM itself.

A profile records the encoder it was built with, because its vectors (k-means
centroids, kNN neighbours, skill vectors) live in that encoder's space: a
service loads the profile's encoder, not its own choice.
"""

from __future__ import annotations

from pathlib import Path

from routers.base import RoutingError
from routers.embedding import Embedder, StaticEmbedder, TextEncoder
from routers.vocabulary import Encoder
from workers.model_store import STATIC_EMBEDDER, ModelStore, embedder_path


def encoder(kind: str, store_root: Path, cache: Path | None = None) -> TextEncoder:
    """``cache``: where MiniLM keeps its vectors (offline runs embed the same questions again and again)."""
    if kind == Encoder.STATIC:
        return StaticEmbedder(ModelStore(store_root).resolve(STATIC_EMBEDDER))
    if kind == Encoder.MINILM:
        return Embedder(embedder_path(), cache)
    raise RoutingError(f"unknown encoder {kind!r}; choose one of {', '.join(Encoder)}")
