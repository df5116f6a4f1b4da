"""Worker processes: the book's encryption pool and the cloud's gallery shards.

TenSEAL's SEAL bindings hold the GIL, so threads do not parallelise. On-prem
encrypts blocks in a pool of spawned processes that receive the secret context
over a local pipe (`_init_encryptor`, `_encrypt_in_worker`). The cloud shards its
blocks over worker processes that each deserialize and keep their share (an
`_Engine` behind `_serve`), driven by a small (method, args) RPC over a pipe;
`_Shard` hides whether its engine is local or remote, and
`cipherface.gallery.engine` fans searches out to all of them. Compressed scores
of many probes come back through an outbox, memory the shard shares with its
worker (`_Outbox`), not pickled through the pipe.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import tenseal.sealapi as sealapi
from threadpoolctl import threadpool_limits

from cipherface.crypto import Keyring, Metric
from cipherface.exceptions import CipherFaceError, CiphertextError, GalleryWorkerError
from cipherface.gallery import compact
from cipherface.gallery.kernel import (
    ModularProduct,
    Writer,
    coefficients,
    coefficients_of,
    integer_weights,
    limb_planes,
    plain_coefficients,
    weighted_sums,
)
from cipherface.gallery.packing import (
    _BOTH_PARTS,
    _SCORE_SCALE,
    _VALUE_SCALE,
    _encrypt_columns,
    _Seal,
)

__all__: list[str] = []

#: Distinct constants kept encoded (euclidean's ``||p||^2`` differs per probe).
_CACHED_CONSTANTS = 64

_worker_seal: list[tuple[_Seal, Metric]] = []


def _init_encryptor(secret: bytes, metric: str) -> None:
    # Runs in a spawned encryption worker: the one place a per-process global is
    # the simplest correct holder of the worker's SEAL objects.
    _worker_seal.append((_Seal(Keyring.from_bytes(secret, expect="secret")), Metric(metric)))


def _encrypt_in_worker(matrix: np.ndarray) -> tuple[tuple[bytes, ...], bytes | None]:
    seal, metric = _worker_seal[0]
    return _encrypt_columns(seal, matrix, metric)


class _Engine:
    """One shard's blocks, held once as limb planes in coefficient form, and the
    arithmetic on them.

    Plaintext probes (1:N and 1:1 by subject) are scored on the planes by the
    kernel, and the sums, in coefficient form already, are compressed
    (`cipherface.gallery.compact`) with no transform per probe. Edge probes and
    batched 1:1 need SEAL's own products: `_ciphertexts` rebuilds one block's
    ciphertexts (NTT form again) for the request and lets them go, so a worker
    never holds a block twice.
    """

    def __init__(self, keyring: Keyring) -> None:
        self.seal = _Seal(keyring)
        #: block id -> (version, coefficients of columns [+ norms] as `limb_planes`, has norms).
        self.blocks: dict[int, tuple[int, np.ndarray, bool]] = {}
        self.modulus = self.seal.context.last_context_data().parms().coeff_modulus()[0].value()
        self.product = ModularProduct(self.modulus)
        self.product.warm()
        compact.warm()
        #: Serializers of a column (scale 2^25) and a norm column (2^50), coefficient
        #: form, and of a two-component ciphertext in NTT form (for constants).
        self._column_writer: Writer | None = None
        self._norm_writer: Writer | None = None
        self._ntt_writer = Writer(self.seal, self.seal.load(self.seal.encrypt_public(0.0, 1.0)))
        #: A score in coefficient form, to serialize one uncompressed.
        self._score_writer = compact.score_writer(self.seal)
        #: A metric's constant (2 for euclidean_l2, 1 for cosine) is every probe's:
        #: encoded once, not once per probe.
        self._constants: dict[float, np.ndarray] = {}

    def put(
        self, block_id: int, version: int, columns: Sequence[bytes], norms: bytes | None
    ) -> None:
        if not columns:
            raise CiphertextError(f"block {block_id} has no columns")
        scaled = [(c, _VALUE_SCALE) for c in columns]
        if norms is not None:
            scaled.append((norms, _SCORE_SCALE))
        words = []
        # One SEAL ciphertext at a time: only its coefficients are kept.
        for data, scale in scaled:
            ciphertext = self._column(data, scale)
            self.seal.evaluator.transform_from_ntt_inplace(ciphertext)
            if self._column_writer is None:
                self._column_writer = Writer(self.seal, ciphertext)
            elif scale == _SCORE_SCALE and self._norm_writer is None:
                self._norm_writer = Writer(self.seal, ciphertext)
            words.append(coefficients(self.seal, ciphertext))
        planes = limb_planes(np.stack(words))
        self.blocks[block_id] = (version, planes, norms is not None)

    def _ciphertexts(
        self, planes: np.ndarray, has_norms: bool, used: slice, with_norms: bool
    ) -> tuple[list[Any], Any]:
        """Columns ``used`` of a block (and its norm column if ``with_norms``) as SEAL
        ciphertexts, bit for bit those received (NTT form again: 0.17 ms a column).

        Only what the request reads is rebuilt: an edge probe's piece covers a range
        of dimensions, and rebuilding every column for each of its 5-17 pieces cost
        the whole block that many times over.
        """
        assert self._column_writer is not None
        dimensions = planes.shape[2] - has_norms
        loaded = [
            self._ntt(self._column_writer(c))
            for c in coefficients_of(planes[:, :, :dimensions][:, :, used])
        ]
        norm = None
        if has_norms and with_norms:
            assert self._norm_writer is not None
            norm = self._ntt(self._norm_writer(coefficients_of(planes[:, :, -1:])[0]))
        return loaded, norm

    def _ntt(self, data: bytes) -> Any:
        ciphertext = self.seal.load(data)
        self.seal.evaluator.transform_to_ntt_inplace(ciphertext)
        return ciphertext

    def _column(self, data: bytes, scale: float) -> Any:
        """A column as on-prem encrypts it (two components, NTT form, ``scale``), or refused.

        The kernel reads coefficients as two polynomials: any other shape is refused
        here, as a `CiphertextError`, rather than failing inside a worker.
        """
        column = self.seal.load(data)
        if column.size() != 2 or not column.is_ntt_form() or column.scale != scale:
            raise CiphertextError("a gallery column must be a fresh two-component ciphertext")
        return column

    def drop(self, block_id: int) -> None:
        self.blocks.pop(block_id, None)

    def score(
        self, request: tuple[Any, ...], block_ids: Sequence[int]
    ) -> list[tuple[int, int, bytes]]:
        seal = self.seal
        kind = request[0]
        start = 0
        if kind == "encrypted":
            probe = [seal.load(c) for c in request[1]]
            const = request[3]
            extra = None if request[2] is None else seal.load(request[2])
            # A piece of an edge probe scores its own dimensions; the constant parts
            # of a score come once, with the piece starting at dimension 0.
            start = request[4]
        used = slice(start, start + len(probe)) if kind == "encrypted" else slice(None)
        out = []
        for block_id in block_ids:
            version, planes, has_norms = self.blocks[block_id]
            columns, norms = self._ciphertexts(planes, has_norms, used, start == 0)
            if kind == "pairs":
                matrix, consts = request[1][block_id]
                probe = [seal.plain(matrix[j].tolist(), _VALUE_SCALE) for j in range(len(matrix))]
                result = self._combine(columns, probe, False)
                self._add(result, seal.plain((consts * _BOTH_PARTS).tolist(), _SCORE_SCALE))
            else:
                result = self._combine(columns, probe, kind == "encrypted")
                if kind == "encrypted" and extra is not None:
                    seal.evaluator.add_inplace(result, extra)
                if const:
                    self._add(result, seal.plain(const * _BOTH_PARTS, _SCORE_SCALE))
            if norms is not None:  # only rebuilt for the piece starting at dimension 0
                seal.evaluator.add_inplace(result, norms)
            out.append((block_id, version, seal.dump(result)))
        return out

    def score_many(
        self,
        weights: np.ndarray,
        consts: Sequence[float],
        compress: bool,
        block_ids: Sequence[int],
    ) -> list[list[tuple[int, int, bytes]]]:
        """Scores of P plaintext probes (``weights`` P x d, one constant each) in one
        pass: compressed (`compact.SCORE_BITS`), or as SEAL serializes them, bit for
        bit what SEAL computes (turned to NTT form here, 0.3 ms a score)."""
        out: list[list[tuple[int, int, bytes]]] = [[] for _ in consts]
        for block_id, version, sums in self.sums(weights, consts, block_ids):
            for index, row in enumerate(sums):
                if compress:
                    data = compact.compress(row, self.modulus)
                else:
                    data = self.seal.dump(self._ntt(self._score_writer(row)))
                out[index].append((block_id, version, data))
        return out

    def score_into(
        self,
        outbox: np.ndarray,
        weights: np.ndarray,
        consts: Sequence[float],
        block_ids: Sequence[int],
    ) -> list[list[tuple[int, int, int]]]:
        """`score_many`, compressed, each score written into ``outbox`` at the returned
        offset: per probe, (block id, version, offset), every score `compact.compressed_size`
        bytes long."""
        out: list[list[tuple[int, int, int]]] = [[] for _ in consts]
        offset = 0
        for block_id, version, sums in self.sums(weights, consts, block_ids):
            size = compact.compressed_size(sums.shape[2])
            for index, row in enumerate(sums):
                if offset + size > outbox.size:
                    raise CiphertextError("the scores outgrew the outbox they were sized for")
                compact.compress_into(row, self.modulus, outbox[offset : offset + size])
                out[index].append((block_id, version, offset))
                offset += size
        return out

    def sums(
        self, weights: np.ndarray, consts: Sequence[float], block_ids: Sequence[int]
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Each block's P score ciphertexts, (P, 2, N) in coefficient form: bit for bit
        SEAL's, transformed from NTT form (see `cipherface.gallery.kernel`)."""
        integer = integer_weights(weights, _VALUE_SCALE)
        constants = np.stack([self._constant(c) for c in consts])
        for block_id in block_ids:
            version, planes, has_norms = self.blocks[block_id]
            block_weights = integer
            if has_norms:  # at scale 2^50 already: weight one
                block_weights = np.hstack([integer, np.ones((len(consts), 1), dtype=np.int64)])
            yield block_id, version, weighted_sums(self.product, planes, block_weights, constants)

    def _constant(self, value: float) -> np.ndarray:
        """Coefficients of the plaintext ``value (1 + i)`` at scale 2^50 (zeros for 0), as
        SEAL's encoder rounds them: its NTT form, transformed back by SEAL."""
        if not value:
            return np.zeros(self.seal.slots * 2, dtype=np.uint64)
        cached = self._constants.get(value)
        if cached is None:
            plain = self.seal.plain(value * _BOTH_PARTS, _SCORE_SCALE)
            coefficients_ntt = plain_coefficients(self.seal, plain)
            # SEAL transforms ciphertexts only, and refuses one whose c1 is zero.
            carrier = self.seal.load(self._ntt_writer(np.stack([coefficients_ntt] * 2)))
            self.seal.evaluator.transform_from_ntt_inplace(carrier)
            cached = coefficients(self.seal, carrier)[0]
            if len(self._constants) >= _CACHED_CONSTANTS:
                self._constants.clear()
            self._constants[value] = cached
        return cached

    def _combine(self, columns: list[Any], probe: list[Any], encrypted: bool) -> Any:
        evaluator = self.seal.evaluator
        acc = None
        term = sealapi.Ciphertext()
        for column, weight in zip(columns, probe, strict=True):
            if encrypted:
                # Left at three components: relinearising would cost a key switch
                # per block and a 0.7 MB key at the cloud, for nothing decryption needs.
                evaluator.multiply(column, weight, term)
            elif weight.is_zero():
                continue  # SEAL refuses products that would be transparent (pairs)
            else:
                evaluator.multiply_plain(column, weight, term)
            if acc is None:
                acc, term = term, sealapi.Ciphertext()
            else:
                evaluator.add_inplace(acc, term)
        if acc is None:  # an all-zero probe: every score is the constant part
            acc = self.seal.load(self.seal.encrypt_public(0.0, _SCORE_SCALE))
        return acc

    def _add(self, ciphertext: Any, plain: Any) -> None:
        if not plain.is_zero():
            self.seal.evaluator.add_plain_inplace(ciphertext, plain)


