"""On-prem's gathering of score parts: sized for the gallery, and quick with replays.

- The results window is sized from the gallery and `Settings.max_faces`: a
  multi-face probe on a gallery of several blocks, in more parts than the former
  4 x ``PREFETCH`` - 1, is answered (it used to get ``IncompleteScores`` at once).
- A part replayed after its probe's event is out is acked at once (the ledger
  says the probe is answered), not held until the gather timeout.
"""

from __future__ import annotations

from agents.onprem.gathering import MAX_WINDOW, window_for
from tests.agents.conftest import Deployment
from tests.agents.test_score_parts import CAP, _many_faces_probe, _parts
from tests.agents.trust import Watch, _result, _signed_by_replica


def test_the_window_holds_two_probes_of_every_face_on_every_block() -> None:
    # Default cap: 31 blocks of one face per part, so 32 faces need a part per block.
    assert window_for(2, blocks=31, max_faces=32) == 2 * 31 + 1
    assert window_for(2, blocks=3, max_faces=1) == 8  # small galleries: 4 x PREFETCH
    assert window_for(2, blocks=2, max_faces=1, shards=5) == 11  # a part per shard
    assert window_for(2, blocks=10_000, max_faces=32) == MAX_WINDOW


async def test_a_probe_in_more_parts_than_four_times_prefetch_is_answered(
    deployment: Deployment,
) -> None:
    faces = 7  # 7 x ~131 KB of one block's scores fit a 1 MiB part, 14 do not
    # Four blocks: a part each for a probe of 7 faces; 4 x PREFETCH - 1 = 3 fit before.
    event = await _many_faces_probe(deployment, cap=CAP, faces=faces, blocks=4, prefetch=1)
    assert deployment.agents[0].gathering.window > 4  # type: ignore[union-attr]
    assert event.error is None and event.verified and event.subject == "bob", event
    assert len(event.faces) == faces


async def test_a_part_replayed_after_the_event_is_not_held(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    onprem = deployment.agents[0]
    first, second = (_signed_by_replica(deployment, p) for p in _parts(deployment, "replay", 2))
    await _result(deployment, first)
    await _result(deployment, second)
    assert (await watch.event("replay")).verified
    await _result(deployment, first)  # the broker, or an attacker, sends it again
    for body in (_signed_by_replica(deployment, p) for p in _parts(deployment, "next", 2)):
        await _result(deployment, body)
    assert (await watch.event("next")).verified  # the replay was handled before it
    assert not len(onprem.gathering), "a replayed part is held for the gather timeout"  # type: ignore[union-attr]
