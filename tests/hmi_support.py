"""A line on the simulators with the HMI server in front of it, for the HMI's tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from e2e_scenarios import TRUE_K, compact_config, line_service, wait_for

from linectl.config import HttpConfig, HttpUser, load_config
from linectl.core.control import LineState
from linectl.metrics import LineMetrics, WithoutCreated
from linectl.service import LineService
from linectl.web.auth import hash_password
from linectl.web.server import HmiServer
from simulators.server import SimulatedLine

PASSWORD = "night-shift-42"
"""Every test user's password."""

# One hash for all users (scrypt costs ~50 ms a hash): minimum cost, test-only.
_HASH = hash_password(PASSWORD, n=2**14)


@dataclass
class HmiLine:
    svc: LineService
    sim: SimulatedLine
    server: HmiServer
    url: str
    db: Path


def users(**roles: str) -> dict[str, HttpUser]:
    """HMI users name=role, all with PASSWORD."""
    return {name: HttpUser(password_hash=_HASH, role=role) for name, role in roles.items()}


@contextlib.asynccontextmanager
async def hmi_line(
    tmp_path: Path,
    *,
    seed: int = 5,
    http: HttpConfig | None = None,
    ready: bool = True,
    patient_links: bool = False,
) -> AsyncIterator[HmiLine]:
    """The compact simulated line, its service and the HMI server on a free port, with
    users op (operator) and view (viewer); READY unless `ready` is False.
    `patient_links`: PLC answers may take 0.5 s and data may be 1.5 s old before the
    PLC counts as lost (the shipped 0.1 s / 0.25 s are for a line computer that runs
    nothing else; a browser starting beside the tests can hold both cores that long)."""
    cfg = load_config(compact_config(tmp_path), environ={})
    if patient_links:
        slow = {"timeout_s": 0.5, "stale_after_s": 1.5}
        cfg.line = cfg.line.model_copy(
            update={
                "accelerator": cfg.line.accelerator.model_copy(update=slow),
                "conveyor": cfg.line.conveyor.model_copy(update=slow),
            }
        )
    mqtt = cfg.line.mqtt.model_copy(update={"roles": {"operator": ["*"], "viewer": []}})
    http = http or HttpConfig(enabled=True, port=0, users=users(op="operator", view="viewer"))
    cfg.line = cfg.line.model_copy(update={"mqtt": mqtt, "http": http})
    async with (
        SimulatedLine(cfg, seed=seed, k_dose_true=TRUE_K) as sim,
        line_service(cfg, sim) as svc,
    ):
        metrics = LineMetrics(svc.line_id)
        metrics.attach(svc)
        server = HmiServer(svc, http, metrics=WithoutCreated(metrics.registry))
        await server.start(port=0)
        try:
            if ready:
                await wait_for(lambda: svc.ctl.state is LineState.READY, 30.0, "READY")
            yield HmiLine(svc, sim, server, server.url, svc.store_path)
        finally:
            await server.stop()


async def until(page: Any, js: str, timeout_s: float, what: str) -> Any:
    """Poll a JavaScript expression in a Playwright page until it is truthy (the HMI's
    Content-Security-Policy forbids the eval that page.wait_for_function needs)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await page.evaluate(js)
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s ({js})")
        await asyncio.sleep(0.05)


async def login(
    http: aiohttp.ClientSession, url: str, user: str, password: str = PASSWORD
) -> dict[str, object]:
    """Log in; the session's body (its csrf token included). Fails the test otherwise."""
    async with http.post(f"{url}/api/login", json={"user": user, "password": password}) as r:
        body = await r.json()
        assert r.status == 200, body
        return dict(body)


class TcpProxy:
    """A TCP relay in front of the HMI server: `cut()` drops every connection and
    refuses new ones (a network cut, as the browser sees it), `restore()` ends that."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.cut_now = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()

    def cut(self) -> None:
        self.cut_now = True
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.cut_now = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_now:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if self.cut_now:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()
            self._writers.discard(dst)
