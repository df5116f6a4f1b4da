"""A replica's work on one probe: embed every face (or take the edge's), score each one."""

from __future__ import annotations

import time

import numpy as np

from cipherface import wire
from cipherface.crypto import Keyring
from cipherface.embedding_cache import EmbeddingCache
from cipherface.exceptions import TooManyFacesError
from cipherface.gallery import EncryptedGallery
from cipherface.gallery.integrity import prove_probe

__all__ = ["Face", "embed_faces", "score_faces", "search_faces"]


#: A face to search: its box (None: an edge probe), the detector's confidence, and
#: the probe itself (an embedding, or an edge probe's ciphertexts).
Face = tuple[tuple[int, ...] | None, float, object]


def score_faces(
    request: wire.ProbeRequest | wire.EncryptedProbeRequest,
    embedder: EmbeddingCache,
    gallery: EncryptedGallery,
    keyring: Keyring,
    conjugation_key: bytes,
    *,
    max_faces: int,
) -> tuple[tuple[wire.FaceScores, ...], wire.ProbeCheck | None, dict[str, float]]:
    """Every face's encrypted scores, an edge probe's norm proof, and seconds per stage.

    Every face the detector keeps is searched, not only the largest: a photo of
    two enrolled people is an answer for each, and on-prem says which face decided.
    An edge probe is one face without a box (the cloud never saw the image). Runs
    in a thread; raises `EmbeddingError` (no face, not an image, more than
    ``max_faces`` faces: `TooManyFacesError`) or `KeyMismatchError` (an edge
    probe under another key).
    """
    probes, check, timings = embed_faces(
        request, embedder, keyring, conjugation_key, max_faces=max_faces
    )
    faces, seconds = search_faces(probes, gallery, request.subject)
    return faces, check, {**timings, "search": seconds}


def embed_faces(
    request: wire.ProbeRequest | wire.EncryptedProbeRequest,
    embedder: EmbeddingCache,
    keyring: Keyring,
    conjugation_key: bytes,
    *,
    max_faces: int,
) -> tuple[list[Face], wire.ProbeCheck | None, dict[str, float]]:
    """The faces to search (embedded once, whatever the shards), an edge probe's norm
    proof, and the seconds it took; raises as `score_faces`."""
    timings: dict[str, float] = {}
    check = None
    started = time.perf_counter()
    if isinstance(request, wire.ProbeRequest):
        found = embedder.embed(request.image, name=f"probe {request.probe_id}")
        if len(found) > max_faces:
            raise TooManyFacesError(
                f"probe {request.probe_id}: {len(found)} faces, at most {max_faces} per probe"
            )
        probes: list[Face] = [
            (face.box, float(face.confidence), np.asarray(face.embedding)) for face in found
        ]
        timings["embed"] = time.perf_counter() - started
    else:
        keyring.check(request.probe.fingerprint)
        probes = [(None, 1.0, request.probe)]
        check = prove_probe(keyring, conjugation_key, request.probe)
        timings["check"] = time.perf_counter() - started
    return probes, check, timings


def search_faces(
    probes: list[Face], gallery: EncryptedGallery, subject: str | None
) -> tuple[tuple[wire.FaceScores, ...], float]:
    """Each face's encrypted scores on the blocks this replica holds, and the seconds taken."""
    started = time.perf_counter()
    faces = tuple(
        wire.FaceScores(
            box=box,
            confidence=confidence,
            scores=tuple(gallery.search_shared(probe, subject=subject)),  # type: ignore[arg-type]
        )
        for box, confidence, probe in probes
    )
    return faces, time.perf_counter() - started
