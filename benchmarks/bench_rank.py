"""Where on-prem's time per 1:N probe goes: each block's decryption, the fixed part,
and decryption workers.

On-prem decrypts one score ciphertext per block (123 at a million templates) and
then picks candidates and fits a sample (`cipherface.gallery.ranking`). This
prints, for a gallery of ``--blocks`` blocks of synthetic 128-d unit vectors
(euclidean_l2, compressed scores as replicas send them):

- the cost of each step of one block's decryption (SEAL through TenSEAL's
  bindings), the median of ``--repeat`` rounds;
- the fixed part before and after this project replaced it: candidates by a full
  `argpartition` against the rows' minima (`ranking._lowest`), the fit by
  `lstsq`'s SVD against the normal equations (`consistency.check_consistency`);
- the same SEAL steps in one process alone and in two processes at once: how far
  two cores speed decryption up on this machine;
- `rank` with 0, 1 and 2 decryption workers (`CIPHERFACE_DECRYPT_WORKERS`), the
  median over interleaved rounds, per block, and the blocks' decryption alone.

Run:  python benchmarks/bench_rank.py [--blocks 32] [--repeat 15]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as sealapi
from bench_core import median_ms  # a sibling script: benchmarks/ is sys.path[0]

from cipherface.crypto import Keyring, Metric
from cipherface.gallery import EncryptedGallery, EnrollmentBook, compact, rank
from cipherface.gallery.compact import expand
from cipherface.gallery.decryption import DecryptionPool, Sealed, decrypt_scores
from cipherface.gallery.packing import _Seal
from cipherface.gallery.ranking import _lowest

__all__ = ["main"]

DIMENSIONS = 128


def _steps(seal: _Seal, data: bytes, bits: tuple[int, ...], repeat: int) -> list[tuple[str, float]]:
    """One block's decryption, step by step (each timed over 50 calls, median of rounds)."""
    reader = compact._READERS[seal]
    coefficients = expand(data, reader.modulus, 2 * seal.slots, tuple(bits))
    serialized = reader._writer(coefficients)
    loaded = seal.load(serialized)
    seal.evaluator.transform_to_ntt_inplace(loaded)
    plain = sealapi.Plaintext()
    seal.decryptor.decrypt(loaded, plain)

    def ntt() -> None:
        seal.evaluator.transform_to_ntt_inplace(seal.load(serialized))

    per_call: list[tuple[str, Callable[[], object]]] = [
        ("expand the bits (numba)", lambda: expand(data, reader.modulus, 2 * seal.slots)),
        ("serialize for SEAL", lambda: reader._writer(coefficients)),
        ("load into SEAL (through a tmpfs file)", lambda: seal.load(serialized)),
        ("load + NTT transform (SEAL)", ntt),
        ("decrypt (SEAL)", lambda: seal.decryptor.decrypt(loaded, sealapi.Plaintext())),
        ("decode to a Python list (SEAL)", lambda: seal.encoder.decode_complex(plain)),
        ("decode + numpy array", lambda: seal.unpack(plain)),
        ("all of it (decrypt_scores)", lambda: decrypt_scores(seal, Sealed(data, bits, 2))),
    ]
    return [
        (name, median_ms(lambda f=f: [f() for _ in range(50)], repeat) / 50) for name, f in per_call
    ]


def _alone(secret: bytes, data: bytes, bits: tuple[int, ...], start: float, out: Any) -> None:
    seal = _Seal(Keyring.from_bytes(secret, expect="secret"))
    sealed = Sealed(data, bits, 2)
    decrypt_scores(seal, sealed)
    while time.time() < start:
        time.sleep(0.001)
    begin = time.perf_counter()
    for _ in range(300):
        decrypt_scores(seal, sealed)
    out.put(1e3 * (time.perf_counter() - begin) / 300)


def _parallel(keys: Keyring, data: bytes, bits: tuple[int, ...]) -> list[list[float]]:
    """ms per block of `decrypt_scores` in 1 process, then in 2 at once."""
    context = multiprocessing.get_context("spawn")
    results = []
    for count in (1, 2):
        queue = context.Queue()
        start = time.time() + 5  # every process started and warm
        procs = [
            context.Process(target=_alone, args=(keys.secret_bytes(), data, bits, start, queue))
            for _ in range(count)
        ]
        for proc in procs:
            proc.start()
        results.append(sorted(queue.get() for _ in procs))
        for proc in procs:
            proc.join()
    return results


