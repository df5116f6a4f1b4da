"""A replica's work on one probe: embed every face (or take the edge's), score each one."""

from __future__ import annotations

import time

import numpy as np

from cipherface import wire
from cipherface.crypto import Keyring
from cipherface.embedding_cache import EmbeddingCache
from cipherface.gallery import EncryptedGallery
from cipherface.gallery.integrity import prove_probe

__all__ = ["score_faces"]


def score_faces(
    request: wire.ProbeRequest | wire.EncryptedProbeRequest,
    embedder: EmbeddingCache,
    gallery: EncryptedGallery,
    keyring: Keyring,
    conjugation_key: bytes,
) -> tuple[tuple[wire.FaceScores, ...], wire.ProbeCheck | None, dict[str, float]]:
    """Every face's encrypted scores, an edge probe's norm proof, and seconds per stage.

    Every face the detector keeps is searched, not only the largest: a photo of
    two enrolled people is an answer for each, and on-prem says which face decided.
    An edge probe is one face without a box (the cloud never saw the image). Runs
    in a thread; raises `EmbeddingError` (no face, not an image) or
    `KeyMismatchError` (an edge probe under another key).
    """
    timings: dict[str, float] = {}
    check = None
    started = time.perf_counter()
    if isinstance(request, wire.ProbeRequest):
        found = embedder.embed(request.image, name=f"probe {request.probe_id}")
        probes: list[tuple[tuple[int, ...] | None, float, object]] = [
            (face.box, float(face.confidence), np.asarray(face.embedding)) for face in found
        ]
        timings["embed"] = time.perf_counter() - started
    else:
        keyring.check(request.probe.fingerprint)
        probes = [(None, 1.0, request.probe)]
        check = prove_probe(keyring, conjugation_key, request.probe)
        timings["check"] = time.perf_counter() - started
    started = time.perf_counter()
    faces = tuple(
        wire.FaceScores(
            box=box,
            confidence=confidence,
            scores=tuple(gallery.search_shared(probe, subject=request.subject)),  # type: ignore[arg-type]
        )
        for box, confidence, probe in probes
    )
    timings["search"] = time.perf_counter() - started
    return faces, check, timings
