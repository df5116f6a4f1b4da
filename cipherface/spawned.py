"""A pool of spawned worker processes, started on first use and replaced when broken.

Both on-prem's decryption workers (`cipherface.gallery.decryption`) and a
replica's embedding workers (`cipherface.embedding_pool`) run native code that
holds the GIL (SEAL; OpenCV, dlib, TensorFlow) in processes of their own. They
are *spawned*, not forked: the parent holds TenSEAL objects, threads and an event
loop that a fork would copy half-made. A worker that dies breaks the whole
`ProcessPoolExecutor`; the owner then `discard`s it and the next call starts a
new one.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["SpawnedPool"]


class SpawnedPool:
    """``workers`` spawned processes, each set up by ``initializer(*initargs)``."""

    def __init__(
        self, workers: int, initializer: Callable[..., None], initargs: tuple[Any, ...]
    ) -> None:
        self.workers = workers
        self._initializer = initializer
        self._initargs = initargs
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def executor(self) -> ProcessPoolExecutor:
        """The running pool, started now if there is none."""
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=self._initializer,
                    initargs=self._initargs,
                )
            return self._pool

    def discard(self, pool: ProcessPoolExecutor) -> None:
        """Forget ``pool``, broken by a dead worker: the next call starts a new one."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the workers (waiting for the work under way)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
