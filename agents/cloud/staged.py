"""A replica's gallery under a new key, filled beside the one it serves (key rotation).

Probes keep being searched on the served gallery until every block on-prem
announced for the new key is in; `agents.cloud.agent.CloudAgent` then switches
in one step. The new gallery lives in a store file of its own, so the served
one is never touched while it fills.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cipherface.config import Settings
from cipherface.crypto import Keyring
from cipherface.gallery import EncryptedGallery
from cipherface.store import GalleryStore

__all__ = ["Staged", "stage"]


@dataclass(slots=True)
class Staged:
    """A gallery under a new key, filling beside the one served until it is whole."""

    keyring: Keyring
    store: GalleryStore
    gallery: EncryptedGallery
    context: bytes
    conjugation_key: bytes
    awaiting: set[int] = field(default_factory=set)


def stage(settings: Settings, data: bytes, conjugation_key: bytes, claimed: str) -> Staged:
    """A new key's gallery in a store file of its own, beside the one served."""
    keyring = Keyring.from_bytes(data, expect="public")
    keyring.check(claimed)
    path = settings.cloud_dir / f"gallery-{keyring.fingerprint[:16]}.sqlite"
    path.unlink(missing_ok=True)
    store = GalleryStore(path)
    store.save_context(data, keyring.fingerprint, conjugation_key)
    gallery = EncryptedGallery(
        keyring, store, workers=settings.workers, compress=settings.compress_scores
    )
    return Staged(keyring, store, gallery, data, conjugation_key)
