"""The cloud's encrypted gallery on disk: one SQLite file in a data folder.

The cloud holds nothing it could not lose to a thief (a public context and
ciphertexts), but it must not lose it to a restart either: on-prem would have to
re-encrypt and re-ship every block. SQLite in WAL mode gives atomic block
replacement and readers that never see a half-written block; blocks are stored
in their wire form (`EncryptedBlock.to_dict`, msgpack), so the store needs no
schema change when the block layout gains a field.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import msgpack

from cipherface.exceptions import StoreError, WireFormatError
from cipherface.sqlite import open_shared
from cipherface.wire.payloads import EncryptedBlock

__all__ = ["GalleryStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS context (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    fingerprint TEXT NOT NULL,
    data BLOB NOT NULL,
    conjugation BLOB NOT NULL DEFAULT x'',
    issued_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS blocks (
    block_id INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    payload BLOB NOT NULL
);
"""

#: Context columns added after the first release, with their definitions.
_ADDED_COLUMNS = (
    ("conjugation", "BLOB NOT NULL DEFAULT x''"),
    ("issued_at", "REAL NOT NULL DEFAULT 0"),
)


class GalleryStore:
    """Public context and encrypted blocks of one gallery, in ``path`` (a SQLite file).

    A folder path is accepted too: the file is then ``gallery.sqlite3`` inside it.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "gallery.sqlite3"
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = open_shared(path, self._prepare, autocommit=True)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the gallery store at {path}: {exc}") from exc

    @staticmethod
    def _prepare(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across application crashes in WAL mode; only a power
        # loss may drop the last commits, which on-prem re-ships by version.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(context)")}
        for name, kind in _ADDED_COLUMNS:
            if name not in columns:  # a store written before the column existed
                db.execute(f"ALTER TABLE context ADD COLUMN {name} {kind}")

    def save_context(self, data: bytes, fingerprint: str, conjugation_key: bytes = b"") -> None:
        """Keep the public context the blocks were encrypted for (replacing any other).

        ``conjugation_key`` is the Galois key on-prem ships beside the context, with
        which the replica proves an edge probe's norm.
        """
        self._run(
            "INSERT INTO context (id, fingerprint, data, conjugation) VALUES (1, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET fingerprint = excluded.fingerprint, "
            "data = excluded.data, conjugation = excluded.conjugation",
            (fingerprint, data, conjugation_key),
        )

    def conjugation_key(self) -> bytes:
        """The stored conjugation key (empty when none was stored)."""
        row = self._one("SELECT conjugation FROM context WHERE id = 1")
        return b"" if row is None else bytes(row[0])  # type: ignore[arg-type]

    def save_issued_at(self, issued_at: float) -> None:
        """When on-prem issued the newest context this replica accepted.

        A context under another key issued earlier is a replay (it would drop the
        gallery), and the replica must still know that after a restart.
        """
        self._run("UPDATE context SET issued_at = MAX(issued_at, ?) WHERE id = 1", (issued_at,))

    def issued_at(self) -> float:
        """See `save_issued_at` (0 for a new store)."""
        row = self._one("SELECT issued_at FROM context WHERE id = 1")
        return 0.0 if row is None else float(row[0])  # type: ignore[arg-type]

    def load_context(self) -> bytes | None:
        """The stored public context, or None for a new store."""
        row = self._one("SELECT data FROM context WHERE id = 1")
        return None if row is None else bytes(row[0])

    def context_fingerprint(self) -> str | None:
        """Fingerprint of the stored context, without parsing it."""
        row = self._one("SELECT fingerprint FROM context WHERE id = 1")
        return None if row is None else str(row[0])

    def save_block(self, block: EncryptedBlock) -> bool:
        """Upsert ``block`` unless a version at least as new is stored; True if written.

        The version test is inside the statement, so two writers racing on one
        block cannot leave the older one on disk.
        """
        payload = msgpack.packb(block.to_dict(), use_bin_type=True)
        cursor = self._run(
            "INSERT INTO blocks (block_id, version, payload) VALUES (?, ?, ?) "
            "ON CONFLICT(block_id) DO UPDATE SET version = excluded.version, "
            "payload = excluded.payload WHERE excluded.version > blocks.version",
            (block.block_id, block.version, payload),
        )
        return cursor.rowcount > 0

    def delete_block(self, block_id: int) -> None:
        """Forget a block (e.g. when on-prem withdraws it)."""
        self._run("DELETE FROM blocks WHERE block_id = ?", (block_id,))

    def iter_blocks(self) -> Iterator[EncryptedBlock]:
        """Stored blocks one at a time, by block id: a large gallery never sits twice in memory."""
        try:
            ids = [row[0] for row in self._db.execute("SELECT block_id FROM blocks ORDER BY 1")]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc
        for block_id in ids:
            row = self._one("SELECT payload FROM blocks WHERE block_id = ?", (block_id,))
            if row is None:  # deleted since the id list was read
                continue
            try:
                data = msgpack.unpackb(bytes(row[0]), raw=False)
                yield EncryptedBlock.from_dict(data)
            except (ValueError, msgpack.ExtraData, WireFormatError) as exc:
                raise StoreError(f"block {block_id} in {self.path} is corrupt: {exc}") from exc

    def load_blocks(self) -> list[EncryptedBlock]:
        """Every stored block, by block id."""
        return list(self.iter_blocks())

    def close(self) -> None:
        """Close the database; the store is unusable afterwards."""
        try:
            self._db.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot close {self.path}: {exc}") from exc

    def __enter__(self) -> GalleryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write {self.path}: {exc}") from exc

    def _one(self, sql: str, params: tuple[object, ...] = ()) -> tuple[object, ...] | None:
        try:
            return self._db.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc
