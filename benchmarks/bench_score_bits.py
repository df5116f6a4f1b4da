"""Smaller scores: what dropping low-order bits of a score ciphertext costs in precision.

A score ciphertext is two polynomials of N coefficients modulo a 60-bit prime:
16 bytes per template. Rounding away the ``k`` low bits of every coefficient (in
coefficient form, where that is an additive error; in NTT form it would not be)
leaves ``60 - k`` bits to send. The error it adds is ``c0``'s rounding plus
``c1``'s times the secret key, so it grows as ``2^k``. This prints, per ``k``,
the bytes per probe at a million templates, the largest and the typical score
error against the exact decryption, and the decisions flipped at the Dlib
euclidean_l2 threshold, on one block of 8192 synthetic unit vectors; the bound
the integrity fit allows (1e-3) is what ``k`` must stay under.

This is a measurement for issue 12's "scores bytes per probe" target: the wire
format still carries full ciphertexts.

Run:  python benchmarks/bench_score_bits.py
"""

from __future__ import annotations

import sys

import numpy as np

from cipherface.crypto import Keyring, Metric
from cipherface.embedding import threshold
from cipherface.gallery import EncryptedGallery, EnrollmentBook
from cipherface.gallery.consistency import FIT_TOLERANCE
from cipherface.gallery.kernel import Writer, coefficients
from cipherface.gallery.packing import _Seal

__all__ = ["main"]

_BLOCKS_AT_1M = 123


def main() -> int:
    """Print the trade-off table; always exits 0 (a measurement, not a target)."""
    rng = np.random.default_rng(9)
    keys = Keyring.generate("n8192", relin_keys=False)
    seal = _Seal(keys)
    prime = seal.context.last_context_data().parms().coeff_modulus()[0].value()
    vectors = rng.standard_normal((8192, 128))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    probe = vectors[0] + 0.5 * rng.standard_normal(128) / np.sqrt(128)
    book = EnrollmentBook(keys, Metric.EUCLIDEAN_L2, 128)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    with EncryptedGallery(keys.public()) as gallery:
        for block in book.encrypt_blocks():
            gallery.put(block)
        [scores] = gallery.search(probe)
    ciphertext = seal.load_checked(scores.scores, size=2)
    exact = seal.decrypt(ciphertext)
    seal.evaluator.transform_from_ntt_inplace(ciphertext)
    values = coefficients(seal, ciphertext)
    writer = Writer(seal, ciphertext)
    limit = threshold("Dlib", Metric.EUCLIDEAN_L2.value) ** 2
    q = np.uint64(prime)
    print("dropped bits | MB/probe at 1M | max error | rms error | decisions flipped (of 8192)")
    print("--- | --- | --- | --- | ---")
    for dropped in (0, 12, 16, 20, 22, 24, 26, 28):
        if dropped:
            half = np.uint64(1 << (dropped - 1))
            rounded = values + half
            rounded = np.where(rounded >= q, rounded - q, rounded)
            rounded = (rounded >> np.uint64(dropped)) << np.uint64(dropped)
        else:
            rounded = values
        approx = seal.load(writer(rounded))
        seal.evaluator.transform_to_ntt_inplace(approx)
        got = seal.decrypt(approx)
        error = np.abs(got - exact)
        flipped = int(np.sum((got <= limit) != (exact <= limit)))
        megabytes = _BLOCKS_AT_1M * 2 * seal.slots * 2 * (60 - dropped) / 8 / 1e6
        print(
            f"{dropped} | {megabytes:.1f} | {error.max():.2e} | {np.sqrt(np.mean(error**2)):.2e} "
            f"| {flipped}"
        )
    print(f"integrity fit tolerance (plaintext probe): {FIT_TOLERANCE[False]:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
