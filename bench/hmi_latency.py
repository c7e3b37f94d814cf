"""HMI latency and cost (issue 12): PLC register change to DOM update with 20 clients.

This process runs the line and nothing else: the compact test line's simulated PLCs
(simulators.server.SimulatedLine, in this event loop), the real LineService at the
shipped 50 ms cycle with a reel running (planned long enough to last the whole run), and
the HMI server (linectl.web.server.HmiServer, as the daemon starts it, without metrics)
with two users whose passwords are scrypt hashes (linectl.web.auth.hash_password,
n=2**14). Its CPU time (getrusage, every thread) is therefore simulators + controller +
HMI server. Every client is in another process, so that its CPU is never counted here:

  - one real browser: Debian's Chromium, headless, driven by Playwright from a child
    process (this script with `--child browser`). It logs in on `/` as an operator,
    waits until the page is live (`window.hmi && !window.hmi.stale`, polled: the page's
    CSP forbids wait_for_function) and puts a MutationObserver on `#beam-vacuum`, which
    notes `performance.timeOrigin + performance.now()` and the new text at every change
    (and, in the next animation frame, the frame's time). A script added before the
    page's own (Playwright's add_init_script) also adds a listener to the page's
    WebSocket that notes when a feed message with a new `vacuum_pa` arrives, before the
    page's handler runs: it splits the DOM latency into the way to the browser and the
    page's own part. It only listens;
  - `--ws-clients` (19) WebSocket clients in one more child process (`--child ws`): each
    its own aiohttp session, POST /api/login as a viewer, then /ws; each applies the
    snapshots and deltas as the page does (resync on a gap) and notes its wall clock on
    receipt of the message that first carries a new `beam.vacuum_pa`.

The register change: the accelerator simulator's vacuum reading is constant (1.0e-4 Pa);
once a `--period-s` (1 s), at a random point of the middle 60 % of each period (seeded:
`--seed`), so that the changes fall evenly over the phases of the control cycle, the
0.2 s feed round and the page's redraw (a fixed 1 s grid hits the same phase every
time), it is switched between 1.0e-4 and 1.2e-4 Pa (both far inside VACUUM_OK). t0 is
the wall clock (time.time()) read just before the switch; the simulated PLC serves the
new value from its next read. The HMI shows it as `1.0e-4` / `1.2e-4`. For each change
and client:

    latency = the client's wall clock at the first change to the new value - t0

All clocks are this host's wall clock. The browser's (timeOrigin + now) is checked
against this host's time.time() by round trips through page.evaluate; the offset and its
bound are printed. A change counts for a sample if it comes at or after t0 - 20 ms and
before the value is set again two samples later; otherwise the sample is "not seen".

Phases, each `--seconds` (60) long after `--settle-s` (3) of settling, with the vacuum
switched throughout: no clients (the browser is started but on about:blank), then
`--rounds` (1) times: 1 browser + `--ws-clients` WebSocket clients, then no clients again
(the browser back on about:blank, the WebSocket process ended). Each phase with clients
thus lies between two without, which brackets drift in the host's load; each round has a
fresh page load (its redraw timer's phase against the feed differs, see below). Per
phase: this process's CPU seconds per wall second; the control cycle's lateness and
duration p50/p99/max and missed cycles (LineService.stats), cycles not RUNNING; the time
one feed round of the HMI server holds the event loop (its `refresh` and `_serve_client`,
timed by wrappers on the instance: the state built, every client's message built, its
send task made; the sends, which run as separate tasks, are timed by a wrapper on
`_send`); the cycles that started more than 2 ms late and, of them, those that were due
while a feed round or its sends ran; the client processes' CPU and the rest of the
host's (/proc). Figures:

  - DOM latency p50/p95/p99/max over the changes of the phases with clients (goal: p95
    <= 250 ms), the next animation frame after it, the feed message's arrival in the
    browser, and the WebSocket clients' receipt latency, pooled;
  - CPU per client = (CPU/s with clients - mean CPU/s of the phases without on either
    side) / clients, in ms of CPU per second per client; the median of the rounds;
  - control-cycle lateness "unchanged", held (as in bench/command_flood.py) as lateness
    p99 of all cycles with clients within +1 ms of the p99 of all cycles without, and
    missed cycles in a phase with clients no more than in one without.

The server coalesces the feed to 5 updates a second (FEED_PERIOD_S = 0.2) and the page
redraws at most 5 times a second (RENDER_MIN_MS = 200): expect the DOM up to a few
hundred ms behind, made of up to one 50 ms cycle, up to one 200 ms feed round and a
redraw wait of 0 to 200 ms. As the page's redraw interval equals the feed's period, that
wait is set by where the page's first render fell against the feed's rounds and then
shrinks only by the feed timer's overshoot (about 1 ms a round): it differs from one page
load to the next, and lasts tens of seconds. So each round loads the page afresh, and the
page's own part (feed message received -> DOM) is printed beside the DOM figure.

    /tmp/venv/bin/python bench/hmi_latency.py [--seconds 60] [--rounds 1]
        [--ws-clients 19] [--period-s 1] [--settle-s 3] [--seed 1]
        [--chromium /usr/bin/chromium] [--json FILE]

`--smoke`: 4 s phases, 2 WebSocket clients and the browser, a handful of samples (used by
the test suite so the script never rots; nothing is asserted about the figures). The
load average and the host's other CPU use are printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the compact line is the tests'
sys.path.insert(0, str(ROOT / "bench"))  # benchlib

from benchlib import code_version, host_cpu_s, host_facts, pct  # noqa: E402
from e2e_scenarios import TRUE_K, compact_config, wait_for  # noqa: E402
from hmi_support import until  # noqa: E402

from linectl.config import HttpConfig, HttpUser, load_config  # noqa: E402
from linectl.core.control import LineState  # noqa: E402
from linectl.service import LineService, ReelRequest, select_recipe  # noqa: E402
from linectl.web.auth import hash_password  # noqa: E402
from linectl.web.server import HmiServer  # noqa: E402
from simulators.server import SimulatedLine  # noqa: E402

SCRIPT = Path(__file__).resolve()
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
PASSWORD = "bench-night-shift-42"
BROWSER_USER = "op"  # operator
WS_USER = "view"  # viewer
VACUUM_PA = (1.0e-4, 1.2e-4)
"""The two vacuum readings the simulator alternates between (VACUUM_OK below 1e-3)."""
"""The simulated plant's true dose coefficient (the fast recipe's k_dose)."""
MATCH_TOL_MS = 20.0
"""A change this much before t0 still counts for the sample (clock reading jitter);
earlier is the previous sample's."""
GOAL_DOM_P95_MS = 250.0
LATE_MS = 2.0
"""Cycles that start later than this are checked against the HMI feed's rounds."""
LATENESS_TOL_MS = 1.0
"""Lateness p99 with clients within this of the phases without counts as unchanged."""


