"""On-prem's per-face decision: the nearest verified face decides, every face is answered."""

from __future__ import annotations

from agents.onprem.answers import decide
from cipherface import wire
from cipherface.crypto import Metric
from cipherface.gallery import Match

THRESHOLD = 0.07  # Dlib, cosine


def _scores(count: int, subject: str | None = None) -> wire.ScoresReady:
    faces = tuple(
        wire.FaceScores(box=(100 * i, 0, 80, 80), confidence=0.9, scores=()) for i in range(count)
    )
    return wire.ScoresReady(
        probe_id="p", subject=subject, faces=faces, request="r", submitted_at=0.0, timings={}
    )


def _match(subject: str, distance: float) -> Match:
    return Match(subject=subject, template_id=f"{subject}/1", distance=distance, score=distance)


def test_a_claim_is_verified_by_whichever_face_matches_it() -> None:
    answer = decide(
        _scores(2, "bob"), [[_match("bob", 0.30)], [_match("bob", 0.04)]], THRESHOLD, Metric.COSINE
    )
    assert (answer.face, answer.subject, answer.verified) == (1, "bob", True)
    assert [f.verified for f in answer.faces] == [False, True]
    assert [f.box for f in answer.faces] == [(0, 0, 80, 80), (100, 0, 80, 80)]
    assert answer.error is None and answer.distance == answer.faces[1].distance


def test_identification_names_every_face_and_the_nearest_verified_decides() -> None:
    ranked = [[_match("ann", 0.05)], [_match("bob", 0.02)], [_match("cid", 0.01 + 0.2)]]
    answer = decide(_scores(3), ranked, THRESHOLD, Metric.COSINE)
    assert [(f.subject, f.verified) for f in answer.faces] == [
        ("ann", True),
        ("bob", True),
        ("cid", False),
    ]
    assert (answer.face, answer.subject) == (1, "bob")
    for face in answer.faces:  # flooded and rounded, never the exact value
        assert face.distance is not None and round(face.distance, 4) == face.distance


def test_without_a_verified_face_the_nearest_is_reported_unverified() -> None:
    ranked = [[_match("ann", 0.5)], [_match("bob", 0.3)]]
    answer = decide(_scores(2), ranked, THRESHOLD, Metric.COSINE)
    assert (answer.face, answer.subject, answer.verified) == (1, "bob", False)


def test_no_candidate_is_an_error_naming_why() -> None:
    assert decide(_scores(2, "zed"), [[], []], THRESHOLD, Metric.COSINE).error == (
        "UnknownSubject: 'zed' is not enrolled"
    )
    assert decide(_scores(1), [[]], THRESHOLD, Metric.COSINE).error == (
        "EmptyGallery: nothing is enrolled"
    )
    assert decide(_scores(0), [], THRESHOLD, Metric.COSINE).error == (
        "NoFaceError: the replica scored no face"
    )
