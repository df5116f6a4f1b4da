"""Who sent a message: Ed25519 signing keys, pinned keys and on-prem's trust store.

CKKS is malleable and its public context is public: a party that can publish to
the broker can make well-formed contexts, blocks, scores and events. The key
fingerprint a message carries is only a label, so authenticity comes from
signatures instead (the `cryptography` package's Ed25519; nothing here is a
primitive of our own):

- on-prem signs every ``context``, ``block`` and ``event``; a cloud replica is
  started with on-prem's verify key *pinned* (`PinnedKey`), and so is every
  client that reads events;
- every cloud replica has its own signing key and signs ``scores``,
  ``rejected`` and ``sync``; on-prem accepts them only from replicas in its
  `TrustStore`, to which an operator adds a replica's key explicitly.

Key files: the signing key is PKCS#8 PEM, mode 0600 (refused when group or
others can read it, like the CKKS secret key); the verify key is one line
``ed25519 <base64>``, safe to copy anywhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cipherface.exceptions import ConfigError, SignatureError
from cipherface.private import check_private, private_file, write_private

__all__ = ["PinnedKey", "SigningKey", "TrustStore", "Verifier", "VerifyKey"]

_PREFIX = "ed25519 "


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """The public half of a signing key: checks signatures, safe to publish."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise ConfigError("an Ed25519 verify key is 32 bytes")

    @property
    def key_id(self) -> str:
        """A short, stable name for the key (first 16 hex digits of its SHA-256)."""
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise `SignatureError` unless ``signature`` is this key's over ``data``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            raise SignatureError(f"signature does not verify under key {self.key_id}") from None

    def to_text(self) -> str:
        """``ed25519 <base64>``: the form key files and the trust store hold."""
        return _PREFIX + base64.b64encode(self.raw).decode()

    @classmethod
    def from_text(cls, text: str) -> VerifyKey:
        """Inverse of `to_text`; raises `ConfigError` on anything else."""
        text = text.strip()
        if not text.startswith(_PREFIX):
            raise ConfigError("a verify key reads 'ed25519 <base64>'")
        try:
            return cls(base64.b64decode(text[len(_PREFIX) :], validate=True))
        except binascii.Error:
            raise ConfigError("a verify key reads 'ed25519 <base64>'") from None

    @classmethod
    def load(cls, path: Path) -> VerifyKey:
        """Read a verify key file."""
        try:
            return cls.from_text(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no verify key at {path}") from None

    def save(self, path: Path) -> None:
        """Write the key file. It is public, but written 0600 like everything in on-prem's
        folder (whose start-up check allows no exception); copy it out to share it."""
        write_private(path, (self.to_text() + "\n").encode())


class SigningKey:
    """An Ed25519 signing key with the name its signatures carry ("onprem", a replica id)."""

    def __init__(self, key: Ed25519PrivateKey, name: str) -> None:
        if not name:
            raise ConfigError("a signing key needs a signer name")
        self._key = key
        self.name = name
        self.verify_key = VerifyKey(
            key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    def sign(self, data: bytes) -> bytes:
        """The 64-byte signature over ``data``."""
        return self._key.sign(data)

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        """A fresh key."""
        return cls(Ed25519PrivateKey.generate(), name)

    def save(self, path: Path) -> None:
        """Write the key 0600 (PKCS#8 PEM) and its verify key beside it (``.pub``)."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(path, pem)
        self.verify_key.save(path.with_suffix(".pub"))

    @classmethod
    def load(cls, path: Path, name: str) -> SigningKey:
        """Read a key written by `save`; refused when group or others can read it."""
        check_private(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as exc:
            raise ConfigError(f"{path} is not a PEM signing key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 key")
        return cls(key, name)

    @classmethod
    def load_or_create(cls, path: Path, name: str) -> SigningKey:
        """The key at ``path``, created on first use (a cloud replica's own key)."""
        if path.exists():
            return cls.load(path, name)
        key = cls.generate(name)
        key.save(path)
        return key


class Verifier(Protocol):
    """Decides whether a signer may have sent a message (see `PinnedKey`, `TrustStore`)."""

    def verify(self, signer: str, signature: bytes, data: bytes) -> None:
        """Raise `SignatureError` unless ``signer``'s trusted key signed ``data``."""
        ...


@dataclass(frozen=True, slots=True)
class PinnedKey:
    """Exactly one trusted key: on-prem's, as a replica or a client knows it."""

    key: VerifyKey

    def verify(self, signer: str, signature: bytes, data: bytes) -> None:
        """Any signer name, but only this key's signature."""
        self.key.verify(signature, data)


class TrustStore:
    """On-prem's list of cloud replicas it accepts scores and syncs from: name -> verify key.

    A JSON file, 0600, changed only by an operator (``cipherface trust add``). The
    daemon re-reads it when it changes, so trusting a new replica needs no restart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._keys: dict[str, VerifyKey] = {}
        self._stamp: tuple[int, int] | None = None

    def _reload(self) -> None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            self._keys, self._stamp = {}, None
            return
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp == self._stamp:
            return
        check_private(self.path)
        try:
            data = json.loads(self.path.read_text() or "{}")
            keys = {str(name): VerifyKey.from_text(text) for name, text in data.items()}
        except (ValueError, AttributeError) as exc:
            raise ConfigError(f"the trust store {self.path} is not valid: {exc}") from exc
        self._keys, self._stamp = keys, stamp

    def keys(self) -> dict[str, VerifyKey]:
        """Every trusted replica and its key."""
        with self._lock:
            self._reload()
            return dict(self._keys)

    def add(self, name: str, key: VerifyKey) -> None:
        """Trust ``name``'s key (replacing the key it had)."""
        self._write({**self.keys(), name: key})

    def remove(self, name: str) -> bool:
        """Stop trusting ``name``; False if it was not trusted."""
        keys = self.keys()
        if keys.pop(name, None) is None:
            return False
        self._write(keys)
        return True

    def _write(self, keys: dict[str, VerifyKey]) -> None:
        with self._lock:
            private_file(self.path)
            text = json.dumps({n: k.to_text() for n, k in sorted(keys.items())}, indent=1)
            write_private(self.path, text.encode())
            self._stamp = None

    def verify(self, signer: str, signature: bytes, data: bytes) -> None:
        """Only a trusted replica's own key, under its own name."""
        key = self.keys().get(signer)
        if key is None:
            raise SignatureError(
                f"replica {signer!r} is not trusted (add it with 'cipherface trust add')"
            )
        key.verify(signature, data)
