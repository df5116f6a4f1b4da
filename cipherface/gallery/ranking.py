"""On-prem's decisions: decrypt the cloud's scores and name the nearest templates.

Positions are named through the `EnrollmentBook`'s own layout of the block
version the scores were computed on, never through the cloud's labels: a stale
or tampered label cannot name a match. Nothing is decrypted before it passed
`cipherface.gallery.integrity`'s checks; no value is returned from scores that
fall outside the metric's range, or (`cipherface.gallery.consistency`) that are
not one probe's scores against what on-prem knows each position holds: either
raises `IntegrityError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cipherface.crypto import Keyring, Metric, decision
from cipherface.exceptions import IntegrityError
from cipherface.gallery.book import EnrollmentBook, _Shipped
from cipherface.gallery.consistency import (
    MAX_FIT_DIMENSIONS,
    check_consistency,
    fit_sample_size,
    sample,
    sampler,
)
from cipherface.gallery.decryption import DecryptionPool, Sealed, decrypt_scores
from cipherface.gallery.integrity import check_probe, check_scores
from cipherface.gallery.packing import _Seal
from cipherface.wire.payloads import BlockScores, ProbeCheck

__all__ = ["Match", "accept", "rank", "rank_pairs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    """One candidate of a search, as on-prem decrypted it."""

    subject: str
    template_id: str
    #: The metric's real distance (square root taken for euclidean metrics).
    distance: float
    #: What decryption gave: squared for euclidean metrics, as `decision` expects.
    score: float


def accept(match: Match, threshold: float, metric: Metric | str) -> bool:
    """Whether ``match`` is within the model's ``threshold`` (e.g. `embedding.threshold`)."""
    return decision(match.score, threshold, Metric.parse(metric))


#: The last layout seen of each block id and its occupancy mask: one entry per
#: block, and a new version (or another book's block of the same id) replaces it.
_MASKS: dict[int, tuple[_Shipped, np.ndarray]] = {}


def _occupied(block_id: int, layout: _Shipped, capacity: int) -> np.ndarray:
    """Which of a block's ``capacity`` positions hold a template (read-only, cached).

    Built once per shipped layout: at a million templates, rebuilding it from the
    8192 labels of each of 123 blocks on every probe took longer than decrypting.
    """
    cached = _MASKS.get(block_id)
    if cached is not None and cached[0] is layout and cached[1].size == capacity:
        return cached[1]
    mask = np.zeros(capacity, dtype=bool)
    mask[: len(layout.template_ids)] = [bool(t) for t in layout.template_ids]
    mask.flags.writeable = False
    _MASKS[block_id] = (layout, mask)
    return mask


@dataclass(frozen=True, slots=True)
class _Decrypted:
    block: BlockScores
    layout: _Shipped
    #: Every position's score (the block's capacity), template order.
    values: np.ndarray


def _decrypted(
    keyring: Keyring,
    book: EnrollmentBook,
    scores: Sequence[BlockScores],
    probe_check: ProbeCheck | None = None,
    decryptor: DecryptionPool | None = None,
) -> list[_Decrypted]:
    """Check, decrypt and range-check each block's scores the book vouches for.

    With ``probe_check`` (an edge probe) the probe is checked first and scores must
    be ciphertext products (three components); without, plaintext products (two).
    Blocks are checked and decrypted in ``decryptor``'s workers when it is given.
    """
    keyring.check(book.keyring.fingerprint)
    seal = book._seal if keyring is book.keyring else _Seal(keyring)
    if probe_check is not None:
        check_probe(seal, probe_check, book.metric, fitted=book.dimensions <= MAX_FIT_DIMENSIONS)
    size = 2 if probe_check is None else 3
    accepted: list[tuple[BlockScores, _Shipped]] = []
    for block in scores:
        layout = book.shipped(block.block_id)
        if layout is None or layout.version != block.version:
            # The cloud scored a layout on-prem no longer vouches for: its positions may
            # now belong to other people, so the block is skipped, never guessed at.
            log.warning(
                "ignoring scores of block %d version %d (on-prem has version %s)",
                block.block_id,
                block.version,
                None if layout is None else layout.version,
            )
            continue
        if len(block.pairs) > book.capacity:
            raise IntegrityError(f"{len(block.pairs)} pairs scored in a block of {book.capacity}")
        accepted.append((block, layout))
    sealed = [Sealed(block.scores, tuple(block.bits), size) for block, _ in accepted]
    if decryptor is None:
        decrypted = [decrypt_scores(seal, item) for item in sealed]
    else:
        decrypted = decryptor.decrypt(seal, sealed)
    out = []
    for (block, layout), values in zip(accepted, decrypted, strict=True):
        scored = _occupied(block.block_id, layout, values.size)
        if block.pairs:
            # Batched 1:1: only the positions a pair owns carry a meaningful score.
            owned = np.zeros(values.size, dtype=bool)
            owned[: len(block.pairs)] = np.asarray(block.pairs) >= 0
            scored = scored & owned
        check_scores(values, scored, book.metric)
        out.append(_Decrypted(block, layout, values))
    return out


