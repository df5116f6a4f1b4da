"""The batched kernel (`search_many`) against TenSEAL's own arithmetic, bit for bit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tenseal.sealapi as sealapi

from cipherface.crypto import Keyring, Metric, prepare_embedding
from cipherface.exceptions import CiphertextError, ConfigError
from cipherface.gallery import EncryptedGallery, EnrollmentBook, rank
from cipherface.gallery.compact import SCORE_BITS, compress
from cipherface.gallery.kernel import (
    _FUSED_PROBES,
    ModularProduct,
    Writer,
    _recombine_fused,
    _recombine_wide,
    _wide_limbs,
    coefficients,
    limb_planes,
)
from cipherface.gallery.packing import _Seal, _weights
from cipherface.gallery.workers import _Engine
from cipherface.wire.payloads import EncryptedBlock

#: SEAL's lowest 60-bit prime at n8192 (2^60 - 98303).
PRIME = 1152921504606748673


@pytest.mark.parametrize("probes", [1, _FUSED_PROBES, _FUSED_PROBES + 1, 33])
@pytest.mark.parametrize("bits", [20, 29, 31, 36])
def test_modular_product_is_exact_against_python_integers(bits: int, probes: int) -> None:
    """Both kernels (the fused loop for a few probes, BLAS for more), small weights
    and large ones that need several column groups; signs both ways."""
    rng = np.random.default_rng(bits + probes)
    product = ModularProduct(PRIME)
    columns = rng.integers(0, PRIME, size=(40, 64), dtype=np.uint64)
    weights = rng.integers(-(2**bits), 2**bits, size=(probes, 40), dtype=np.int64)
    expected = [
        [
            sum(int(w) * int(c) for w, c in zip(row, columns[:, k], strict=True)) % PRIME
            for k in range(64)
        ]
        for row in weights
    ]
    assert product(weights, limb_planes(columns[:, None])[0]).tolist() == expected


@pytest.mark.parametrize("probes", [1, _FUSED_PROBES + 1])
@pytest.mark.parametrize("sign", [1, -1])
def test_modular_product_is_exact_at_the_bounds_of_its_sums(probes: int, sign: int) -> None:
    """The largest coefficients times weights summing to just under a group's bound
    (the 16-bit loop's 2^37, BLAS's 2^33), both signs: every limb sum as large as
    exactness allows, so the fold to a residue meets its extremes."""
    product = ModularProduct(PRIME)
    columns = np.full((64, 16), PRIME - 1, dtype=np.uint64)
    columns[:, ::2] = PRIME - 2**20
    bound = 2**37 if probes <= _FUSED_PROBES else 2**33
    weights = np.full((probes, 64), sign * (bound // 64 - 1), dtype=np.int64)
    expected = [
        [
            sum(int(w) * int(c) for w, c in zip(row, columns[:, k], strict=True)) % PRIME
            for k in range(16)
        ]
        for row in weights
    ]
    assert product(weights, limb_planes(columns[:, None])[0]).tolist() == expected


def _limb_sums(total: int, limbs: int, bits: int) -> list[int]:
    """Limb sums, each exact in float64, whose fold (`kernel._folded`) is ``total``
    itself: every limb below the bits that would wrap past 2^60, filled from the top."""
    sums = [0] * limbs
    for limb in range(limbs - 1, 0, -1):
        if total > 0:
            sums[limb] = min(total >> (bits * limb), 2 ** (60 - bits * limb) - 1)
            total -= sums[limb] << (bits * limb)
    sums[0] = total
    assert abs(total) < 2**53
    return sums


@pytest.mark.parametrize(
    ("recombine", "limbs", "bits", "modulus", "multiples"),
    [
        (_recombine_wide, 3, 20, PRIME, (0, 1, 2)),
        (_recombine_fused, 4, 16, PRIME, (0, 1, 2)),
        # No prime, but within 2^20 of 2^59 x 2: its float64 quotient falls one short
        # next to three times it, where PRIME's only ever overshoots.
        (_recombine_fused, 4, 16, 2**59 - 129, (3,)),
    ],
)
def test_recombination_lands_on_the_residue_next_to_multiples_of_q(
    recombine: Callable[..., None], limbs: int, bits: int, modulus: int, multiples: tuple[int, ...]
) -> None:
    """Each correction after the fold, exercised: limb sums whose folded total is
    each value around 0 and a few multiples of the modulus."""
    totals = [c * modulus + e for c in multiples for e in range(-2, 3)]
    sums = np.array([_limb_sums(t, limbs, bits) for t in totals], dtype=np.float64)
    # Side by side, as the kernels lay them out: one position, so width 1.
    out = np.empty((len(totals), 1), dtype=np.int64)
    recombine(sums, modulus, 2**60 % modulus, out, 0)
    assert out[:, 0].tolist() == [t % modulus for t in totals]


def test_modular_product_refuses_what_it_cannot_keep_exact() -> None:
    with pytest.raises(ConfigError):
        ModularProduct(2**61 - 1)
    with pytest.raises(ConfigError):
        ModularProduct(PRIME)(np.array([[2**40]]), np.ones((4, 1, 4), dtype=np.uint16))


def test_wide_limbs_are_the_coefficients_in_20_bit_pieces() -> None:
    rng = np.random.default_rng(5)
    columns = rng.integers(0, PRIME, size=(3, 1, 40), dtype=np.uint64)
    columns[0, 0, :2] = (0, PRIME - 1)
    limbs = np.empty((3, 3 * 32))
    _wide_limbs(limb_planes(columns)[0], 8, 32, limbs)
    rebuilt = [
        [sum(int(limbs[j, 32 * i + k]) << (20 * i) for i in range(3)) for k in range(32)]
        for j in range(3)
    ]
    assert rebuilt == columns[:, 0, 8:40].tolist()
    assert limbs.max() < 2**20


def test_writer_round_trips_through_seal(keys: Keyring) -> None:
    seal = _Seal(keys)
    template = seal.load(seal.encrypt_seeded(np.linspace(0, 1, 100), 2.0**25))
    values = np.random.default_rng(4).integers(0, PRIME, size=(2, seal.slots * 2), dtype=np.uint64)
    loaded = seal.load(Writer(seal, template)(values))
    assert np.array_equal(coefficients(seal, loaded), values)
    assert loaded.scale == template.scale and loaded.is_ntt_form()


def _seal_reference(
    seal: _Seal, block: EncryptedBlock, metric: Metric, probe: np.ndarray
) -> sealapi.Ciphertext:
    """A block's scores for ``probe`` computed by SEAL alone, as the engine once did."""
    vector = prepare_embedding(probe, metric)
    factor, const = _weights(metric)
    total = None
    for column, weight in zip(block.columns, factor * vector, strict=True):
        term = sealapi.Ciphertext()
        seal.evaluator.multiply_plain(seal.load(column), seal.plain(float(weight), 2.0**25), term)
        if total is None:
            total = term
        else:
            seal.evaluator.add_inplace(total, term)
    if block.norms is not None:
        seal.evaluator.add_inplace(total, seal.load(block.norms))
        const = float(vector @ vector)
    if const:
        seal.evaluator.add_plain_inplace(total, seal.plain(const * (1 + 1j), 2.0**50))
    return total


