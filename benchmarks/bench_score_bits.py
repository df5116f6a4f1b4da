"""Smaller scores: what keeping fewer bits of a score ciphertext costs in precision.

A score ciphertext is two polynomials of N coefficients modulo a 60-bit prime:
16 bytes per template. Replicas send plaintext-probe scores compressed
(`cipherface.gallery.compact`): each coefficient rounded, in coefficient form, to
``k0`` bits for ``c0`` and ``k1`` for ``c1``. The error is ``c0``'s rounding plus
``c1``'s times the secret key, which is larger and heavier-tailed, so ``c1``
keeps more bits. This prints, per split, the bytes per probe at a million
templates, the largest and the rms score error against the exact decryption,
and the decisions flipped at the Dlib euclidean_l2 threshold, over one block of
8192 synthetic unit vectors under each of ``--keys`` keys (two templates per
slot: 16,384 values per key); the consistency fit's tolerance (1e-3) is the
bound every honest error must stay well under.

Run:  python benchmarks/bench_score_bits.py [--keys 3]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from cipherface.crypto import Keyring, Metric, prepare_embedding
from cipherface.embedding import threshold
from cipherface.gallery import EnrollmentBook
from cipherface.gallery.compact import (
    SCORE_BITS,
    compress,
    compressed_size,
    expand,
    score_writer,
)
from cipherface.gallery.consistency import FIT_TOLERANCE
from cipherface.gallery.kernel import Writer
from cipherface.gallery.packing import _Seal, _weights
from cipherface.gallery.workers import _Engine

__all__ = ["main"]

_BLOCKS_AT_1M = 123
#: Splits of a coefficient pair's bits, ``(c0, c1)``: 63 at most (one packed word).
_SPLITS = ((31, 32), (30, 33), (29, 34), (28, 34), (28, 35), (27, 36))


def _decrypt(seal: _Seal, writer: Writer, coefficients: np.ndarray) -> np.ndarray:
    ciphertext = seal.load(writer(coefficients))
    seal.evaluator.transform_to_ntt_inplace(ciphertext)
    return seal.decrypt(ciphertext)


def main() -> int:
    """Print the trade-off table; always exits 0 (a measurement, not a target)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(9)
    limit = threshold("Dlib", Metric.EUCLIDEAN_L2.value) ** 2
    errors: dict[tuple[int, int], list[np.ndarray]] = {split: [] for split in _SPLITS}
    flipped = dict.fromkeys(_SPLITS, 0)
    for _ in range(args.keys):
        keys = Keyring.generate("n8192", relin_keys=False)
        seal = _Seal(keys)
        prime = seal.context.last_context_data().parms().coeff_modulus()[0].value()
        vectors = rng.standard_normal((8192, 128))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        probe = vectors[0] + 0.5 * rng.standard_normal(128) / np.sqrt(128)
        book = EnrollmentBook(keys, Metric.EUCLIDEAN_L2, 128)
        book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
        [block] = book.encrypt_blocks()
        engine = _Engine(keys.public())
        engine.put(block.block_id, block.version, block.columns, block.norms)
        factor, const = _weights(Metric.EUCLIDEAN_L2)
        weights = factor * prepare_embedding(probe, Metric.EUCLIDEAN_L2)[None]
        [(_, _, [sums])] = list(engine.sums(weights, [const], [block.block_id]))
        writer = score_writer(seal)
        exact = _decrypt(seal, writer, sums)
        for split in _SPLITS:
            got = _decrypt(seal, writer, expand(compress(sums, prime, split), prime, 8192, split))
            errors[split].append(np.abs(got - exact))
            flipped[split] += int(np.sum((got <= limit) != (exact <= limit)))
    print(
        f"bits kept (c0, c1) | B/block | MB/probe at 1M | max error | rms error "
        f"| decisions flipped (of {8192 * args.keys})"
    )
    print("--- | --- | --- | --- | --- | ---")
    full = 2 * 8192 * 8
    print(f"60, 60 (uncompressed) | {full:,} | {_BLOCKS_AT_1M * full / 1e6:.2f} | 0 | 0 | 0")
    for split in _SPLITS:
        error = np.concatenate(errors[split])
        shipped = " (shipped)" if split == SCORE_BITS else ""
        size = compressed_size(8192, split)
        print(
            f"{split[0]}, {split[1]}{shipped} | {size:,} | {_BLOCKS_AT_1M * size / 1e6:.2f}"
            f" | {error.max():.2e}"
            f" | {np.sqrt(np.mean(error**2)):.2e} | {flipped[split]}"
        )
    print(f"integrity fit tolerance (plaintext probe): {FIT_TOLERANCE[False]:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
