"""Encrypted 1:N identification: a column-packed CKKS gallery.

Layout
------
A ciphertext has ``S = N/2`` complex slots (4096 at N=8192), and each slot holds
*two* templates' values: templates are grouped in *blocks* of up to ``2S``, and
the template at position ``k`` of a block lives in slot ``k % S``, in the real
part if ``k < S`` and in the imaginary part otherwise (so decryption is the real
parts followed by the imaginary parts). Block ``b`` of a ``d``-dimensional gallery
is ``d`` ciphertexts, *columns*: column ``j`` holds component ``j`` of every
template of the block. The inner products of one probe ``p`` with all ``2S``
templates are then ``sum_j w_j * C_j``: with a *real* weight,
``w (a + ib) = wa + i wb`` keeps the two templates of a slot apart. That is ``d``
scalar products and additions, with no rotation, so the cloud needs no Galois
keys (and, since nothing is relinearised, no relinearisation keys either)::

    score = [||g||^2] + sum_j w_j * C_j + c(1 + i)
    euclidean     w = -2p,  c = ||p||^2,  plus an encrypted ||g||^2 column
    euclidean_l2  w = -2p,  c = 2         (unit vectors: ||g|| = ||p|| = 1)
    cosine        w = -p,   c = 1

Constants are added as ``c + ic`` so that both parts receive them; the edge's
encrypted ``||p||^2`` is encrypted that way too.

Measured on the 2-core benchmark machine (N=8192, 128-d):

- Columns live at the *lowest* modulus level (one 60-bit prime). Gallery values
  are encoded at scale 2^25 and probe weights at 2^25, so the product sits at
  2^50 with 9 bits of headroom: no rescaling is ever needed, and the ciphertext
  is a third of a fresh one (131 KB instead of 235 KB in memory).
- On-prem encrypts columns *symmetrically* with the secret key, and ships them
  seeded (SEAL stores the 64-byte PRNG seed instead of the uniform half): 65.7 KB
  per column instead of 131 KB; with two templates per slot that is about
  1.03 KB per 128-d template (1.04 KB with the euclidean norm column) against
  230 KB seed-style (one ciphertext per template).
- A plaintext probe costs 128 plaintext multiplications per block of 8192
  templates: about 8 ms, i.e. ~1,000,000 inner products per second per core.
  An encrypted probe (``d`` ciphertexts, each one probe component in every slot,
  made with the public key at the edge) costs 128 ciphertext products, left
  unrelinearised: about 16 ms per block (~520,000 per second per core). The
  decrypted score then has three components, which decryption handles.
- A million templates are 123 blocks: 0.48 s of cloud search and 0.18 s of
  on-prem decryption and top-5 on 2 cores, 25x plaintext numpy. Batched 1:1
  (`verify_pairs`) needs two rounds for a full block and verifies ~56,000
  claims per second, 380x one-ciphertext-per-template verification.
- TenSEAL's SEAL bindings hold the GIL, so threads do not parallelise; with
  ``workers > 1`` the gallery shards its blocks over worker *processes* that each
  deserialize and keep their share, and searches fan out to all of them.
- Precision, the same in both parts of a slot: plaintext probes decrypt within
  ~5e-5 of numpy on scores of order 1 (1e-4 on raw euclidean distances near 10),
  encrypted probes within ~4e-4 (9e-4), from public-key encryption noise at
  scale 2^25. Scores must stay below 2^9 in magnitude, which limits euclidean
  embeddings to ``||x||^2 <= MAX_SQUARED_NORM``.

Who knows what: the cloud sees template ids and subject labels (it must, to route
1:1 requests), never embeddings or distances. On-prem is the layout authority: the
`EnrollmentBook` decides which template sits at which position, and `rank` maps
decrypted positions back to subjects through the book, for the block version the
scores were computed on, so a stale or tampered cloud label cannot name a match.
"""

from __future__ import annotations

import heapq
import logging
import multiprocessing
import os
import sqlite3
import tempfile
import threading
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import tenseal.sealapi as sealapi

from cipherface.crypto import Keyring, Metric, decision, prepare_embedding
from cipherface.exceptions import (
    CipherFaceError,
    CiphertextError,
    ConfigError,
    KeyMismatchError,
    SecretKeyError,
    StoreError,
    WireFormatError,
)
from cipherface.fields import blobs, field, strings

if TYPE_CHECKING:
    from cipherface.store import GalleryStore

__all__ = [
    "MAX_SQUARED_NORM",
    "BlockScores",
    "EncryptedBlock",
    "EncryptedGallery",
    "EncryptedProbe",
    "EnrollmentBook",
    "Match",
    "accept",
    "encrypt_probe",
    "rank",
    "rank_pairs",
]

log = logging.getLogger(__name__)