def now_ms() -> float:
    """This host's wall clock, unix ms."""
    return time.time_ns() / 1e6


def vacuum_key(value: float | None) -> int | None:
    """A vacuum reading as the integer of 1e-5 Pa it shows (1.2e-4 -> 12), None if none."""
    if value is None or not math.isfinite(value):
        return None
    return round(value * 1e5)


def emit(obj: dict[str, Any]) -> None:
    """One event of a child process: a JSON line on stdout, flushed at once."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------- child: WebSocket


async def _ws_client(i: int, url: str, user: str, password: str) -> None:
    """One WebSocket client: log in, follow the feed, report each new vacuum value."""
    import aiohttp

    jar = aiohttp.CookieJar(unsafe=True)  # the server is 127.0.0.1: keep its cookie
    messages = snapshots = resyncs = 0
    try:
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            body = {"user": user, "password": password}
            async with http.post(f"{url}/api/login", json=body) as r:
                if r.status != 200:
                    emit({"ev": "error", "client": i, "msg": f"login: HTTP {r.status}"})
                    return
            async with http.ws_connect(f"{url}/ws", max_msg_size=64 * 1024 * 1024) as ws:
                state: dict[str, Any] | None = None
                seq: int | None = None
                waiting = False  # a resync asked, no snapshot yet
                last: int | None = None
                ready = False
                async for msg in ws:
                    t = now_ms()
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        continue
                    messages += 1
                    m = json.loads(msg.data)
                    kind = m.get("type")
                    if kind == "snapshot":
                        state, seq, waiting = m["state"], m["seq"], False
                        snapshots += 1
                    elif kind == "delta":
                        if waiting or state is None:
                            continue
                        if m.get("base") != seq:
                            await ws.send_str('{"type":"resync"}')
                            waiting, resyncs = True, resyncs + 1
                            continue
                        for key, value in (m.get("set") or {}).items():
                            state[key] = value
                        seq = m["seq"]
                    elif kind == "heartbeat":
                        if not waiting and m.get("seq") != seq:
                            await ws.send_str('{"type":"resync"}')
                            waiting, resyncs = True, resyncs + 1
                        continue
                    else:
                        continue
                    beam = (state or {}).get("beam") or {}
                    key = vacuum_key(beam.get("vacuum_pa"))
                    if not ready:
                        ready = True
                        emit({"ev": "ready", "client": i, "key": key, "t_ms": t})
                    elif key != last:
                        emit({"ev": "change", "client": i, "key": key, "t_ms": t})
                    last = key
    finally:
        emit(
            {
                "ev": "stats",
                "client": i,
                "messages": messages,
                "snapshots": snapshots,
                "resyncs": resyncs,
            }
        )


_PUMPS: set[asyncio.Task[None]] = set()


async def _stdin_commands() -> asyncio.Queue[str]:
    """Lines from stdin (the parent's commands), as a queue ("" at EOF)."""
    q: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def pump() -> None:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            await q.put(line.strip() if line else "")
            if not line:
                return

    task = asyncio.create_task(pump())
    _PUMPS.add(task)
    return q


async def ws_child(url: str, user: str, password: str, n: int) -> None:
    """`n` WebSocket clients until stdin closes (or says "stop")."""
    cmds = await _stdin_commands()
    tasks = [asyncio.create_task(_ws_client(i, url, user, password)) for i in range(n)]
    while (await cmds.get()) not in ("", "stop"):
        pass
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    emit({"ev": "done", "cpu_s": _own_cpu_s()})
    os._exit(0)  # the stdin reader thread may still block


# ---------------------------------------------------------------------- child: browser

_OBSERVE_JS = """
() => {
  const node = document.getElementById('beam-vacuum');
  const q = [];
  window.__benchQueue = q;
  new MutationObserver(() => {
    const rec = [node.textContent, performance.timeOrigin + performance.now(), null];
    q.push(rec);
    requestAnimationFrame(() => { rec[2] = performance.timeOrigin + performance.now(); });
  }).observe(node, { childList: true, characterData: true, subtree: true });
  return node.textContent;
}
"""

# Installed before the page's own script: the time each feed message reaches the page
# (before the page's handler runs) when it carries a new vacuum value, to split the
# DOM latency into the network part and the page's part. It only listens.
_RECEIPT_JS = """
(() => {
  const Orig = window.WebSocket;
  const q = [];
  let last = null;
  window.__benchReceipts = q;
  window.WebSocket = class extends Orig {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', (ev) => {
        const t = performance.timeOrigin + performance.now();
        const text = typeof ev.data === 'string' ? ev.data : '';
        const m = /"vacuum_pa":([-+0-9.eE]+|null)/.exec(text);
        if (m && m[1] !== last) { last = m[1]; q.push([m[1], t]); }
      });
    }
  };
})();
"""

_DRAIN_JS = """
() => {
  const q = window.__benchQueue || [];
  const now = performance.timeOrigin + performance.now();
  const out = [];
  while (q.length && (q[0][2] !== null || now - q[0][1] > 1000)) out.push(q.shift());
  return [out, (window.__benchReceipts || []).splice(0)];
}
"""

_LOGIN_OR_LIVE_JS = """
() => {
  if (window.hmi && !window.hmi.stale) return 'live';
  const form = document.getElementById('login-view');
  return form && !form.hidden ? 'login' : '';
}
"""

_CLOCK_JS = "() => performance.timeOrigin + performance.now()"


def _text_key(text: str) -> int | None:
    try:
        return vacuum_key(float(text))
    except ValueError:
        return None


async def _clock_offset(page: Any, rounds: int = 20) -> dict[str, float]:
    """The page's clock (timeOrigin + now) less this host's time.time(), from the round
    trip with the shortest time: offset and its bound (half that round trip), ms."""
    best: tuple[float, float] | None = None
    for _ in range(rounds):
        a = now_ms()
        b = float(await page.evaluate(_CLOCK_JS))
        c = now_ms()
        if best is None or c - a < best[1]:
            best = (b - (a + c) / 2.0, c - a)
    assert best is not None
    return {"offset_ms": round(best[0], 3), "bound_ms": round(best[1] / 2.0, 3)}


async def browser_child(url: str, user: str, password: str, chromium: str) -> None:
    """Chromium on about:blank; on "login" the HMI, logged in and observed; on "leave"
    about:blank again; exits on EOF or "quit"."""
    from playwright.async_api import async_playwright

    cmds = await _stdin_commands()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        context = await browser.new_context(viewport={"width": 1600, "height": 1000})
        page = await context.new_page()
        await page.add_init_script(_RECEIPT_JS)
        emit({"ev": "launched"})
        drainer: asyncio.Task[None] | None = None

        async def drain_once() -> None:
            changes, receipts = await page.evaluate(_DRAIN_JS)
            for text, t_recv in receipts:
                emit({"ev": "receipt", "client": 0, "key": _text_key(text), "t_ms": t_recv})
            for text, t_dom, t_frame in changes:
                emit(
                    {
                        "ev": "change",
                        "client": 0,
                        "key": _text_key(text),
                        "text": text,
                        "t_ms": t_dom,
                        "frame_ms": t_frame,
                    }
                )

        async def drain() -> None:
            while True:
                await asyncio.sleep(0.25)
                await drain_once()

        try:
            while (cmd := await cmds.get()) not in ("", "quit"):
                if cmd == "login":
                    await page.goto(url + "/")
                    # The login form, or the HMI at once while the session lasts.
                    if await until(page, _LOGIN_OR_LIVE_JS, 30.0, "the page") == "login":
                        await page.fill("#login-user", user)
                        await page.fill("#login-password", password)
                        await page.click("#login-submit")
                    await until(page, "window.hmi && !window.hmi.stale", 30.0, "the HMI live")
                    text = await page.evaluate(_OBSERVE_JS)
                    clock = await _clock_offset(page)
                    emit(
                        {
                            "ev": "ready",
                            "client": 0,
                            "key": _text_key(text),
                            "text": text,
                            "t_ms": now_ms(),
                        }
                    )
                    emit({"ev": "clock", **clock})
                    drainer = asyncio.create_task(drain())
                elif cmd == "leave":
                    if drainer is not None:
                        drainer.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await drainer
                        drainer = None
                        await asyncio.sleep(1.2)  # the last frame callbacks
                        await drain_once()
                    await page.goto("about:blank")
                    emit({"ev": "left"})
        finally:
            if drainer is not None:
                drainer.cancel()
            await browser.close()
    emit({"ev": "done", "cpu_s": _own_cpu_s()})
    os._exit(0)


def _own_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------------- the parent's side


def proc_tree_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of `pid` and every live descendant (/proc); None
    without /proc."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name in entries:
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        rest = text.rsplit(")", 1)[1].split()
        parent[int(name)] = int(rest[1])
        cpu[int(name)] = (int(rest[11]) + int(rest[12])) / tick
    if pid not in cpu:
        return None
    total, todo = 0.0, [pid]
    children: dict[int, list[int]] = {}
    for p, pp in parent.items():
        children.setdefault(pp, []).append(p)
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += children.get(p, [])
    return total


@dataclass
class Child:
    """One client process (this script with --child), its events as they come."""

    argv: list[str]
    name: str
    events: list[dict[str, Any]] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    _reader: asyncio.Task[None] | None = None
    _stderr: asyncio.Task[bytes] | None = None
    _new: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,
        )
        self._reader = asyncio.create_task(self._read(), name=f"bench-{self.name}")
        assert self.proc.stderr is not None
        self._stderr = asyncio.create_task(self.proc.stderr.read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                self.events.append(json.loads(line))
            except ValueError:
                continue
            self._new.set()

    def count(self, ev: str) -> int:
        return sum(1 for e in self.events if e["ev"] == ev)

    async def wait_for(self, ev: str, n: int, timeout_s: float) -> None:
        """Until `n` events `ev` came; an error event or the process ending raises."""
        deadline = time.monotonic() + timeout_s
        while self.count(ev) < n:
            if errors := [e for e in self.events if e["ev"] == "error"]:
                raise RuntimeError(f"{self.name}: {errors[0]}")
            if self._reader is not None and self._reader.done():
                raise RuntimeError(f"{self.name} ended: {await self.stderr_text()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: {self.count(ev)} of {n} {ev!r} events")
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), min(left, 0.5))

    async def send(self, line: str) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        with contextlib.suppress(TimeoutError):
            return (await asyncio.wait_for(asyncio.shield(self._stderr), 5.0)).decode()[-2000:]
        return ""

    async def stop(self, timeout_s: float = 20.0) -> None:
        """Close its stdin (it ends by itself); kill it if it does not."""
        if self.proc is None:
            return
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5.0)


