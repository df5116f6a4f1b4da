"""CipherFace: face recognition where the cloud matches embeddings it cannot read.

The public names below are imported on first use (PEP 562), not with the package:
``from cipherface import wire`` must not load TenSEAL or DeepFace, and a
``cipherface`` name costs its import only when it is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cipherface.exceptions import (
    ChunkError,
    CipherFaceError,
    CiphertextError,
    ConfigError,
    CryptoError,
    EmbeddingCrashedError,
    EmbeddingError,
    GalleryWorkerError,
    ImageDecodeError,
    KeyMismatchError,
    MessageTooLargeError,
    MissingResourceError,
    MissingWeightsError,
    NoFaceError,
    PartError,
    ProbeTimeout,
    SecretKeyError,
    StoreError,
    TooManyFacesError,
    TransportError,
    UnknownModelError,
    UnsupportedImageError,
    WireFormatError,
)
from cipherface.metric import Metric

if TYPE_CHECKING:
    from cipherface.client import Client, EdgeEncryptor
    from cipherface.config import Settings
    from cipherface.core import CipherFace
    from cipherface.crypto import (
        DEFAULT_PRESET,
        PRESETS,
        EncryptedVector,
        Keyring,
        Preset,
    )
    from cipherface.embedding import MODELS, Embedder, Face, ModelSpec, install_weights, threshold
    from cipherface.gallery import EncryptedGallery, EnrollmentBook

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PRESET",
    "MODELS",
    "PRESETS",
    "ChunkError",
    "CipherFace",
    "CipherFaceError",
    "CiphertextError",
    "Client",
    "ConfigError",
    "CryptoError",
    "EdgeEncryptor",
    "Embedder",
    "EmbeddingCrashedError",
    "EmbeddingError",
    "EncryptedGallery",
    "EncryptedVector",
    "EnrollmentBook",
    "Face",
    "GalleryWorkerError",
    "ImageDecodeError",
    "KeyMismatchError",
    "Keyring",
    "MessageTooLargeError",
    "Metric",
    "MissingResourceError",
    "MissingWeightsError",
    "ModelSpec",
    "NoFaceError",
    "PartError",
    "Preset",
    "ProbeTimeout",
    "SecretKeyError",
    "Settings",
    "StoreError",
    "TooManyFacesError",
    "TransportError",
    "UnknownModelError",
    "UnsupportedImageError",
    "WireFormatError",
    "install_weights",
    "threshold",
]

#: Where each lazily imported name is defined (the exceptions and `Metric` are cheap: above).
_SOURCES = {
    "cipherface.client": ("Client", "EdgeEncryptor"),
    "cipherface.config": ("Settings",),
    "cipherface.core": ("CipherFace",),
    "cipherface.crypto": (
        "DEFAULT_PRESET",
        "PRESETS",
        "EncryptedVector",
        "Keyring",
        "Preset",
    ),
    "cipherface.embedding": (
        "MODELS",
        "Embedder",
        "Face",
        "ModelSpec",
        "install_weights",
        "threshold",
    ),
    "cipherface.gallery": ("EncryptedGallery", "EnrollmentBook"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'cipherface' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
