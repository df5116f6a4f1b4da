"""A replica's work on one probe: embed every face (or take the edge's), score each one.

An edge probe's piece (`wire.EncryptedProbePart`) is scored like a whole edge
probe, over its own dimensions: partial scores and partial norm proofs, which
on-prem adds up with the probe's other pieces (`cipherface.gallery.pieces`).
"""

from __future__ import annotations

import time

import numpy as np

from cipherface import wire
from cipherface.crypto import Keyring
from cipherface.embedding_cache import EmbeddingCache
from cipherface.exceptions import TooManyFacesError
from cipherface.gallery import EncryptedGallery
from cipherface.gallery.expansion import expand_probe
from cipherface.gallery.integrity import prove_probe
from cipherface.wire.payloads import EncryptedProbe, ProbeCheck

__all__ = [
    "Face",
    "Probe",
    "digest_of",
    "embed_faces",
    "piece_fields",
    "prove_edge",
    "scores_of",
    "search_faces",
]

#: What a replica takes from the probe queue.
Probe = wire.ProbeRequest | wire.EncryptedProbeRequest | wire.EncryptedProbePart

#: A face to search: its box (None: an edge probe), the detector's confidence, and
#: the probe itself (an embedding, or an edge probe's ciphertexts).
Face = tuple[tuple[int, ...] | None, float, object]


def digest_of(request: Probe, body: bytes) -> str:
    """The request digest naming the probe: of the message, or, for a piece, the whole
    probe's it carries (on-prem gathers the pieces by it)."""
    if isinstance(request, wire.EncryptedProbePart):
        return request.request
    return wire.request_digest(body)


#: What a `wire.ShardSearch` and a `wire.ScoresReady` say of an edge probe's piece.
_PIECE_FIELDS = ("piece", "pieces", "dims_start", "dims_stop", "dimensions")


def piece_fields(request: Probe | wire.ShardSearch) -> dict[str, int]:
    """For a piece of an edge probe (taken from the queue, or fanned out to a shard):
    which piece its scores are and the dimensions they sum over (`wire.ScoresReady`)."""
    if isinstance(request, wire.EncryptedProbePart):
        return {
            "piece": request.piece,
            "pieces": request.pieces,
            "dims_start": request.start,
            "dims_stop": request.start + len(request.columns),
            "dimensions": request.dimensions,
        }
    if isinstance(request, wire.ShardSearch) and request.pieces > 1:
        return {name: getattr(request, name) for name in _PIECE_FIELDS}
    return {}


def scores_of(
    request: Probe | wire.ShardSearch,
    faces: tuple[wire.FaceScores, ...],
    check: ProbeCheck | None,
    timings: dict[str, float],
    digest: str,
    *,
    shard: int = 0,
    map_version: int = 0,
) -> wire.ScoresReady:
    """The probe's scores for on-prem: from ``shard`` (by the map of ``map_version``),
    and for a piece, which dimensions they sum over."""
    return wire.ScoresReady(
        probe_id=request.probe_id,
        subject=request.subject,
        faces=faces,
        request=digest,
        submitted_at=request.submitted_at,
        timings=timings,
        probe_check=check,
        shard=shard,
        map_version=map_version,
        **piece_fields(request),
    )


def embed_faces(
    request: Probe, embedder: EmbeddingCache, keyring: Keyring, *, max_faces: int
) -> tuple[list[Face], dict[str, float]]:
    """The faces to search (embedded once, whatever the shards) and the seconds it took.

    Every face the detector keeps is searched, not only the largest: a photo of two
    enrolled people is an answer for each, and on-prem says which face decided. An
    edge probe (or a piece of one) is one face without a box (the cloud never saw
    the image). Runs in a thread; raises `EmbeddingError` (no face, not an image,
    more than ``max_faces`` faces: `TooManyFacesError`), `KeyMismatchError` (an
    edge probe under another key) or `WireFormatError` (a piece no edge makes).
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if isinstance(request, wire.ProbeRequest):
        found = embedder.embed(request.image, name=f"probe {request.probe_id}")
        if len(found) > max_faces:
            raise TooManyFacesError(
                f"probe {request.probe_id}: {len(found)} faces, at most {max_faces} per probe"
            )
        timings["embed"] = time.perf_counter() - started
        return [
            (face.box, float(face.confidence), np.asarray(face.embedding)) for face in found
        ], timings
    probe = (
        request.probe
        if isinstance(request, wire.EncryptedProbeRequest)
        else wire.piece_probe(request)
    )
    keyring.check(probe.fingerprint)
    return [(None, 1.0, probe)], timings


def prove_edge(
    probes: list[Face], keyring: Keyring, edge_keys: bytes, timings: dict[str, float]
) -> tuple[list[Face], ProbeCheck | None]:
    """``probes`` with an edge probe that came packed expanded into its columns
    (`cipherface.gallery.expansion`), and the edge probe's norm proof (None for
    embedded faces), computed where it is searched, from the very columns searched.

    ``edge_keys`` are the Galois keys on-prem shipped with the context. Seconds go
    into ``timings``; raises `CiphertextError` or `ConfigError` for a packed probe
    the replica cannot expand.
    """
    edges = [probe for _, _, probe in probes if isinstance(probe, EncryptedProbe)]
    if not edges:
        return probes, None
    [(box, confidence, _)], [edge] = probes, edges  # an edge probe is a face of its own
    started = time.perf_counter()
    if edge.packed is not None:
        edge = expand_probe(keyring, edge_keys, edge)
        timings["expand"] = time.perf_counter() - started
        started = time.perf_counter()
    check = prove_probe(keyring, edge_keys, edge)
    timings["check"] = time.perf_counter() - started
    return [(box, confidence, edge)], check


def search_faces(
    probes: list[Face], gallery: EncryptedGallery, subject: str | None, start: int = 0
) -> tuple[tuple[wire.FaceScores, ...], float]:
    """Each face's encrypted scores on the blocks this replica holds, and the seconds taken
    (an edge probe's piece: over its dimensions from ``start``)."""
    started = time.perf_counter()
    faces = tuple(
        wire.FaceScores(
            box=box,
            confidence=confidence,
            scores=tuple(
                gallery.search(vector, subject=subject, start=start)  # type: ignore[arg-type]
                if start
                else gallery.search_shared(vector, subject=subject)  # type: ignore[arg-type]
            ),
        )
        for box, confidence, vector in probes
    )
    return faces, time.perf_counter() - started