# ---------------------------------------------------------------------- the line


@dataclass
class CycleWatch:
    """Observer: while active, counts cycles and cycles not RUNNING, and notes when each
    cycle was due and when it started (service clock, time.monotonic), and how late."""

    active: bool = False
    cycles: int = 0
    not_running: int = 0
    timings: list[tuple[float, float, float]] = field(default_factory=list)

    def __call__(self, svc: LineService) -> None:
        if self.active:
            self.cycles += 1
            self.not_running += svc.ctl.state is not LineState.RUNNING
            # Called right after the cycle's timing was recorded: its start is now less
            # its duration (to within the few microseconds since).
            late = svc.stats.lateness_s[-1]
            start = svc.clock() - svc.stats.duration_s[-1]
            self.timings.append((start - late, start, late))

    def begin(self) -> None:
        self.active, self.cycles, self.not_running, self.timings = True, 0, 0, []


@dataclass(frozen=True, slots=True)
class Sample:
    """One register change: the value set (as its key) and when, unix ms."""

    key: int
    t0_ms: float


def match(
    samples: list[Sample], changes: list[tuple[int | None, float]], end_ms: float = math.inf
) -> list[float | None]:
    """Latency (ms) of each sample in one client's changes (key, t_ms), None if not seen:
    the first change to the sample's value at or after t0 - MATCH_TOL_MS and before the
    same value is set again (two samples later), or `end_ms` for the last two."""
    out: list[float | None] = []
    for i, s in enumerate(samples):
        hi = samples[i + 2].t0_ms - MATCH_TOL_MS if i + 2 < len(samples) else end_ms
        lat = next(
            (
                t - s.t0_ms
                for key, t in changes
                if key == s.key and s.t0_ms - MATCH_TOL_MS <= t < hi
            ),
            None,
        )
        out.append(lat)
    return out