def _serve(conn: Connection, context: bytes) -> None:
    """Worker-process loop: one `_Engine`, driven by (method, args) messages.

    BLAS runs single-threaded here: the shards already use every core.
    """
    threadpool_limits(1)
    engine = _Engine(Keyring.from_bytes(context, expect="public"))
    outbox = np.empty(0, dtype=np.uint8)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        name, args = message
        try:
            if name == "outbox":  # a larger one: its file descriptor follows
                outbox = _Outbox.attach(conn, *args)
                conn.send(("ok", None))
                continue
            method = getattr(engine, name)
            conn.send(("ok", method(outbox, *args) if name == "score_into" else method(*args)))
        except CipherFaceError as exc:
            conn.send(("error", str(exc)))
        except Exception as exc:
            # SEAL's bindings raise ValueError/RuntimeError on inputs that got past
            # the checks (a NaN once did): that request fails alone, the worker
            # and the blocks it holds stay up.
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _Outbox:
    """Memory a shard shares with its worker, for compressed scores of many probes.

    Pickled through the pipe, 32 probes' scores (about 126 MB a worker at a million
    templates) cost the worker a copy into the pickle and a write, and the replica
    a read and a copy out: about a fifth of the CPU of a 32-probe pass. Written
    here by the worker, they cost the replica one copy. An anonymous memfd, handed
    over as a file descriptor: nothing named to leak if either process is killed.
    """

    def __init__(self, conn: Connection, pid: int, size: int) -> None:
        """Map ``size`` bytes here and hand them to the worker at ``conn`` (`attach`)."""
        self.size = size
        fd = os.memfd_create("cipherface-scores")
        try:
            os.ftruncate(fd, size)
            self.memory = mmap.mmap(fd, size)
            conn.send(("outbox", (size,)))
            reduction.send_handle(conn, fd, pid)
        finally:
            os.close(fd)

    @staticmethod
    def attach(conn: Connection, size: int) -> np.ndarray:
        """The worker's side: the descriptor that follows on ``conn``, mapped."""
        fd = reduction.recv_handle(conn)
        try:
            return np.frombuffer(mmap.mmap(fd, size), dtype=np.uint8)
        finally:
            os.close(fd)


