"""On-prem's CKKS keys: generating them, and a key with its enrollment book (`KeySet`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cipherface.config import Settings
from cipherface.crypto import Keyring
from cipherface.embedding import model_spec
from cipherface.exceptions import ConfigError
from cipherface.gallery import EnrollmentBook
from cipherface.gallery.decryption import DecryptionPool
from cipherface.gallery.integrity import conjugation_key
from cipherface.private import private_dir, write_private
from cipherface.signing import SigningKey

__all__ = ["KeySet", "generate_keys", "write_keys"]


def write_keys(folder: Path, keyring: Keyring) -> None:
    """A key folder (0700): secret context, public context, conjugation key (0600 each)."""
    private_dir(folder)
    keyring.save_secret(folder / "private.key")
    keyring.save_public(folder / "public.key", galois_keys=False, relin_keys=False)
    (folder / "public.key").chmod(0o600)  # public, but the folder's rule has no exceptions
    write_private(folder / "conjugation.key", conjugation_key(keyring))


@dataclass(slots=True)
class KeySet:
    """One CKKS key with its book: what decrypts and names the scores made under it."""

    keyring: Keyring
    book: EnrollmentBook
    conjugation_key: bytes
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
        return cls(keyring, book, (folder / "conjugation.key").read_bytes(), folder, decryptor)


def generate_keys(settings: Settings, *, overwrite: bool = False) -> Keyring:
    """Create on-prem's keys in its private folder (0700; every file 0600).

    The CKKS secret key, the public context (public key only: the packed gallery
    needs neither rotation nor relinearisation keys), the conjugation key replicas
    use to check edge probes, and the Ed25519 signing key with its ``.pub`` half,
    which cloud replicas and event readers pin.
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
