"""Attacks on what on-prem decrypts: forged edge probes and tampered scores (issue 8).

Each reproduces an attack that worked before on-prem checked ciphertexts before
decrypting them, proved edge probes' norms and fitted scores against what it
knows each position holds (`tests/agents/trust.py` has the rig).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cipherface import wire
from cipherface.crypto import Keyring, Metric
from cipherface.gallery import encrypt_probe
from cipherface.gallery.expansion import encrypt_packed_probe, pack_weights
from cipherface.gallery.packing import _SCORE_SCALE, _Seal
from cipherface.signing import SigningKey
from cipherface.transport import REASON_HEADER
from cipherface.wire.payloads import BlockScores, EncryptedProbe
from tests.agents.conftest import Deployment
from tests.agents.trust import (
    DIMENSIONS,
    Watch,
    _edge_probe,
    _honest_block_scores,
    _people,
    _public,
    _result,
    _scores,
    _signed_by_replica,
    _submit,
)
from tests.forging import ciphertext_of, resent

# -- forged edge probes -------------------------------------------------------------


async def test_honest_edge_probe_of_b_is_verified(rig: tuple[Deployment, Watch]) -> None:
    deployment, watch = rig
    probe = encrypt_probe(_public(deployment), _people()["B"], Metric.COSINE)
    event = await watch.event(await _submit(deployment, probe, "B"))
    assert event.verified and event.error is None and event.distance is not None
    assert event.distance < 0.01


@pytest.mark.parametrize("factor", [1.02, 1.5])
async def test_scaled_edge_probe_is_refused(rig: tuple[Deployment, Watch], factor: float) -> None:
    deployment, watch = rig
    a = _people()["A"]
    probe = _edge_probe(_public(deployment), [-factor * float(v) for v in a])
    event = await watch.event(await _submit(deployment, probe, "B"))
    assert not event.verified
    assert event.error and event.error.startswith("IntegrityError")
    assert event.distance is None


async def test_complex_edge_probe_keeping_the_square_at_one_is_refused(
    rig: tuple[Deployment, Watch],
) -> None:
    """``a + ib`` with ``|a|^2 - |b|^2 = 1`` passes a check of ``sum c_j^2`` alone."""
    deployment, watch = rig
    people = _people()
    a = people["A"]
    rng = np.random.default_rng(1)
    y = rng.normal(size=DIMENSIONS)
    y -= (y @ a) * a
    y /= np.linalg.norm(y)
    s = 1.06
    t = np.sqrt(s**2 - 1)
    probe = _edge_probe(
        _public(deployment), [complex(-s * u, -t * w) for u, w in zip(a, y, strict=True)]
    )
    event = await watch.event(await _submit(deployment, probe, "B"))
    assert not event.verified and event.distance is None
    assert event.error and event.error.startswith("IntegrityError")


async def test_edge_probe_under_an_attackers_key_relabelled_is_refused(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    attacker = Keyring.generate(deployment.settings.preset, relin_keys=False)
    forged = encrypt_probe(attacker.public(), _people()["B"], Metric.COSINE)
    relabelled = EncryptedProbe(
        fingerprint=_public(deployment).fingerprint,
        metric=forged.metric,
        dimensions=forged.dimensions,
        columns=forged.columns,
        norm=forged.norm,
    )
    for subject in ("B", None):
        event = await watch.event(await _submit(deployment, relabelled, subject))
        assert not event.verified and event.distance is None
        assert event.error and event.error.startswith("IntegrityError")


# -- forged packed edge probes (`cipherface.gallery.expansion`) -------------------


async def test_honest_packed_edge_probe_of_b_is_verified(rig: tuple[Deployment, Watch]) -> None:
    deployment, watch = rig
    probe = encrypt_packed_probe(_public(deployment), _people()["B"], Metric.COSINE)
    event = await watch.event(await _submit(deployment, probe, "B"))
    assert event.verified and event.error is None and event.distance is not None
    assert event.distance < 0.01
    assert "expand" in event.timings


def _packed_probe(keyring: Keyring, coefficients: np.ndarray) -> EncryptedProbe:
    """A packed probe whose polynomial an attacker chose (`expansion.pack_weights`)."""
    return EncryptedProbe(
        fingerprint=keyring.fingerprint,
        metric=Metric.COSINE.value,
        dimensions=DIMENSIONS,
        columns=(),
        norm=None,
        packed=pack_weights(_Seal(keyring), coefficients / DIMENSIONS),
    )


async def test_scaled_packed_edge_probe_is_refused(rig: tuple[Deployment, Watch]) -> None:
    """A's embedding scaled by 1.02 would be accepted as B if it were decrypted."""
    deployment, watch = rig
    probe = _packed_probe(_public(deployment), -1.02 * _people()["A"])
    event = await watch.event(await _submit(deployment, probe, "B"))
    assert not event.verified and event.distance is None
    assert event.error and event.error.startswith("IntegrityError")


