"""Many plaintext probes against one block in one pass: an exact matrix product mod q.

Why: SEAL scores a plaintext probe with ``d`` `multiply_plain` and ``d``
additions per block, so P waiting probes read the whole gallery P times. With
real scalar weights a probe's score ciphertext is ``sum_j w_j C_j`` (plus
constants), where ``w_j = round(2^25 x weight_j)`` is the constant polynomial SEAL
encodes a real scalar as, and in NTT form a product by a constant polynomial
is a coefficient-wise product. At the lowest level a column is two arrays of
``N`` coefficients modulo one prime ``q``, so for P probes and a block of ``d``
columns the scores are ``W (P x d) @ C (d x 2N) mod q``: one pass over the
block for all P probes, on BLAS.

Exactness: coefficients (< 2^60) are split into four 16-bit limbs; a limb
product summed over a group of columns stays below 2^53, so float64 BLAS is
exact. Limbs recombine as ``S0 + 2^16 (S1 + 2^16 (S2 + 2^16 S3)) mod q`` with
``2^60 mod q`` small (SEAL's 60-bit primes sit just below 2^60). The result is
the very residue SEAL computes: tests compare it bit for bit.

The cloud keeps each block's coefficients resident as 16-bit limb planes
(`limb_planes`) and nothing else: the same eight bytes per coefficient as a SEAL
ciphertext, so holding both doubled a worker's memory (2.6 GB instead of 1.1 GB
per million 128-d templates). The paths SEAL must still compute (edge probes,
ciphertext x ciphertext; batched 1:1, slot-wise plaintexts) rebuild a block's
ciphertexts from its planes for one request (`coefficients_of`, then `Writer`):
the very ciphertexts received, bit for bit. Results are written as SEAL
serializations (`Writer`) that on-prem loads and checks as before.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

import numpy as np
import zstandard

from cipherface.exceptions import ConfigError

__all__: list[str] = []

#: Coefficients are read as four 16-bit words: a little-endian uint16 view is the
#: limb split, with no shifting or masking.
_LIMB_BITS = 16
_LIMBS = 4
_PRIME_BITS = 60
#: A group of columns whose weights' absolute sum (per probe) stays below this keeps
#: every limb product sum below 2^53: exact in float64.
_GROUP_WEIGHT = float(2 ** (53 - _LIMB_BITS))
#: Below this instead (unit-vector probes are), limb sums stay below 2^46 and two
#: limbs combine exactly in int64 (below 2^62): fewer reductions mod q.
_PAIRED_WEIGHT = float(2**30)


#: SEAL's serialization header: magic, header size, version, compression mode,
#: reserved, then the total size (little endian) at byte 8.
_HEADER = 16
_COMPRESSION_BYTE = 5
_NO_COMPRESSION = 0
_ZLIB = 1
_ZSTD = 2
#: Decompressed payloads are at most this large (a three-component score at N=32768).
_MAX_PAYLOAD = 1 << 24


def _payload(data: bytes) -> bytes:
    """A SEAL serialization's member bytes, decompressed as its header says."""
    mode = data[_COMPRESSION_BYTE]
    if mode == _NO_COMPRESSION:
        return data[_HEADER:]
    if mode == _ZLIB:
        return zlib.decompress(data[_HEADER:], bufsize=_MAX_PAYLOAD)
    if mode == _ZSTD:
        return zstandard.ZstdDecompressor().decompress(data[_HEADER:], max_output_size=_MAX_PAYLOAD)
    raise ConfigError(f"SEAL serialization of unknown compression mode {mode}")


def coefficients(seal: Any, ciphertext: Any) -> np.ndarray:
    """A ciphertext's coefficients (one prime) as a (size, N) uint64 array.

    TenSEAL exposes no buffer, so they come out of SEAL's own serialization, whose
    last ``size x N`` words are the coefficients (tests check the round trip).
    """
    shape = (ciphertext.size(), ciphertext.poly_modulus_degree())
    body = _payload(seal.dump(ciphertext))
    count = shape[0] * shape[1]
    words = np.frombuffer(body, dtype="<u8", count=count, offset=len(body) - 8 * count)
    return words.astype(np.uint64).reshape(shape)


def plain_coefficients(plain: Any) -> np.ndarray:
    """A plaintext's NTT-form coefficients (one prime); TenSEAL reads them one by one."""
    return np.array([plain.data(i) for i in range(plain.coeff_count())], dtype=np.uint64)


class Writer:
    """Serializes coefficient arrays as ciphertexts shaped like ``template`` (uncompressed).

    The members before the coefficients (parameters id, NTT flag, size, scale) are
    the template's, so what SEAL loads is the template with new coefficients.
    """

    def __init__(self, seal: Any, template: Any) -> None:
        body = _payload(seal.dump(template))
        count = template.size() * template.poly_modulus_degree()
        self._prefix = body[: len(body) - 8 * count]
        self._count = count
        self._header = bytearray(seal.dump(template)[:_HEADER])
        self._header[_COMPRESSION_BYTE] = _NO_COMPRESSION
        self._header[8:16] = (_HEADER + len(body)).to_bytes(8, "little")

    def __call__(self, values: np.ndarray) -> bytes:
        if values.size != self._count:
            raise ConfigError(f"{values.size} coefficients for a ciphertext of {self._count}")
        return bytes(self._header) + self._prefix + values.astype("<u8", copy=False).tobytes()


def integer_weights(weights: np.ndarray, scale: float) -> np.ndarray:
    """``round(weights * scale)`` as SEAL's encoder rounds (half away from zero), int64."""
    scaled = np.asarray(weights, dtype=np.float64) * scale
    return (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int64)