#: Gallery values and probe weights are both encoded at 2^25: the product lands at
#: 2^50 under the 60-bit lowest prime, leaving 9 bits for the score itself.
_SCALE_BITS = 25
_VALUE_SCALE = 2.0**_SCALE_BITS
_SCORE_SCALE = 2.0 ** (2 * _SCALE_BITS)
#: Euclidean embeddings above this squared norm could push a squared distance
#: (at most 4x this) past the 2^9 headroom, where CKKS wraps around silently.
MAX_SQUARED_NORM = 120.0
#: A real weight multiplies both templates of a slot, but a constant added to the
#: scores must be c + ic to reach the imaginary part's template as well.
_BOTH_PARTS = 1 + 1j


# -- SEAL plumbing -------------------------------------------------------------------


def _scratch_dir() -> str | None:
    # TenSEAL's raw SEAL bindings serialize only through files; tmpfs keeps that
    # a memory copy.
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


class _Seal:
    """Raw SEAL objects for one keyring: encoder, evaluator, encryptors, (de)serialization."""

    def __init__(self, keyring: Keyring) -> None:
        self.fingerprint = keyring.fingerprint
        self.context = keyring.context.seal_context().data
        self.level = self.context.last_parms_id()
        if self.context.last_context_data().total_coeff_modulus_bit_count() < 2 * _SCALE_BITS + 10:
            raise ConfigError("the lowest CKKS prime must have at least 60 bits for the gallery")
        self.encoder = sealapi.CKKSEncoder(self.context)
        self.evaluator = sealapi.Evaluator(self.context)
        self.slots = int(self.encoder.slot_count())
        #: Templates per block: one in the real and one in the imaginary part of each slot.
        self.capacity = 2 * self.slots
        self.public = sealapi.Encryptor(self.context, keyring.context.public_key().data)
        self.secret: Any = None
        self.decryptor: Any = None
        if keyring.is_private:
            secret_key = keyring.context.secret_key().data
            self.secret = sealapi.Encryptor(self.context, secret_key)
            self.decryptor = sealapi.Decryptor(self.context, secret_key)
        self._lock = threading.Lock()
        fd, self._path = tempfile.mkstemp(prefix="cipherface-", suffix=".seal", dir=_scratch_dir())
        os.close(fd)
        weakref.finalize(self, _unlink, self._path)

    def plain(
        self, value: float | complex | Sequence[float] | Sequence[complex], scale: float
    ) -> Any:
        plain = sealapi.Plaintext()
        self.encoder.encode(value, self.level, scale, plain)
        return plain

    def dump(self, obj: Any) -> bytes:
        with self._lock:
            obj.save(self._path)
            return Path(self._path).read_bytes()

    def load(self, data: bytes) -> Any:
        ciphertext = sealapi.Ciphertext()
        with self._lock:
            Path(self._path).write_bytes(data)
            try:
                ciphertext.load(self.context, self._path)
            except (ValueError, RuntimeError, TypeError) as exc:
                raise CiphertextError("bytes are not a CKKS ciphertext under this context") from exc
        if ciphertext.parms_id() != self.level:
            raise CiphertextError("gallery ciphertexts must be at the lowest modulus level")
        return ciphertext

    def pack(self, values: np.ndarray) -> list[complex]:
        """Template-ordered values (at most `capacity`) as complex slots.

        Template ``k`` goes to slot ``k % slots``: the real part for ``k < slots``,
        the imaginary part otherwise, so `unpack` is a concatenation.
        """
        packed = np.zeros(self.slots, dtype=np.complex128)
        packed.real[: min(values.size, self.slots)] = values[: self.slots]
        packed.imag[: max(values.size - self.slots, 0)] = values[self.slots :]
        return packed.tolist()

    def unpack(self, plain: Any) -> np.ndarray:
        """Inverse of `pack`: all `capacity` values of a decrypted plaintext, in template order."""
        packed = np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128)
        return np.concatenate([packed.real, packed.imag])

    def encrypt_seeded(self, values: np.ndarray, scale: float) -> bytes:
        """Symmetric encryption of `pack`ed ``values``, the seed serialized for the random half."""
        if self.secret is None:
            raise SecretKeyError("gallery blocks are encrypted on-prem, with the secret key")
        return self.dump(self.secret.encrypt_symmetric(self.plain(self.pack(values), scale)))

    def encrypt_public(self, value: float | complex, scale: float) -> bytes:
        ciphertext = sealapi.Ciphertext()
        self.public.encrypt(self.plain(value, scale), ciphertext)
        return self.dump(ciphertext)

    def decrypt(self, data: bytes) -> np.ndarray:
        if self.decryptor is None:
            raise SecretKeyError("only on-prem, holding the secret key, can decrypt scores")
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(self.load(data), plain)
        return self.unpack(plain)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _encrypt_columns(
    seal: _Seal, matrix: np.ndarray, metric: Metric
) -> tuple[tuple[bytes, ...], bytes | None]:
    """Columns (and the euclidean norm column) of one block; ``matrix`` is templates x d."""
    columns = tuple(seal.encrypt_seeded(matrix[:, j], _VALUE_SCALE) for j in range(matrix.shape[1]))
    norms = None
    if metric is Metric.EUCLIDEAN:
        norms = seal.encrypt_seeded(np.einsum("ij,ij->i", matrix, matrix), _SCORE_SCALE)
    return columns, norms


