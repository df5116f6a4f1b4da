"""What a replica holding only the public key can do to the scores it sends.

A malicious but trusted replica tampers with score ciphertexts homomorphically,
at the right level and scale, and sends them in the format honest replicas use
(compressed, `cipherface.gallery.compact`), so that only what the values say can
give it away.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cipherface.gallery.compact import compress, read_scores
from cipherface.gallery.kernel import coefficients
from cipherface.gallery.packing import _SCORE_SCALE, _Seal
from cipherface.wire.payloads import BlockScores

__all__ = ["ciphertext_of", "resent"]


def ciphertext_of(seal: _Seal, scores: BlockScores) -> Any:
    """The SEAL ciphertext (NTT form) ``scores`` carry, compressed or not."""
    if scores.bits:
        return read_scores(seal, scores.scores, scores.bits)
    return seal.load(scores.scores)


def resent(seal: _Seal, scores: BlockScores, ciphertext: Any) -> BlockScores:
    """``scores`` carrying ``ciphertext`` instead, in the format they came in.

    Before compressing, an encryption of zero re-randomises it, as a replica holding
    the full-precision ciphertext would send it: an expanded ciphertext sits on the
    rounding grid, and compressing it again would snap a change smaller than half a
    step (a shift of 0.005 in one slot, spread over every coefficient) back.
    """
    if not scores.bits:
        return dataclasses.replace(scores, scores=seal.dump(ciphertext))
    plain_form = seal.load(seal.dump(ciphertext))
    seal.evaluator.add_inplace(plain_form, seal.load(seal.encrypt_public(0.0, _SCORE_SCALE)))
    seal.evaluator.transform_from_ntt_inplace(plain_form)
    modulus = seal.context.last_context_data().parms().coeff_modulus()[0].value()
    return dataclasses.replace(scores, scores=compress(coefficients(seal, plain_form), modulus))
