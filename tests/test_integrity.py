"""What on-prem decrypts and releases: range checks, the one-probe fit, edge-probe proofs.

A malicious but trusted replica (it signs its scores) is played here by adding
chosen plaintexts to honest score ciphertexts (`tests.forging`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cipherface.crypto import Keyring, Metric
from cipherface.exceptions import IntegrityError
from cipherface.gallery import EncryptedGallery, EnrollmentBook, encrypt_probe, rank
from cipherface.gallery.compact import SCORE_BITS, compressed_size
from cipherface.gallery.consistency import FIT_TOLERANCE, MAX_FIT_DIMENSIONS
from cipherface.gallery.integrity import FLOOD_SIGMA, flood, prove_probe
from cipherface.gallery.packing import _SCORE_SCALE, _VALUE_SCALE, _Seal
from cipherface.wire.payloads import BlockScores, EncryptedProbe
from tests.forging import ciphertext_of, resent

DIMENSIONS = 128


def _unit(rng: np.random.Generator, count: int, dimensions: int = DIMENSIONS) -> np.ndarray:
    vectors = rng.standard_normal((count, dimensions))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module", params=[Metric.COSINE, Metric.EUCLIDEAN_L2, Metric.EUCLIDEAN])
def world(
    request: pytest.FixtureRequest, keys: Keyring, public: Keyring
) -> tuple[Metric, EnrollmentBook, EncryptedGallery, np.ndarray]:
    """A gallery of 300 templates (so both parts of some slots hold decoys and templates)."""
    metric = request.param
    vectors = _unit(np.random.default_rng(3), 300) * (0.8 if metric is Metric.EUCLIDEAN else 1)
    book = EnrollmentBook(keys, metric, DIMENSIONS)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    gallery = EncryptedGallery(public)
    for block in book.encrypt_blocks():
        gallery.put(block)
    return metric, book, gallery, vectors


def _near(vectors: np.ndarray) -> np.ndarray:
    """A probe at cosine distance ~0.05 from template t7."""
    other = _unit(np.random.default_rng(9), 1)[0]
    other -= (other @ vectors[7]) * vectors[7] / (vectors[7] @ vectors[7])
    unit = vectors[7] / np.linalg.norm(vectors[7])
    probe = 0.95 * unit + np.sqrt(1 - 0.95**2) * other / np.linalg.norm(other)
    return probe * np.linalg.norm(vectors[7])


def _shift(public: Keyring, scores: BlockScores, deltas: dict[int, float]) -> BlockScores:
    """What a malicious replica can do: add chosen values at chosen positions."""
    seal = _Seal(public)
    ciphertext = ciphertext_of(seal, scores)
    packed = np.zeros(seal.slots, dtype=np.complex128)
    for position, delta in deltas.items():
        if position < seal.slots:
            packed[position] += delta
        else:
            packed[position - seal.slots] += 1j * delta
    plain = seal.plain(packed.tolist(), _SCORE_SCALE)
    seal.evaluator.add_plain_inplace(ciphertext, plain)
    return resent(seal, scores, ciphertext)


def test_honest_scores_pass_and_match_numpy(keys: Keyring, world: tuple) -> None:
    _metric, book, gallery, vectors = world
    matches = rank(keys, book, gallery.search(_near(vectors)), top_k=3)
    assert matches[0].template_id == "t7"


@pytest.mark.parametrize("delta", [-0.02, -0.005])
def test_a_shifted_released_score_is_refused(
    keys: Keyring, public: Keyring, world: tuple, delta: float
) -> None:
    """Lowering the best candidate's score (a false accept, or a key-dependent value) shows."""
    _metric, book, gallery, vectors = world
    [scores] = gallery.search(_near(vectors))
    assert rank(keys, book, [scores], top_k=3)[0].template_id == "t7"
    with pytest.raises(IntegrityError, match="not those of one probe"):
        rank(keys, book, [_shift(public, scores, {7: delta})], top_k=3)


def test_a_shift_below_the_fit_tolerance_drowns_in_the_flooding(
    keys: Keyring, public: Keyring
) -> None:
    assert FLOOD_SIGMA >= max(FIT_TOLERANCE.values())


