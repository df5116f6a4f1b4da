"""An edge probe in pieces by dimension range scores exactly what the whole probe scores.

Real TenSEAL, no broker: each piece is scored over its own dimensions
(`EncryptedGallery.search` from ``start``) and proved (`prove_probe`), on-prem adds
the pieces' ciphertexts (`sum_pieces`) and ranks once. CKKS addition is exact
modular arithmetic, so the sum decrypts to the very values the whole probe gives,
and the decision is the same.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from agents.cloud.probes import scores_of
from cipherface import wire
from cipherface.crypto import Keyring, Metric
from cipherface.exceptions import IntegrityError
from cipherface.gallery import EncryptedGallery, EnrollmentBook, encrypt_probe, rank
from cipherface.gallery.integrity import prove_probe
from cipherface.gallery.packing import _Seal
from cipherface.gallery.pieces import edge_pieces, sum_pieces
from cipherface.wire.payloads import BlockScores, EncryptedProbe

CAP = 4 * 1024 * 1024


def _world(
    keys: Keyring, public: Keyring, metric: Metric, dimensions: int
) -> tuple[EnrollmentBook, EncryptedGallery, np.ndarray]:
    rng = np.random.default_rng(dimensions)
    vectors = rng.standard_normal((40, dimensions))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    if metric is Metric.EUCLIDEAN:
        vectors *= 0.8
    book = EnrollmentBook(keys, metric, dimensions)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    gallery = EncryptedGallery(public)
    for block in book.encrypt_blocks():
        gallery.put(block)
    return book, gallery, vectors


def piece_scores(
    gallery: EncryptedGallery,
    public: Keyring,
    conjugation: bytes,
    probe: EncryptedProbe,
    subject: str | None = None,
) -> list[wire.ScoresReady]:
    """What replicas send for each piece of ``probe`` split under 4 MiB."""
    request = wire.EncryptedProbeRequest(probe_id="p", probe=probe, subject=subject)
    out = []
    for part in wire.split_probe(request, CAP):
        piece = wire.piece_probe(part)
        scores = tuple(gallery.search(piece, subject=subject, start=part.start))
        face = wire.FaceScores(box=None, confidence=1.0, scores=scores)
        check = prove_probe(public, conjugation, piece)
        out.append(scores_of(part, (face,), check, {}, part.request))
    return out


@pytest.mark.parametrize(
    ("metric", "dimensions"),
    [(Metric.COSINE, 128), (Metric.EUCLIDEAN, 128), (Metric.EUCLIDEAN_L2, 512)],
)
@pytest.mark.parametrize("subject", [None, "s3"])
def test_pieces_add_up_to_the_whole_probe_exactly(
    keys: Keyring,
    public: Keyring,
    conjugation: bytes,
    metric: Metric,
    dimensions: int,
    subject: str | None,
) -> None:
    book, gallery, vectors = _world(keys, public, metric, dimensions)
    noise = np.random.default_rng(1).normal(scale=0.01, size=dimensions)
    probe = encrypt_probe(public, vectors[3] + noise, metric)
    pieces = piece_scores(gallery, public, conjugation, probe, subject)
    assert len(pieces) == edge_pieces(public, dimensions, CAP) > 1
    whole = sum_pieces(keys, pieces)
    seal = _Seal(keys)
    [summed] = whole.faces[0].scores
    [alone] = gallery.search(probe, subject=subject)
    assert np.array_equal(
        seal.decrypt(seal.load_checked(summed.scores, size=3)),
        seal.decrypt(seal.load_checked(alone.scores, size=3)),
    )
    check = prove_probe(public, conjugation, probe)
    split = rank(keys, book, whole.faces[0].scores, subject=subject, probe_check=whole.probe_check)
    unsplit = rank(keys, book, [alone], subject=subject, probe_check=check)
    assert [m.template_id for m in split] == [m.template_id for m in unsplit]
    assert split[0].template_id == "t3"
    assert np.allclose([m.score for m in split], [m.score for m in unsplit], atol=1e-3)


def test_a_piece_that_is_no_product_is_refused_before_anything_is_decrypted(
    keys: Keyring, public: Keyring, conjugation: bytes
) -> None:
    _, gallery, vectors = _world(keys, public, Metric.COSINE, 128)
    probe = encrypt_probe(public, vectors[0], Metric.COSINE)
    pieces = piece_scores(gallery, public, conjugation, probe)
    fresh = _Seal(public).encrypt_public(0.5, 2.0**50)  # two components, not a product
    [block] = pieces[1].faces[0].scores
    forged = wire.FaceScores(
        box=None,
        confidence=1.0,
        scores=(BlockScores(block_id=block.block_id, version=block.version, scores=fresh),),
    )
    pieces[1] = dataclasses.replace(pieces[1], faces=(forged,))
    with pytest.raises(IntegrityError, match="probe p, block 0"):
        sum_pieces(keys, pieces)