def _check_norm(vector: np.ndarray, metric: Metric) -> None:
    if metric is Metric.EUCLIDEAN and float(vector @ vector) > MAX_SQUARED_NORM:
        raise ConfigError(
            f"euclidean embeddings must have squared norm <= {MAX_SQUARED_NORM} to stay in the "
            "encrypted range; use euclidean_l2 or cosine for unnormalised models"
        )


def _weights(metric: Metric) -> tuple[float, float]:
    """(factor on the probe, constant added): see the module docstring's table."""
    if metric is Metric.COSINE:
        return -1.0, 1.0
    if metric is Metric.EUCLIDEAN_L2:
        return -2.0, 2.0
    return -2.0, 0.0


# -- messages ------------------------------------------------------------------------


def _metric(data: Mapping[str, object]) -> str:
    value = field(data, "metric", str)
    try:
        return Metric(value).value
    except ValueError:
        raise WireFormatError(f"unknown metric {value!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedBlock:
    """One column-packed block: what on-prem ships and the cloud stores.

    ``columns[j]`` is a seeded ciphertext holding component ``j`` of every template
    of the block, two per slot (see the module docstring); ``norms`` holds each
    template's ``||g||^2`` the same way, for the euclidean metric.
    """

    block_id: int
    #: Bumps on every re-encryption; the cloud keeps the highest it has seen.
    version: int
    fingerprint: str
    metric: str
    dimensions: int
    #: One per allocated position, in position order; '' marks a freed one.
    template_ids: tuple[str, ...]
    subjects: tuple[str, ...]
    columns: tuple[bytes, ...]
    norms: bytes | None

    def to_dict(self) -> dict[str, object]:
        """msgpack-native form (ints, strings, bytes, lists, None)."""
        return {
            "block_id": self.block_id,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "metric": self.metric,
            "dimensions": self.dimensions,
            "template_ids": list(self.template_ids),
            "subjects": list(self.subjects),
            "columns": list(self.columns),
            "norms": self.norms,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> EncryptedBlock:
        """Inverse of `to_dict`; raises `WireFormatError` on any inconsistency."""
        metric = _metric(data)
        block = cls(
            block_id=field(data, "block_id", int),
            version=field(data, "version", int),
            fingerprint=field(data, "fingerprint", str),
            metric=metric,
            dimensions=field(data, "dimensions", int),
            template_ids=strings(data, "template_ids"),
            subjects=strings(data, "subjects"),
            columns=blobs(data, "columns"),
            norms=field(data, "norms", (bytes, type(None))),
        )
        if block.block_id < 0 or block.version < 1 or block.dimensions < 1:
            raise WireFormatError("block id, version and dimensions must be positive")
        if len(block.columns) != block.dimensions:
            raise WireFormatError("a block needs one column per dimension")
        if len(block.template_ids) != len(block.subjects):
            raise WireFormatError("a block needs one subject per template slot")
        if (block.norms is None) == (metric == Metric.EUCLIDEAN.value):
            raise WireFormatError("the euclidean metric, and only it, carries a norm column")
        return block


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockScores:
    """Encrypted scores of one block, cloud -> on-prem.

    ``scores`` decrypts, at position ``k``, to the metric's value (squared for
    euclidean metrics) against the block's template ``k``. For batched 1:1
    (`verify_pairs`), ``pairs[k]`` is the index of the pair scored at position ``k``
    (-1: none, and that position's value is meaningless).
    """

    block_id: int
    version: int
    scores: bytes
    pairs: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """msgpack-native form."""
        return {
            "block_id": self.block_id,
            "version": self.version,
            "scores": self.scores,
            "pairs": list(self.pairs),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> BlockScores:
        """Inverse of `to_dict`; raises `WireFormatError`."""
        pairs = field(data, "pairs", (list, tuple)) if "pairs" in data else ()
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in pairs):
            raise WireFormatError("field 'pairs' must hold integers")
        return cls(
            block_id=field(data, "block_id", int),
            version=field(data, "version", int),
            scores=field(data, "scores", bytes),
            pairs=tuple(pairs),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedProbe:
    """A probe encrypted at the edge with the public context.

    ``columns[j]`` encrypts the weighted component ``w * p_j`` in every slot (see the
    module docstring), so the cloud multiplies it straight into column ``j``;
    ``norm`` encrypts ``||p||^2`` for the euclidean metric.
    """

    fingerprint: str
    metric: str
    dimensions: int
    columns: tuple[bytes, ...]
    norm: bytes | None

    def to_dict(self) -> dict[str, object]:
        """msgpack-native form."""
        return {
            "fingerprint": self.fingerprint,
            "metric": self.metric,
            "dimensions": self.dimensions,
            "columns": list(self.columns),
            "norm": self.norm,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> EncryptedProbe:
        """Inverse of `to_dict`; raises `WireFormatError`."""
        metric = _metric(data)
        probe = cls(
            fingerprint=field(data, "fingerprint", str),
            metric=metric,
            dimensions=field(data, "dimensions", int),
            columns=blobs(data, "columns"),
            norm=field(data, "norm", (bytes, type(None))),
        )
        if len(probe.columns) != probe.dimensions or probe.dimensions < 1:
            raise WireFormatError("a probe needs one ciphertext per dimension")
        if (probe.norm is None) == (metric == Metric.EUCLIDEAN.value):
            raise WireFormatError("the euclidean metric, and only it, carries a probe norm")
        return probe


def encrypt_probe(keyring: Keyring, embedding: np.ndarray, metric: Metric) -> EncryptedProbe:
    """Encrypt a probe at the edge (public context suffices) for any gallery of ``metric``.

    About 0.13 MB per dimension (16.8 MB at 128-d): the price of needing no
    rotation keys at the cloud.
    """
    seal = _Seal(keyring)
    vector = prepare_embedding(embedding, metric)
    _check_norm(vector, metric)
    factor, _ = _weights(metric)
    columns = tuple(seal.encrypt_public(factor * float(v), _VALUE_SCALE) for v in vector)
    norm = None
    if metric is Metric.EUCLIDEAN:
        norm = seal.encrypt_public(float(vector @ vector) * _BOTH_PARTS, _SCORE_SCALE)
    return EncryptedProbe(
        fingerprint=keyring.fingerprint,
        metric=metric.value,
        dimensions=int(vector.size),
        columns=columns,
        norm=norm,
    )


# -- on-prem: enrollment book ----------------------------------------------------------

_BOOK_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS templates (
    template_id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    block INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    UNIQUE (block, slot)
);
CREATE TABLE IF NOT EXISTS blocks (
    block_id INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    pending INTEGER NOT NULL,
    shipped BLOB
);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Shipped:
    """A block's layout as of its last encryption: what the cloud's scores refer to."""

    version: int
    template_ids: tuple[str, ...]
    subjects: tuple[str, ...]


class EnrollmentBook:
    """On-prem plaintext templates and their positions: the authority on the layout.

    Embeddings are kept (prepared for the metric) so that a block can be
    re-encrypted whole after an addition or removal; ``path`` is a SQLite file,
    None keeps everything in memory.
    """

    def __init__(
        self,
        keyring: Keyring,
        metric: Metric | str,
        dimensions: int,
        path: str | Path | None = None,
    ) -> None:
        if not keyring.is_private:
            raise SecretKeyError("the enrollment book lives on-prem, with the secret key")
        if dimensions < 1:
            raise ConfigError("dimensions must be positive")
        self.keyring = keyring
        self.metric = Metric.parse(metric)
        self.dimensions = dimensions
        self._seal = _Seal(keyring)
        #: Templates per block (twice the CKKS slot count: see the module docstring).
        self.capacity = self._seal.capacity
        self.path = None if path is None else Path(path)
        try:
            self._db = sqlite3.connect(
                ":memory:" if path is None else str(path), check_same_thread=False
            )
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_BOOK_SCHEMA)
            self._check_meta()
            self._load_index()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the enrollment book at {path}: {exc}") from exc

    def _changes_seen(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def refresh(self) -> bool:
        """Reload the index if another process (``cipherface enroll``) changed the book.

        SQLite's ``data_version`` moves only when *another* connection commits, so
        this is one cheap query when nothing changed; the on-prem daemon calls it
        before it encrypts or ranks.
        """
        try:
            if self._changes_seen() == self._seen_version:
                return False
            self._load_index()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the enrollment book: {exc}") from exc
        return True

    def _check_meta(self) -> None:
        wanted = {
            "fingerprint": self.keyring.fingerprint,
            "metric": self.metric.value,
            "dimensions": str(self.dimensions),
            "capacity": str(self.capacity),
        }
        stored = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not stored:
            with self._db:
                self._db.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())
            return
        if stored.get("fingerprint") != wanted["fingerprint"]:
            raise KeyMismatchError(wanted["fingerprint"], str(stored.get("fingerprint")))
        if "capacity" not in stored:
            # Books of the one-template-per-slot layout recorded "slots" instead: their
            # slot numbers mean other positions now, so they cannot be read as they are.
            raise ConfigError(
                f"the book at {self.path} uses the older one-template-per-slot layout; "
                "enroll its templates into a new book"
            )
        for key in ("metric", "dimensions", "capacity"):
            if stored.get(key) != wanted[key]:
                raise ConfigError(
                    f"the book at {self.path} has {key}={stored.get(key)}, not {wanted[key]}"
                )

    def _load_index(self) -> None:
        self._seen_version = self._changes_seen()
        self._where: dict[str, tuple[int, int]] = {}
        self._subject: dict[str, str] = {}
        self._layout: dict[int, list[str]] = {}
        for template_id, subject, block, slot in self._db.execute(
            "SELECT template_id, subject, block, slot FROM templates"
        ):
            self._where[template_id] = (block, slot)
            self._subject[template_id] = subject
            row = self._layout.setdefault(block, [])
            row.extend([""] * (slot + 1 - len(row)))
            row[slot] = template_id
        self._shipped: dict[int, _Shipped] = {}
        self._version: dict[int, int] = {}
        self._pending: set[int] = set()
        for block_id, version, pending, shipped in self._db.execute("SELECT * FROM blocks"):
            self._version[block_id] = version
            self._layout.setdefault(block_id, [])
            if pending:
                self._pending.add(block_id)
            if shipped is not None:
                ids, subjects = msgpack.unpackb(shipped)
                self._shipped[block_id] = _Shipped(
                    version=version, template_ids=tuple(ids), subjects=tuple(subjects)
                )
        # Freed slots are reused lowest first, so blocks stay dense and few.
        self._free = [
            block * self.capacity + slot
            for block, row in self._layout.items()
            for slot, tid in enumerate(row)
            if not tid
        ]
        heapq.heapify(self._free)
        self._end = max(
            (block * self.capacity + len(row) for block, row in self._layout.items()), default=0
        )

    # -- changes ----------------------------------------------------------------------
    def add(self, subject: str, embedding: np.ndarray, template_id: str | None = None) -> str:
        """Enroll one template of ``subject``; returns its id. Its block becomes pending."""
        return self.add_many([(subject, embedding, template_id)])[0]

    def add_many(
        self, items: Iterable[tuple[str, np.ndarray] | tuple[str, np.ndarray, str | None]]
    ) -> list[str]:
        """Enroll many templates in one transaction (1M enrollments take seconds, not hours)."""
        rows: list[tuple[str, str, bytes]] = []
        fresh: set[str] = set()
        for item in items:
            subject, embedding = item[0], item[1]
            template_id = (item[2] if len(item) > 2 else None) or uuid.uuid4().hex
            if not subject:
                raise ConfigError("a template needs a non-empty subject")
            if template_id in self._where or template_id in fresh:
                raise ConfigError(f"template id {template_id!r} is already enrolled")
            vector = prepare_embedding(embedding, self.metric)
            if vector.shape != (self.dimensions,):
                raise ConfigError(
                    f"expected a {self.dimensions}-d embedding, got shape {vector.shape}"
                )
            _check_norm(vector, self.metric)
            fresh.add(template_id)
            rows.append((template_id, subject, vector.tobytes()))
        placed = []
        for template_id, subject, blob in rows:
            index = heapq.heappop(self._free) if self._free else self._end
            self._end = max(self._end, index + 1)
            block, slot = divmod(index, self.capacity)
            placed.append((template_id, subject, block, slot, blob))
        try:
            with self._db:
                self._db.executemany("INSERT INTO templates VALUES (?, ?, ?, ?, ?)", placed)
                for block in {p[2] for p in placed}:
                    self._mark(block)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the enrollment book: {exc}") from exc
        for template_id, subject, block, slot, _ in placed:
            self._where[template_id] = (block, slot)
            self._subject[template_id] = subject
            row = self._layout.setdefault(block, [])
            row.extend([""] * (slot + 1 - len(row)))
            row[slot] = template_id
        return [p[0] for p in placed]

    def remove(self, template_id: str) -> None:
        """Withdraw one template; its position is freed and its block becomes pending."""
        try:
            block, slot = self._where[template_id]
        except KeyError:
            raise ConfigError(f"no enrolled template {template_id!r}") from None
        try:
            with self._db:
                self._db.execute("DELETE FROM templates WHERE template_id = ?", (template_id,))
                self._mark(block)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the enrollment book: {exc}") from exc
        del self._where[template_id], self._subject[template_id]
        self._layout[block][slot] = ""
        heapq.heappush(self._free, block * self.capacity + slot)

    def remove_subject(self, subject: str) -> int:
        """Withdraw every template of ``subject``; returns how many there were."""
        ids = [tid for tid, s in self._subject.items() if s == subject]
        for template_id in ids:
            self.remove(template_id)
        return len(ids)

    def _mark(self, block: int) -> None:
        self._db.execute(
            "INSERT INTO blocks (block_id, version, pending) VALUES (?, 0, 1) "
            "ON CONFLICT(block_id) DO UPDATE SET pending = 1",
            (block,),
        )
        self._version.setdefault(block, 0)
        self._pending.add(block)

    # -- encryption ---------------------------------------------------------------------
    def pending_blocks(self) -> list[int]:
        """Blocks changed since they were last encrypted."""
        return sorted(self._pending)

    def all_blocks(self) -> list[int]:
        """Every block that has ever held a template."""
        return sorted(self._layout)

    def _matrix(self, block_id: int) -> tuple[np.ndarray, list[str]]:
        row = list(self._layout.get(block_id, []))
        matrix = np.zeros((max(len(row), 1), self.dimensions))
        for slot, blob in self._db.execute(
            "SELECT slot, embedding FROM templates WHERE block = ?", (block_id,)
        ):
            matrix[slot] = np.frombuffer(blob, dtype=np.float64)
        return matrix, row

    def _ship(
        self, block_id: int, row: list[str], columns: tuple[bytes, ...], norms: bytes | None
    ) -> EncryptedBlock:
        subjects = [self._subject.get(tid, "") for tid in row]
        try:
            with self._db:
                # The version moves inside the write transaction, not from memory, so a
                # second writer (``cipherface enroll`` beside the daemon) can never ship
                # two different blocks under one version. It moves only when the block
                # changed: re-shipping an unchanged block (a replica's sync) keeps the
                # version, so scores computed on the copy a replica holds stay valid.
                self._db.execute(
                    "INSERT INTO blocks (block_id, version, pending) VALUES (?, 0, 1) "
                    "ON CONFLICT(block_id) DO NOTHING",
                    (block_id,),
                )
                self._db.execute(
                    "UPDATE blocks SET version = version + "
                    "(CASE WHEN pending = 1 OR shipped IS NULL THEN 1 ELSE 0 END), "
                    "pending = 0, shipped = ? WHERE block_id = ?",
                    (msgpack.packb([row, subjects]), block_id),
                )
                (version,) = self._db.execute(
                    "SELECT version FROM blocks WHERE block_id = ?", (block_id,)
                ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the enrollment book: {exc}") from exc
        self._version[block_id] = version
        self._pending.discard(block_id)
        self._shipped[block_id] = _Shipped(
            version=version, template_ids=tuple(row), subjects=tuple(subjects)
        )
        return EncryptedBlock(
            block_id=block_id,
            version=version,
            fingerprint=self.keyring.fingerprint,
            metric=self.metric.value,
            dimensions=self.dimensions,
            template_ids=tuple(row),
            subjects=tuple(subjects),
            columns=columns,
            norms=norms,
        )

    def encrypt_block(self, block_id: int) -> EncryptedBlock:
        """Re-encrypt a whole block and clear its pending mark (new version if it changed)."""
        if block_id not in self._layout:
            raise ConfigError(f"no block {block_id}")
        matrix, row = self._matrix(block_id)
        return self._ship(block_id, row, *_encrypt_columns(self._seal, matrix, self.metric))

    def encrypt_blocks(
        self, block_ids: Iterable[int] | None = None, *, workers: int = 1
    ) -> Iterator[EncryptedBlock]:
        """Encrypt many blocks (default: the pending ones), yielding each as it is ready.

        Encryption is CPU-bound under the GIL, so ``workers > 1`` runs it in
        worker processes that receive the secret context over a local pipe.
        """
        ids = self.pending_blocks() if block_ids is None else list(block_ids)
        if workers <= 1 or len(ids) <= 1:
            for block_id in ids:
                yield self.encrypt_block(block_id)
            return
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_encryptor,
            initargs=(self.keyring.secret_bytes(), self.metric.value),
        ) as pool:
            # Submit a bounded window so that blocks waiting to be consumed never
            # pile up in memory for a million-template gallery.
            window: list[tuple[int, list[str], Any]] = []
            pending = iter(ids)
            while True:
                while len(window) < 2 * workers:
                    block_id = next(pending, None)
                    if block_id is None:
                        break
                    matrix, row = self._matrix(block_id)
                    window.append((block_id, row, pool.submit(_encrypt_in_worker, matrix)))
                if not window:
                    return
                block_id, row, future = window.pop(0)
                yield self._ship(block_id, row, *future.result())

    # -- queries ----------------------------------------------------------------------
    def shipped(self, block_id: int) -> _Shipped | None:
        """The block's layout as last encrypted (None if never encrypted)."""
        return self._shipped.get(block_id)

    def slot_of(self, template_id: str) -> tuple[int, int]:
        """(block, position in the block) a template occupies."""
        try:
            return self._where[template_id]
        except KeyError:
            raise ConfigError(f"no enrolled template {template_id!r}") from None

    def subject_of(self, template_id: str) -> str:
        """The subject a template belongs to."""
        try:
            return self._subject[template_id]
        except KeyError:
            raise ConfigError(f"no enrolled template {template_id!r}") from None

    def subjects(self) -> list[str]:
        """Enrolled subjects, sorted."""
        return sorted(set(self._subject.values()))

    def template_ids(self, subject: str | None = None) -> list[str]:
        """Enrolled template ids (of one subject, if given)."""
        return [tid for tid, s in self._subject.items() if subject is None or s == subject]

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        """Close the book's database."""
        self._db.close()

    def __enter__(self) -> EnrollmentBook:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_worker_seal: list[tuple[_Seal, Metric]] = []


def _init_encryptor(secret: bytes, metric: str) -> None:
    # Runs in a spawned encryption worker: the one place a per-process global is
    # the simplest correct holder of the worker's SEAL objects.
    _worker_seal.append((_Seal(Keyring.from_bytes(secret, expect="secret")), Metric(metric)))


def _encrypt_in_worker(matrix: np.ndarray) -> tuple[tuple[bytes, ...], bytes | None]:
    seal, metric = _worker_seal[0]
    return _encrypt_columns(seal, matrix, metric)


# -- cloud: encrypted gallery ----------------------------------------------------------


class _Engine:
    """Deserialized blocks of one shard and the arithmetic on them."""

    def __init__(self, keyring: Keyring) -> None:
        self.seal = _Seal(keyring)
        self.blocks: dict[int, tuple[int, list[Any], Any]] = {}

    def put(
        self, block_id: int, version: int, columns: Sequence[bytes], norms: bytes | None
    ) -> None:
        loaded = [self.seal.load(c) for c in columns]
        self.blocks[block_id] = (version, loaded, None if norms is None else self.seal.load(norms))

    def drop(self, block_id: int) -> None:
        self.blocks.pop(block_id, None)

    def score(
        self, request: tuple[Any, ...], block_ids: Sequence[int]
    ) -> list[tuple[int, int, bytes]]:
        seal = self.seal
        kind = request[0]
        if kind == "plain":
            weights = [seal.plain(float(w), _VALUE_SCALE) for w in request[1]]
            probe, const = weights, request[2]
        elif kind == "encrypted":
            probe = [seal.load(c) for c in request[1]]
            const = request[3]
            extra = None if request[2] is None else seal.load(request[2])
        out = []
        for block_id in block_ids:
            version, columns, norms = self.blocks[block_id]
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
            if norms is not None:
                seal.evaluator.add_inplace(result, norms)
            out.append((block_id, version, seal.dump(result)))
        return out

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
                continue  # SEAL refuses products that would be transparent
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
    """Worker-process loop: one `_Engine`, driven by (method, args) messages."""
    engine = _Engine(Keyring.from_bytes(context, expect="public"))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        name, args = message
        try:
            conn.send(("ok", getattr(engine, name)(*args)))
        except CipherFaceError as exc:
            conn.send(("error", str(exc)))


class _Shard:
    """An `_Engine` in this process or in a worker; call `send` on all, then `receive`."""

    def __init__(self, keyring: Keyring, remote: bool) -> None:
        self._engine: _Engine | None = None
        self._result: Any = None
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
            self._result = getattr(self._engine, name)(*args)
        else:
            self._conn.send((name, args))

    def receive(self) -> Any:
        if self._engine is not None:
            return self._result
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise CiphertextError("a gallery worker process died") from None
        if status != "ok":
            raise CiphertextError(value)
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


class EncryptedGallery:
    """The cloud's gallery: encrypted blocks, their labels, and encrypted search.

    Holds only a public keyring. With a ``store`` every accepted block is persisted
    and the gallery reloads from it on start. ``workers > 1`` shards blocks over
    that many worker processes (use the core count for large galleries).
    """

    def __init__(
        self, keyring: Keyring, store: GalleryStore | None = None, *, workers: int = 1
    ) -> None:
        self.keyring = keyring
        self.store = store
        self.metric: Metric | None = None
        self.dimensions: int | None = None
        self._layouts: dict[int, _Shipped] = {}
        self._slots = keyring.slots
        self._lock = threading.Lock()
        self._shards = [_Shard(keyring, workers > 1) for _ in range(max(workers, 1))]
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
        with self._lock:
            shard = self._shard(block.block_id)
            shard.send("put", block.block_id, block.version, block.columns, block.norms)
            shard.receive()
        self._layouts[block.block_id] = _Shipped(
            version=block.version, template_ids=block.template_ids, subjects=block.subjects
        )

    def _shard(self, block_id: int) -> _Shard:
        return self._shards[block_id % len(self._shards)]

    def _fan_out(self, request: tuple[Any, ...], block_ids: Iterable[int]) -> list[BlockScores]:
        by_shard: dict[int, list[int]] = {}
        for block_id in block_ids:
            by_shard.setdefault(block_id % len(self._shards), []).append(block_id)
        with self._lock:
            for index, ids in by_shard.items():
                self._shards[index].send("score", request, ids)
            results = [r for index in by_shard for r in self._shards[index].receive()]
        return sorted(
            (BlockScores(block_id=b, version=v, scores=s) for b, v, s in results),
            key=lambda scores: scores.block_id,
        )

    def search(
        self, probe: np.ndarray | Sequence[float] | EncryptedProbe, *, subject: str | None = None
    ) -> list[BlockScores]:
        """Encrypted scores of ``probe`` against every template (or ``subject``'s: 1:1).

        A plaintext probe is one the cloud embedded itself; an `EncryptedProbe` was
        made at the edge. Both decrypt to the same values (see the module docstring
        for their precision).
        """
        if self.metric is None:
            return []
        if isinstance(probe, EncryptedProbe):
            self.keyring.check(probe.fingerprint)
            if probe.metric != self.metric.value or probe.dimensions != self.dimensions:
                raise ConfigError("the probe was encrypted for another metric or dimension")
            request: tuple[Any, ...] = (
                "encrypted",
                probe.columns,
                probe.norm,
                _weights(self.metric)[1],
            )
        else:
            vector = prepare_embedding(probe, self.metric)
            if vector.shape != (self.dimensions,):
                raise ConfigError(f"expected a {self.dimensions}-d probe, got {vector.shape}")
            _check_norm(vector, self.metric)
            factor, const = _weights(self.metric)
            if self.metric is Metric.EUCLIDEAN:
                const = float(vector @ vector)
            request = ("plain", (factor * vector).tolist(), const)
        return self._fan_out(request, self._blocks_of(subject))

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
        for block_id, layout in self._layouts.items():
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

    def _blocks_of(self, subject: str | None) -> list[int]:
        return sorted(
            block_id
            for block_id, layout in self._layouts.items()
            if subject is None or subject in layout.subjects
        )

    def subjects(self) -> list[str]:
        """Subjects with at least one template, sorted."""
        return sorted({s for layout in self._layouts.values() for s in layout.subjects if s})

    def __len__(self) -> int:
        return sum(1 for layout in self._layouts.values() for t in layout.template_ids if t)

    def close(self) -> None:
        """Stop worker processes (the store, owned by the caller, stays open)."""
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> EncryptedGallery:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- on-prem: decisions ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    """One candidate of a search, as on-prem decrypted it."""

    subject: str
    template_id: str
    #: The metric's real distance (square root taken for euclidean metrics).
    distance: float
    #: What decryption gave: squared for euclidean metrics, as `decision` expects.
    score: float


def accept(match: Match, threshold: float, metric: Metric | str) -> bool:
    """Whether ``match`` is within the model's ``threshold`` (e.g. `embedding.threshold`)."""
    return decision(match.score, threshold, Metric.parse(metric))


def _decrypted(
    keyring: Keyring, book: EnrollmentBook, scores: Sequence[BlockScores]
) -> Iterator[tuple[BlockScores, _Shipped, np.ndarray]]:
    keyring.check(book.keyring.fingerprint)
    seal = book._seal if keyring is book.keyring else _Seal(keyring)
    for block in scores:
        layout = book.shipped(block.block_id)
        if layout is None or layout.version != block.version:
            # The cloud scored a layout on-prem no longer vouches for: its positions may
            # now belong to other people, so the block is skipped, never guessed at.
            log.warning(
                "ignoring scores of block %d version %d (on-prem has version %s)",
                block.block_id,
                block.version,
                None if layout is None else layout.version,
            )
            continue
        values = seal.decrypt(block.scores)[: len(layout.template_ids)]
        yield block, layout, values


def _match(subject: str, template_id: str, score: float, metric: Metric) -> Match:
    distance = float(np.sqrt(max(score, 0.0))) if metric.squared else score
    return Match(subject=subject, template_id=template_id, distance=distance, score=score)


def rank(
    keyring: Keyring,
    book: EnrollmentBook,
    scores: Sequence[BlockScores],
    *,
    subject: str | None = None,
    top_k: int = 5,
    per_subject: bool = True,
) -> list[Match]:
    """On-prem: decrypt 1:N scores and return the ``top_k`` nearest, nearest first.

    Positions are named through the book's own layout of the scored version; freed
    ones are ignored. ``per_subject`` keeps only each subject's best template.
    """
    pool: list[Match] = []
    for _, layout, values in _decrypted(keyring, book, scores):
        ids = np.array(layout.template_ids, dtype=object)
        names = np.array(layout.subjects, dtype=object)
        keep = ids != ""
        if subject is not None:
            keep &= names == subject
        positions = np.flatnonzero(keep)
        # Within a block, the k best distinct subjects (or templates) are all the
        # block can contribute to the global top k: stop there.
        seen: set[str] = set()
        taken = 0
        for position in positions[np.argsort(values[positions], kind="stable")]:
            if per_subject and names[position] in seen:
                continue
            seen.add(names[position])
            pool.append(
                _match(names[position], ids[position], float(values[position]), book.metric)
            )
            taken += 1
            if taken >= top_k:
                break
    pool.sort(key=lambda m: m.score)
    if not per_subject:
        return pool[:top_k]
    best: dict[str, Match] = {}
    for match in pool:
        best.setdefault(match.subject, match)
    return list(best.values())[:top_k]


def rank_pairs(
    keyring: Keyring, book: EnrollmentBook, scores: Sequence[BlockScores], count: int
) -> list[Match | None]:
    """On-prem: the best match of each of ``count`` `verify_pairs` claims (None: unscored).

    Decide each with `accept`. Only templates of the claimed subject are scored
    for a pair, so the best one answers the claim.
    """
    best: list[Match | None] = [None] * count
    for block, layout, values in _decrypted(keyring, book, scores):
        for position, index in enumerate(block.pairs[: len(layout.template_ids)]):
            if index < 0 or index >= count or not layout.template_ids[position]:
                continue
            current = best[index]
            if current is None or values[position] < current.score:
                best[index] = _match(
                    layout.subjects[position],
                    layout.template_ids[position],
                    float(values[position]),
                    book.metric,
                )
    return best
