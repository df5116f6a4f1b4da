"""Every error CipherFace raises, as one tree.

Third-party errors (TenSEAL, DeepFace, aiormq, sqlite3) are caught at the boundary
and re-raised as one of these, chained with ``from``, so a caller never has to
know which library failed underneath::

    CipherFaceError
    ├── ConfigError(ValueError)
    ├── CryptoError
    │   ├── KeyMismatchError          ciphertext made under another key
    │   ├── SecretKeyError            a secret key where only a public one may be,
    │   │                             or no secret key where one is needed
    │   ├── CiphertextError(ValueError)   bytes that are not a ciphertext/context
    │   ├── SignatureError            a message not signed by a key this party trusts
    │   └── IntegrityError            a well-formed ciphertext the protocol never makes
    │                                 (tampered scores, a forged edge probe)
    ├── EmbeddingError
    │   ├── ImageDecodeError(ValueError)  corrupt, truncated, empty or oversized input
    │   │   └── UnsupportedImageError     a file that is not JPEG, PNG or WebP
    │   ├── NoFaceError               an image in which no face was found
    │   ├── TooManyFacesError         more faces than a probe may have (`max_faces`)
    │   ├── UnknownModelError(ValueError)
    │   ├── MissingWeightsError       model weights absent and not downloadable
    │   └── EmbeddingCrashedError     an embedding worker process died on the image
    ├── WireFormatError(ValueError)   a message that does not decode or validate
    │   ├── MessageTooLargeError      a message over the configured size cap
    │   ├── ChunkError                a block chunk that does not fit its block
    │   ├── PartError                 a part of a probe's scores that does not fit its probe
    │   └── SubjectsError             parts of a shard map's subjects that do not make it
    ├── GalleryWorkerError            a gallery worker died on a request, twice
    ├── ProbeTimeout(TimeoutError)    no event for a probe within the time given
    ├── TransportError                the broker could not be reached or used
    │   └── MissingResourceError      a queue/exchange another role declares is absent
    └── StoreError                    the on-disk gallery could not be read/written
"""

from __future__ import annotations

__all__ = [
    "ChunkError",
    "CipherFaceError",
    "CiphertextError",
    "ConfigError",
    "CryptoError",
    "EmbeddingCrashedError",
    "EmbeddingError",
    "GalleryWorkerError",
    "ImageDecodeError",
    "IntegrityError",
    "KeyMismatchError",
    "MessageTooLargeError",
    "MissingResourceError",
    "MissingWeightsError",
    "NoFaceError",
    "PartError",
    "ProbeTimeout",
    "SecretKeyError",
    "SignatureError",
    "StoreError",
    "SubjectsError",
    "TooManyFacesError",
    "TransportError",
    "UnknownModelError",
    "UnsupportedImageError",
    "WireFormatError",
]


class CipherFaceError(Exception):
    """Root of every error CipherFace raises on purpose."""

    def __reduce__(self) -> tuple[object, ...]:
        # Pickled by message and attributes, not by constructor arguments: an error
        # whose __init__ takes other arguments (`MissingWeightsError`) still crosses
        # from a worker process (`cipherface.embedding_pool`) with its type intact.
        return (_restore, (type(self), str(self)), self.__dict__)


def _restore(kind: type[CipherFaceError], message: str) -> CipherFaceError:
    error = kind.__new__(kind)
    Exception.__init__(error, message)
    return error


class ConfigError(CipherFaceError, ValueError):
    """A setting, flag or parameter preset is invalid."""


class CryptoError(CipherFaceError):
    """A homomorphic-encryption operation or key could not be used."""


class KeyMismatchError(CryptoError):
    """A ciphertext was made under another key than the one at hand.

    CKKS happily computes on mismatched keys and returns noise, so the key
    fingerprint is checked instead of trusting the result.
    """

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(
            f"ciphertext was encrypted under key {got}, but this context holds key {expected}"
        )
        self.expected = expected
        self.got = got


class SecretKeyError(CryptoError):
    """A secret key is present where it must not be, or absent where it is needed."""


class CiphertextError(CryptoError, ValueError):
    """Bytes that should hold a ciphertext or a context do not."""


class SignatureError(CryptoError):
    """A message is unsigned, badly signed, or signed by a key this party does not trust.

    CKKS gives confidentiality, not authenticity: anyone holding the public context
    can make well-formed ciphertexts, so who sent a message is settled by Ed25519
    signatures, never by the key fingerprint a message claims.
    """


