"""What on-prem lets itself decrypt, and what it lets out.

CKKS gives confidentiality, not integrity, and the public context lets anyone
make well-formed ciphertexts. A decryption is a linear function of the secret
key, so on-prem must never decrypt a chosen ciphertext and publish the result:
that is a key-recovery oracle (a chosen-ciphertext attack, beyond Li and
Micciancio's passive one). Three defences, all here:

1. **Scores must look like what the protocol makes** before anything is
   decrypted: lowest modulus level, NTT form, scale exactly ``2^50`` (columns
   at ``2^25`` times probe weights at ``2^25``), two components for a probe
   the cloud embedded (ciphertext x plaintext), three for an edge probe
   (ciphertext x ciphertext, left unrelinearised).
2. **Decryptions must lie where the metric puts them**: cosine in [0, 2],
   euclidean_l2 in [0, 4], euclidean in [0, 4 * MAX_SQUARED_NORM], each within
   `SCORE_TOLERANCE`, and they must be one probe's scores against what on-prem
   knows each position holds (`cipherface.gallery.consistency`). Anything else is
   tampering: `IntegrityError`, and no number derived from it leaves on-prem.
3. **Edge probes must be unit vectors under on-prem's key.** The cloud
   computes, from the probe's own ciphertexts ``c_j = w p_j``, the sums
   ``N1 = sum_j c_j^2`` and ``N2 = sum_j c_j conj(c_j)`` (one Galois key, for
   complex conjugation, which on-prem ships in the context). Slot by slot,
   ``N2 = w^2 (|a|^2 + |b|^2)`` and ``Re N1 = w^2 (|a|^2 - |b|^2)`` for a probe
   ``a + ib``: both equal ``w^2`` only for a real unit vector. A probe made
   under another key decrypts to noise, one scaled by 1.02 gives 1.0404, and
   a complex probe that keeps ``Re N1 = 1`` while stretching its real part
   shows in ``N2``. For raw euclidean the norm is free, so ``N1``, ``N2``
   and the probe's own encrypted ``||p||^2`` must agree.

Released values are flooded (Li, Micciancio, Schorr and Walter): on-prem adds
Gaussian noise of `FLOOD_SIGMA` from the operating system's CSPRNG to each
distance it publishes, far above the CKKS error (<= 4e-4), so a published
distance says nothing about the decryption error, hence about the key. The
decision is taken on the exact value and the noisy distance is drawn on the
same side of the threshold, so flooding flips no decision; what remains is the
decision bit itself.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import numpy as np
import tenseal.sealapi as sealapi

from cipherface.crypto import Keyring, Metric
from cipherface.exceptions import CiphertextError, IntegrityError, SecretKeyError
from cipherface.gallery.packing import MAX_SQUARED_NORM, _Seal, _weights
from cipherface.wire.payloads import EncryptedProbe, ProbeCheck

__all__ = [
    "FLOOD_SIGMA",
    "NORM_TOLERANCE",
    "SCORE_TOLERANCE",
    "check_probe",
    "check_scores",
    "conjugation_element",
    "conjugation_key",
    "flood",
    "galois_keys",
    "prove_probe",
]

#: Slack on a decrypted score's range. Honest scores are within 4.3e-4 (plaintext
#: probe, compressed) and 4.5e-4 (edge probe) of the exact value on scores of order
#: 1, 9e-4 on raw euclidean distances near 10 (tests pin these): 1e-2 is ten times that.
SCORE_TOLERANCE = 1e-2
#: Relative slack on an edge probe's N1 and N2. N1 is within 7.1e-4 on honest probes.
#: N2's error comes from the conjugation's key switching at the lowest level and
#: depends on the key and the probe: up to 0.068 over 5 keys x 4 random unit vectors
#: straight from the library, and up to 0.122 seen through the agents (two shards,
#: edge pieces); 8e-2 refused honest probes under some keys. With p = a + ib, N1 and
#: N2 decrypt to |a|^2 - |b|^2 and |a|^2 + |b|^2, so these bound an imaginary part
#: |b| to about 0.36; a smaller one still shifts every score by the slot's other
#: template (or decoy) times b, which the checks of the decrypted scores refuse
#: (`tests/test_integrity.py` forges one inside these bounds).
NORM_TOLERANCE = (2e-3, 0.25)
#: N2's slack where no consistency fit runs (above `MAX_FIT_DIMENSIONS`): there a real
#: part |a| up to sqrt(1 + tol) would inflate every similarity unseen by the range
#: checks, so the bound stays tight, and an honest probe under an unlucky key may be
#: refused (an error event, never a wrong decision).
UNFITTED_N2_TOLERANCE = 8e-2
#: Standard deviation of the noise added to every distance that leaves on-prem:
#: above the consistency fit's tolerance (1e-3, 3e-3 for edge probes), so what a
#: replica could shift undetected, let alone the CKKS error, drowns in it.
FLOOD_SIGMA = 3e-3
_SYSTEM_RANDOM = random.SystemRandom()
_FLOOD_DRAWS = 64


def conjugation_key(keyring: Keyring) -> bytes:
    """On-prem: the one Galois key the cloud needs, for complex conjugation (seeded)."""
    if not keyring.is_private:
        raise SecretKeyError("Galois keys are made on-prem, with the secret key")
    seal = _Seal(keyring)
    generator = sealapi.KeyGenerator(seal.context, keyring.context.secret_key().data)
    return seal.dump(generator.create_galois_keys([conjugation_element(seal)]))


def conjugation_element(seal: _Seal) -> int:
    """The Galois element of complex conjugation, ``2N - 1``."""
    return 4 * seal.slots - 1


@functools.lru_cache(maxsize=4)
def galois_keys(keyring: Keyring, data: bytes) -> Any:
    """The Galois keys on-prem ships to replicas, loaded into SEAL once per key set.

    Cached because the set (conjugation and the expansion's automorphisms, 2.9 MB
    at 128-d) takes about 20 ms to load through TenSEAL's file-only bindings, and an
    edge probe needs it twice (`expansion.expand_probe`, then `prove_probe`) on every
    shard. SEAL reads keys only, so threads share them. `CiphertextError` unless the
    set holds complex conjugation.
    """
    seal = _Seal(keyring)
    keys = seal.load_into(sealapi.GaloisKeys(), data)
    if not keys.has_key(conjugation_element(seal)):
        raise CiphertextError("the context's Galois key is not for complex conjugation")
    return keys


def prove_probe(keyring: Keyring, galois_key: bytes, probe: EncryptedProbe) -> ProbeCheck:
    """Cloud: ``N1 = sum c_j^2`` and ``N2 = sum c_j conj(c_j)`` of an edge probe, for on-prem.

    About 1 ms per dimension on this machine (128 conjugations and 256 products).
    """
    seal = _Seal(keyring)
    keys = galois_keys(keyring, galois_key)
    evaluator = seal.evaluator
    squares = norms = None
    for column in probe.columns:
        c = seal.load(column)
        square, conjugate, norm = sealapi.Ciphertext(), sealapi.Ciphertext(), sealapi.Ciphertext()
        evaluator.multiply(c, c, square)
        evaluator.complex_conjugate(c, keys, conjugate)
        evaluator.multiply(c, conjugate, norm)
        if squares is None:
            squares, norms = square, norm
        else:
            evaluator.add_inplace(squares, square)
            evaluator.add_inplace(norms, norm)
    return ProbeCheck(squares=seal.dump(squares), norms=seal.dump(norms), norm=probe.norm)


def check_probe(seal: _Seal, check: ProbeCheck, metric: Metric, *, fitted: bool = True) -> None:
    """On-prem: raise `IntegrityError` unless the edge probe is a real unit vector (see above).

    For raw euclidean any norm is allowed, but N1, N2 and the probe's own encrypted
    ``||p||^2`` must agree in every slot. ``fitted``: the scores will go through the
    consistency fit (`cipherface.gallery.consistency`); else N2's bound is tighter.
    """
    n1 = seal.decrypt_slots(seal.load_checked(check.squares, size=3))
    n2 = seal.decrypt_slots(seal.load_checked(check.norms, size=3))
    factor, _ = _weights(metric)
    if metric is Metric.EUCLIDEAN:
        if check.norm is None:
            raise IntegrityError("a euclidean edge probe must carry its encrypted norm")
        declared = seal.decrypt_slots(seal.load_checked(check.norm, size=2))
        if not np.allclose(declared.real, declared.imag, atol=SCORE_TOLERANCE):
            raise IntegrityError("the edge probe's norm differs between the two slot parts")
        if np.any(declared.real > MAX_SQUARED_NORM + SCORE_TOLERANCE):
            raise IntegrityError("the edge probe's norm is beyond the gallery's range")
        expected = factor**2 * declared.real
    else:
        expected = np.full(n1.shape, factor**2)
    tol1, tol2 = NORM_TOLERANCE if fitted else (NORM_TOLERANCE[0], UNFITTED_N2_TOLERANCE)
    scale = np.maximum(expected, 1.0)
    if np.any(np.abs(n1.real - expected) > tol1 * scale) or np.any(np.abs(n1.imag) > tol1 * scale):
        raise IntegrityError("the edge probe is not a unit vector under this key")
    if np.any(np.abs(n2.real - expected) > tol2 * scale) or np.any(np.abs(n2.imag) > tol2 * scale):
        raise IntegrityError("the edge probe has imaginary components")


def check_scores(values: np.ndarray, scored: np.ndarray, metric: Metric) -> None:
    """On-prem: raise `IntegrityError` unless a block's decrypted scores are in range.

    ``scored`` marks the positions whose score means something (templates; for
    batched 1:1, the positions a pair owns).
    """
    if not np.all(np.isfinite(values)):
        raise IntegrityError("decrypted scores are not finite")
    upper = {Metric.COSINE: 2.0, Metric.EUCLIDEAN_L2: 4.0}.get(metric, 4 * MAX_SQUARED_NORM)
    used = values[scored]
    if used.size and (used.min() < -SCORE_TOLERANCE or used.max() > upper + SCORE_TOLERANCE):
        raise IntegrityError(
            f"decrypted {metric.value} scores fall outside [0, {upper:g}]: they were tampered with"
        )


def flood(distance: float, threshold: float, verified: bool, sigma: float = FLOOD_SIGMA) -> float:
    """``distance`` plus Gaussian noise from the OS CSPRNG, kept on the decided side.

    Redrawing until the noisy value falls on the same side of ``threshold`` as the
    decision keeps an event self-consistent without flipping its decision; after
    `_FLOOD_DRAWS` misses (a distance on the threshold itself) the threshold is
    returned, which says no more than the decision does.
    """
    for _ in range(_FLOOD_DRAWS):
        noisy = max(distance + _SYSTEM_RANDOM.gauss(0.0, sigma), 0.0)
        if (noisy <= threshold) == verified:
            return noisy
    return threshold
