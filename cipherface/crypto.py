"""CKKS keys, ciphertexts and encrypted distances, on TenSEAL.

Who holds what:

- on-prem holds a `Keyring` with the secret key; it is the only party that
  decrypts, and it only ever publishes decisions and rounded distances, because
  SEAL does no noise flooding and exact CKKS decryptions let an observer recover
  the secret key (Li and Micciancio, 2021).
- the cloud holds a `Keyring` built from the *public* context: it can encrypt and
  compute, never decrypt. Loading a "public" context that carries a secret key is
  refused, so a misconfigured export cannot leak the key silently.

Every ciphertext travels with the fingerprint of the key it was made under
(SHA-256 of the serialized public key and parameters). CKKS computes on
mismatched keys without complaint and decrypts to noise; the fingerprint turns
that into a `KeyMismatchError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import tenseal as ts

from cipherface.exceptions import (
    CiphertextError,
    ConfigError,
    CryptoError,
    KeyMismatchError,
    SecretKeyError,
)
from cipherface.metric import Metric
from cipherface.private import write_private

__all__ = [
    "DEFAULT_PRESET",
    "HE_STANDARD_MAX_MODULUS_BITS",
    "PRESETS",
    "EncryptedVector",
    "Keyring",
    "Metric",
    "Preset",
    "decision",
    "encrypted_distance",
    "plain_distance",
    "prepare_embedding",
]

#: Largest total coefficient modulus (bits) for classical 128/192/256-bit security,
#: from the HomomorphicEncryption.org security standard (ternary secrets).
HE_STANDARD_MAX_MODULUS_BITS: Mapping[int, Mapping[int, int]] = {
    128: {4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {4096: 58, 8192: 118, 16384: 237, 32768: 476},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Preset:
    """A named CKKS parameter set.

    Every computation CipherFace does has multiplicative depth one (a product,
    then sums), so a ciphertext needs just one rescaling prime above the base:
    the fewer primes, the smaller each ciphertext and the faster each operation.
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    security_bits: int

    def __post_init__(self) -> None:
        limit = HE_STANDARD_MAX_MODULUS_BITS[self.security_bits][self.poly_modulus_degree]
        if sum(self.coeff_mod_bit_sizes) > limit:
            raise ConfigError(
                f"preset {self.name}: {sum(self.coeff_mod_bit_sizes)} modulus bits exceed the "
                f"{limit}-bit limit for {self.security_bits}-bit security at "
                f"N={self.poly_modulus_degree}"
            )

    @property
    def slots(self) -> int:
        """How many reals one ciphertext holds."""
        return self.poly_modulus_degree // 2


PRESETS: Mapping[str, Preset] = {
    p.name: p
    for p in (
        # 160 of 218 bits: 128-bit secure; 20 bits of integer headroom above 2^40.
        Preset(
            name="n8192",
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=(60, 40, 60),
            scale_bits=40,
            security_bits=128,
        ),
        # 220 of 237 bits: 256-bit secure, twice the slots, 2^50 precision.
        Preset(
            name="n16384",
            poly_modulus_degree=16384,
            coeff_mod_bit_sizes=(60, 50, 50, 60),
            scale_bits=50,
            security_bits=256,
        ),
    )
}
DEFAULT_PRESET = "n8192"


def prepare_embedding(embedding: Sequence[float] | np.ndarray, metric: Metric) -> np.ndarray:
    """The vector that gets encrypted: L2-normalised for cosine and euclidean_l2."""
    vector = np.asarray(embedding, dtype=np.float64)
    if metric.normalises:
        norm = np.linalg.norm(vector)
        if norm == 0:
            raise ConfigError("cannot normalise an all-zero embedding")
        vector = vector / norm
    return vector


def plain_distance(a: np.ndarray, b: np.ndarray, metric: Metric) -> float:
    """The value `encrypted_distance` decrypts to, computed in the clear (for checks)."""
    a = prepare_embedding(a, metric)
    b = prepare_embedding(b, metric)
    if metric is Metric.COSINE:
        return float(1.0 - a @ b)
    diff = a - b
    return float(diff @ diff)


def decision(value: float, threshold: float, metric: Metric) -> bool:
    """Same person? ``value`` is what decryption gives (squared for euclidean metrics)."""
    limit = threshold * threshold if metric.squared else threshold
    return bool(value <= limit)


