"""A gallery worker holds each block once (limb planes) and still answers SEAL's paths exactly.

Edge probes (ciphertext x ciphertext) and batched 1:1 (slot-wise plaintexts) are
computed by SEAL on ciphertexts rebuilt from the planes: their results must be,
bit for bit, what SEAL computes on the ciphertexts on-prem shipped.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tenseal.sealapi as sealapi

from cipherface.crypto import Keyring, Metric
from cipherface.exceptions import CiphertextError
from cipherface.gallery import EncryptedGallery, EnrollmentBook, encrypt_probe, rank
from cipherface.gallery.kernel import coefficients, coefficients_of, limb_planes
from cipherface.gallery.packing import _Seal, _weights
from cipherface.gallery.workers import _Engine
from cipherface.store import GalleryStore
from cipherface.wire.payloads import EncryptedBlock

_VALUE, _SCORE = 2.0**25, 2.0**50


def _block(keys: Keyring, metric: Metric) -> EncryptedBlock:
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((300, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    book = EnrollmentBook(keys, metric, 16)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    [block] = book.encrypt_blocks()
    return block


def _finish(seal: _Seal, acc: Any, block: EncryptedBlock, const: complex) -> np.ndarray:
    if const:
        seal.evaluator.add_plain_inplace(acc, seal.plain(const, _SCORE))
    if block.norms is not None:
        seal.evaluator.add_inplace(acc, seal.load(block.norms))
    return coefficients(seal, acc)


def _sum(seal: _Seal, terms: list[Any]) -> Any:
    acc = terms[0]
    for term in terms[1:]:
        seal.evaluator.add_inplace(acc, term)
    return acc


def test_limb_planes_round_trip() -> None:
    words = np.random.default_rng(3).integers(0, 2**60, size=(5, 2, 64), dtype=np.uint64)
    assert np.array_equal(coefficients_of(limb_planes(words)), words)


def test_a_block_is_held_once_and_edge_and_pair_scores_are_seals(
    keys: Keyring, public: Keyring
) -> None:
    seal = _Seal(public)
    block = _block(keys, Metric.EUCLIDEAN)
    engine = _Engine(public)
    engine.put(block.block_id, block.version, block.columns, block.norms)
    # One representation: the planes, exactly one copy of the coefficients, no SEAL object.
    [(version, planes, has_norms)] = engine.blocks.values()
    assert isinstance(planes, np.ndarray) and has_norms and version == block.version
    assert planes.nbytes == (len(block.columns) + 1) * 2 * 2 * seal.slots * 8
    assert not any(isinstance(v, sealapi.Ciphertext) for v in vars(engine).values())

    # Edge probe: ciphertext x ciphertext, the probe's encrypted norm added.
    probe = encrypt_probe(public, np.full(16, 0.25), Metric.EUCLIDEAN)
    [(_, _, edge)] = engine.score(
        ("encrypted", probe.columns, probe.norm, _weights(Metric.EUCLIDEAN)[1], 0),
        [block.block_id],
    )
    terms = []
    for column, weight in zip(block.columns, probe.columns, strict=True):
        term = sealapi.Ciphertext()
        seal.evaluator.multiply(seal.load(column), seal.load(weight), term)
        terms.append(term)
    piece_sum = _sum(seal, [seal.load(seal.dump(t)) for t in terms[8:]])
    acc = _sum(seal, terms)
    seal.evaluator.add_inplace(acc, seal.load(probe.norm))
    assert np.array_equal(coefficients(seal, seal.load(edge)), _finish(seal, acc, block, 0))
    # A piece of it (dimensions 8..15): its columns only, no norms, no constant.
    [(_, _, piece)] = engine.score(("encrypted", probe.columns[8:], None, 0.0, 8), [block.block_id])
    assert np.array_equal(coefficients(seal, seal.load(piece)), coefficients(seal, piece_sum))

    # Batched 1:1: a plaintext vector per column, some slots unclaimed (zero).
    matrix = np.zeros((16, 300))
    matrix[:, :120] = np.random.default_rng(12).standard_normal((16, 120)) / 4
    consts = np.where(np.arange(300) < 120, 0.75, 0.0)
    [(_, _, pairs)] = engine.score(("pairs", {block.block_id: (matrix, consts)}), [block.block_id])
    acc = _products(seal, block, matrix)
    seal.evaluator.add_plain_inplace(acc, seal.plain((consts * (1 + 1j)).tolist(), _SCORE))
    assert np.array_equal(coefficients(seal, seal.load(pairs)), _finish(seal, acc, block, 0))


def _products(seal: _Seal, block: EncryptedBlock, matrix: np.ndarray) -> Any:
    """``sum_j C_j * plain(matrix[j])`` computed by SEAL on the columns on-prem shipped."""
    terms = []
    for column, row in zip(block.columns, matrix, strict=True):
        term = sealapi.Ciphertext()
        seal.evaluator.multiply_plain(seal.load(column), seal.plain(row.tolist(), _VALUE), term)
        terms.append(term)
    return _sum(seal, terms)


def _two_blocks(keys: Keyring) -> tuple[EnrollmentBook, np.ndarray]:
    rng = np.random.default_rng(12)
    vectors = rng.standard_normal((8192 + 10, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    book = EnrollmentBook(keys, Metric.EUCLIDEAN_L2, 16)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    return book, vectors


def test_a_failed_search_leaves_no_reply_behind(keys: Keyring, public: Keyring) -> None:
    """A forged edge probe's bytes fail in both workers, and the next probes get their own
    scores: the second worker's error reply used to stay in its pipe and answer the next
    search, so every later probe was ranked on the scores of the probe before it."""
    book, vectors = _two_blocks(keys)
    probe = encrypt_probe(public, vectors[3], Metric.EUCLIDEAN_L2)
    forged = dataclasses.replace(probe, columns=tuple(b"not a ciphertext" for _ in probe.columns))
    with EncryptedGallery(public, workers=2) as gallery:
        for block in book.encrypt_blocks():
            gallery.put(block)
        with pytest.raises(CiphertextError):
            gallery.search(forged)
        for target in (7, 8200, 9):
            scores = gallery.search(vectors[target])
            assert rank(keys, book, scores)[0].subject == f"s{target}"


def test_a_killed_worker_is_replaced_with_its_blocks(
    keys: Keyring, public: Keyring, tmp_path: Path
) -> None:
    """kill -9 of a gallery worker: the search that meets it is answered all the same, over
    every block, by a new worker holding the dead one's blocks again (from the store)."""
    book, vectors = _two_blocks(keys)
    with (
        GalleryStore(tmp_path / "gallery.sqlite3") as store,
        EncryptedGallery(public, store, workers=2) as gallery,
    ):
        for block in book.encrypt_blocks():
            gallery.put(block)
        victim = gallery._shards[1]._process
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=10)
        scores = gallery.search(vectors[8200])
        assert [s.block_id for s in scores] == [0, 1]
        assert rank(keys, book, scores)[0].subject == "s8200"
        assert gallery._shards[1]._process.pid != victim.pid