#: Outboxes grow in steps of this many bytes, so that a slightly larger pass does
#: not map a new one.
_OUTBOX_STEP = 16 * 1024 * 1024


class _Shard:
    """An `_Engine` in this process or in a worker; call `send` on all, then `receive`."""

    def __init__(self, keyring: Keyring, remote: bool) -> None:
        self._engine: _Engine | None = None
        self._result: Any = None
        #: Compressed bytes of one score, and the outbox scores of many probes come through.
        self._score_bytes = compact.compressed_size(2 * keyring.slots)
        self._outbox: _Outbox | None = None
        self._reading: bool = False
        if not remote:
            self._engine = _Engine(keyring)
            return
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve,
            args=(child, keyring.public_bytes(galois_keys=False, relin_keys=False)),
            daemon=True,
            name="cipherface-gallery-shard",
        )
        self._process.start()
        child.close()

    def send(self, name: str, *args: Any) -> None:
        if self._engine is not None:
            try:
                self._result = ("ok", getattr(self._engine, name)(*args))
            except CipherFaceError as exc:
                self._result = ("raise", exc)  # raised by `receive`, as a worker's would be
            return
        try:
            if name == "score_many" and hasattr(os, "memfd_create"):
                weights, consts, compress, block_ids = args
                if compress:
                    self._ensure_outbox(len(consts) * len(block_ids) * self._score_bytes)
                    name, args = "score_into", (weights, consts, block_ids)
            self._conn.send((name, args))
            self._reading = name == "score_into"
        except (EOFError, OSError):
            raise GalleryWorkerError("a gallery worker process died") from None

    def _ensure_outbox(self, size: int) -> None:
        if self._outbox is not None and self._outbox.size >= size:
            return
        outbox = _Outbox(self._conn, self._process.pid, -(-size // _OUTBOX_STEP) * _OUTBOX_STEP)
        status, value = self._conn.recv()
        if status != "ok":
            raise CiphertextError(value)
        if self._outbox is not None:
            self._outbox.memory.close()
        self._outbox = outbox

    def receive(self) -> Any:
        """The reply to the last `send`, or its error raised; a dead worker raises
        `GalleryWorkerError`. Every `send` must be answered by one `receive`, errors
        included, or the next request would read this one's reply."""
        if self._engine is not None:
            status, value = self._result
        else:
            try:
                status, value = self._conn.recv()
            except (EOFError, OSError):
                raise GalleryWorkerError("a gallery worker process died") from None
        if status == "raise":
            raise value
        if status != "ok":
            raise CiphertextError(value)
        if self._reading:  # (block id, version, offset): the scores are in the outbox
            assert self._outbox is not None
            memory, size = self._outbox.memory, self._score_bytes
            value = [[(b, v, memory[at : at + size]) for b, v, at in probe] for probe in value]
        return value

    def close(self) -> None:
        if self._engine is None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
            if self._outbox is not None:
                self._outbox.memory.close()
