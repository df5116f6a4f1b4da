"""Backup and restore of on-prem's folder: keys, enrollment book, ledger, trust store.

On-prem's folder is the deployment's trust zone, and the only state that cannot
be rebuilt: the CKKS secret key (without it no score can be read), the signing
key replicas pin, the book with the plaintext embeddings (the gallery's only
source), the ledger and the trust store. A cloud replica needs no backup: it
syncs from on-prem.

`backup` writes one gzip'd tar, mode 0600, of a consistent copy: SQLite files go
through SQLite's online backup API (so a running daemon may keep writing, and
no WAL is left half-copied), the rest is copied as is; lock and request files
are left out. `restore` unpacks it into an absent (or, with ``overwrite``, an
existing) folder with 0700 folders and 0600 files, refusing members that would
land outside it. Keep the archive as secret as the folder: it holds the keys.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tarfile
import tempfile
from pathlib import Path

from cipherface.exceptions import ConfigError, StoreError
from cipherface.private import private_dir, private_file, write_private

__all__ = ["ARCHIVE_ROOT", "backup", "restore"]

#: The folder name inside an archive.
ARCHIVE_ROOT = "onprem"
#: Never copied: transient files of a running daemon or command.
_SKIP_SUFFIXES = ("-wal", "-shm", "-journal", ".tmp")
_SKIP_NAMES = frozenset({"rotate-request"})


def _copy_sqlite(source: Path, target: Path) -> None:
    private_file(target)
    try:
        src = sqlite3.connect(source)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot back up {source}: {exc}") from exc


def backup(onprem_dir: Path, archive: Path) -> list[str]:
    """Write ``archive`` (tar.gz, 0600; must not exist); the paths it holds."""
    onprem_dir = Path(onprem_dir)
    if not (onprem_dir / "signing.key").exists():
        raise ConfigError(f"{onprem_dir} is not on-prem's folder (no signing.key)")
    saved: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cipherface-backup-") as tmp:
        staging = private_dir(Path(tmp) / ARCHIVE_ROOT)
        for path in sorted(onprem_dir.rglob("*")):
            relative = path.relative_to(onprem_dir)
            if path.name in _SKIP_NAMES or path.name.endswith(_SKIP_SUFFIXES):
                continue
            target = staging / relative
            if path.is_dir():
                private_dir(target)
                continue
            if path.suffix == ".sqlite":
                _copy_sqlite(path, target)
            else:
                write_private(target, path.read_bytes())
            saved.append(str(relative))
        try:
            fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"{archive} exists; refusing to overwrite a backup") from None
        with os.fdopen(fd, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
            tar.add(staging, arcname=ARCHIVE_ROOT)
    return saved


def restore(archive: Path, onprem_dir: Path, *, overwrite: bool = False) -> list[str]:
    """Unpack a `backup` into ``onprem_dir``; the paths restored."""
    onprem_dir = Path(onprem_dir)
    if onprem_dir.exists() and any(onprem_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{onprem_dir} is not empty; refusing to replace keys (--overwrite)")
    onprem_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=onprem_dir.parent))
    try:
        os.chmod(staging, 0o700)
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                members = tar.getmembers()
                for member in members:
                    parts = Path(member.name).parts
                    if (
                        not parts
                        or parts[0] != ARCHIVE_ROOT
                        or not (member.isfile() or member.isdir())
                    ):
                        raise ConfigError(f"{archive} is not a CipherFace backup ({member.name})")
                # The data filter refuses absolute paths, '..', links out of the folder.
                tar.extractall(staging, members=members, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise ConfigError(f"cannot read the backup {archive}: {exc}") from exc
        unpacked = staging / ARCHIVE_ROOT
        restored = []
        for path in sorted(unpacked.rglob("*")):
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
            if path.is_file():
                restored.append(str(path.relative_to(unpacked)))
        os.chmod(unpacked, 0o700)
        if "signing.key" not in restored:
            raise ConfigError(f"{archive} holds no on-prem folder (no signing.key)")
        if onprem_dir.exists():
            shutil.rmtree(onprem_dir)
        unpacked.rename(onprem_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return restored
