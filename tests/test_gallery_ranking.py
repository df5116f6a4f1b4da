"""On-prem's candidate selection and fit (`cipherface.gallery.ranking`,
`cipherface.gallery.consistency`) against brute force."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from cipherface.exceptions import IntegrityError
from cipherface.gallery.consistency import check_consistency
from cipherface.gallery.ranking import _Decrypted, _nearest
from cipherface.metric import Metric

CAPACITY = 64


def _blocks(rng: np.random.Generator, rows: int) -> list[Any]:
    """Blocks of coarse values (many ties), some positions empty, subjects repeating."""
    out = []
    for row in range(rows):
        filled = int(rng.integers(0, CAPACITY + 1))
        ids = [f"t{row}.{k}" if rng.random() < 0.8 else "" for k in range(filled)]
        subjects = [f"s{rng.integers(0, 12)}" if t else "" for t in ids]
        layout = SimpleNamespace(template_ids=ids, subjects=subjects)
        values = np.round(rng.uniform(0, 2, CAPACITY), 1)
        out.append(_Decrypted(SimpleNamespace(block_id=10_000 + row), layout, values))  # type: ignore[arg-type]
    return out


def _brute(blocks: list[Any], subject: str | None, top_k: int, per_subject: bool) -> list:
    entries = [
        (float(item.values[k]), row, k)
        for row, item in enumerate(blocks)
        for k, t in enumerate(item.layout.template_ids)
        if t and (subject is None or item.layout.subjects[k] == subject)
    ]
    chosen, seen = [], set()
    for _value, row, k in sorted(entries):
        name = blocks[row].layout.subjects[k]
        if per_subject and name in seen:
            continue
        seen.add(name)
        chosen.append((row, k))
        if len(chosen) == top_k:
            break
    return chosen


@pytest.mark.parametrize("seed", range(40))
def test_candidates_are_the_lowest_scores_in_block_and_position_order(seed: int) -> None:
    """Fewer rows than wanted candidates, ties at the bound, empty blocks, a claimed
    subject: the selection by the rows' minima gives brute force's answer."""
    rng = np.random.default_rng(seed)
    blocks = _blocks(rng, int(rng.integers(1, 9)))
    rows = {id(item): row for row, item in enumerate(blocks)}
    for top_k in (1, 3, 5, 20):
        for per_subject in (True, False):
            for subject in (None, "s3"):
                got = _nearest(blocks, CAPACITY, subject, top_k, per_subject)
                assert [(rows[id(item)], k) for item, k in got] == _brute(
                    blocks, subject, top_k, per_subject
                )


def test_a_fit_of_dependent_rows_is_still_accepted_when_honest() -> None:
    """Forty templates repeated in 300 rows: the normal equations are singular, and the
    SVD decides (honest scores pass, a shifted one is refused)."""
    rng = np.random.default_rng(2)
    few = rng.standard_normal((40, 128))
    few /= np.linalg.norm(few, axis=1, keepdims=True)
    rows = few[rng.integers(0, 40, 300)]
    probe = few[0]
    scores = 2.0 - 2.0 * rows @ probe
    check_consistency(Metric.EUCLIDEAN_L2, rows, scores, edge=False)
    scores[7] += 0.01
    with pytest.raises(IntegrityError, match="misses the fit"):
        check_consistency(Metric.EUCLIDEAN_L2, rows, scores, edge=False)


def test_the_fit_runs_on_one_blas_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a busy machine OpenBLAS's threads wait for each other on a system this small
    (profiled under benchmarks/bench_throughput.py: about 46 ms a probe, 0.25 ms idle).
    numpy's BLAS is the one that counts: others (faiss's, dlib's) may be loaded too."""

    def numpys() -> list[int]:
        return [
            lib["num_threads"]
            for lib in threadpool_info()
            if lib["user_api"] == "blas" and f"{os.sep}numpy" in lib["filepath"]
        ]

    threads: list[int] = []
    solve = np.linalg.solve

    def spy(*args: Any) -> np.ndarray:
        threads.extend(numpys())
        return solve(*args)

    monkeypatch.setattr(np.linalg, "solve", spy)
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((200, 128))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    with threadpool_limits(2, user_api="blas"):
        check_consistency(Metric.COSINE, rows, 1.0 - rows @ rows[0], edge=False)
        after = numpys()
    assert threads and set(threads) == {1}
    assert set(after) == {2}  # the caller's setting is back
