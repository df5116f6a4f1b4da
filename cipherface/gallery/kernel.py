"""Many plaintext probes against one block in one pass: an exact matrix product mod q.

Why: SEAL scores a plaintext probe with ``d`` `multiply_plain` and ``d``
additions per block, so P waiting probes read the whole gallery P times. With
real scalar weights a probe's score ciphertext is ``sum_j w_j C_j`` (plus
constants), where ``w_j = round(2^25 x weight_j)`` is the constant polynomial SEAL
encodes a real scalar as, and a product by a constant polynomial scales every
coefficient alike, in NTT form and in coefficient form. At the lowest level a
column is two arrays of ``N`` coefficients modulo one prime ``q``, so for P
probes and a block of ``d`` columns the scores are ``W (P x d) @ C (d x 2N) mod
q``: one pass over the block for all P probes (on BLAS when P is large, in a
compiled loop that reads the block once when it is small; see `ModularProduct`).

Exactness: coefficients (< 2^60) are split into limbs, four of 16 bits (the
planes' words, read as they lie by the compiled loop) or three of 20 bits (cut
from them for BLAS: three products instead of four); a limb product summed over
a group of columns stays below 2^53, so float64 arithmetic is exact, in any
order of summation. Limbs recombine as ``S0 + 2^b (S1 + 2^b (S2 + ...)) mod q``
with ``2^60 mod q`` small (SEAL's 60-bit primes sit just below 2^60). The result
is the very residue SEAL computes: tests compare it bit for bit.

The cloud keeps each block's coefficients resident as 16-bit limb planes
(`limb_planes`) and nothing else: the same eight bytes per coefficient as a SEAL
ciphertext, so holding both doubled a worker's memory (2.6 GB instead of 1.1 GB
per million 128-d templates). The paths SEAL must still compute (edge probes,
ciphertext x ciphertext; batched 1:1, slot-wise plaintexts) rebuild a block's
ciphertexts from its planes for one request (`coefficients_of`, then `Writer`):
the very ciphertexts received, bit for bit. Planes hold columns in coefficient
form (SEAL transforms each column once, when its block is installed), so a sum is
a score ciphertext in coefficient form: what `cipherface.gallery.compact` rounds
for the wire, with no transform per probe.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

import numba
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
#: every 16-bit limb product sum below 2^53: exact in float64.
_GROUP_WEIGHT = float(2 ** (53 - _LIMB_BITS))
#: The BLAS path's limbs: 20 bits, so a group's weights must sum below 2^33. A probe
#: the engine accepts stays below that over any 128 columns (weights are values x
#: 2^25, squared norm at most `MAX_SQUARED_NORM`; a unit probe sums below 2^29).
_WIDE_BITS = 20
_WIDE_LIMBS = _PRIME_BITS // _WIDE_BITS
_WIDE_GROUP_WEIGHT = float(2 ** (53 - _WIDE_BITS))


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
    return _last_words(seal.dump(ciphertext), shape[0] * shape[1]).reshape(shape)


def plain_coefficients(seal: Any, plain: Any) -> np.ndarray:
    """A plaintext's NTT-form coefficients (one prime), from its serialization.

    Reading them one by one through TenSEAL took 60 ms per 32-probe pass.
    """
    return _last_words(seal.dump(plain), plain.coeff_count())


def _last_words(serialized: bytes, count: int) -> np.ndarray:
    body = _payload(serialized)
    words = np.frombuffer(body, dtype="<u8", count=count, offset=len(body) - 8 * count)
    return words.astype(np.uint64)


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
    """``W @ C mod q`` for int64 weights and uint64 coefficients below one prime ``q``.

    Two exact kernels, chosen by the number of probes: a few probes (one is the
    usual live search) are memory-bound, so `_fused` reads the 16-bit planes once
    into float64 sums that stay in cache, with no float64 copy of the block; many probes
    are compute-bound, so BLAS forms each limb's sums and `_recombine` reduces
    them in one pass instead of a dozen numpy passes over int64 arrays.
    """

    def __init__(self, modulus: int) -> None:
        self.modulus = modulus
        self._wrap = (1 << _PRIME_BITS) % modulus
        # Reductions subtract q once: sums stay below 2q only for q close to 2^60.
        if self._wrap >= 1 << 36 or modulus >= 1 << _PRIME_BITS or sys.byteorder != "little":
            raise ConfigError("the lowest CKKS prime must lie just below 2^60 for the kernel")
        self._q = np.uint64(modulus)

    def warm(self) -> None:
        """Compile (or load from numba's cache) both kernels now, not on a live probe.

        A first call costs 0.15 s from the cache and a few seconds on a fresh install.
        """
        planes = limb_planes(np.zeros((2, 1, 8), dtype=np.uint64))[0]
        for probes in (1, _FUSED_PROBES + 1):
            self(np.ones((probes, 2), dtype=np.int64), planes)

    @staticmethod
    def _groups(weights: np.ndarray, bound: float) -> list[slice]:
        """Column ranges in which every probe's absolute weight sum stays below ``bound``."""
        magnitude = np.abs(weights).astype(np.float64)
        if magnitude.max(initial=0.0) >= bound:
            raise ConfigError("a probe weight is too large for the exact kernel")
        running = np.cumsum(magnitude, axis=1)
        groups, start = [], 0
        while start < weights.shape[1]:
            base = running[:, start - 1 : start] if start else 0.0
            over = ((running[:, start:] - base) >= bound).any(axis=0)
            stop = start + int(np.argmax(over)) if over.any() else weights.shape[1]
            groups.append(slice(start, stop))
            start = stop
        return groups

    def __call__(self, weights: np.ndarray, planes: np.ndarray) -> np.ndarray:
        """``weights`` (P, d) int64 times coefficients given as `limb_planes` (4, d, n): (P, n)."""
        count, degree = weights.shape[0], planes.shape[2]
        modulus, wrap = np.int64(self.modulus), np.int64(self._wrap)
        # A weight too large for 20-bit limbs (none the engine accepts: see
        # `_WIDE_GROUP_WEIGHT`) is still exact in the 16-bit loop.
        fused = count <= _FUSED_PROBES or np.abs(weights).max(initial=0) >= _WIDE_GROUP_WEIGHT
        out: np.ndarray | None = None
        for group in self._groups(weights, _GROUP_WEIGHT if fused else _WIDE_GROUP_WEIGHT):
            w = np.ascontiguousarray(weights[:, group], dtype=np.float64)
            part = np.empty((count, degree), dtype=np.int64)
            if fused:
                _fused(w, np.ascontiguousarray(planes[:, group]), modulus, wrap, part)
            else:
                self._wide(w, planes[:, group], part)
            residues = part.view(np.uint64)
            if out is None:
                out = residues
            else:
                out += residues
                np.subtract(out, self._q, out=out, where=out >= self._q)
        assert out is not None
        return out

    def _wide(self, weights: np.ndarray, planes: np.ndarray, out: np.ndarray) -> None:
        """The BLAS path: per chunk of positions, three 20-bit limbs, three products.

        Cutting the limbs (one compiled pass over the chunk's 16-bit words) replaced
        four numpy conversions to float64, and a limb fewer means a quarter fewer
        products and reductions: 6.5 ms instead of 8.3 for one component of a
        128-d block and 32 probes, one core, the block in cache.
        """
        count, columns, degree = weights.shape[0], planes.shape[1], planes.shape[2]
        modulus, wrap = np.int64(self.modulus), np.int64(self._wrap)
        limbs = np.empty((_WIDE_LIMBS, columns, _CHUNK))
        sums = np.empty((_WIDE_LIMBS, count, _CHUNK))
        for start in range(0, degree, _CHUNK):
            width = min(_CHUNK, degree - start)
            _wide_limbs(planes, start, width, limbs)
            for limb in range(_WIDE_LIMBS):
                np.matmul(weights, limbs[limb, :, :width], out=sums[limb, :, :width])
            _recombine(sums[:, :, :width], modulus, wrap, _WIDE_BITS, out, start)


#: Up to this many probes the fused loop is faster (measured at 128-d, one core,
#: blocks out of cache, ms per component of a block: 1.2 against 3.3 for one probe,
#: 3.6 against 4.4 at four, 5.5 against 4.7 at six; at 32 probes the BLAS path, cut
#: into 20-bit limbs, took 8.7 ms).
_FUSED_PROBES = 4
#: Coefficient positions per BLAS call: its operands and the three limbs' sums
#: stay in cache (512, 1,024 and 4,096 were slower).
_CHUNK = 2048
#: The fused loop reads whole plane rows (16 KB at N=8192) front to back: with
#: 512-position windows it touched 512 rows a window and ran at half the speed.
_FUSED_WIDTH = 8192


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _reduced(total: int, limb: float, modulus: int, wrap: int, bits: int) -> int:
    """``(total * 2^bits + limb) mod q`` for ``0 <= total < q`` and an exact limb sum.

    ``|limb| < 2^53 < q`` (the column groups see to it), so one addition of q makes
    it a residue. ``total * 2^bits`` (16 or 20 bits): its top ``bits`` bits wrap to
    ``2^60 mod q`` (below 2^36), so ``rest << bits`` (< 2^60) plus ``top * wrap``
    (< 2^56) stays under 2q, in int64.
    """
    value = np.int64(limb)
    if value < 0:
        value += modulus
    low = _PRIME_BITS - bits
    shifted = ((total & ((np.int64(1) << low) - 1)) << bits) + (total >> low) * wrap
    if shifted >= modulus:
        shifted -= modulus
    total = shifted + value
    if total >= modulus:
        total -= modulus
    return total


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _recombine(
    sums: np.ndarray, modulus: int, wrap: int, bits: int, out: np.ndarray, offset: int
) -> None:
    """``out[p, offset + k] = sum_l 2^(bits l) sums[l, p, k] mod q``: exact limb sums
    to a residue. The offset, not a column slice of ``out``: numba's loop writing a
    slice (strided rows) took 5x as long."""
    for p in range(sums.shape[1]):
        for k in range(sums.shape[2]):
            total = np.int64(0)
            for limb in range(sums.shape[0] - 1, -1, -1):
                total = _reduced(total, sums[limb, p, k], modulus, wrap, bits)
            out[p, offset + k] = total


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _wide_limbs(planes: np.ndarray, start: int, width: int, out: np.ndarray) -> None:
    """Positions ``start`` to ``start + width`` of (4, d, N) 16-bit planes as three
    20-bit limbs in float64, ``out`` (3, d, >= width): bits 0-19, 20-39 and 40-59."""
    for j in range(planes.shape[1]):
        w0, w1, w2, w3 = planes[0, j], planes[1, j], planes[2, j], planes[3, j]
        for k in range(width):
            a, b = np.uint32(w0[start + k]), np.uint32(w1[start + k])
            c, e = np.uint32(w2[start + k]), np.uint32(w3[start + k])
            out[0, j, k] = a | ((b & np.uint32(0xF)) << np.uint32(16))
            out[1, j, k] = (b >> np.uint32(4)) | ((c & np.uint32(0xFF)) << np.uint32(12))
            out[2, j, k] = (c >> np.uint32(8)) | (e << np.uint32(8))


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"contract", "reassoc"})
def _fused(
    weights: np.ndarray, planes: np.ndarray, modulus: int, wrap: int, out: np.ndarray
) -> None:
    """`ModularProduct` for a few probes: each plane row is read once, as uint16.

    Every partial sum is an integer below ``sum |w| * 2^16 < 2^53`` in magnitude,
    so float64 adds it exactly, in any order.
    """
    count, columns = weights.shape
    degree = planes.shape[2]
    sums = np.empty((_LIMBS, count, _FUSED_WIDTH))
    for start in range(0, degree, _FUSED_WIDTH):
        width = min(_FUSED_WIDTH, degree - start)
        sums[:] = 0.0
        for limb in range(_LIMBS):
            for j in range(columns):
                row = planes[limb, j, start : start + width]
                for p in range(count):
                    weight = weights[p, j]
                    target = sums[limb, p]
                    for k in range(width):
                        target[k] += weight * row[k]
        _recombine(sums[:, :, :width], modulus, wrap, _LIMB_BITS, out, start)


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
        result[:, component] = product(weights, planes[component])
    modulus = np.uint64(product.modulus)
    first = result[:, 0]
    first += constants
    np.subtract(first, modulus, out=first, where=first >= modulus)
    return result