@dataclass(frozen=True, slots=True)
class EncryptedVector:
    """A serialized CKKS vector and the fingerprint of the key it was made under."""

    fingerprint: str
    data: bytes = field(repr=False)

    def to_base64(self) -> str:
        """Text form (``fingerprint:base64``) for files and JSON."""
        return f"{self.fingerprint}:{base64.b64encode(self.data).decode('ascii')}"

    @classmethod
    def from_base64(cls, text: str) -> EncryptedVector:
        """Inverse of `to_base64`."""
        fingerprint, sep, payload = text.partition(":")
        if not sep:
            raise CiphertextError("encrypted vector text must be 'fingerprint:base64'")
        try:
            return cls(fingerprint, base64.b64decode(payload, validate=True))
        except binascii.Error as exc:
            raise CiphertextError("encrypted vector payload is not valid base64") from exc


def _fingerprint(context: ts.Context) -> str:
    public = context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return hashlib.sha256(public).hexdigest()[:16]


def _parse_context(data: bytes) -> ts.Context:
    try:
        return ts.context_from(data)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CiphertextError("bytes are not a serialized TenSEAL context") from exc


def _decode_key_file(raw: bytes) -> bytes:
    """Key files are base64 text (the original CipherFace format) or raw bytes."""
    stripped = raw.strip()
    try:
        return base64.b64decode(stripped, validate=True)
    except binascii.Error:
        return raw


