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
order of summation. Limbs recombine as ``sum_l 2^(b l) S_l mod q``, each limb's
bits from 2^60 up folded back as multiples of ``2^60 mod q``, which is small
(SEAL's 60-bit primes sit just below 2^60). The result is the very residue SEAL
computes: tests compare it bit for bit.

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
    are compute-bound, so one BLAS product forms every limb's sums and
    `_recombine_wide` reduces them in one compiled pass.
    """

    def __init__(self, modulus: int) -> None:
        self.modulus = modulus
        self._wrap = (1 << _PRIME_BITS) % modulus
        # `_folded` folds each limb's high bits back as multiples of 2^60 mod q:
        # int64 holds them only for q within 2^20 of 2^60 (SEAL's 60-bit primes are).
        if self._wrap >= _MAX_WRAP or modulus >= 1 << _PRIME_BITS or sys.byteorder != "little":
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
        """The BLAS path: per chunk of positions, three 20-bit limbs side by side, one product.

        One compiled pass cuts the chunk's 16-bit words into the three limbs, laid
        out as one (d, 3 x chunk) operand, so BLAS runs one product of three times
        the width instead of three: 9.3 ms instead of 13.2 for one component of a
        128-d block and 32 probes on the AMD host of the README, one core, with
        `_recombine_wide`'s fold (1.0 ms where a loop limb by limb took 3.2).
        """
        count, columns, degree = weights.shape[0], planes.shape[1], planes.shape[2]
        modulus, wrap = np.int64(self.modulus), np.int64(self._wrap)
        limbs = np.empty((columns, _WIDE_LIMBS * _CHUNK))
        sums = np.empty((count, _WIDE_LIMBS * _CHUNK))
        for start in range(0, degree, _CHUNK):
            width = min(_CHUNK, degree - start)
            span = _WIDE_LIMBS * width
            _wide_limbs(planes, start, width, limbs)
            np.matmul(weights, limbs[:, :span], out=sums[:, :span])
            _recombine_wide(sums[:, :span], modulus, wrap, out, start)


#: Up to this many probes the fused loop is faster (measured at 128-d, one core,
#: blocks out of cache, ms per component of a block, fused against BLAS, on the AMD
#: host of the README: 2.8 against 6.4 at four probes, 5.4 against 6.4 at eight,
#: 6.6 against 6.7 at ten, 7.7 against 6.0 at twelve).
_FUSED_PROBES = 8
#: Coefficient positions per BLAS call (1,024 to 2,048 were fastest; 512 and 4,096
#: slower, on both hosts of the README).
_CHUNK = 2048
#: The fused loop reads whole plane rows (16 KB at N=8192) front to back: with
#: 512-position windows it touched 512 rows a window and ran at half the speed.
_FUSED_WIDTH = 8192
#: Columns the fused loop adds into its sums at once: each sum is then read and
#: written once per four rows (0.75 ms instead of 1.13 per component of a 128-d
#: block, one probe, blocks out of cache, with `_recombine_fused`).
_FUSED_UNROLL = 4
#: `_folded` needs ``2^60 mod q`` below this (see there).
_MAX_WRAP = 1 << 20


@numba.njit(inline="always")
def _folded(row: np.ndarray, width: int, k: int, limbs: int, bits: int, wrap: int) -> int:
    """``sum_l 2^(bits l) S_l`` for position ``k``, congruent mod q, within int64.

    ``row`` holds the limbs' exact sums side by side (``S_l = row[l width + k]``),
    each an integer below 2^53 in magnitude. The bits of ``S_l 2^(bits l)`` from
    2^60 up are worth multiples of 2^60, which is ``wrap`` mod q, so each term folds
    to ``(S_l >> (60 - bits l)) wrap + low_l 2^(bits l)``, with ``low_l 2^(bits l)
    < 2^60``. Inlined into each caller, whose constant ``limbs`` and ``bits`` unroll
    the loop.
    """
    total = np.int64(row[k])
    for limb in range(1, limbs):
        value = np.int64(row[limb * width + k])
        low = _PRIME_BITS - bits * limb
        total += (value >> low) * wrap + ((value & ((np.int64(1) << low) - 1)) << (bits * limb))
    return total


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _recombine_wide(
    sums: np.ndarray, modulus: int, wrap: int, out: np.ndarray, offset: int
) -> None:
    """``out[p, offset + k]``: the residue of three 20-bit limbs' sums (`_folded`).

    The folded high parts stay below ``(2^33 + 2^13) wrap < 2^54``, so the total
    lies in ``(-2^54, 2^61 + 2^54)``: within one q below zero and two above, for
    ``q > 2^60 - 2^20``. Three branch-free corrections, no quotient: 1.0 ms for 32
    probes and a component where a quotient in float64 took 1.6 and a loop over
    runtime limb counts 3.9. The offset, not a column slice of ``out``: numba's loop
    writing a slice (strided rows) took 5x as long.
    """
    width = sums.shape[1] // _WIDE_LIMBS
    for p in range(sums.shape[0]):
        row = sums[p]
        for k in range(width):
            total = _folded(row, width, k, _WIDE_LIMBS, _WIDE_BITS, wrap)
            if total < 0:
                total += modulus
            if total >= modulus:
                total -= modulus
            if total >= modulus:
                total -= modulus
            out[p, offset + k] = total


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _recombine_fused(
    sums: np.ndarray, modulus: int, wrap: int, out: np.ndarray, offset: int
) -> None:
    """``out[p, offset + k]``: the residue of four 16-bit limbs' sums (`_folded`).

    The top limb's high part reaches 2^41 x wrap, so the total spans several
    multiples of q, up to 2^62.3: a quotient estimated in float64 (one off at most,
    either way, next to a multiple) and one correction make it a residue.
    """
    width = sums.shape[1] // _LIMBS
    inverse = 1.0 / modulus
    for p in range(sums.shape[0]):
        row = sums[p]
        for k in range(width):
            total = _folded(row, width, k, _LIMBS, _LIMB_BITS, wrap)
            total -= np.int64(np.floor(total * inverse)) * modulus
            if total < 0:
                total += modulus
            elif total >= modulus:
                total -= modulus
            out[p, offset + k] = total


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _wide_limbs(planes: np.ndarray, start: int, width: int, out: np.ndarray) -> None:
    """Positions ``start`` to ``start + width`` of (4, d, N) 16-bit planes as three
    20-bit limbs in float64, side by side: ``out[j, l width + k]`` holds bits
    ``20 l`` to ``20 l + 19`` of column ``j``'s coefficient ``start + k``."""
    for j in range(planes.shape[1]):
        w0, w1, w2, w3 = planes[0, j], planes[1, j], planes[2, j], planes[3, j]
        row = out[j]
        for k in range(width):
            a, b = np.uint32(w0[start + k]), np.uint32(w1[start + k])
            c, e = np.uint32(w2[start + k]), np.uint32(w3[start + k])
            row[k] = a | ((b & np.uint32(0xF)) << np.uint32(16))
            row[width + k] = (b >> np.uint32(4)) | ((c & np.uint32(0xFF)) << np.uint32(12))
            row[2 * width + k] = (c >> np.uint32(8)) | (e << np.uint32(8))


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
    unrolled = columns - columns % _FUSED_UNROLL
    sums = np.empty((count, _LIMBS * _FUSED_WIDTH))
    for start in range(0, degree, _FUSED_WIDTH):
        width = min(_FUSED_WIDTH, degree - start)
        stop = start + width
        sums[:] = 0.0
        for limb in range(_LIMBS):
            for j in range(0, unrolled, _FUSED_UNROLL):
                r0, r1 = planes[limb, j, start:stop], planes[limb, j + 1, start:stop]
                r2, r3 = planes[limb, j + 2, start:stop], planes[limb, j + 3, start:stop]
                for p in range(count):
                    a, b = weights[p, j], weights[p, j + 1]
                    c, e = weights[p, j + 2], weights[p, j + 3]
                    target = sums[p, limb * width : (limb + 1) * width]
                    for k in range(width):
                        target[k] += a * r0[k] + b * r1[k] + c * r2[k] + e * r3[k]
            for j in range(unrolled, columns):
                row = planes[limb, j, start:stop]
                for p in range(count):
                    weight = weights[p, j]
                    target = sums[p, limb * width : (limb + 1) * width]
                    for k in range(width):
                        target[k] += weight * row[k]
        _recombine_fused(sums[:, : _LIMBS * width], modulus, wrap, out, start)


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
