"""The packed encrypted gallery against numpy, on real TenSEAL (n8192).

A block holds 8192 templates: positions 0-4095 in the real parts of the slots,
4096-8191 in the imaginary parts; sizes below are chosen to fill both and spill
into a further block.

Tolerances: a plaintext probe decrypts within ~5e-5 of numpy and an encrypted
probe within ~4e-4 (public-key noise at scale 2^25), in either part of a slot;
the tests allow 1e-3 and 3e-3 on scores of order 1.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from cipherface.crypto import Keyring, Metric, plain_distance
from cipherface.exceptions import ConfigError, KeyMismatchError, WireFormatError
from cipherface.gallery import (
    BlockScores,
    EncryptedBlock,
    EncryptedGallery,
    EncryptedProbe,
    EnrollmentBook,
    accept,
    encrypt_probe,
    rank,
    rank_pairs,
)
from cipherface.gallery.integrity import prove_probe
from cipherface.wire.payloads import ProbeCheck

PLAIN_TOLERANCE = 1e-3
ENCRYPTED_TOLERANCE = 3e-3


def _vectors(count: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    # Dlib-like scale: raw norms around 0.5 to 1.5.
    return np.random.default_rng(seed).standard_normal((count, dim)) * 0.2


def _scores(
    keys: Keyring, book: EnrollmentBook, scores: list[BlockScores], check: ProbeCheck | None = None
) -> dict[str, float]:
    """Every template's decrypted score, by template id."""
    matches = rank(keys, book, scores, top_k=10**9, per_subject=False, probe_check=check)
    return {m.template_id: m.score for m in matches}


def _build(
    keys: Keyring, public: Keyring, metric: Metric, vectors: np.ndarray
) -> tuple[EnrollmentBook, EncryptedGallery, list[str]]:
    book = EnrollmentBook(keys, metric, vectors.shape[1])
    ids = book.add_many((f"s{i}", v) for i, v in enumerate(vectors))
    gallery = EncryptedGallery(public)
    for block in book.encrypt_blocks():
        assert gallery.put(block)
    return book, gallery, ids


@pytest.mark.parametrize("metric", list(Metric))
@pytest.mark.parametrize("count", [1, 37, 8192 + 5])
def test_search_matches_numpy(
    keys: Keyring, public: Keyring, conjugation: bytes, metric: Metric, count: int
) -> None:
    vectors = _vectors(count, seed=count)
    book, gallery, ids = _build(keys, public, metric, vectors)
    probe = _vectors(1, seed=99)[0]
    expected = {tid: plain_distance(v, probe, metric) for tid, v in zip(ids, vectors, strict=True)}
    edge = encrypt_probe(public, probe, metric)
    for query, check, tolerance in (
        (probe, None, PLAIN_TOLERANCE),
        (edge, prove_probe(public, conjugation, edge), ENCRYPTED_TOLERANCE),
    ):
        got = _scores(keys, book, gallery.search(query), check)
        assert got.keys() == expected.keys()
        error = max(abs(got[t] - expected[t]) for t in ids)
        assert error < tolerance, (metric, count, error)


def test_removal_frees_slots_and_is_ignored(keys: Keyring, public: Keyring) -> None:
    metric = Metric.EUCLIDEAN
    vectors = _vectors(50)
    book, gallery, ids = _build(keys, public, metric, vectors)
    book.remove(ids[3])
    assert book.remove_subject("s7") == 1
    assert book.pending_blocks() == [0]
    for block in book.encrypt_blocks():
        assert gallery.put(block)
    assert len(gallery) == len(book) == 48
    probe = vectors[3]
    got = _scores(keys, book, gallery.search(probe))
    assert ids[3] not in got and ids[7] not in got and len(got) == 48
    for tid, v in zip(ids, vectors, strict=True):
        if tid in got:
            assert abs(got[tid] - plain_distance(v, probe, metric)) < PLAIN_TOLERANCE
    # A new template reuses the lowest freed slot.
    new_id = book.add("newcomer", vectors[3])
    assert book.slot_of(new_id) == (0, 3)