def test_shifting_every_template_by_the_same_amount_shows_in_the_decoys(
    keys: Keyring, public: Keyring, world: tuple
) -> None:
    _metric, book, gallery, vectors = world
    [scores] = gallery.search(_near(vectors))
    shifted = _shift(public, scores, {k: -0.05 for k in range(300)})
    with pytest.raises(IntegrityError):
        rank(keys, book, [shifted], top_k=3)


def test_scores_of_a_scaled_plaintext_probe_are_refused(keys: Keyring, world: tuple) -> None:
    """A replica that weights its columns by 1.05p instead of p: refused for the unit
    metrics, while raw euclidean admits any probe norm (it is a genuine probe then)."""
    metric, book, gallery, vectors = world
    probe = 1.05 * _near(vectors)
    if metric is Metric.EUCLIDEAN:
        assert rank(keys, book, gallery.search(probe), top_k=3)[0].template_id == "t7"
        return
    factor, const = (-1.0, 1.0) if metric is Metric.COSINE else (-2.0, 2.0)
    [scores] = gallery._call_shards(
        "score_many", (np.array([factor * probe]), [const], gallery.compress), [0]
    )
    with pytest.raises(IntegrityError, match="norm"):
        rank(keys, book, scores, top_k=3)


def _forged_probe(public: Keyring, weights: list[list[complex]] | list[complex]) -> EncryptedProbe:
    seal = _Seal(public)
    return EncryptedProbe(
        fingerprint=public.fingerprint,
        metric=Metric.COSINE.value,
        dimensions=len(weights),
        columns=tuple(seal.encrypt_public(w, _VALUE_SCALE) for w in weights),  # type: ignore[arg-type]
        norm=None,
    )


def _cosine_gallery(
    keys: Keyring, public: Keyring, *, seed: int, dimensions: int = DIMENSIONS
) -> tuple[np.ndarray, EnrollmentBook, EncryptedGallery]:
    """300 random unit templates, enrolled and served (cosine): a gallery to forge against."""
    vectors = _unit(np.random.default_rng(seed), 300, dimensions)
    book = EnrollmentBook(keys, Metric.COSINE, dimensions)
    book.add_many((f"s{i}", v) for i, v in enumerate(vectors))
    gallery = EncryptedGallery(public)
    for block in book.encrypt_blocks():
        gallery.put(block)
    return vectors, book, gallery


def test_edge_probe_with_a_different_unit_vector_in_each_slot_is_refused(
    keys: Keyring, public: Keyring, conjugation: bytes
) -> None:
    """Every slot's vector is a unit vector, so the norm proofs pass: the fit does not."""
    vectors, book, gallery = _cosine_gallery(keys, public, seed=4)
    slots = _Seal(public).slots
    per_slot = _unit(np.random.default_rng(5), slots)
    probe = _forged_probe(public, [(-per_slot[:, j]).tolist() for j in range(DIMENSIONS)])
    check = prove_probe(public, conjugation, probe)
    with pytest.raises(IntegrityError, match="one probe"):
        rank(keys, book, gallery.search(probe), top_k=3, probe_check=check)
    honest = encrypt_probe(public, vectors[3], Metric.COSINE)
    matches = rank(
        keys, book, gallery.search(honest), probe_check=prove_probe(public, conjugation, honest)
    )
    assert matches[0].subject == "s3"


