"""The packed path's error against numpy, pinned at the measured level.

Measured on this machine (n8192, unit vectors, euclidean_l2 so scores span [0, 4]):
a plaintext probe's scores (the batched kernel, exact mod q, then compressed to
`compact.SCORE_BITS`) are within ``PLAIN_ERROR`` of float64 numpy, an
edge-encrypted probe's within ``EDGE_ERROR`` in columns and in one packed
ciphertext expanded by the cloud (`cipherface.gallery.expansion`), at 128-d and at
512-d. The bounds
are about twice the largest error seen over several runs (plain 4.3e-4, of which
compression is most: 4.5e-5 before it; edge 4.5e-4): a change that adds noise
(fewer scale bits, fewer bits kept) fails here before it shows as a wrong
decision. `SCORE_TOLERANCE` and `FIT_TOLERANCE` (integrity) sit above these.
"""

from __future__ import annotations

import numpy as np
import pytest

from cipherface.crypto import Keyring, Metric
from cipherface.gallery import EncryptedGallery, EnrollmentBook, encrypt_probe, rank
from cipherface.gallery.consistency import FIT_TOLERANCE
from cipherface.gallery.expansion import edge_keys, encrypt_packed_probe, expand_probe
from cipherface.gallery.integrity import SCORE_TOLERANCE, conjugation_key, prove_probe

PLAIN_ERROR = 8e-4
EDGE_ERROR = 8e-4


@pytest.mark.parametrize("dimensions", [128, 512])
def test_packed_error_is_pinned(keys: Keyring, public: Keyring, dimensions: int) -> None:
    rng = np.random.default_rng(dimensions)
    vectors = rng.standard_normal((3000, dimensions))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    probe = vectors[11] + 0.3 * rng.standard_normal(dimensions) / np.sqrt(dimensions)
    probe /= np.linalg.norm(probe)
    exact = 2.0 - 2.0 * vectors @ probe
    book = EnrollmentBook(keys, Metric.EUCLIDEAN_L2, dimensions)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    with EncryptedGallery(public) as gallery:
        for block in book.encrypt_blocks():
            gallery.put(block)
        plain_scores = gallery.search(probe)
        edge_probe = encrypt_probe(public, probe, Metric.EUCLIDEAN_L2)
        edge_scores = gallery.search(edge_probe)
        galois = edge_keys(keys, dimensions)
        packed = expand_probe(
            public, galois, encrypt_packed_probe(public, probe, Metric.EUCLIDEAN_L2)
        )
        packed_scores = gallery.search(packed)
    runs = (
        ("plain", plain_scores, None),
        ("edge", edge_scores, prove_probe(public, conjugation_key(keys), edge_probe)),
        ("packed", packed_scores, prove_probe(public, galois, packed)),
    )
    errors = {}
    for name, scores, proof in runs:
        matches = rank(keys, book, scores, top_k=len(vectors), per_subject=False, probe_check=proof)
        got = np.array([m.score for m in sorted(matches, key=lambda m: int(m.template_id[1:]))])
        errors[name] = float(np.max(np.abs(got - exact)))
    print(f"\n{dimensions}-d max error: {errors}")
    assert errors["plain"] <= PLAIN_ERROR
    assert errors["edge"] <= EDGE_ERROR
    assert errors["packed"] <= EDGE_ERROR
    assert PLAIN_ERROR < FIT_TOLERANCE[False] and EDGE_ERROR < FIT_TOLERANCE[True] < SCORE_TOLERANCE