def test_rank_top_k_and_threshold(keys: Keyring, public: Keyring) -> None:
    metric = Metric.EUCLIDEAN_L2
    vectors = _vectors(200, dim=128)
    book, gallery, _ = _build(keys, public, metric, vectors)
    book.add("s5", vectors[5] * 1.01)  # a second template of s5
    for block in book.encrypt_blocks():
        gallery.put(block)
    probe = vectors[5] + 0.001
    matches = rank(keys, book, gallery.search(probe), top_k=3)
    assert matches[0].subject == "s5"
    assert len({m.subject for m in matches}) == 3  # one entry per subject
    assert matches == sorted(matches, key=lambda m: m.distance)
    assert accept(matches[0], 0.4, metric) and not accept(matches[1], 0.4, metric)
    assert matches[0].distance == pytest.approx(np.sqrt(max(matches[0].score, 0)))
    # 1:1 by subject: only s5's blocks and templates.
    only = rank(keys, book, gallery.search(probe, subject="s5"), subject="s5", top_k=5)
    assert {m.subject for m in only} == {"s5"}


def test_verify_pairs_batched(keys: Keyring, public: Keyring) -> None:
    metric = Metric.COSINE
    vectors = _vectors(8192 + 10, dim=32)
    book, gallery, ids = _build(keys, public, metric, vectors)
    book.add("s1", vectors[2])  # s1 now has two templates (block 1)
    for block in book.encrypt_blocks():
        gallery.put(block)
    rng = np.random.default_rng(5)
    # s1 claimed twice: two rounds; s4097 (imaginary part) shares s1's CKKS slot;
    # s8200 sits in the second block.
    claims = [0, 1, 4100, 1, 17, 4097, 8200]
    probes = [vectors[i] + 0.01 * rng.standard_normal(32) for i in claims]
    pairs = [(p, f"s{c}") for p, c in zip(probes, claims, strict=True)] + [(probes[0], "nobody")]
    matches = rank_pairs(keys, book, gallery.verify_pairs(pairs), len(pairs))
    assert matches[-1] is None
    for (probe, subject), match in zip(pairs[:-1], matches[:-1], strict=True):
        assert match is not None and match.subject == subject
        candidates = [
            plain_distance(v, probe, metric)
            for tid, v in zip(ids, vectors, strict=True)
            if book.subject_of(tid) == subject
        ]
        if subject == "s1":
            candidates.append(plain_distance(vectors[2], probe, metric))
        assert abs(match.score - min(candidates)) < PLAIN_TOLERANCE


def test_stale_versions_are_refused_and_ignored(keys: Keyring, public: Keyring) -> None:
    vectors = _vectors(10)
    book, gallery, _ = _build(keys, public, Metric.COSINE, vectors)
    unchanged = book.encrypt_block(0)
    assert unchanged.version == 1  # nothing changed: a resync keeps the version
    book.add("late", vectors[1])
    old = book.encrypt_block(0)  # version 2
    book.remove(book.template_ids("late")[0])
    newer = book.encrypt_block(0)  # version 3
    assert (old.version, newer.version) == (2, 3)
    assert gallery.put(newer) and not gallery.put(old) and not gallery.put(newer)
    stale = EncryptedGallery(public)
    stale.put(old)
    # On-prem has moved to version 3: scores on version 2 name no one.
    assert rank(keys, book, stale.search(vectors[0])) == []


def test_wrong_key_is_refused(keys: Keyring, public: Keyring) -> None:
    vectors = _vectors(5)
    other = Keyring.generate("n8192", relin_keys=False)
    foreign = EnrollmentBook(other, Metric.COSINE, 16)
    foreign.add("x", vectors[0])
    gallery = EncryptedGallery(public)
    with pytest.raises(KeyMismatchError):
        gallery.put(foreign.encrypt_block(0))
    book, gallery, _ = _build(keys, public, Metric.COSINE, vectors)
    with pytest.raises(KeyMismatchError):
        gallery.search(encrypt_probe(other, vectors[0], Metric.COSINE))
    with pytest.raises(KeyMismatchError):
        rank(other, book, gallery.search(vectors[0]))


