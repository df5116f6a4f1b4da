"""On-prem's gallery over its life: a summary for ``cipherface list``, and rekeying.

Kept beside `cipherface.gallery.book` (whose tables it reads) rather than in it,
so that the book stays about placing and encrypting templates.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cipherface.crypto import Keyring
from cipherface.exceptions import ConfigError, StoreError
from cipherface.gallery.book import EnrollmentBook

__all__ = ["BlockSummary", "block_summary", "rekey"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockSummary:
    """One block as on-prem's book has it."""

    block_id: int
    #: The version last shipped (0: never encrypted).
    version: int
    templates: int
    #: Changed since it was last encrypted.
    pending: bool


def block_summary(book: EnrollmentBook) -> list[BlockSummary]:
    """Every block of the book, by id."""
    return [
        BlockSummary(
            block_id=block,
            version=book._version.get(block, 0),
            templates=sum(1 for tid in book._layout[block] if tid),
            pending=block in book._pending,
        )
        for block in sorted(book._layout)
    ]


def rekey(book: EnrollmentBook, keyring: Keyring, path: Path | None = None) -> EnrollmentBook:
    """A new book under another key: the same templates at the same positions, every
    block pending (to be encrypted under the new key), and its own decoy seed.

    The seed is the new book's own (a new book draws one): the decoys replicas held
    under the old key must tell nothing about those under the new one.
    """
    fresh = EnrollmentBook(keyring, book.metric, book.dimensions, path=path)
    if fresh.capacity != book.capacity or len(fresh):
        fresh.close()
        raise ConfigError("rekeying needs an empty book of the same capacity (same preset)")
    try:
        rows = book._db.execute(
            "SELECT template_id, subject, block, slot, embedding FROM templates"
        ).fetchall()
        with fresh._db:
            fresh._db.executemany("INSERT INTO templates VALUES (?, ?, ?, ?, ?)", rows)
            for table in ("block_shards", "shard_state"):  # the same shards, too
                copied = book._db.execute(f"SELECT * FROM {table}").fetchall()
                marks = ", ".join("?" * len(copied[0])) if copied else ""
                if copied:
                    fresh._db.executemany(f"INSERT INTO {table} VALUES ({marks})", copied)
            for block in book._layout:
                fresh._mark(block)
        fresh._load_index()
    except sqlite3.Error as exc:
        fresh.close()
        raise StoreError(f"cannot write the new enrollment book: {exc}") from exc
    return fresh
