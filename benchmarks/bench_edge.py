"""Edge-encrypted probes in both layouts: sizes, the replicas' keys, the expansion's cost.

For each preset and dimension asked for, on a random unit probe (cosine): the
probe in columns (`cipherface.gallery.encrypt_probe`) and packed
(`cipherface.gallery.expansion`), the Galois keys replicas need for each (on-prem's
`agents.onprem.keys.replica_keys` ships the expansion keys only when they fit a
context update under the cap beside the public context), the expansion's time at
the cloud, and the largest error of an expanded column against the weight it holds
(a fresh column's beside it).

Run:  python benchmarks/bench_edge.py [--cases n8192:128 n8192:512 n16384:128]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from agents.onprem.keys import replica_keys
from cipherface.crypto import Keyring, Metric
from cipherface.gallery import encrypt_probe
from cipherface.gallery.expansion import (
    edge_keys,
    encrypt_packed_probe,
    expand_probe,
    expansion_elements,
)
from cipherface.gallery.integrity import conjugation_key, galois_keys
from cipherface.gallery.packing import _Seal
from cipherface.wire import MAX_MESSAGE_BYTES

__all__ = ["main"]

_MB = 1e6


def _error(keys: Keyring, columns: tuple[bytes, ...], weights: np.ndarray) -> float:
    seal = _Seal(keys)
    return max(
        float(np.abs(seal.decrypt_slots(seal.load(c)) - w).max())
        for c, w in zip(columns, weights, strict=False)
    )


def main(argv: list[str] | None = None) -> int:
    """Print one row per case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["n8192:128", "n8192:512", "n16384:128"])
    args = parser.parse_args(argv)
    print(f"edge probes, cosine, cap {MAX_MESSAGE_BYTES:,} B")
    print(
        f"{'preset':>7} {'dim':>5} {'columns MB':>10} {'packed MB':>9} {'conj. key MB':>12} "
        f"{'keys MB':>7} {'ships':>5} {'expand s':>8} {'expanded err':>12} {'fresh err':>9}"
    )
    for case in args.cases:
        preset, dims = case.split(":")
        dimensions = int(dims)
        keys = Keyring.generate(preset, relin_keys=False)
        public = keys.public()
        vector = np.random.default_rng(dimensions).standard_normal(dimensions)
        vector /= np.linalg.norm(vector)
        columns = encrypt_probe(public, vector, Metric.COSINE)
        packed = encrypt_packed_probe(public, vector, Metric.COSINE)
        galois = edge_keys(keys, dimensions)
        shipped = galois_keys(public, replica_keys(keys, dimensions, MAX_MESSAGE_BYTES))
        ships = all(shipped.has_key(e) for e in expansion_elements(keys, dimensions))
        start = time.perf_counter()
        expanded = expand_probe(public, galois, packed)
        seconds = time.perf_counter() - start
        fresh = _error(keys, columns.columns[:16], -vector[:16])
        print(
            f"{preset:>7} {dimensions:>5} {sum(map(len, columns.columns)) / _MB:>10.2f} "
            f"{len(packed.packed or b'') / _MB:>9.3f} {len(conjugation_key(keys)) / _MB:>12.2f} "
            f"{len(galois) / _MB:>7.2f} {'yes' if ships else 'no':>5} {seconds:>8.2f} "
            f"{_error(keys, expanded.columns, -vector):>12.1e} {fresh:>9.1e}",
            flush=True,
        )
    print(
        "keys: conjugation and the expansion's automorphisms, seeded; ships: whether "
        "on-prem sends them under the cap (else the conjugation key alone, and replicas "
        "refuse packed probes); err: largest |slot - weight| over every slot of the "
        "expanded columns, and of 16 fresh columns"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