def test_wire_round_trips_and_validation(keys: Keyring, public: Keyring) -> None:
    vectors = _vectors(3)
    book = EnrollmentBook(keys, Metric.EUCLIDEAN, 16)
    book.add_many((f"s{i}", v) for i, v in enumerate(vectors))
    block = book.encrypt_block(0)
    assert EncryptedBlock.from_dict(block.to_dict()) == block
    probe = encrypt_probe(public, vectors[0], Metric.EUCLIDEAN)
    assert EncryptedProbe.from_dict(probe.to_dict()) == probe
    scores = BlockScores(block_id=1, version=2, scores=b"x", pairs=(0, -1))
    assert BlockScores.from_dict(scores.to_dict()) == scores
    broken = block.to_dict() | {"columns": block.columns[:-1]}
    with pytest.raises(WireFormatError):
        EncryptedBlock.from_dict(broken)
    with pytest.raises(WireFormatError):
        EncryptedBlock.from_dict(block.to_dict() | {"norms": None})
    with pytest.raises(WireFormatError):
        BlockScores.from_dict({"block_id": "1", "version": 1, "scores": b""})


def test_book_validation(keys: Keyring, public: Keyring) -> None:
    book = EnrollmentBook(keys, Metric.EUCLIDEAN, 16)
    with pytest.raises(ConfigError):
        book.add("a", np.zeros(8))
    with pytest.raises(ConfigError):
        book.add("a", np.full(16, 10.0))  # squared norm 1600: would wrap around
    with pytest.raises(ConfigError):
        book.add("", np.ones(16) * 0.1)
    book.add("a", np.ones(16) * 0.1, template_id="t1")
    with pytest.raises(ConfigError):
        book.add("b", np.ones(16) * 0.1, template_id="t1")
    with pytest.raises(ConfigError):
        book.remove("nope")
    gallery = EncryptedGallery(public)
    gallery.put(book.encrypt_block(0))
    with pytest.raises(ConfigError):
        gallery.search(np.ones(8))


def test_book_persists(tmp_path, keys: Keyring) -> None:
    vectors = _vectors(20)
    path = tmp_path / "book.sqlite3"
    with EnrollmentBook(keys, Metric.EUCLIDEAN_L2, 16, path) as book:
        ids = book.add_many((f"s{i}", v) for i, v in enumerate(vectors))
        book.encrypt_block(0)
        book.remove(ids[0])
    with EnrollmentBook(keys, Metric.EUCLIDEAN_L2, 16, path) as book:
        assert len(book) == 19 and book.pending_blocks() == [0]
        assert book.shipped(0).version == 1 and book.shipped(0).template_ids[0] == ids[0]
        assert book.add("again", vectors[0]) and book.slot_of(book.template_ids("again")[0]) == (
            0,
            0,
        )
    with pytest.raises(ConfigError):
        EnrollmentBook(keys, Metric.COSINE, 16, path)
    with pytest.raises(KeyMismatchError):
        EnrollmentBook(Keyring.generate("n8192"), Metric.EUCLIDEAN_L2, 16, path)


def test_book_of_the_one_per_slot_layout_is_refused(tmp_path, keys: Keyring) -> None:
    path = tmp_path / "old.sqlite3"
    EnrollmentBook(keys, Metric.COSINE, 16, path).close()
    with sqlite3.connect(path) as db:  # what books recorded before two templates per slot
        db.execute("UPDATE meta SET key = 'slots', value = '4096' WHERE key = 'capacity'")
    with pytest.raises(ConfigError, match="one-template-per-slot"):
        EnrollmentBook(keys, Metric.COSINE, 16, path)


def test_workers_and_parallel_encryption_agree(keys: Keyring, public: Keyring) -> None:
    vectors = _vectors(8192 * 2 + 3, dim=8)
    book = EnrollmentBook(keys, Metric.EUCLIDEAN_L2, 8)
    book.add_many((f"s{i}", v) for i, v in enumerate(vectors))
    with EncryptedGallery(public, workers=2) as gallery:
        for block in book.encrypt_blocks(workers=2):
            gallery.put(block)
        probe = vectors[12289]  # block 1, imaginary part
        got = _scores(keys, book, gallery.search(probe))
        pairs = rank_pairs(keys, book, gallery.verify_pairs([(probe, "s12289")]), 1)
    assert len(got) == len(vectors)
    best = min(got, key=got.get)
    assert book.subject_of(best) == "s12289" and pairs[0].subject == "s12289"


def test_large_dimensions(keys: Keyring, public: Keyring) -> None:
    vectors = _vectors(5, dim=512)
    book, gallery, ids = _build(keys, public, Metric.COSINE, vectors)
    got = _scores(keys, book, gallery.search(vectors[1]))
    for tid, v in zip(ids, vectors, strict=True):
        assert abs(got[tid] - plain_distance(v, vectors[1], Metric.COSINE)) < PLAIN_TOLERANCE
