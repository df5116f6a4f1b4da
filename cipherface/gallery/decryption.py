"""On-prem's decryption of score ciphertexts, spread over worker processes.

Why: ranking a 1:N probe decrypts one score ciphertext per block (123 at a
million templates). Each is loaded into SEAL, turned to NTT form (compressed
scores), decrypted and decoded: about 1 ms of SEAL work a block on the benchmark
machine, most of on-prem's time per probe, and TenSEAL's bindings hold the GIL,
so threads do not share it out. `DecryptionPool` runs that work in ``workers``
spawned processes that receive the secret context over a local pipe (as the
book's encryption pool does, `cipherface.gallery.workers`), each decrypting one
contiguous share of the blocks.

What stays the same: every block is checked before it is decrypted, in the
worker, by the same code as in-process (`decrypt_scores`), and an
`IntegrityError` raised there comes back as one. Only decrypted values return,
to the process that ranks them; nothing leaves on-prem. A gallery of fewer than
``min_blocks`` blocks decrypts in the calling process, where a round trip to the
workers costs more than it saves. A worker that dies (killed, out of memory)
costs no probe: that call decrypts in-process and the next starts a new pool.

What it buys depends on the host: on the 2-core benchmark machine two processes
decrypt about twice as fast as one, yet through the executor `rank` gained about
1.2x with two workers and lost with one, and the figures moved with the order the
calls ran in (`benchmarks/bench_rank.py`). Hence opt-in
(`Settings.decrypt_workers`), for on-prem hosts with cores to spare.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from cipherface.crypto import Keyring
from cipherface.exceptions import ConfigError, IntegrityError
from cipherface.gallery import compact
from cipherface.gallery.packing import _Seal
from cipherface.spawned import SpawnedPool

__all__ = ["MIN_BLOCKS", "DecryptionPool", "Sealed", "decrypt_scores"]

log = logging.getLogger(__name__)

#: Blocks below which a probe decrypts in-process: at 1 ms a block, a few blocks
#: cost less than sending them to a worker and their values back.
MIN_BLOCKS = 8
#: Seconds `warm`'s probe call keeps a worker busy.
_READY_HOLD = 0.05


@dataclass(frozen=True, slots=True)
class Sealed:
    """One block's score ciphertext as it arrived, and what the protocol says it is."""

    data: bytes
    #: `compact.SCORE_BITS` for compressed scores, empty for SEAL's serialization.
    bits: tuple[int, ...]
    #: Components: 2 for a plaintext probe's scores, 3 for an edge probe's.
    size: int


def decrypt_scores(seal: _Seal, sealed: Sealed) -> np.ndarray:
    """Check one block's scores (`IntegrityError` if the protocol would not make
    them), then decrypt all `capacity` values in template order."""
    if sealed.bits and sealed.size == 2:
        ciphertext = compact.read_scores(seal, sealed.data, sealed.bits)
    elif sealed.bits:
        raise IntegrityError("an edge probe's scores arrived compressed; they never are")
    else:
        ciphertext = seal.load_checked(sealed.data, size=sealed.size)
    return seal.decrypt(ciphertext)


#: The worker's SEAL objects, built once by `_start` from the secret context.
_worker_seal: list[_Seal] = []


def _start(secret: bytes) -> None:
    _worker_seal.append(_Seal(Keyring.from_bytes(secret, expect="secret")))
    compact.warm()


def _ready() -> int:
    # Held a moment, so that the next call goes to another worker once it is up.
    time.sleep(_READY_HOLD)
    return os.getpid()


def _decrypt_share(share: Sequence[Sealed]) -> list[np.ndarray]:
    seal = _worker_seal[0]
    return [decrypt_scores(seal, sealed) for sealed in share]


class DecryptionPool:
    """`decrypt_scores` for many blocks at once, in ``workers`` processes.

    Thread-safe: concurrent probes share the workers (each call's shares queue
    behind the others').
    """

    def __init__(self, keyring: Keyring, workers: int, *, min_blocks: int = MIN_BLOCKS) -> None:
        if not keyring.is_private:
            raise ConfigError("a decryption pool needs the secret key: it runs on-prem")
        if workers < 1:
            raise ConfigError(f"a decryption pool needs at least one worker, got {workers}")
        self.fingerprint = keyring.fingerprint
        self.min_blocks = min_blocks
        self._pool = SpawnedPool(workers, _start, (keyring.secret_bytes(),))

    def warm(self, timeout: float = 60.0) -> set[int]:
        """Start every worker now (a second or two each: imports, SEAL objects,
        compiled loops), not on the first large probe; their process ids.

        Returns once ``workers`` distinct processes have answered: a worker still
        starting takes no task, so the first one up would otherwise answer every
        call and a probe's shares would run one after the other.
        """
        pool = self._pool.executor()
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        while len(seen) < self._pool.workers and time.monotonic() < deadline:
            seen.update(
                f.result() for f in [pool.submit(_ready) for _ in range(self._pool.workers)]
            )
        return seen

    def decrypt(self, seal: _Seal, blocks: Sequence[Sealed]) -> list[np.ndarray]:
        """Each block's values, in order; ``seal`` (under the same key) decrypts
        in-process below `min_blocks` blocks, or when a worker died meanwhile."""
        if seal.fingerprint != self.fingerprint:
            raise ConfigError(
                f"scores under key {seal.fingerprint} given to the pool of key {self.fingerprint}"
            )
        if len(blocks) < self.min_blocks:
            return [decrypt_scores(seal, sealed) for sealed in blocks]
        pool = self._pool.executor()
        # The calling process only waits: decrypting a share itself, it would hold the
        # GIL that the executor's threads need to move the other shares through pipes.
        step = -(-len(blocks) // self._pool.workers)
        try:
            futures = [
                pool.submit(_decrypt_share, list(blocks[i : i + step]))
                for i in range(0, len(blocks), step)
            ]
            return [values for future in futures for values in future.result()]
        except BrokenProcessPool:
            self._pool.discard(pool)
            log.warning(
                "a decryption worker died; this probe decrypts in-process, the next in a new pool"
            )
            return [decrypt_scores(seal, sealed) for sealed in blocks]

    def close(self) -> None:
        """Stop the workers (waiting for decryptions under way)."""
        self._pool.close()