async def test_packed_probe_varying_from_slot_to_slot_is_refused(
    rig: tuple[Deployment, Watch],
) -> None:
    """Coefficients beyond the dimensions fold onto the columns as powers of
    ``X^128``: each column then differs between slots, B's weights in some and
    0.98 of them in others, which no single probe makes."""
    deployment, watch = rig
    b = _people()["B"]
    coefficients = np.concatenate([-0.99 * b, -0.01 * b])
    probe = _packed_probe(_public(deployment), coefficients)
    event = await watch.event(await _submit(deployment, probe, "B"))
    assert not event.verified and event.distance is None
    assert event.error and event.error.startswith("IntegrityError")


async def test_scores_at_another_scale_are_refused(rig: tuple[Deployment, Watch]) -> None:
    deployment, watch = rig
    honest = _honest_block_scores(deployment)
    seal = _Seal(_public(deployment))
    ciphertext = ciphertext_of(seal, honest)
    ciphertext.scale = 1.0
    tampered = BlockScores(
        block_id=honest.block_id, version=honest.version, scores=seal.dump(ciphertext)
    )
    await _result(deployment, _scores(deployment, "scale-1", [tampered]))
    event = await watch.event("scale-1")
    assert event.error and event.error.startswith("IntegrityError") and event.distance is None


@pytest.mark.parametrize(
    ("value", "scale"), [(0.0, 1.0), (-0.5, _SCORE_SCALE), (3.0 * (1 + 1j), _SCORE_SCALE)]
)
async def test_chosen_score_ciphertexts_are_not_decrypted_into_events(
    rig: tuple[Deployment, Watch], value: complex, scale: float
) -> None:
    """An encryption of 0 at scale 1, or of out-of-range distances: no number leaves."""
    deployment, watch = rig
    honest = _honest_block_scores(deployment)
    seal = _Seal(_public(deployment))
    chosen = BlockScores(
        block_id=honest.block_id, version=honest.version, scores=seal.encrypt_public(value, scale)
    )
    probe_id = f"chosen-{abs(value)}-{scale}"
    await _result(deployment, _scores(deployment, probe_id, [chosen]))
    event = await watch.event(probe_id)
    assert not event.verified and event.distance is None
    assert event.error and event.error.startswith("IntegrityError")


async def test_scores_from_an_untrusted_replica_are_dead_lettered(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    honest = _honest_block_scores(deployment)
    message = wire.ScoresReady(
        probe_id="rogue",
        subject=None,
        faces=(wire.FaceScores(box=None, confidence=1.0, scores=(honest,)),),
        request=wire.request_digest(b"rogue"),
        submitted_at=0.0,
        timings={},
    )
    rogue = SigningKey.generate("r1")  # claims the trusted replica's name
    await _result(deployment, wire.encode(message, signer=rogue))
    dead = await watch.dead_letter(lambda d: "SignatureError" in str(d.headers[REASON_HEADER]))
    assert dead.body
    await asyncio.sleep(0.5)
    assert "rogue" not in watch.events


async def test_in_range_scores_shifted_by_a_trusted_replica_are_refused(
    rig: tuple[Deployment, Watch],
) -> None:
    """A malicious replica lowers A's score below the threshold: it stays in [0, 2],
    but no longer agrees with the templates and decoys on-prem fits it against."""
    deployment, watch = rig
    cloud = deployment.agents[1]
    [honest] = cloud.gallery.search(_people()["B"], subject="A")  # type: ignore[union-attr]
    seal = _Seal(_public(deployment))
    ciphertext = ciphertext_of(seal, honest)
    position = 0  # A is the first template of the block
    shift = [0j] * seal.slots
    shift[position] = -0.03 + 0j
    seal.evaluator.add_plain_inplace(ciphertext, seal.plain(shift, _SCORE_SCALE))
    shifted = resent(seal, honest, ciphertext)
    message = wire.ScoresReady(
        probe_id="shifted",
        subject="A",
        faces=(wire.FaceScores(box=None, confidence=1.0, scores=(shifted,)),),
        request=wire.request_digest(b"shifted"),
        submitted_at=0.0,
        timings={},
    )
    await _result(deployment, _signed_by_replica(deployment, message))
    event = await watch.event("shifted")
    assert not event.verified and event.distance is None
    assert event.error and "one probe" in event.error