@pytest.mark.parametrize(
    ("metric", "workers"),
    [(Metric.EUCLIDEAN, 1), (Metric.COSINE, 2), (Metric.EUCLIDEAN_L2, 2)],
)
def test_search_many_equals_seal_bit_for_bit(
    keys: Keyring, public: Keyring, metric: Metric, workers: int
) -> None:
    """Each probe's batched sums are the ciphertext SEAL computes (coefficient form);
    they leave as that ciphertext compressed, or uncompressed bit for bit SEAL's
    serialization, and `search` agrees."""
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((8192 + 300, 32))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    if metric is Metric.EUCLIDEAN:
        vectors *= 2.5
    book = EnrollmentBook(keys, metric, 32)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    # More probes than the fused loop takes: the batch runs on BLAS, `alone` fused.
    rows = (7, 8200, 40, 1, 2, 3, 4, 5, 6, 9)
    assert len(rows) > _FUSED_PROBES
    probes = [vectors[i] + 0.01 * rng.standard_normal(32) for i in rows]
    seal = _Seal(public)
    blocks = list(book.encrypt_blocks())
    ciphertexts = [[_seal_reference(seal, b, metric, p) for b in blocks] for p in probes]
    ntt_form = [[coefficients(seal, c) for c in row] for row in ciphertexts]
    for row in ciphertexts:
        for ciphertext in row:
            seal.evaluator.transform_from_ntt_inplace(ciphertext)
    references = [[coefficients(seal, c) for c in row] for row in ciphertexts]
    engine = _Engine(public)
    for block in blocks:
        engine.put(block.block_id, block.version, block.columns, block.norms)
    factor, const = _weights(metric)
    prepared = [prepare_embedding(p, metric) for p in probes]
    consts = [float(v @ v) if metric is Metric.EUCLIDEAN else const for v in prepared]
    sums = list(engine.sums(factor * np.asarray(prepared), consts, [b.block_id for b in blocks]))
    for index, (_, _, block_sums) in enumerate(sums):
        for probe, row in enumerate(block_sums):
            assert np.array_equal(row, references[probe][index])
    with EncryptedGallery(public, workers=workers) as gallery:
        for block in blocks:
            gallery.put(block)
        batched = gallery.search_many(probes)
        alone = gallery.search(probes[1])
    with EncryptedGallery(public, workers=workers, compress=False) as gallery:
        for block in blocks:
            gallery.put(block)
        uncompressed = gallery.search_many(probes)
    for expected, scores in zip(ntt_form, uncompressed, strict=True):
        for coefficients_ntt, result in zip(expected, scores, strict=True):
            assert result.bits == ()
            assert np.array_equal(coefficients(seal, seal.load(result.scores)), coefficients_ntt)
    assert [len(b) for b in batched] == [2] * len(rows)
    for reference, scores in zip(references, batched, strict=True):
        for block, expected, result in zip(blocks, reference, scores, strict=True):
            assert (result.block_id, result.version) == (block.block_id, block.version)
            assert result.bits == SCORE_BITS
            assert result.scores == compress(expected, PRIME)
    assert [a.scores for a in alone] == [b.scores for b in batched[1]]
    # And on-prem accepts and ranks both as usual.
    assert rank(keys, book, batched[1])[0].subject == "s8200"
    assert rank(keys, book, uncompressed[1])[0].subject == "s8200"


