"""Compressed scores (`cipherface.gallery.compact`) against exact integer rounding."""

from __future__ import annotations

import numpy as np
import pytest

from cipherface.exceptions import ConfigError, IntegrityError
from cipherface.gallery.compact import SCORE_BITS, compress, compressed_size, expand

#: SEAL's lowest 60-bit prime at n8192 (2^60 - 98303).
PRIME = 1152921504606748673
#: float64 rounding may land a few units off the exact integer rounding: far below a step.
SLACK = 1 << 8


def _exact(value: int, bits: int) -> int:
    """``round(round(c 2^k / q) q / 2^k)`` in Python integers (the modulus switch and back)."""
    switched = ((value << bits) + PRIME // 2) // PRIME % (1 << bits)
    return (switched * PRIME + (1 << (bits - 1))) >> bits


def _centred(residue: int) -> int:
    """``residue`` mod q in [-q/2, q/2): 0 and q - 1 are one apart."""
    return (residue + PRIME // 2) % PRIME - PRIME // 2


@pytest.mark.parametrize("bits", [SCORE_BITS, (1, 62), (31, 32), (20, 20)])
def test_round_trip_is_the_modulus_switch_within_a_few_units(bits: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(bits))
    values = rng.integers(0, PRIME, size=(2, 4096), dtype=np.uint64)
    values[:, :4] = [[0, 1, PRIME - 1, PRIME // 2]] * 2  # the edges of the range
    data = compress(values, PRIME, bits)
    assert len(data) == compressed_size(4096, bits) == 4096 * sum(bits) // 8
    back = expand(data, PRIME, 4096, bits)
    assert back.dtype == np.uint64 and int(back.max()) < PRIME
    for row, width in enumerate(bits):
        for got, value in zip(back[row].tolist(), values[row].tolist(), strict=True):
            assert abs(_centred(got - _exact(value, width))) <= SLACK
            assert abs(_centred(got - value)) <= PRIME / 2 ** (width + 1) + SLACK


def test_an_odd_bit_count_packs_across_words() -> None:
    """An odd number of coefficients of 63 bits: the stream ends mid-word."""
    values = np.random.default_rng(1).integers(0, PRIME, size=(2, 7), dtype=np.uint64)
    data = compress(values, PRIME, SCORE_BITS)
    assert len(data) == -(-7 * 63 // 8)
    assert np.array_equal(compress(expand(data, PRIME, 7), PRIME), data)  # on the grid: fixed


@pytest.mark.parametrize("bits", [(32, 32), (0, 35), (40, 30)])
def test_splits_that_do_not_fit_one_word_are_refused(bits: tuple[int, int]) -> None:
    with pytest.raises(ConfigError, match="cannot keep"):
        compress(np.zeros((2, 8), dtype=np.uint64), PRIME, bits)


@pytest.mark.parametrize("change", [-1, 1, -compressed_size(8192)])
def test_data_of_another_length_is_refused(change: int) -> None:
    data = compress(np.zeros((2, 8192), dtype=np.uint64), PRIME)
    wrong = data[:change] if change < 0 else data + b"\x00" * change
    with pytest.raises(IntegrityError, match="compressed scores of"):
        expand(wrong, PRIME, 8192)
