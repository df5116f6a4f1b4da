"""TenSEAL on hostile bytes: garbage contexts and ciphertexts, each in a child process.

Why: the agents deserialize contexts and ciphertexts from the broker in-process.
That is safe only if TenSEAL/SEAL answer any byte string with an exception and
never abort the process. This feeds random byte strings and mutated real
serializations (flipped, truncated, extended) through the library's own entry
points (`Keyring.from_bytes`, the gallery's ciphertext loader) in child
processes, and counts inputs that killed a child (abort, segfault) against those
that raised cleanly.

Run:  python benchmarks/bench_garbage.py [--contexts 1600] [--ciphertexts 2000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["main"]

#: Inputs per child process: a child that dies is restarted after the input that killed it.
_BATCH = 200


def _mutation(valid: bytes, kind: str, index: int) -> bytes:
    """Input ``index``: random bytes, or ``valid`` flipped, truncated or extended at random.

    Deterministic in (kind, index), so a child regenerates its inputs instead of
    reading gigabytes of mutated contexts from disk.
    """
    rng = np.random.default_rng([12, len(kind), index])
    variant = index % 4
    if variant == 0:
        return rng.bytes(int(rng.integers(0, 4096)))
    data = bytearray(valid)
    if variant == 1:
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 16))):
            data[position] ^= int(rng.integers(1, 256))
    elif variant == 2:
        data = data[: int(rng.integers(0, len(data)))]
    else:
        data[int(rng.integers(0, 64)) :] += rng.bytes(int(rng.integers(1, 256)))
    return bytes(data)


def _child(kind: str, folder: Path, start: int, stop: int) -> None:
    """Child mode: load inputs ``start..stop`` of ``kind``, printing each index done."""
    from cipherface.crypto import Keyring
    from cipherface.exceptions import CipherFaceError
    from cipherface.gallery.packing import _Seal

    seal = _Seal(Keyring.from_bytes((folder / "context").read_bytes(), expect="public"))
    valid = (folder / kind).read_bytes()
    for index in range(start, stop):
        data = _mutation(valid, kind, index)
        try:
            if kind == "context":
                Keyring.from_bytes(data, expect="public")
            else:
                seal.load(data)
        except (CipherFaceError, ValueError, RuntimeError, TypeError):
            pass
        print(index, flush=True)


def _run(kind: str, folder: Path, count: int) -> list[int]:
    """Indices of the inputs that killed their child process."""
    aborted, start = [], 0
    while start < count:
        stop = min(start + _BATCH, count)
        child = subprocess.run(
            [sys.executable, __file__, "--child", kind, str(folder), str(start), str(stop)],
            capture_output=True,
            text=True,
        )
        done = [int(line) for line in child.stdout.split()]
        reached = done[-1] + 1 if done else start
        if child.returncode != 0 and reached < stop:
            aborted.append(reached)
            reached += 1
        start = reached
    return aborted


def main(argv: list[str] | None = None) -> int:
    """Feed the garbage, print the counts; exit 1 if any input killed a process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=1600)
    parser.add_argument("--ciphertexts", type=int, default=2000)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, folder, start, stop = args.child
        _child(kind, Path(folder), int(start), int(stop))
        return 0
    from cipherface.crypto import Keyring
    from cipherface.gallery.packing import _Seal

    keys = Keyring.generate("n8192", relin_keys=False)
    context = keys.public_bytes(galois_keys=False)
    ciphertext = _Seal(keys).encrypt_seeded(np.linspace(0, 1, 64), 2.0**25)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        (folder / "context").write_bytes(context)
        (folder / "ciphertext").write_bytes(ciphertext)
        results = {
            kind: (count, _run(kind, folder, count))
            for kind, count in (("context", args.contexts), ("ciphertext", args.ciphertexts))
        }
    for kind, (count, aborted) in results.items():
        print(f"garbage {kind}s: {count} fed, {len(aborted)} aborted a process {aborted[:10]}")
    failed = any(aborted for _, aborted in results.values())
    print(f"verdict (no input aborts TenSEAL): {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