def main(argv: list[str] | None = None) -> int:
    """Print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    keys = Keyring.generate("n8192", relin_keys=False)
    public = Keyring.from_bytes(keys.public_bytes(galois_keys=False), expect="public")
    book = EnrollmentBook(keys, Metric.EUCLIDEAN_L2, DIMENSIONS)
    rng = np.random.default_rng(7)
    count = args.blocks * book.capacity
    vectors = rng.standard_normal((count, DIMENSIONS))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    gallery = EncryptedGallery(public, workers=2)
    for block in book.encrypt_blocks(workers=2):
        gallery.put(block)
    scores = gallery.search(vectors[count // 2])
    gallery.close()
    seal = book._seal
    rank(keys, book, scores)  # builds the reader of compressed scores
    first = scores[0]
    print(f"# on-prem ranking: {args.blocks} blocks ({count:,} templates), {DIMENSIONS}-d")
    print("\none block's decryption, ms (median of rounds of 50 calls)")
    for name, ms in _steps(seal, first.scores, tuple(first.bits), args.repeat):
        print(f"  {name:<40} {ms:7.3f}")

    values = np.round(rng.uniform(0.5, 3.5, (123, book.capacity)), 6)
    flat = values.ravel()
    design = vectors[rng.integers(0, count, 246)]
    target = design @ vectors[0]
    print("\nthe fixed part at 123 blocks (a million templates), ms")
    fixed = [
        ("candidates: argpartition of every score", lambda: np.argpartition(flat, 5)),
        ("candidates: the rows' minima (_lowest)", lambda: _lowest(values, 5)),
        ("fit of 246 rows: lstsq (SVD)", lambda: np.linalg.lstsq(design, target, rcond=None)),
        (
            "fit of 246 rows: normal equations",
            lambda: np.linalg.solve(design.T @ design, design.T @ target),
        ),
    ]
    for name, fn in fixed:
        print(f"  {name:<40} {median_ms(fn, args.repeat):7.3f}")

    one, two = _parallel(keys, first.scores, tuple(first.bits))
    print("\ndecrypt_scores, ms per block, processes running at once")
    print(f"  1 process   {one[0]:.3f}")
    print(f"  2 processes {', '.join(f'{ms:.3f}' for ms in two)}")
    print(f"  throughput, 2 against 1: {sum(1 / ms for ms in two) * one[0]:.2f}x")

    pools = {workers: DecryptionPool(keys, workers) for workers in (1, 2)}
    pids = set().union(*(pool.warm() for pool in pools.values()))
    sealed = [Sealed(block.scores, tuple(block.bits), 2) for block in scores]
    runs: dict[tuple[str, str], Callable[[], object]] = {
        ("0 (in-process)", "rank"): lambda: rank(keys, book, scores),
        ("0 (in-process)", "decrypt"): lambda: [decrypt_scores(seal, s) for s in sealed],
    }
    for workers, pool in pools.items():
        runs[str(workers), "rank"] = lambda p=pool: rank(keys, book, scores, decryptor=p)
        runs[str(workers), "decrypt"] = lambda p=pool: p.decrypt(seal, sealed)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(args.repeat):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    peaks = sorted(_peak_mb(pid) for pid in pids)
    for pool in pools.values():
        pool.close()
    print(f"\n{len(scores)} blocks, ms (median of {args.repeat} interleaved rounds)")
    print("decryption workers  rank ms  ms/block  decryption alone ms")
    for name in dict.fromkeys(name for name, _ in runs):
        ranked = 1e3 * statistics.median(times[name, "rank"])
        alone = 1e3 * statistics.median(times[name, "decrypt"])
        print(f"{name:<18} {ranked:8.1f}  {ranked / len(scores):8.3f}  {alone:19.1f}")
    print(f"peak RSS per decryption worker (VmHWM): {', '.join(f'{mb:.0f}' for mb in peaks)} MB")
    return 0


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
