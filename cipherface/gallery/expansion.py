"""Packed edge probes: a whole probe in one ciphertext, which the cloud expands.

Why: the column layout (`packing.encrypt_probe`) is one public-key ciphertext per
dimension, the weight ``w_j`` in every slot: 131 KB each, 16.8 MB at 128-d, and
public-key ciphertexts cannot be seeded. Here the edge encrypts the weights as the
*coefficients* of one plaintext polynomial, ``sum_j (w_j / 2^L) X^j`` with
``2^L >= d``: one ciphertext of about 235 KB at n8192 for any ``d`` up to N. The
cloud turns it back into exactly the columns the gallery multiplies, by oblivious
expansion (Angel, Chen, Laine and Setty, "PIR with compressed queries", S&P 2018):
at level ``l`` every ciphertext ``c`` splits into ``c + tau(c)`` (the coefficients
at even multiples of ``2^l``, doubled) and ``X^-(2^l) (c - tau(c))`` (the odd ones,
doubled and shifted down), with ``tau: X -> X^(N/2^l + 1)``. After ``L`` levels
ciphertext ``j`` holds ``w_j`` alone, as a constant polynomial: ``w_j`` in every
slot, a column of `packing`'s layout. The ``2^L - 1`` automorphisms are SEAL's
(`Evaluator.apply_galois`); the monomials are exact CKKS plaintexts at scale 1.

Noise: the edge encrypts one level above the gallery's, at scale ``2^25 q`` for the
prime ``q`` a rescale drops, so the expansion's key-switching noise is divided by
``q`` and the columns land at the lowest level at scale ``2^25`` exactly, as the
column layout's do; their error is that of fresh columns (tests pin both).

Trade-off, printed by ``benchmarks/bench_search.py``: the cloud needs ``L`` more
Galois keys (seeded, about 0.36 MB each at n8192: 2.6 MB at 128-d, beside the
conjugation key `cipherface.gallery.integrity` uses), which on-prem ships in the
context update when they fit its message cap, and ``2^L - 1`` automorphisms per
probe. Trust is unchanged: the expanded columns are a column-layout probe like any
other, and the cloud proves their norms from them (`integrity.prove_probe`). A
forger controls every coefficient, so an expanded column can differ between slots;
on-prem's per-slot checks hold for any column, as they do for forged columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tenseal.sealapi as sealapi

from cipherface.crypto import Keyring, Metric
from cipherface.exceptions import CiphertextError, ConfigError, SecretKeyError
from cipherface.gallery.integrity import conjugation_element, galois_keys
from cipherface.gallery.packing import _VALUE_SCALE, _edge_weights, _Seal
from cipherface.wire.payloads import EncryptedProbe

__all__ = [
    "edge_keys",
    "encrypt_packed_probe",
    "expand_probe",
    "expansion_elements",
    "pack_weights",
]

#: SEAL's generator of the slots' roots: slot ``i`` evaluates at ``zeta^(3^i)``.
_SLOT_GENERATOR = 3


def _levels(dimensions: int) -> int:
    return max(dimensions - 1, 0).bit_length()


def expansion_elements(keyring: Keyring, dimensions: int) -> list[int]:
    """The Galois elements ``N/2^l + 1`` that expanding a ``dimensions``-d probe applies."""
    degree = 2 * keyring.slots
    if dimensions > degree:
        raise ConfigError(f"a packed probe holds at most {degree} dimensions, not {dimensions}")
    return [degree // 2**level + 1 for level in range(_levels(dimensions))]


def edge_keys(keyring: Keyring, dimensions: int) -> bytes:
    """On-prem: the Galois keys replicas need for edge probes of ``dimensions``:
    complex conjugation (norm proofs) and the expansion's automorphisms (seeded)."""
    if not keyring.is_private:
        raise SecretKeyError("Galois keys are made on-prem, with the secret key")
    seal = _Seal(keyring)
    generator = sealapi.KeyGenerator(seal.context, keyring.context.secret_key().data)
    elements = [conjugation_element(seal), *expansion_elements(keyring, dimensions)]
    return seal.dump(generator.create_galois_keys(elements))


def _above(seal: _Seal) -> Any:
    """The modulus level one above the gallery's: a packed probe is encrypted there."""
    return seal.context.last_context_data().prev_context_data()


def _packed_scale(seal: _Seal) -> float:
    # The expansion multiplies the weights by 2^L (undone by encoding them over 2^L);
    # the rescale into the gallery's level divides the scale by the prime it drops.
    return _VALUE_SCALE * float(_above(seal).parms().coeff_modulus()[-1].value())