class ModularProduct:
    """``W @ C mod q`` for int64 weights and uint64 coefficients below one prime ``q``."""

    def __init__(self, modulus: int) -> None:
        self.modulus = modulus
        self._q = np.uint64(modulus)
        self._wrap = (1 << _PRIME_BITS) % modulus
        # Reductions subtract q once: sums stay below 2q only for q close to 2^60.
        if self._wrap >= 1 << 36 or modulus >= 1 << _PRIME_BITS or sys.byteorder != "little":
            raise ConfigError("the lowest CKKS prime must lie just below 2^60 for the kernel")
        self._wrap64 = np.uint64(self._wrap)
        self._signed_q = np.int64(modulus)

    def _reduce(self, values: np.ndarray) -> np.ndarray:
        """``values mod q`` for values below ``2q``: a subtraction, not a division."""
        return np.where(values >= self._q, values - self._q, values)

    def _shift(self, values: np.ndarray) -> np.ndarray:
        """``values * 2^16 mod q`` for values below q: the top bits wrap to ``2^60 mod q``."""
        low_bits = _PRIME_BITS - _LIMB_BITS
        top = values >> np.uint64(low_bits)
        rest = values & np.uint64((1 << low_bits) - 1)
        # rest * 2^16 < 2^60 and top * wrap < 2^52 (wrap < 2^36): below 2q.
        return self._reduce((rest << np.uint64(_LIMB_BITS)) + top * self._wrap64)

    def _groups(self, weights: np.ndarray) -> list[slice]:
        """Column ranges in which every probe's absolute weight sum stays below the bound."""
        magnitude = np.abs(weights).astype(np.float64)
        if magnitude.max(initial=0.0) >= _GROUP_WEIGHT:
            raise ConfigError("a probe weight is too large for the exact kernel")
        running = np.cumsum(magnitude, axis=1)
        groups, start = [], 0
        while start < weights.shape[1]:
            base = running[:, start - 1 : start] if start else 0.0
            over = ((running[:, start:] - base) >= _GROUP_WEIGHT).any(axis=0)
            stop = start + int(np.argmax(over)) if over.any() else weights.shape[1]
            groups.append(slice(start, stop))
            start = stop
        return groups

    def _residue(self, values: np.ndarray) -> np.ndarray:
        """int64 values below 2^62 in magnitude, reduced to [0, q) as uint64.

        The quotient is estimated in float64 (off by at most one), the remainder
        taken exactly in int64 and corrected by one q either way.
        """
        quotient = np.floor(values / float(self.modulus)).astype(np.int64)
        rest = values - quotient * self._signed_q
        rest = np.where(rest < 0, rest + self._signed_q, rest)
        return np.where(rest >= self._signed_q, rest - self._signed_q, rest).astype(np.uint64)

    def __call__(self, weights: np.ndarray, planes: np.ndarray) -> np.ndarray:
        """``weights`` (P, d) int64 times coefficients given as `limb_planes` (4, d, n): (P, n)."""
        out = None
        for group in self._groups(weights):
            w = weights[:, group].astype(np.float64)
            limb = [(w @ p.astype(np.float64)).astype(np.int64) for p in planes[:, group]]
            if np.abs(w).sum(axis=1).max() < _PAIRED_WEIGHT:
                low = self._residue(limb[0] + (limb[1] << 16))
                high = self._residue(limb[2] + (limb[3] << 16))
                total = self._reduce(low + self._shift(self._shift(high)))
            else:
                # |limb| < 2^53 < q: one conditional addition of q is the residue.
                residues = [(x + (x < 0) * self._signed_q).astype(np.uint64) for x in limb]
                total = residues[-1]
                for lower in reversed(residues[:-1]):
                    total = self._reduce(self._shift(total) + lower)
            out = total if out is None else self._reduce(out + total)
        assert out is not None
        return out


def limb_planes(columns: np.ndarray) -> np.ndarray:
    """(d, size, N) uint64 coefficients as (size, 4, d, N) uint16 limb planes, lowest first.

    The same eight bytes per coefficient, laid out so that every BLAS operand is
    a contiguous row of one limb: built once per block when the cloud receives it.
    """
    d, size, degree = columns.shape
    words = columns.astype("<u8", copy=False).view(np.uint16).reshape(d, size, degree, _LIMBS)
    return np.ascontiguousarray(words.transpose(1, 3, 0, 2))


def coefficients_of(planes: np.ndarray) -> np.ndarray:
    """Inverse of `limb_planes`: (size, 4, d, N) uint16 planes as (d, size, N) uint64."""
    size, _, d, degree = planes.shape
    words = np.ascontiguousarray(planes.transpose(2, 0, 3, 1))
    return words.view("<u8").reshape(d, size, degree).astype(np.uint64, copy=False)


#: Coefficient positions per BLAS call: a block's limbs for them stay in cache.
_CHUNK = 2048


def weighted_sums(
    product: ModularProduct, planes: np.ndarray, weights: np.ndarray, constants: np.ndarray
) -> np.ndarray:
    """Coefficients of ``sum_j weights[p, j] columns[j] + constants[p]`` for every probe ``p``.

    ``planes`` are a block's ciphertexts as `limb_planes`; ``constants`` (P, N) are
    NTT-form plaintext coefficients added to the first component. Returns
    (P, size, N) uint64.
    """
    size, _, _, degree = planes.shape
    result = np.empty((weights.shape[0], size, degree), dtype=np.uint64)
    for component in range(size):
        for start in range(0, degree, _CHUNK):
            window = slice(start, min(start + _CHUNK, degree))
            result[:, component, window] = product(weights, planes[component, :, :, window])
    modulus = np.uint64(product.modulus)
    first = result[:, 0] + constants
    result[:, 0] = np.where(first >= modulus, first - modulus, first)
    return result
