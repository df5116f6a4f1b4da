"""Plaintext-probe scores in 63 bits per coefficient pair instead of 128.

Why: a score ciphertext is two polynomials of ``N`` coefficients modulo a 60-bit
prime ``q`` (131 KB at N=8192), so at a million templates every probe moved 16 MB
from the cloud to on-prem. Its value ``m = c0 + c1 s mod q`` (``s`` the ternary
secret key) needs far fewer bits than that: the score sits at scale 2^50 and is
read to ~1e-4, while on-prem adds noise of 3e-3 (`integrity.FLOOD_SIGMA`) to
every distance it releases.

How: in coefficient form each coefficient is rounded to ``k`` bits,
``v = round(c 2^k / q) mod 2^k``, and on-prem maps it back, ``c' = round(v q / 2^k)``
(a modulus switch to 2^k, as lattice schemes compress ciphertexts). Rounding ``c0``
adds an error of at most ``q / 2^(k0+1)`` to ``m``; rounding ``c1`` adds ``e1 s``, a
sum over the ``N`` coefficients of ``s``, about 21 times larger at N=8192, and in
the slots a *product* (each slot of ``e1`` times that slot of ``s``), whose tail is
heavier than a Gaussian's. So ``c1`` keeps 7 bits more than ``c0``. Measured by
``benchmarks/bench_score_bits.py`` (49,152 values, 3 keys, two runs): 62 bits as
(28, 34) give an rms error of 1.1e-4 and a largest of 6.0-6.8e-4; `SCORE_BITS`
(28, 35) gives 8.1e-5 and 3.6-3.7e-4, well under the consistency fit's tolerance
(`consistency.FIT_TOLERANCE`, 1e-3), in 64,512 bytes per ciphertext instead of
131,072 (7.93 MB per probe at a million templates).

The cloud's workers hold the gallery in coefficient form, so the kernel's sums
are already what is rounded here: compressing costs one pass over the result and
no SEAL transform. On-prem rebuilds a SEAL ciphertext from the bits (`read_scores`),
turns it to NTT form with SEAL's own transform and decrypts it as before. The
bits carry no metadata: size, scale and level come from on-prem's own template,
so a forged score can choose coefficients (as it always could), never the shape
`packing._Seal.load_checked` guards.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import numba
import numpy as np

from cipherface.exceptions import ConfigError, IntegrityError
from cipherface.gallery.kernel import Writer
from cipherface.gallery.packing import _SCORE_SCALE, _Seal

__all__ = [
    "SCORE_BITS",
    "compress",
    "compress_into",
    "compressed_size",
    "expand",
    "read_scores",
    "score_writer",
    "warm",
]

#: Bits kept of each coefficient of ``c0`` and of ``c1``.
SCORE_BITS: tuple[int, int] = (28, 35)
_WORD = 64


def compressed_size(degree: int, bits: tuple[int, int] = SCORE_BITS) -> int:
    """Bytes of a compressed two-component ciphertext of ``degree`` coefficients each.

    A pair is packed as one word of the bit stream: at most 63 bits in all.
    """
    if min(bits) < 1 or sum(bits) >= _WORD:
        raise ConfigError(f"cannot keep {bits} bits of a coefficient pair (1 each, 63 in all)")
    return -(-degree * sum(bits) // 8)


def compress(coefficients: np.ndarray, modulus: int, bits: tuple[int, int] = SCORE_BITS) -> bytes:
    """A (2, N) array of residues mod ``modulus`` in coefficient form, rounded to ``bits``."""
    return _packed(coefficients, modulus, bits).tobytes()


def compress_into(
    coefficients: np.ndarray, modulus: int, out: np.ndarray, bits: tuple[int, int] = SCORE_BITS
) -> None:
    """`compress`, written into ``out`` (uint8, exactly `compressed_size` long) rather
    than returned: a gallery worker's buffer shared with the replica's process."""
    out[:] = _packed(coefficients, modulus, bits)


def _packed(coefficients: np.ndarray, modulus: int, bits: tuple[int, int]) -> np.ndarray:
    c0, c1 = np.ascontiguousarray(coefficients, dtype=np.uint64)
    size = compressed_size(c0.size, bits)
    words = np.zeros(-(-size // 8), dtype="<u8")
    _pack(c0, c1, 2.0 ** bits[0] / modulus, 2.0 ** bits[1] / modulus, bits[0], bits[1], words)
    return words.view(np.uint8)[:size]


def expand(
    data: bytes, modulus: int, degree: int, bits: tuple[int, int] = SCORE_BITS
) -> np.ndarray:
    """Inverse of `compress` up to its rounding: (2, ``degree``) residues, or `IntegrityError`."""
    if len(data) != compressed_size(degree, bits):
        raise IntegrityError(
            f"compressed scores of {len(data)} bytes where {compressed_size(degree, bits)} belong"
        )
    words = np.zeros(-(-len(data) // 8), dtype="<u8")
    words.view(np.uint8)[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    out = np.empty((2, degree), dtype=np.uint64)
    _unpack(words, modulus / 2.0 ** bits[0], modulus / 2.0 ** bits[1], bits[0], bits[1], out)
    return out


def warm() -> None:
    """Compile (or load from numba's cache) both loops now, not on a live probe."""
    zeros = np.zeros((2, 8), dtype=np.uint64)
    expand(compress(zeros, 1 << 60), 1 << 60, 8)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _pack(
    c0: np.ndarray,
    c1: np.ndarray,
    to0: float,
    to1: float,
    bits0: int,
    bits1: int,
    out: np.ndarray,
) -> None:
    """Round each pair to ``bits0 + bits1`` bits and append it to the bit stream ``out``."""
    mask0 = (np.uint64(1) << np.uint64(bits0)) - np.uint64(1)
    mask1 = (np.uint64(1) << np.uint64(bits1)) - np.uint64(1)
    shift = np.uint64(bits0)
    width = np.uint64(bits0 + bits1)
    acc = np.uint64(0)
    filled = np.uint64(0)
    word = 0
    for i in range(c0.size):
        v0 = np.uint64(math.floor(c0[i] * to0 + 0.5)) & mask0  # 2^k wraps to 0, as q does
        v1 = np.uint64(math.floor(c1[i] * to1 + 0.5)) & mask1
        value = v0 | (v1 << shift)
        acc |= value << filled
        filled += width
        if filled >= np.uint64(_WORD):
            out[word] = acc
            word += 1
            filled -= np.uint64(_WORD)
            acc = value >> (width - filled) if filled else np.uint64(0)
    if filled:
        out[word] = acc


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _unpack(
    words: np.ndarray, from0: float, from1: float, bits0: int, bits1: int, out: np.ndarray
) -> None:
    """Read ``out.shape[1]`` pairs from the bit stream ``words``, mapped back mod q."""
    width = bits0 + bits1
    mask = (np.uint64(1) << np.uint64(width)) - np.uint64(1)
    mask0 = (np.uint64(1) << np.uint64(bits0)) - np.uint64(1)
    bit = 0
    for i in range(out.shape[1]):
        index, offset = bit >> 6, bit & (_WORD - 1)
        value = words[index] >> np.uint64(offset)
        if offset + width > _WORD:
            value |= words[index + 1] << np.uint64(_WORD - offset)
        value &= mask
        # Below q: (2^k - 1) q / 2^k + 1/2 stays under q for any k <= 60.
        out[0, i] = np.uint64(math.floor((value & mask0) * from0 + 0.5))
        out[1, i] = np.uint64(math.floor((value >> np.uint64(bits0)) * from1 + 0.5))
        bit += width


def score_writer(seal: _Seal) -> Writer:
    """Serializes (2, N) coefficients as a score ciphertext in *coefficient* form: two
    components at the lowest level and scale 2^50, as the protocol makes them."""
    template = seal.load(seal.encrypt_public(0.0, _SCORE_SCALE))
    seal.evaluator.transform_from_ntt_inplace(template)
    return Writer(seal, template)


class ScoreReader:
    """On-prem: compressed scores back into SEAL ciphertexts ready to decrypt."""

    def __init__(self, seal: _Seal) -> None:
        self.modulus = int(seal.context.last_context_data().parms().coeff_modulus()[0].value())
        self._writer = score_writer(seal)
        self._degree = 2 * seal.slots
        warm()

    def __call__(self, seal: _Seal, data: bytes, bits: tuple[int, ...]) -> Any:
        if tuple(bits) != SCORE_BITS:
            raise IntegrityError(f"scores compressed to {bits} bits; on-prem reads {SCORE_BITS}")
        ciphertext = seal.load(self._writer(expand(data, self.modulus, self._degree)))
        seal.evaluator.transform_to_ntt_inplace(ciphertext)
        return ciphertext


#: Readers live as long as their `_Seal` (a keyring's), and never keep it alive.
_READERS: weakref.WeakKeyDictionary[_Seal, ScoreReader] = weakref.WeakKeyDictionary()


def read_scores(seal: _Seal, data: bytes, bits: tuple[int, ...]) -> Any:
    """Compressed scores as a SEAL ciphertext under ``seal`` (NTT form), or `IntegrityError`."""
    held = _READERS.get(seal)
    if held is None:
        held = _READERS[seal] = ScoreReader(seal)
    return held(seal, data, bits)
