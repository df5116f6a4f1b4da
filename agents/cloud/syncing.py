"""A replica's watch over the gallery it holds: ask on-prem again while blocks are missing.

A replica asks for a full sync at start. Later, it can still miss blocks: a block
announced by an enrollment whose chunks were dropped (an assembly pushed out of
`wire.BlockAssembler`'s bound, a chunk dead-lettered), or a sync answer lost. So
for as long as the replica runs, whenever announced blocks are missing and no
chunk arrived for a whole interval, it asks again; on-prem coalesces and
rate-limits these requests (`Settings.sync_interval`). While chunks keep coming
(a large gallery in transit) it does not ask.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from cipherface.gallery import EncryptedGallery
from cipherface.wire import BlockAssembler

__all__ = ["held_version", "keep_synced"]

log = logging.getLogger(__name__)


def held_version(
    galleries: list[tuple[EncryptedGallery | None, str]], fingerprint: str, block_id: int
) -> int:
    """The version of ``block_id`` held under key ``fingerprint`` among ``galleries``
    (the served one and a key rotation's staged one, with their keys), 0 for none."""
    for gallery, held in galleries:
        if gallery is not None and held == fingerprint:
            return gallery.version(block_id)
    return 0


async def keep_synced(
    missing: Callable[[], int],
    chunks: BlockAssembler,
    ask: Callable[[], Awaitable[None]],
    interval: float,
) -> None:
    """Every ``interval`` seconds: ``ask`` for a sync if ``missing()`` blocks (or no
    gallery yet: -1) and ``chunks`` accepted nothing since the last look."""
    seen = chunks.accepted
    while True:
        await asyncio.sleep(interval)
        count = missing()
        if count and chunks.accepted == seen:
            log.info("replica still waits for %s block(s): asking again", count)
            await ask()
        seen = chunks.accepted