class IntegrityError(CryptoError):
    """A well-formed input that the protocol would never produce.

    Scores at another scale or level, decryptions outside the metric's range, an
    edge probe that is not a unit vector under on-prem's key: nothing derived from
    such an input may leave on-prem, so it ends as an error event without numbers.
    """


class EmbeddingError(CipherFaceError):
    """A face embedding could not be computed."""


class ImageDecodeError(EmbeddingError, ValueError):
    """The input is not a decodable image (corrupt, truncated, empty or too large)."""


class UnsupportedImageError(ImageDecodeError):
    """The input is a file of another kind than the accepted image formats.

    A subclass of `ImageDecodeError`, so callers that refuse undecodable input
    refuse it too; its message names the type that was detected.
    """

    def __init__(self, name: str, detected: str, accepted: tuple[str, ...]) -> None:
        super().__init__(f"{name}: unsupported image format {detected}; send {', '.join(accepted)}")
        self.detected = detected


class NoFaceError(EmbeddingError):
    """The image decoded, but no face was detected in it."""


class TooManyFacesError(EmbeddingError):
    """A probe image with more faces than `Settings.max_faces`.

    Each face costs a gallery search on the cloud and a decryption and a fit on
    on-prem: the bound keeps one probe's work bounded, whoever sends it.
    """


class UnknownModelError(EmbeddingError, ValueError):
    """The face-recognition model name is not in the registry."""


class MissingWeightsError(EmbeddingError):
    """A model's weight file is absent and could not be downloaded."""

    def __init__(self, model: str, file_name: str, folder: str) -> None:
        super().__init__(
            f"weights for {model} are missing: {file_name} is not in {folder} and could not be "
            f"downloaded (no internet?). Place the file there by hand, or use model 'Dlib', whose "
            f"weights ship in the face-recognition-models package ('cipherface weights')."
        )
        self.model = model
        self.file_name = file_name
        self.folder = folder


class EmbeddingCrashedError(EmbeddingError):
    """The worker process embedding an image died (a native fault, or killed).

    The image may be what crashed it, so the probe is answered with this error
    rather than retried; the replica itself keeps running.
    """


class GalleryWorkerError(CipherFaceError):
    """A gallery worker process died (killed, out of memory, a native fault).

    The gallery starts a new worker, reinstalls that worker's blocks from its
    store and tries the request once more; this is raised when the new worker
    dies on it too (the request itself is what kills it).
    """


class WireFormatError(CipherFaceError, ValueError):
    """A message could not be decoded or failed validation."""


class MessageTooLargeError(WireFormatError):
    """A message is larger than the configured cap (`Settings.max_message_size`).

    Refused before it is published and before a received one is parsed: the broker
    would refuse it anyway (its ``max_message_size``), closing the channel, and a
    large message is the cheapest way to exhaust a consumer's memory.
    """

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} of {size} bytes exceeds the {limit}-byte message limit")
        self.size = size
        self.limit = limit


class ChunkError(WireFormatError):
    """A block chunk that does not belong with the others of its block.

    Another layout, version or dimension count than the chunks already held, columns
    out of range or held already: the chunk is dead-lettered with this reason and the
    block is installed only from chunks that agree (`cipherface.wire.chunks`).
    """


class PartError(WireFormatError):
    """A part of a probe's scores that does not belong with the others of its probe.

    Another parts count, subject or faces than the parts already held, a part or a
    block held already: the part is dead-lettered with this reason and the probe is
    ranked only from parts that agree (`cipherface.wire.parts`).
    """


class SubjectsError(WireFormatError):
    """Parts of a sharded map's subject list that do not make the list announced.

    A part out of range or unlike the part held under its index is dead-lettered
    with this reason; a whole that does not hash to the announced digest is dropped
    and asked for again. Meanwhile the replica routes by the map before
    (`cipherface.wire.subjects`).
    """


class ProbeTimeout(CipherFaceError, TimeoutError):
    """No event came for a probe in the time the caller gave.

    A `TimeoutError` too (``asyncio.TimeoutError`` is one), so code that caught
    the bare timeout still does; its message names the probe.
    """


class TransportError(CipherFaceError):
    """The message broker could not be reached or refused an operation."""


class MissingResourceError(TransportError):
    """A queue or exchange this role relies on but may not declare does not exist (yet)."""


class StoreError(CipherFaceError):
    """The on-disk encrypted gallery could not be read or written."""
