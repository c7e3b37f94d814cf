"""Cancellation that holds on Python 3.11.

Python 3.11's ``asyncio.wait_for`` drops a cancellation that arrives in the same loop
pass as the awaited future's result: it returns the result and the task runs on
(CPython gh-86296, fixed in 3.12). aiomqtt waits on every connect, subscribe, publish and
disconnect with ``wait_for``, and pymodbus on every connect and request, so a task
stopped by a TaskGroup or by the daemon's shutdown could miss its one cancellation and
keep running, and whoever waited for it waited forever (seen: a Sparkplug edge node that
never stopped, in 3 of 12 runs of its broker tests with the other core busy).

The task still counts the request (``Task.cancelling()``), but 3.11's TaskGroup leaves
its parent's count one too high when a child fails after the group's body has ended (it
checks whether to take its request back before it waits for the children). A count left
high breaks ``asyncio.timeout`` in that task on 3.11.0 to 3.11.2, which raise
CancelledError instead of TimeoutError when the count is not zero: the MQTT bridge's
reconnect back-off then ended the bridge for good after its first broker outage (seen in
the docker-compose stack, whose Debian Python is 3.11.2). So the rules are:

- every await on aiomqtt or pymodbus goes through :func:`cancellable` (or
  :class:`entered` for their ``async with``), which raises the cancellation the library
  dropped if the count went up while it waited;
- TaskGroups are opened with :func:`task_group`, which takes back the request the group
  left behind;
- whoever stops a task uses :func:`stop_task`, which cancels again until the task ends;
- linectl's own code never calls ``asyncio.wait_for`` (ruff's banned-api rule enforces
  it) and uses ``asyncio.timeout``, which is correct on 3.11.

It also holds :func:`unix_ms`, the one wall clock in unix milliseconds, for the adapters
and the service (pure code takes time as an argument).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, TypeVar

log = logging.getLogger("linectl.aio")

T = TypeVar("T")


def unix_ms() -> int:
    """Wall-clock time now, unix milliseconds (payload and record time stamps)."""
    return time.time_ns() // 1_000_000


def _requests() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def _raise_if_requested_since(before: int) -> None:
    if _requests() > before:
        raise asyncio.CancelledError


async def cancellable(aw: Awaitable[T]) -> T:
    """Await ``aw``; raise CancelledError if this task was cancelled meanwhile and ``aw``
    returned anyway. Safe in cleanup code that runs after a cancellation (only a new
    request counts), and inside ``asyncio.timeout`` (which turns it into TimeoutError)."""
    # The task is looked up once: every Modbus request passes here (six a cycle at
    # 100 Hz), and the lookup cost as much as the rest of the wrapper.
    task = asyncio.current_task()
    if task is None:  # not in a task (a callback's coroutine run by hand): nothing to count
        return await aw
    before = task.cancelling()
    result = await aw
    if task.cancelling() > before:
        raise asyncio.CancelledError
    return result


class entered(Generic[T]):  # noqa: N801 (used like a function: `async with entered(cm)`)
    """``async with entered(cm) as x``: ``cm``'s enter and exit, each made cancellable."""

    def __init__(self, cm: AbstractAsyncContextManager[T]) -> None:
        self._cm = cm

    async def __aenter__(self) -> T:
        before = _requests()
        value = await self._cm.__aenter__()
        try:
            _raise_if_requested_since(before)
        except asyncio.CancelledError:
            await self._cm.__aexit__(None, None, None)
            raise
        return value

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        before = _requests()
        suppress = await self._cm.__aexit__(exc_type, exc, tb)
        _raise_if_requested_since(before)
        return suppress


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for ``event`` at most ``timeout_s``; True if it was set (a back-off that a
    stop request cuts short)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """``asyncio.TaskGroup()`` that leaves its parent's cancellation count as it found it.

    When a child fails, the group cancels its parent once to wake it; on 3.11 it forgets
    to take that back if the body had already ended. Only that one request is taken back
    (on the way out with the group's errors), so a cancellation from outside still
    counts."""
    task = asyncio.current_task()
    before = _requests()
    try:
        async with asyncio.TaskGroup() as tg:
            yield tg
    except asyncio.CancelledError:
        raise
    except BaseException:
        if task is not None and task.cancelling() > before:
            task.uncancel()
        raise


async def stop_task(
    task: asyncio.Task[Any], *, grace_s: float, cancel_every_s: float = 0.5, tries: int = 10
) -> bool:
    """Let ``task`` finish on its own for ``grace_s``, then cancel it until it ends.

    Each cancellation gets ``cancel_every_s`` to take effect; after ``tries`` of them the
    task is abandoned (logged). True when the task has ended. Never raises the task's
    own exception (the caller reads ``task.exception()`` if it cares); a cancellation of
    the caller itself still propagates."""
    if not task.done():
        await asyncio.wait({task}, timeout=grace_s)
    for _ in range(tries):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=cancel_every_s)
    if not task.done():
        log.error("task %s would not stop; abandoning it", task.get_name())
        return False
    if not task.cancelled():
        task.exception()  # retrieved: the caller logs what matters, asyncio need not
    return True