def stats(xs: list[float], digits: int = 1) -> dict[str, Any]:
    """count, p50/p95/p99/max/min of xs (ms)."""

    def r(x: float) -> float | None:
        return None if math.isnan(x) else round(x, digits)

    return {
        "count": len(xs),
        "p50_ms": r(pct(xs, 50)),
        "p95_ms": r(pct(xs, 95)),
        "p99_ms": r(pct(xs, 99)),
        "max_ms": r(pct(xs, 100)),
        "min_ms": r(min(xs)) if xs else None,
    }


@dataclass
class Options:
    seconds: float
    ws_clients: int
    period_s: float
    settle_s: float
    grace_s: float
    chromium: str
    seed: int = 1
    rounds: int = 1


class FeedTimer:
    """Times the HMI server's feed rounds: its `refresh` (the state built) and each
    `_serve_client` (a client's delta built and its send task made), wrapped on the
    instance; the sends themselves run later, as tasks, and are not in it. Each round:
    [refresh ms, serve ms summed, clients served, start, end, end of its last send]
    (time.monotonic, s; the sends are timed by a wrapper on `_send`)."""

    def __init__(self, server: HmiServer) -> None:
        self.rounds: list[list[float]] = []
        refresh, serve, send = server.refresh, server._serve_client, server._send

        def timed_refresh() -> None:
            t = time.monotonic()
            refresh()
            t1 = time.monotonic()
            self.rounds.append([1000.0 * (t1 - t), 0.0, 0, t, t1, t1])

        def timed_serve(client: Any, now_s: float) -> None:
            t = time.monotonic()
            serve(client, now_s)
            t1 = time.monotonic()
            if self.rounds:
                r = self.rounds[-1]
                r[1] += 1000.0 * (t1 - t)
                r[2] += 1
                r[4] = r[5] = t1

        async def timed_send(client: Any, text: str) -> None:
            r = self.rounds[-1] if self.rounds else None
            await send(client, text)
            if r is not None:
                r[5] = max(r[5], time.monotonic())

        server.refresh = timed_refresh  # type: ignore[method-assign]
        server._serve_client = timed_serve  # type: ignore[method-assign]
        server._send = timed_send  # type: ignore[method-assign]