def test_a_block_put_on_a_killed_worker_lands_on_its_replacement(
    keys: Keyring, public: Keyring
) -> None:
    """Installing a block goes through the same replies as a search: a dead worker is
    replaced and the block put there (it used to fail on the broken pipe)."""
    book, vectors = _two_blocks(keys)
    with EncryptedGallery(public, workers=2) as gallery:
        victim = gallery._shards[1]._process
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=10)
        for block in book.encrypt_blocks():
            assert gallery.put(block)
        scores = gallery.search(vectors[8200])
        assert [s.block_id for s in scores] == [0, 1]
        assert rank(keys, book, scores)[0].subject == "s8200"


def test_many_probes_scores_come_back_through_the_outbox_as_in_process(
    keys: Keyring, public: Keyring, tmp_path: Path
) -> None:
    """Workers write compressed scores into memory shared with the replica (an outbox
    that grows with the pass): the bytes are those an in-process engine returns, and a
    worker killed after it mapped one is replaced and maps its own."""
    book, vectors = _two_blocks(keys)
    blocks = book.encrypt_blocks()
    with (
        EncryptedGallery(public, workers=1) as here,
        GalleryStore(tmp_path / "gallery.sqlite3") as store,
        EncryptedGallery(public, store, workers=2) as there,
    ):
        for block in blocks:
            here.put(block)
            there.put(block)

        def same(count: int) -> None:
            probes = list(vectors[:count])
            ours, theirs = here.search_many(probes), there.search_many(probes)
            assert [[(s.block_id, s.scores) for s in p] for p in ours] == [
                [(s.block_id, s.scores) for s in p] for p in theirs
            ]

        same(8)
        outboxes = [shard._outbox for shard in there._shards]
        assert all(box is not None and box.size > 0 for box in outboxes)
        same(300)  # 300 probes x 64.5 KB outgrow the first 16 MiB
        assert all(
            shard._outbox is not None and shard._outbox.size > box.size
            for shard, box in zip(there._shards, outboxes, strict=True)
            if box is not None
        )

        victim = there._shards[0]._process
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=10)
        probes = list(vectors[[5, 8195]])
        scores = there.search_many(probes)
        assert [rank(keys, book, s)[0].subject for s in scores] == ["s5", "s8195"]
        assert there._shards[0]._process.pid != victim.pid
        same(8)
