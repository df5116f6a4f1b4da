"""A replica keeps its gallery whole after it is ready: blocks it misses later are
asked for again (`agents.cloud.syncing`). On the in-process broker and on RabbitMQ."""

from __future__ import annotations

import numpy as np
import pytest

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent
from cipherface import wire
from tests.agents.conftest import Deployment
from tests.agents.test_lifecycle import until
from tests.agents.trust import DIMENSIONS, gallery_rig


async def test_a_ready_replica_that_misses_a_block_asks_for_a_sync_again(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agents.cloud.agent.SYNC_RETRY", 0.5)
    await gallery_rig(deployment)
    onprem, cloud = deployment.agents[0], deployment.agents[1]
    assert isinstance(onprem, OnPremAgent) and isinstance(cloud, CloudAgent)
    assert cloud.ready.is_set() and len(cloud.gallery or ()) == 6
    # The replica loses every chunk of the next enrollment's block the first time
    # it comes (a dropped assembly, a dead-lettered chunk): only a new sync helps.
    add, seen = cloud._chunks.add, set()

    def losing_first(chunk: wire.BlockChunk, fingerprint: str) -> object:
        if (chunk.block_id, chunk.version, chunk.start) not in seen:
            seen.add((chunk.block_id, chunk.version, chunk.start))
            return None
        return add(chunk, fingerprint)

    cloud._chunks.add = losing_first  # type: ignore[method-assign]
    vector = np.random.default_rng(11).normal(size=DIMENSIONS)
    onprem.book.add("Z", vector / np.linalg.norm(vector), template_id="Z")
    await onprem.publish_gallery(onprem.book.pending_blocks())
    await until(lambda: seen and len(cloud.gallery or ()) == 7 and not cloud._awaiting)
    assert "Z" in cloud.gallery.subjects()  # type: ignore[union-attr]
