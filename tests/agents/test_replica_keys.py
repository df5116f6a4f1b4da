"""The Galois keys on-prem ships to replicas, and a replica left without the expansion keys."""

from __future__ import annotations

import tenseal.sealapi as sealapi

from agents.onprem.keys import replica_keys
from cipherface.crypto import Keyring, Metric
from cipherface.gallery.expansion import encrypt_packed_probe, expansion_elements
from cipherface.gallery.integrity import conjugation_element, conjugation_key
from cipherface.gallery.packing import _Seal
from tests.agents.conftest import Deployment
from tests.agents.trust import Watch, _people, _public, _submit

MIB = 1024 * 1024


def _elements(keys: Keyring, data: bytes) -> set[int]:
    seal = _Seal(keys)
    galois = seal.load_into(sealapi.GaloisKeys(), data)
    wanted = [conjugation_element(seal), *expansion_elements(keys, 512)]
    return {element for element in wanted if galois.has_key(element)}


def test_the_expansion_keys_go_when_they_fit_the_cap(keys: Keyring) -> None:
    seal = _Seal(keys)
    full = {conjugation_element(seal), *expansion_elements(keys, 128)}
    assert _elements(keys, replica_keys(keys, 128, 4 * MIB)) == full
    assert _elements(keys, replica_keys(keys, 512, 4 * MIB)) == full | {
        *expansion_elements(keys, 512)
    }
    # Under a 1 MiB cap the context update holds the conjugation key alone.
    assert _elements(keys, replica_keys(keys, 128, MIB)) == {conjugation_element(seal)}


async def test_a_replica_without_the_expansion_keys_answers_with_an_error(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    cloud = deployment.agents[1]
    shipped = cloud._edge_keys  # type: ignore[union-attr]
    onprem_keys = deployment.agents[0].current.keyring  # type: ignore[union-attr]
    cloud._edge_keys = conjugation_key(onprem_keys)  # type: ignore[union-attr]
    try:
        probe = encrypt_packed_probe(_public(deployment), _people()["B"], Metric.COSINE)
        event = await watch.event(await _submit(deployment, probe, "B"))
    finally:
        cloud._edge_keys = shipped  # type: ignore[union-attr]
    assert not event.verified and event.distance is None
    assert event.error and event.error.startswith("ConfigError") and "expansion keys" in event.error
