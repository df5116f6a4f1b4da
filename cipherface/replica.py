"""A cloud replica's identity: created once, kept in its data folder, held by one process.

A replica's name picks its gallery queue, its signing key (which on-prem trusts)
and its stored gallery, so it must outlive restarts and must never be shared:
two processes on one name would compete on one gallery queue and share one
SQLite file, each holding part of the gallery. The host name fails both ways
(a container gets a new one at every restart; ``--scale`` copies a fixed
``--replica``). So every replica folder ``<data>/cloud-<name>/`` carries a
``replica-id`` file written when the folder is created, and a running replica
holds an exclusive `flock` on the folder's ``.lock`` for as long as it lives
(the kernel releases it when the process dies, even by SIGKILL).

`claim` without a name takes the first folder no running process holds, or
creates a new identity: three replicas started on one data volume
(``docker compose up --scale cloud=3``) take three identities, and after a
restart each takes one of them again, with its key and store.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path

from cipherface.exceptions import ConfigError

__all__ = ["ID_FILE", "ReplicaClaim", "claim", "identities"]

#: The file in a replica's folder that holds its name.
ID_FILE = "replica-id"
_LOCK_FILE = ".lock"
_PREFIX = "cloud-"


class ReplicaClaim:
    """A replica identity this process holds until `release` (or its exit)."""

    def __init__(self, name: str, folder: Path, fd: int) -> None:
        self.name = name
        self.folder = folder
        self._fd: int | None = fd

    def release(self) -> None:
        """Let another process take this identity."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> ReplicaClaim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _lock(folder: Path) -> int | None:
    fd = os.open(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _read_id(folder: Path) -> str | None:
    try:
        return (folder / ID_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def identities(data_dir: Path) -> list[str]:
    """Names of the replica identities kept under ``data_dir``, sorted."""
    found = (_read_id(folder) for folder in sorted(Path(data_dir).glob(f"{_PREFIX}*")))
    return sorted(name for name in found if name)


def claim(data_dir: Path, name: str | None = None) -> ReplicaClaim:
    """Hold a replica identity under ``data_dir``: ``name``'s, or any free one, or a new one.

    Raises `ConfigError` when ``name`` is already held by a running process.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if name is not None:
        folder = data_dir / f"{_PREFIX}{name}"
        folder.mkdir(parents=True, exist_ok=True)
        fd = _lock(folder)
        if fd is None:
            raise ConfigError(
                f"replica {name!r} is already running on {folder}: "
                "each replica needs its own name (or none, to get one)"
            )
        held = _read_id(folder)
        if held is None:
            (folder / ID_FILE).write_text(name + "\n")
        elif held != name:
            os.close(fd)
            raise ConfigError(f"{folder} belongs to replica {held!r}, not {name!r}")
        return ReplicaClaim(name, folder, fd)
    for folder in sorted(data_dir.glob(f"{_PREFIX}*")):
        held = _read_id(folder)
        if held is None or folder.name != f"{_PREFIX}{held}":
            continue
        fd = _lock(folder)
        if fd is not None:
            return ReplicaClaim(held, folder, fd)
    while True:
        fresh = f"replica-{secrets.token_hex(4)}"
        folder = data_dir / f"{_PREFIX}{fresh}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        fd = _lock(folder)
        assert fd is not None  # a folder this process just created
        # Written last: a folder without its id is never taken by another claim.
        (folder / ID_FILE).write_text(fresh + "\n")
        return ReplicaClaim(fresh, folder, fd)
