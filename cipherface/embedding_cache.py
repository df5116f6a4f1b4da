"""The cloud's memory of recently embedded probe images (out of `cipherface.embedding`,
which holds decoding, detection and the models)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from cipherface.embedding import Embedder, Face
from cipherface.embedding_pool import EmbeddingPool

__all__ = ["EmbeddingCache"]


class EmbeddingCache:
    """Remembers the faces of recently seen image bytes (keyed by SHA-256).

    A redelivered probe, or the same photo probed again, costs a search instead
    of a second DeepFace pass; only successes are remembered.
    """

    def __init__(self, embedder: Embedder | EmbeddingPool, size: int = 256) -> None:
        self.embedder = embedder
        self.size = size
        self._faces: OrderedDict[bytes, list[Face]] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop the embedding workers, if the embedder has any."""
        if isinstance(self.embedder, EmbeddingPool):
            self.embedder.close()

    def embed(self, image: bytes, *, name: str | None = None) -> list[Face]:
        """Like `Embedder.embed` for encoded bytes, from the cache when possible."""
        key = hashlib.sha256(image).digest()
        with self._lock:
            if key in self._faces:
                self._faces.move_to_end(key)
                return self._faces[key]
        faces = self.embedder.embed(image, name=name)
        with self._lock:
            self._faces[key] = faces
            while len(self._faces) > self.size:
                self._faces.popitem(last=False)
        return faces
