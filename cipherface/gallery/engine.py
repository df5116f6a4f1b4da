"""The cloud's encrypted gallery: blocks, their labels, and encrypted search.

The cloud holds only a public keyring. Measured on the 2-core benchmark machine
(N=8192, 128-d; see `cipherface.gallery.packing` for the layout):

- A plaintext probe is scored by `cipherface.gallery.kernel`: the weighted sum
  of a block's 128 columns as an exact matrix product mod q, about 2.2 ms per
  block of 8192 templates for one probe (a compiled loop reading the block once;
  BLAS took 6 ms, SEAL's 128 ``multiply_plain`` 8 ms) and about 24 ms for 32
  probes in one pass (BLAS), on one idle core, blocks out of cache. Workers keep
  each block once, as 16-bit limb planes (about 2.1 KB per 128-d template in
  memory: 1.1 GB per million per worker, not 2.6 GB as when SEAL ciphertexts
  were kept beside them).
  An encrypted probe (``d`` ciphertexts, each one probe component in every slot,
  made with the public key at the edge) costs 128 ciphertext products, left
  unrelinearised, on the block's ciphertexts rebuilt from its planes for the
  request (as batched 1:1 does): about 16 ms per block for the products, and as
  much again or more to rebuild. The decrypted score then has three components,
  which decryption handles.
- A million templates are 123 blocks (`benchmarks/bench_search.py` prints the
  current figures against numpy float32 and faiss). Batched 1:1
  (`verify_pairs`) needs two rounds for a full block and verifies ~56,000
  claims per second, 380x one-ciphertext-per-template verification.
- TenSEAL's SEAL bindings hold the GIL, so threads do not parallelise; with
  ``workers > 1`` the gallery shards its blocks over worker *processes* that each
  deserialize and keep their share, and searches fan out to all of them
  (`cipherface.gallery.workers`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cipherface.crypto import Keyring, Metric, prepare_embedding
from cipherface.exceptions import CipherFaceError, ConfigError, GalleryWorkerError
from cipherface.gallery.batching import SearchBatcher
from cipherface.gallery.book import _Shipped
from cipherface.gallery.compact import SCORE_BITS
from cipherface.gallery.packing import _check_norm, _weights
from cipherface.gallery.workers import _Shard
from cipherface.store import GalleryStore
from cipherface.wire.payloads import BlockScores, EncryptedBlock, EncryptedProbe

__all__ = ["EncryptedGallery"]

log = logging.getLogger(__name__)


class EncryptedGallery:
    """The cloud's gallery: encrypted blocks, their labels, and encrypted search.

    Holds only a public keyring. With a ``store`` every accepted block is persisted
    and the gallery reloads from it on start. ``workers > 1`` shards blocks over
    that many worker processes (use the core count for large galleries).
    """

    def __init__(
        self,
        keyring: Keyring,
        store: GalleryStore | None = None,
        *,
        workers: int = 1,
        compress: bool = True,
    ) -> None:
        self.keyring = keyring
        self.store = store
        #: Plaintext probes' scores leave compressed (`cipherface.gallery.compact`).
        self.compress = compress
        self.metric: Metric | None = None
        self.dimensions: int | None = None
        self._layouts: dict[int, _Shipped] = {}
        self._slots = keyring.slots
        self._lock = threading.Lock()
        self._shards = [_Shard(keyring, workers > 1) for _ in range(max(workers, 1))]
        self._batcher = SearchBatcher(self)
        if store is not None:
            stored = store.context_fingerprint()
            if stored is None:
                store.save_context(keyring.public_bytes(galois_keys=False), keyring.fingerprint)
            else:
                keyring.check(stored)
            for block in store.iter_blocks():
                self._install(block)

    def put(self, block: EncryptedBlock) -> bool:
        """Accept a block from on-prem; False if this version or a newer one is held.

        Raises `KeyMismatchError` for a block under another key, `ConfigError` for a
        block of another metric or dimension than the gallery's.
        """
        self.keyring.check(block.fingerprint)
        held = self._layouts.get(block.block_id)
        if held is not None and held.version >= block.version:
            return False
        # Install (which deserializes every ciphertext and checks metric and
        # dimensions) before persisting: a block that fails must never reach the
        # store, or the replica could not load its gallery again after a restart.
        self._install(block)
        if self.store is not None:
            self.store.save_block(block)
        return True

    def version(self, block_id: int) -> int:
        """The version of block ``block_id`` held (0: none)."""
        held = self._layouts.get(block_id)
        return 0 if held is None else held.version

    def drop(self, block_id: int) -> None:
        """Stop serving a block that moved to another shard, and forget it in the store.

        Searches skip it at once; its columns leave the workers' memory at restart.
        """
        self._layouts.pop(block_id, None)
        if self.store is not None:
            self.store.delete_block(block_id)

    def _install(self, block: EncryptedBlock) -> None:
        metric = Metric.parse(block.metric)
        if len(block.template_ids) > 2 * self._slots:
            raise ConfigError(
                f"block {block.block_id} names {len(block.template_ids)} templates; "
                f"a block holds at most {2 * self._slots}"
            )
        if self.metric is None:
            self.metric, self.dimensions = metric, block.dimensions
        elif (metric, block.dimensions) != (self.metric, self.dimensions):
            raise ConfigError(
                f"this gallery holds {self.dimensions}-d {self.metric.value} templates, "
                f"not {block.dimensions}-d {metric.value}"
            )
        calls = {block.block_id % len(self._shards): _put_args(block)}
        with self._lock:
            try:
                self._exchange("put", calls)
            except GalleryWorkerError:  # the worker was replaced: put the block there
                self._exchange("put", calls)
        self._layouts[block.block_id] = _Shipped(
            version=block.version, template_ids=block.template_ids, subjects=block.subjects
        )

    def _fan_out(self, request: tuple[Any, ...], block_ids: Iterable[int]) -> list[BlockScores]:
        [results] = self._call_shards("score", (request,), block_ids)
        return results

    def _call_shards(
        self, method: str, args: tuple[Any, ...], block_ids: Iterable[int], probes: int = 1
    ) -> list[list[BlockScores]]:
        """``method(*args, ids)`` on every shard holding some of ``block_ids``: per-probe scores."""
        by_shard: dict[int, list[int]] = {}
        for block_id in block_ids:
            by_shard.setdefault(block_id % len(self._shards), []).append(block_id)
        with self._lock:
            try:
                replies = self._exchange(method, {i: (*args, ids) for i, ids in by_shard.items()})
            except GalleryWorkerError:
                # The dead worker was replaced, holding its blocks again: one more try,
                # so a search outlives a worker killed under it (one that kills it
                # again fails). Blocks that could not come back are not asked for.
                held = {
                    index: (*args, kept)
                    for index, ids in by_shard.items()
                    if (kept := [b for b in ids if b in self._layouts])
                }
                replies = self._exchange(method, held)
        if probes == 1 and method == "score":
            replies = [[reply] for reply in replies]
        # The kernel's scores may leave compressed; SEAL's (edge probes, pairs) as SEAL wrote them.
        bits = SCORE_BITS if method == "score_many" and self.compress else ()
        return [
            sorted(
                (
                    BlockScores(block_id=b, version=v, scores=s, bits=bits)
                    for reply in replies
                    for b, v, s in reply[p]
                ),
                key=lambda scores: scores.block_id,
            )
            for p in range(probes)
        ]

    def _exchange(self, method: str, calls: dict[int, tuple[Any, ...]]) -> list[Any]:
        """``method(*calls[i])`` on each shard ``i``; every reply is read before the first
        error is raised.

        A reply left unread would answer the shard's next request: after one failed
        search (a forged edge probe's bytes), every later search got the reply to the
        one before. A dead worker is replaced (`_restart`) before the error is raised.
        """
        failures: list[CipherFaceError] = []
        dead: list[int] = []
        sent: list[int] = []
        for index, args in calls.items():
            try:
                self._shards[index].send(method, *args)
                sent.append(index)
            except GalleryWorkerError as exc:
                failures.append(exc)
                dead.append(index)
        replies = []
        for index in sent:
            try:
                replies.append(self._shards[index].receive())
            except GalleryWorkerError as exc:
                failures.append(exc)
                dead.append(index)
            except CipherFaceError as exc:
                failures.append(exc)
        for index in dead:
            self._restart(index)
        if failures:
            raise failures[0]
        return replies

    def _restart(self, index: int) -> None:
        """A new worker for shard ``index``, holding its blocks again, read from the store.

        Without a store its blocks cannot come back: they leave the gallery, and
        searches report the gallery partial until on-prem ships them again.
        """
        log.warning("gallery worker %d died; starting a new one", index)
        self._shards[index].close()
        shard = self._shards[index] = _Shard(self.keyring, True)
        count = len(self._shards)
        if self.store is None:
            for block_id in [b for b in self._layouts if b % count == index]:
                self._layouts.pop(block_id, None)
            return
        for block in self.store.iter_blocks():
            held = self._layouts.get(block.block_id)
            if block.block_id % count == index and held and held.version == block.version:
                shard.send("put", *_put_args(block))
                shard.receive()

    def search(
        self,
        probe: np.ndarray | Sequence[float] | EncryptedProbe,
        *,
        subject: str | None = None,
        start: int = 0,
    ) -> list[BlockScores]:
        """Encrypted scores of ``probe`` against every template (or ``subject``'s: 1:1).

        A plaintext probe is one the cloud embedded itself; an `EncryptedProbe` was
        made at the edge. Both decrypt to the same values (see
        `cipherface.gallery.packing` for their precision). An edge probe's piece
        (`wire.EncryptedProbePart`) holds the columns of dimensions ``start ..``:
        its scores are the partial sums over them, the constant terms only in the
        piece starting at 0, so the pieces' scores add up to the whole probe's.
        """
        if self.metric is None:
            return []
        if isinstance(probe, EncryptedProbe):
            self.keyring.check(probe.fingerprint)
            if probe.packed is not None:
                raise ConfigError("a packed probe is searched once expanded (`expand_probe`)")
            if probe.metric != self.metric.value or probe.dimensions != self.dimensions:
                raise ConfigError("the probe was encrypted for another metric or dimension")
            if start < 0 or not probe.columns or start + len(probe.columns) > self.dimensions:
                raise ConfigError(f"no dimensions {start}.. of {self.dimensions} to score")
            if start and probe.norm is not None:
                raise ConfigError("only the piece starting at dimension 0 carries the norm")
            request = (
                "encrypted",
                probe.columns,
                probe.norm,
                _weights(self.metric)[1] if start == 0 else 0.0,
                start,
            )
            return self._fan_out(request, self.blocks_of(subject))
        return self._score_plain([probe], self.blocks_of(subject))[0]

    def search_shared(
        self, probe: np.ndarray | Sequence[float] | EncryptedProbe, *, subject: str | None = None
    ) -> list[BlockScores]:
        """`search`, sharing one pass with concurrent plaintext 1:N probes (`SearchBatcher`).

        For daemons that search from several threads; a probe waits up to the
        batcher's window (5 ms) for company. 1:1 claims share a pass with the
        claims on the same blocks; edge probes go alone.
        """
        if isinstance(probe, EncryptedProbe):
            return self.search(probe, subject=subject)
        return self._batcher.search(probe, subject=subject)

    def search_many(
        self,
        probes: Sequence[np.ndarray | Sequence[float]],
        *,
        blocks: Sequence[int] | None = None,
    ) -> list[list[BlockScores]]:
        """Encrypted scores of several plaintext probes in one pass over the gallery.

        Each probe's scores are exactly what `search` gives it alone; the gallery is
        read once for all of them (`cipherface.gallery.kernel`), so waiting probes
        are best scored together. ``blocks``: only these (1:1 claims whose subjects
        are in them, `blocks_of`); None: every block.
        """
        if self.metric is None or not probes:
            return [[] for _ in probes]
        return self._score_plain(probes, self.blocks_of(None) if blocks is None else list(blocks))

    def _score_plain(
        self, probes: Sequence[np.ndarray | Sequence[float]], block_ids: list[int]
    ) -> list[list[BlockScores]]:
        assert self.metric is not None
        factor, const = _weights(self.metric)
        weights, consts = [], []
        for probe in probes:
            vector = prepare_embedding(probe, self.metric)
            if vector.shape != (self.dimensions,):
                raise ConfigError(f"expected a {self.dimensions}-d probe, got {vector.shape}")
            _check_norm(vector, self.metric)
            weights.append(factor * vector)
            consts.append(float(vector @ vector) if self.metric is Metric.EUCLIDEAN else const)
        return self._call_shards(
            "score_many", (np.asarray(weights), consts, self.compress), block_ids, len(probes)
        )

    def verify_pairs(
        self, pairs: Sequence[tuple[np.ndarray | Sequence[float], str]]
    ) -> list[BlockScores]:
        """Batched 1:1: score each (plaintext probe, claimed subject) pair in one pass.

        Every CKKS slot of a block gets its own probe (a plaintext *vector* per
        column instead of a scalar), so one block operation verifies up to N/2
        claims. A slot's weight is real, so it scores *both* templates of the slot
        with the same probe: a round serves one of them, and the other part's score,
        meant for nobody, is left out of ``pairs``. A slot claimed twice (its two
        templates, or one template by two pairs) is scored in a further round.
        """
        if self.metric is None or not pairs:
            return []
        factor, const = _weights(self.metric)
        positions_of: dict[str, list[tuple[int, int]]] = {}
        for block_id, layout in list(self._layouts.items()):
            for position, name in enumerate(layout.subjects):
                if name:
                    positions_of.setdefault(name, []).append((block_id, position))
        # Per round: block -> CKKS slot -> (template position, pair index).
        rounds: list[dict[int, dict[int, tuple[int, int]]]] = []
        vectors = []
        for index, (probe, subject) in enumerate(pairs):
            vector = prepare_embedding(probe, self.metric)
            if vector.shape != (self.dimensions,):
                raise ConfigError(f"expected a {self.dimensions}-d probe, got {vector.shape}")
            _check_norm(vector, self.metric)
            vectors.append(vector)
            for block_id, position in positions_of.get(subject, []):
                slot = position % self._slots
                level = 0
                while level < len(rounds) and slot in rounds[level].get(block_id, {}):
                    level += 1
                if level == len(rounds):
                    rounds.append({})
                rounds[level].setdefault(block_id, {})[slot] = (position, index)
        out = []
        assert self.dimensions is not None
        for assignment in rounds:
            per_block = {}
            owners = {}
            for block_id, slots in assignment.items():
                width = len(self._layouts[block_id].template_ids)
                matrix = np.zeros((self.dimensions, min(width, self._slots)))
                consts = np.zeros(matrix.shape[1])
                owner = [-1] * width
                for slot, (position, index) in slots.items():
                    matrix[:, slot] = factor * vectors[index]
                    consts[slot] = (
                        float(vectors[index] @ vectors[index])
                        if self.metric is Metric.EUCLIDEAN
                        else const
                    )
                    owner[position] = index
                per_block[block_id] = (matrix, consts)
                owners[block_id] = tuple(owner)
            for scores in self._fan_out(("pairs", per_block), assignment):
                out.append(
                    BlockScores(
                        block_id=scores.block_id,
                        version=scores.version,
                        scores=scores.scores,
                        pairs=owners[scores.block_id],
                    )
                )
        return out

    def blocks_of(self, subject: str | None) -> list[int]:
        """Ids of the blocks holding ``subject``'s templates (None: every block), sorted."""
        # Readers copy the layouts first (one C-level step under the GIL): `put` may add a
        # block from another thread mid-iteration, failing a whole batch of probes.
        return sorted(
            block_id
            for block_id, layout in list(self._layouts.items())
            if subject is None or subject in layout.subjects
        )

    def subjects(self) -> list[str]:
        """Subjects with at least one template, sorted."""
        return sorted({s for layout in list(self._layouts.values()) for s in layout.subjects if s})

    def __len__(self) -> int:
        return sum(1 for layout in list(self._layouts.values()) for t in layout.template_ids if t)

    def close(self) -> None:
        """Stop worker processes (the store, owned by the caller, stays open)."""
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> EncryptedGallery:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _put_args(block: EncryptedBlock) -> tuple[Any, ...]:
    """A worker's `put` of ``block``: id, version, columns, norm column."""
    return (block.block_id, block.version, block.columns, block.norms)
