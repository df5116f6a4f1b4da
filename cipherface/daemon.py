"""Running an agent as a long-lived daemon: signals, shutdown, logging."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

__all__ = ["configure_logging", "run_until_signalled"]

log = logging.getLogger(__name__)


def configure_logging(level: str = "INFO") -> None:
    """Structured, one-line-per-event logs on stderr (``key=value`` after the message)."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)r",
    )


async def run_until_signalled(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Start, wait for SIGTERM or SIGINT, then stop.

    Shutdown is by event, not polling: the signal handler only sets it. ``stop``
    is expected to cancel consumers and drain in-flight work (requeueing what
    does not finish), so a stopped daemon loses nothing.
    """
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await start()
        log.info("started; waiting for SIGTERM/SIGINT")
        await stopping.wait()
        log.info("signal received; draining in-flight work")
    finally:
        with contextlib.suppress(Exception):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        await stop()
