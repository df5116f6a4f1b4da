"""Shutdown ends even when a task swallowed its cancellation (`cancel_and_wait`)."""

from __future__ import annotations

import asyncio

from cipherface.daemon import cancel_and_wait


async def _loop_that_swallows_one_cancel(laps: list[int]) -> None:
    """A housekeeping loop whose first cancellation is lost, as on Python 3.11 when it
    lands while an ``asyncio.wait_for`` inside aio-pika completes (CPython gh-86296)."""
    swallowed = False
    while True:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed = True
        laps.append(1)


async def test_a_swallowed_cancellation_does_not_hang_the_stop() -> None:
    laps: list[int] = []
    task = asyncio.create_task(_loop_that_swallows_one_cancel(laps))
    await asyncio.sleep(0.1)
    # One cancel, as `stop` used to do, leaves the loop running:
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done and len(laps) > 2
    await asyncio.wait_for(cancel_and_wait(task, every=0.1), 5)
    assert task.cancelled()


async def test_tasks_that_end_on_their_own_are_left_as_they_ended() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    finished = asyncio.create_task(asyncio.sleep(0))
    failed = asyncio.create_task(fails())
    await asyncio.sleep(0.01)
    await cancel_and_wait(finished, failed)
    assert finished.done() and not finished.cancelled()
    assert isinstance(failed.exception(), ValueError)


async def test_a_thread_finishes_before_its_caller_however_often_it_is_cancelled() -> None:
    """`finish_in_thread` holds every cancellation until its thread returns: a stop
    that cancels again (`cancel_and_wait`) must not close a store under the thread."""
    import threading
    import time

    from cipherface.daemon import finish_in_thread

    running = threading.Event()
    finished: list[bool] = []

    def work() -> None:
        running.set()
        time.sleep(0.5)
        finished.append(True)

    task = asyncio.create_task(finish_in_thread(work))
    await asyncio.to_thread(running.wait)
    await cancel_and_wait(task, every=0.05)  # about ten cancellations
    assert task.cancelled() and finished == [True]
