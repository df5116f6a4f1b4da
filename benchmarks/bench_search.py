"""Encrypted 1:N search and batched 1:1 verification: speed, size, memory.

Embeddings are *synthetic*: standard-normal 128-d vectors, L2-normalised (the
metric is euclidean_l2 unless --metric says otherwise); face embeddings cost
the same to search, only recognition accuracy would differ. Galleries grow in
place (1K -> 10K -> ...), so each size re-encrypts only the blocks that changed.

Run:  python benchmarks/bench_search.py [--quick] [--sizes 1000,10000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cipherface.crypto import Keyring, Metric, encrypted_distance
from cipherface.gallery import (
    EncryptedGallery,
    EnrollmentBook,
    encrypt_probe,
    rank,
    rank_pairs,
)

__all__ = ["main"]

TARGETS = {
    "100K search (s)": 1.0,
    "1M search (s)": 10.0,
    "1M / numpy": 30.0,
    "bytes/template": 4096,
    "public context (bytes)": 2 * 1024 * 1024,
    "batched / seed 1:1": 50.0,
}


def _timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls (the least disturbed by the other core's work)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _embeddings(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dim))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _peak_mb() -> tuple[float, list[float]]:
    """(this process, each live child) peak RSS in MB.

    Live children are read from /proc (VmHWM): getrusage(RUSAGE_CHILDREN) only
    covers reaped children and counts the parent's pages a child had at fork.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != os.getpid():
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                children.append(int(line.split()[1]) / 1024)
    return own, children


