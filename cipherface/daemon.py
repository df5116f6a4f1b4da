"""Running an agent as a long-lived daemon: signals, shutdown, logging."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = [
    "LOG_FIELDS",
    "JsonFormatter",
    "cancel_and_wait",
    "configure_logging",
    "finish_in_thread",
    "run_until_signalled",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``extra=`` keys a log record may carry into a JSON line (ids, sizes, timings:
#: never keys, ciphertexts or embeddings).
LOG_FIELDS = (
    "probe_id",
    "replica",
    "mode",
    "outcome",
    "subject",
    "verified",
    "error",
    "seconds",
    "age",
    "fingerprint",
    "blocks",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the `LOG_FIELDS` given."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in LOG_FIELDS:
            if name in record.__dict__:
                data[name] = record.__dict__[name]
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """One line per log record on stderr: ``key=value`` text, or JSON (``log_format="json"``)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)r")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler])


async def finish_in_thread(func: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread``, but a cancellation waits for the thread before it propagates.

    A cancelled ``to_thread`` returns at once while its thread keeps running: at
    shutdown that thread would go on using a book or store the daemon then closes.
    Here the cancellation is held until the call returns, so the caller aborts
    cleanly between two steps (e.g. two blocks of a sync), never inside one.
    """
    future = asyncio.ensure_future(asyncio.to_thread(func, *args))
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait({future})  # cancelling the wait leaves the future alone
        except asyncio.CancelledError:
            # Every cancellation is held, not only the first: `cancel_and_wait`
            # repeats them, and the thread must still finish before the caller goes.
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return future.result()


async def cancel_and_wait(*tasks: asyncio.Task[Any], every: float = 1.0) -> None:
    """Cancel ``tasks`` and wait until each is done, cancelling again while it runs.

    One ``cancel()`` is not enough on Python 3.11: ``asyncio.wait_for`` (which
    aio-pika and aiormq use for every RPC) swallows a cancellation that arrives as
    its inner call completes (CPython gh-86296, fixed in 3.12). A housekeeping loop
    whose cancellation was swallowed so sleeps on forever, and a ``stop`` awaiting it
    hung a daemon's shutdown. Cancelling again every ``every`` seconds ends it.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", task.get_name(), task.exception())


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
