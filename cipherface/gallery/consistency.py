"""Scores must be those of one probe: on-prem fits them against templates it knows.

Range checks (`cipherface.gallery.integrity`) stop values the metric cannot
produce, but a malicious yet trusted replica can still hand on-prem a
ciphertext of its own making whose decryption stays in range: each released
distance would then carry a few bits of a linear function of the secret key,
and a few hundred thousand of them recover it. What the replica cannot do is
make *every* position of a block agree with one probe vector, because on-prem
knows what each position holds:

- enrolled positions hold templates from the book;
- every other position holds a **decoy**: a random vector derived from a secret
  seed in the book (`decoy_rows`), encrypted like a template and labelled empty,
  so the cloud cannot tell a decoy from a freed slot and cannot steer around it.

For a probe ``p`` the honest scores are affine in ``p``: cosine ``1 - <g, p>``,
euclidean_l2 ``2 - 2 <g, p>``, euclidean ``||g||^2 - 2 <g, p> + ||p||^2``.
On-prem samples positions at random (unpredictably, from the OS CSPRNG) plus the
candidates it is about to release, solves for ``p`` by least squares, and refuses
(`IntegrityError`) when any sampled score misses the fit by more than
`FIT_TOLERANCE`, or when a cosine/euclidean_l2 fit is not a unit vector. A
perturbation of the released candidate's score beyond the tolerance is caught;
one below it is drowned by the flooding noise on what is released. Edge probes
whose slots hold different vectors fail the same way.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

import numpy as np
from threadpoolctl import ThreadpoolController

from cipherface.exceptions import IntegrityError
from cipherface.metric import Metric

__all__ = ["FIT_TOLERANCE", "check_consistency", "decoy_rows", "fit_sample_size"]

#: Largest residual of an honest fit: plaintext-probe scores are within 4.3e-4 of the
#: exact values (most of it `compact`'s rounding) and edge-probe scores within 4.5e-4
#: (tests pin both); over twice that.
FIT_TOLERANCE = {False: 1e-3, True: 3e-3}
#: A cosine/euclidean_l2 probe is a unit vector: the fit's norm may miss 1 by this.
FIT_NORM_TOLERANCE = 5e-3
#: Galleries of more dimensions than this are not fitted (a 4096-d fit per probe
#: costs seconds); their released distances rely on the range checks alone.
MAX_FIT_DIMENSIONS = 512


def decoy_rows(seed: bytes, block_id: int, positions: Sequence[int], dimensions: int) -> np.ndarray:
    """Unit vectors, one per position, fixed by ``seed`` and the position alone.

    Deterministic, so that on-prem can regenerate any decoy it encrypted without
    storing it; secret, because the seed never leaves the book.
    """
    rows = np.empty((len(positions), dimensions))
    for i, position in enumerate(positions):
        digest = hashlib.blake2b(
            f"{block_id}:{position}".encode(), key=seed, digest_size=16
        ).digest()
        vector = np.random.default_rng(int.from_bytes(digest, "big")).standard_normal(dimensions)
        rows[i] = vector / np.linalg.norm(vector)
    return rows


def fit_sample_size(dimensions: int) -> int:
    """Positions sampled per probe: enough that a fit of ``dimensions`` unknowns is tight."""
    return 2 * dimensions + 64


def sampler() -> np.random.Generator:
    """A generator seeded from the OS CSPRNG: its samples are unpredictable to the cloud."""
    return np.random.default_rng(secrets.randbits(128))


def sample(population: int, count: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """``count`` distinct positions out of ``population``, unpredictable to the cloud.

    Pass one `sampler` for many blocks: seeding a generator per block cost more
    than the draws (4.5 ms against 1 ms for 123 blocks).
    """
    rng = sampler() if rng is None else rng
    return np.sort(rng.choice(population, size=min(count, population), replace=False))


#: numpy's BLAS, held to one thread for the fit (`check_consistency`).
_BLAS = ThreadpoolController()


def check_consistency(
    metric: Metric, vectors: np.ndarray, scores: np.ndarray, *, edge: bool
) -> None:
    """Raise `IntegrityError` unless ``scores[i]`` are one probe's scores against ``vectors[i]``.

    Skipped (nothing to fit) below ``dimensions + 8`` equations or above
    `MAX_FIT_DIMENSIONS`.
    """
    count, dimensions = vectors.shape
    if count < dimensions + 8 or dimensions > MAX_FIT_DIMENSIONS:
        return
    if metric is Metric.COSINE:
        design, target = vectors, 1.0 - scores
    elif metric is Metric.EUCLIDEAN_L2:
        design, target = vectors, (2.0 - scores) / 2.0
    else:
        # The probe's ||p||^2 is one more unknown.
        design = np.hstack([-2.0 * vectors, np.ones((count, 1))])
        target = scores - np.einsum("ij,ij->i", vectors, vectors)
    # One BLAS thread: a few hundred rows x 128 gain nothing from a second, and on
    # a machine whose cores are busy (embedding beside on-prem, decryption workers)
    # OpenBLAS's threads wait for each other: profiled (py-spy) under
    # benchmarks/bench_throughput.py, the normal equations took about 46 ms a probe,
    # against 0.25 ms idle.
    with _BLAS.limit(limits=1, user_api="blas"):
        try:
            # The normal equations: 0.3-0.7 ms where `lstsq`'s SVD takes 3-14 ms (a
            # few hundred rows x 128), on every probe.
            solution = np.linalg.solve(design.T @ design, design.T @ target)
            _verify_fit(metric, design, target, solution, edge=edge)
        except (np.linalg.LinAlgError, IntegrityError):
            # Duplicate or nearly dependent rows (a gallery of few distinct faces) make
            # them singular or inexact: only the SVD's answer may refuse the scores.
            solution, *_ = np.linalg.lstsq(design, target, rcond=None)
            _verify_fit(metric, design, target, solution, edge=edge)


def _verify_fit(
    metric: Metric, design: np.ndarray, target: np.ndarray, solution: np.ndarray, *, edge: bool
) -> None:
    residual = float(np.max(np.abs(design @ solution - target)))
    if residual > FIT_TOLERANCE[edge]:
        raise IntegrityError(
            f"the scores are not those of one probe (a position misses the fit by {residual:.2g})"
        )
    if metric is not Metric.EUCLIDEAN:
        norm = float(np.linalg.norm(solution))
        if abs(norm - 1.0) > FIT_NORM_TOLERANCE:
            raise IntegrityError(f"the scores are those of a probe of norm {norm:.4f}, not 1")
