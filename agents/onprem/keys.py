"""On-prem's CKKS keys: generating them, and a key with its enrollment book (`KeySet`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cipherface.config import Settings
from cipherface.crypto import Keyring
from cipherface.embedding import model_spec
from cipherface.exceptions import ConfigError
from cipherface.gallery import EnrollmentBook
from cipherface.gallery.decryption import DecryptionPool
from cipherface.gallery.expansion import edge_keys
from cipherface.gallery.integrity import conjugation_key
from cipherface.private import private_dir
from cipherface.signing import SigningKey

__all__ = ["KeySet", "generate_keys", "replica_keys", "write_keys"]

log = logging.getLogger(__name__)


#: What a context update holds beside the public context and the Galois keys
#: (blocks, shard map, envelope, signature: a few KB for a thousand blocks).
_CONTEXT_MARGIN = 64 * 1024


def write_keys(folder: Path, keyring: Keyring) -> None:
    """A key folder (0700): secret context and public context (0600 each)."""
    private_dir(folder)
    keyring.save_secret(folder / "private.key")
    keyring.save_public(folder / "public.key", galois_keys=False, relin_keys=False)
    (folder / "public.key").chmod(0o600)  # public, but the folder's rule has no exceptions


def replica_keys(keyring: Keyring, dimensions: int, limit: int) -> bytes:
    """The Galois keys on-prem ships to replicas in its context update (`expansion.edge_keys`).

    Made anew at each start (tens of milliseconds; Galois keys are public). When
    they would not fit a context update under ``limit`` bytes beside the public
    context (n16384; a cap below 3.4 MB at 128-d, 4.1 MB at 512-d), only the conjugation key
    goes: replicas then answer packed edge probes with an error event, and edges
    send columns (`cipherface.gallery.encrypt_probe`).
    """
    keys = edge_keys(keyring, dimensions)
    public = keyring.public_bytes(galois_keys=False, relin_keys=False)
    if len(public) + len(keys) + _CONTEXT_MARGIN <= limit:
        return keys
    log.warning(
        "the expansion keys (%d bytes) do not fit a context update under the %d-byte "
        "message cap: packed edge probes will be refused",
        len(keys),
        limit,
    )
    return conjugation_key(keyring)


@dataclass(slots=True)
class KeySet:
    """One CKKS key with its book: what decrypts and names the scores made under it."""

    keyring: Keyring
    book: EnrollmentBook
    #: What replicas get to check and expand edge probes (`replica_keys`).
    edge_keys: bytes
    folder: Path
    #: Worker processes decrypting under this key (`Settings.decrypt_workers`).
    decryptor: DecryptionPool | None = None

    @property
    def fingerprint(self) -> str:
        """The key's fingerprint."""
        return self.keyring.fingerprint

    def close(self) -> None:
        """Stop the decryption workers and close the book."""
        if self.decryptor is not None:
            self.decryptor.close()
        self.book.close()

    @classmethod
    def load(cls, folder: Path, settings: Settings) -> KeySet:
        """The keys and book in ``folder`` (`Settings.key_dir` or a rotation's new one)."""
        keyring = Keyring.load(folder / "private.key", expect="secret")
        book = EnrollmentBook(
            keyring,
            settings.metric,
            model_spec(settings.model).dimensions,
            path=folder / "book.sqlite",
        )
        workers = settings.decrypt_workers
        decryptor = DecryptionPool(keyring, workers) if workers else None
        edge = replica_keys(keyring, book.dimensions, settings.max_message_size)
        return cls(keyring, book, edge, folder, decryptor)


def generate_keys(settings: Settings, *, overwrite: bool = False) -> Keyring:
    """Create on-prem's keys in its private folder (0700; every file 0600).

    The CKKS secret key, the public context (public key only: the packed gallery
    needs neither rotation nor relinearisation keys; the Galois keys for edge probes
    are made at each start, `replica_keys`), and the Ed25519 signing key with its
    ``.pub`` half, which cloud replicas and event readers pin.
    """
    if settings.secret_key_path.exists() and not overwrite:
        raise ConfigError(
            f"{settings.secret_key_path} exists; refusing to replace keys that encrypt a gallery"
        )
    private_dir(settings.onprem_dir)
    keyring = Keyring.generate(settings.preset)
    write_keys(settings.key_dir, keyring)
    SigningKey.generate("onprem").save(settings.signing_key_path)
    return keyring
