"""Embedding in worker processes (cipherface.embedding_pool): same faces, same errors,
and a worker killed mid-image costs that image only."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cipherface.embedding import Embedder
from cipherface.embedding_pool import EmbeddingPool
from cipherface.exceptions import EmbeddingCrashedError, NoFaceError, UnsupportedImageError

GIF = b"GIF89a" + bytes(64)


@pytest.fixture(scope="module")
def pool() -> Iterator[EmbeddingPool]:
    pool = EmbeddingPool(Embedder("Dlib", "dlib"), workers=2)
    yield pool
    pool.close()


def test_the_pool_finds_the_faces_the_replica_would(pool: EmbeddingPool, faces_dir: Path) -> None:
    photo = (faces_dir / "couple.jpg").read_bytes()
    here = Embedder("Dlib", "dlib").embed(photo, name="couple.jpg")
    there = pool.embed(photo, name="couple.jpg")
    assert [face.box for face in there] == [face.box for face in here]
    for a, b in zip(there, here, strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-6)


def test_the_workers_scan_as_their_embedder_asks(small_portrait: bytes) -> None:
    assert Embedder("Dlib", "dlib").embed(small_portrait)
    pool = EmbeddingPool(Embedder("Dlib", "dlib", upsample=0), workers=1)
    try:
        with pytest.raises(NoFaceError):
            pool.embed(small_portrait, name="small")
    finally:
        pool.close()


def test_errors_cross_the_process_boundary_with_their_type(pool: EmbeddingPool) -> None:
    with pytest.raises(UnsupportedImageError, match="probe p1: unsupported image format GIF"):
        pool.embed(GIF, name="probe p1")
    blank = _png(np.full((200, 200, 3), 255, dtype=np.uint8))
    with pytest.raises(NoFaceError, match="probe p2: no face detected"):
        pool.embed(blank, name="probe p2")


def test_a_worker_killed_mid_image_fails_that_image_only(faces_dir: Path) -> None:
    pool = EmbeddingPool(Embedder("Dlib", "dlib"), workers=1)
    try:
        photo = (faces_dir / "img1.jpg").read_bytes()
        pool.embed(photo, name="warm-up")  # the worker is up, its model loaded
        outcome: list[BaseException | None] = []

        def embed() -> None:
            try:
                pool.embed(photo, name="probe killed")
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=embed)
        worker.start()
        time.sleep(0.05)
        for pid in _worker_pids(pool):
            os.kill(pid, signal.SIGKILL)
        worker.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], EmbeddingCrashedError)
        assert "probe killed: the embedding worker died" in str(outcome[0])
        # The next image gets a new worker.
        assert len(pool.embed(photo, name="after")) == 1
    finally:
        pool.close()


def _worker_pids(pool: EmbeddingPool) -> list[int]:
    executor = pool._pool.executor()
    return list(executor._processes)  # type: ignore[attr-defined]


def _png(pixels: np.ndarray) -> bytes:
    import cv2

    ok, encoded = cv2.imencode(".png", pixels)
    assert ok
    return encoded.tobytes()
