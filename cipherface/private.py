"""Files only their owner may read: keys, the enrollment book, the ledger, the trust store.

On-prem's folder holds the CKKS secret key, the signing key and the plaintext
face embeddings, so it is created 0700 with every file in it 0600, and a folder
or file that group or others can read is refused at start rather than used:
a permission slip is found by the daemon, not by an attacker. SQLite creates its
``-wal`` and ``-shm`` files with the permissions of the database file, so
creating that file 0600 first covers them too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cipherface.exceptions import ConfigError

__all__ = ["check_private", "check_private_tree", "private_dir", "private_file", "write_private"]

_OTHERS = stat.S_IRWXG | stat.S_IRWXO


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) 0700 if absent; refuse one that others can enter."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_private(path)
    return path


def private_file(path: Path) -> Path:
    """Make sure ``path`` exists as a 0600 file (empty if new); refuse a looser one.

    Used before SQLite opens a database, so the database and its WAL/SHM files
    are never briefly readable by others.
    """
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    check_private(path)
    return path


def check_private(path: Path) -> None:
    """Raise `ConfigError` when group or others have any access to ``path``."""
    mode = path.stat().st_mode
    if mode & _OTHERS:
        fix = "700" if stat.S_ISDIR(mode) else "600"
        raise ConfigError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):o}); "
            f"it holds on-prem secrets: run 'chmod {fix} {path}'"
        )


def check_private_tree(path: Path) -> None:
    """`check_private` on ``path`` and everything below it (keys, book, ledger, WAL, SHM)."""
    check_private(path)
    for child in path.rglob("*"):
        check_private(child)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a 0600 file, atomically.

    O_EXCL on a temp name then rename: the content is never briefly readable by
    others, even when it replaces a file that had looser permissions.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o600)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