def _slot_powers(seal: _Seal, exponents: np.ndarray) -> np.ndarray:
    """``X^e`` at every slot's root, for each exponent: a slots x exponents matrix."""
    degree = 2 * seal.slots
    roots = np.array([pow(_SLOT_GENERATOR, i, 2 * degree) for i in range(seal.slots)])
    angles = np.outer(roots, exponents) % (2 * degree)
    return np.exp(1j * np.pi * angles / degree)


def encrypt_packed_probe(keyring: Keyring, embedding: np.ndarray, metric: Metric) -> EncryptedProbe:
    """Encrypt a probe at the edge in one ciphertext (public context suffices).

    The cloud can expand it only if on-prem shipped the expansion keys (`edge_keys`);
    a replica without them answers with an error event.
    """
    seal, weights, norm = _edge_weights(keyring, embedding, metric)
    levels = len(expansion_elements(keyring, weights.size))
    return EncryptedProbe(
        fingerprint=keyring.fingerprint,
        metric=metric.value,
        dimensions=int(weights.size),
        columns=(),
        norm=norm,
        packed=pack_weights(seal, weights * 2.0**-levels),
    )


def pack_weights(seal: _Seal, coefficients: np.ndarray) -> bytes:
    """A public-key encryption of ``sum_k coefficients[k] X^k`` (at most N of them) as
    a packed probe: already divided by ``2^L``, as `encrypt_packed_probe` does."""
    slots = _slot_powers(seal, np.arange(coefficients.size)) @ coefficients
    plain = sealapi.Plaintext()
    seal.encoder.encode(slots.tolist(), _above(seal).parms_id(), _packed_scale(seal), plain)
    ciphertext = sealapi.Ciphertext()
    seal.public.encrypt(plain, ciphertext)
    return seal.dump(ciphertext)


def expand_probe(keyring: Keyring, keys: bytes, probe: EncryptedProbe) -> EncryptedProbe:
    """Cloud: the column-layout probe a packed one stands for (a column probe as is).

    ``keys`` are on-prem's `edge_keys` (loaded once, `integrity.galois_keys`).
    `CiphertextError` for a packed ciphertext the edge would not make (another
    level, scale or size, coefficient form) and `ConfigError` when the keys lack an
    automorphism the probe needs. About 3 ms per
    dimension on the benchmark machine (one automorphism each).
    """
    if probe.packed is None:
        return probe
    keyring.check(probe.fingerprint)
    seal = _Seal(keyring)
    elements = expansion_elements(keyring, probe.dimensions)
    galois = galois_keys(keyring, keys)
    missing = [element for element in elements if not galois.has_key(element)]
    if missing:
        raise ConfigError(
            f"no Galois keys for elements {missing}: on-prem left the expansion keys out "
            "of the context (its message cap); send the probe in columns"
        )
    above = _above(seal)
    packed = seal.load_into(sealapi.Ciphertext(), probe.packed)
    if (
        packed.parms_id() != above.parms_id()
        or packed.size() != 2
        or not packed.is_ntt_form()
        or packed.scale != _packed_scale(seal)
    ):
        raise CiphertextError(
            "a packed probe is one public-key ciphertext one level above the gallery's, "
            "at the packing scale"
        )
    shifts = _slot_powers(seal, -(2 ** np.arange(len(elements))))
    evaluator = seal.evaluator
    expanded = [packed]
    for level, element in enumerate(elements):
        monomial = sealapi.Plaintext()  # X^-(2^level), exact at scale 1
        seal.encoder.encode(shifts[:, level].tolist(), above.parms_id(), 1.0, monomial)
        odd = []
        for c in expanded:
            image, shifted = sealapi.Ciphertext(), sealapi.Ciphertext()
            evaluator.apply_galois(c, element, galois, image)
            evaluator.sub(c, image, shifted)
            evaluator.multiply_plain_inplace(shifted, monomial)
            evaluator.add_inplace(c, image)
            odd.append(shifted)
        expanded += odd
    columns = []
    for c in expanded[: probe.dimensions]:
        evaluator.rescale_to_next_inplace(c)
        columns.append(seal.dump(c))
    return EncryptedProbe(
        fingerprint=probe.fingerprint,
        metric=probe.metric,
        dimensions=probe.dimensions,
        columns=tuple(columns),
        norm=probe.norm,
    )