def test_concurrent_searches_share_passes_and_a_bad_probe_fails_alone(
    keys: Keyring, public: Keyring
) -> None:
    rng = np.random.default_rng(6)
    vectors = rng.standard_normal((500, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    book = EnrollmentBook(keys, Metric.COSINE, 16)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    probes: list[np.ndarray] = [vectors[i] for i in range(12)]
    probes[5] = np.ones(7)  # wrong dimension: refused, the others still answered
    with EncryptedGallery(public, workers=2) as gallery:
        for block in book.encrypt_blocks():
            gallery.put(block)
        sizes: list[int] = []
        many = gallery.search_many

        def recording(batch: list[np.ndarray], **kwargs: object) -> list:
            sizes.append(len(batch))
            return many(batch, **kwargs)

        gallery.search_many = recording  # type: ignore[method-assign]

        def one(probe: np.ndarray) -> object:
            try:
                return gallery.search_shared(probe)
            except ConfigError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(one, probes))
        alone = [gallery.search(p) for i, p in enumerate(probes) if i != 5]
    assert isinstance(answers[5], ConfigError)
    shared = [a for i, a in enumerate(answers) if i != 5]
    assert [[s.scores for s in a] for a in shared] == [[s.scores for s in a] for a in alone]
    assert sum(sizes) >= len(probes) and max(sizes) > 1  # passes were shared
    assert [rank(keys, book, a, top_k=1)[0].subject for a in shared] == [
        f"s{i}" for i in range(12) if i != 5
    ]


def test_concurrent_claims_on_the_same_blocks_share_a_pass_on_those_blocks_only(
    keys: Keyring, public: Keyring
) -> None:
    """1:1 claims go through the batcher too: claims of subjects in one block are
    scored together on that block, each exactly as `search` scores it alone."""
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((8192 + 100, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    book = EnrollmentBook(keys, Metric.COSINE, 16)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    claims = [(f"s{i}", vectors[i]) for i in (3, 4, 5, 6, 8200, 8201)]
    with EncryptedGallery(public, workers=2) as gallery:
        for block in book.encrypt_blocks():
            gallery.put(block)
        calls: list[tuple[int, tuple[int, ...] | None]] = []
        many = gallery.search_many

        def recording(batch: list[np.ndarray], *, blocks: object = None) -> list:
            calls.append((len(batch), None if blocks is None else tuple(blocks)))  # type: ignore[arg-type]
            return many(batch, blocks=blocks)  # type: ignore[arg-type]

        gallery.search_many = recording  # type: ignore[method-assign]
        with ThreadPoolExecutor(max_workers=len(claims)) as pool:
            answers = list(pool.map(lambda c: gallery.search_shared(c[1], subject=c[0]), claims))
        alone = [gallery.search(v, subject=s) for s, v in claims]
        first, second = gallery.blocks_of("s3"), gallery.blocks_of("s8200")
    assert first != second and len(first) == len(second) == 1
    assert [[s.scores for s in a] for a in answers] == [[s.scores for s in a] for a in alone]
    assert all(blocks in (tuple(first), tuple(second)) for _, blocks in calls)
    assert max(size for size, _ in calls) > 1  # claims shared a pass
    for (subject, _), scores in zip(claims, answers, strict=True):
        assert rank(keys, book, scores, subject=subject)[0].subject == subject


@pytest.mark.parametrize("workers", [1, 2])
def test_a_block_of_misshapen_columns_is_refused_and_the_gallery_keeps_serving(
    keys: Keyring, public: Keyring, workers: int
) -> None:
    """The kernel reads two-component columns at scale 2^25: anything else is refused at put."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((50, 16))
    book = EnrollmentBook(keys, Metric.COSINE, 16)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    [block] = book.encrypt_blocks()
    seal = _Seal(public)
    fresh = seal.load(seal.encrypt_public(0.5, 2.0**25))
    three = sealapi.Ciphertext()
    seal.evaluator.multiply(fresh, fresh, three)
    bad_columns = (seal.encrypt_public(0.5, 2.0**50), seal.dump(three))
    with EncryptedGallery(public, workers=workers) as gallery:
        for bad in bad_columns:
            forged = dataclasses.replace(block, columns=(bad, *block.columns[1:]))
            with pytest.raises(CiphertextError, match="two-component"):
                gallery.put(forged)
        assert len(gallery) == 0
        assert gallery.put(block)
        assert rank(keys, book, gallery.search(vectors[4]))[0].subject == "s4"
