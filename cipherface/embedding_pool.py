"""Embedding in worker processes: a replica's DeepFace work on every core, a native
crash contained.

DeepFace's detectors and models are process-wide and not thread-safe, so one process
embeds one image at a time (`cipherface.embedding`): a 2-core replica used one core
for its most expensive stage. `EmbeddingPool` runs an `Embedder` in each of
``workers`` spawned processes (spawned, not forked: the replica holds TenSEAL objects
and threads), so concurrent probes embed in parallel. A worker that dies inside
native code (OpenCV, dlib or TensorFlow on a hostile image) takes down only itself:
the probe gets `EmbeddingCrashedError` (an error event, not a dead replica) and the
pool is rebuilt for the next one.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures.process import BrokenProcessPool

from cipherface.config import Settings
from cipherface.embedding import Embedder, Face
from cipherface.exceptions import EmbeddingCrashedError
from cipherface.spawned import SpawnedPool

__all__ = ["EmbeddingPool", "probe_embedder"]

log = logging.getLogger(__name__)

#: The worker's own embedder: built once per process by `_start`, used by `_embed`.
_embedder: Embedder | None = None


def _start(model: str, detector: str, max_side: int, upsample: int | None) -> None:
    global _embedder
    _embedder = Embedder(model, detector, max_side=max_side, upsample=upsample)


def _embed(image: bytes | str, name: str | None) -> list[Face]:
    assert _embedder is not None, "worker started without its embedder"
    return _embedder.embed(image, name=name)


class EmbeddingPool:
    """`Embedder.embed` in ``workers`` processes; a drop-in for `Embedder`.

    ``embed`` blocks its calling thread until a worker answers, so callers that
    already embed in threads (the replica does, per probe) get parallelism
    without other changes. Errors come back as the same types (`NoFaceError`,
    `UnsupportedImageError`, ...).
    """

    def __init__(self, embedder: Embedder, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"an embedding pool needs at least one worker, got {workers}")
        self.embedder = embedder
        self._pool = SpawnedPool(
            workers,
            _start,
            (embedder.model, embedder.detector, embedder.max_side, embedder.upsample),
        )

    @property
    def model(self) -> str:
        """The DeepFace model name."""
        return self.embedder.model

    def embed(
        self, image: bytes | str | os.PathLike[str], *, name: str | None = None
    ) -> list[Face]:
        """Embed every face in ``image`` in a worker process (see `Embedder.embed`)."""
        pool = self._pool.executor()
        source = os.fspath(image) if isinstance(image, os.PathLike) else image
        try:
            return pool.submit(_embed, source, name).result()
        except BrokenProcessPool as exc:
            self._pool.discard(pool)
            log.warning("an embedding worker died; starting a new pool for the next image")
            label = name or "image"
            raise EmbeddingCrashedError(
                f"{label}: the embedding worker died while embedding it ({exc}); "
                "the image was not embedded"
            ) from None

    def close(self) -> None:
        """Stop the workers (waiting for images being embedded)."""
        self._pool.close()


def probe_embedder(settings: Settings) -> Embedder | EmbeddingPool:
    """What a replica embeds probes with: a pool when `Settings.embed_workers` asks."""
    embedder = settings.embedder()
    return EmbeddingPool(embedder, settings.embed_workers) if settings.embed_workers else embedder
