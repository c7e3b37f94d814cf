"""linectl.aio: a cancellation lost by Python 3.11's wait_for still stops a task."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable

import pytest

from linectl.aio import cancellable, entered, stop_task, task_group


async def _race(
    worker: Callable[[list[asyncio.Future[None]]], Awaitable[object]],
) -> asyncio.Task[object]:
    """Runs `worker`, then completes the future it waits on and cancels it in the same
    loop pass: the race in which Python 3.11's wait_for drops the cancellation."""
    waiting: list[asyncio.Future[None]] = []
    task = asyncio.create_task(worker(waiting))
    for _ in range(100):
        if waiting:
            break
        await asyncio.sleep(0)
    waiting[-1].set_result(None)
    task.cancel()
    await asyncio.wait({task}, timeout=2.0)
    return task


def _waiter(waiting: list[asyncio.Future[None]]) -> asyncio.Future[None]:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting.append(fut)
    return fut


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the race is fixed in 3.12")
async def test_the_race_is_real_on_python_3_11() -> None:
    async def worker(waiting: list[asyncio.Future[None]]) -> str:
        await asyncio.wait_for(_waiter(waiting), 5.0)
        return "ran on"

    task = await _race(worker)
    assert task.done()
    assert not task.cancelled()
    assert task.result() == "ran on"


async def test_cancellable_raises_the_cancellation_wait_for_dropped() -> None:
    # The race that hung the Sparkplug edge: aiomqtt's publish waits exactly like this.
    async def worker(waiting: list[asyncio.Future[None]]) -> str:
        while True:
            await cancellable(asyncio.wait_for(_waiter(waiting), 5.0))

    task = await _race(worker)
    assert task.done(), "the task kept running after its cancellation"
    assert task.cancelled()


async def test_cancellable_inside_a_timeout_gives_timeout_error() -> None:
    async def worker(waiting: list[asyncio.Future[None]]) -> str:
        try:
            async with asyncio.timeout(0.05):
                while True:
                    await cancellable(asyncio.wait_for(_waiter(waiting), 5.0))
        except TimeoutError:
            return "timed out"

    # No race here: the timeout cancels, the loop's next wait is cut short.
    task = asyncio.create_task(worker([]))
    assert await asyncio.wait_for(task, 2.0) == "timed out"


async def test_cancellable_lets_cleanup_after_a_cancellation_await() -> None:
    async def worker() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            # Cleanup on purpose (an NDEATH, a safe-state write): not cut short.
            await cancellable(asyncio.sleep(0))
            return "cleaned up"
        return "slept"

    task = asyncio.create_task(worker())
    await asyncio.sleep(0)
    task.cancel()
    assert await task == "cleaned up"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the TaskGroup leak is fixed in 3.12")
async def test_cancellable_ignores_the_count_a_failed_taskgroup_leaves_behind() -> None:
    async def fail_later() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("child failed")

    with pytest.raises(ExceptionGroup):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(fail_later())
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 1  # 3.11 never takes back its request to the parent
    await cancellable(asyncio.sleep(0))  # no new request: no CancelledError
    task.uncancel()


async def test_task_group_leaves_the_count_as_it_found_it() -> None:
    # The MQTT bridge's loop: a session (a task group) ends when a child fails after
    # the body has ended, then the loop backs off under asyncio.timeout. With the count
    # left high, Python 3.11.0 to 3.11.2 raise CancelledError out of that timeout, and
    # the bridge ended for good after its first broker outage.
    async def fail_later() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("connection lost")

    task = asyncio.current_task()
    assert task is not None
    for _ in range(3):
        with pytest.raises(ExceptionGroup):
            async with task_group() as tg:
                tg.create_task(fail_later())
        assert task.cancelling() == 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1.0)


async def test_task_group_keeps_a_cancellation_from_outside() -> None:
    started = asyncio.Event()

    async def session() -> None:
        async with task_group() as tg:
            tg.create_task(asyncio.sleep(10))
            started.set()

    task = asyncio.create_task(session())
    await started.wait()
    task.cancel()
    await asyncio.wait({task}, timeout=2.0)
    assert task.cancelled()


async def test_entered_raises_a_cancellation_the_enter_dropped_and_exits() -> None:
    log: list[str] = []

    class Connection:
        def __init__(self, waiting: list[asyncio.Future[None]]) -> None:
            self.waiting = waiting

        async def __aenter__(self) -> Connection:
            await asyncio.wait_for(_waiter(self.waiting), 5.0)
            log.append("connected")
            return self

        async def __aexit__(self, *exc: object) -> None:
            log.append("disconnected")

    async def worker(waiting: list[asyncio.Future[None]]) -> str:
        async with entered(Connection(waiting)):
            log.append("session")
            await asyncio.sleep(10)
        return "ran on"

    task = await _race(worker)
    assert task.cancelled()
    assert log == ["connected", "disconnected"]


async def test_stop_task_waits_for_a_task_that_ends_on_its_own() -> None:
    stop = asyncio.Event()

    async def worker() -> str:
        await stop.wait()
        return "flushed"

    task = asyncio.create_task(worker())
    asyncio.get_running_loop().call_later(0.05, stop.set)
    assert await stop_task(task, grace_s=2.0)
    assert task.result() == "flushed"  # not cancelled: the grace was enough


async def test_stop_task_cancels_again_when_a_cancellation_is_lost() -> None:
    lost = 0

    async def stubborn() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                lost += 1
                if lost == 3:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await stop_task(task, grace_s=0.0, cancel_every_s=0.05)
    assert task.cancelled()
    assert lost == 3


async def test_stop_task_gives_up_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def immortal() -> None:
        while not release.is_set():
            with_cancel = asyncio.create_task(asyncio.sleep(10))
            try:
                await with_cancel
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(immortal(), name="immortal")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="linectl.aio"):
        assert not await stop_task(task, grace_s=0.0, cancel_every_s=0.01, tries=3)
    assert "immortal would not stop" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    assert task.done()


async def test_stop_task_keeps_the_tasks_exception_for_the_caller() -> None:
    async def failing() -> None:
        raise ValueError("bad")

    task = asyncio.create_task(failing())
    assert await stop_task(task, grace_s=1.0)
    assert isinstance(task.exception(), ValueError)
