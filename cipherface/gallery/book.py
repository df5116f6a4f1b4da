"""On-prem's enrollment book: the plaintext templates and the authority on the layout.

Who knows what: the cloud sees template ids and subject labels (it must, to route
1:1 requests), never embeddings or distances. On-prem is the layout authority: the
`EnrollmentBook` decides which template sits at which position (the slot
allocator reuses freed positions lowest first), and records, per block version,
the layout it last shipped (`_Shipped`), so that `cipherface.gallery.ranking` can
name decrypted positions for the version the scores were computed on and a stale
or tampered cloud label cannot name a match.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from cipherface.crypto import Keyring, Metric, prepare_embedding
from cipherface.exceptions import ConfigError, KeyMismatchError, SecretKeyError, StoreError
from cipherface.gallery.consistency import decoy_rows
from cipherface.gallery.packing import _check_norm, _encrypt_columns, _Seal
from cipherface.gallery.shards import ShardIndex
from cipherface.gallery.workers import _encrypt_in_worker, _init_encryptor
from cipherface.private import private_file
from cipherface.sqlite import open_shared
from cipherface.wire.payloads import EncryptedBlock

__all__ = ["EnrollmentBook"]

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
CREATE TABLE IF NOT EXISTS ciphertexts (
    block_id INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    payload BLOB NOT NULL
);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Shipped:
    """A block's layout as of its last encryption: what the cloud's scores refer to."""

    version: int
    template_ids: tuple[str, ...]
    subjects: tuple[str, ...]
    #: Whether the positions without a template hold decoys (`decoy_rows`), not zeros.
    decoys: bool = False


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
        #: Templates per block (twice the CKKS slot count: see `cipherface.gallery.packing`).
        self.capacity = self._seal.capacity
        self.path = None if path is None else Path(path)
        try:
            if self.path is not None:
                # Plaintext face embeddings: 0600 before SQLite (and its WAL) exist.
                private_file(self.path)
            self._db = open_shared(self.path, self._prepare)
            self.shards = ShardIndex(self._db, self.capacity)
            self._load_index()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the enrollment book at {path}: {exc}") from exc

    def _prepare(self, db: sqlite3.Connection) -> None:
        self._db = db
        # A removed template's embedding is overwritten with zeros, not left in
        # freed pages; `remove` also truncates the WAL that held its last copy.
        db.execute("PRAGMA secure_delete=ON")
        if self.path is not None:
            db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_BOOK_SCHEMA)
        self._check_meta()

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
        with self._db:
            # The first statement writes, so processes opening a new book at once (the
            # daemon and `cipherface enroll`) take turns and all keep the first's values.
            # The seed is secret: it decides the decoys on-prem fits scores against.
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('decoy_seed', ?)", (secrets.token_hex(16),)
            )
            if self._db.execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 1:  # a new book
                self._db.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())
        stored = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        self._decoy_seed = bytes.fromhex(stored.pop("decoy_seed"))
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
                ids, subjects, *decoys = msgpack.unpackb(shipped)
                self._shipped[block_id] = _Shipped(
                    version=version,
                    template_ids=tuple(ids),
                    subjects=tuple(subjects),
                    decoys=bool(decoys and decoys[0]),
                )
        # Freed slots are reused lowest first, so blocks stay dense and few; each
        # subject's templates stay in one shard's blocks.
        self.shards.load(self._layout, self._subject)

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
            block, slot = divmod(self.shards.place(subject), self.capacity)
            placed.append((template_id, subject, block, slot, blob))
        try:
            with self._db:
                self.shards.save()
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
        self._truncate_wal()
        subject = self._subject.pop(template_id)
        del self._where[template_id]
        self._layout[block][slot] = ""
        left = subject not in self._subject.values()
        self.shards.free(block, slot, subject, left)

    def _truncate_wal(self) -> None:
        """Empty the WAL, which holds the deleted row's page; a reader in another
        process (the daemon beside ``cipherface remove``) may keep it busy a moment."""
        try:
            for _ in range(100):
                if not self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
                    return
                time.sleep(0.05)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot checkpoint the enrollment book: {exc}") from exc
        raise StoreError(f"cannot empty the WAL of {self.path}: a reader keeps it busy")

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
        """Every position of the block: its template, or a decoy where there is none."""
        row = list(self._layout.get(block_id, []))
        empty = [k for k in range(self.capacity) if k >= len(row) or not row[k]]
        matrix = np.empty((self.capacity, self.dimensions))
        matrix[empty] = self.decoys(block_id, empty)
        for slot, blob in self._db.execute(
            "SELECT slot, embedding FROM templates WHERE block = ?", (block_id,)
        ):
            matrix[slot] = np.frombuffer(blob, dtype=np.float64)
        return matrix, row

    def decoys(self, block_id: int, positions: Sequence[int]) -> np.ndarray:
        """The decoy vectors at ``positions`` of a block (see `decoy_rows`)."""
        return decoy_rows(self._decoy_seed, block_id, positions, self.dimensions)

    def embeddings(
        self, wanted: Mapping[int, Iterable[int]]
    ) -> dict[tuple[int, int], tuple[str, np.ndarray]]:
        """(block, position) -> (template id, embedding), for the positions holding one.

        ``wanted`` maps block ids to positions. One indexed query covers every block:
        the consistency fit samples two or three positions in each of 123 blocks at
        a million templates, and a query per block cost 15 ms of each probe.
        """
        pairs = sorted({(block, slot) for block, slots in wanted.items() for slot in slots})
        found: dict[tuple[int, int], tuple[str, np.ndarray]] = {}
        for start in range(0, len(pairs), 500):
            chunk = pairs[start : start + 500]
            rows = ",".join(["(?, ?)"] * len(chunk))
            for block, slot, template_id, blob in self._db.execute(
                f"WITH wanted(block, slot) AS (VALUES {rows}) "
                "SELECT t.block, t.slot, t.template_id, t.embedding FROM wanted "
                "JOIN templates AS t ON t.block = wanted.block AND t.slot = wanted.slot",
                [value for pair in chunk for value in pair],
            ):
                found[(block, slot)] = (template_id, np.frombuffer(blob, dtype=np.float64))
        return found

    def _ship(
        self, block_id: int, row: list[str], columns: tuple[bytes, ...], norms: bytes | None
    ) -> EncryptedBlock:
        subjects = [self._subject.get(tid, "") for tid in row]
        block = EncryptedBlock(
            block_id=block_id,
            version=0,
            fingerprint=self.keyring.fingerprint,
            metric=self.metric.value,
            dimensions=self.dimensions,
            template_ids=tuple(row),
            subjects=tuple(subjects),
            columns=columns,
            norms=norms,
        )
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
                    (msgpack.packb([row, subjects, 1]), block_id),
                )
                (version,) = self._db.execute(
                    "SELECT version FROM blocks WHERE block_id = ?", (block_id,)
                ).fetchone()
                block = dataclasses.replace(block, version=version)
                # Kept, so a replica's sync is answered without re-encrypting.
                self._db.execute(
                    "INSERT OR REPLACE INTO ciphertexts VALUES (?, ?, ?)",
                    (block_id, version, msgpack.packb(block.to_dict(), use_bin_type=True)),
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the enrollment book: {exc}") from exc
        self._version[block_id] = version
        self._pending.discard(block_id)
        self._shipped[block_id] = _Shipped(
            version=version, template_ids=tuple(row), subjects=tuple(subjects), decoys=True
        )
        return block

    def _cached(self, block_id: int) -> EncryptedBlock | None:
        """The block as last shipped, if nothing changed since (same version, not pending)."""
        if block_id in self._pending or block_id not in self._shipped:
            return None
        row = self._db.execute(
            "SELECT version, payload FROM ciphertexts WHERE block_id = ?", (block_id,)
        ).fetchone()
        if row is None or row[0] != self._shipped[block_id].version:
            return None
        return EncryptedBlock.from_dict(msgpack.unpackb(row[1], raw=False))

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

        A block unchanged since it was last shipped comes from the cache of shipped
        ciphertexts, as it was: a sync costs reading, not encrypting. Encryption is
        CPU-bound under the GIL, so ``workers > 1`` runs it in worker processes that
        receive the secret context over a local pipe.
        """
        ids = []
        for block_id in self.pending_blocks() if block_ids is None else block_ids:
            cached = self._cached(block_id)
            if cached is None:
                ids.append(block_id)
            else:
                yield cached
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
