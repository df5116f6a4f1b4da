"""On-prem's decryption workers (`cipherface.gallery.decryption`): the same answers as
in-process, the same refusals, and no probe lost to a killed worker."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

from cipherface.crypto import Keyring, Metric
from cipherface.exceptions import ConfigError, IntegrityError
from cipherface.gallery import EncryptedGallery, EnrollmentBook, rank, rank_pairs
from cipherface.gallery.decryption import DecryptionPool, Sealed, decrypt_scores

#: Few dimensions keep two full blocks cheap to encrypt; the fit still runs (16 < 512).
DIMENSIONS = 16


@pytest.fixture(scope="module")
def world(keys: Keyring, public: Keyring) -> tuple[EnrollmentBook, EncryptedGallery, np.ndarray]:
    """Two blocks: at least `min_blocks`, so both go to the worker."""
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((8192 + 500, DIMENSIONS))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    book = EnrollmentBook(keys, Metric.EUCLIDEAN_L2, DIMENSIONS)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    gallery = EncryptedGallery(public)
    for block in book.encrypt_blocks():
        gallery.put(block)
    return book, gallery, vectors


@pytest.fixture(scope="module")
def pool(keys: Keyring) -> Iterator[DecryptionPool]:
    pool = DecryptionPool(keys, 1, min_blocks=2)
    pool.warm()
    yield pool
    pool.close()


def test_the_workers_decrypt_exactly_what_the_calling_process_does(
    keys: Keyring, world: tuple, pool: DecryptionPool
) -> None:
    book, gallery, vectors = world
    scores = gallery.search(vectors[8200])  # a template of the second block
    assert len(scores) == 2
    sealed = [Sealed(s.scores, tuple(s.bits), 2) for s in scores]
    for got, want in zip(pool.decrypt(book._seal, sealed), sealed, strict=True):
        assert np.array_equal(got, decrypt_scores(book._seal, want))
    ranked = rank(keys, book, scores, top_k=5, decryptor=pool)
    assert ranked == rank(keys, book, scores, top_k=5)
    assert ranked[0].template_id == "t8200"


def test_batched_one_to_one_through_the_workers(
    keys: Keyring, world: tuple, pool: DecryptionPool
) -> None:
    book, gallery, vectors = world
    pairs = [(vectors[3], "s3"), (vectors[8300], "s8300"), (vectors[3], "s8300")]
    scores = gallery.verify_pairs(pairs)
    got = rank_pairs(keys, book, scores, len(pairs), decryptor=pool)
    assert got == rank_pairs(keys, book, scores, len(pairs))
    assert [m.subject if m else None for m in got] == ["s3", "s8300", "s8300"]


def test_a_block_the_protocol_would_not_make_is_refused_in_the_worker(
    keys: Keyring, world: tuple, pool: DecryptionPool
) -> None:
    """The second block arrives a byte short: refused in the worker, before decryption,
    and the refusal reaches the caller as an `IntegrityError`."""
    book, gallery, vectors = world
    scores = gallery.search(vectors[0])
    short = dataclasses.replace(scores[1], scores=scores[1].scores[:-1])
    with pytest.raises(IntegrityError, match="compressed scores of"):
        rank(keys, book, [scores[0], short], top_k=5, decryptor=pool)
    three = dataclasses.replace(scores[1], bits=())
    with pytest.raises(IntegrityError, match="not a score ciphertext"):
        rank(keys, book, [scores[0], three], top_k=5, decryptor=pool)


def test_a_killed_worker_costs_no_probe(keys: Keyring, world: tuple) -> None:
    book, gallery, vectors = world
    scores = gallery.search(vectors[8400])
    pool = DecryptionPool(keys, 1, min_blocks=2)
    try:
        (first,) = pool.warm()
        os.kill(first, signal.SIGKILL)
        time.sleep(0.2)
        # This probe meets the dead worker: decrypted in-process instead, same answer.
        assert rank(keys, book, scores, top_k=3, decryptor=pool)[0].template_id == "t8400"
        (second,) = pool.warm()  # the next one gets a new pool
        assert second != first
        assert rank(keys, book, scores, top_k=3, decryptor=pool)[0].template_id == "t8400"
    finally:
        pool.close()


def test_a_pool_decrypts_only_under_its_own_key(world: tuple, public: Keyring) -> None:
    book, gallery, vectors = world
    other = Keyring.generate("n8192", relin_keys=False)
    pool = DecryptionPool(other, 1, min_blocks=2)
    scores = gallery.search(vectors[0])
    sealed = [Sealed(s.scores, tuple(s.bits), 2) for s in scores]
    with pytest.raises(ConfigError, match="given to the pool of key"):
        pool.decrypt(book._seal, sealed)
    with pytest.raises(ConfigError, match="needs the secret key"):
        DecryptionPool(public, 1)
    with pytest.raises(ConfigError, match="at least one worker"):
        DecryptionPool(other, 0)
