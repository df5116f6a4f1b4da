"""The distance metrics, apart from the crypto that computes them.

A metric's name travels in every envelope, block and probe, so the wire layer
must be able to parse it without loading TenSEAL: this module imports nothing
but the exceptions. `cipherface.crypto` re-exports `Metric`.
"""

from __future__ import annotations

from enum import Enum

from cipherface.exceptions import ConfigError

__all__ = ["Metric"]


class Metric(str, Enum):
    """Distance metrics computable under encryption.

    Euclidean distances are computed *squared* on ciphertexts (a square root is
    not a polynomial) and compared with the squared threshold, as the original
    CipherFace did; cosine is ``1 - a.b`` on L2-normalised embeddings.
    """

    EUCLIDEAN = "euclidean"
    COSINE = "cosine"
    EUCLIDEAN_L2 = "euclidean_l2"

    @classmethod
    def parse(cls, value: str | Metric) -> Metric:
        """Accept a metric or its name; raise `ConfigError` naming the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ConfigError(f"unknown distance metric {value!r}; choose {choices}") from None

    @property
    def normalises(self) -> bool:
        """Whether embeddings are L2-normalised before encryption for this metric."""
        return self is not Metric.EUCLIDEAN

    @property
    def squared(self) -> bool:
        """Whether the encrypted value is a squared distance."""
        return self is not Metric.COSINE