class Bench:
    """The line, its HMI server and the clients, for every phase."""

    def __init__(self, opts: Options, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.vacuum_i = 0  # index into VACUUM_PA of the simulator's value now
        self.sim: Any = None
        self.svc: Any = None
        self.server: Any = None
        self.feed: FeedTimer | None = None
        self.watch = CycleWatch()
        self.children: list[Child] = []
        self.rng = random.Random(opts.seed)
        self._task: asyncio.Task[None] | None = None

    def _toggle(self) -> Sample:
        self.vacuum_i = 1 - self.vacuum_i
        v = VACUUM_PA[self.vacuum_i]
        t0 = now_ms()
        self.sim.plant.accelerator.p.vacuum_pa = v
        return Sample(vacuum_key(v) or 0, t0)

    async def phase(self, name: str, clients: list[Child], n_clients: int) -> dict[str, Any]:
        """Settle, then measure for `seconds`, switching the vacuum every period."""
        opts, svc = self.opts, self.svc
        await asyncio.sleep(opts.settle_s)
        self._check_running()
        pids = [c.pid for c in clients if c.pid is not None]
        n0, missed0 = svc.stats.cycles, svc.stats.missed
        self.watch.begin()
        f0 = len(self.feed.rounds) if self.feed is not None else 0
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        host0 = host_cpu_s()
        kids0 = [proc_tree_cpu_s(p) for p in pids]
        w0 = time.perf_counter()
        samples: list[Sample] = []
        k = 0
        while True:
            # At a random phase within its period, so that the changes fall evenly over
            # the phases of the control cycle, the feed's round and the page's redraw (a
            # fixed 1 s would land at one phase of the 0.2 s round every time).
            t_next = w0 + (k + self.rng.uniform(0.2, 0.8)) * opts.period_s
            if t_next > w0 + opts.seconds:
                break
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            samples.append(self._toggle())
            k += 1
        await asyncio.sleep(max(0.0, w0 + opts.seconds - time.perf_counter()))
        wall = time.perf_counter() - w0
        end_ms = now_ms()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        host1 = host_cpu_s()
        kids1 = [proc_tree_cpu_s(p) for p in pids]
        self.watch.active = False
        rounds = self.feed.rounds[f0:] if self.feed is not None else []
        n1, missed1 = svc.stats.cycles, svc.stats.missed
        late_cycles = [t for t in self.watch.timings if t[2] * 1000.0 > LATE_MS]
        in_round = sum(
            any(r[3] < start and r[5] > due for r in rounds) for due, start, _l in late_cycles
        )
        n = n1 - n0
        late = [x * 1000.0 for x in svc.stats.lateness_s[len(svc.stats.lateness_s) - n :]]
        dur = [x * 1000.0 for x in svc.stats.duration_s[len(svc.stats.duration_s) - n :]]
        user, sys_ = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
        cpu = user + sys_
        kids: float | None = None
        pairs = [
            (a, b) for a, b in zip(kids0, kids1, strict=True) if a is not None and b is not None
        ]
        if pairs and len(pairs) == len(pids):
            kids = sum(b - a for a, b in pairs)
        host = None if host0 is None or host1 is None else host1 - host0
        other = None if host is None else host - cpu - (kids or 0.0)
        self._check_running()

        def pc(x: float | None) -> float | None:
            return None if x is None else round(100.0 * x / wall, 1)

        return {
            "phase": name,
            "clients": n_clients,
            "server_clients": len(self.server.clients),
            "wall_s": round(wall, 3),
            "end_ms": round(end_ms, 3),
            "cycles": n,
            "missed": missed1 - missed0,
            "cycles_not_running": self.watch.not_running,
            "late_cycles": len(late_cycles),
            "late_cycles_in_feed_round": in_round,
            "lateness": stats(late, 2),
            "duration": stats(dur, 2),
            "feed_round": {
                **stats([r[0] + r[1] for r in rounds], 2),
                "refresh_p50_ms": _r2(pct([r[0] for r in rounds], 50)),
                "serve_p50_ms": _r2(pct([r[1] for r in rounds], 50)),
                "clients_served_per_round": _r2(
                    statistics.mean([r[2] for r in rounds]) if rounds else math.nan
                ),
            },
            "cpu_s": round(cpu, 4),
            "cpu_s_per_s": round(cpu / wall, 5),
            "cpu_pct": pc(cpu),
            "user_pct": pc(user),
            "sys_pct": pc(sys_),
            "clients_cpu_pct": pc(kids),
            "other_cpu_pct": pc(other),
            "host_busy_pct": pc(host),
            "samples": [[s.key, round(s.t0_ms, 3)] for s in samples],
            "_late": late,
        }

    def _check_running(self) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()
            raise RuntimeError("the line service returned before the measurements ended")

    async def run(self) -> dict[str, Any]:
        opts = self.opts
        cfg = load_config(compact_config(self.workdir), environ={})
        recipe, recipe_path = select_recipe(cfg, None)
        speed = recipe.max_speed_m_min(cfg.line.geometry.weight_sum)
        n_phases = 1 + 2 * opts.rounds
        busy_s = n_phases * (opts.settle_s + opts.seconds + opts.grace_s + 30.0) + 120.0
        length_m = round(speed / 60.0 * busy_s * 1.5 + 20.0)
        pw_hash = hash_password(PASSWORD, n=2**14)
        http = HttpConfig(
            enabled=True,
            port=0,
            users={
                BROWSER_USER: HttpUser(password_hash=pw_hash, role="operator"),
                WS_USER: HttpUser(password_hash=pw_hash, role="viewer"),
            },
        )
        n_clients = 1 + opts.ws_clients
        res: dict[str, Any] = {
            "cycle_period_s": cfg.line.cycle_period_s,
            "reel_length_m": length_m,
            "speed_limit_m_min": round(speed, 2),
            "seconds": opts.seconds,
            "rounds": opts.rounds,
            "period_s": opts.period_s,
            "settle_s": opts.settle_s,
            "ws_clients": opts.ws_clients,
            "chromium": opts.chromium,
            "phases": [],
        }
        wss: list[Child] = []
        async with SimulatedLine(cfg, seed=1, k_dose_true=TRUE_K) as sim:
            self.sim = sim
            svc = LineService(
                cfg,
                recipe,
                recipe_path,
                acc_endpoint=cfg.line.accelerator.model_copy(update={"port": sim.acc_port}),
                cnv_endpoint=cfg.line.conveyor.model_copy(update={"port": sim.cnv_port}),
            )
            self.svc = svc
            svc.stats.keep = 10**7  # every cycle of the run
            svc.on_reel_start.append(lambda _r, counter_m: sim.plant.start_reel(counter_m))
            svc.observers.append(self.watch)
            svc.request_reel(ReelRequest("HMI-LATENCY-1", length_m, "bench"))
            self._task = asyncio.create_task(svc.run(), name="bench-line")
            server = HmiServer(svc, http)
            self.server = server
            self.feed = FeedTimer(server)
            try:
                await server.start(port=0)
                browser = Child(
                    ["--child", "browser", server.url, BROWSER_USER, PASSWORD, opts.chromium],
                    "browser",
                )
                self.children.append(browser)
                await browser.start()
                await browser.wait_for("launched", 1, 90.0)
                task = self._task
                await wait_for(
                    lambda: (
                        task.done()
                        or (
                            svc.ctl.state is LineState.RUNNING
                            and svc.ledger is not None
                            and (svc.ledger.position_m or 0.0) > 1.0
                        )
                    ),
                    90.0,
                    "the reel to run",
                )
                self._check_running()
                res["phases"].append(await self.phase("no clients", [browser], 0))
                for r in range(opts.rounds):
                    # The browser logs in (again), the WebSocket clients connect.
                    ws = Child(
                        ["--child", "ws", server.url, WS_USER, PASSWORD, str(opts.ws_clients)],
                        f"ws-{r + 1}",
                    )
                    self.children.append(ws)
                    wss.append(ws)
                    await browser.send("login")
                    await ws.start()
                    await ws.wait_for("ready", opts.ws_clients, 60.0)
                    await browser.wait_for("ready", r + 1, 90.0)
                    await wait_for(
                        lambda: len(server.clients) == n_clients, 10.0, "every client connected"
                    )
                    p = await self.phase(f"{n_clients} clients", [browser, ws], n_clients)
                    await asyncio.sleep(opts.grace_s)  # the last changes reach every client
                    await browser.send("leave")
                    await browser.wait_for("left", r + 1, 30.0)
                    await ws.stop()
                    res["phases"].append(p)
                    await wait_for(lambda: not server.clients, 10.0, "the clients to leave")
                    res["phases"].append(await self.phase("no clients", [browser], 0))
            finally:
                for c in self.children:
                    await c.stop()
                await server.stop()
                svc.stop()
                await asyncio.wait_for(asyncio.gather(self._task, return_exceptions=True), 90.0)
        res["latency"] = self.latencies(res["phases"], browser, wss, opts.grace_s)
        res["clients"] = {
            "browser_clocks": [e for e in browser.events if e["ev"] == "clock"],
            "ws_stats": [e for ws in wss for e in ws.events if e["ev"] == "stats"],
        }
        return res

    @staticmethod
    def latencies(
        phases: list[dict[str, Any]], browser: Child, wss: list[Child], grace_s: float
    ) -> dict[str, Any]:
        """Each change of the phases with clients, matched in every client's changes."""
        ch = [e for e in browser.events if e["ev"] == "change"]
        dom_ev = [(e["key"], e["t_ms"]) for e in ch]
        frame_ev = [(e["key"], e["frame_ms"]) for e in ch if e.get("frame_ms") is not None]
        recv_ev = [(e["key"], e["t_ms"]) for e in browser.events if e["ev"] == "receipt"]
        dom: list[float | None] = []
        frame: list[float | None] = []
        recv: list[float | None] = []
        per_ws: list[list[float | None]] = []
        with_clients = [p for p in phases if p["clients"] > 0]
        for p, ws in zip(with_clients, wss, strict=True):
            samples = [Sample(k, t) for k, t in p["samples"]]
            end = p["end_ms"] + 1000.0 * grace_s
            dom += match(samples, dom_ev, end)
            frame += match(samples, frame_ev, end)
            recv += match(samples, recv_ev, end)
            n_ws = sum(1 for e in ws.events if e["ev"] == "ready")
            for i in range(n_ws):
                mine = [
                    (e["key"], e["t_ms"])
                    for e in ws.events
                    if e["ev"] == "change" and e["client"] == i
                ]
                per_ws.append(match(samples, mine, end))
        page = [d - r for d, r in zip(dom, recv, strict=True) if d is not None and r is not None]
        pooled = [x for lat in per_ws for x in lat if x is not None]
        p95s = [pct([x for x in lat if x is not None], 95) for lat in per_ws]

        def seen(xs: list[float | None]) -> dict[str, Any]:
            return {
                **stats([x for x in xs if x is not None]),
                "seen": sum(x is not None for x in xs),
            }

        return {
            "samples": len(dom),
            "dom": {
                **seen(dom),
                "per_sample_ms": [None if x is None else round(x, 2) for x in dom],
            },
            "frame": seen(frame),
            "receipt": {
                **seen(recv),
                "per_sample_ms": [None if x is None else round(x, 2) for x in recv],
            },
            "page": {**stats(page), "seen": len(page)},
            "ws": {
                **stats(pooled),
                "clients": len(per_ws) // max(1, len(with_clients)),
                "seen": len(pooled),
                "seen_per_client": [sum(x is not None for x in lat) for lat in per_ws],
                "not_seen_per_client": [sum(x is None for x in lat) for lat in per_ws],
                "worst_client_p95_ms": None
                if not p95s or any(math.isnan(x) for x in p95s)
                else round(max(p95s), 1),
            },
        }


def _r2(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


def summarise(res: dict[str, Any]) -> list[tuple[str, Any, str, bool | None]]:
    """The goals table, and the derived figures added to `res`. CPU per client: each
    phase with clients against the mean of the phases without on either side of it."""
    phases = res["phases"]
    per_client: list[float] = []
    for i, p in enumerate(phases):
        if p["clients"] > 0:
            base = statistics.mean([phases[i - 1]["cpu_s_per_s"], phases[i + 1]["cpu_s_per_s"]])
            per_client.append(1000.0 * (p["cpu_s_per_s"] - base) / p["clients"])
    idle = [p for p in phases if p["clients"] == 0]
    busy = [p for p in phases if p["clients"] > 0]
    late_idle = [x for p in idle for x in p.pop("_late")]
    late_busy = [x for p in busy for x in p.pop("_late")]
    res["cpu_per_client_ms_per_s"] = round(statistics.median(per_client), 3)
    res["cpu_per_client_per_round"] = [round(x, 3) for x in per_client]
    res["cpu_idle_pct"] = round(statistics.mean([p["cpu_pct"] for p in idle]), 2)
    res["cpu_clients_pct"] = round(statistics.mean([p["cpu_pct"] for p in busy]), 2)
    res["lateness_idle"] = stats(late_idle, 2)
    res["lateness_clients"] = stats(late_busy, 2)
    missed_idle = max(p["missed"] for p in idle)
    missed_busy = max(p["missed"] for p in busy)
    lat = res["latency"]
    dom = lat["dom"]
    n = lat["samples"]
    li, lc = res["lateness_idle"], res["lateness_clients"]
    n_clients = busy[0]["clients"]
    return [
        (
            "DOM latency p95, ms",
            dom["p95_ms"],
            f"<= {GOAL_DOM_P95_MS:g}",
            dom["p95_ms"] is not None and dom["p95_ms"] <= GOAL_DOM_P95_MS,
        ),
        (
            "DOM latency p50 / p99 / max, ms",
            f"{dom['p50_ms']} / {dom['p99_ms']} / {dom['max_ms']}",
            "",
            None,
        ),
        (
            f"changes not seen (of {n}): by the browser's DOM / by any WS client",
            f"{n - dom['seen']} / {sum(lat['ws']['not_seen_per_client'])}",
            "0 / 0",
            dom["seen"] == n and not any(lat["ws"]["not_seen_per_client"]),
        ),
        (
            "WS receipt latency p50 / p95, ms (pooled)",
            f"{lat['ws']['p50_ms']} / {lat['ws']['p95_ms']}",
            "",
            None,
        ),
        ("server process CPU, no clients, % of a core", res["cpu_idle_pct"], "", None),
        (f"server process CPU, {n_clients} clients, % of a core", res["cpu_clients_pct"], "", None),
        ("CPU per client, ms CPU per s", res["cpu_per_client_ms_per_s"], "", None),
        ("lateness p50, ms: no clients / clients", f"{li['p50_ms']} / {lc['p50_ms']}", "", None),
        (
            f"lateness p99, ms, with clients (no clients: {li['p99_ms']})",
            lc["p99_ms"],
            f"<= {li['p99_ms'] + LATENESS_TOL_MS:.2f}",
            lc["p99_ms"] <= li["p99_ms"] + LATENESS_TOL_MS,
        ),
        ("lateness max, ms: no clients / clients", f"{li['max_ms']} / {lc['max_ms']}", "", None),
        (
            "missed cycles in a phase with clients",
            missed_busy,
            f"<= {missed_idle}",
            missed_busy <= missed_idle,
        ),
    ]


# ---------------------------------------------------------------------- output


def _f(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(res: dict[str, Any], goals: list[tuple[str, Any, str, bool | None]]) -> None:
    head = (
        f"{'phase':17} {'clients':>7} {'cycles':>6} {'missed':>6} {'not-run':>7} "
        f"{'late p50':>8} {'late p99':>8} {'late max':>8} {'>2ms':>5} {'in feed':>7} "
        f"{'dur p50':>7} {'dur p99':>7} "
        f"{'feed p50':>8} {'feed p99':>8} {'CPU %':>6} {'user':>5} {'sys':>5} {'cli %':>6} "
        f"{'other %':>7} {'host %':>6}"
    )
    print(head)
    print("-" * len(head))
    for p in res["phases"]:
        la, du, fr = p["lateness"], p["duration"], p["feed_round"]
        print(
            f"{p['phase']:17} {p['server_clients']:>7} {p['cycles']:>6} {p['missed']:>6} "
            f"{p['cycles_not_running']:>7} {_f(la['p50_ms'], '.2f'):>8} "
            f"{_f(la['p99_ms'], '.2f'):>8} {_f(la['max_ms'], '.2f'):>8} "
            f"{p['late_cycles']:>5} {p['late_cycles_in_feed_round']:>7} "
            f"{_f(du['p50_ms'], '.2f'):>7} {_f(du['p99_ms'], '.2f'):>7} "
            f"{_f(fr['p50_ms'], '.2f'):>8} {_f(fr['p99_ms'], '.2f'):>8} {_f(p['cpu_pct']):>6} "
            f"{_f(p['user_pct']):>5} {_f(p['sys_pct']):>5} {_f(p['clients_cpu_pct']):>6} "
            f"{_f(p['other_cpu_pct']):>7} {_f(p['host_busy_pct']):>6}"
        )
    print(
        "times in ms; clients: live-feed connections at the server; late: cycle start after "
        f"its schedule; >2ms: cycles that started more than {LATE_MS:g} ms late, in feed: of "
        "them, those that were due while a feed round or its sends ran;\ndur: cycle work; "
        "feed: one round of the HMI feed (state built, every client's message built and its "
        "send task made); "
        "CPU %: this process (simulators + controller + HMI server) in % of one core;\n"
        "cli %: the client processes (browser: Playwright, its driver and Chromium; WebSocket "
        "clients), other %: the rest of the host, host %: all of it (all cores, % of one core)"
    )
    lat = res["latency"]
    print()
    head = (
        f"{'receiver':38} {'samples':>7} {'seen':>5} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'max ms':>7} {'min ms':>7}"
    )
    print(head)
    print("-" * len(head))
    rows = [
        ("browser: DOM #beam-vacuum", lat["dom"], lat["samples"]),
        ("browser: next animation frame", lat["frame"], lat["samples"]),
        ("browser: feed message received", lat["receipt"], lat["samples"]),
        ("browser: received -> DOM (page's own)", lat["page"], lat["samples"]),
        (
            f"WS clients ({lat['ws']['clients']}), pooled",
            lat["ws"],
            lat["samples"] * lat["ws"]["clients"],
        ),
    ]
    for name, f, n in rows:
        print(
            f"{name:38} {n:>7} {f['seen']:>5} {_f(f['p50_ms']):>7} {_f(f['p95_ms']):>7} "
            f"{_f(f['p99_ms']):>7} {_f(f['max_ms']):>7} {_f(f['min_ms']):>7}"
        )
    clocks = ", ".join(
        f"{c['offset_ms']} +/- {c['bound_ms']}" for c in res["clients"]["browser_clocks"]
    )
    print(
        f"latency = the client's wall clock at the first change to the new value - t0 of the "
        f"register change; WS clients: worst client's p95 {lat['ws']['worst_client_p95_ms']} "
        f"ms;\nbrowser clock (timeOrigin + now) - time.time(), ms, per login: {clocks}"
    )
    resyncs = sum(s["resyncs"] for s in res["clients"]["ws_stats"])
    print(f"WebSocket clients' resyncs: {resyncs}")
    print()
    print(f"{'figure':58} {'measured':>21}  {'goal':>8}  met")
    for name, val, goal, met in goals:
        m = "" if met is None else ("yes" if met else "NO")
        print(f"{name:58} {val!s:>21}  {goal:>8}  {m}")
    print(
        f"CPU per client per round: {res['cpu_per_client_per_round']} (each phase with clients "
        "against the mean of the phases without on either side)"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, *rest = argv[1:]
        if kind == "ws":
            asyncio.run(ws_child(rest[0], rest[1], rest[2], int(rest[3])))
        elif kind == "browser":
            asyncio.run(browser_child(rest[0], rest[1], rest[2], rest[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="measured time per phase, s")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="phases with clients, each between two without (default 1: three phases)",
    )
    ap.add_argument(
        "--ws-clients", type=int, default=19, help="WebSocket clients beside the browser"
    )
    ap.add_argument("--period-s", type=float, default=1.0, help="one register change per, s")
    ap.add_argument("--settle-s", type=float, default=3.0, help="unmeasured time first, s")
    ap.add_argument("--chromium", default=CHROMIUM, help="the Chromium binary")
    ap.add_argument("--seed", type=int, default=1, help="seed of the changes' random phases")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument("--smoke", action="store_true", help="4 s phases, 2 WebSocket clients")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seconds, args.ws_clients, args.settle_s = 4.0, 2, 1.0
    if args.seconds <= 0 or args.period_s <= 0:
        ap.error("--seconds and --period-s must be positive")
    if args.seconds < 2 * args.period_s:
        ap.error("--seconds must hold at least two periods")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, not {args.rounds}")
    if not 1 <= args.ws_clients <= 40:
        ap.error(f"--ws-clients must be within 1..40, not {args.ws_clients}")
    if args.settle_s < 0:
        ap.error(f"--settle-s must not be negative, not {args.settle_s:g}")
    if not Path(args.chromium).exists():
        ap.error(f"no Chromium at {args.chromium}")
    opts = Options(
        args.seconds,
        args.ws_clients,
        args.period_s,
        args.settle_s,
        2.0,
        args.chromium,
        args.seed,
        args.rounds,
    )
    code = code_version()
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hmi-latency-") as tmp:
        res = asyncio.run(Bench(opts, Path(tmp)).run())
    goals = summarise(res)
    res.update({"python": sys.version.split()[0], "code": code, **host_facts(load_start, t0)})
    print_table(res, goals)
    print(
        f"\ncycle {res['cycle_period_s']:g} s; reel {res['reel_length_m']} m at up to "
        f"{res['speed_limit_m_min']} m/min; {len(res['phases'])} phases of {res['seconds']:g} s "
        f"after {res['settle_s']:g} s of settling, "
        f"a register change every {res['period_s']:g} s; load average (1, 5, 15 min): start "
        f"{res['load_avg_start']}, end {res['load_avg_end']}; {res['cpus']} CPUs; took "
        f"{res['took_s']:.0f} s; code {code}"
    )
    if args.json:
        res["goals"] = [{"name": n, "measured": v, "goal": g, "met": m} for n, v, g, m in goals]
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