def _check_fit(
    book: EnrollmentBook,
    decrypted: Sequence[_Decrypted],
    released: dict[int, set[int]],
    *,
    edge: bool,
) -> None:
    """Fit a random sample of positions, plus every position about to be released."""
    if not decrypted:
        return
    per_block = max(fit_sample_size(book.dimensions) // len(decrypted), 1)
    rng = sampler()
    enrolled: dict[int, list[int]] = {}
    empty: dict[int, list[int]] = {}
    for item in decrypted:
        block_id, ids = item.block.block_id, item.layout.template_ids
        positions = set(sample(book.capacity, per_block, rng).tolist()) | released.get(
            block_id, set()
        )
        enrolled[block_id] = sorted(k for k in positions if k < len(ids) and ids[k])
        empty[block_id] = sorted(k for k in positions if k >= len(ids) or not ids[k])
    held = book.embeddings(enrolled)
    vectors: list[np.ndarray] = []
    values: list[float] = []
    for item in decrypted:
        block_id, ids = item.block.block_id, item.layout.template_ids
        if empty[block_id]:
            rows = (
                book.decoys(block_id, empty[block_id])
                if item.layout.decoys
                else np.zeros((len(empty[block_id]), book.dimensions))
            )
            vectors.extend(rows)
            values.extend(item.values[empty[block_id]])
        for position in enrolled[block_id]:
            entry = held.get((block_id, position))
            if entry is not None and entry[0] == ids[position]:  # not replaced since shipped
                vectors.append(entry[1])
                values.append(float(item.values[position]))
    check_consistency(book.metric, np.asarray(vectors), np.asarray(values), edge=edge)


def _match(subject: str, template_id: str, score: float, metric: Metric) -> Match:
    distance = float(np.sqrt(max(score, 0.0))) if metric.squared else score
    return Match(subject=subject, template_id=template_id, distance=distance, score=score)


def rank(
    keyring: Keyring,
    book: EnrollmentBook,
    scores: Sequence[BlockScores],
    *,
    subject: str | None = None,
    top_k: int = 5,
    per_subject: bool = True,
    probe_check: ProbeCheck | None = None,
    decryptor: DecryptionPool | None = None,
) -> list[Match]:
    """On-prem: decrypt 1:N scores and return the ``top_k`` nearest, nearest first.

    Positions are named through the book's own layout of the scored version; freed
    ones are ignored. ``per_subject`` keeps only each subject's best template.
    ``probe_check`` comes with the scores of an edge-encrypted probe; ``decryptor``
    (under ``keyring``) decrypts many blocks in its worker processes. Raises
    `IntegrityError` for scores or a probe the protocol would not produce.
    """
    blocks = [block.block_id for block in scores]
    if len(set(blocks)) < len(blocks):
        # One probe scores each block once: a repeat is only extra decryptions.
        raise IntegrityError(f"{len(blocks) - len(set(blocks))} block(s) scored twice")
    decrypted = _decrypted(keyring, book, scores, probe_check, decryptor)
    chosen = _nearest(decrypted, book.capacity, subject, top_k, per_subject)
    released: dict[int, set[int]] = {}
    for item, position in chosen:
        released.setdefault(item.block.block_id, set()).add(position)
    _check_fit(book, decrypted, released, edge=probe_check is not None)
    return [
        _match(
            item.layout.subjects[position],
            item.layout.template_ids[position],
            float(item.values[position]),
            book.metric,
        )
        for item, position in chosen
    ]


def _nearest(
    decrypted: Sequence[_Decrypted],
    capacity: int,
    subject: str | None,
    top_k: int,
    per_subject: bool,
) -> list[tuple[_Decrypted, int]]:
    """The ``top_k`` lowest scores over all blocks (best per subject), lowest first.

    Candidates come from every block's scores at once (`_lowest`), empty positions
    set to infinity; with ``per_subject`` the candidate set grows until it holds
    ``top_k`` distinct subjects. Ties keep block and position order.
    """
    if not decrypted or top_k <= 0:
        return []
    masked = np.full((len(decrypted), capacity), np.inf)
    for row, item in enumerate(decrypted):
        keep = _occupied(item.block.block_id, item.layout, capacity)
        if subject is not None:
            names = item.layout.subjects
            keep = keep & np.array(
                [k < len(names) and names[k] == subject for k in range(capacity)]
            )
        np.copyto(masked[row], item.values, where=keep)
    flat = masked.ravel()
    available = int(np.count_nonzero(np.isfinite(flat)))
    want = min(top_k, available)
    while True:
        candidates = _lowest(masked, want)
        candidates = candidates[np.argsort(flat[candidates], kind="stable")]
        candidates = candidates[np.isfinite(flat[candidates])]
        chosen: list[tuple[_Decrypted, int]] = []
        seen: set[str] = set()
        for index in candidates.tolist():
            item, position = decrypted[index // capacity], index % capacity
            name = item.layout.subjects[position]
            if per_subject and name in seen:
                continue
            seen.add(name)
            chosen.append((item, position))
            if len(chosen) == top_k:
                return chosen
        if want >= available:
            return chosen
        want = min(4 * want, available)


def _lowest(masked: np.ndarray, want: int) -> np.ndarray:
    """Flat indices, ascending, of every value of ``masked`` up to its ``want``-th lowest.

    Ties at that bound are all in, so the candidates sorted by value (stable) are
    the first of all scores in value, block and position order. The ``want``-th
    lowest of the rows' minima bounds the ``want``-th lowest value (those rows'
    minima are ``want`` values at most that large): one pass over the scores
    instead of a partition of all of them (0.4 ms against 10.8 ms at 123 blocks,
    benchmarks/bench_rank.py). With fewer rows holding a finite value than ``want``, the whole
    array is partitioned.
    """
    flat = masked.ravel()
    if want >= flat.size:
        return np.arange(flat.size)
    minima = masked.min(axis=1)
    if 0 < want <= np.count_nonzero(np.isfinite(minima)):
        bound = np.partition(minima, want - 1)[want - 1]
    else:
        bound = np.partition(flat, max(want - 1, 0))[max(want - 1, 0)]
    return np.flatnonzero(flat <= bound)


def rank_pairs(
    keyring: Keyring,
    book: EnrollmentBook,
    scores: Sequence[BlockScores],
    count: int,
    *,
    decryptor: DecryptionPool | None = None,
) -> list[Match | None]:
    """On-prem: the best match of each of ``count`` `verify_pairs` claims (None: unscored).

    Decide each with `accept`. Only templates of the claimed subject are scored
    for a pair, so the best one answers the claim. Every pair has its own probe,
    so there is no single probe to fit: range checks only.
    """
    best: list[Match | None] = [None] * count
    for item in _decrypted(keyring, book, scores, decryptor=decryptor):
        block, layout, values = item.block, item.layout, item.values
        for position, index in enumerate(block.pairs[: len(layout.template_ids)]):
            if index < 0 or index >= count or not layout.template_ids[position]:
                continue
            current = best[index]
            if current is None or values[position] < current.score:
                best[index] = _match(
                    layout.subjects[position],
                    layout.template_ids[position],
                    float(values[position]),
                    book.metric,
                )
    return best