@pytest.mark.parametrize(
    ("dimensions", "refused_by"),
    [
        (DIMENSIONS, r"tampered|one probe"),  # within N2's bound: the score checks refuse it
        (MAX_FIT_DIMENSIONS + 8, "imaginary components"),  # no fit: N2's tight bound does
    ],
)
def test_edge_probe_with_an_imaginary_part_is_refused(
    keys: Keyring, public: Keyring, conjugation: bytes, dimensions: int, refused_by: str
) -> None:
    """p = a + ib with |a|^2 - |b|^2 = 1 and |a|^2 + |b|^2 = 1.1 inflates every
    similarity by |a| - 1. Where the consistency fit runs, N2's slack covers the
    key-switching noise and the checks of the decrypted scores refuse the probe;
    above `MAX_FIT_DIMENSIONS` no fit runs, and N2's bound stays tight enough to."""
    vectors, book, gallery = _cosine_gallery(keys, public, seed=6, dimensions=dimensions)
    real = vectors[3]
    other = _unit(np.random.default_rng(7), 1, dimensions)[0]
    other -= (other @ real) * real  # orthogonal: N1's imaginary part stays 0
    other /= np.linalg.norm(other)
    b = np.sqrt(0.05)
    weights = np.sqrt(1 + b**2) * real + 1j * b * other  # |a|^2 - |b|^2 = 1
    probe = _forged_probe(public, [complex(w) for w in -weights])
    check = prove_probe(public, conjugation, probe)
    with pytest.raises(IntegrityError, match=refused_by):
        rank(keys, book, gallery.search(probe), top_k=3, probe_check=check)


def test_flooding_keeps_the_decision_and_hides_the_last_digits() -> None:
    threshold = 0.07
    for distance in (0.0, 0.0699, 0.0701, 0.5):
        draws = [flood(distance, threshold, distance <= threshold) for _ in range(200)]
        assert all((d <= threshold) == (distance <= threshold) for d in draws)
        assert len({round(d, 4) for d in draws}) > 20  # not the exact value, every time
    spread = np.std([flood(0.5, threshold, False) for _ in range(2000)])
    assert spread == pytest.approx(FLOOD_SIGMA, rel=0.15)


def test_compressed_scores_rank_as_their_seal_serialization_does(
    keys: Keyring, public: Keyring, world: tuple
) -> None:
    """Replicas send plaintext-probe scores compressed; the same ciphertext as SEAL
    writes it (older replicas, batched 1:1) is read alike."""
    _metric, book, gallery, vectors = world
    [scores] = gallery.search(_near(vectors))
    seal = _Seal(public)
    assert scores.bits == SCORE_BITS
    assert len(scores.scores) == compressed_size(2 * seal.slots) == 64_512
    as_seal = BlockScores(
        block_id=scores.block_id,
        version=scores.version,
        scores=seal.dump(ciphertext_of(seal, scores)),
    )
    ranked = [rank(keys, book, [s], top_k=3) for s in (scores, as_seal)]
    assert [m.template_id for m in ranked[0]] == [m.template_id for m in ranked[1]]
    assert ranked[0][0].template_id == "t7"


@pytest.mark.parametrize(
    ("change", "refused_by"),
    [
        ({"scores": b"\x00"}, "compressed scores of 1 bytes"),
        ({"bits": (30, 33)}, r"compressed to \(30, 33\) bits"),
        ({"bits": (60, 60)}, r"compressed to \(60, 60\) bits"),
    ],
)
def test_misshapen_compressed_scores_are_refused(
    keys: Keyring, world: tuple, change: dict, refused_by: str
) -> None:
    _metric, book, gallery, vectors = world
    [scores] = gallery.search(_near(vectors))
    if "scores" in change:
        change = {"scores": scores.scores + change["scores"]}
        refused_by = f"compressed scores of {len(scores.scores) + 1} bytes"
    with pytest.raises(IntegrityError, match=refused_by):
        rank(keys, book, [dataclasses.replace(scores, **change)], top_k=3)


def test_compressed_scores_answering_an_edge_probe_are_refused(
    keys: Keyring, public: Keyring, conjugation: bytes
) -> None:
    """An edge probe's scores are three-component products, never compressed: two
    compressed components would be a plaintext probe's scores passed off as its."""
    vectors, book, gallery = _cosine_gallery(keys, public, seed=8)
    honest = encrypt_probe(public, vectors[3], Metric.COSINE)
    check = prove_probe(public, conjugation, honest)
    plaintext_scores = gallery.search(vectors[3])
    with pytest.raises(IntegrityError, match="compressed"):
        rank(keys, book, plaintext_scores, top_k=3, probe_check=check)
    assert rank(keys, book, gallery.search(honest), probe_check=check)[0].subject == "s3"
