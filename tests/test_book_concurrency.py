"""Processes opening a new enrollment book at once (the on-prem daemon and
``cipherface enroll``, started together) agree on it instead of failing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cipherface.crypto import Keyring, Metric
from cipherface.gallery import EnrollmentBook


@pytest.mark.parametrize("attempt", range(5))
def test_books_opened_at_once_share_one_decoy_seed(
    keys: Keyring, tmp_path: Path, attempt: int
) -> None:
    path = tmp_path / f"book-{attempt}.sqlite"
    start = threading.Barrier(6)
    seeds: list[bytes] = []
    errors: list[Exception] = []

    def open_book() -> None:
        start.wait()
        try:
            book = EnrollmentBook(keys, Metric.COSINE, 16, path=path)
        except Exception as exc:  # collected: the assertion below names it
            errors.append(exc)
            return
        seeds.append(book._decoy_seed)
        book.close()

    threads = [threading.Thread(target=open_book) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(seeds) == 6 and len(set(seeds)) == 1
