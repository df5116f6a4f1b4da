"""Costs of the original 1:1 API, and its accuracy on the labelled pairs.

Prints: time per encrypted distance (seed-style, Galois keys) ciphertext-vs-ciphertext and
ciphertext-vs-plaintext, decryption time, ciphertext and context sizes, and Dlib accuracy on
pairs.csv in plaintext (DeepFace's own decision) and under encryption.

    python benchmarks/bench_core.py [--faces DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from deepface.modules.verification import find_distance, find_threshold

from cipherface import CipherFace, Keyring, photos
from cipherface.crypto import PRESETS, Metric, encrypted_distance
from cipherface.embedding import Embedder, largest_face


def median_ms(action: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``action`` in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def crypto_costs(repeat: int) -> None:
    """Per-operation time and sizes for each preset, on 128-d (Dlib) embeddings."""
    print("preset  keygen_s  ct-ct_ms  ct-pt_ms  decrypt_ms  ciphertext_KB  public_MB(+galois)")
    for name in PRESETS:
        preset_costs(name, repeat)


def preset_costs(name: str, repeat: int) -> None:
    """One row of `crypto_costs`: squared euclidean, as the seed computes it."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 0.1, 128), rng.normal(0, 0.1, 128)
    started = time.perf_counter()
    keyring = Keyring.generate(name, galois_keys=True)
    keygen = time.perf_counter() - started
    alpha, beta = keyring.encrypt(a), keyring.encrypt(b)
    result = encrypted_distance(keyring, alpha, beta, Metric.EUCLIDEAN)
    ct_ct = median_ms(partial(encrypted_distance, keyring, alpha, beta, Metric.EUCLIDEAN), repeat)
    ct_pt = median_ms(partial(encrypted_distance, keyring, alpha, b, Metric.EUCLIDEAN), repeat)
    decrypt = median_ms(partial(keyring.decrypt, result), repeat)
    with_galois = len(keyring.public_bytes(galois_keys=True)) / 1e6
    without = len(keyring.public_bytes(galois_keys=False)) / 1e6
    print(
        f"{name:7} {keygen:8.2f}  {ct_ct:8.1f}  {ct_pt:8.1f}  {decrypt:10.2f}  "
        f"{len(alpha.data) / 1e3:13.0f}  {without:.2f} ({with_galois:.1f})"
    )


def pair_accuracy(faces: Path) -> None:
    """Plaintext vs encrypted decisions and accuracy on pairs.csv (Dlib, opencv)."""
    pairs = photos.pairs(faces)
    names = sorted({n for a, b, _ in pairs for n in (a, b)})
    embedder = Embedder("Dlib", "opencv")
    started = time.perf_counter()
    embeddings = {n: largest_face(embedder.embed(faces / n)).embedding for n in names}
    per_image = (time.perf_counter() - started) / len(names)
    print(f"\n{len(names)} images embedded, {per_image:.2f} s each (first includes model load)")
    for metric in ("euclidean", "cosine"):
        limit = find_threshold("Dlib", metric)
        cf = CipherFace(facial_recognition_model="Dlib", distance_metric=metric)
        encrypted = {n: cf.encrypt(e) for n, e in embeddings.items()}
        plain_right = encrypted_right = agree = 0
        for a, b, same in pairs:
            plain = float(find_distance(embeddings[a], embeddings[b], metric)) <= limit
            secure = cf.verify(
                cf.restore(cf.calculate_encrypted_distance(encrypted[a], encrypted[b]))
            )
            plain_right += plain == same
            encrypted_right += secure == same
            agree += plain == secure
        n = len(pairs)
        print(
            f"{metric:9}: plaintext {plain_right / n:.1%}  encrypted {encrypted_right / n:.1%}  "
            f"decisions agree on {agree}/{n}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=None, help="photo folder (pairs.csv)")
    parser.add_argument("--repeat", type=int, default=200, help="timing repetitions")
    args = parser.parse_args()
    faces = args.faces or photos.default_faces_dir()
    crypto_costs(args.repeat)
    if (faces / "pairs.csv").is_file():
        pair_accuracy(faces)
    else:
        print(f"\nno pairs.csv in {faces}: accuracy skipped (set CIPHERFACE_FACES_DIR)")


if __name__ == "__main__":
    main()
