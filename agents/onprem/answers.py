"""On-prem's answer to one probe's scores: every face ranked, one decision per probe.

The cloud searches every face of a probe image (`wire.FaceScores`); each face is
ranked on its own (`cipherface.gallery.rank`, with its integrity checks and
consistency fit), and one `wire.VerificationEvent` says, per face, its best
subject, decision and flooded distance, and at top level the decision of the face
that matters: the nearest verified face, else the nearest face. So a 1:1 claim on
a group photo is verified when any face matches it, and the event names which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cipherface import wire
from cipherface.crypto import Keyring, Metric
from cipherface.exceptions import IntegrityError
from cipherface.gallery import EnrollmentBook, Match, accept, rank
from cipherface.gallery.decryption import DecryptionPool
from cipherface.gallery.integrity import flood

__all__ = ["CLOUD_STAGES", "Answer", "cloud_timings", "decide", "rank_faces"]

DECIMALS = wire.VerificationEvent.DISTANCE_DECIMALS
#: The stages a replica times (`agents.cloud.probes.embed_faces`, `prove_edge`, `search_faces`).
CLOUD_STAGES = ("embed", "expand", "check", "search")


def cloud_timings(result: wire.ScoresReady) -> dict[str, float]:
    """The replica's timings an event may pass on: its known stages, non-negative.

    The map is the replica's to fill: thousands of keys or negative seconds would
    otherwise reach every subscriber in an event on-prem signs.
    """
    return {
        stage: seconds
        for stage, seconds in result.timings.items()
        if stage in CLOUD_STAGES and seconds >= 0
    }


def rank_faces(
    keyring: Keyring,
    book: EnrollmentBook,
    result: wire.ScoresReady,
    *,
    top_k: int,
    max_faces: int,
    decryptor: DecryptionPool | None = None,
) -> list[list[Match]]:
    """Each face's candidates, nearest first; `IntegrityError` if any face's scores are
    tampered with (one forged face refuses the whole probe), or if there are more
    than ``max_faces`` faces (the cloud refuses such a probe: each face costs a
    decryption and a fit here), checked before anything is decrypted.
    ``decryptor`` (under ``keyring``) decrypts large galleries in its workers."""
    if len(result.faces) > max_faces:
        raise IntegrityError(f"{len(result.faces)} faces scored, at most {max_faces} per probe")
    return [
        rank(
            keyring,
            book,
            face.scores,
            subject=result.subject,
            top_k=top_k,
            probe_check=result.probe_check,
            decryptor=decryptor,
        )
        for face in result.faces
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """The decision fields of a `wire.VerificationEvent` (or its error)."""

    faces: tuple[wire.FaceResult, ...] = ()
    face: int | None = None
    subject: str | None = None
    verified: bool = False
    distance: float | None = None
    error: str | None = None


def decide(
    result: wire.ScoresReady,
    ranked: Sequence[Sequence[Match]],
    threshold: float,
    metric: Metric,
) -> Answer:
    """Per-face decisions and the probe's: the nearest verified face, else the nearest.

    Decisions are taken on exact values; only flooded, rounded distances leave.
    """
    if not result.faces:
        return Answer(error="NoFaceError: the replica scored no face")
    if not any(ranked):
        return Answer(
            error=f"UnknownSubject: {result.subject!r} is not enrolled"
            if result.subject
            else "EmptyGallery: nothing is enrolled"
        )
    faces: list[wire.FaceResult] = []
    order: list[tuple[bool, float, int]] = []
    for index, (face, matches) in enumerate(zip(result.faces, ranked, strict=True)):
        # No candidate for one face only if the replica scored faces on different
        # blocks: it gets no subject of its own and no distance.
        subject, verified, distance = result.subject, False, None
        if matches:
            best = matches[0]
            verified = accept(best, threshold, metric)
            subject = best.subject
            distance = round(flood(best.distance, threshold, verified), DECIMALS)
            order.append((not verified, best.score, index))
        faces.append(
            wire.FaceResult(
                box=face.box,
                confidence=face.confidence,
                subject=subject,
                verified=verified,
                distance=distance,
            )
        )
    chosen = faces[min(order)[2]]
    return Answer(
        faces=tuple(faces),
        face=min(order)[2],
        subject=chosen.subject,
        verified=chosen.verified,
        distance=chosen.distance,
    )