def _one_to_one(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, float]:
    """Seed-style (one ciphertext per template, rotations) vs batched 1:1, same parameters."""
    metric = Metric(args.metric)
    seed_keys = Keyring.generate(args.preset, galois_keys=True)
    templates = _embeddings(rng, args.seed_pairs, args.dim)
    encrypted = [seed_keys.encrypt(t) for t in templates]
    probes = templates + 0.01 * rng.standard_normal(templates.shape)
    seed_time, _ = _timed(
        lambda: [
            encrypted_distance(seed_keys, e, p, metric)
            for e, p in zip(encrypted, probes, strict=True)
        ]
    )
    seed_rate = args.seed_pairs / seed_time

    keys = Keyring.generate(args.preset, relin_keys=False)
    public = Keyring.from_bytes(keys.public_bytes(galois_keys=False), expect="public")
    book = EnrollmentBook(keys, metric, args.dim)
    # One full block: both templates of every slot, so verify_pairs needs two rounds.
    gallery_vectors = _embeddings(rng, book.capacity, args.dim)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(gallery_vectors))
    with EncryptedGallery(public, workers=1) as gallery:
        for block in book.encrypt_blocks():
            gallery.put(block)
        pair_probes = gallery_vectors + 0.01 * rng.standard_normal(gallery_vectors.shape)
        pairs = [(p, f"s{i}") for i, p in enumerate(pair_probes)]
        batch_time, scores = _timed(lambda: gallery.verify_pairs(pairs))
        matches = rank_pairs(keys, book, scores, len(pairs))
    assert all(m is not None and m.subject == f"s{i}" for i, m in enumerate(matches))
    batch_rate = len(pairs) / batch_time
    return {
        "seed_rate": seed_rate,
        "seed_bytes": float(len(encrypted[0].data)),
        "batch_rate": batch_rate,
        "batch_pairs": float(len(pairs)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the plot; exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--quick", action="store_true", help="sizes 1000,10000 and fewer pairs")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--preset", default="n8192")
    parser.add_argument("--metric", default=Metric.EUCLIDEAN_L2.value)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed-pairs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.seed_pairs = "1000,10000", 10
    sizes = sorted(int(s) for s in args.sizes.split(","))
    metric = Metric(args.metric)
    rng = np.random.default_rng(2024)
    print(
        f"# CipherFace search benchmark: preset {args.preset}, {args.dim}-d synthetic "
        f"L2-normalised embeddings, metric {metric.value}, {args.workers} worker process(es), "
        f"{os.cpu_count()} CPU(s)"
    )

    one = _one_to_one(args, rng)
    ratio_11 = one["batch_rate"] / one["seed_rate"]
    print(
        f"1:1 seed-style (1 ciphertext/template, Galois keys): {one['seed_rate']:9.1f} pairs/s, "
        f"{one['seed_bytes'] / 1024:.0f} KB/template"
    )
    print(
        f"1:1 batched (verify_pairs, {one['batch_pairs']:.0f} pairs/block): "
        f"{one['batch_rate']:9.1f} pairs/s  = {ratio_11:.0f}x seed-style"
    )

    keys = Keyring.generate(args.preset, relin_keys=False)
    context_bytes = len(keys.public_bytes(galois_keys=False, relin_keys=False))
    with_relin = len(Keyring.generate(args.preset).public_bytes(galois_keys=False, relin_keys=True))
    public = Keyring.from_bytes(keys.public_bytes(galois_keys=False), expect="public")
    print(
        f"public context: {context_bytes / 1024:.0f} KB (no Galois, no relin keys; "
        f"{with_relin / 1024:.0f} KB with relin keys)"
    )

    book = EnrollmentBook(keys, metric, args.dim)
    gallery = EncryptedGallery(public, workers=args.workers)
    vectors = np.empty((0, args.dim))
    rows = []
    header = (
        f"{'templates':>10} {'blocks':>6} {'setup s':>8} {'cloud s':>8} {'rank s':>7} "
        f"{'total s':>8} {'enc-probe s':>11} {'numpy s':>8} {'ratio':>6} {'B/tmpl':>7} {'rank1':>5}"
    )
    print(header)
    shipped_bytes: dict[int, int] = {}
    for size in sizes:
        start = time.perf_counter()
        new = _embeddings(rng, size - len(vectors), args.dim)
        first = len(vectors)
        book.add_many((f"s{first + i}", v, f"t{first + i}") for i, v in enumerate(new))
        vectors = np.concatenate([vectors, new])
        for block in book.encrypt_blocks(workers=args.workers):
            shipped_bytes[block.block_id] = sum(map(len, block.columns)) + len(block.norms or b"")
            gallery.put(block)
        setup = time.perf_counter() - start
        target = int(rng.integers(size))
        probe = vectors[target] + 0.05 * rng.standard_normal(args.dim) / np.sqrt(args.dim)
        reps = 3 if size <= 100_000 else 2
        cloud, scores = _timed(lambda p=probe: gallery.search(p), reps)
        on_prem, matches = _timed(lambda s=scores: rank(keys, book, s, top_k=5))
        encrypted_probe = encrypt_probe(public, probe, metric)
        enc_cloud, enc_scores = _timed(lambda p=encrypted_probe: gallery.search(p))
        enc_matches = rank(keys, book, enc_scores, top_k=5)

        def plain_search(vectors: np.ndarray = vectors, probe: np.ndarray = probe) -> np.ndarray:
            distances = 2.0 - 2.0 * (vectors @ probe)
            top = np.argpartition(distances, 5)[:5]
            return top[np.argsort(distances[top])]

        numpy_time, top = _timed(plain_search, 5)
        total = cloud + on_prem
        per_template = sum(shipped_bytes.values()) / size
        ok = matches[0].subject == f"s{target}" == enc_matches[0].subject == f"s{top[0]}"
        rows.append((size, cloud, on_prem, total, enc_cloud, numpy_time, per_template))
        print(
            f"{size:>10} {len(book.all_blocks()):>6} {setup:>8.1f} {cloud:>8.3f} {on_prem:>7.3f} "
            f"{total:>8.3f} {enc_cloud:>11.3f} {numpy_time:>8.4f} {total / numpy_time:>6.1f} "
            f"{per_template:>7.0f} {'yes' if ok else 'NO':>5}",
            flush=True,
        )
    own, children = _peak_mb()
    gallery.close()
    workers = ", ".join(f"{c:.0f}" for c in sorted(children)) or "none"
    print(
        f"peak memory (getrusage/VmHWM): main process {own:.0f} MB, "
        f"gallery workers {workers} MB; total {own + sum(children):.0f} MB"
    )
    print(
        "times: cloud = encrypted search (plaintext probe), rank = on-prem decrypt + top-5, "
        "total = both; ratio = total / numpy; enc-probe = cloud search with an edge-encrypted "
        "probe; setup = enrolment + encryption + loading (not search time)"
    )

    by_size = {r[0]: r for r in rows}
    checks = {
        "batched / seed 1:1": (ratio_11, ratio_11 >= TARGETS["batched / seed 1:1"]),
        "public context (bytes)": (
            context_bytes,
            context_bytes <= TARGETS["public context (bytes)"],
        ),
        "bytes/template": (rows[-1][6], rows[-1][6] <= TARGETS["bytes/template"]),
    }
    if 100_000 in by_size:
        value = by_size[100_000][3]
        checks["100K search (s)"] = (value, value <= TARGETS["100K search (s)"])
    if 1_000_000 in by_size:
        value = by_size[1_000_000][3]
        checks["1M search (s)"] = (value, value <= TARGETS["1M search (s)"])
        ratio = value / by_size[1_000_000][5]
        checks["1M / numpy"] = (ratio, ratio <= TARGETS["1M / numpy"])
    for name, (value, passed) in checks.items():
        print(
            f"target {name:<24} {value:>12.2f} (limit {TARGETS[name]}): "
            f"{'met' if passed else 'MISSED'}"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    _plot(rows, args.out / "search_time.png", metric)
    print(f"plot: {args.out / 'search_time.png'}")
    return 0 if all(passed for _, passed in checks.values()) else 1


def _plot(rows: list[tuple[float, ...]], path: Path, metric: Metric) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(sizes, [r[3] for r in rows], "o-", label="encrypted, plaintext probe (cloud + rank)")
    ax.loglog(sizes, [r[4] for r in rows], "s-", label="encrypted, encrypted probe (cloud)")
    ax.loglog(sizes, [r[5] for r in rows], "^-", label="plaintext numpy")
    ax.set_xlabel("gallery size (templates, 128-d synthetic)")
    ax.set_ylabel("search time (s)")
    ax.set_title(f"1:N search time, {metric.value}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
