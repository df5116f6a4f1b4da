"""The original CipherFace API: one object per side, seed-style 1:1 distances.

Kept so that code written against the original library keeps working; the
agents use the packed gallery (`cipherface.gallery`) for 1:N at scale.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cipherface.crypto import (
    DEFAULT_PRESET,
    EncryptedVector,
    Keyring,
    Metric,
    decision,
    encrypted_distance,
    prepare_embedding,
)
from cipherface.embedding import DEFAULT_DETECTOR, DEFAULT_MODEL, Embedder, threshold
from cipherface.exceptions import ConfigError

__all__ = ["CipherFace"]


def _single(vector: EncryptedVector | Sequence[EncryptedVector], role: str) -> EncryptedVector:
    # securely_embed returns one ciphertext per face; the seed README passes that
    # whole list for a one-face image, so a one-element list stands for its item.
    if isinstance(vector, EncryptedVector):
        return vector
    items = list(vector)
    if len(items) != 1:
        raise ConfigError(f"{role}: expected one encrypted embedding, got a list of {len(items)}")
    return items[0]


class CipherFace:
    """Build or load a cryptosystem, embed and encrypt faces, compare, restore, verify.

    With ``cryptosystem=None`` fresh keys are generated (on-prem). With a path, the
    key file is loaded: a private key file gives an instance that can `restore`;
    a public one gives a cloud instance that can embed, encrypt and compare only.
    """

    def __init__(
        self,
        facial_recognition_model: str | None = None,
        distance_metric: str = "euclidean",
        cryptosystem: str | os.PathLike[str] | None = None,
        *,
        model_name: str | None = None,
        face_detector: str = DEFAULT_DETECTOR,
        preset: str = DEFAULT_PRESET,
    ) -> None:
        if facial_recognition_model and model_name and facial_recognition_model != model_name:
            raise ConfigError("facial_recognition_model and model_name disagree")
        self.embedder = Embedder(
            facial_recognition_model or model_name or DEFAULT_MODEL, face_detector
        )
        self.distance_metric = Metric.parse(distance_metric)
        self.threshold = threshold(self.embedder.model, self.distance_metric.value)
        if cryptosystem is None:
            self.keyring = Keyring.generate(preset, galois_keys=True)
        else:
            self.keyring = Keyring.load(cryptosystem)

    @property
    def facial_recognition_model(self) -> str:
        """The DeepFace model name (the original attribute)."""
        return self.embedder.model

    def export_private_key(self, target_path: str | os.PathLike[str]) -> None:
        """Write the secret context (mode 0600). Keep it on-prem."""
        self.keyring.save_secret(target_path)

    def export_public_key(self, target_path: str | os.PathLike[str]) -> None:
        """Write the public context (with Galois keys, for seed-style distances)."""
        self.keyring.save_public(target_path, galois_keys=True)

    def represent(self, img_path: str | os.PathLike[str] | bytes) -> list[np.ndarray]:
        """Plain embeddings, one per face, prepared for the distance metric."""
        return [
            prepare_embedding(face.embedding, self.distance_metric)
            for face in self.embedder.embed(img_path)
        ]

    def securely_embed(self, img_path: str | os.PathLike[str] | bytes) -> list[EncryptedVector]:
        """Embed every face in an image and encrypt each embedding (public key suffices)."""
        return [self.keyring.encrypt(vector) for vector in self.represent(img_path)]

    def encrypt(self, embedding: Sequence[float] | np.ndarray) -> EncryptedVector:
        """Encrypt a plain embedding, prepared for the distance metric."""
        return self.keyring.encrypt(prepare_embedding(embedding, self.distance_metric))

    def calculate_encrypted_distance(
        self,
        encrypted_embedding_alpha: EncryptedVector | Sequence[EncryptedVector],
        encrypted_embedding_beta: EncryptedVector
        | Sequence[EncryptedVector]
        | Sequence[float]
        | np.ndarray,
    ) -> EncryptedVector:
        """Encrypted distance; ``beta`` may also be a plain embedding (cheaper, same result).

        For euclidean metrics the result is the *squared* distance.
        """
        alpha = _single(encrypted_embedding_alpha, "alpha")
        if isinstance(encrypted_embedding_beta, np.ndarray) or (
            isinstance(encrypted_embedding_beta, Sequence)
            and encrypted_embedding_beta
            and not isinstance(encrypted_embedding_beta[0], EncryptedVector)
        ):
            beta: EncryptedVector | np.ndarray = np.asarray(encrypted_embedding_beta, dtype=float)
        else:
            beta = _single(encrypted_embedding_beta, "beta")  # type: ignore[arg-type]
        return encrypted_distance(self.keyring, alpha, beta, self.distance_metric)

    def restore(self, encrypted_distance: EncryptedVector) -> float:
        """Decrypt a distance (needs the private key)."""
        return float(self.keyring.decrypt(encrypted_distance)[0])

    def verify(self, distance: float) -> bool:
        """Same person? Compares with DeepFace's threshold (squared for euclidean metrics)."""
        return decision(distance, self.threshold, self.distance_metric)
