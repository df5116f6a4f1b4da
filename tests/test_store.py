"""The cloud's on-disk gallery: persistence, versions, errors."""

from __future__ import annotations

import numpy as np
import pytest

from cipherface.crypto import Keyring, Metric
from cipherface.exceptions import KeyMismatchError, StoreError
from cipherface.gallery import EncryptedGallery, EnrollmentBook, rank
from cipherface.store import GalleryStore


@pytest.fixture(scope="module")
def keys() -> Keyring:
    return Keyring.generate("n8192", relin_keys=False)


def test_gallery_survives_a_restart(tmp_path, keys: Keyring) -> None:
    public = keys.public()
    vectors = np.random.default_rng(3).standard_normal((8192 + 7, 8))  # two blocks
    book = EnrollmentBook(keys, Metric.EUCLIDEAN_L2, 8)
    book.add_many((f"s{i}", v) for i, v in enumerate(vectors))
    probe = vectors[4100]
    with GalleryStore(tmp_path) as store:
        gallery = EncryptedGallery(public, store)
        for block in book.encrypt_blocks():
            assert gallery.put(block)
        before = rank(keys, book, gallery.search(probe), top_k=5)
    with GalleryStore(tmp_path / "gallery.sqlite3") as store:
        assert store.load_context() is not None
        assert [b.block_id for b in store.load_blocks()] == [0, 1]
        reopened = EncryptedGallery(
            Keyring.from_bytes(store.load_context(), expect="public"), store
        )
        after = rank(keys, book, reopened.search(probe), top_k=5)
        assert len(reopened) == len(vectors) and reopened.subjects() == gallery.subjects()
    assert [m.template_id for m in after] == [m.template_id for m in before]
    assert after[0].subject == "s4100"
    for a, b in zip(after, before, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-3)


def test_store_keeps_the_highest_version(tmp_path, keys: Keyring) -> None:
    book = EnrollmentBook(keys, Metric.COSINE, 4)
    book.add("a", np.ones(4))
    v1 = book.encrypt_block(0)
    book.add("b", np.arange(4.0))
    v2 = book.encrypt_block(0)
    with GalleryStore(tmp_path / "g.db") as store:
        assert store.save_block(v2)
        assert not store.save_block(v1)
        assert [b.version for b in store.load_blocks()] == [2]
        store.delete_block(0)
        assert store.load_blocks() == []


def test_store_refuses_another_key(tmp_path, keys: Keyring) -> None:
    with GalleryStore(tmp_path) as store:
        EncryptedGallery(keys.public(), store)
        with pytest.raises(KeyMismatchError):
            EncryptedGallery(Keyring.generate("n8192").public(), store)


def test_store_errors_are_typed(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError):
        GalleryStore(tmp_path / "file" / "below.db")
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError):
        GalleryStore(corrupt)