class Keyring:
    """A CKKS context plus its fingerprint: the unit of key material CipherFace passes around.

    Build one with `generate` (on-prem), `from_bytes` or `load` (either side).
    """

    def __init__(self, context: ts.Context) -> None:
        self.context = context
        self.fingerprint = _fingerprint(context)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def generate(
        cls, preset: str = DEFAULT_PRESET, *, galois_keys: bool = False, relin_keys: bool = True
    ) -> Keyring:
        """Fresh keys. Galois keys are only needed for seed-style single-vector dot products."""
        try:
            p = PRESETS[preset]
        except KeyError:
            raise ConfigError(
                f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}"
            ) from None
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=p.poly_modulus_degree,
            coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
        )
        context.global_scale = 2.0**p.scale_bits
        if galois_keys:
            context.generate_galois_keys()
        if not relin_keys:
            # TenSEAL generates relinearisation keys with the context; drop them by
            # round-tripping when a caller wants the smallest possible context.
            context = ts.context_from(
                context.serialize(save_secret_key=True, save_relin_keys=False)
            )
        return cls(context)

    @classmethod
    def from_bytes(
        cls, data: bytes, *, expect: Literal["public", "secret", "any"] = "any"
    ) -> Keyring:
        """Load a serialized context, refusing a secret key where a public one is expected."""
        keyring = cls(_parse_context(data))
        if expect == "public" and keyring.is_private:
            raise SecretKeyError(
                "refusing a 'public' context that carries a secret key: re-export it with "
                "export_public_key / 'cipherface keygen' and never ship the private file"
            )
        if expect == "secret" and not keyring.is_private:
            raise SecretKeyError("this context holds no secret key; load the private key file")
        return keyring

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, expect: Literal["public", "secret", "any"] = "any"
    ) -> Keyring:
        """Load a key file (base64 text as the original CipherFace wrote, or raw bytes).

        A file holding a secret key must not be readable by group or others.
        """
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"cryptosystem not found at {path}") from None
        keyring = cls.from_bytes(_decode_key_file(raw), expect=expect)
        if keyring.is_private and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretKeyError(
                f"{path} holds a secret key but is readable by others; run 'chmod 600 {path}'"
            )
        return keyring

    # -- properties -------------------------------------------------------------------
    @property
    def is_private(self) -> bool:
        """True when this keyring can decrypt."""
        return bool(self.context.has_secret_key())

    @property
    def slots(self) -> int:
        """Reals per ciphertext."""
        return (
            int(self.context.seal_context().data.first_context_data().parms().poly_modulus_degree())
            // 2
        )

    # -- export -----------------------------------------------------------------------
    def public_bytes(self, *, galois_keys: bool | None = None, relin_keys: bool = True) -> bytes:
        """The context without its secret key: what the cloud may hold.

        ``galois_keys=None`` keeps them if this context has them. They are large
        (about 18 MB at N=8192), so ship them only for seed-style 1:1 distances.
        """
        if galois_keys is None:
            galois_keys = bool(self.context.has_galois_keys())
        return self.context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=galois_keys,
            save_relin_keys=relin_keys,
        )

    def secret_bytes(self) -> bytes:
        """The whole context, secret key included. Never leaves on-prem."""
        if not self.is_private:
            raise SecretKeyError("this context holds no secret key to export")
        return self.context.serialize(save_secret_key=True)

    def save_secret(self, path: str | os.PathLike[str]) -> None:
        """Write the secret context as base64 text, created with mode 0600."""
        write_private(Path(path), base64.b64encode(self.secret_bytes()))

    def save_public(
        self,
        path: str | os.PathLike[str],
        *,
        galois_keys: bool | None = None,
        relin_keys: bool = True,
    ) -> None:
        """Write the public context as base64 text (the original CipherFace format)."""
        data = self.public_bytes(galois_keys=galois_keys, relin_keys=relin_keys)
        Path(path).write_bytes(base64.b64encode(data))

    def public(self) -> Keyring:
        """A keyring holding only the public part of this one."""
        return Keyring.from_bytes(self.public_bytes(), expect="public")

    # -- vectors ----------------------------------------------------------------------
    def encrypt(self, vector: Sequence[float] | np.ndarray) -> EncryptedVector:
        """Encrypt a real vector into one ciphertext (at most `slots` values)."""
        values = np.asarray(vector, dtype=np.float64)
        if values.ndim != 1 or values.size == 0 or values.size > self.slots:
            raise ConfigError(f"can encrypt 1 to {self.slots} values, got shape {values.shape}")
        return EncryptedVector(self.fingerprint, ts.ckks_vector(self.context, values).serialize())

    def load_vector(self, vector: EncryptedVector) -> ts.CKKSVector:
        """Deserialize a ciphertext after checking it was made under this key."""
        self.check(vector.fingerprint)
        try:
            return ts.ckks_vector_from(self.context, vector.data)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise CiphertextError("bytes are not a CKKS vector under this context") from exc

    def wrap(self, vector: ts.CKKSVector) -> EncryptedVector:
        """Serialize a TenSEAL vector computed under this keyring."""
        return EncryptedVector(self.fingerprint, vector.serialize())

    def decrypt(self, vector: EncryptedVector) -> np.ndarray:
        """Decrypt to the (approximate) reals. Only possible with the secret key."""
        if not self.is_private:
            raise SecretKeyError(
                "this keyring holds only the public key and cannot decrypt; restore "
                "on-prem with the private key"
            )
        return np.asarray(self.load_vector(vector).decrypt(), dtype=np.float64)

    def check(self, fingerprint: str) -> None:
        """Raise `KeyMismatchError` unless ``fingerprint`` is this keyring's."""
        if fingerprint != self.fingerprint:
            raise KeyMismatchError(self.fingerprint, fingerprint)


def encrypted_distance(
    keyring: Keyring,
    a: EncryptedVector,
    b: EncryptedVector | Sequence[float] | np.ndarray,
    metric: Metric,
) -> EncryptedVector:
    """Distance between a ciphertext and a ciphertext or a plaintext embedding.

    Both forms decrypt to the same value; the plaintext form is used when the
    cloud computed the probe embedding itself and saves a ciphertext product.
    Single-vector dot products rotate, so the context needs Galois keys.
    """
    if not keyring.context.has_galois_keys():
        raise CryptoError(
            "seed-style distances need Galois keys in the context; generate with galois_keys=True"
        )
    left = keyring.load_vector(a)
    if isinstance(b, EncryptedVector):
        right: ts.CKKSVector | list[float] = keyring.load_vector(b)
    else:
        right = prepare_embedding(b, metric).tolist()
    if left.size() != (right.size() if isinstance(right, ts.CKKSVector) else len(right)):
        raise ConfigError("embeddings of different dimensions cannot be compared")
    if metric is Metric.COSINE:
        result = -left.dot(right) + 1.0
    else:
        diff = left - right
        result = diff.dot(diff)
    return keyring.wrap(result)
