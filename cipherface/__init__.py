"""CipherFace: face recognition where the cloud matches embeddings it cannot read."""

from cipherface.client import Client, EdgeEncryptor
from cipherface.config import Settings
from cipherface.core import CipherFace
from cipherface.crypto import (
    DEFAULT_PRESET,
    PRESETS,
    EncryptedVector,
    Keyring,
    Metric,
    Preset,
)
from cipherface.embedding import MODELS, Embedder, Face, ModelSpec, install_weights, threshold
from cipherface.exceptions import (
    CipherFaceError,
    CiphertextError,
    ConfigError,
    CryptoError,
    EmbeddingError,
    ImageDecodeError,
    KeyMismatchError,
    MissingWeightsError,
    NoFaceError,
    SecretKeyError,
    StoreError,
    TransportError,
    UnknownModelError,
    UnsupportedImageError,
    WireFormatError,
)
from cipherface.gallery import EncryptedGallery, EnrollmentBook

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PRESET",
    "MODELS",
    "PRESETS",
    "CipherFace",
    "CipherFaceError",
    "CiphertextError",
    "Client",
    "ConfigError",
    "CryptoError",
    "EdgeEncryptor",
    "Embedder",
    "EmbeddingError",
    "EncryptedGallery",
    "EncryptedVector",
    "EnrollmentBook",
    "Face",
    "ImageDecodeError",
    "KeyMismatchError",
    "Keyring",
    "Metric",
    "MissingWeightsError",
    "ModelSpec",
    "NoFaceError",
    "Preset",
    "SecretKeyError",
    "Settings",
    "StoreError",
    "TransportError",
    "UnknownModelError",
    "UnsupportedImageError",
    "WireFormatError",
    "install_weights",
    "threshold",
]
